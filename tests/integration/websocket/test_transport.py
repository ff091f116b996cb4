"""The WebSocket transport against the sandbox's emulator, with the real `websockets` client."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import requests

from ingest.observability.metrics import Metrics
from ingest.rc.http import RingCentralClient
from ingest.rc.tokens import TokenManager
from ingest.sandbox.generator import Generated
from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import Sandbox
from ingest.sandbox.websocket import WebSocketSettings as ServerSettings
from ingest.transports.websocket import Gap, Notification, Position, WebSocketSession, WebSocketSettings
from tests.integration.sandbox.conftest import MESSAGE_STORE, PRESENCE
from tests.support.waiting import wait_for

FAST = WebSocketSettings(ping_interval=0.5, ping_timeout=1.0, reconnect_min=0.1, reconnect_max=2.0)


@dataclass
class Collector:
    """Everything a session hands on, in order, and the gaps it reports."""

    notes: list[Notification] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, batch: list[Notification], received_at: float) -> None:
        with self.lock:
            self.notes.extend(batch)

    def gap(self, gap: Gap) -> None:
        with self.lock:
            self.gaps.append(gap)

    def uuids(self) -> list[str]:
        with self.lock:
            return [orjson.loads(raw)["uuid"] for raw, _ in self.notes]


@dataclass
class Running:
    sandbox: Sandbox
    session: WebSocketSession
    collector: Collector
    metrics: Metrics
    tokens: TokenManager

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def subscription(self) -> Any:
        return next(s for s in self.sandbox.rc.subscriptions() if s.id == self.session.subscription_id)

    def received_all(self, generated: list[Generated], timeout: float = 90) -> None:
        wanted = [g.uuid for g in generated]
        wait_for(lambda: len(self.collector.uuids()) >= len(wanted), timeout=timeout)
        assert self.collector.uuids() == wanted  # in order, none twice, none lost


@pytest.fixture
def start_session(make_sandbox: Callable[..., Sandbox]) -> Iterator[Callable[..., Running]]:
    sessions: list[WebSocketSession] = []

    def start(filters: list[str] | None = None, settings: WebSocketSettings = FAST, sandbox: Sandbox | None = None,
              resume: Position | None = None, **server: Any) -> Running:
        # Every reconnect costs a wstoken call in the Auth group (5 a minute per user by default): these
        # tests reconnect more often than that, on purpose.
        sb = sandbox or make_sandbox(websocket=ServerSettings(**server), rate_limits=RateLimits(auth=50))
        account, metrics, http = sb.accounts[0], Metrics(), requests.Session()
        tokens = TokenManager(sb.rc_url, sb.client_id, sb.client_secret, account.jwt, metrics, http,
                              user=account.name, timeout=(2.0, 5.0))
        client = RingCentralClient(sb.rc_url, tokens, metrics, http, user=account.name, timeout=(2.0, 5.0))
        collector = Collector()
        session = WebSocketSession(client, filters or [MESSAGE_STORE], collector.handle, metrics, settings,
                                   on_gap=collector.gap, resume=resume, name=account.name)
        sessions.append(session)
        session.start()
        wait_for(lambda: session.connected, timeout=60)
        return Running(sb, session, collector, metrics, tokens)

    yield start
    for session in sessions:
        session.stop()


def test_notifications_arrive_in_order_as_the_bytes_sent(start_session: Callable[..., Running]) -> None:
    run = start_session([MESSAGE_STORE, PRESENCE])
    sub = run.subscription()
    assert sub.transport == "WebSocket" and not sub.encryption and len(sub.event_filters) == 2
    published = run.sandbox.generator.publish(60)
    run.received_all(published)
    assert [raw for raw, _ in run.collector.notes] == [g.plaintext for g in published]  # plaintext, exact bytes
    positions = [p for _, p in run.collector.notes]
    assert [p.sequence for p in positions] == list(range(1, 61))
    assert {p.subscription_id for p in positions} == {sub.id}
    stats = run.sandbox.websocket.stats()
    assert stats["early_frames"] == 0 and stats["opened"] == 1  # nothing was sent before ConnectionDetails


def test_socket_drops_recover_the_session_with_nothing_lost(start_session: Callable[..., Running]) -> None:
    run = start_session()
    sb = run.sandbox
    subscription = run.session.subscription_id
    sb.generator.start(100)
    try:
        for _ in range(3):
            wait_for(lambda: run.session.connected and len(run.collector.notes) > 20, timeout=60)
            opened = sb.websocket.stats()["opened"]
            assert sb.faults.ws_drop_connections() == 1
            wait_for(lambda o=opened: sb.websocket.stats()["opened"] > o and run.session.connected, timeout=60)
    finally:
        sb.generator.stop()
    run.received_all(sb.generator.generated)
    assert run.session.subscription_id == subscription and not run.collector.gaps
    assert run.count("ingest_websocket_recoveries_total", outcome="Successful") == 3
    assert run.count("ingest_websocket_reconnects_total", reason="drop") == 3
    assert sb.websocket.stats()["recovered"] == 3


def test_failed_recovery_subscribes_again_and_reports_the_gap(start_session: Callable[..., Running]) -> None:
    run = start_session()
    sb = run.sandbox
    before = sb.generator.publish(5)
    run.received_all(before)
    old = run.session.subscription_id
    sb.faults.ws_fail_recovery(count=1)
    dropped_at = time.time()
    sb.faults.ws_drop_connections()
    wait_for(lambda: run.collector.gaps and run.session.connected, timeout=60)
    gap = run.collector.gaps[0]
    assert gap.reason == "recovery-failed" and gap.lost_subscription_id == old
    assert dropped_at - 1 <= gap.since <= gap.until <= time.time()
    assert run.session.subscription_id not in (None, old)
    statuses = {s.id: s.status for s in sb.rc.subscriptions()}
    assert statuses[old] == "Deleted" and statuses[run.session.subscription_id] == "Active"
    after = sb.generator.publish(5)
    run.received_all(before + after)
    assert run.count("ingest_websocket_recoveries_total", outcome="Failed") == 1


def test_recovery_beyond_the_buffer_reports_the_notifications_it_could_not_replay(
        start_session: Callable[..., Running]) -> None:
    """`Successful`, but 130 were published while away and the server buffer holds 100: the replay begins
    30 sequences after the client's wsc. (Before: the 30 were lost silently.)"""
    run = start_session()
    sb = run.sandbox
    before = sb.generator.publish(5)
    run.received_all(before)
    subscription = run.session.subscription_id
    stalled = time.time()
    assert sb.faults.ws_stall() == 1  # nothing leaves the server until the client reconnects
    missed = sb.generator.publish(130)
    wait_for(lambda: run.collector.gaps, timeout=60)
    run.received_all(before + missed[30:])
    (gap,) = run.collector.gaps
    assert gap.reason == "recovery-incomplete" and gap.missed == 30
    assert gap.lost_subscription_id == subscription == run.session.subscription_id  # the subscription stays
    assert stalled - 1 <= gap.since <= gap.until <= time.time()
    assert run.count("ingest_websocket_recoveries_total", outcome="Successful") == 1
    assert sb.websocket.stats()["lost"] == 30
    live = sb.generator.publish(5)
    run.received_all(before + missed[30:] + live)
    assert len(run.collector.gaps) == 1


def test_refused_tokens_are_retried_as_the_rest_client_does(start_session: Callable[..., Running]) -> None:
    run = start_session()
    sb = run.sandbox
    logins = run.tokens.logins + run.tokens.refreshes
    sb.faults.rc_error("wstoken", 401, count=1)  # the access token died: refresh it and retry once
    sb.faults.ws_drop_connections()
    wait_for(lambda: sb.book.fired.get("rc-error", 0) == 1 and run.session.connected, timeout=60)
    assert run.tokens.logins + run.tokens.refreshes == logins + 1
    sb.faults.rc_error("wstoken", 429, count=1, retry_after=2)  # silence in the Auth group, then retry
    dropped = time.monotonic()
    sb.faults.ws_drop_connections()
    wait_for(lambda: sb.book.fired.get("rc-error", 0) == 2, timeout=60)
    wait_for(lambda: run.session.connected, timeout=60)
    assert time.monotonic() - dropped >= 2.0
    assert sb.book.fired.get("rc-error", 0) == 2  # not one request during the penalty
    assert run.count("ingest_ringcentral_rate_limit_penalties_total", group="auth") == 1
    published = sb.generator.publish(5)
    run.received_all(published)  # the session was recovered: nothing published meanwhile is missing


@pytest.mark.parametrize("code,reason", [("WSG-902", "idle"), ("WSG-903", "absolute")])
def test_planned_closes_reconnect_at_once_and_recover(start_session: Callable[..., Running], code: str,
                                                      reason: str) -> None:
    run = start_session()
    sb = run.sandbox
    first = sb.generator.publish(5)
    closed = time.monotonic()
    assert sb.faults.ws_close(code) == 1
    wait_for(lambda: run.count("ingest_websocket_reconnects_total", reason=reason) == 1 and run.session.connected,
             timeout=60)
    assert time.monotonic() - closed < 5  # no backoff for a planned close
    assert run.count("ingest_websocket_recoveries_total", outcome="Successful") == 1
    run.received_all(first + sb.generator.publish(5))


def test_heartbeats_keep_an_idle_connection_open(start_session: Callable[..., Running]) -> None:
    run = start_session(idle_timeout=1.0)
    # Four Heartbeats span over two idle timeouts with no notification: only they keep it open.
    wait_for(lambda: run.sandbox.websocket.stats()["heartbeats"] >= 4, timeout=60)
    stats = run.sandbox.websocket.stats()
    assert stats["idle_closes"] == 0 and stats["heartbeats"] >= 4 and stats["opened"] == 1


def test_absolute_timeout_reconnects_with_nothing_lost(start_session: Callable[..., Running]) -> None:
    run = start_session(absolute_timeout=1.0)
    sb = run.sandbox
    sb.generator.start(50)
    try:
        wait_for(lambda: sb.websocket.stats()["absolute_closes"] >= 3, timeout=90)
    finally:
        sb.generator.stop()
    run.received_all(sb.generator.generated)
    assert not run.collector.gaps


def test_stalled_pongs_are_detected_and_the_session_recovered(start_session: Callable[..., Running]) -> None:
    run = start_session()
    sb = run.sandbox
    stalled = time.monotonic()
    assert sb.faults.ws_stall() == 1
    missed = sb.generator.publish(10)  # held in the stalled connection's recovery buffer
    wait_for(lambda: run.count("ingest_websocket_reconnects_total", reason="pong-timeout") == 1, timeout=60)
    detected = time.monotonic() - stalled
    assert detected < FAST.ping_interval + FAST.ping_timeout + FAST.close_timeout + 2
    run.received_all(missed)
    assert run.count("ingest_websocket_recoveries_total", outcome="Successful") == 1


def test_a_session_costs_two_threads_and_one_keepalive_thread_pings_them_all(
        start_session: Callable[..., Running]) -> None:
    """The session's thread and `websockets`' reader; the pings come from the process's one keepalive thread
    (that they still notice a silent server: `test_stalled_pongs_are_detected_and_the_session_recovered`).
    (Before: also `websockets`' keepalive thread per connection, three threads a user.)"""
    first = start_session()
    second = start_session(sandbox=first.sandbox)
    for run in (first, second):
        ws = run.session._ws
        assert ws is not None and ws.keepalive_thread is None and ws.recv_events_thread.is_alive()
    assert [t.name for t in threading.enumerate()].count("websocket-keepalive") == 1


def test_rate_limited_subscription_waits_for_the_penalty(start_session: Callable[..., Running]) -> None:
    run = start_session()
    sb = run.sandbox
    sb.faults.ws_fail_recovery(count=1)  # the next connection has to subscribe again ...
    sb.faults.rc_error("create", 429, count=1, retry_after=2)  # ... and is refused once
    sb.faults.ws_drop_connections()
    wait_for(lambda: run.session.client.penalty_remaining("subscription.create") > 0, timeout=60)
    wait_for(lambda: run.session.connected, timeout=60)
    assert run.session.client.penalty_remaining("subscription.create") == 0
    assert run.count("ingest_ringcentral_rate_limit_penalties_total", group="medium") == 1
    run.received_all(sb.generator.publish(3))


def test_filters_are_updated_and_the_subscription_deleted_over_the_socket(
        start_session: Callable[..., Running]) -> None:
    run = start_session()
    subscription = run.session.subscription_id
    run.session.set_event_filters([MESSAGE_STORE, PRESENCE])
    wait_for(lambda: len(run.subscription().event_filters) == 2, timeout=60)
    assert run.session.subscription_id == subscription
    run.session.stop(delete_subscription=True)
    assert {s.id: s.status for s in run.sandbox.rc.subscriptions()}[subscription] == "Deleted"


def test_the_client_keeps_within_max_active_requests(start_session: Callable[..., Running]) -> None:
    """The server announces 1 and answers after 0.3 s: the client's create, updates and delete never overlap."""
    run = start_session(max_active_requests=1, request_delay=0.3)
    subscription = run.session.subscription_id
    for filters in ([MESSAGE_STORE, PRESENCE], [PRESENCE]):
        run.session.set_event_filters(filters)
        wait_for(lambda f=filters: [e.rsplit("/", 1)[-1] for e in run.subscription().event_filters] ==
                 [e.rsplit("/", 1)[-1] for e in f], timeout=60)
    run.session.stop(delete_subscription=True)
    assert {s.id: s.status for s in run.sandbox.rc.subscriptions()}[subscription] == "Deleted"
    stats = run.sandbox.websocket.stats()
    assert stats["requests"] == 4 and stats["requests_refused"] == 0  # create, 2 updates, delete


def test_a_new_session_resumes_from_a_kept_position(start_session: Callable[..., Running]) -> None:
    first = start_session()
    sb = first.sandbox
    run_before = sb.generator.publish(5)
    first.received_all(run_before)
    position = first.session.position()
    assert position is not None and position.sequence == 5
    first.session.stop()  # without deleting: the server keeps the session for recoveryTimeout
    missed = sb.generator.publish(7)
    second = start_session(sandbox=sb, resume=position)
    assert second.session.subscription_id == position.subscription_id
    second.received_all(missed)  # exactly what came after the kept position


def test_positions_keep_growing_when_a_session_follows_one_begun_the_same_second(
        start_session: Callable[..., Running]) -> None:
    """A failed recovery begins a new session at once, and a handover may land on a worker whose clock is
    behind: the new session's positions (start second * 10**7 + sequence) must still follow the old one's.
    (Before: the start was the current second, so the new sequences 1, 2, ... fell at or below the old ones.)"""
    first = start_session()
    sb = first.sandbox
    first.received_all(sb.generator.publish(3))
    kept = first.session.position()
    assert kept is not None
    first.session.stop()
    kept = dataclasses.replace(kept, session_started=int(time.time()) + 1)  # begun this second, a clock ahead
    sb.faults.ws_fail_recovery(count=1)
    second = start_session(sandbox=sb, resume=kept)
    assert [g.reason for g in second.collector.gaps] == ["recovery-failed"]
    published = sb.generator.publish(3)
    second.received_all(published)
    ordinals = [p.ordinal for _, p in second.collector.notes]
    assert ordinals == sorted(ordinals) and ordinals[0] > kept.ordinal


def test_a_slow_handler_loses_nothing(start_session: Callable[..., Running]) -> None:
    """A handler that blocks longer than the ping timeout (Kafka slow): the client stops reading, its pings
    go unanswered, it reconnects; the recovery replays from the newest notification it handed on."""
    run = start_session()
    sb = run.sandbox
    release, blocked = threading.Event(), threading.Event()
    blocked_handler = run.session.handler

    def slow(batch: list[Notification], received_at: float) -> None:
        blocked.set()
        release.wait(120)
        blocked_handler(batch, received_at)

    run.session.handler = slow
    first = sb.generator.publish(1)
    # The handler, not the server, must hold the first one: a session thread slower than the publisher (a
    # loaded machine) read all 41 into one batch, nothing was left queued, and the pongs kept coming.
    wait_for(blocked.is_set, timeout=60, what="the handler to block on the first notification")
    queued = sb.generator.publish(40)  # more than the client reads ahead (max_queue 16): flow control stops it
    wait_for(lambda: sb.websocket.stats()["connections"] == 0, timeout=60)  # the client gave up on it
    release.set()
    run.received_all(first + queued)
    # Every notification may come from the old connection's queue before the reconnect is counted and the
    # new one is recovered (seen on a loaded machine): wait for both events rather than read them at once.
    wait_for(lambda: run.count("ingest_websocket_reconnects_total", reason="pong-timeout") >= 1, timeout=60,
             what="the pong-timeout reconnect")
    wait_for(lambda: run.count("ingest_websocket_recoveries_total", outcome="Successful") >= 1, timeout=60,
             what="the session recovered")
    assert not run.collector.gaps, run.collector.gaps  # recovered, not subscribed anew
