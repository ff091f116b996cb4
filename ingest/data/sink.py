"""Kafka output: an idempotent producer, delivery tracking and per-spec acknowledged watermarks.

At-least-once hinges on one rule: a spec's checkpoint only moves over timetokens whose records Kafka
has acknowledged. Each produced record carries its own in-flight entry (the delivery callback), kept
in arrival order per spec; the watermark advances over the acknowledged prefix.

Order per spec: the producer never times a record out (`message.timeout.ms=0`), so through an outage
of any length the idempotent producer delivers each partition in the order it was given, while a
full local queue makes intake wait. What still fails is permanent (record too large, authorization,
topic gone): the spec is then held. Its failed records and every newer one wait in the sink, in
order; the delivery thread retries the oldest alone every `RETRY_INTERVAL`, and once Kafka takes it,
produces the rest in order. Nothing is dropped, and no checkpoint passes a held record.

Delivery callbacks run inside librdkafka's poll: they only record the outcome. Producing or polling
from inside one re-enters the client (RecursionError, then librdkafka's CallState assertion aborts
the process), so all re-producing happens on the delivery thread.

A fatal producer error (the idempotent producer cannot keep its guarantees: sequence desynchronised
with the broker, `enable.gapless.guarantee` after a permanent error, ...) ends this producer: every
later produce is refused with `_FATAL`. confluent-kafka never hands it to an `error_cb`: the poll (or
flush) that serves it raises it, on whichever thread polls. The at-least-once sink records it in
`fatal_error` and the worker stops (`Worker.failed`, `ingest run` exits 3); started again, it resumes from
its checkpoints, none of which passed an unacknowledged record (docs/faults.md says why it does not
replace the producer instead). A producer that knows no broker for 30 s (librdkafka#5301: it never
reconnects; `ingest.observability.kafka_stats`) is treated the same way, in both guarantees.

Closing: librdkafka's close (`Producer.close()`: abort an open transaction, flush, destroy) waits on
Kafka without a time limit, so a producer is closed on a thread of its own (`close_producer`) and
the stop waits for it at most `CLOSE_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from ingest.data.crypto import BAD_BASE64, BAD_LENGTH, BAD_PADDING
from ingest.data.pipeline import SCHEMA_VIOLATION, Outcome
from ingest.observability.kafka_logs import kafka_log_config
from ingest.observability.kafka_stats import BrokerWatch, watch_config
from ingest.observability.logs import get_logger
from ingest.observability.metrics import FamilyMetrics, Metrics

log = get_logger(__name__)

# Producer settings the guarantees depend on; user properties may tune anything else.
_DECRYPT_REASONS = frozenset({BAD_BASE64, BAD_LENGTH, BAD_PADDING})

# One produce request in flight per broker connection. With more, a request whose fate the producer
# cannot know (no answer: timed out, connection cut) can be followed by a later one that succeeds; a
# broker that has no state yet for the producer on that partition (a new partition, or state expired)
# accepts that later batch although its sequence does not start at 0, and librdkafka then takes the
# earlier records as delivered too ("implicitly acked by subsequent batch success", without an offset)
# or gives the producer up. On a loaded machine that lost the first 1-3 notifications of a new topic
# (docs/faults.md). With one in flight the unanswered request is sent again before any later one.
REQUIRED_PRODUCER_CONFIG = {"enable.idempotence": "true", "acks": "all", "max.in.flight.requests.per.connection": "1"}
# At-least-once: a record that timed out could only be produced again behind newer records (order
# lost), so records never time out; intake waits on the full queue instead (back-pressure).
# `delivery.timeout.ms` is the same property under another name.
NEVER_TIME_OUT = {"message.timeout.ms": "0"}
DEFAULT_PRODUCER_CONFIG = {"linger.ms": "5", "compression.type": "lz4", "statistics.interval.ms": "0"}
DEFAULT_QUEUE_MESSAGES = 100_000  # librdkafka's queue.buffering.max.messages
# During an outage every queued record fails its delivery (and fails again after each re-produce):
# one log line per failure would flood the logs. The metric counts each; the log speaks this often.
DELIVERY_FAILURE_LOG_INTERVAL = 10.0
# A held spec's oldest record is tried again this often (a permanent error would otherwise spin).
RETRY_INTERVAL = 1.0
# How long the stop waits for the producers to close. Kafka down, the close of a transactional
# producer (its abort) never returned. Within the supervisor's STOP_SLACK_SECONDS (12 s) after the
# flush, beside the last checkpoints (FINAL_CHECKPOINT_SECONDS, 5 s).
CLOSE_TIMEOUT_SECONDS = 3.0
# The thread that closes a producer once a hung call on it returns (exactly-once: `send_offsets_to_transaction`
# or `commit_transaction` seen blocked for good after a broker restart); the producer lives as long as it waits.
CLOSE_AFTER_HUNG_CALL = "kafka-producer-close-after-hung-call"
# Producer.close() warns (a raw RuntimeWarning line on stderr, beside the JSON log) when its abort fails:
# expected for a replaced producer, fenced by its replacement; what it held is read again anyway.
warnings.filterwarnings("ignore", message="Producer (abort_transaction|flush) failed during close",
                        category=RuntimeWarning)


@dataclass(eq=False)  # identity: settling collects the progresses a batch of deliveries touched
class SpecProgress:
    """Delivery progress of one spec: what is in flight and how far Kafka has acknowledged."""

    spec_id: str
    acked_tt: int = 0  # every notification at or below this timetoken is in Kafka
    checkpointed_tt: int = 0  # the newest acked_tt written to the state topic
    produced_tt: int = 0  # exactly-once: newest timetoken produced into the open transaction
    released: bool = False  # handed to another worker: nothing more may be produced for it
    # Notifications read since the spec's last state record (approximate: the hot path adds per batch,
    # the checkpoint thread resets it without a lock); it only sets how soon the next record comes.
    unrecorded: int = 0
    pending: deque[_InFlight] = field(default_factory=deque)
    # A record failed for good: newer records wait behind it (entry.waiting) until the delivery
    # thread has produced them all again, in order. Set and cleared under `_lock`.
    held: bool = False
    probe: _InFlight | None = None  # the oldest waiting record, tried alone while Kafka refuses it
    retry_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self) -> None:
        # The delivery thread pops while the worker's final flush settles too, so popping is
        # serialised. Appends need no lock: deque ends are thread-safe.
        with self._lock:
            pending = self.pending
            while pending and pending[0].done:
                self.acked_tt = pending.popleft().timetoken


class _InFlight:
    """One produced record, and its own delivery callback (so no lookup on acknowledgement)."""

    __slots__ = ("done", "outcome", "progress", "received_at", "sink", "timetoken", "waiting")

    def __init__(self, sink: KafkaSink, progress: SpecProgress, outcome: Outcome, timetoken: int,
                 received_at: float) -> None:
        self.sink = sink
        self.progress = progress
        self.outcome = outcome
        self.timetoken = timetoken
        self.received_at = received_at
        self.done = False
        self.waiting = False  # held in the sink, not in the producer: the delivery thread produces it

    def __call__(self, err: KafkaError | None, _msg: Any) -> None:
        # Called once per record, inside librdkafka's poll: only record the outcome. `_settle`
        # accounts for acknowledged records a poll's worth at a time (per record, metrics cost more
        # than the produce); the delivery thread deals with failures.
        if err is None:
            self.sink._acked.append(self)
        else:
            self.sink._delivery_failed(self, err)


class KafkaSink:
    """Produces pipeline outcomes; a background thread serves delivery reports and retries."""

    required_config = {**REQUIRED_PRODUCER_CONFIG, **NEVER_TIME_OUT}

    def __init__(self, producer_config: Mapping[str, str], metrics: Metrics) -> None:
        config = {**DEFAULT_PRODUCER_CONFIG, **producer_config, **self.required_config}
        # A replacement producer is made alike (the watch then follows the replacement).
        watch = BrokerWatch("producer", self._without_brokers)
        self._producer_config = {**config, **kafka_log_config(), **watch_config(watch)}
        self._producer = Producer(self._producer_config)
        self._metrics = metrics
        self._families: dict[str, FamilyMetrics] = {}
        self._dead_letters: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure_log_lock = threading.Lock()
        self._failure_log_due = 0.0
        self._failures_unlogged = 0
        self._acked: deque[_InFlight] = deque()  # acknowledged, not yet accounted for
        self._failures: deque[tuple[_InFlight, KafkaError]] = deque()  # failed or refused, not yet held
        self._held: set[SpecProgress] = set()  # specs with waiting records (delivery thread only)
        # Records waiting in held specs, bounded like the producer's own queue: past it, intake waits.
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._max_waiting = int(config.get("queue.buffering.max.messages", DEFAULT_QUEUE_MESSAGES))
        self._settle_lock = threading.Lock()
        self.acknowledged = 0  # records acknowledged and accounted for since start
        self.fatal_error: str | None = None  # the producer's fatal error: the worker must stop (at-least-once)
        self._closing: list[threading.Thread] = []  # closes of producers this sink replaced (TransactionalSink)

    @property
    def producer(self) -> Producer:
        return self._producer

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="kafka-delivery", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        queue_gauge = self._metrics.producer_queue
        while not self._stop.is_set():
            try:
                self._poll(0.05)
                self._settle()
                self._hold_failed()
                if self.fatal_error is None:  # a failed producer refuses every record: retrying only logs
                    self._retry_held()
            except Exception:  # this thread must outlive any one bad report
                log.error("kafka.delivery_thread_error", exc_info=True)
            queue_gauge.set(len(self._producer))  # the exactly-once sink may have replaced it meanwhile

    def send(self, outcome: Outcome, progress: SpecProgress, timetoken: int, received_at: float) -> None:
        """Produce one outcome; `timetoken` is the notification's position on its channel."""
        entry = _InFlight(self, progress, outcome, timetoken, received_at)
        if progress.held and self._wait_behind_held(entry, progress):
            return
        progress.pending.append(entry)
        self._produce(entry)

    def _wait_behind_held(self, entry: _InFlight, progress: SpecProgress) -> bool:
        """Queue the entry behind its spec's held records; False if the hold was just lifted. While
        as many records wait as the producer's queue holds, intake waits (back-pressure, as on a full
        queue) instead of growing memory without bound."""
        while progress.held and self._waiting >= self._max_waiting:
            if self._stop.wait(0.05):
                break
        with progress._lock:  # the delivery thread lifts a hold under this lock
            if not progress.held:
                return False
            self._mark_waiting(entry, True)
            progress.pending.append(entry)
            return True

    def _mark_waiting(self, entry: _InFlight, waiting: bool) -> None:
        if entry.waiting != waiting:
            entry.waiting = waiting
            with self._waiting_lock:
                self._waiting += 1 if waiting else -1

    def _produce(self, entry: _InFlight) -> None:
        """Intake: produce, waiting while the local queue is full (Kafka slow or down: back-pressure)."""
        while self._try_produce(entry) is None:
            self._poll(0.1)  # callbacks only record, so serving them here is safe

    def _poll(self, timeout: float) -> None:
        producer = self._producer
        try:
            self._serving_reports(lambda: producer.poll(timeout))
        except RuntimeError:  # "Producer has been closed"
            if producer is self._producer:
                raise
            # Replaced and closed meanwhile (TransactionalSink): what it held was purged, nothing to serve.

    def _serving_reports(self, serve: Callable[[], int]) -> int:
        """Call `serve` (a poll or flush of the producer) and return what it returns; a fatal producer
        error it raises goes to `_producer_failed` (then: the records still in the producer)."""
        try:
            return serve()
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not error.fatal():
                raise
            self._producer_failed(error)
            return len(self._producer)

    def _producer_failed(self, error: KafkaError) -> None:
        """The producer failed for good (raised once, by the poll that served it). At-least-once: the
        worker stops and is started again, resuming from its checkpoints."""
        if self.fatal_error is None:
            self.fatal_error = f"kafka producer fatal error {error.name()}: {error.str()}"
            log.error("kafka.producer_fatal_error", error=error.name(), reason=error.str())

    def _without_brokers(self, reason: str) -> None:
        """The producer knows no broker and never will again (librdkafka#5301, see kafka_stats): as a
        fatal error, for both guarantees, the worker stops and is started again from its checkpoints.
        Called from the poll that served the statistics: only record."""
        if self.fatal_error is None:
            self.fatal_error = reason

    def _delivery_failed(self, entry: _InFlight, err: KafkaError) -> None:
        """Record a failed or refused record (possibly inside a delivery callback: nothing more)."""
        self._failures.append((entry, err))

    def _count_failure(self, entry: _InFlight, err: KafkaError) -> None:
        self._metrics.delivery_errors.labels(err.name()).inc()
        self._log_failure(err, entry.outcome.topic)

    def _hold_failed(self) -> None:
        """Delivery thread: hold the specs of the records that failed; they wait in the sink, in
        order, unacknowledged (so no checkpoint passes them), and are retried by `_retry_held`."""
        failed = self._failures
        if not failed:
            return
        touched: set[SpecProgress] = set()
        retry_at = time.monotonic() + RETRY_INTERVAL
        for _ in range(len(failed)):
            entry, err = failed.popleft()
            self._count_failure(entry, err)
            self._mark_waiting(entry, True)
            touched.add(entry.progress)
        for progress in touched:
            with progress._lock:
                progress.held = True
                progress.retry_at = retry_at
                if progress.probe is None or progress.probe.done:
                    progress.probe = next(e for e in list(progress.pending) if e.waiting)
            self._held.add(progress)

    def _retry_held(self) -> None:
        now = time.monotonic()
        for progress in list(self._held):
            released = self._retry_spec(progress, now)
            if released is None:
                return  # the local queue is full: try again after the next poll
            if released:
                self._held.discard(progress)

    def _retry_spec(self, progress: SpecProgress, now: float) -> bool | None:
        """One step for a held spec: its oldest waiting record alone until Kafka has taken it, then
        all the waiting ones in order. True: the hold is lifted; None: the local queue is full."""
        probe = progress.probe
        if probe is not None and not probe.done:
            if probe.waiting and now >= progress.retry_at:
                return None if self._try_produce(probe) is None else False
            return False  # in flight, or failed again and not yet due
        with progress._lock:  # intake queues behind the hold under this lock: none slips past
            for entry in list(progress.pending):
                if entry.waiting:
                    sent = self._try_produce(entry)
                    if not sent:
                        return sent  # full (None), or refused (False: held again by `_hold_failed`)
            progress.held = False
            progress.probe = None
        return True

    def _try_produce(self, entry: _InFlight) -> bool | None:
        """Produce once, never wait. True: queued; None: the queue is full (it stays waiting); False:
        refused outright, e.g. its topic was deleted (recorded as failed: never dropped)."""
        o = entry.outcome
        try:
            self._producer.produce(o.topic, o.value, o.key, headers=o.headers,  # type: ignore[arg-type]
                                   on_delivery=entry)
        except BufferError:
            return None
        except KafkaException as exc:
            self._delivery_failed(entry, exc.args[0])
            self._mark_waiting(entry, False)
            return False
        self._mark_waiting(entry, False)
        return True

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

    def produce_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None,
                    *, wait: float | None = None) -> bool:
        """A record outside the notification flow (checkpoints); delivery errors are only counted.

        While the local queue is full, waits at most `wait` seconds (None: until there is room) and
        returns False if the record could not be queued (also once the producer failed: `fatal_error`)."""
        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                self._metrics.delivery_errors.labels(err.name()).inc()
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value, key, on_delivery=on_delivery)
                else:
                    self._producer.produce(topic, value, key, partition=partition, on_delivery=on_delivery)
                return True
            except BufferError:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                self._poll(0.1)
            except KafkaException:
                # Refused. After a fatal error (`_FATAL`) the poll that serves its cause records it (this
                # one, unless another thread's did): the record is not queued. Any other refusal is raised.
                self._poll(0)
                if self.fatal_error is None:
                    raise
                return False

    def flush(self, timeout: float) -> int:
        """Wait up to `timeout` s for every delivery; returns how many are still undelivered."""
        left = self._serving_reports(lambda: int(self._producer.flush(timeout)))
        self._settle()
        return left

    def close(self) -> None:
        """Stop serving reports and release the producer (its threads and connections), and those it
        replaced, waiting at most `CLOSE_TIMEOUT_SECONDS` for them.

        Callers flush first; whatever is still queued then was never acknowledged, so no checkpoint
        covers it and it is read again after a restart: purge it rather than wait on Kafka again.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        closing = [*self._closing, close_producer(self._producer)]
        deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS
        for thread in closing:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = sum(thread.is_alive() for thread in closing)
        if left:
            log.warning("kafka.producer_close_timed_out", producers=left, timeout=CLOSE_TIMEOUT_SECONDS)


def close_producer(producer: Producer, after: threading.Thread | None = None) -> threading.Thread:
    """Close `producer` on a thread of its own (returned, started) once `after`, a call still under way
    on it, has returned: `Producer.close()` aborts an open transaction and flushes without a time limit,
    so the caller waits for the thread only as long as it can afford. What the producer still holds is
    purged: never acknowledged, it is read again."""
    def close() -> None:
        if after is not None:
            after.join()
        try:
            producer.purge()
            producer.close()
        except Exception:  # closed already, or refused: either way nothing is left to release
            log.warning("kafka.producer_close_failed", exc_info=True)

    name = "kafka-producer-close" if after is None else CLOSE_AFTER_HUNG_CALL
    thread = threading.Thread(target=close, name=name, daemon=True)
    thread.start()
    return thread
