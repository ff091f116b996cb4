"""The declared dependencies and the versions the image installs.

Every third-party package that `ingest/` imports is declared in pyproject.toml, 0.x packages are
capped (their minor releases may break the API), and `.ci/constraints.txt`, which the Dockerfile
installs with, pins each runtime dependency to a version inside its declared range.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
RUNTIME = [Requirement(line) for line in PROJECT["dependencies"]]
DEV = [Requirement(line) for line in PROJECT["optional-dependencies"]["dev"]]
# The benchmarks compare against baselines that only the dev extras install.
DEV_ONLY_CODE = REPO / "ingest" / "bench"


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports of one source file."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"ingest"}


def test_every_package_ingest_imports_is_declared() -> None:
    distributions = packages_distributions()
    runtime = {canonicalize_name(r.name) for r in RUNTIME}
    dev = {canonicalize_name(r.name) for r in DEV}
    undeclared = {}
    for path in sorted((REPO / "ingest").rglob("*.py")):
        allowed = runtime | dev if path.is_relative_to(DEV_ONLY_CODE) else runtime
        for module in imported_modules(path):
            providers = {canonicalize_name(d) for d in distributions.get(module, [])}
            if not providers & allowed:
                undeclared[f"{path.relative_to(REPO)}: {module}"] = sorted(providers)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_zero_major_dependencies_are_capped() -> None:
    uncapped = []
    for requirement in RUNTIME + DEV:
        lower = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "~=", "==")]
        caps = [Version(s.version) for s in requirement.specifier if s.operator == "<"]
        if lower and lower[0].major == 0 and not any(cap.major == 0 for cap in caps):
            uncapped.append(str(requirement))
    assert not uncapped, f"0.x dependencies without a cap below 1.0: {uncapped}"


def test_the_image_installs_pinned_versions_inside_the_declared_ranges() -> None:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    for requirement in RUNTIME + DEV:
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned, f"{requirement.name} is not pinned in .ci/constraints.txt (make constraints)"
        assert requirement.specifier.contains(pinned, prereleases=True), f"{requirement.name}=={pinned}: {requirement}"
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY pyproject.toml .ci/constraints.txt ./" in dockerfile
    assert "-r /tmp/requirements.txt -c constraints.txt" in dockerfile
