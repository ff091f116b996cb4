#!/usr/bin/env bash
# `make image`: build the Dockerfile with docker where an engine runs, else with podman (Debian's,
# installed when missing; docker here may be only a client without an engine).
#
# IMAGE       the tag (default localhost/ingest:dev)
# IMAGE_BASE  public: the Dockerfile's pinned python base from a registry;
#             local:  Debian bases made here by .ci/tools/build-local-base.sh (no registry needed);
#             auto (default): public with docker, local with podman.
# Extra arguments go to the build (e.g. --no-cache).
#
# Package downloads may pass a TLS-intercepting proxy: the host's CA bundle and pip configuration
# reach the build as build secrets (mounted for the pip steps only, never in a layer).
set -euo pipefail
cd "$(dirname "$0")/../.."

image="${IMAGE:-localhost/ingest:dev}"
base="${IMAGE_BASE:-auto}"
suite=bookworm

if docker info >/dev/null 2>&1; then
  engine=(docker build)
  [ "$base" = auto ] && base=public
else
  bash .ci/tools/install-debian-packages.sh podman buildah runc
  # chroot isolation: the build's RUN steps need no namespaces a nested container may not grant.
  engine=(podman build --isolation chroot)
  [ "$base" = auto ] && base=local
fi

args=(--tag "$image" --file Dockerfile --network host)
case "$base" in
  public) ;;
  local)
    bash .ci/tools/build-local-base.sh "$suite"
    args+=(--build-arg "PYTHON_IMAGE=localhost/ingest-base:$suite-build"
           --build-arg "PYTHON_RUNTIME_IMAGE=localhost/ingest-base:$suite-runtime") ;;
  *) echo "build-image: IMAGE_BASE must be public, local or auto, not '$base'" >&2; exit 2 ;;
esac

ca_bundle="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
[ -f "$ca_bundle" ] && args+=(--secret "id=pip-ca,src=$ca_bundle")
for pip_conf in "${PIP_CONFIG_FILE:-}" "$HOME/.config/pip/pip.conf" /etc/pip.conf; do
  if [ -n "$pip_conf" ] && [ -f "$pip_conf" ]; then
    args+=(--secret "id=pip-conf,src=$pip_conf")
    break
  fi
done

echo "build-image: ${engine[*]} $image ($base base)"
started=$(date +%s)
"${engine[@]}" "${args[@]}" "$@" .
echo "build-image: built $image in $(( $(date +%s) - started )) s"
