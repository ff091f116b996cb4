"""The alert rules with the real promtool: `check rules` (syntax, PromQL, templates) and `test rules`
(prometheus-rules.test.yaml: every alert firing and not firing).

promtool comes from `make tools` (.tools/bin, installed by .ci/tools/install-promtool.sh). A missing
promtool fails these tests: the rules would otherwise ship unchecked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "helm" / "ingest" / "files"
RULES = FILES / "prometheus-rules.yaml"
RULE_TESTS = FILES / "prometheus-rules.test.yaml"
DOCS = ROOT / "docs" / "observability.md"


def find_promtool() -> str:
    local = ROOT / ".tools" / "bin" / "promtool"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    on_path = shutil.which("promtool")
    if on_path:
        return on_path
    pytest.fail("promtool not found on PATH or in .tools/bin: run `make tools` "
                "(or `bash .ci/tools/install-promtool.sh .tools/bin`)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=FILES,
                          check=False)


def alerts() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_check_rules_rejects_broken_promql(tmp_path: Path) -> None:
    """The check is real: the same promtool refuses a rule file with a PromQL syntax error."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(RULES.read_text().replace(
        "ingest_subscription_expiry_seconds <= 0", "ingest_subscription_expiry_seconds <= (0", 1))
    result = subprocess.run([find_promtool(), "check", "rules", str(broken)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode != 0


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {str(rule["alert"]) for rule in alerts()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown not firing"


def test_every_alert_has_summary_description_and_a_runbook_section() -> None:
    docs = DOCS.read_text()
    for rule in alerts():
        name = str(rule["alert"])
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations.get("summary") and annotations.get("description"), name
        anchor = name.lower()
        assert annotations.get("runbook") == f"docs/observability.md#{anchor}", name
        assert f"### {name}\n" in docs, f"no runbook section '### {name}' in docs/observability.md"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name  # type: ignore[index]
