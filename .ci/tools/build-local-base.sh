#!/usr/bin/env bash
# Build the two local Debian base images that stand in for the Dockerfile's public python base where
# no container registry is reachable (this project's machines reach Debian's archive, not a
# registry). Both are minimal Debian (mmdebstrap --variant=minbase) with the distribution's Python,
# so the virtualenv built in the one runs unchanged in the other (same /usr/bin/python3):
#
#   localhost/ingest-base:SUITE-build    python3, venv, pip  (the Dockerfile's build stage)
#   localhost/ingest-base:SUITE-runtime  python3 only        (the runtime stage: no installer)
#
# The root filesystem tarballs are cached in ~/.cache/ingest/image-base/ (about 2 minutes each to
# make, once per machine); `podman import` turns them into images when the images are missing.
# Documentation, man pages and locales are left out (dpkg path-exclude), as in the slim images.
#
# Usage: bash .ci/tools/build-local-base.sh [SUITE]      (idempotent; SUITE defaults to bookworm)
set -euo pipefail

suite="${1:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/ingest/image-base"
mkdir -p "$cache"

common_packages="python3,python-is-python3,ca-certificates"
declare -A packages=(
  [build]="$common_packages,python3-venv,python3-pip"
  [runtime]="$common_packages"
)

for flavour in build runtime; do
  image="localhost/ingest-base:$suite-$flavour"
  tarball="$cache/$suite-$flavour.tar"
  if podman image exists "$image"; then
    echo "build-local-base: $image already present"
    continue
  fi
  if [ ! -s "$tarball" ]; then
    echo "build-local-base: making $tarball with mmdebstrap (minbase + ${packages[$flavour]})"
    started=$(date +%s)
    mmdebstrap --quiet --variant=minbase --include="${packages[$flavour]}" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      "$suite" "$cache/$suite-$flavour.partial.tar" "$mirror"
    mv "$cache/$suite-$flavour.partial.tar" "$tarball"
    echo "build-local-base: $tarball made in $(( $(date +%s) - started )) s"
  fi
  podman import --quiet --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$image" >/dev/null
  echo "build-local-base: imported $image"
done
