#!/usr/bin/env bash
# Install a pinned Helm 3 CLI into DEST_BIN_DIR (default .tools/bin) with `go install` from the Go
# module proxy. No PyPI or Debian package ships a current helm, and its go.mod has no replace/exclude
# directives, so a plain `go install` works.
#
# Why the -ldflags: the official release build injects the version string and the Kubernetes version
# that `helm template`/`helm lint` assume for .Capabilities.KubeVersion. Without them a go-installed
# helm reports a bare "v3.22" and assumes Kubernetes v1.20.0. HELM_K8S_MINOR follows the client-go
# minor in helm's go.mod (v3.22.0 -> k8s.io/client-go v0.37.0 -> Kubernetes 1.37).
#
# Idempotent: returns at once when the pinned version is already installed; GOMODCACHE and GOCACHE
# live under ~/.cache so a second build (another checkout, CI cache) is fast.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_K8S_MAJOR="${HELM_K8S_MAJOR:-1}"
HELM_K8S_MINOR="${HELM_K8S_MINOR:-37}"

dest="${1:-.tools/bin}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

if [ -x "$dest/helm" ] && "$dest/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  echo "helm $HELM_VERSION already in $dest"
  exit 0
fi

command -v go >/dev/null || { echo "install-helm: Go toolchain (>= 1.26) not found on PATH" >&2; exit 1; }

cache="${XDG_CACHE_HOME:-$HOME/.cache}/ingest/go"
export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$cache/mod}"
export GOCACHE="${GOCACHE_OVERRIDE:-$cache/build}"
export GOBIN="$dest"
export GOFLAGS="${GOFLAGS:-} -modcacherw"   # keep the module cache deletable by `rm -rf`
export CGO_ENABLED=0

ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
for pkg in pkg/chartutil pkg/lint/rules; do
  ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=${HELM_K8S_MAJOR}"
  ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${HELM_K8S_MINOR}"
done

echo "install-helm: building helm ${HELM_VERSION} (Kubernetes ${HELM_K8S_MAJOR}.${HELM_K8S_MINOR}) into $dest"
go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
"$dest/helm" version
