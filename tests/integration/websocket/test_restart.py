"""`ingest run` serving a WebSocket account, killed with SIGKILL (no flush, no last checkpoint) while the
sandbox keeps publishing, then started again. The state record holds the wsc of the newest checkpointed
notification: inside `recoveryTimeout` the new process recovers the session with it and RingCentral
replays what followed (0 lost); beyond it the session is gone, the new process subscribes again and
reports the gap, and what is lost is exactly what RingCentral did not keep, inside the reported window."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ingest.sandbox.generator import Generated
from ingest.sandbox.server import Sandbox, demo_accounts
from ingest.sandbox.websocket import WebSocketSettings
from tests.integration.faults.scenario import KINDS, FaultTolerantReader, close_all, sandbox_settings
from tests.integration.sandbox.conftest import MESSAGE_STORE, PRESENCE
from tests.support import WorkerProcess, wait_for
from tests.support.harness import good, write_config

pytestmark = pytest.mark.slow

RATE = 10.0  # notifications per second, published throughout (also while no worker runs)
# The real buffer holds 100; the tests measure the worker, not RingCentral's buffer: a loaded machine takes
# up to ~20 s to start a worker, which at RATE is more than 100 (the buffer's loss is the emulator's `lost`).
BUFFER = 1000


def _websocket_config(tmp_path: Path, sandbox: Sandbox, bootstrap: str, prefix: str, accounts: int = 1) -> Path:
    path = write_config(tmp_path, sandbox, bootstrap, prefix, accounts=accounts,
                        subscriptions={"calls-and-messages": [MESSAGE_STORE, PRESENCE]})
    doc = yaml.safe_load(path.read_text())
    for account in doc["accounts"]:
        account["transport"] = "websocket"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _start_and_kill(sandbox: Sandbox, reader: FaultTolerantReader, first: WorkerProcess, *,
                    graceful: bool = False) -> float:
    """Serve with traffic until notifications are in Kafka and checkpointed, then SIGKILL (or SIGTERM, and
    wait for the exit). When it was signalled (unix s)."""
    sandbox.generator.start(RATE, kinds=KINDS)
    assert len(reader.poll_until(lambda rs: len(rs) >= 30, 60)) >= 30
    # Two more checkpoints written after those records reached Kafka: the kill comes after a checkpoint
    # that covers them (it does not wait for one).
    written = first.metric("ingest_checkpoints_total")
    wait_for(lambda: first.metric("ingest_checkpoints_total") >= written + 2, 60, what="two more checkpoints")
    signalled = time.time()
    if graceful:
        assert first.stop() == 0
    else:
        first.kill()
        assert first.proc is not None and first.proc.returncode == -signal.SIGKILL
    return signalled


def _drain(sandbox: Sandbox, reader: FaultTolerantReader,
           expected: Callable[[Generated], bool] = lambda g: True) -> tuple[list[Generated], set[str]]:
    """Stop publishing; read until every `expected` good notification is in Kafka (or 60 s): (the good ones
    published, the uuids in Kafka)."""
    sandbox.generator.stop()
    generated = good(sandbox.generator.generated)
    wanted = {g.uuid for g in generated if expected(g)}
    records = reader.poll_until(lambda rs: wanted <= {r.headers.get("uuid") for r in rs}, 60)
    return generated, {str(r.headers.get("uuid")) for r in records}


@dataclass
class _Restart:
    """A single worker served, was SIGKILLed (`killed`, unix s); the test starts `second` itself."""

    config: Path
    reader: FaultTolerantReader
    killed: float
    second: WorkerProcess | None = None


@contextlib.contextmanager
def _killed_worker(sandbox: Sandbox, tmp_path: Path, bootstrap: str, prefix: str) -> Iterator[_Restart]:
    """A worker on the sandbox's WebSocket sessions, served with traffic, then SIGKILLed; everything
    started here (and the test's `second` worker) is stopped on exit, also when the test fails."""
    config = _websocket_config(tmp_path, sandbox, bootstrap, prefix)
    first = WorkerProcess(config, tmp_path / "first.log").start()
    reader: FaultTolerantReader | None = None
    restart: _Restart | None = None
    try:
        first.wait_ready(60, "the first worker ready")  # its topics exist: the reader assigns their partitions
        reader = FaultTolerantReader(bootstrap, prefix)
        restart = _Restart(config, reader, _start_and_kill(sandbox, reader, first))
        yield restart
    finally:
        close_all(reader, first, restart.second if restart else None)


def test_sigkill_and_restart_inside_recovery_timeout_recover_the_session(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    settings = sandbox_settings(websocket=WebSocketSettings(recovery_timeout=120.0, recovery_buffer=BUFFER))
    with Sandbox(settings) as sandbox, _killed_worker(sandbox, tmp_path, kafka_bootstrap, unique_name) as run:
        subscriptions = {s.id for s in sandbox.rc.live_subscriptions()}
        target = sandbox.generator.count() + 20  # published while no worker runs: only the session buffer
        wait_for(lambda: sandbox.generator.count() >= target, 30, what="traffic while down")
        second = run.second = WorkerProcess(run.config, tmp_path / "second.log").start()
        second.wait_ready(60, "the second worker ready")
        down = time.time() - run.killed
        more = sandbox.generator.count() + 20
        wait_for(lambda: sandbox.generator.count() >= more, 30, what="traffic after the restart")
        generated, in_kafka = _drain(sandbox, run.reader)
        lost = [g for g in generated if g.uuid not in in_kafka]
        stats = sandbox.websocket.stats()
        gaps = [e for e in second.lines() if e.get("event") == "replay.gap_suspected"]
        print(f"\n[websocket SIGKILL inside recoveryTimeout] {len(generated)} published, {len(lost)} lost, "
              f"down {down:.1f} s, replayed {stats['replayed']}, gaps {len(gaps)}")
        assert lost == [], f"{len(lost)} of {len(generated)} lost"
        assert stats["recovered"] == 1 and stats["recovery_failed"] == 0 and stats["lost"] == 0
        assert gaps == []
        assert {s.id for s in sandbox.rc.live_subscriptions()} == subscriptions  # the same one, recovered
        assert second.stop() == 0


def test_sigkill_and_restart_beyond_recovery_timeout_report_exactly_the_loss(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    timeout = 5.0
    settings = sandbox_settings(websocket=WebSocketSettings(recovery_timeout=timeout, recovery_buffer=BUFFER))
    with Sandbox(settings) as sandbox, _killed_worker(sandbox, tmp_path, kafka_bootstrap, unique_name) as run:
        (old,) = [s.id for s in sandbox.rc.live_subscriptions()]
        # RingCentral ends the session recoveryTimeout after the socket went, and its subscription with it.
        wait_for(lambda: sandbox.websocket.stats()["sessions"] == 0, timeout + 30, what="the session ended")
        second = run.second = WorkerProcess(run.config, tmp_path / "second.log").start()
        second.wait_ready(60, "the second worker ready")
        more = sandbox.generator.count() + 20
        wait_for(lambda: sandbox.generator.count() >= more, 30, what="traffic after the restart")
        generated, in_kafka = _drain(sandbox, run.reader, lambda g: g.subscription_id != old)
        lost = [g for g in generated if g.uuid not in in_kafka]
        (gap,) = [e for e in second.lines() if e.get("event") == "replay.gap_suspected"]
        since, until = float(str(gap["missing_from"])), float(str(gap["missing_until"]))
        print(f"\n[websocket SIGKILL beyond recoveryTimeout] {len(generated)} published, {len(lost)} lost, "
              f"all in the reported window of {until - since:.1f} s; unread at the kill "
              f"{sum(1 for g in lost if g.published_at < run.killed)}")
        assert "websocket recovery-failed" in str(gap["reason"])
        assert since <= run.killed <= until
        # The loss is exactly what RingCentral did not keep: everything published after the kill, nothing
        # before the newest checkpointed notification, nothing outside the window, nothing of the new session.
        assert lost, "nothing was published while no worker ran"
        assert {g.uuid for g in generated if g.published_at > run.killed and g.subscription_id == old} <= \
            {g.uuid for g in lost}
        assert all(since <= g.published_at <= until for g in lost), [
            (g.published_at, since, until) for g in lost if not since <= g.published_at <= until][:3]
        assert str(gap["subscription_id"]) == old and all(g.subscription_id == old for g in lost)
        assert second.stop() == 0


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_group_handover_of_a_killed_worker_recovers_its_sessions(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path, how: str) -> None:
    """Two workers share two WebSocket accounts; one that owns a spec is killed (or stopped: it hands its specs
    over with a last checkpoint): the other takes its specs over (after the group's session timeout when
    killed) and recovers their sessions from the state records: 0 lost, no new subscription."""
    settings = sandbox_settings(accounts=demo_accounts(2), websocket=WebSocketSettings(recovery_buffer=BUFFER))
    with Sandbox(settings) as sandbox:
        path = _websocket_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=2)
        base = yaml.safe_load(path.read_text())
        base["worker"].update({"coordination": "group", "session_timeout_seconds": 6.0})
        a, b = WorkerProcess.in_group("a", base, tmp_path), WorkerProcess.in_group("b", base, tmp_path)
        reader: FaultTolerantReader | None = None
        try:
            a.start()
            b.start()
            wait_for(lambda: a.ready() and b.ready() and a.owned() + b.owned() == 2
                     and sandbox.websocket.stats()["connections"] == 2, 120, interval=1, what="both specs served")
            reader = FaultTolerantReader(kafka_bootstrap, unique_name)
            # The spec partitions decide who owns what: the victim is a member that owns a spec.
            victim, survivor = (a, b) if a.owned() >= 1 else (b, a)
            killed = _start_and_kill(sandbox, reader, victim, graceful=how == "sigterm")
            wait_for(lambda: survivor.owned() == 2 and survivor.ready()
                     and sandbox.websocket.stats()["connections"] == 2, 90,
                     interval=0.5, what="the victim's specs handed over and their sessions recovered")
            handed_over = time.time() - killed
            more = sandbox.generator.count() + 20
            wait_for(lambda: sandbox.generator.count() >= more, 30, what="traffic after the handover")
            generated, in_kafka = _drain(sandbox, reader)
            lost = [g for g in generated if g.uuid not in in_kafka]
            stats = sandbox.websocket.stats()
            print(f"\n[websocket group handover after {how}] {len(generated)} published, {len(lost)} lost, "
                  f"handed over and recovered {handed_over:.1f} s after the kill, replayed {stats['replayed']}")
            assert lost == [], f"{len(lost)} of {len(generated)} lost"
            # Every handover recovered (the kill's, and any of the start-up rebalance): one subscription per account.
            assert stats["recovered"] >= 1 and stats["recovery_failed"] == 0 and stats["lost"] == 0
            assert sum(sandbox.rc.created_count.values()) == 2
            assert not [e for e in survivor.lines() if e.get("event") == "replay.gap_suspected"]
        finally:
            close_all(reader, a, b)
