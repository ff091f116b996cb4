"""The worker's HTTP port: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness).

Liveness means the process and its loops are alive: each long-running loop beats a `Heartbeats`
entry, and liveness fails when a registered loop has been silent for longer than it may be. A
failing liveness probe makes Kubernetes restart the pod, so it must not depend on anything outside
the process (Kafka, RingCentral): a broker outage would otherwise restart every worker at once.

Readiness means the worker is doing its job: Kafka is reachable and every owned subscription is
active and unexpired (`readiness_check`). A pod that is not ready is taken out of the Service but
keeps running, renewing and retrying.

Both answer 200 `{"status":"ok"}` or 503 `{"status":"fail","reason":"..."}`. Checks run on the
HTTP thread at every probe, so they must be cheap: they read state that the loops maintain
(heartbeat times, the subscription table, Kafka's last answer: `KafkaReachability`), they never do network I/O.
"""

from __future__ import annotations

import errno
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, TypeVar, cast

from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ingest.observability.logs import get_logger, redact
from ingest.observability.metrics import Metrics

log = get_logger(__name__)
_T = TypeVar("_T")

Check = Callable[[], tuple[bool, str]]
"""A health check: (ok, reason). The reason is shown in the 503 body; it must hold no secret."""

MAX_REASONS = 5  # a readiness answer names at most this many failing subscriptions


class Exposition(Protocol):
    """What `/metrics` serves: a worker's `Metrics`, or the registry of `ingest run --processes N`'s parent."""

    @property
    def registry(self) -> CollectorRegistry: ...


class Heartbeats:
    """Liveness of the worker's loops.

    Each loop registers itself with the longest silence it may show (a few times its period) and
    calls `beat(name)` once per iteration. `beat` is a single dict store (atomic under the GIL), so it
    can sit on the hot path.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._allowed: dict[str, float] = {}
        self._lock = threading.Lock()

    def register(self, name: str, max_interval_seconds: float) -> None:
        """Watch loop `name` from now on; registering counts as its first beat."""
        if max_interval_seconds <= 0:
            raise ValueError(f"max_interval_seconds must be positive, got {max_interval_seconds}")
        with self._lock:
            self._last[name] = self._clock()
            self._allowed[name] = max_interval_seconds

    def unregister(self, name: str) -> None:
        """Stop watching `name` (the loop ended on purpose, e.g. during shutdown)."""
        with self._lock:
            self._allowed.pop(name, None)
            self._last.pop(name, None)

    def beat(self, name: str) -> None:
        self._last[name] = self._clock()

    def check(self) -> tuple[bool, str]:
        """Liveness: fails when a registered loop has been silent for longer than it may be."""
        now = self._clock()
        with self._lock:
            allowed = dict(self._allowed)
        stale = []
        for name, limit in sorted(allowed.items()):
            silent = now - self._last.get(name, now)
            if silent > limit:
                stale.append(f"loop {name!r} silent for {silent:.1f}s (allowed {limit:g}s)")
        if stale:
            return False, "; ".join(stale)
        return True, "ok"


SubscriptionRow = tuple[str, str, float | None]
"""(spec_id, state, expires_at as unix time; None before it was first created) of one owned subscription."""


def readiness_check(
    kafka_reachable: Callable[[], bool],
    subscriptions: Callable[[], Iterable[SubscriptionRow] | None],
    *,
    ready_states: Collection[str] = ("active",),
    clock: Callable[[], float] = time.time,
) -> Check:
    """Build the readiness check: Kafka reachable, and every owned subscription ready and unexpired.

    `subscriptions` returns the owned subscriptions as (spec_id, state, expires_at), or None while the
    worker is starting. A worker that owns none is ready (it is a standby for the specs of other
    workers). `ready_states` are the states in which a subscription delivers events (e.g. "renewing":
    a subscription being renewed still works, so readiness does not flap at every renewal).
    """
    states = frozenset(ready_states)

    def check() -> tuple[bool, str]:
        if not kafka_reachable():
            return False, "kafka unreachable"
        rows = subscriptions()
        if rows is None:
            return False, "starting"
        now = clock()
        problems = []
        for spec_id, state, expires_at in rows:
            if expires_at is not None and expires_at <= now:
                problems.append(f"subscription {spec_id} expired {now - expires_at:.0f}s ago ({state})")
            elif state not in states or expires_at is None:
                problems.append(f"subscription {spec_id} is {state}")
        if problems:
            more = len(problems) - MAX_REASONS
            reason = "; ".join(problems[:MAX_REASONS]) + (f" (and {more} more)" if more > 0 else "")
            return False, reason
        return True, "ok"

    return check


class StoppedWaiting(Exception):
    """A stop was requested while a startup step waited for Kafka."""


class KafkaReachability:
    """Whether Kafka answers, as the worker last saw it: a metadata request every few seconds on its
    checkpoint loop, startup steps and transaction calls that time out. Sets `ingest_kafka_up`; the
    readiness probe reads it and never waits on the network."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.ok = False

    def report(self, ok: bool, *, quiet: bool = False) -> None:
        """Record an answer (or its absence); a change is logged unless `quiet` (the first answer at start)."""
        if ok != self.ok and not quiet:  # log transitions only, not every failed request
            log.warning("kafka.reachability_changed", reachable=ok)
        self.ok = ok
        self._metrics.kafka_up.set(1 if ok else 0)

    def check(self, client: Any, topic: str, timeout: float = 3.0) -> bool:
        """One metadata round trip with any confluent-kafka client (the worker's producer: no extra
        connection); records the result and returns it."""
        try:
            client.list_topics(topic, timeout=timeout)
            ok = True
        except Exception:  # KafkaException, or anything the client raises: unreachable either way
            ok = False
        self.report(ok)
        return ok

    def until_answers(self, what: str, step: Callable[[], _T], stop: threading.Event) -> _T:
        """Run a startup step that needs Kafka, retrying with capped backoff while Kafka is unreachable
        (StoppedWaiting once `stop` is set). Meanwhile /healthz stays up and /readyz says why."""
        delay = 1.0
        while True:
            try:
                return step()
            except (KafkaException, TimeoutError) as exc:
                self.ok = False
                self._metrics.kafka_up.set(0)
                error = exc.args[0].name() if exc.args and isinstance(exc.args[0], KafkaError) else str(exc)
                log.warning("kafka.unreachable", step=what, error=error, retry_in=delay)
                if stop.wait(delay):
                    raise StoppedWaiting(f"stopped while waiting for Kafka ({what})") from None
                delay = min(10.0, delay * 2)


REQUEST_DEADLINE_SECONDS = 10.0  # a client has this long, in total, to send its request and read the answer
LISTEN_BACKLOG = 1024  # connections the kernel holds while the accept loop catches up (capped by somaxconn)


class ListenError(Exception):
    """The HTTP port cannot be opened; `setting` names what is at fault: "host" or "port"."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client connection must never keep the process alive
    # The default backlog of 5 overflowed under a burst of 500 connections (kernel ListenOverflows,
    # clients timing out), although each answer takes well under a millisecond.
    request_queue_size = LISTEN_BACKLOG
    health: HealthServer
    request_deadline: float


class _DeadlineReader(io.RawIOBase):
    """The connection's receiving side, with one deadline for all reads together.

    A per-read timeout never cut off a client that sends one byte every few seconds; here every read
    may only wait for what is left of the deadline, so a trickling client is dropped when it passes.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(remaining)  # also bounds the answer's writes to a client that does not read
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + cast(_Server, self.server).request_deadline
        # A timeout on a read that passes the deadline ends the request (handle_one_request closes).
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def do_GET(self) -> None:
        health = cast(_Server, self.server).health
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics(health)
        elif path == "/healthz":
            self._check(health.liveness)
        elif path == "/readyz":
            self._check(health.readiness)
        else:
            self._send(404, "application/json", b'{"status":"fail","reason":"not found"}')

    def _metrics(self, health: HealthServer) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        self._send(200, content_type, encoder(health.metrics.registry))

    def _check(self, check: Check) -> None:
        try:
            ok, reason = check()
        except Exception as exc:  # a broken check is a failed check, never a 500 with a traceback
            ok, reason = False, f"check raised {type(exc).__name__}: {exc}"
        body: dict[str, str] = {"status": "ok"} if ok else {"status": "fail", "reason": redact(reason)}
        self._send(200 if ok else 503, "application/json", json.dumps(body).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request access log: probes and scrapes arrive every few seconds."""


class HealthServer:
    """HTTP server for `/metrics`, `/healthz` and `/readyz`, in a daemon thread.

    `port=0` binds a free port; `port` tells the actual one after `start()`. Each connection is
    served on its own thread and gets `request_deadline` seconds in total, then it is closed.
    """

    def __init__(self, metrics: Exposition, host: str, port: int, *, liveness: Check, readiness: Check,
                 request_deadline: float = REQUEST_DEADLINE_SECONDS) -> None:
        self.metrics = metrics
        self.liveness = liveness
        self.readiness = readiness
        self._host = host
        self._port = port
        self._request_deadline = request_deadline
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        server = self._listen()
        server.health = self
        server.request_deadline = self._request_deadline
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="health-http", daemon=True)
        self._thread.start()
        log.info("health.listening", host=self._host, port=self._port)

    def _listen(self) -> _Server:
        """Bind and listen; `ListenError` names the host or the port at fault, in one line."""
        where = f"{self._host}:{self._port}"
        try:
            return _Server((self._host, self._port), _Handler)
        except socket.gaierror as exc:
            raise ListenError("host", f"cannot listen on {where}: {self._host!r} does not resolve "
                                      f"({exc.strerror})") from None
        except OSError as exc:
            setting = "host" if exc.errno == errno.EADDRNOTAVAIL else "port"  # not an address of this machine
            hint = " (another process listens there: a second worker needs its own port)" \
                if exc.errno == errno.EADDRINUSE else ""
            raise ListenError(setting, f"cannot listen on {where}: {exc.strerror or exc}{hint}") from None

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
