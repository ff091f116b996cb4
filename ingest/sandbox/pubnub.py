"""PubNub emulator: subscribe v2 long-poll, publish, time, presence leave/heartbeat, replay buffer.

Fidelity rules (docs/reference pubnub-protocol.md §2-§4, §8):
- every poll is answered from its own `tt` alone, never from per-client state: several concurrent
  polls per client are normal (the SDK leaves cancelled polls hanging);
- `tt=0` is a handshake: answered at once with a fresh cursor and no messages;
- `tt>0` returns buffered messages on the requested channels with `p.t > tt`, oldest first, at most
  `max_per_response`; when capped, `t.t` is the last returned timetoken so the next poll continues;
  with nothing to return the poll is held until a publish or the hold deadline, then answered with
  the request's own `tt`;
- one FIFO buffer per subscribe key, capped (`buffer_size`) and aged (`buffer_ttl`), with counters
  that make overflow observable; timetokens are strictly monotonic 17-digit integers.

Speed: each envelope is serialized to JSON bytes once, at publish time; a response is a join of
those bytes, written with one `write` on a keep-alive HTTP/1.1 connection. A publish wakes only the
held polls that read its channel (one condition per held poll, sharing the key's lock), not every
held poll of the key; `publish_many` buffers a batch under one lock. A connection's channel list is
parsed once (the SDK repeats the same list on every poll). That keeps the serving path cheap next to
the worker in the benchmarks (docs/benchmarks.md).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from ingest.sandbox.faults import FaultBook

CONTENT_TYPE = b'text/javascript; charset="UTF-8"'
OVERFLOW_CHANNEL = "sandbox-overflow-filler"
MAX_MESSAGE_BYTES = 32 * 1024
_COMPACT = (",", ":")


class TimetokenClock:
    """17-digit timetokens (100 ns units since the epoch), strictly increasing across the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        now = time.time_ns() // 100
        with self._lock:
            self._last = now if now > self._last else self._last + 1
            return self._last


@dataclass
class KeyStats:
    """What the buffer of one subscribe key holds and has lost."""

    sub_key: str
    buffered: int
    published: int
    dropped_overflow: int
    dropped_expired: int
    oldest_timetoken: int | None
    newest_timetoken: int | None


class _KeyBuffer:
    """FIFO of (timetoken, channel, envelope bytes) for one subscribe key; guarded by `cond`.

    Parallel lists with a moving start index: bisect finds the first entry after a cursor in
    O(log n), and dropping the oldest entries is O(1) (the lists are compacted now and then).
    `waiters` maps a channel to the conditions of the polls held on it (all built on `cond`'s lock).
    """

    __slots__ = ("blobs", "channels", "cond", "dropped_expired", "dropped_overflow", "lock", "published", "start",
                 "tts", "waiters")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.waiters: dict[str, set[threading.Condition]] = {}
        self.tts: list[int] = []
        self.channels: list[str] = []
        self.blobs: list[bytes] = []
        self.start = 0
        self.published = 0
        self.dropped_overflow = 0
        self.dropped_expired = 0

    def __len__(self) -> int:
        return len(self.tts) - self.start

    def wake(self, channel: str) -> None:
        """Wake the polls held on `channel`. Caller holds `cond`."""
        for waiter in self.waiters.get(channel, ()):
            waiter.notify()

    def wake_all(self) -> None:
        """Wake every held poll (on close). Caller holds `cond`."""
        for waiters in self.waiters.values():
            for waiter in waiters:
                waiter.notify()

    def hold(self, channels: frozenset[str], seconds: float) -> None:
        """Wait up to `seconds` for a publish on one of `channels`. Caller holds `cond`."""
        waiter = threading.Condition(self.lock)
        for channel in channels:
            self.waiters.setdefault(channel, set()).add(waiter)
        try:
            waiter.wait(seconds)
        finally:
            for channel in channels:
                held = self.waiters[channel]
                held.discard(waiter)
                if not held:
                    del self.waiters[channel]

    def drop_front(self, n: int) -> None:
        self.start += n
        if self.start > 1024 and self.start * 2 > len(self.tts):
            del self.tts[: self.start], self.channels[: self.start], self.blobs[: self.start]
            self.start = 0


class PubNubEmulator:
    """The PubNub side of the sandbox, independent of HTTP (the handler below is a thin adapter)."""

    def __init__(self, faults: FaultBook, *, hold_seconds: float = 1.0, buffer_size: int = 100,
                 buffer_ttl: float = 1200.0, max_per_response: int = 100, region: int = 4) -> None:
        if buffer_size < 1 or max_per_response < 1:
            raise ValueError("buffer_size and max_per_response must be >= 1")
        self.faults = faults
        self.hold_seconds = hold_seconds
        self.buffer_size = buffer_size
        self.buffer_ttl = buffer_ttl
        self.max_per_response = max_per_response
        self.region = region
        self.clock = TimetokenClock()
        self._keys: dict[str, _KeyBuffer] = {}
        self._keys_lock = threading.Lock()
        self._closed = threading.Event()
        self.polls = 0  # subscribe requests answered (for stats)
        self._channel_sets: dict[str, frozenset[str]] = {}
        self.messages_served = 0  # messages in those answers (for stats: messages per poll)

    # ---- buffer ------------------------------------------------------------------------------
    def _key(self, sub_key: str) -> _KeyBuffer:
        kb = self._keys.get(sub_key)
        if kb is None:
            with self._keys_lock:
                kb = self._keys.setdefault(sub_key, _KeyBuffer())
        return kb

    def _expire(self, kb: _KeyBuffer) -> None:
        """Drop entries older than buffer_ttl (timetokens are wall-clock based). Caller holds kb.cond."""
        if not len(kb):
            return
        horizon = int((time.time() - self.buffer_ttl) * 1e7)
        if kb.tts[kb.start] >= horizon:
            return
        cut = bisect.bisect_left(kb.tts, horizon, kb.start) - kb.start
        kb.dropped_expired += cut
        kb.drop_front(cut)

    def publish(self, sub_key: str, channel: str, message: Any, publisher: str | None = None, *,
                meta: Any = None, signal: bool = False) -> int:
        """Buffer one message (any JSON value) and wake held polls. Returns its timetoken."""
        data = json.dumps(message, separators=_COMPACT, ensure_ascii=False)
        return self.publish_serialized(sub_key, channel, data, publisher, meta=meta, signal=signal)

    def publish_serialized(self, sub_key: str, channel: str, data_json: str, publisher: str | None = None, *,
                           meta: Any = None, signal: bool = False) -> int:
        """Like `publish`, with the message already serialized as JSON text (saves a dumps)."""
        kb = self._key(sub_key)
        head = '{"a":"1","f":0,' + ('"e":1,' if signal else "")
        if publisher is not None:
            head += '"i":' + json.dumps(publisher) + ","
        tail = ',"k":' + json.dumps(sub_key) + ',"c":' + json.dumps(channel) + ',"d":' + data_json
        if meta is not None:
            tail += ',"u":' + json.dumps(meta, separators=_COMPACT)
        tail += "}"
        with kb.cond:
            tt = self._append(kb, channel, head, tail)
            self._trim(kb)
            kb.wake(channel)
        return tt

    def publish_many(self, sub_key: str, messages: Iterable[tuple[str, str]]) -> int:
        """Buffer (channel, data JSON text) messages under one lock, as `publish_serialized` would one
        by one (no publisher, meta or signal); wakes the polls held on their channels. Returns the
        last timetoken (0 for no messages)."""
        kb = self._key(sub_key)
        head, key_part = '{"a":"1","f":0,', ',"k":' + json.dumps(sub_key) + ',"c":'
        tt = 0
        with kb.cond:
            touched = set()
            for channel, data_json in messages:
                tt = self._append(kb, channel, head, f'{key_part}{json.dumps(channel)},"d":{data_json}}}')
                touched.add(channel)
            self._trim(kb)
            for channel in touched:
                kb.wake(channel)
        return tt

    def _append(self, kb: _KeyBuffer, channel: str, head: str, tail: str) -> int:
        """One envelope into the buffer, stamped with the next timetoken. Caller holds kb.cond."""
        tt = self.clock.next()
        kb.tts.append(tt)
        kb.channels.append(channel)
        kb.blobs.append(f'{head}"p":{{"t":"{tt}","r":{self.region}}}{tail}'.encode())
        kb.published += 1
        return tt

    def _trim(self, kb: _KeyBuffer) -> None:
        """Drop what exceeds `buffer_size` (oldest first) and what has aged out. Caller holds kb.cond."""
        over = len(kb) - self.buffer_size
        if over > 0:
            kb.dropped_overflow += over
            kb.drop_front(over)
        self._expire(kb)

    def overflow(self, sub_key: str) -> int:
        """Publish buffer_size filler messages on a channel nobody reads, so that everything buffered
        before is dropped (FIFO), as when a client stays away too long. Returns how many were dropped."""
        before = self.stats(sub_key).buffered
        for i in range(self.buffer_size):
            self.publish(sub_key, OVERFLOW_CHANNEL, {"filler": i})
        return before

    def stats(self, sub_key: str) -> KeyStats:
        kb = self._key(sub_key)
        with kb.cond:
            self._expire(kb)
            n = len(kb)
            return KeyStats(sub_key, n, kb.published, kb.dropped_overflow, kb.dropped_expired,
                            kb.tts[kb.start] if n else None, kb.tts[-1] if n else None)

    def sub_keys(self) -> list[str]:
        with self._keys_lock:
            return list(self._keys)

    # ---- subscribe ---------------------------------------------------------------------------
    def channel_set(self, segment: str) -> frozenset[str]:
        """The channels of a subscribe URL's channel segment, parsed once per distinct segment (a
        connection repeats its list on every poll)."""
        channels = self._channel_sets.get(segment)
        if channels is None:
            if len(self._channel_sets) >= 10_000:  # bounded: channel lists change as subscriptions move
                self._channel_sets.clear()
            channels = self._channel_sets[segment] = frozenset(split_channels(segment))
        return channels

    def handshake(self) -> bytes:
        return b'{"t":{"t":"%d","r":%d},"m":[]}' % (self.clock.next(), self.region)

    def poll(self, sub_key: str, channels: frozenset[str], tt: int, hold: float | None = None) -> bytes:
        """The body of a subscribe response for cursor `tt` (blocking up to the hold time)."""
        self.polls += 1  # not under a lock: a statistic, a lost increment does not matter
        if tt <= 0:
            return self.handshake()
        kb = self._key(sub_key)
        deadline = time.monotonic() + (self.hold_seconds if hold is None else hold)
        cap = self.max_per_response
        with kb.cond:
            while True:
                self._expire(kb)
                tts, chans, blobs = kb.tts, kb.channels, kb.blobs
                i = bisect.bisect_right(tts, tt, kb.start)
                end = len(tts)
                out: list[bytes] = []
                last = 0
                while i < end:
                    if chans[i] in channels:
                        out.append(blobs[i])
                        last = tts[i]
                        if len(out) == cap:
                            break
                    i += 1
                if out:
                    # Capped: continue from the last returned message. Otherwise a fresh cursor (it
                    # consumes a clock tick, so any later publish gets a larger timetoken).
                    cursor = last if len(out) == cap and i + 1 < end else self.clock.next()
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    return b'{"t":{"t":"%d","r":%d},"m":[]}' % (tt, self.region)
                kb.hold(channels, remaining)
        self.messages_served += len(out)
        return b'{"t":{"t":"%d","r":%d},"m":[%b]}' % (cursor, self.region, b",".join(out))

    def close(self) -> None:
        """Release every held poll (answered empty with its own cursor)."""
        self._closed.set()
        with self._keys_lock:
            keys = list(self._keys.values())
        for kb in keys:
            with kb.cond:
                kb.wake_all()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


# ---- HTTP adapter --------------------------------------------------------------------------------

_FORBIDDEN = b'{"message":"Forbidden","payload":{"channels":[%b]},"error":true,"service":"Access Manager","status":403}'
_ERROR = b'{"message":"%b","error":true,"service":"Balancer","status":%d}'
_LEAVE = b'{"status":200,"message":"OK","action":"leave","service":"Presence"}'
_HEARTBEAT = b'{"status":200,"message":"OK","service":"Presence"}'
_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _send_all(sock: socket.socket, head: bytes, body: bytes) -> None:
    """Head and body in one system call without concatenating a large body (sendmsg may send part)."""
    if len(body) < 8192:
        sock.sendall(head + body)
        return
    sent = sock.sendmsg([head, body])
    if sent < len(head):
        sock.sendall(head[sent:])
        sock.sendall(body)
    elif sent < len(head) + len(body):
        sock.sendall(memoryview(body)[sent - len(head):])


def split_channels(segment: str) -> list[str]:
    """`a,ch%2Fb` -> ["a", "ch/b"]; a lone `,` means no channels."""
    return [unquote(part) for part in segment.split(",") if part]


def _query_value(query: str, name: str) -> str | None:
    """The first value of `name` in a URL query (what `parse_qs` would give, at a fraction of its cost)."""
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == name:
            return unquote(value)
    return None


class PubNubHandler(BaseHTTPRequestHandler):
    """Routes PubNub REST calls to a `PubNubEmulator` (set as the class attribute `emulator`)."""

    protocol_version = "HTTP/1.1"
    emulator: ClassVar[PubNubEmulator]
    server_version = "nginx"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (one line per poll would dominate at benchmark rates)."""

    def handle_one_request(self) -> None:
        """A lean HTTP/1.1 request reader (the stdlib's email-based header parser costs more than
        answering a poll). Only the request line, Content-Length and Connection matter here."""
        try:
            line = self.rfile.readline(65537)
            if not line:
                self.close_connection = True
                return
            words = line.split()
            if len(words) != 3:
                self.close_connection = True
                return
            length = 0
            close = words[2] == b"HTTP/1.0"
            while True:
                header = self.rfile.readline(65537)
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            self.close_connection = close
            self.command = words[0].decode("latin-1")
            self.path = words[1].decode("latin-1")
            if self.command == "POST":
                self._route(self.rfile.read(length) if length else b"")
            elif self.command in ("GET", "HEAD"):
                self._route(None)
            else:
                self._send(405, _ERROR % (b"Method Not Allowed", 405))
        except (OSError, ValueError):
            self.close_connection = True

    def _send(self, status: int, body: bytes) -> None:
        head = (b"HTTP/1.1 %d %b\r\nContent-Type: %b\r\nContent-Length: %d\r\nCache-Control: no-cache\r\n"
                b"Access-Control-Allow-Origin: *\r\nConnection: keep-alive\r\n\r\n"
                % (status, _REASONS.get(status, "OK").encode() if status != 200 else b"OK", CONTENT_TYPE, len(body)))
        try:
            _send_all(self.connection, head, body)
        except OSError:  # the client went away mid-poll: normal for cancelled long-polls
            self.close_connection = True

    def _drop(self) -> None:
        """Close the connection without an answer (the SDK sees an unexpected disconnect)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _route(self, body: bytes | None) -> None:
        url = urlsplit(self.path)
        parts = url.path.split("/")
        # parts[0] is "" (leading slash)
        try:
            if len(parts) >= 6 and parts[1] == "v2" and parts[2] == "subscribe":
                self._subscribe(parts[3], parts[4], url.query)
            elif len(parts) >= 3 and parts[1] == "time":
                self._time()
            elif len(parts) >= 7 and parts[1] in ("publish", "signal"):
                self._publish(parts, url.query, body)
            elif len(parts) >= 8 and parts[1:4] == ["v2", "presence", "sub-key"] and parts[7] == "leave":
                self._send(200, _LEAVE)
            elif len(parts) >= 8 and parts[1:4] == ["v2", "presence", "sub-key"] and parts[7] == "heartbeat":
                self._send(200, _HEARTBEAT)
            else:
                self._send(404, _ERROR % (b"Not Found", 404))
        except ValueError:
            self._send(400, _ERROR % (b"Invalid Arguments", 400))

    def _subscribe(self, sub_key: str, channel_segment: str, query: str) -> None:
        emulator = self.emulator
        channels = emulator.channel_set(channel_segment)
        # Only `tt` matters; `tr`, `uuid`, `pnsdk`, `ee`, `heartbeat`, `state`, ... are ignored.
        tt = int(_query_value(query, "tt") or 0)
        book = emulator.faults
        if book.armed_any():
            ordered = split_channels(channel_segment)
            if _first(book, "pubnub-drop", ordered) is not None:
                self._drop()
                return
            fault = _first(book, "pubnub-error", ordered)
            if fault is not None:
                status = int(fault["status"])
                if status == 403:
                    names = b",".join(json.dumps(c).encode() for c in ordered)
                    self._send(403, _FORBIDDEN % names)
                else:
                    self._send(status, _ERROR % (_REASONS.get(status, "Error").encode(), status))
                return
            stall = _first(book, "pubnub-stall", ordered)
            if stall is not None:
                emulator._closed.wait(float(stall["seconds"]))
        self._send(200, emulator.poll(sub_key, channels, tt))

    def _time(self) -> None:
        if self.emulator.faults.take("pubnub-time-fail") is not None:
            self._send(500, _ERROR % (b"Internal Server Error", 500))
            return
        self._send(200, b"[%d]" % self.emulator.clock.next())

    def _publish(self, parts: list[str], query: str, body: bytes | None) -> None:
        # /publish/{pub_key}/{sub_key}/0/{channel}/0[/{message}]
        sub_key, channel = parts[3], unquote(parts[5])
        if body is None:
            if len(parts) < 8:
                raise ValueError("no message")
            text = unquote("/".join(parts[7:]))
        else:
            text = body.decode()
        if len(text.encode()) > MAX_MESSAGE_BYTES:  # PubNub's 32 KiB message limit (reference §7)
            self._send(400, b'[0,"Message Too Large","%d"]' % self.emulator.clock.next())
            return
        message = json.loads(text)
        params = parse_qs(query)
        publisher = params.get("uuid", [None])[0]
        meta = json.loads(params["meta"][0]) if "meta" in params else None
        tt = self.emulator.publish(sub_key, channel, message, publisher, meta=meta, signal=parts[1] == "signal")
        self._send(200, b'[1,"Sent","%d"]' % tt)


def _first(book: FaultBook, kind: str, channels: list[str]) -> dict[str, Any] | None:
    """A fault of `kind` for this poll: one armed for any channel, or for one of the polled channels."""
    hit = book.take(kind, channel="*")
    if hit is not None:
        return hit
    for c in channels:
        hit = book.take(kind, channel=c)
        if hit is not None:
            return hit
    return None
