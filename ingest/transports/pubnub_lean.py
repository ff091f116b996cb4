"""A lean PubNub subscribe client: the hot loop of the PubNub transport, without the SDK's machinery.

Every subscribe connection is one coroutine on one asyncio loop (one thread for all of them), holding
one keep-alive HTTP/1.1 connection of its own (asyncio streams: a GET and its answer are all it needs)
and parsing the subscribe JSON itself. The messages of each answer are handed on in one more thread,
in the order they were read, while the loop reads on (at most MAX_QUEUED_BATCHES wait: memory stays
bounded). At 2,000 subscriptions and 1,000 notifications/s the SDK's threaded client cost 1.8 ms of
CPU per poll and ran 122 OS threads (a thread per request, httpx, endpoint, envelope and status
objects); this client 0.35 ms and 4 threads, whatever the number of subscriptions (docs/benchmarks.md).

The `pubnub` package still defines the protocol: its configuration defaults (origin), its subscribe
path and channel encoding, its status category names. The client speaks it as the SDK's native
client does (reference: pubnub-protocol.md §2 and §5):

- the first poll sends `tt=<resume>` and no `tr` (as `with_timetoken`), later ones the `t.t`/`t.r`
  of the previous answer;
- a read timeout re-polls at once with the same cursor, announcing nothing;
- 403 announces `AccessDenied` and ends the connection (the transport replaces it later);
- 400 (`BadRequest`), any other non-2xx (`Unknown`), a dropped or refused connection
  (`UnexpectedDisconnect`) or an answer without a cursor (`MalformedResponse`) start the reconnect
  loop: `/time/0` probes with exponential backoff, never giving up, then a poll from the saved cursor
  (`Reconnected` once it is answered).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import queue
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from pubnub.endpoints.pubsub.subscribe import Subscribe
from pubnub.pnconfiguration import PNConfiguration
from pubnub.utils import join_channels, url_encode

from ingest.observability.logs import get_logger
from ingest.transports.pubnub_sdk import only_string_payloads, ssl_context

log = get_logger(__name__)

# What the client reports of one connection: (the SDK's status category name, whether it is an error).
StatusHandler = Callable[[str, bool], None]
# The messages (`m` entries) of one subscribe answer, as parsed. Must not raise.
MessagesHandler = Callable[[list[dict[str, Any]]], None]

CONNECT_TIMEOUT_SECONDS = 10.0  # the SDK's default `connect_timeout`
# Batches read but not yet handed on, at most (each up to 100 messages): then every connection waits.
MAX_QUEUED_BATCHES = 64
QUEUE_FULL_RECHECK_SECONDS = 0.01
_PNSDK = url_encode("PubNub-Python-ingest-lean")


class PollSettings(Protocol):
    """The transport settings the client reads (each poll reads them again: tests shorten timeouts)."""

    user_id: str
    origin: str | None
    ssl: bool
    reconnection_interval: float
    maximum_reconnection_interval: float
    subscribe_request_timeout: int


class NoAnswer(Exception):
    """The request got no HTTP answer: refused, dropped, not HTTP, or no connection within the timeout."""


class MalformedResponse(ValueError):
    """A 200 answer that is not a subscribe response (no JSON object with `t.t` and `t.r`)."""


def parse_subscribe_response(body: bytes) -> tuple[int, int, list[dict[str, Any]]]:
    """(cursor timetoken, region, messages) of a subscribe answer. orjson turns integers beyond 64 bits
    into floats, so its result is used only when every payload is a string (RingCentral's Base64)."""
    try:
        doc = orjson.loads(body)
        if not only_string_payloads(doc):
            doc = json.loads(body)
        cursor = doc["t"]
        return int(cursor["t"]), int(cursor["r"]), doc.get("m") or []
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MalformedResponse(f"not a subscribe response: {type(e).__name__}") from None


@dataclass
class Poll:
    """One subscribe connection: its channels, where it resumes, and whom it tells."""

    subscribe_key: str
    channels: list[str]
    resume_tt: int
    on_messages: MessagesHandler
    on_status: StatusHandler
    closed: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class _Intake:
    """The thread that hands batches on (the transport serialises them anyway), so that a handler
    waiting (on Kafka's back-pressure, or on a test) never holds up the loop's other connections.
    `AccessDenied` goes the same way, after the connection's batches: its handler calls into the
    worker (reports a gap, asks for a verification) and takes its locks. The other statuses only set
    a flag and count, in the loop (a new connection is `reading` while an older batch is still held).

    A connection polls again as soon as its batch is queued: waiting for each batch to be handed on
    cost a second cross-thread wake-up per poll (435 vs 352 us of CPU per poll, docs/benchmarks.md).
    Memory stays bounded by the queue's length instead."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Poll, Callable[[], None]] | None] = queue.SimpleQueue()
        # A daemon, as the SDK's threads: a handler still waiting must not pin the process at exit.
        threading.Thread(target=self._run, name="pubnub-intake", daemon=True).start()

    async def hand_on(self, poll: Poll, messages: list[dict[str, Any]]) -> None:
        await self._queue(poll, functools.partial(poll.on_messages, messages))

    async def report(self, poll: Poll, category: str, is_error: bool) -> None:
        await self._queue(poll, functools.partial(poll.on_status, category, is_error))

    async def _queue(self, poll: Poll, job: Callable[[], None]) -> None:
        """Queue a job (called in the loop), once fewer than MAX_QUEUED_BATCHES wait."""
        while self._jobs.qsize() >= MAX_QUEUED_BATCHES:  # the handler is behind (Kafka's back-pressure)
            await asyncio.sleep(QUEUE_FULL_RECHECK_SECONDS)
        self._jobs.put((poll, job))

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            poll, job = item
            if poll.closed:
                continue
            try:
                job()
            except Exception:  # pragma: no cover - the handlers must not raise
                log.error("transport.handler_failed", exc_info=True)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to PubNub's origin, (re)opened when a request needs it."""

    def __init__(self, origin: str, tls: ssl.SSLContext | None) -> None:
        host, _, port = origin.rpartition(":")
        if not port.isdigit():  # no port given (`ps.pndsn.com`)
            host, port = origin, ""
        self._host, self._tls = host, tls
        self._port = int(port) if port else (443 if tls else 80)
        self._request = (b"GET %%b HTTP/1.1\r\nHost: %b\r\nUser-Agent: PubNub-Python\r\nAccept: */*\r\n"
                         b"Connection: keep-alive\r\n\r\n" % origin.encode())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, target: str, read_timeout: float) -> tuple[int, bytes]:
        """(status, body) of `GET target`. Raises TimeoutError when the answer takes longer than
        `read_timeout`, NoAnswer when there is none; the connection is closed after either."""
        try:
            reader, writer = await self._connected()
            writer.write(self._request % target.encode())
            async with asyncio.timeout(read_timeout):
                return await self._read_response(reader)
        except TimeoutError:
            self.close()
            raise
        except (OSError, EOFError, ValueError, IndexError, asyncio.LimitOverrunError) as e:
            self.close()
            raise NoAnswer(f"{type(e).__name__}: {e}") from None

    async def _connected(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    self._reader, self._writer = await asyncio.open_connection(
                        self._host, self._port, ssl=self._tls, server_hostname=self._host if self._tls else None)
            except TimeoutError:
                raise NoAnswer("connect timeout") from None
        return self._reader, self._writer

    async def _read_response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split(None, 2)[1])
        length, chunked, gzipped, close = -1, False, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"content-encoding":
                gzipped = value == b"gzip"
            elif name == b"connection":
                close = value == b"close"
        if chunked:
            body = await _read_chunked(reader)
        elif length >= 0:
            body = await reader.readexactly(length)
        else:  # no length: the body ends with the connection
            body, close = await reader.read(), True
        if close:
            self.close()
        return status, gzip.decompress(body) if gzipped else body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append((await reader.readexactly(size + 2))[:-2])
    await reader.readuntil(b"\r\n")  # the empty trailer
    return b"".join(parts)


class LeanClient:
    """Runs every `Poll` on one asyncio loop in one thread, each over its own HTTP connection; batches
    are handed on in a second thread."""

    def __init__(self, settings: PollSettings) -> None:
        self._settings = settings
        self._origin = settings.origin or PNConfiguration().origin
        self._tls = ssl_context() if settings.ssl else None  # the SDK client's: the same CA bundle (certifi)
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._intake: _Intake | None = None

    # ---- called from other threads ---------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._intake = _Intake()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="pubnub-lean", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        """Cancel every poll and close its connection. A batch being handed on may finish; none is handed on
        for a poll closed before (the transport closes every connection first)."""
        if self._thread is None or self._intake is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._intake.stop()
        self._thread = self._intake = None

    def open(self, poll: Poll) -> None:
        self._loop.call_soon_threadsafe(self._spawn, poll)

    def close(self, poll: Poll) -> None:
        """Abort the poll at once (an in-flight long-poll included); it hands nothing on afterwards."""
        poll.closed = True
        self._loop.call_soon_threadsafe(self._cancel, poll)

    # ---- the loop thread -------------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._shutdown())
            self._loop.close()

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, poll: Poll) -> None:
        if not poll.closed:
            poll.task = self._loop.create_task(self._poll_forever(poll))

    @staticmethod
    def _cancel(poll: Poll) -> None:
        if poll.task is not None:
            poll.task.cancel()

    async def _poll_forever(self, poll: Poll) -> None:
        http = HttpConnection(self._origin, self._tls)
        try:
            await self._poll_over(http, poll)
        finally:
            http.close()

    async def _poll_over(self, http: HttpConnection, poll: Poll) -> None:
        path = Subscribe.SUBSCRIBE_PATH % (poll.subscribe_key, join_channels(sorted(poll.channels)))
        prefix = f"{path}?uuid={url_encode(self._settings.user_id)}&pnsdk={_PNSDK}&tt="
        tt, region, failures, answered = poll.resume_tt, None, 0, False
        intake = self._intake
        assert intake is not None  # started
        while not poll.closed:
            target = f"{prefix}{tt}" if region is None else f"{prefix}{tt}&tr={region}"
            try:
                status, body = await http.get(target, self._settings.subscribe_request_timeout)
            except TimeoutError:  # a read timeout: the SDK re-polls at once with the same cursor, silently
                continue
            except NoAnswer:
                status, body = 0, b""
            if status == 403:
                await intake.report(poll, "AccessDenied", True)
                return
            if status == 200:
                try:
                    next_tt, next_region, messages = parse_subscribe_response(body)
                except MalformedResponse:
                    status = -1
                else:
                    if failures or not answered:
                        poll.on_status("Reconnected" if answered else "Connected", False)
                    failures, answered = 0, True
                    await intake.hand_on(poll, messages)
                    tt, region = next_tt, next_region
                    continue
            poll.on_status(_error_category(status), True)
            failures += 1
            await self._reconnect(http, failures)

    async def _reconnect(self, http: HttpConnection, failures: int) -> None:
        """The SDK's reconnect loop: back off, probe `/time/0` until it answers, then poll again."""
        while True:
            interval = self._settings.reconnection_interval
            delay = min(self._settings.maximum_reconnection_interval, interval * 2 ** (failures - 1))
            await asyncio.sleep(delay + random.random())
            try:
                status, _ = await http.get("/time/0", CONNECT_TIMEOUT_SECONDS)
            except (TimeoutError, NoAnswer):
                status = 0
            if status == 200:
                return
            failures += 1


def _error_category(status: int) -> str:
    """The SDK's status category of a failed poll (0: no answer, -1: an answer that did not parse)."""
    if status == 0:
        return "UnexpectedDisconnect"
    if status == -1:
        return "MalformedResponse"
    return "BadRequest" if status == 400 else "Unknown"
