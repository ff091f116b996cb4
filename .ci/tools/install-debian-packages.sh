#!/usr/bin/env bash
# Install the named Debian packages that are not installed yet (apt-get; needs root).
# `make image`, `make verify-image` and `make verify-chart` use it for buildah/podman/mmdebstrap and
# etcd-server: Debian's packages are the only container tools this project's registries reach.
#
# Usage: bash .ci/tools/install-debian-packages.sh PACKAGE...      (idempotent)
set -euo pipefail

missing=()
for package in "$@"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-debian-packages: ${missing[*]} missing; installing them needs root (apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "install-debian-packages: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
