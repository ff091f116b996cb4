"""WebSocket intake: RingCentral's WebSocket delivery mode, one connection per (app, user) session.

Protocol facts: /work/shared/reference/ringcentral-websocket-webhook.md (§WebSocket). The client is the
`websockets` threaded client; each `WebSocketSession` runs one thread that owns its socket (the only
reader and writer of it), so ClientRequests are sent one at a time: never more than
`maxActiveRequests` (>= 1) in flight.

Every (re)connect fetches a fresh single-use token (`POST /restapi/oauth/wstoken` through the REST
client: its 429 silence and 401 refresh apply) and sends nothing before `ConnectionDetails`. The
session's one subscription (many event filters) is created, updated and deleted as ClientRequests.
Within `recoveryTimeout` of losing a connection (a drop, a stall noticed by our pings, the planned
WSG-902/903 closes) the reconnect carries the newest `wsc`: `Successful` keeps the subscription and
the server replays what it buffered; `Failed`, or a reconnect beyond the timeout, subscribes again
and reports a `Gap`. Replays are de-duplicated by the notification `uuid`.

Notifications are handed on in batches of `(raw JSON bytes of the envelope, Position)`: plaintext,
no decryption on this path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from ingest.observability.logs import get_logger, register_secret
from ingest.observability.metrics import Metrics
from ingest.rc.errors import ApiError, NetworkError, RateLimited, RingCentralError, TokenUnavailable
from ingest.rc.http import API, RingCentralClient, TokenSource
from ingest.transports.base import BatchHandler as BatchHandlerOfReceived
from ingest.transports.base import Received, Transport

log = get_logger(__name__)

SUBSCRIPTION = f"{API}/subscription"
IDLE_CLOSE = "WSG-902"
ABSOLUTE_CLOSE = "WSG-903"
PLANNED_CLOSES = {IDLE_CLOSE: "idle", ABSOLUTE_CLOSE: "absolute"}
DEFAULT_RECOVERY_TIMEOUT = 180.0  # until ConnectionDetails says otherwise
MAX_BATCH = 100  # frames handed on together when they are already waiting
SEQUENCES_PER_SESSION = 10**7  # Position.ordinal: session start (unix seconds) * this + sequence


class FrameError(ValueError):
    """A text frame that is not `[meta]` or `[meta, body]`."""


def split_frame(text: str) -> tuple[dict[str, Any], str | None]:
    """The meta object and the body's exact JSON text (None without a body).

    The body is cut out of the frame, not parsed and serialised again, so the bytes handed on are the
    bytes RingCentral sent (big integers and all); a body that is not valid JSON still comes out whole.
    """
    start = text.find("[")
    if start < 0:
        raise FrameError("frame is not a JSON array")
    try:
        meta, end = json.JSONDecoder().raw_decode(text, start + 1)
    except ValueError:
        raise FrameError("frame without a readable meta object") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("type"), str):
        raise FrameError("frame meta without a type")
    rest = text[end:].strip()
    if rest == "]":
        return meta, None
    if not rest.startswith(",") or not rest.endswith("]"):
        raise FrameError("frame is not [meta] or [meta, body]")
    return meta, rest[1:-1].strip()


@dataclass(frozen=True)
class Position:
    """Where a notification stands in its session (opaque to the pipeline). The newest one acknowledged
    is what a restarted worker needs to recover the session within `recoveryTimeout`."""

    wsc: str  # the newest wsc token when this was read (the sandbox's names the sequence too)
    sequence: int  # the `wsc.sequence` of the frame (or of the newest frame before it)
    subscription_id: str | None
    received_at: float  # unix seconds
    session_started: int = 0  # unix seconds the session began: a new session starts a new sequence

    @property
    def ordinal(self) -> int:
        """Grows along an account's notifications across sessions (the worker's position)."""
        return self.session_started * SEQUENCES_PER_SESSION + self.sequence


def recorded_session(position: Position, event_filters: Sequence[str]) -> dict[str, Any]:
    """What the state record keeps to recover a session at `position` (docs/records.md, `session`)."""
    return {**asdict(position), "event_filters": list(event_filters)}


def session_of_record(recorded: dict[str, Any] | None) -> tuple[Position, list[str]] | None:
    """The position and event filters a `recorded_session` holds; None if there is none or it is unreadable."""
    if not isinstance(recorded, dict):
        return None
    try:
        filters = [str(f) for f in recorded["event_filters"]]
        return Position(str(recorded["wsc"]), int(recorded["sequence"]),
                        None if recorded["subscription_id"] is None else str(recorded["subscription_id"]),
                        float(recorded["received_at"]), int(recorded["session_started"])), filters
    except (KeyError, TypeError, ValueError):
        log.warning("websocket.unreadable_recorded_session")
        return None


# One notification: its raw JSON bytes and its position. A batch of them, with when they arrived.
Notification = tuple[bytes, Position]
BatchHandler = Callable[[list[Notification], float], None]


@dataclass(frozen=True)
class Gap:
    """Notifications RingCentral did not keep for us: the subscription was lost and created again, or a
    `Successful` recovery replayed only the newest `recoveryBufferSize` of what was missed."""

    lost_subscription_id: str | None  # for "recovery-incomplete" the subscription kept (it was not lost)
    reason: str  # "recovery-failed" | "recovery-expired" | "subscription-gone" | "recovery-incomplete"
    since: float  # unix seconds: the connection was lost (nothing older is missing)
    until: float  # unix seconds: the new connection was there (nothing newer is missing)
    missed: int | None = None  # how many, when the wsc sequences tell ("recovery-incomplete")


@dataclass(frozen=True)
class WebSocketSettings:
    heartbeat_interval: float = 30.0  # a Heartbeat after this long without sending (also <= idleTimeout / 2)
    ping_interval: float = 20.0  # our RFC 6455 pings: a silent (stalled) server is noticed within
    ping_timeout: float = 10.0  # ping_interval + ping_timeout
    open_timeout: float = 10.0
    close_timeout: float = 2.0
    request_timeout: float = 30.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    seen_uuids: int = 1000  # uuids remembered for de-duplication (> the server's recovery buffer of 100)


class _Reconnect(Exception):
    """End this connection and open the next one (recovering the session)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Pings:
    interval: float
    timeout: float
    next_ping: float  # monotonic
    pong: threading.Event | None = None  # the ping in flight
    sent: float = 0.0


class Keepalive:
    """RFC 6455 pings for every connection of the process from one thread, instead of `websockets`' keepalive
    thread per connection (a user costs two threads, not three: its session's and the library's reader).
    A ping every `interval`; a pong missing `timeout` later fails the connection with 1011 as `websockets`'
    own keepalive does, so the session reconnects (`pong-timeout`). Independent of the session threads: a
    session blocked in its handler (Kafka slow) stops reading, and this still notices."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[ClientConnection, _Pings] = {}
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, ws: ClientConnection, interval: float, timeout: float) -> None:
        with self._lock:
            self._watched[ws] = _Pings(interval, timeout, time.monotonic() + interval)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="websocket-keepalive", daemon=True)
                self._thread.start()
        self._changed.set()

    def forget(self, ws: ClientConnection) -> None:
        with self._lock:
            self._watched.pop(ws, None)

    def _run(self) -> None:
        while True:
            self._changed.clear()  # before the snapshot: a connection watched after it wakes the wait below
            with self._lock:
                watched = list(self._watched.items())
            now = time.monotonic()
            due = [self._guarded_check(ws, pings, now) for ws, pings in watched]
            self._changed.wait(max(0.01, min(due, default=now + 60.0) - time.monotonic()))

    def _guarded_check(self, ws: ClientConnection, pings: _Pings, now: float) -> float:
        """One connection's failure must not end the pings of all the others."""
        try:
            return self._check(ws, pings, now)
        except Exception:
            log.error("websocket.keepalive_failed", exc_info=True)
            self.forget(ws)
            return now + pings.interval

    def _check(self, ws: ClientConnection, pings: _Pings, now: float) -> float:
        """Ping, or give up on a missing pong; returns when this connection needs looking at again."""
        if pings.pong is not None:
            if pings.pong.is_set():
                pings.pong, pings.next_ping = None, pings.sent + pings.interval
            elif now >= pings.sent + pings.timeout:
                self.forget(ws)
                with contextlib.suppress(ConnectionClosed), ws.send_context():  # what websockets' keepalive does
                    ws.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                return now + pings.interval
            else:
                return pings.sent + pings.timeout
        if now < pings.next_ping:
            return pings.next_ping
        try:
            pings.pong, pings.sent = ws.ping(ack_on_close=True), now
        except ConnectionClosed:
            self.forget(ws)
        return now + min(pings.timeout, pings.interval)


KEEPALIVE = Keepalive()


@dataclass
class WebSocketSession:
    """One user's WebSocket session: connection, recovery and its one subscription. Thread-safe API."""

    client: RingCentralClient
    event_filters: Sequence[str]
    handler: BatchHandler
    metrics: Metrics
    settings: WebSocketSettings = field(default_factory=WebSocketSettings)
    on_gap: Callable[[Gap], None] | None = None
    resume: Position | None = None  # from a checkpoint: recover that session if it is young enough
    name: str = ""  # for logs and thread names (the spec or user)
    started_after: int = 0  # the newest session start (unix seconds) of the channel so far: the next is later
    _filters: tuple[str, ...] = ()
    _applied: tuple[str, ...] = ()
    _subscription_id: str | None = None
    _wsc: str | None = None
    _sequence: int = 0
    _lost_at: float = 0.0  # unix seconds the last connection ended (0: none yet)
    _session_started: int = 0
    last_error: RingCentralError | None = None  # why the last connection attempt failed (None: it did not)
    _recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT
    _heartbeat_every: float = 30.0
    _details: dict[str, Any] = field(default_factory=dict)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _answers: dict[str, tuple[dict[str, Any], str | None]] = field(default_factory=dict)
    _close_code: str | None = None  # errorCode of the last Error frame (WSG-902 / WSG-903)
    _last_sent: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _delete_on_stop: bool = False
    _connected: threading.Event = field(default_factory=threading.Event)
    _ws: ClientConnection | None = None
    _thread: threading.Thread | None = None
    connections: int = 0  # connections opened (for tests and logs)
    _recover_next: bool = False  # the next connect sends the wsc whatever its age (a recorded session)
    _origin: tuple[str, int, float] | None = None  # the wsc, sequence and time of this session's ConnectionDetails
    _replay_after: int | None = None  # a Successful recovery from this sequence: its first replay must follow it

    def __post_init__(self) -> None:
        self._filters = tuple(self.event_filters)
        if self.resume is not None:
            self.resume_from(self.resume, self._filters)

    def resume_from(self, position: Position, event_filters: Sequence[str]) -> None:
        """Before `start()`: recover the session of a checkpoint (a restart, a handover) whose subscription
        carried `event_filters`. Its first connect sends that wsc even if it looks older than
        `recoveryTimeout` (the old connection may have lived long after its newest notification: the server
        decides); `Failed` subscribes again and reports the gap from the checkpointed notification on."""
        self.resume = position
        self._wsc, self._sequence = position.wsc, position.sequence
        self._subscription_id, self._lost_at = position.subscription_id, position.received_at
        self._session_started = position.session_started
        self.started_after = max(self.started_after, position.session_started)
        self._filters = self._applied = tuple(event_filters)  # the subscription carried these when checkpointed
        self._recover_next = True

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    # ---- API -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the session thread (once; later calls do nothing)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=f"websocket-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, delete_subscription: bool = False, timeout: float = 10.0) -> None:
        """Close the connection (deleting the subscription first if asked: the session then ends)."""
        self._delete_on_stop = delete_subscription
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def set_event_filters(self, filters: Sequence[str]) -> None:
        """The subscription's new filters; applied (PUT over the socket) by the session thread."""
        with self._lock:
            self._filters = tuple(filters)

    @property
    def connected(self) -> bool:
        """A connection is open, past ConnectionDetails, and the subscription exists."""
        return self._connected.is_set()

    @property
    def subscription_id(self) -> str | None:
        return self._subscription_id

    @property
    def filters(self) -> tuple[str, ...]:
        """The event filters the subscription should carry (applied over the socket when they change)."""
        return self._filters

    def origin(self) -> Position | None:
        """Where the current session began (its first ConnectionDetails), once subscribed: recovering there
        replays all of it. None for a session recovered from a record, or before it is subscribed."""
        with self._lock:
            if self._origin is None or self._subscription_id is None:
                return None
            wsc, sequence, began = self._origin
            return Position(wsc, sequence, self._subscription_id, began, self._session_started)

    def position(self) -> Position | None:
        """The newest position (wsc and sequence), None before the first ConnectionDetails."""
        with self._lock:
            if self._wsc is None:
                return None
            return Position(self._wsc, self._sequence, self._subscription_id, time.time(), self._session_started)

    # ---- the session thread ----------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            delay = 0.0
            try:
                reason = self._connect_once()
                failures, self.last_error = 0, None
            except TokenUnavailable as exc:
                reason, delay = "token", exc.retry_after
            except RateLimited as exc:
                reason, delay = "rate-limited", exc.retry_after or self.settings.reconnect_max
            except (RingCentralError, InvalidHandshake, OSError, TimeoutError) as exc:
                self.last_error = exc if isinstance(exc, RingCentralError) else None
                failures += 1
                reason = "error"
                delay = self._backoff(failures)
                log.warning("websocket.connect_failed", session=self.name, error=_describe(exc), retry_in=delay)
            if reason != "stopped":
                self.metrics.websocket_reconnects.labels(reason).inc()
            self._stopping.wait(delay)

    def _backoff(self, failures: int) -> float:
        s = self.settings
        return min(s.reconnect_max, s.reconnect_min * 2.0 ** min(failures - 1, 10)) * random.uniform(0.8, 1.2)

    def _connect_once(self) -> str:
        """One connection, from token to close. Returns why it ended."""
        token = self.client.ws_token()
        register_secret(str(token["ws_access_token"]))
        recovering = self._wsc is not None and (
            self._recover_next or time.time() - self._lost_at < self._recovery_timeout)
        self._recover_next = False
        recovering_from = self._sequence
        query = {"access_token": token["ws_access_token"], **({"wsc": self._wsc} if recovering else {})}
        s = self.settings
        # No keepalive thread per connection: the process's one `KEEPALIVE` pings them all.
        with connect(f"{token['uri']}?{urlencode(query)}", proxy=None, open_timeout=s.open_timeout,
                     ping_interval=None, close_timeout=s.close_timeout, max_size=None) as ws:
            KEEPALIVE.watch(ws, s.ping_interval, s.ping_timeout)
            self._ws, self._close_code = ws, None
            self.connections += 1
            self.metrics.websocket_connections.inc()
            try:
                self._open(ws, recovering_from if recovering else None)
                self._serve(ws)
                return "stopped"
            except _Reconnect as exc:
                return exc.reason
            except ConnectionClosed as exc:
                return self._closed_reason(exc)
            finally:
                KEEPALIVE.forget(ws)
                self._connected.clear()
                self._lost_at = time.time()
                self.metrics.websocket_connections.dec()
                self._ws = None

    def _closed_reason(self, closed: ConnectionClosed) -> str:
        received = closed.rcvd.reason if closed.rcvd is not None else ""
        planned = PLANNED_CLOSES.get(self._close_code or "") or PLANNED_CLOSES.get(received)
        if planned:
            log.info("websocket.planned_close", session=self.name, code=self._close_code or received)
            return planned
        if closed.rcvd is None and closed.sent is not None and closed.sent.code == 1011:
            log.warning("websocket.pong_timeout", session=self.name)  # our keepalive ping got no pong in time
            return "pong-timeout"
        log.warning("websocket.connection_lost", session=self.name,
                    close_code=closed.rcvd.code if closed.rcvd is not None else None)
        return "drop"

    def _open(self, ws: ClientConnection, recovering_from: int | None) -> None:
        """Read ConnectionDetails (sending nothing before), settle recovery (`recovering_from`: the sequence of
        the wsc sent), make sure of the subscription."""
        try:
            text = ws.recv(timeout=self.settings.open_timeout)
        except TimeoutError:
            raise _Reconnect("error") from None
        meta, body = split_frame(text if isinstance(text, str) else text.decode())
        if meta["type"] != "ConnectionDetails" or body is None:
            raise _Reconnect("error")
        details: dict[str, Any] = orjson.loads(body)
        self._on_details(meta, details, recovering_from)
        self._ensure_subscription(ws)
        self._connected.set()

    def _on_details(self, meta: dict[str, Any], details: dict[str, Any], recovering_from: int | None) -> None:
        self._details = details
        self._replay_after = None
        recovering = recovering_from is not None
        self._recovery_timeout = float(details.get("recoveryTimeout") or DEFAULT_RECOVERY_TIMEOUT)
        idle = float(details.get("idleTimeout") or 0)
        self._heartbeat_every = min(self.settings.heartbeat_interval, idle / 2) if idle else \
            self.settings.heartbeat_interval
        self._note_wsc(meta.get("wsc"), force=True)
        state = details.get("recoveryState")
        if recovering and state == "Successful":
            self.metrics.websocket_recoveries.labels("Successful").inc()
            self._replay_after = recovering_from
            log.info("websocket.recovered", session=self.name, subscription=self._subscription_id)
            return
        self._begin_session()
        self._origin = (self._wsc or "", self._sequence, time.time())
        if recovering:
            self.metrics.websocket_recoveries.labels("Failed").inc()
            self._report_gap("recovery-failed", details.get("recoveryErrorCode"))
        elif self._subscription_id is not None:
            self.metrics.websocket_recoveries.labels("expired").inc()
            self._report_gap("recovery-expired", None)

    def _begin_session(self) -> None:
        """A new session: its start orders its positions after every earlier session's, also one begun in the
        same second (a failed recovery at once) or on a worker whose clock is ahead (a handover)."""
        self._session_started = self.started_after = max(int(time.time()), self.started_after + 1)

    def _report_gap(self, reason: str, code: Any) -> None:
        """The subscription is lost: what it missed is reported, and it is created again."""
        self._emit_gap(Gap(self._subscription_id, reason, self._lost_at, time.time()), code)
        self._subscription_id, self._applied = None, ()

    def _check_replay(self, sequence: int | None) -> None:
        """The first notification after a Successful recovery follows the wsc sent, unless the server's
        buffer (`recoveryBufferSize`, 100) no longer held the oldest of what was missed: those are lost,
        the subscription stays. (Read as the sandbox numbers them: one sequence per notification; a
        RingCentral that also numbered other frames would make this report more than was lost, never less.)"""
        expected = self._replay_after
        if expected is None or sequence is None or sequence <= expected:
            return  # not after a recovery, no sequence to tell, or a replay of what was handed on already
        self._replay_after = None
        if sequence > expected + 1:
            self._emit_gap(Gap(self._subscription_id, "recovery-incomplete", self._lost_at, time.time(),
                               sequence - expected - 1), None)

    def _emit_gap(self, gap: Gap, code: Any) -> None:
        log.warning("websocket.gap", session=self.name, reason=gap.reason, code=code, missed=gap.missed,
                    subscription=gap.lost_subscription_id, seconds=round(gap.until - gap.since, 3))
        if self.on_gap is not None:
            self.on_gap(gap)

    def _ensure_subscription(self, ws: ClientConnection) -> None:
        with self._lock:
            wanted = self._filters
        if self._subscription_id is not None and wanted == self._applied:
            return
        body = {"eventFilters": list(wanted), "deliveryMode": {"transportType": "WebSocket"}}
        if self._subscription_id is None:
            info = self._request(ws, "POST", SUBSCRIPTION, "subscription.create", body)
            self._subscription_id = str(info["id"])
            self.metrics.creations.labels("websocket").inc()
            log.info("websocket.subscribed", session=self.name, subscription=self._subscription_id,
                     filters=len(wanted))
        else:
            try:
                self._request(ws, "PUT", f"{SUBSCRIPTION}/{self._subscription_id}", "subscription.update",
                              {"eventFilters": list(wanted)})
            except ApiError as exc:
                if exc.status != 404:
                    raise
                self._report_gap("subscription-gone", exc.error_code)
                self._ensure_subscription(ws)
                return
        self._applied = wanted

    def _serve(self, ws: ClientConnection) -> None:
        """Read until stopped or the connection ends; Heartbeats when we have been silent."""
        while not self._stopping.is_set():
            if self._filters != self._applied:
                self._ensure_subscription(ws)
            silent_for = time.monotonic() - self._last_sent
            if silent_for >= self._heartbeat_every:
                self._send(ws, [{"type": "Heartbeat", "messageId": str(uuid.uuid4())}])
                silent_for = 0.0
            self._pump(ws, min(0.5, self._heartbeat_every - silent_for))
        if self._delete_on_stop and self._subscription_id is not None:
            self._request(ws, "DELETE", f"{SUBSCRIPTION}/{self._subscription_id}", "subscription.delete", None)
            self._subscription_id = None  # counted by the caller (the manager counts its deletions)

    def _send(self, ws: ClientConnection, frame: list[Any]) -> None:
        ws.send(json.dumps(frame, separators=(",", ":")))
        self._last_sent = time.monotonic()

    def _request(self, ws: ClientConnection, method: str, path: str, endpoint: str, body: Any) -> Any:
        """One ClientRequest; notifications arriving meanwhile are handed on. Statuses as in the REST
        client: 429 silences the endpoint's group, 401 refreshes the token and reconnects (recovering)."""
        remaining = self.client.penalty_remaining(endpoint)
        if remaining > 0:
            raise RateLimited(remaining, "medium", sent=False, endpoint=endpoint)
        message_id = str(uuid.uuid4())
        meta = {"type": "ClientRequest", "messageId": message_id, "method": method, "path": path}
        self._send(ws, [meta] if body is None else [meta, body])
        deadline = time.monotonic() + self.settings.request_timeout
        while message_id not in self._answers:
            if time.monotonic() > deadline:
                raise _Reconnect("error")
            self._pump(ws, 0.5)
        answer_meta, answer_body = self._answers.pop(message_id)
        status = int(answer_meta.get("status") or 0)
        self.metrics.api_calls.labels(endpoint, str(status)).inc()
        parsed = json.loads(answer_body) if answer_body else None
        if 200 <= status < 300:
            return parsed
        code, message = _error_fields(parsed)
        headers = answer_meta.get("headers") or {}
        if status == 401:
            self.client.tokens.invalidate()
            raise _Reconnect("unauthorized")
        if status == 429:
            raise self.client.rate_limited(endpoint, _seconds(headers.get("Retry-After")),
                                           headers.get("X-Rate-Limit-Group"), code, message)
        raise ApiError(status, code, message, _seconds(headers.get("Retry-After")), endpoint)

    def _pump(self, ws: ClientConnection, wait: float) -> None:
        """Receive what arrives within `wait` seconds (then what is already waiting, up to MAX_BATCH)."""
        try:
            first = ws.recv(timeout=max(0.0, wait))
        except TimeoutError:
            return
        frames = [first]
        try:
            while len(frames) < MAX_BATCH:
                frames.append(ws.recv(timeout=0))
        except TimeoutError:
            pass
        finally:  # also when the connection ends here: what was read is handed on before the reconnect
            self._dispatch(frames)

    def _dispatch(self, frames: list[str | bytes]) -> None:
        batch: list[Notification] = []
        duplicates = 0
        now = time.time()
        for raw in frames:
            text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
            try:
                meta, body = split_frame(text)
            except FrameError as exc:
                log.error("websocket.malformed_frame", session=self.name, reason=str(exc), size=len(text))
                continue
            self._note_wsc(meta.get("wsc"))
            kind = meta["type"]
            if kind == "ServerNotification" and body is not None:
                self._check_replay(_sequence_of(meta.get("wsc")))
                if self._seen_before(body):
                    duplicates += 1
                    continue
                batch.append((body.encode(), Position(self._wsc or "", self._sequence, self._subscription_id, now,
                                                      self._session_started)))
            elif kind == "ClientRequest":
                self._answers[str(meta.get("messageId"))] = (meta, body)
            elif kind == "Error":
                self._close_code, message = _error_fields(_loads(body))
                log.warning("websocket.error_frame", session=self.name, code=self._close_code, message=message)
        if duplicates:
            self.metrics.notifications_duplicate.inc(duplicates)
        if batch:
            self.handler(batch, now)

    def _seen_before(self, body: str) -> bool:
        """A replay after recovery: its uuid came already (a body without a readable uuid always passes)."""
        note = _loads(body)
        note_uuid = note.get("uuid") if isinstance(note, dict) else None
        if note_uuid is None:
            return False
        key = str(note_uuid)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > self.settings.seen_uuids:
            self._seen.popitem(last=False)
        return False

    def _note_wsc(self, wsc: Any, force: bool = False) -> None:
        """Keep the newest wsc: on every ConnectionDetails, and whenever a frame's sequence is higher
        (a replay carries older ones). Not logged anywhere: it names the session."""
        sequence = _sequence_of(wsc)
        if sequence is None or not isinstance(wsc, dict) or not wsc.get("token"):
            return
        with self._lock:
            if force or sequence > self._sequence:
                self._wsc, self._sequence = str(wsc["token"]), sequence


def _sequence_of(wsc: Any) -> int | None:
    """The `sequence` of a frame's `wsc` (None: no wsc or an unreadable one)."""
    if not isinstance(wsc, dict):
        return None
    try:
        return int(wsc.get("sequence") or 0)
    except (TypeError, ValueError):
        return None


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _error_fields(body: Any) -> tuple[str | None, str]:
    if not isinstance(body, dict):
        return None, ""
    code = body.get("errorCode")
    return (str(code) if code else None), str(body.get("message") or "")


def _seconds(value: Any) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def _describe(exc: BaseException) -> str:
    """An error without the URL (its query holds the single-use token)."""
    if isinstance(exc, InvalidStatus):
        return f"handshake refused: HTTP {exc.response.status_code}"
    if isinstance(exc, RingCentralError):
        return str(exc)
    return type(exc).__name__


# ---- the worker's side: the Transport of transports/base.py, and the subscription calls -----------------

WEBSOCKET_SOURCE = "websocket"
CHANNEL_PREFIX = "websocket:"
MAX_PENDING = 10_000  # notifications held for a channel the worker has not added yet (per account)
SUBSCRIBE_TIMEOUT = 30.0  # how long a creation waits for the session to be connected and subscribed
SUBSCRIBE_RECHECK_SECONDS = 900  # the expiry reported to the manager: when it looks at the subscription again


def channel_of(account: str) -> str:
    """An account's channel: stable across its subscriptions and sessions."""
    return f"{CHANNEL_PREFIX}{account}"


@dataclass
class _Stream:
    """A channel's read state (`transports.base.Stream`)."""

    channel: str
    epoch: int = 0
    position: int = 0  # the newest position handed on


class WebSocketTransport:
    """Intake of the `transport: websocket` accounts, behind the one interface (`transports.base.Transport`).

    One `WebSocketSession` per account, created by the subscription manager's first creation call
    (`WebSocketSubscriptionClient`); its notifications go to the channel `websocket:<account>` with the
    position `Position.ordinal`. Until the worker adds that channel (just after the creation returns)
    they are held, not dropped. A WebSocket cannot be read again from a position, so `rewind` cannot be
    honoured: the config refuses exactly-once for these accounts.
    """

    def __init__(self, handler: BatchHandlerOfReceived, metrics: Metrics, settings: WebSocketSettings | None = None,
                 on_gap: Callable[[str, Gap], None] | None = None) -> None:
        self.handler = handler
        self.metrics = metrics
        self.settings = settings or WebSocketSettings()
        self.on_gap = on_gap
        self.sessions: dict[str, WebSocketSession] = {}  # channel -> session
        self._clients: dict[str, WebSocketSubscriptionClient] = {}  # channel -> its account's client
        self._streams: dict[str, _Stream] = {}  # channels the worker reads
        self._pending: dict[str, list[Received]] = {}
        self._intake = threading.Lock()  # one batch at a time, and pending ones released in order
        # The positions handed on and not checkpointed yet (at most the records in flight), and what the
        # newest checkpoint recorded, per channel: a checkpoint records the wsc of its own notification.
        self._unrecorded: dict[str, deque[Position]] = {}
        self._recorded: dict[str, dict[str, Any]] = {}
        self._positions = threading.Lock()  # not `_intake`: the checkpoint thread must not wait on the hot path
        # channel -> the session recorded in the state topic (set by the worker: the restored state records)
        self.recorded_sessions: Callable[[str], dict[str, Any] | None] = lambda channel: None

    def client_for(self, account: str, server: str, tokens: TokenSource, http: Any,
                   timeout: tuple[float, float]) -> WebSocketSubscriptionClient:
        """The RingCentral client of a websocket account: REST for tokens and account info, its session
        for the subscription."""
        client = WebSocketSubscriptionClient(server, tokens, self.metrics, http, user=account, timeout=timeout)
        channel = channel_of(account)
        client.recorded = functools.partial(self._recorded_session, channel)
        client.fresh_session = functools.partial(self._new_session, channel)
        self._clients[channel] = client
        self._new_session(channel)
        return client

    def _new_session(self, channel: str) -> None:
        """The account's next session (not started: its subscription's creation or recovery starts it): at
        start, and when a spec handed away (its session stopped) comes back; what the state record holds now
        was written by the owner in between."""
        with self._positions:
            self._unrecorded.pop(channel, None)
            self._recorded.pop(channel, None)
        client = self._clients[channel]
        previous = self.sessions.get(channel)
        client.websocket = WebSocketSession(
            client, [], functools.partial(self._on_batch, channel), self.metrics, self.settings,
            on_gap=functools.partial(self._gap, channel), name=client.user,
            started_after=previous.started_after if previous is not None else 0)
        self.sessions[channel] = client.websocket

    # ---- Transport ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to do: a session starts with its subscription's creation."""

    def stop(self) -> None:
        for session in self.sessions.values():
            session.stop()
        self.metrics.websocket_connections.set(0)

    def add_channel(self, source: str, channel: str, resume: int | None = None) -> None:
        session = self.sessions.get(channel)
        if resume and channel not in self._streams and (session is None or session.resume is None):
            self._unrecoverable(channel, resume)
        with self._intake:
            stream = self._streams.setdefault(channel, _Stream(channel, position=resume or 0))
            held = self._pending.pop(channel, [])
            if held:
                stream.position = max(stream.position, held[-1].position)
                self.handler([Received(r.channel, r.position, r.payload, stream, stream.epoch) for r in held],
                             time.time())

    def remove_channel(self, channel: str) -> None:
        with self._intake:
            self._streams.pop(channel, None)
            self._pending.pop(channel, None)
        session = self.sessions.get(channel)
        if session is not None:  # the spec was removed or handed over: the session ends (RingCentral ends it)
            session.stop()  # its positions stay: the last checkpoint, written after this, records one of them

    def rewind(self, channel: str, position: int | None) -> None:
        log.error("websocket.rewind_impossible", channel=channel, position=position)

    def position(self, channel: str) -> int | None:
        stream = self._streams.get(channel)
        return stream.position if stream is not None else None

    def caught_up_at(self, channel: str) -> float | None:
        session = self.sessions.get(channel)
        return time.monotonic() if session is not None and session.connected else None

    def reading(self) -> set[str]:
        return {channel for channel in self._streams if (s := self.sessions.get(channel)) and s.connected}

    def acknowledged(self, channel: str, position: int) -> None:
        """Nothing to do: a recovery replays what followed the newest notification handed on."""

    def resume_state(self, channel: str, position: int) -> dict[str, Any] | None:
        """The session at the newest notification at or before `position` (a checkpoint: Kafka acknowledged
        everything up to it), never beyond it: a new owner that recovers with its wsc gets what followed it
        replayed. Checkpoints only move forward, so what lies at or before `position` is forgotten."""
        session = self.sessions.get(channel)
        with self._positions:
            unrecorded = self._unrecorded.get(channel)
            newest = None
            while unrecorded and unrecorded[0].ordinal <= position:
                newest = unrecorded.popleft()
            if newest is not None and session is not None:
                self._recorded[channel] = recorded_session(newest, session.filters)
            recorded = self._recorded.get(channel)
        # Nothing of the current session checkpointed yet (it is new: a first start, a failed recovery, a spec
        # handed over before anything came): its beginning, from which a recovery replays all of it.
        origin = session.origin() if session is not None else None
        if origin is not None and (recorded is None or recorded.get("session_started", 0) < origin.session_started):
            return recorded_session(origin, session.filters if session else ())
        return recorded

    def _recorded_session(self, channel: str) -> dict[str, Any] | None:
        """The session the state record holds for `channel` (what the checkpoints record until one moves)."""
        recorded = self.recorded_sessions(channel)
        if recorded is not None:
            with self._positions:
                self._recorded.setdefault(channel, recorded)
        return recorded

    # ---- from the sessions ---------------------------------------------------------------------------------
    def _on_batch(self, channel: str, batch: list[Notification], received_at: float) -> None:
        with self._positions:
            self._unrecorded.setdefault(channel, deque()).extend(position for _, position in batch)
        with self._intake:
            stream = self._streams.get(channel)
            if stream is None:
                self._hold(channel, batch)
                return
            received = [Received(channel, position.ordinal, raw, stream, stream.epoch) for raw, position in batch]
            stream.position = received[-1].position
            self.handler(received, received_at)

    def _hold(self, channel: str, batch: list[Notification]) -> None:
        held = self._pending.setdefault(channel, [])
        room = MAX_PENDING - len(held)
        placeholder = _Stream(channel)
        held.extend(Received(channel, p.ordinal, raw, placeholder, 0) for raw, p in batch[:room])
        if len(batch) > room:
            log.error("websocket.pending_overflow", channel=channel, dropped=len(batch) - room)

    def _unrecoverable(self, channel: str, checkpoint: int) -> None:
        """A checkpoint of an earlier worker (a restart, a handover) without a recorded session (a record of a
        version that did not keep the wsc): what followed the checkpoint and what RingCentral published until
        the new subscription is lost. Reported from the start of that session (the checkpoint holds no time)."""
        session = self.sessions.get(channel)
        self._gap(channel, Gap(session.subscription_id if session else None, "worker-restart",
                               float(checkpoint // SEQUENCES_PER_SESSION), time.time()))

    def _gap(self, channel: str, gap: Gap) -> None:
        if self.on_gap is not None:
            self.on_gap(channel, gap)


class WebSocketSubscriptionClient(RingCentralClient):
    """`SubscriptionManager`'s client for a websocket account: REST (tokens, wstoken, account info), and the
    subscription calls answered by the account's `WebSocketSession` (created over its socket; a WebSocket
    subscription needs no renewal, so `renew` and `get` only report it)."""

    websocket: WebSocketSession
    recorded: Callable[[], dict[str, Any] | None] = staticmethod(lambda: None)  # the state record's session
    fresh_session: Callable[[], None] = staticmethod(lambda: None)  # replaces a stopped `websocket`

    def list_subscriptions(self) -> list[dict[str, Any]]:
        return []  # nothing to adopt: a session's subscription cannot be taken over without its wsc

    def create_subscription(self, event_filters: list[str], expires_in: int) -> dict[str, Any]:
        if self.websocket.stopped:  # the spec was handed away and has come back
            self.fresh_session()
        self.websocket.set_event_filters(event_filters)
        self.websocket.start()
        self._wait_subscribed()
        return self._info(expires_in)

    def _wait_subscribed(self) -> None:
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        while not (self.websocket.connected and self.websocket.subscription_id):
            error = self.websocket.last_error
            if isinstance(error, ApiError) and 400 <= error.status < 500 and error.status != 429:
                raise error  # e.g. a missing app permission: the manager reports it
            if time.monotonic() > deadline:
                raise NetworkError("websocket: not subscribed within 30 s")
            time.sleep(0.05)

    def renew_subscription(self, subscription_id: str) -> dict[str, Any]:
        """The session's subscription; the first call after a restart or a handover (the session not started)
        recovers the recorded session when it held this subscription. 404 when the session's subscription
        is another (the recovery failed: it subscribed again, and the manager takes that one as created)."""
        if self.websocket.stopped:  # the spec was handed away and has come back
            self.fresh_session()
        if not self.websocket.started:
            self._recover(subscription_id)
        if self.websocket.subscription_id != subscription_id:
            raise ApiError(404, "CMN-102", "the WebSocket session holds another subscription", None,
                           "subscription.renew")
        return self._info(None)

    def _recover(self, subscription_id: str) -> None:
        recorded = session_of_record(self.recorded())
        if recorded is None or recorded[0].subscription_id != subscription_id:
            return  # nothing recorded for it: the manager creates a subscription
        self.websocket.resume_from(*recorded)
        self.websocket.start()
        self._wait_subscribed()

    def get_subscription(self, subscription_id: str) -> dict[str, Any]:
        return self._info(None)

    def delete_subscription(self, subscription_id: str) -> None:
        """Over the socket while the session holds the subscription and runs; through REST otherwise: the
        worker stops its intake (the sessions) before the manager deletes, and a stale id is no session's."""
        session = self.websocket
        if session.subscription_id == subscription_id:
            session.stop(delete_subscription=True)
            if session.subscription_id is None:
                return  # deleted over the socket
        super().delete_subscription(subscription_id)

    def _info(self, expires_in: int | None) -> dict[str, Any]:
        """A SubscriptionInfo as REST gives it; the channel is the account's, the expiry only when to look again."""
        subscription_id = self.websocket.subscription_id
        if subscription_id is None:
            raise ApiError(404, "CMN-102", "no WebSocket subscription", None, "subscription.get")
        return {"id": subscription_id, "status": "Active", "expiresIn": expires_in or SUBSCRIBE_RECHECK_SECONDS,
                "eventFilters": list(self.websocket.filters),
                "deliveryMode": {"transportType": "WebSocket", "encryption": False,
                                 "address": channel_of(self.user), "subscriberKey": WEBSOCKET_SOURCE}}


class WithWebSocket:
    """The worker's one `Transport` when some accounts use WebSocket: `websocket:<account>` channels go
    to the WebSocket transport, every other channel to the first transport (PubNub)."""

    def __init__(self, other: Transport, websocket: WebSocketTransport) -> None:
        self.other = other
        self.websocket = websocket

    def _for(self, channel: str) -> Transport:
        return self.websocket if channel.startswith(CHANNEL_PREFIX) else self.other

    def start(self) -> None:
        self.other.start()
        self.websocket.start()

    def stop(self) -> None:
        self.websocket.stop()
        self.other.stop()

    def add_channel(self, source: str, channel: str, resume: int | None = None) -> None:
        self._for(channel).add_channel(source, channel, resume)

    def remove_channel(self, channel: str) -> None:
        self._for(channel).remove_channel(channel)

    def rewind(self, channel: str, position: int | None) -> None:
        self._for(channel).rewind(channel, position)

    def position(self, channel: str) -> int | None:
        return self._for(channel).position(channel)

    def caught_up_at(self, channel: str) -> float | None:
        return self._for(channel).caught_up_at(channel)

    def reading(self) -> set[str]:
        return self.other.reading() | self.websocket.reading()

    def acknowledged(self, channel: str, position: int) -> None:
        self._for(channel).acknowledged(channel, position)

    def resume_state(self, channel: str, position: int) -> dict[str, Any] | None:
        return self._for(channel).resume_state(channel, position)
