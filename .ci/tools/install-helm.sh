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
# Idempotent, and built once per machine: the binary is kept in ~/.cache/ingest/helm/<version>-k8s<M.m>/
# and copied from there into every fresh checkout; GOMODCACHE and GOCACHE live under
# ~/.cache/ingest/go (about 1.2 GB after the first build, which takes about 10 minutes).
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_K8S_MAJOR="${HELM_K8S_MAJOR:-1}"
HELM_K8S_MINOR="${HELM_K8S_MINOR:-37}"
GO_MIN_MINOR=26   # helm v3.22.0's go.mod says `go 1.26`

dest="${1:-.tools/bin}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/ingest"
cached="$cache_root/helm/${HELM_VERSION}-k8s${HELM_K8S_MAJOR}.${HELM_K8S_MINOR}/helm"

is_pinned() {  # is_pinned BINARY: it runs and reports the pinned version
  [ -x "$1" ] && "$1" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

keep_in_cache() {  # later checkouts copy this binary instead of building again
  is_pinned "$cached" && return 0
  mkdir -p "$(dirname "$cached")"
  cp "$dest/helm" "$cached.tmp" && mv "$cached.tmp" "$cached"
  echo "install-helm: kept a copy in $cached for other checkouts"
}

if is_pinned "$dest/helm"; then
  echo "install-helm: helm $HELM_VERSION already in $dest"
  keep_in_cache
  exit 0
fi

if is_pinned "$cached"; then
  cp "$cached" "$dest/helm"
  echo "install-helm: helm $HELM_VERSION copied from $cached (built before; delete it to rebuild)"
  exit 0
fi

command -v go >/dev/null || {
  echo "install-helm: Go toolchain (>= 1.$GO_MIN_MINOR) not found on PATH; it builds helm $HELM_VERSION once" >&2
  exit 1; }
go_version="$(go env GOVERSION)"   # e.g. go1.26.8
go_minor="$(echo "$go_version" | sed -E 's/^go1\.([0-9]+).*/\1/')"
if ! [ "$go_minor" -ge "$GO_MIN_MINOR" ] 2>/dev/null; then
  echo "install-helm: $go_version is too old; helm $HELM_VERSION needs Go >= 1.$GO_MIN_MINOR" >&2
  exit 1
fi

export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$cache_root/go/mod}"
export GOCACHE="${GOCACHE_OVERRIDE:-$cache_root/go/build}"
export GOBIN="$dest"
export GOFLAGS="${GOFLAGS:-} -modcacherw"   # keep the module cache deletable by `rm -rf`
export CGO_ENABLED=0

ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
for pkg in pkg/chartutil pkg/lint/rules; do
  ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=${HELM_K8S_MAJOR}"
  ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${HELM_K8S_MINOR}"
done

echo "install-helm: building helm ${HELM_VERSION} (Kubernetes ${HELM_K8S_MAJOR}.${HELM_K8S_MINOR}) from source with $go_version:"
echo "install-helm:   no package ships a current helm, and the chart tests run the real one."
echo "install-helm:   The first build downloads ~110 Go modules (~1.2 GB in $cache_root/go) and takes about"
echo "install-helm:   10 minutes; the binary is then kept in $(dirname "$cached") for every checkout."
# One progress line per 20 modules instead of one `go: downloading` line each.
go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" 2>&1 \
  | awk '/^go: downloading / { n++; if (n % 20 == 0) printf "install-helm:   %d modules downloaded\n", n; fflush(); next }
         { print; fflush() }
         END { if (n) printf "install-helm:   %d modules downloaded in all\n", n }'
is_pinned "$dest/helm" || { echo "install-helm: the build did not produce helm $HELM_VERSION in $dest" >&2; exit 1; }
"$dest/helm" version
keep_in_cache
