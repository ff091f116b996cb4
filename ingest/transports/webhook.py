"""WebHook intake: RingCentral POSTs each notification to us; it is answered 200 only once Kafka has it.

`WebhookApp` is a WSGI application, served by waitress (`WebhookServer`; docs/benchmarks.md has the
measurement behind the choice: waitress reads a whole request before a worker thread sees it, so slow
clients cost no thread). For each request, in this order:

- POST to the configured path only (404, 405).
- `Validation-Token` on a request without a body: RingCentral's handshake when a subscription is
  created. Answered 200 echoing the header, no body, nothing else done (RingCentral wants it within
  3 s and the whole answer within 1 KiB: a token longer than `MAX_VALIDATION_TOKEN` gets 400).
- A delivery: body at most `max_body_bytes` (413), `Content-Type: application/json` (415). Its
  subscription is the body's `subscriptionId`; the token it carries (`Verification-Token`, or
  `Validation-Token` as the 2023 docs call it) must equal that subscription's, compared in constant
  time; otherwise 403 and Kafka is not touched. A body that is no JSON object naming a subscription
  is authenticated by its token alone (compared with every known token) and becomes a dead letter.
- The accepted notification goes to the `DeliveryHandler`, which returns True once Kafka has
  acknowledged its record (or its dead letter): 200. False (Kafka down or not acknowledging, the
  local queue full, no acknowledgement before the answer deadline): 503 with `Retry-After`.

In the worker the handler is `WebhookTransport`: it hands deliveries to the worker's pipeline as
batches and answers each once the worker acknowledges its position. A retry of a notification (same
subscription and `uuid`) within the de-duplication window is not produced again.

Verification tokens are secrets: registered with the log redactor, never in a repr, log or metric.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import uuid4

import orjson
from confluent_kafka import Consumer
from prometheus_client import Counter, Histogram

from ingest.config import WebhookConfig
from ingest.coordination.compacted import read_latest
from ingest.coordination.keywrap import KeyWrapper, UnwrapError
from ingest.coordination.state import SpecState
from ingest.model import Delivery
from ingest.observability.kafka_logs import kafka_log_config
from ingest.observability.logs import get_logger, register_secret
from ingest.observability.metrics import Metrics
from ingest.transports.base import BatchHandler, Received

log = get_logger(__name__)

# WSGI names of the headers that may carry a delivery's token (API definitions, then the 2023 docs).
TOKEN_HEADERS = ("HTTP_VERIFICATION_TOKEN", "HTTP_VALIDATION_TOKEN")
HANDSHAKE_HEADER = "Validation-Token"
MAX_VALIDATION_TOKEN = 512  # echoed: the handshake answer stays far below RingCentral's 1024 bytes
DEFAULT_MAX_BODY_BYTES = 256 * 1024
DEFAULT_ANSWER_TIMEOUT = 2.0  # RingCentral gives 3 s; the answer must be on its way before that
DEFAULT_RETRY_AFTER = 5
DEFAULT_DEDUP_WINDOW = 600.0
DEFAULT_DEDUP_ENTRIES = 100_000
DEFAULT_MAX_QUEUED = 10_000
ANSWER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)
INTAKE_BATCH = 500  # requests handed on together at most
_TIMETOKEN_PER_SECOND = 10_000_000  # PubNub's unit (100 ns): WebHook records carry their receive time in it


@dataclass(frozen=True)
class WebhookSubscription:
    """What a delivery for one RingCentral subscription is checked against and recorded under."""

    subscription_id: str
    spec_id: str
    account_id: str
    verification_token: str = field(repr=False)  # a secret


class SubscriptionTable:
    """subscription id -> `WebhookSubscription`, shared by the control plane (writes) and the receiver."""

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[WebhookSubscription, bytes]] = {}
        self._by_spec: dict[str, str] = {}  # spec id -> its current subscription id
        self._lock = threading.Lock()
        self.removed: Callable[[str], None] = lambda subscription_id: None  # told each id removed

    def put(self, subscription: WebhookSubscription) -> None:
        register_secret(subscription.verification_token)
        token = subscription.verification_token.encode("utf-8")
        with self._lock:
            self._by_id = {**self._by_id, subscription.subscription_id: (subscription, token)}  # copy-on-write

    def remove(self, subscription_id: str) -> None:
        with self._lock:
            self._by_id = {k: v for k, v in self._by_id.items() if k != subscription_id}
        self.removed(subscription_id)

    def apply(self, spec_id: str, delivery: Delivery | None) -> None:
        """The control plane's word for a spec (`SubscriptionManager.on_delivery`): its current WebHook
        subscription replaces the previous one; None (spec removed) forgets it."""
        self.set_spec(spec_id, None if delivery is None or not delivery.verification_token else WebhookSubscription(
            delivery.subscription_id, spec_id, delivery.account_id, delivery.verification_token))

    def set_spec(self, spec_id: str, subscription: WebhookSubscription | None) -> None:
        """A spec's current subscription (None: none) replaces the one recorded for it before."""
        with self._lock:
            previous = self._by_spec.pop(spec_id, None)
            if subscription is not None:
                self._by_spec[spec_id] = subscription.subscription_id
        if previous is not None and (subscription is None or previous != subscription.subscription_id):
            self.remove(previous)
        if subscription is not None:
            self.put(subscription)

    def __len__(self) -> int:
        return len(self._by_id)

    def authenticate(self, subscription_id: object, token: bytes | None) -> WebhookSubscription | None:
        """The subscription if `token` is its verification token (constant-time comparison), else None."""
        if token is None or not isinstance(subscription_id, str):
            return None
        known = self._by_id.get(subscription_id)
        if known is None:
            return None
        return known[0] if hmac.compare_digest(known[1], token) else None

    def by_token(self, token: bytes | None) -> WebhookSubscription | None:
        """The subscription whose token `token` is, comparing with every one (for bodies that name none)."""
        if token is None:
            return None
        found = None
        for subscription, expected in self._by_id.values():
            if hmac.compare_digest(expected, token) and found is None:  # no early exit: time does not tell which
                found = subscription
        return found


@dataclass(frozen=True)
class WebhookDelivery:
    """One authenticated delivery, as received."""

    subscription: WebhookSubscription
    body: bytes
    uuid: str | None
    received_at: float  # unix time


class DeliveryHandler(Protocol):
    """Stores a delivery; True once Kafka acknowledged it (answer 200), False if it cannot say so
    before `deadline` (time.monotonic()) or will not take it now (answer 503)."""

    def __call__(self, delivery: WebhookDelivery, deadline: float) -> bool: ...


class StateTableFeed:
    """Keeps a `SubscriptionTable` in step with the compacted state topic, so that any pod behind a
    Service can check any delivery: creation and renewal stay with the spec's owner, which records
    each subscription's token there (wrapped: `ingest.keywrap`, associated data spec id and
    subscription id). `start` loads the table up to the topic's current end (`ready()` after), then
    a thread follows the topic; a tombstone removes the spec."""

    def __init__(self, consumer_config: Mapping[str, str], topic: str, table: SubscriptionTable,
                 wrapper: KeyWrapper) -> None:
        self._config = dict(consumer_config)
        self._topic = topic
        self._table = table
        self._wrapper = wrapper
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self, timeout: float = 30.0) -> None:
        for spec_id, value in read_latest(self._config, self._topic, timeout=timeout).items():
            self.apply(spec_id, value)
        self._ready.set()
        self._thread = threading.Thread(target=self._follow, name="webhook-state-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def apply(self, spec_id: str, value: bytes | None) -> None:
        """One state record (None: a tombstone)."""
        if value is None:
            self._table.set_spec(spec_id, None)
            return
        try:
            state = SpecState.decode(value)
        except (ValueError, TypeError):
            log.warning("webhook.state_undecodable", spec=spec_id)
            return
        if not state.wrapped_verification_token:
            return  # a PubNub spec, or one not created yet
        try:
            token = self._wrapper.unwrap(state.wrapped_verification_token, spec_id, state.subscription_id)
        except UnwrapError:
            log.warning("webhook.token_unwrap_failed", spec=spec_id, subscription_id=state.subscription_id)
            return
        self._table.set_spec(spec_id, WebhookSubscription(state.subscription_id, spec_id, state.account_id, token))

    def _follow(self) -> None:
        # From the beginning again: applying a record twice changes nothing, and nothing written
        # between the initial load and this subscription is missed.
        consumer = Consumer({**self._config, **kafka_log_config(), "group.id": f"ingest-webhook-table-{uuid4()}",
                             "enable.auto.commit": "false", "auto.offset.reset": "earliest",
                             "isolation.level": "read_committed"})
        consumer.subscribe([self._topic])
        try:
            while not self._stop.is_set():
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                key = msg.key()
                if key is not None:
                    self.apply(key.decode(), msg.value())
        except Exception:  # the table keeps its last state; readiness is the caller's to report
            log.error("webhook.state_feed_failed", exc_info=True)
        finally:
            consumer.close()


class WebhookMetrics:
    """The receiver's own metrics, in the worker's registry."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.requests = Counter("ingest_webhook_requests_total", "WebHook requests answered, by HTTP status.",
                                ["code"], registry=r)
        self.answer_seconds = Histogram("ingest_webhook_answer_seconds",
                                        "Time from a WebHook request's arrival to its answer, by HTTP status.",
                                        ["code"], buckets=ANSWER_BUCKETS, registry=r)


_REASONS = {200: "200 OK", 400: "400 Bad Request", 403: "403 Forbidden", 404: "404 Not Found",
            405: "405 Method Not Allowed", 413: "413 Content Too Large", 415: "415 Unsupported Media Type",
            503: "503 Service Unavailable"}
_Answer = tuple[int, list[tuple[str, str]]]


class WebhookApp:
    """The WSGI application; see the module docstring for what each answer means."""

    def __init__(self, *, path: str, table: SubscriptionTable, handler: DeliveryHandler, metrics: Metrics,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, answer_timeout: float = DEFAULT_ANSWER_TIMEOUT,
                 retry_after: int = DEFAULT_RETRY_AFTER) -> None:
        self.path = path
        self.table = table
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.answer_timeout = answer_timeout
        self.retry_after = str(retry_after)
        self._metrics = WebhookMetrics(metrics)
        self._counters = {code: self._metrics.requests.labels(str(code)) for code in _REASONS}
        self._timers = {code: self._metrics.answer_seconds.labels(str(code)) for code in _REASONS}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        arrived = time.monotonic()
        code, headers = self._answer(environ, arrived)
        start_response(_REASONS[code], [*headers, ("Content-Length", "0")])
        self._counters[code].inc()
        self._timers[code].observe(time.monotonic() - arrived)
        return [b""]

    def _answer(self, environ: dict[str, Any], arrived: float) -> _Answer:
        if environ.get("PATH_INFO") != self.path:
            return 404, []
        if environ.get("REQUEST_METHOD") != "POST":
            return 405, [("Allow", "POST")]
        length = _content_length(environ)
        if length is None or length > self.max_body_bytes:
            return 413, []
        handshake = environ.get("HTTP_VALIDATION_TOKEN")
        if handshake is not None and length == 0:
            return _handshake(handshake)
        return self._delivery(environ, length, arrived)

    def _delivery(self, environ: dict[str, Any], length: int, arrived: float) -> _Answer:
        media_type = str(environ.get("CONTENT_TYPE") or "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return 415, []
        body = environ["wsgi.input"].read(length)
        return self._deliver(environ, body, arrived)

    def _deliver(self, environ: dict[str, Any], body: bytes, arrived: float) -> _Answer:
        token = _token(environ)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("subscriptionId"), str):
            subscription = self.table.authenticate(doc["subscriptionId"], token)
            uuid = doc.get("uuid")
        else:  # unreadable: it can only be tied to a subscription by its token, then it becomes a dead letter
            subscription, uuid = self.table.by_token(token), None
        if subscription is None:
            return 403, []
        delivery = WebhookDelivery(subscription, body, uuid if isinstance(uuid, str) else None, time.time())
        if self.handler(delivery, arrived + self.answer_timeout):
            return 200, []
        return 503, [("Retry-After", self.retry_after)]


def _handshake(token: str) -> _Answer:
    """RingCentral's validation request: echo its token (Kafka is not involved)."""
    if len(token) > MAX_VALIDATION_TOKEN:
        return 400, []
    return 200, [(HANDSHAKE_HEADER, token), ("Content-Type", "application/json")]


def _content_length(environ: dict[str, Any]) -> int | None:
    """The body's length; None when it is not a plain decimal (answered as too large: never read)."""
    text = str(environ.get("CONTENT_LENGTH") or "0").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else None


def _token(environ: dict[str, Any]) -> bytes | None:
    for name in TOKEN_HEADERS:
        value = environ.get(name)
        if value is not None:
            return str(value).encode("latin-1", "replace")  # WSGI hands header bytes over as latin-1 text
    return None


class WebhookServer:
    """Serves a `WebhookApp` with waitress on a thread of its own (not the metrics port)."""

    def __init__(self, app: WebhookApp, host: str, port: int, *, threads: int = 16, connection_limit: int = 1000,
                 channel_timeout: int = 30) -> None:
        self.app = app
        self._options = {"host": host, "port": port, "threads": threads, "connection_limit": connection_limit,
                         # idle (or stalled) connections are closed after this; a slow sender holds no thread
                         "channel_timeout": channel_timeout, "max_request_body_size": app.max_body_bytes,
                         "ident": "ingest", "asyncore_use_poll": True, "clear_untrusted_proxy_headers": True}
        self._map: dict[int, Any] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    def listening(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        from waitress.server import create_server

        # waitress warns on every request that waits for a free thread; the answer-time histogram says it
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self._server = create_server(self.app, map=self._map, **self._options)
        self._thread = threading.Thread(target=self._server.run, name="webhook-http", daemon=True)
        self._thread.start()
        log.info("webhook.listening", host=self._options["host"], port=self.port, path=self.app.path)

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is None:
            return
        from waitress import wasyncore

        self._server.close()
        self._server.task_dispatcher.shutdown(timeout=timeout)
        wasyncore.close_all(self._map)  # open connections too: the loop ends when its map is empty
        if self._thread is not None:
            self._thread.join(timeout)


class _Stream:
    """A WebHook channel's read state: positions handed on, and how far the worker acknowledged."""

    __slots__ = ("acked", "cond", "epoch", "last_position", "removed")

    def __init__(self, resume: int) -> None:
        self.epoch = 0
        self.last_position = resume
        self.acked = resume
        self.removed = False
        self.cond = threading.Condition()

    def next_position(self, received_at: float) -> int:
        """The receive time in 100 ns, strictly increasing along the channel (cond held)."""
        self.last_position = max(self.last_position + 1, int(received_at * _TIMETOKEN_PER_SECOND))
        return self.last_position


class WebhookTransport:
    """The receiver as an intake behind `transports/base.py`. A channel is a subscription id; a request
    is handed on as one `Received` (payload: the body's bytes, position its receive time) by one intake
    thread, in arrival order, and held until the worker calls `acknowledged` past its position
    (durable in Kafka with its checkpoint; exactly-once: committed): 200. 503 when the deadline passes
    first, when the channel is not read here (yet; in a group, a channel of a spec another worker
    owns is read here from its first delivery: `read_foreign`), when Kafka is unreachable or the intake queue full,
    or when the channel is rewound or removed meanwhile (the sender retries: nothing to replay here).
    A retry of a notification (channel, `uuid`) within the de-duplication window is not handed on
    again: it waits for the first copy's acknowledgement."""

    def __init__(self, settings: WebhookConfig, handler: BatchHandler, metrics: Metrics, *,
                 kafka_reachable: Callable[[], bool] = lambda: True) -> None:
        self.table = SubscriptionTable()
        self._handler = handler
        self._metrics = metrics
        self._kafka_reachable = kafka_reachable
        self._settings = settings
        self._streams: dict[str, _Stream] = {}
        # (channel, uuid) -> (position, the stream and its epoch when handed on, expiry (monotonic))
        self._recent: OrderedDict[tuple[str, str], tuple[int, _Stream, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._intake: queue.Queue[tuple[Received, float] | None] = queue.Queue(settings.max_queued_records)
        self._intake_thread: threading.Thread | None = None
        # Group mode: read the channel of a spec another worker owns when a delivery for it arrives here
        # (the table knows every pod's subscriptions); None: only this worker's channels are read.
        self.read_foreign: Callable[[WebhookSubscription], None] | None = None
        app = WebhookApp(path=settings.path, table=self.table, handler=self._deliver, metrics=metrics,
                         max_body_bytes=settings.max_body_bytes, answer_timeout=settings.answer_timeout_seconds,
                         retry_after=settings.retry_after_seconds)
        self.server = WebhookServer(app, settings.host, settings.port, threads=settings.threads)

    # ---- Transport ----------------------------------------------------------------------------
    def start(self) -> None:
        self._intake_thread = threading.Thread(target=self._hand_on, name="webhook-intake", daemon=True)
        self._intake_thread.start()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()  # no new requests; those held get no answer (the sender retries them)
        self._intake.put(None)
        if self._intake_thread is not None:
            self._intake_thread.join(5)

    def add_channel(self, source: str, channel: str, resume: int | None = None) -> None:
        with self._lock:
            if channel not in self._streams:
                self._streams[channel] = _Stream(resume or 0)

    def remove_channel(self, channel: str) -> None:
        with self._lock:
            stream = self._streams.pop(channel, None)
        if stream is not None:
            with stream.cond:
                stream.removed = True
                stream.cond.notify_all()

    def rewind(self, channel: str, position: int | None) -> None:
        stream = self._streams.get(channel)
        if stream is not None:
            with stream.cond:  # what was handed on after `position` is answered 503: the sender retries it
                stream.epoch += 1
                stream.cond.notify_all()

    def position(self, channel: str) -> int | None:
        stream = self._streams.get(channel)
        return None if stream is None else stream.last_position

    def resume_state(self, channel: str, position: int) -> dict[str, Any] | None:
        """None: nothing to resume from (the sender retries what was not answered 200)."""
        return None

    def caught_up_at(self, channel: str) -> float | None:
        # Nothing waits unread at RingCentral for a WebHook channel: what is not answered 200 is retried.
        return time.monotonic() if channel in self._streams else None

    def reading(self) -> set[str]:
        return set(self._streams) if self.server.listening() else set()

    def acknowledged(self, channel: str, position: int) -> None:
        stream = self._streams.get(channel)
        if stream is not None and position > stream.acked:
            with stream.cond:
                stream.acked = max(stream.acked, position)
                stream.cond.notify_all()

    # ---- requests -----------------------------------------------------------------------------
    def _deliver(self, delivery: WebhookDelivery, deadline: float) -> bool:
        channel = delivery.subscription.subscription_id
        stream = self._streams.get(channel)
        if stream is None and self.read_foreign is not None:
            self.read_foreign(delivery.subscription)
            stream = self._streams.get(channel)
        if stream is None or not self._kafka_reachable():
            return False  # not read here (starting, handed over) or Kafka down: come back later
        key = (channel, delivery.uuid) if delivery.uuid else None
        with stream.cond:
            seen = self._seen(key, stream)
            if seen is not None:  # RingCentral sent it again: wait for the first copy, do not hand it on twice
                self._metrics.notifications_duplicate.inc()
                position, epoch = seen, stream.epoch
            else:
                position, epoch = stream.next_position(delivery.received_at), stream.epoch
                received = Received(channel, position, delivery.body, stream, epoch)
                try:
                    self._intake.put_nowait((received, delivery.received_at))
                except queue.Full:
                    return False
                self._remember(key, position, stream, epoch)
            while stream.acked < position:
                left = deadline - time.monotonic()
                if left <= 0 or stream.removed or stream.epoch != epoch:
                    return False
                stream.cond.wait(left)
        return True

    def _seen(self, key: tuple[str, str] | None, stream: _Stream) -> int | None:
        """The position of the first copy, if it was handed on in the stream's current epoch. A copy
        handed on before a rewind (exactly-once: its transaction aborted) or to a stream since removed
        is not in Kafka, or not known to be: the retry is handed on again. Waiting for the stream's
        acknowledgement past the old position answered it 200 with nothing stored."""
        if key is None:
            return None
        with self._lock:
            now = time.monotonic()
            recent = self._recent
            while recent and next(iter(recent.values()))[3] <= now:
                recent.popitem(last=False)
            seen = recent.get(key)
        if seen is None or seen[1] is not stream or seen[2] != stream.epoch:
            return None
        return seen[0]

    def _remember(self, key: tuple[str, str] | None, position: int, stream: _Stream, epoch: int) -> None:
        if key is not None:
            with self._lock:
                self._recent[key] = (position, stream, epoch, time.monotonic() + self._settings.dedup_window_seconds)
                self._recent.move_to_end(key)  # kept in expiry order (a retry after a rewind is remembered anew)

    def _hand_on(self) -> None:
        """One thread hands requests on in arrival order, a batch of whatever has queued meanwhile."""
        while (item := self._intake.get()) is not None:
            batch, received_at = [item[0]], item[1]
            while len(batch) < INTAKE_BATCH:
                try:
                    more = self._intake.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._intake.put(None)
                    break
                batch.append(more[0])
            self._handler(batch, received_at)
