"""A lean PubNub subscribe client: the hot loop of the PubNub transport, without the SDK's machinery.

Every subscribe connection is one coroutine on one asyncio loop (one thread for all of them), holding
one keep-alive HTTP/1.1 connection (aiohttp) and parsing the subscribe JSON itself. The messages of
each answer are handed on in one more thread, in the order they were read, while the loop reads on;
a connection polls again once its batch is handed on (memory stays bounded, as with the SDK). The SDK's threaded
client spent ~7 ms of CPU per long-poll (a thread per request, httpx, endpoint, envelope and status
objects) and ran ~380 OS threads at 2,000 subscriptions; the figures are in docs/benchmarks.md.

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
import json
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from pubnub.endpoints.pubsub.subscribe import Subscribe
from pubnub.pnconfiguration import PNConfiguration
from pubnub.utils import join_channels, url_encode
from yarl import URL

from ingest.observability.logs import get_logger
from ingest.transports.pubnub_sdk import only_string_payloads

log = get_logger(__name__)

# What the client reports of one connection: (the SDK's status category name, whether it is an error).
StatusHandler = Callable[[str, bool], None]
# The messages (`m` entries) of one subscribe answer, as parsed. Must not raise.
MessagesHandler = Callable[[list[dict[str, Any]]], None]

CONNECT_TIMEOUT_SECONDS = 10.0  # the SDK's default `connect_timeout`
_PNSDK = url_encode("PubNub-Python-ingest-lean")


class PollSettings(Protocol):
    """The transport settings the client reads (each poll reads them again: tests shorten timeouts)."""

    user_id: str
    origin: str | None
    ssl: bool
    reconnection_interval: float
    maximum_reconnection_interval: float
    subscribe_request_timeout: int


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
    waiting (on Kafka's back-pressure, or on a test) never holds up the loop's other connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Poll, list[dict[str, Any]], asyncio.Future[None]] | None] = \
            queue.SimpleQueue()
        # A daemon, as the SDK's threads: a handler still waiting must not pin the process at exit.
        threading.Thread(target=self._run, name="pubnub-intake", daemon=True).start()

    def hand_on(self, poll: Poll, messages: list[dict[str, Any]]) -> asyncio.Future[None]:
        """Queue the batch (called in the loop); the future is done once it was handed on."""
        done = self._loop.create_future()
        self._jobs.put((poll, messages, done))
        return done

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            poll, messages, done = job
            if not poll.closed:
                try:
                    poll.on_messages(messages)
                except Exception:  # pragma: no cover - the handler must not raise
                    log.error("transport.handler_failed", exc_info=True, messages=len(messages))
            try:
                self._loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:  # the loop is closed: the client stopped meanwhile
                return


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():  # not cancelled with its poll
        done.set_result(None)


class LeanClient:
    """Runs every `Poll` on one asyncio loop in one thread, over one aiohttp connection pool; batches
    are handed on in a second thread."""

    def __init__(self, settings: PollSettings) -> None:
        self._settings = settings
        origin = settings.origin or PNConfiguration().origin
        self._base = f"{'https' if settings.ssl else 'http'}://{origin}"
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._thread: threading.Thread | None = None
        self._intake: _Intake | None = None

    # ---- called from other threads ---------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._intake = _Intake(self._loop)
        self._thread = threading.Thread(target=self._run, args=(ready,), name="pubnub-lean", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        """Cancel every poll and close the pool. A batch being handed on may finish; none is handed on
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
        self._session = self._loop.run_until_complete(self._new_session())
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._shutdown())
            self._loop.close()

    @staticmethod
    async def _new_session() -> aiohttp.ClientSession:
        # No connection limit: each poll holds its connection for up to a whole long-poll.
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers={"User-Agent": "PubNub-Python"})

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _spawn(self, poll: Poll) -> None:
        if not poll.closed:
            poll.task = self._loop.create_task(self._poll_forever(poll))

    @staticmethod
    def _cancel(poll: Poll) -> None:
        if poll.task is not None:
            poll.task.cancel()

    async def _poll_forever(self, poll: Poll) -> None:
        path = Subscribe.SUBSCRIBE_PATH % (poll.subscribe_key, join_channels(sorted(poll.channels)))
        prefix = f"{self._base}{path}?uuid={url_encode(self._settings.user_id)}&pnsdk={_PNSDK}&tt="
        tt, region, failures, answered = poll.resume_tt, None, 0, False
        while not poll.closed:
            url = f"{prefix}{tt}" if region is None else f"{prefix}{tt}&tr={region}"
            try:
                status, body = await self._get(url, self._settings.subscribe_request_timeout)
            except aiohttp.ConnectionTimeoutError:
                status, body = 0, b""
            except TimeoutError:  # a read timeout: the SDK re-polls at once with the same cursor, silently
                continue
            except aiohttp.ClientError:
                status, body = 0, b""
            if status == 403:
                poll.on_status("AccessDenied", True)
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
                    assert self._intake is not None
                    await self._intake.hand_on(poll, messages)
                    tt, region = next_tt, next_region
                    continue
            poll.on_status(_error_category(status), True)
            failures += 1
            await self._reconnect(failures)

    async def _reconnect(self, failures: int) -> None:
        """The SDK's reconnect loop: back off, probe `/time/0` until it answers, then poll again."""
        while True:
            interval = self._settings.reconnection_interval
            delay = min(self._settings.maximum_reconnection_interval, interval * 2 ** (failures - 1))
            await asyncio.sleep(delay + random.random())
            try:
                status, _ = await self._get(f"{self._base}/time/0", CONNECT_TIMEOUT_SECONDS)
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            if status == 200:
                return
            failures += 1

    async def _get(self, url: str, read_timeout: float) -> tuple[int, bytes]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS, sock_read=read_timeout)
        async with self._session.get(URL(url, encoded=True), timeout=timeout) as response:
            return response.status, await response.read()


def _error_category(status: int) -> str:
    """The SDK's status category of a failed poll (0: no answer, -1: an answer that did not parse)."""
    if status == 0:
        return "UnexpectedDisconnect"
    if status == -1:
        return "MalformedResponse"
    return "BadRequest" if status == 400 else "Unknown"
