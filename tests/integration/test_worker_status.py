"""`ingest status` against a running worker, standalone and in a group, with a config whose
RingCentral secrets are unavailable (status only reads Kafka)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import wait_for
from tests.support.harness import observed_worker


def _without_secrets(config: Path) -> Path:
    """The worker's config with every secret pointing at an unset environment variable."""
    raw: dict[str, Any] = yaml.safe_load(config.read_text())
    raw["ringcentral"].pop("client_secret_file")
    raw["ringcentral"]["client_secret_env"] = "STATUS_TEST_UNSET_SECRET"
    for account in raw["accounts"]:
        account.pop("jwt_file")
        account["jwt_env"] = "STATUS_TEST_UNSET_JWT"
    path = config.with_name("status.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def _status(config: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "ingest", "status", "--config", str(config)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("mode", ["standalone", "group"])
def test_status_shows_the_running_worker_and_its_specs(mode: str, kafka_bootstrap: str, unique_name: str,
                                                      tmp_path: Path) -> None:
    with observed_worker(tmp_path, kafka_bootstrap, unique_name, worker={"coordination": mode}) as (worker, _):
        manager = worker.manager
        assert manager is not None
        wait_for(lambda: len(manager.snapshot()) == 3 and all(s.state == "active" for s in manager.snapshot()), 60,
                 what="three active subscriptions")
        config = _without_secrets(tmp_path / "worker.yaml")
        subscriptions = {s.spec_id: s.subscription_id for s in manager.snapshot()}
        # The state records of a delivery are written by the checkpoint thread, soon after.
        out = ""

        def every_spec_listed() -> bool:
            nonlocal out
            out = _status(config)
            return all(sub in out for sub in subscriptions.values())

        wait_for(every_spec_listed, 60, interval=1, what=f"status listing every subscription:\n{out}")
    headline = out.splitlines()[0]
    if mode == "group":
        assert headline == f"group {unique_name}.workers (stable): 1 worker, 3 specs"
    else:
        assert headline == (f"standalone workers (live = wrote {unique_name}.state within the last minute): "
                            "1 worker, 3 specs")
    member = out.splitlines()[1]
    assert member.split()[0] == worker.worker_id and "3 specs" in member
    for spec_id, subscription_id in subscriptions.items():
        row = next(line for line in out.splitlines() if line.split()[:1] == [spec_id])
        assert row.split()[1:3] == [worker.worker_id, subscription_id]
