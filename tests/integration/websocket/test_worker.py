"""A `transport: websocket` account end to end: sandbox -> WebSocket (real `websockets`) -> worker -> real Kafka."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ingest.config import load_config
from ingest.sandbox.generator import Generated
from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import Sandbox
from ingest.transports.websocket import SEQUENCES_PER_SESSION, channel_of
from ingest.worker.runtime import Worker
from tests.integration.sandbox.conftest import MESSAGE_STORE, PRESENCE
from tests.support.harness import TopicReader, compare, write_config
from tests.support.waiting import wait_for

WEBSOCKET = {"INGEST__ACCOUNTS__0__TRANSPORT": "websocket"}


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    """Each reconnect costs a wstoken call in the Auth group (5 a minute per user by default)."""
    return {"pubnub_hold_seconds": 0.5, "rate_limits": RateLimits(auth=50)}


def _as_recorded(generated: list[Generated], session_started: int) -> list[Generated]:
    """The generator records a WebSocket notification's sequence; the worker's position (the `timetoken`
    header) is `session start * 10**7 + sequence`, growing across sessions."""
    return [dataclasses.replace(g, timetoken=session_started * SEQUENCES_PER_SESSION + g.timetoken)
            for g in generated]


def test_websocket_account_reaches_kafka_through_drops_and_planned_closes(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=1,
                        subscriptions={"calls-and-messages": [MESSAGE_STORE, PRESENCE]})
    worker = Worker(load_config(path, WEBSOCKET))
    worker.start()
    reader = TopicReader(kafka_bootstrap, unique_name)
    try:
        wait_for(lambda: worker.subscriptions_serving() == 1, 30, what="the WebSocket subscription read")
        (subscription,) = sandbox.rc.live_subscriptions()
        assert subscription.transport == "WebSocket"
        generated = sandbox.generator.publish(40)
        generated += sandbox.generator.publish(2, malformed="invalid-json")
        assert sandbox.faults.ws_drop_connections() == 1
        generated += sandbox.generator.publish(40)  # while it reconnects: replayed by the recovery
        wait_for(lambda: sandbox.websocket.stats()["recovered"] == 1, 30, what="the session recovered")
        wait_for(lambda: sandbox.faults.ws_close("WSG-903") == 1, 30, what="a connection to close")
        generated += sandbox.generator.publish(40)
        records = reader.poll_until(lambda rs: len(rs) >= len(generated), timeout=60)
        started = int(next(r.headers["timetoken"] for r in records if "timetoken" in r.headers)) \
            // SEQUENCES_PER_SESSION
        result = compare(_as_recorded(generated, started), records, reader.topics)
        assert result.ok, (len(result.missing), result.wrong[:3], result.dead_missing[:3])
        assert result.duplicates == {} and len(records) == len(generated)
        values = {r.headers.get("uuid"): r.value for r in records}
        assert all(values[g.uuid] == g.plaintext for g in generated if g.malformed is None)  # the bytes sent
        assert sandbox.websocket.stats()["recovered"] == 2
        received = worker.metrics.registry.get_sample_value
        assert received("ingest_notifications_received_total", {"transport": "websocket"}) == len(generated)
        assert received("ingest_notifications_received_total", {"transport": "pubnub"}) == 0
        assert worker.channels.deliveries[f"{sandbox.accounts[0].name}/calls-and-messages"].channel == \
            channel_of(sandbox.accounts[0].name)
    finally:
        reader.close()
        worker.stop(delete_subscriptions=True)


def test_failed_recovery_is_reported_as_a_gap_and_the_account_read_again(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=1,
                        subscriptions={"messages": [MESSAGE_STORE]})
    worker = Worker(load_config(path, WEBSOCKET))
    worker.start()
    reader = TopicReader(kafka_bootstrap, unique_name)
    try:
        wait_for(lambda: worker.subscriptions_serving() == 1, 30, what="the WebSocket subscription read")
        before = sandbox.generator.publish(10)
        reader.poll_until(lambda rs: len(rs) >= 10, timeout=60)
        gaps = worker.metrics.replay_gaps._value.get()
        sandbox.faults.ws_fail_recovery(count=1)
        sandbox.faults.ws_drop_connections()
        wait_for(lambda: worker.metrics.replay_gaps._value.get() > gaps, 30,
                 what="the gap reported")
        wait_for(lambda: len(sandbox.rc.live_subscriptions()) == 1 and worker.subscriptions_serving() == 1, 30,
                 what="a new subscription read")
        after = sandbox.generator.publish(10)
        records = reader.poll_until(lambda rs: len(rs) >= 20, timeout=60)
        assert {r.headers["uuid"] for r in records} == {g.uuid for g in before + after}
        assert any("websocket recovery-failed" in str(getattr(r, "fields", {})) for r in caplog.records)
    finally:
        reader.close()
        worker.stop(delete_subscriptions=True)


def test_a_restart_recovers_the_session_from_the_state_record(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    """The state record keeps the wsc of the newest checkpointed notification: a new worker within
    recoveryTimeout recovers the session, the subscription stays, and what was published meanwhile is replayed.
    (Before: the wsc was not kept, the new worker subscribed again and reported the whole window as a gap.)"""
    config = load_config(write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=1,
                                      subscriptions={"messages": [MESSAGE_STORE]}), WEBSOCKET)
    first = Worker(config)
    first.start()
    reader = TopicReader(kafka_bootstrap, unique_name)
    second: Worker | None = None
    try:
        wait_for(lambda: first.subscriptions_serving() == 1, 30, what="the WebSocket subscription read")
        before = sandbox.generator.publish(10)
        reader.poll_until(lambda rs: len(rs) >= 10, timeout=60)
        first.stop()
        (subscription,) = sandbox.rc.live_subscriptions()
        meanwhile = sandbox.generator.publish(10)  # no worker: the session's recovery buffer holds them
        second = Worker(config)
        second.start()
        wait_for(lambda: second is not None and second.subscriptions_serving() == 1, 30, what="read again")
        after = sandbox.generator.publish(10)
        published = {g.uuid for g in before + meanwhile + after}
        records = reader.poll_until(lambda rs: published <= {r.headers["uuid"] for r in rs}, timeout=60)
        assert published <= {r.headers["uuid"] for r in records}
        assert [s.id for s in sandbox.rc.live_subscriptions()] == [subscription.id]
        assert sandbox.websocket.stats()["recovered"] == 1
        assert second.metrics.replay_gaps._value.get() == 0
    finally:
        reader.close()
        if second is not None:
            second.stop(delete_subscriptions=True)


def test_stop_with_delete_subscriptions_deletes_the_websocket_subscription(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    """The worker stops its intake (the session) before the manager deletes: the deletion goes through REST
    then. (Before: it was asked of the stopped session, which sent nothing; the subscription stayed Active.)"""
    worker = Worker(load_config(write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=1,
                                             subscriptions={"messages": [MESSAGE_STORE]}), WEBSOCKET))
    worker.start()
    try:
        wait_for(lambda: worker.subscriptions_serving() == 1, 30, what="the WebSocket subscription read")
        (subscription,) = sandbox.rc.live_subscriptions()
    finally:
        worker.stop(delete_subscriptions=True)
    assert sandbox.rc.live_subscriptions() == []
    assert {s.id: s.status for s in sandbox.rc.subscriptions()}[subscription.id] == "Deleted"
    assert worker.metrics.registry.get_sample_value("ingest_subscription_deletions_total", {"outcome": "ok"}) == 1


def test_a_recovery_beyond_the_buffer_is_reported_with_what_it_missed(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The reconnect waits out a 429 on wstoken while 130 are published: `Successful`, the newest 100 replayed,
    the 30 older ones reported as a gap of the subscription (which stays), not lost silently."""
    worker = Worker(load_config(write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=1,
                                             subscriptions={"messages": [MESSAGE_STORE]}), WEBSOCKET))
    worker.start()
    reader = TopicReader(kafka_bootstrap, unique_name)
    try:
        wait_for(lambda: worker.subscriptions_serving() == 1, 30, what="the WebSocket subscription read")
        (subscription,) = sandbox.rc.live_subscriptions()
        before = sandbox.generator.publish(5)
        reader.poll_until(lambda rs: len(rs) >= 5, timeout=60)
        sandbox.faults.rc_error("wstoken", 429, count=1, retry_after=3)
        sandbox.faults.ws_drop_connections()
        wait_for(lambda: sandbox.book.fired.get("rc-error", 0) == 1, 30, what="the refused wstoken")
        missed = sandbox.generator.publish(130)  # while the Auth group is silent
        wait_for(lambda: worker.metrics.replay_gaps._value.get() == 1, 60, what="the gap reported")
        records = reader.poll_until(lambda rs: len(rs) >= 105, timeout=60)
        assert {r.headers["uuid"] for r in records} == {g.uuid for g in before + missed[30:]}
        assert [s.id for s in sandbox.rc.live_subscriptions()] == [subscription.id]
        gaps = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "replay.gap_suspected"]
        assert [(g.get("reason"), g.get("missed")) for g in gaps] == \
            [("websocket recovery-incomplete: RingCentral did not keep what the session missed", 30)]
    finally:
        reader.close()
        worker.stop(delete_subscriptions=True)
