"""docs/faults.md matches the tests: every test it names exists, and every fault test is in it."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DOC = (REPO / "docs" / "faults.md").read_text()


def _defined_tests() -> dict[str, set[str]]:
    """test file (relative path) -> names of the test functions it defines."""
    return {str(p.relative_to(REPO)): set(re.findall(r"^def (test_\w+)\(", p.read_text(), re.MULTILINE))
            for p in (REPO / "tests").rglob("test_*.py")}


def test_every_test_the_table_names_exists() -> None:
    defined = _defined_tests()
    every = set().union(*defined.values())
    for path in set(re.findall(r"`(tests/[\w/]+\.py)", DOC)):
        assert (REPO / path).is_file(), f"docs/faults.md names {path}, which does not exist"
    for path, name in re.findall(r"`(tests/[\w/]+\.py)::(test_[\w*]+)", DOC):
        assert any(fnmatch.fnmatch(n, name) for n in defined[path]), f"{path}::{name} does not exist"
    for name in set(re.findall(r"`(?:::)?(test_[\w*]+)", DOC)):
        assert any(fnmatch.fnmatch(n, name) for n in every), f"docs/faults.md names {name}, which does not exist"


def test_every_fault_test_is_in_the_table() -> None:
    for path, names in _defined_tests().items():
        if path.startswith("tests/integration/faults/") and not path.endswith("test_docs.py"):
            missing = sorted(n for n in names if n not in DOC)
            assert missing == [], f"{path}: not in docs/faults.md: {missing}"
