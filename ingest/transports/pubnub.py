"""PubNub intake: connections planned here, each read by the lean client (`pubnub_lean.py`, the default)
or by the real SDK's native `PubNub` class (`worker.pubnub_client: sdk`).

With the SDK, one PubNub instance is one subscribe connection: a single subscribe key (baked into its URLs) and
a bounded set of multiplexed channels. The SDK's traps (reference: pubnub-protocol.md §6) decide
the shape of this module:

- a callback that raises kills the SDK's message thread, so listeners catch everything;
- `with_timetoken` only works on a fresh instance, and `unsubscribe_all()` + `subscribe()` breaks it,
  so changing a connection's channels means replacing the instance and resuming from a cursor;
- after a 403 (or a give-up) the SDK stops for good, so the connection is replaced the same way.

The lean client keeps that shape (a connection's channels never change; it is replaced), so both
clients share everything here but `_open` and `_close`.

Resuming is always safe because each channel remembers the last timetoken it delivered: a replayed
message is dropped here (and counted), never handed on twice.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pubnub.callbacks import SubscribeCallback
from pubnub.enums import PNReconnectionPolicy
from pubnub.pnconfiguration import PNConfiguration
from pubnub.pubnub import PubNub

from ingest.observability.logs import get_logger
from ingest.observability.metrics import Metrics
from ingest.transports.base import AccessDeniedHandler, BatchHandler, GapHandler, Received
from ingest.transports.pubnub_lean import LeanClient, Poll
from ingest.transports.pubnub_sdk import RequestHandler, drop_registry_listener, install_batch_intake

log = get_logger(__name__)

TT_PER_SECOND = 10_000_000
# A brand-new channel starts this far in the past, so a notification published between the
# subscription's creation and our first poll is replayed from PubNub's buffer rather than missed.
NEW_CHANNEL_LOOKBACK_SECONDS = 30.0
# Channel-set changes are applied in batches, so 200 specs starting at once cost a few restarts.
APPLY_INTERVAL_SECONDS = 0.2
# PubNub caches a 403 for about 30 s; retrying sooner only produces more 403s.
ACCESS_DENIED_RETRY_SECONDS = 5.0
# PubNub answers a subscribe poll with at most this many messages; fewer means that it held nothing
# more for the connection's channels at that moment.
MAX_MESSAGES_PER_RESPONSE = 100

# Subscribe-response message types (`e`) that carry a published message; signals (1), objects (2),
# message actions (3) and files (4) are not RingCentral notifications.
_MESSAGE_TYPES = frozenset({None, 0})


def timetoken_at(unix_seconds: float) -> int:
    return int(unix_seconds * TT_PER_SECOND)


@dataclass
class Cursor:
    """A channel's read position; the `Stream` of its `Received` notifications (readers only read `.epoch`)."""

    name: str
    subscribe_key: str
    last_tt: int  # newest timetoken delivered (or the resume point before anything arrived)
    start_tt: int = 0  # where reading began (a checkpoint, or the lookback of a new channel)
    epoch: int = 0  # bumped by rewind()


@dataclass
class _Connection:
    """One subscribe connection (a PubNub instance, or a lean `Poll`); replaced, never re-subscribed,
    when its channel set changes."""

    conn_id: int
    subscribe_key: str
    channels: frozenset[str]
    pubnub: PubNub | None = None
    listener: _Listener | None = None
    poll: Poll | None = None
    retired: bool = False
    connected: bool = False  # PubNub answered this instance's first poll
    resume_tt: int = 0  # where this instance started reading
    opened_tt: int = 0  # when it started: messages at or before this are replays from PubNub's buffer
    replayed: int = 0
    first_replayed_tt: int = 0
    caught_up_at: float = 0.0  # monotonic: its last response that was not full (0: none yet)


class _Listener(SubscribeCallback):  # type: ignore[misc]
    """SDK status callbacks for one connection (messages bypass the listener: `install_batch_intake`).
    Never raises: an exception here would kill an SDK thread."""

    def __init__(self, transport: PubNubTransport, conn: _Connection) -> None:
        self._transport = transport
        self._conn = conn

    def status(self, pubnub: PubNub, status: Any) -> None:
        try:
            self._transport._on_status(self._conn, status)
        except Exception:  # pragma: no cover
            log.error("transport.status_failed", exc_info=True)

    def message(self, pubnub: PubNub, message: Any) -> None:
        pass

    def presence(self, pubnub: PubNub, presence: Any) -> None:
        pass


@dataclass
class TransportSettings:
    user_id: str
    origin: str | None = None  # host[:port]; None = the SDK's default PubNub origin
    ssl: bool = True
    channels_per_connection: int = 50
    reconnection_interval: float = 1.0
    maximum_reconnection_interval: float = 30.0
    subscribe_request_timeout: int = 310
    replay_buffer_messages: int = 100  # PubNub's per-connection buffer (a per-key setting at PubNub)
    client: str = "lean"  # or "sdk" (config: worker.pubnub_client)


@dataclass
class PubNubTransport:
    """Keeps PubNub connections reading exactly the channels the control plane asks for."""

    settings: TransportSettings
    handler: BatchHandler
    metrics: Metrics
    on_access_denied: AccessDeniedHandler | None = None
    # (channels, from_tt, until_tt): a catch-up returned a full replay buffer; older messages may be lost
    on_replay_gap: GapHandler | None = None
    _channels: dict[str, Cursor] = field(default_factory=dict)
    _connections: dict[int, _Connection] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _intake: threading.Lock = field(default_factory=threading.Lock)  # one batch at a time (`_on_batch`)
    _dirty: set[int | str] = field(default_factory=set)  # connection ids or subscribe keys to re-plan
    _wake: threading.Event = field(default_factory=threading.Event)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _retry_at: dict[int, float] = field(default_factory=dict)
    _lean: LeanClient | None = None

    # ---- control-plane facing API -------------------------------------------------------------

    def add_channel(self, source: str, channel: str, resume: int | None = None) -> None:
        """Start reading `channel` (of subscribe key `source`), replaying from `resume` (a checkpoint
        timetoken) or a short lookback."""
        subscribe_key = source
        with self._lock:
            existing = self._channels.get(channel)
            if existing is not None and existing.subscribe_key == subscribe_key:
                return
            start = resume if resume is not None else timetoken_at(time.time() - NEW_CHANNEL_LOOKBACK_SECONDS)
            self._channels[channel] = Cursor(channel, subscribe_key, start, start)
            self._dirty.add(subscribe_key)
        self._wake.set()

    def rewind(self, channel: str, position: int | None) -> None:
        """Read `channel` again after `position` (None: from where it started), e.g. after an aborted
        transaction hid what was read. The channel's connection is replaced to resume there."""
        with self._lock:
            ch = self._channels.get(channel)
            if ch is None:
                return
            ch.last_tt = ch.start_tt if position is None else position
            ch.epoch += 1
            for conn in self._connections.values():
                if channel in conn.channels:
                    # Retire it now, not at the next replan: a message it still delivers would pass
                    # the reset cursor, and the replacement would then drop the replay as a duplicate.
                    conn.retired = True
                    self._dirty.add(conn.conn_id)
        self._wake.set()

    def remove_channel(self, channel: str) -> None:
        """Stop reading `channel` (a moved one only once drained: the worker decides when)."""
        with self._lock:
            ch = self._channels.pop(channel, None)
            if ch is None:
                return
            self._dirty.add(ch.subscribe_key)
        self._wake.set()

    def position(self, channel: str) -> int | None:
        """The newest timetoken handed on for `channel` (or its resume point)."""
        ch = self._channels.get(channel)
        return ch.last_tt if ch else None

    def acknowledged(self, channel: str, position: int) -> None:
        """Nothing to do: PubNub's positions are resumable, a restart replays from the checkpoint."""

    def resume_state(self, channel: str, position: int) -> dict[str, Any] | None:
        """None: a timetoken is all a restart needs."""
        return None

    def caught_up_at(self, channel: str) -> float | None:
        """When (monotonic) the connection now reading `channel` last had a response that was not
        full: PubNub then held nothing newer for it. None until that connection has had one."""
        with self._lock:
            times = [c.caught_up_at for c in self._connections.values()
                     if channel in c.channels and not c.retired and c.caught_up_at]
        return max(times, default=None)

    def start(self) -> None:
        if self.settings.client == "lean":
            self._lean = LeanClient(self.settings)
            self._lean.start()
        self._thread = threading.Thread(target=self._run, name="pubnub-transport", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for conn in self._connections.values():
                self._close(conn)
            self._connections.clear()
        if self._lean is not None:
            self._lean.stop()
        self.metrics.pubnub_connections.set(0)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def reading(self) -> set[str]:
        """Channels whose connection is open and has been answered by PubNub."""
        with self._lock:
            return {ch for c in self._connections.values() if c.connected and not c.retired for ch in c.channels}

    # ---- SDK callbacks -------------------------------------------------------------------------

    def _on_batch(self, conn: _Connection, messages: list[dict[str, Any]]) -> None:
        """One subscribe response: hand on, as one batch, what is new for each channel we read.

        Batches are accepted and handed on one at a time (`_intake`), so each channel's notifications
        reach the handler in the order their cursor accepted them. When a channel moves to a new
        connection, the old one may still be handing on a batch it accepted just before: run side by
        side, the new connection's later notifications reached Kafka first, their acknowledgement
        moved the spec's checkpoint past the older ones still in flight, and a SIGKILL at that moment
        lost them (seen on a loaded machine: 1-2 of ~260). The handler holds the GIL for nearly all of
        its work, so serialising batches costs no parallelism."""
        with self._intake:
            self._accept_and_hand_on(conn, messages)

    def _accept_and_hand_on(self, conn: _Connection, messages: list[dict[str, Any]]) -> None:
        accepted: list[Received] = []
        replayed: list[int] = []
        duplicates = malformed = 0
        # Under the lock, so that a rewind() cannot fall between a cursor check and its update.
        with self._lock:
            if conn.retired:  # a replaced instance may still finish a poll; the new one re-reads
                return
            if len(messages) < MAX_MESSAGES_PER_RESPONSE:
                conn.caught_up_at = time.monotonic()
            channels, opened_tt = self._channels, conn.opened_tt
            for m in messages:
                try:
                    if m.get("e") not in _MESSAGE_TYPES:
                        continue
                    channel, timetoken, payload = m["c"], int(m["p"]["t"]), m["d"]
                except (KeyError, TypeError, ValueError, AttributeError):
                    malformed += 1
                    continue
                if timetoken <= opened_tt:
                    replayed.append(timetoken)
                ch = channels.get(channel)
                if ch is None:
                    continue  # a channel removed while its message was in flight: its spec is gone
                if timetoken <= ch.last_tt:
                    duplicates += 1
                    continue
                ch.last_tt = timetoken
                accepted.append(Received(channel, timetoken, payload, ch, ch.epoch))
        for timetoken in replayed:
            self._count_replay(conn, timetoken)
        if duplicates:
            self.metrics.notifications_duplicate.inc(duplicates)
        if malformed:
            log.error("transport.malformed_messages", connection=conn.conn_id, count=malformed,
                      reason="subscribe response entries without channel, timetoken or payload")
        if accepted:
            self.handler(accepted, time.time())

    def _count_replay(self, conn: _Connection, timetoken: int) -> None:
        """A catch-up that returns as many messages as PubNub's buffer holds may have lost older ones."""
        conn.replayed += 1
        if conn.replayed == 1:
            conn.first_replayed_tt = timetoken
        if conn.replayed == self.settings.replay_buffer_messages:
            self.metrics.replay_gaps.inc()
            if self.on_replay_gap is not None:
                self.on_replay_gap(sorted(conn.channels), conn.resume_tt, conn.first_replayed_tt)

    def _on_status(self, conn: _Connection, status: Any) -> None:
        """An SDK status: its category, named as the lean client names it (`PNAccessDeniedCategory` ->
        `AccessDenied`)."""
        category = status.category
        name = getattr(category, "name", str(category)).removeprefix("PN").removesuffix("Category")
        self._on_connection_status(conn, name, status.is_error())

    def _on_connection_status(self, conn: _Connection, name: str, is_error: bool) -> None:
        self.metrics.pubnub_status.labels(name).inc()
        if conn.retired:
            return
        if name in ("Connected", "Reconnected"):
            conn.connected = True
        elif name in ("AccessDenied", "Disconnected"):
            # The client has stopped for good. Replace the connection, resuming from each channel's cursor.
            log.warning("transport.connection_lost", category=name, connection=conn.conn_id,
                        channels=len(conn.channels))
            delay = ACCESS_DENIED_RETRY_SECONDS if name == "AccessDenied" else 0.5
            with self._lock:
                self._retry_at[conn.conn_id] = time.monotonic() + delay
                self._dirty.add(conn.conn_id)
            self._wake.set()
            if name == "AccessDenied" and self.on_access_denied:
                self.on_access_denied(sorted(conn.channels))
        elif is_error:
            log.info("transport.error", category=name, connection=conn.conn_id)

    # ---- connection planning -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(APPLY_INTERVAL_SECONDS)
            self._wake.clear()
            try:
                self._apply()
            except Exception:
                log.error("transport.apply_failed", exc_info=True)

    def _apply(self) -> None:
        now = time.monotonic()
        with self._lock:
            due_retries = [cid for cid, at in self._retry_at.items() if at <= now]
            if not self._dirty and not due_retries:
                return
            for cid in due_retries:
                del self._retry_at[cid]
            dirty_keys = {d for d in self._dirty if isinstance(d, str)}
            dirty_conns = {d for d in self._dirty if isinstance(d, int)} - set(self._retry_at)
            self._dirty -= dirty_keys | dirty_conns
            dirty_conns |= set(due_retries)
            for key in dirty_keys | {c.subscribe_key for cid, c in self._connections.items() if cid in dirty_conns}:
                self._replan(key, force={cid for cid in dirty_conns if cid in self._connections})
            self.metrics.pubnub_connections.set(len(self._connections))

    def _replan(self, subscribe_key: str, force: set[int]) -> None:
        """Fit the key's channels into connections of bounded size, replacing only changed ones."""
        wanted = {c.name for c in self._channels.values() if c.subscribe_key == subscribe_key}
        conns = [c for c in self._connections.values() if c.subscribe_key == subscribe_key]
        placed: set[str] = set()
        for conn in conns:
            keep = conn.channels & wanted
            if keep == conn.channels and conn.conn_id not in force:
                placed |= keep
                continue
            # Changed or broken: replace it (possibly with fewer channels), or drop it if empty.
            self._close(conn)
            del self._connections[conn.conn_id]
            if keep:
                self._open(subscribe_key, keep)
                placed |= keep
        rest = sorted(wanted - placed)
        limit = max(1, self.settings.channels_per_connection)
        # New channels first fill the least-loaded open connection (a restart of it), then new ones.
        for conn in sorted((c for c in self._connections.values() if c.subscribe_key == subscribe_key),
                           key=lambda c: len(c.channels)):
            room = limit - len(conn.channels)
            if not rest or room <= 0:
                continue
            take, rest = rest[:room], rest[room:]
            self._close(conn)
            del self._connections[conn.conn_id]
            self._open(subscribe_key, conn.channels | set(take))
        for i in range(0, len(rest), limit):
            self._open(subscribe_key, frozenset(rest[i:i + limit]))

    def _open(self, subscribe_key: str, channels: frozenset[str] | set[str]) -> None:
        conn = _Connection(next(self._ids), subscribe_key, frozenset(channels))
        # Resume where the least advanced channel stopped; the others drop what they already had.
        resume = min(self._channels[name].last_tt for name in channels)
        conn.resume_tt, conn.opened_tt = resume, timetoken_at(time.time())
        self._connections[conn.conn_id] = conn
        if self._lean is not None:
            conn.poll = Poll(subscribe_key, sorted(channels), resume, functools.partial(self._on_batch, conn),
                             functools.partial(self._on_connection_status, conn))
            self._lean.open(conn.poll)
        else:
            self._open_sdk(conn)
        log.info("transport.connection_opened", connection=conn.conn_id, channels=len(channels), resume_tt=resume)

    def _open_sdk(self, conn: _Connection) -> None:
        cfg = PNConfiguration()
        cfg.subscribe_key = conn.subscribe_key
        cfg.user_id = self.settings.user_id
        cfg.daemon = True  # a blocked long-poll must not pin the process at exit
        cfg.ssl = self.settings.ssl
        if self.settings.origin:
            cfg.origin = self.settings.origin
        cfg.reconnect_policy = PNReconnectionPolicy.EXPONENTIAL
        cfg.maximum_reconnection_retries = -1  # never give up silently
        cfg.reconnection_interval = self.settings.reconnection_interval
        cfg.maximum_reconnection_interval = self.settings.maximum_reconnection_interval
        cfg.subscribe_request_timeout = self.settings.subscribe_request_timeout
        cfg.suppress_leave_events = True
        pubnub = PubNub(cfg, custom_request_handler=RequestHandler)
        listener = _Listener(self, conn)
        pubnub.add_listener(listener)
        install_batch_intake(pubnub, functools.partial(self._on_batch, conn))
        conn.pubnub, conn.listener = pubnub, listener
        pubnub.subscribe().channels(sorted(conn.channels)).with_timetoken(conn.resume_tt).execute()
        drop_registry_listener(pubnub)

    def _close(self, conn: _Connection) -> None:
        conn.retired = True
        if conn.poll is not None and self._lean is not None:
            self._lean.close(conn.poll)
        if conn.pubnub is not None:
            try:
                conn.pubnub.stop()
            except Exception:  # the SDK's stop is best effort; a daemon poll thread ends on its own
                log.warning("transport.stop_failed", exc_info=True, connection=conn.conn_id)
