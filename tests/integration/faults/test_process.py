"""The worker process killed with SIGKILL mid-stream (no flush, no last checkpoint) and started again:
the new process restores the checkpoints, renews the same subscriptions and replays from PubNub's
buffer. At-least-once: nothing lost; what the dead process had produced after its last checkpoint
comes again (duplicates, counted)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

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


def test_sigkill_mid_stream_and_restart_lose_nothing(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with Sandbox(sandbox_settings()) as sandbox:
        config = worker_config_file(tmp_path, sandbox, kafka_bootstrap, unique_name)
        first = WorkerProcess(config, tmp_path / "first.log").start()
        second: WorkerProcess | None = None
        reader: FaultTolerantReader | None = None
        try:
            first.wait_ready(60, "the first worker ready")
            reader = FaultTolerantReader(kafka_bootstrap, unique_name)
            s = Traffic(sandbox, reader)
            created = sandbox.rc.created_total
            s.traffic()
            s.wait_traffic(100)
            first.kill()
            killed = time.monotonic()
            assert first.proc.returncode == -signal.SIGKILL
            s.wait_traffic(60)  # published while no worker runs: only PubNub's buffer holds it
            second = WorkerProcess(config, tmp_path / "second.log").start()
            second.wait_ready(60, "the second worker ready")
            restart = time.monotonic() - killed
            recovery = s.probe()
            s.wait_traffic(60)
            _, duplicates = s.verify("SIGKILL mid-stream + restart")
            assert sandbox.rc.created_total == created, "the restarted worker created new subscriptions"
            assert second.stop() == 0
            print(f"down {restart:.1f}s (kill -> ready), probe {recovery:.1f}s, duplicates {duplicates} "
                  f"(produced after the last checkpoint of the killed process)")
        finally:
            close_all(reader, first, second)


# Short lifetimes, so that a recorded subscription expires while no worker runs; long enough, for the
# rotation, that it is still live when the restarted worker renews it.
TTL = {"expiry": 12, "rotation": 40}


def _stop(worker: WorkerProcess, how: str) -> None:
    if how == "sigkill":
        worker.kill()
    else:
        assert worker.stop() == 0


def _events(worker: WorkerProcess, name: str) -> list[dict[str, object]]:
    return [e for e in worker.lines() if e.get("event") == name]


@pytest.mark.parametrize(("how", "after", "guarantee"), [
    ("sigkill", "expiry", "at-least-once"), ("sigterm", "expiry", "at-least-once"),
    ("sigkill", "rotation", "at-least-once"), ("sigterm", "rotation", "at-least-once"),
    ("sigkill", "rotation", "exactly-once"),
])
def test_restart_reads_the_recorded_channels_to_their_end(kafka_bootstrap: str, unique_name: str, tmp_path: Path, *,
                                                          how: str, after: str, guarantee: str) -> None:
    """Stopped while RingCentral keeps publishing; restarted after the recorded subscriptions expired
    (re-created on new channels), or where the first renewal rotates channel and key. Everything
    published on the old channels since the checkpoint is still in PubNub's buffer: none of it is lost."""
    ttl = TTL[after]
    with Sandbox(sandbox_settings(subscription_ttl_max=ttl)) as sandbox:
        config = worker_config_file(tmp_path, sandbox, kafka_bootstrap, unique_name, worker={
            "renewal_margin_seconds": 5, "renewal_jitter_seconds": 1, "expires_in_seconds": ttl,
            "delivery_guarantee": guarantee})
        first = WorkerProcess(config, tmp_path / "first.log").start()
        second: WorkerProcess | None = None
        reader: FaultTolerantReader | None = None
        try:
            first.wait_ready(60, "the first worker ready")
            reader = FaultTolerantReader(kafka_bootstrap, unique_name)
            s = Traffic(sandbox, reader)
            s.traffic()
            s.wait_traffic(40)
            _stop(first, how)
            stopped, published = time.monotonic(), sandbox.generator.count()
            old = {v.id: v.channel for v in sandbox.rc.live_subscriptions()}
            if after == "expiry":  # RingCentral publishes on the old channels until they expire
                wait_for(lambda: not any(sandbox.rc.is_live(i) for i in old), ttl * 3, what="the subscriptions expired")
            else:
                s.wait_traffic(60)
                sandbox.faults.rotate_on_next_renewal(None, key=True, channel=True)
            unread = sandbox.generator.count() - published
            second = WorkerProcess(config, tmp_path / "second.log").start()
            second.wait_ready(60, "the second worker ready")
            down = time.monotonic() - stopped
            live = {v.id: v.channel for v in sandbox.rc.live_subscriptions()}
            assert not set(live.values()) & set(old.values()), "the channels did not move"
            assert (set(live) == set(old)) == (after == "rotation"), "rotated in place, or re-created after expiry"
            s.wait_traffic(40)
            _, duplicates = s.verify(f"{how} + restart after {after}, {guarantee}")
            assert duplicates == 0 or guarantee == "at-least-once"
            wait_for(lambda: {e["subscription_id"] for e in _events(second, "replay.drained")} == set(old), 30,
                     what="every old channel drained")
            print(f"down {down:.1f}s, {unread} published on the old channels meanwhile, 0 lost, "
                  f"{duplicates} duplicates")
        finally:
            close_all(reader, first, second)


def test_a_subscription_deleted_while_the_worker_was_down_is_reported_gone(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    """Stopped; RingCentral deletes one recorded subscription long before its recorded expiry; started
    again before that expiry. The renewal of the recorded id answers 404 and a new subscription is
    created: RingCentral published nothing for the spec from the delete until then, so that window is
    reported as a gap naming the deleted subscription (before: only an INFO `subscription.reuse_gone`)."""
    with Sandbox(sandbox_settings()) as sandbox:
        config = worker_config_file(tmp_path, sandbox, kafka_bootstrap, unique_name)
        first = WorkerProcess(config, tmp_path / "first.log").start()
        second: WorkerProcess | None = None
        reader: FaultTolerantReader | None = None
        try:
            first.wait_ready(60, "the first worker ready")
            reader = FaultTolerantReader(kafka_bootstrap, unique_name)
            s = Traffic(sandbox, reader)
            s.traffic()
            s.wait_traffic(40)
            assert first.stop() == 0
            victim = sandbox.rc.live_subscriptions()[0]
            deleted_at = time.time()
            sandbox.faults.delete_subscription(victim.id)
            assert victim.expires_at > time.time() + 60, "the recorded expiry must still be ahead"
            second = WorkerProcess(config, tmp_path / "second.log").start()
            second.wait_ready(60, "the second worker ready")

            def gaps() -> list[dict[str, object]]:
                return [e for e in _events(second, "replay.gap_suspected") if e.get("subscription_id") == victim.id]

            wait_for(gaps, 30, what="the deleted subscription's gap report")
            [gap] = gaps()
            assert str(gap["reason"]).startswith("subscription gone"), gap
            assert float(str(gap["missing_from"])) <= deleted_at <= float(str(gap["missing_until"])), gap
            s.wait_traffic(40)
            s.verify("subscription deleted while the worker was down")
            assert second.stop() == 0
            print(f"gap reported over {float(str(gap['missing_until'])) - float(str(gap['missing_from'])):.1f}s "
                  f"(the delete inside it)")
        finally:
            close_all(reader, first, second)


def test_a_worker_fenced_by_a_newer_instance_exits_3(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    """Two exactly-once workers with one transactional.id (the same worker id: a second pod started
    with the first's config, or a restart while the old process still runs): the newer instance's
    `init_transactions` fences the older, whose next commit is refused within transaction.timeout.ms.
    The older must stop (`Worker.failed`) and `ingest run` exit 3 for its supervisor, not go on as a
    zombie; the newer serves on, and read_committed sees every notification exactly once."""
    with Sandbox(sandbox_settings()) as sandbox:
        # One config, one worker id (by default it holds the process id): one transactional.id.
        config = worker_config_file(tmp_path, sandbox, kafka_bootstrap, unique_name,
                                    worker={"delivery_guarantee": "exactly-once", "id": "twin"})
        first = WorkerProcess(config, tmp_path / "first.log").start()
        second: WorkerProcess | None = None
        reader: FaultTolerantReader | None = None
        try:
            first.wait_ready(60, "the first worker ready")
            reader = FaultTolerantReader(kafka_bootstrap, unique_name)
            s = Traffic(sandbox, reader)
            s.traffic()
            s.wait_traffic(40)
            second = WorkerProcess(config, tmp_path / "second.log").start()
            wait_for(lambda: first.proc.poll() is not None, 120, what="the fenced first worker to exit")
            assert first.proc.returncode == 3, first.proc.returncode
            [exiting] = _events(first, "worker.exiting")
            assert "fenced" in str(exiting["reason"]), exiting
            assert not _events(first, "transaction.producer_replaced"), "the zombie replaced its producer"
            second.wait_ready(60, "the second worker ready")
            s.wait_traffic(40)
            _, duplicates = s.verify("a second worker with the same transactional.id")
            assert duplicates == 0
            assert second.stop() == 0
            print(f"the first exited 3: {exiting['reason']}")
        finally:
            close_all(reader, first, second)
