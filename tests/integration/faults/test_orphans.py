"""A group worker that dies between creating a subscription and recording it (issue 14, the soak's
"subscriptions no state record named"): the next owner must find that orphan and read it, not renew
the recorded one (or create another) and leave the orphan to receive notifications no one reads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.sandbox.server import Sandbox
from tests.integration.faults.scenario import (
    FaultTolerantReader,
    Traffic,
    close_all,
    sandbox_settings,
    worker_config_file,
)
from tests.support import WorkerProcess, wait_for

pytestmark = pytest.mark.slow

# Short lifetimes: the owner renews (and meets the deleted subscription's 404) within seconds.
TTL = 12


def _events(worker: WorkerProcess, name: str) -> list[dict[str, object]]:
    return [e for e in worker.lines() if e.get("event") == name]


def _settled(workers: list[WorkerProcess], specs: int) -> WorkerProcess | None:
    """The worker that owns and serves all `specs` once both have been assigned their partition, else None."""
    if not all(_events(w, "group.partition_loaded") for w in workers):
        return None
    owners = [w for w in workers if w.owned() == specs]
    if len(owners) != 1 or sum(max(0, w.owned()) for w in workers) != specs or not owners[0].ready():
        return None
    return owners[0]


def _kill_at_next_creation(sandbox: Sandbox, worker: WorkerProcess) -> dict[str, Any]:
    """SIGKILL `worker` the moment RingCentral has created its next subscription, before the worker has
    its answer (so no record of it can name the subscription). Returns what was created, once it was."""
    created: dict[str, Any] = {}
    create = sandbox.rc.create

    def create_then_kill(*args: Any, **kwargs: Any) -> dict[str, Any]:
        info: dict[str, Any] = create(*args, **kwargs)
        if not created:
            created.update(info, killed_at=time.time())
            worker.kill()
        return info

    setattr(sandbox.rc, "create", create_then_kill)  # noqa: B010
    return created


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_a_subscription_created_by_a_worker_that_died_before_recording_it_is_read(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path, guarantee: str) -> None:
    """Two group workers, one account (its two specs in one partition: one owner, one standby). The
    owner's subscription of one spec is deleted server-side; at its renewal (404) the owner creates
    another and is killed as RingCentral creates it. The standby takes the specs over: it must adopt
    that orphan and read everything published to it (before: it renewed the recorded, deleted one,
    created a third, and the orphan's notifications were lost until it expired unrenewed)."""
    with Sandbox(sandbox_settings(subscription_ttl_max=TTL)) as sandbox:
        path = worker_config_file(tmp_path, sandbox, kafka_bootstrap, unique_name, worker={
            "coordination": "group", "delivery_guarantee": guarantee, "session_timeout_seconds": 6,
            "renewal_margin_seconds": 5, "renewal_jitter_seconds": 1, "expires_in_seconds": TTL})
        base = yaml.safe_load(path.read_text())
        workers = [WorkerProcess.in_group(name, base, tmp_path).start() for name in ("o1", "o2")]
        reader: FaultTolerantReader | None = None
        try:
            owner = wait_for(lambda: _settled(workers, 2), 120, interval=0.5, what="one worker owning both specs")
            [heir] = [w for w in workers if w is not owner]
            reader = FaultTolerantReader(kafka_bootstrap, unique_name)
            s = Traffic(sandbox, reader)
            s.traffic()
            s.wait_traffic(40)
            created = _kill_at_next_creation(sandbox, owner)
            recorded = sandbox.rc.live_subscriptions()[0]
            sandbox.faults.delete_subscription(recorded.id)
            wait_for(lambda: created, 3 * TTL, what="the owner's next creation")
            orphan = str(created["id"])
            wait_for(lambda: heir.owned() == 2 and heir.ready(), 90, interval=0.5, what="the heir serving both specs")
            took_over = time.time() - float(created["killed_at"])
            s.wait_traffic(60)
            _, duplicates = s.verify(f"owner killed at a creation, {guarantee}")
            assert duplicates == 0 or guarantee == "at-least-once"
            [adopted] = [e for e in _events(heir, "subscription.orphan_adopted") if e["subscription_id"] == orphan]
            assert adopted["recorded"] == recorded.id, adopted  # in place of the recorded (deleted) one
            # Adopted, it is renewed by the heir: it does not stay alive unrenewed until it expires.
            wait_for(lambda: any(v.id == orphan and v.renewals > 0 for v in sandbox.rc.live_subscriptions()), 2 * TTL,
                     what="the orphan renewed by the heir")
            assert not sandbox.rc.is_live(recorded.id)
            received = sum(1 for g in sandbox.generator.generated if g.subscription_id == orphan)
            intents = sorted(float(str(e["intent_seconds"])) for w in workers
                             for e in _events(w, "subscription.created") if "intent_seconds" in e)
            print(f"orphan: {received} notifications published to it, 0 lost; the heir served both specs "
                  f"{took_over:.1f}s after the kill; {duplicates} duplicates; an intent cost its creation {intents} s")
        finally:
            close_all(reader, *workers)
