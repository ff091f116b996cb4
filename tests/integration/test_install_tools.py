"""`.ci/tools/install-helm.sh`, as `make test` runs it on a fresh checkout: a helm built before on this
machine is copied from ~/.cache/ingest/helm/<version>/ (no Go, no 10-minute build), a checkout that has
one seeds that cache, and without either a missing Go is one clear line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.integration.test_helm import REPO, _find_helm

SCRIPT = REPO / ".ci" / "tools" / "install-helm.sh"
CACHED = Path("ingest/helm/v3.22.0-k8s1.37/helm")


def _install(dest: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """Run the script with `cache` as XDG_CACHE_HOME and no Go on PATH."""
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "go").exists())
    return subprocess.run(["bash", str(SCRIPT), str(dest)], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PATH": path, "XDG_CACHE_HOME": str(cache)})


def _version(helm: Path) -> str:
    return subprocess.run([str(helm), "version", "--template", "{{.Version}}"], capture_output=True, text=True,
                          timeout=30, check=True).stdout


def test_a_fresh_checkout_copies_the_helm_built_before(tmp_path: Path) -> None:
    cached = tmp_path / "cache" / CACHED
    cached.parent.mkdir(parents=True)
    shutil.copy(_find_helm(), cached)
    proc = _install(tmp_path / "bin", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"install-helm: helm v3.22.0 copied from {cached} (built before; delete it to rebuild)"]
    assert _version(tmp_path / "bin" / "helm") == "v3.22.0"


def test_a_checkout_with_helm_keeps_a_copy_for_the_others(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    shutil.copy(_find_helm(), tmp_path / "bin" / "helm")
    proc = _install(tmp_path / "bin", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert f"install-helm: kept a copy in {tmp_path / 'cache' / CACHED} for other checkouts" in proc.stdout
    assert _version(tmp_path / "cache" / CACHED) == "v3.22.0"


def test_without_go_and_without_a_cached_helm_says_what_is_missing(tmp_path: Path) -> None:
    proc = _install(tmp_path / "bin", tmp_path / "cache")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "install-helm: Go toolchain (>= 1.26) not found on PATH; it builds helm v3.22.0 once"]
