#!/usr/bin/env bash
# Install promtool (and nothing else) into DEST_BIN_DIR, from Debian's `prometheus` package.
#
# Why Debian: `go install` of promtool fails (prometheus' go.mod has replace/exclude directives), and
# the tests need the real promtool for `check rules` / `test rules`. We take the binary out of the
# .deb with dpkg-deb instead of installing the package, so no Prometheus server is installed or started.
#
# Usage: bash .ci/tools/install-promtool.sh DEST_BIN_DIR      (idempotent)
set -euo pipefail

dest="${1:?usage: install-promtool.sh DEST_BIN_DIR}"
mkdir -p "$dest"
if [ -x "$dest/promtool" ] && "$dest/promtool" --version >/dev/null 2>&1; then
    echo "promtool already installed: $dest/promtool"
    exit 0
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "install-promtool: '$tool' not found; this script needs a Debian/Ubuntu host" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# apt-get download works as any user (it writes into the current directory); `apt-get update`
# needs root, so it is only attempted when the package lists are missing or stale.
if ! (cd "$work" && apt-get download -q prometheus >/dev/null 2>&1); then
    echo "install-promtool: 'apt-get download prometheus' failed; refreshing package lists" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-promtool: 'apt-get update' needs root; run it as root or install promtool into $dest by hand" >&2
        exit 1
    fi
    apt-get update -q >/dev/null
    (cd "$work" && apt-get download -q prometheus) || {
        echo "install-promtool: could not download the Debian 'prometheus' package" >&2; exit 1; }
fi

deb="$(ls "$work"/prometheus_*.deb 2>/dev/null | head -n1)"
[ -n "$deb" ] || { echo "install-promtool: no prometheus_*.deb downloaded" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/root"
[ -x "$work/root/usr/bin/promtool" ] || {
    echo "install-promtool: $deb does not contain usr/bin/promtool" >&2; exit 1; }

# Install atomically so that a half-copied binary never looks installed.
cp "$work/root/usr/bin/promtool" "$dest/.promtool.tmp"
chmod 0755 "$dest/.promtool.tmp"
mv -f "$dest/.promtool.tmp" "$dest/promtool"
"$dest/promtool" --version 2>&1 | head -n1
echo "promtool installed: $dest/promtool"
