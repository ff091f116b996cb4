"""Kafka output: an idempotent producer, delivery tracking and per-spec acknowledged watermarks.

At-least-once hinges on one rule: a spec's checkpoint only moves over timetokens whose records Kafka
has acknowledged. Each produced record carries its own in-flight entry (the delivery callback), kept
in arrival order per spec; the watermark advances over the acknowledged prefix. A record whose
delivery fails is produced again, never dropped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from ingest.kafka_logs import kafka_log_config
from ingest.logs import get_logger
from ingest.metrics import FamilyMetrics, Metrics
from ingest.pipeline import BAD_BASE64, BAD_LENGTH, BAD_PADDING, SCHEMA_VIOLATION, Outcome
from ingest.transport import Cursor

log = get_logger(__name__)

# Producer settings the guarantees depend on; user properties may tune anything else.
_DECRYPT_REASONS = frozenset({BAD_BASE64, BAD_LENGTH, BAD_PADDING})

REQUIRED_PRODUCER_CONFIG = {"enable.idempotence": "true", "acks": "all"}
DEFAULT_PRODUCER_CONFIG = {"linger.ms": "5", "compression.type": "lz4", "statistics.interval.ms": "0"}
# During an outage every queued record fails its delivery (and fails again after each re-produce):
# one log line per failure would flood the logs. The metric counts each; the log speaks this often.
DELIVERY_FAILURE_LOG_INTERVAL = 10.0


@dataclass(eq=False)  # identity: settling collects the progresses a batch of deliveries touched
class SpecProgress:
    """Delivery progress of one spec: what is in flight and how far Kafka has acknowledged."""

    spec_id: str
    acked_tt: int = 0  # every notification at or below this timetoken is in Kafka
    checkpointed_tt: int = 0  # the newest acked_tt written to the state topic
    produced_tt: int = 0  # exactly-once: newest timetoken produced into the open transaction
    released: bool = False  # handed to another worker: nothing more may be produced for it
    pending: deque[_InFlight] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self) -> None:
        # Delivery reports are served by whichever thread polls the producer (the delivery thread,
        # or the intake thread while it waits on a full queue), so popping is serialised. Appends
        # need no lock: deque ends are thread-safe.
        with self._lock:
            pending = self.pending
            while pending and pending[0].done:
                self.acked_tt = pending.popleft().timetoken


class _InFlight:
    """One produced record, and its own delivery callback (so no lookup on acknowledgement)."""

    __slots__ = ("done", "outcome", "progress", "received_at", "sink", "timetoken")

    def __init__(self, sink: KafkaSink, progress: SpecProgress, outcome: Outcome, timetoken: int,
                 received_at: float) -> None:
        self.sink = sink
        self.progress = progress
        self.outcome = outcome
        self.timetoken = timetoken
        self.received_at = received_at
        self.done = False

    def __call__(self, err: KafkaError | None, _msg: Any) -> None:
        # Called once per record: only queue it; `KafkaSink._settle` accounts for acknowledged
        # records a poll's worth at a time (per record, metrics cost more than the produce).
        if err is None:
            self.sink._acked.append(self)
        else:
            self.sink._delivery_failed(self, err)


class KafkaSink:
    """Produces pipeline outcomes; a background thread serves delivery reports."""

    def __init__(self, producer_config: Mapping[str, str], metrics: Metrics) -> None:
        config = {**DEFAULT_PRODUCER_CONFIG, **producer_config, **REQUIRED_PRODUCER_CONFIG}
        self._producer = Producer({**config, **kafka_log_config()})
        self._metrics = metrics
        self._families: dict[str, FamilyMetrics] = {}
        self._dead_letters: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._failure_log_lock = threading.Lock()
        self._failure_log_due = 0.0
        self._failures_unlogged = 0
        self._acked: deque[_InFlight] = deque()  # acknowledged, not yet accounted for
        self._refused: deque[_InFlight] = deque()  # produce() refused them: retried by the delivery thread
        self._settle_lock = threading.Lock()
        self.acknowledged = 0  # records acknowledged and accounted for since start

    @property
    def producer(self) -> Producer:
        return self._producer

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="kafka-delivery", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        producer, queue_gauge = self._producer, self._metrics.producer_queue
        while not self._stop.is_set():
            try:
                producer.poll(0.05)
                self._settle()
                self._retry_refused()
            except Exception:  # this thread must outlive any one bad report
                log.error("kafka.delivery_thread_error", exc_info=True)
            queue_gauge.set(len(producer))

    def send(self, outcome: Outcome, progress: SpecProgress, timetoken: int, received_at: float,
             *, cursor: Cursor | None = None, epoch: int = 0) -> None:
        """Produce one outcome. `cursor`/`epoch`: the channel's read position when the notification was
        read (only the exactly-once sink, which rewinds channels, looks at them)."""
        entry = _InFlight(self, progress, outcome, timetoken, received_at)
        progress.pending.append(entry)
        self._produce(entry)

    def _produce(self, entry: _InFlight) -> None:
        o = entry.outcome
        while True:
            try:
                self._producer.produce(o.topic, o.value, o.key, headers=o.headers,  # type: ignore[arg-type]
                                       on_delivery=entry)
                return
            except BufferError:
                # The local queue is full (Kafka slow or down): wait for deliveries, keep the message.
                self._producer.poll(0.1)
            except KafkaException as exc:  # refused outright (e.g. its topic was deleted): never drop
                self._on_refused(entry, exc.args[0])
                return

    def _count_failure(self, entry: _InFlight, err: KafkaError) -> None:
        self.last_error = err.name()
        self._metrics.delivery_errors.labels(err.name()).inc()
        self._log_failure(err, entry.outcome.topic)

    def _on_refused(self, entry: _InFlight, err: KafkaError) -> None:
        """Count and log it, and let the delivery thread try again (it stays unacknowledged until then,
        so no checkpoint passes it)."""
        self._count_failure(entry, err)
        self._refused.append(entry)

    def _retry_refused(self) -> None:
        refused = self._refused
        for _ in range(len(refused)):
            self._produce(refused.popleft())

    def _delivery_failed(self, entry: _InFlight, err: KafkaError) -> None:
        self._count_failure(entry, err)
        self._produce(entry)  # never drop: try again (idempotence keeps retries within a session clean)

    def _settle(self) -> None:
        """Account for the acknowledged records: metrics, then each spec's watermark."""
        acked = self._acked
        if not acked:
            return
        with self._settle_lock:  # the delivery thread and flush() both settle
            entries = [acked.popleft() for _ in range(len(acked))]
            self._count_deliveries(entries)
            for entry in entries:
                entry.done = True
            for progress in {entry.progress for entry in entries}:
                progress.advance()
            self.acknowledged += len(entries)
            self.last_error = None

    def _log_failure(self, err: KafkaError, topic: str) -> None:
        """At most one `kafka.delivery_failed` line per interval, with how many were not logged."""
        now = time.monotonic()
        with self._failure_log_lock:
            if now < self._failure_log_due:
                self._failures_unlogged += 1
                return
            suppressed, self._failures_unlogged = self._failures_unlogged, 0
            self._failure_log_due = now + DELIVERY_FAILURE_LOG_INTERVAL
        log.warning("kafka.delivery_failed", error=err.name(), topic=topic, retriable=err.retriable(),
                    suppressed=suppressed)

    def _count_deliveries(self, entries: list[_InFlight]) -> None:
        now = time.time()
        lags: dict[str, list[float]] = {}
        published: dict[str, int] = {}
        dead: dict[tuple[str, str], int] = {}
        for entry in entries:
            o = entry.outcome
            if o.error is None:
                published[o.family] = published.get(o.family, 0) + 1
                if o.event_time is not None:
                    lags.setdefault(o.family, []).append(now - o.event_time)
            else:
                dead[(o.family, o.error)] = dead.get((o.family, o.error), 0) + 1
        for family, count in published.items():
            fam = self._families.get(family)
            if fam is None:
                fam = self._families[family] = FamilyMetrics.for_family(self._metrics, family)
            fam.published.inc(count)
            fam.lag.observe_many(lags.get(family, ()))
        for key, count in dead.items():
            counters = self._dead_letters.get(key)
            if counters is None:
                counters = self._dead_letters[key] = self._dead_letter_counters(*key)
            for counter in counters:
                counter.inc(count)
        self._metrics.internal_latency.observe_many([now - entry.received_at for entry in entries])

    def _dead_letter_counters(self, family: str, reason: str) -> tuple[Any, ...]:
        m = self._metrics
        counters: list[Any] = [m.notifications_dead_lettered.labels(family, reason)]
        if reason in _DECRYPT_REASONS:
            counters.append(m.decrypt_failures.labels(reason))
        elif reason == SCHEMA_VIOLATION:
            counters.append(m.validation_failures.labels(family))
        return tuple(counters)

    def produce_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        """A record outside the notification flow (checkpoints); delivery errors are only counted."""
        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                self._metrics.delivery_errors.labels(err.name()).inc()
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value, key, on_delivery=on_delivery)
                else:
                    self._producer.produce(topic, value, key, partition=partition, on_delivery=on_delivery)
                return
            except BufferError:
                self._producer.poll(0.1)

    def flush(self, timeout: float) -> int:
        """Wait up to `timeout` s for every delivery; returns how many are still undelivered."""
        left = int(self._producer.flush(timeout))
        self._settle()
        return left

    def close(self) -> None:
        """Stop serving reports and release the producer (its threads and connections).

        Callers flush first; whatever is still queued then was never acknowledged, so no checkpoint
        covers it and it is read again after a restart: purge it rather than wait on Kafka again.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self._producer.purge()
        self._producer.close()
