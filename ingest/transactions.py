"""Exactly-once into Kafka: notifications and checkpoints committed in one transaction.

The hot path produces inside the open transaction; every commit interval the worker writes each
spec's checkpoint (the newest timetoken produced for it) into the same transaction and commits. A
`read_committed` consumer therefore sees a notification if and only if the checkpoint that covers it
is committed, so a restart, crash or handover resumes exactly after the last visible notification.

Zombie fencing: in group mode the commit carries the spec consumer's group metadata
(`send_offsets_to_transaction`), so a worker whose partitions were reassigned (a newer group
generation) cannot commit any more (KIP-447), and a restarted worker with the same
`transactional.id` fences its previous incarnation at `init_transactions`.

The coordinator also ends a producer's epoch on its own: a transaction open for longer than
`transaction.timeout.ms` (Kafka down or slow, a commit that cannot get through) is aborted by it with
the epoch bumped, and the producer's next transactional request is answered PRODUCER_FENCED, which
librdkafka reports exactly like a newer instance's fence (fatal `_FENCED`, "Producer fenced by newer
instance"). Nothing in the error tells the two apart, so the age of the transaction does: a fence of
a transaction younger than `transaction.timeout.ms` can only come from a newer instance (the worker
stops); an older one may be the coordinator's, and the producer is replaced (a new one, initialised
again) while the caller reads the aborted notifications again from the last committed checkpoints.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from ingest.logs import get_logger
from ingest.metrics import Metrics
from ingest.pipeline import Outcome
from ingest.sink import REQUIRED_PRODUCER_CONFIG, KafkaSink, SpecProgress, _InFlight
from ingest.transport import Cursor

log = get_logger(__name__)

# With a `keep_waiting` callback, each transaction call waits at most this long for Kafka, then the
# caller hears that Kafka is slow or down (and beats its loop's heartbeat) and the call is made again.
# Short: with the loop's Kafka check (3 s) and scheduling on a loaded machine, 5 s left the loop
# silent for 10.0 s of its allowed 10 s in two loaded runs of the outage test.
CALL_TIMEOUT = 2.0
FENCING_ERRORS = (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)
KeepWaiting = Callable[[], bool]
"""Called each time a transaction call timed out; True: make the call again."""


class TransactionFailed(Exception):
    """The open transaction was aborted; `fatal` means this producer is fenced and must stop."""

    def __init__(self, message: str, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


class TransactionalSink(KafkaSink):
    # librdkafka bounds a transactional record's life by `transaction.timeout.ms` (its default
    # `message.timeout.ms`); a record that fails dooms its transaction, which is aborted and read
    # again from PubNub, so read_committed consumers see each partition in order regardless.
    required_config = REQUIRED_PRODUCER_CONFIG

    def __init__(self, producer_config: Mapping[str, str], metrics: Metrics, transactional_id: str,
                 timeout: float = 30.0) -> None:
        # A crashed worker's open transaction blocks read_committed consumers of its partitions until
        # the coordinator aborts it: keep that short (Kafka Streams uses 10 s for the same reason).
        config = {"transaction.timeout.ms": "10000", **producer_config, "transactional.id": transactional_id}
        super().__init__(config, metrics)
        self._transaction_timeout = int(config["transaction.timeout.ms"]) / 1000
        # Held by the hot path per record and by the committer per commit (re-entrant: the committer
        # writes checkpoints through produce_raw, which takes it too).
        self.lock = threading.RLock()
        self._timeout = timeout
        self._failed: str | None = None
        self._committed = metrics.transactions.labels("committed")
        self._aborted = metrics.transactions.labels("aborted")
        self._replaced = metrics.transactions.labels("producer_replaced")
        self._begun_at = 0.0  # monotonic: when the open transaction was begun

    def start(self) -> None:
        self.producer.init_transactions(self._timeout)
        self._begin()
        super().start()

    def _begin(self) -> None:
        self.producer.begin_transaction()
        self._begun_at = time.monotonic()

    def send(self, outcome: Outcome, progress: SpecProgress, timetoken: int, received_at: float,
             *, cursor: Cursor | None = None, epoch: int = 0) -> None:
        entry = _InFlight(self, progress, outcome, timetoken, received_at)
        while True:
            with self.lock:
                # Read just before a handover (the new owner reads it again) or before a rewind of its
                # channel (it is read again here): producing it now would commit it twice.
                if progress.released or (cursor is not None and cursor.epoch != epoch):
                    return
                if self._try_produce(entry) is not None:  # queued, or refused (which dooms the transaction)
                    progress.produced_tt = timetoken
                    return
            # The local queue is full: wait for room without the lock, so that commits go on meanwhile.
            self.producer.poll(0.1)

    def produce_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None,
                    *, wait: float | None = None) -> bool:
        """State records and tombstones go into the open transaction, never between two of them. A
        record the producer refuses (e.g. the transaction already failed) dooms the transaction."""
        with self.lock:
            try:
                return super().produce_raw(topic, key, value, partition, wait=wait)
            except KafkaException as exc:
                self._failed = exc.args[0].name()
                return True

    def _delivery_failed(self, entry: _InFlight, err: KafkaError) -> None:
        # Inside a delivery callback (or produce): only record, never call the producer.
        if err.code() == KafkaError._PURGE_QUEUE:
            return  # a record of a transaction we aborted ourselves: already being read again
        # Inside a transaction a failed record dooms the transaction: it is aborted at the next
        # commit and its notifications are read again from PubNub (see Worker._rewind).
        self._failed = err.name()
        self._metrics.delivery_errors.labels(err.name()).inc()

    def commit(self, consumer: Consumer | None, keep_waiting: KeepWaiting | None = None) -> None:
        """Commit the open transaction and open the next (the caller holds `lock`, checkpoints written).

        Raises TransactionFailed when the transaction was aborted instead: its records are invisible
        to read_committed consumers and must be produced again; if `fatal`, this producer is fenced.
        `keep_waiting`: while Kafka does not answer (retriable timeouts), ask it and call again every
        `CALL_TIMEOUT` s, instead of giving up after one call of `timeout` s.
        """
        producer = self.producer
        if self._failed is not None:
            self._abort(KafkaError(KafkaError._STATE, f"a record failed: {self._failed}"), keep_waiting)
        try:
            if consumer is not None:
                self._call(lambda timeout: producer.send_offsets_to_transaction(
                    consumer.position(consumer.assignment()), consumer.consumer_group_metadata(), timeout),
                    keep_waiting)
            self._call(producer.commit_transaction, keep_waiting)
        except KafkaException as exc:
            self._abort(exc.args[0], keep_waiting)
        self._committed.inc()
        self._begin()

    def abort(self) -> None:
        """Abort the open transaction and open the next (the caller holds `lock` and rewinds)."""
        self._aborted.inc()
        self._abort_and_reopen(None)

    def _call(self, call: Callable[[float], object], keep_waiting: KeepWaiting | None) -> None:
        """A transaction call; made again while it times out (Kafka slow or down) and `keep_waiting()`."""
        while True:
            try:
                call(self._timeout if keep_waiting is None else CALL_TIMEOUT)
                return
            except KafkaException as exc:
                if keep_waiting is None or not exc.args[0].retriable() or not keep_waiting():
                    raise

    def _abort_and_reopen(self, keep_waiting: KeepWaiting | None) -> None:
        """Abort the open transaction and begin the next; a producer whose epoch has ended is replaced
        if the coordinator may have ended it (TransactionFailed, fatal, if a newer instance did)."""
        self._failed = None
        try:
            self._call(self.producer.abort_transaction, keep_waiting)
            self._begin()
        except KafkaException as exc:
            self._replace_unless_fenced(exc.args[0], keep_waiting)

    def _abort(self, error: KafkaError, keep_waiting: KeepWaiting | None = None) -> None:
        """Abort after `error`, reopen unless fenced by a newer instance, and raise TransactionFailed."""
        self._aborted.inc()
        self._failed = None
        # A record refused for the epoch the coordinator bumped is abortable: librdkafka bumps the
        # epoch on abort, and this producer goes on.
        fatal = error.fatal() or (error.code() in FENCING_ERRORS and not error.txn_requires_abort())
        log.warning("transaction.aborted", error=error.name(), fatal=fatal, reason=error.str())
        if fatal:
            self._replace_unless_fenced(error, keep_waiting)
        else:
            self._abort_and_reopen(keep_waiting)
        raise TransactionFailed(error.str(), fatal=False)

    def _replace_unless_fenced(self, error: KafkaError, keep_waiting: KeepWaiting | None) -> None:
        """The producer cannot go on (`error` is fatal). A transaction open for less than
        `transaction.timeout.ms` cannot have been timed out by the coordinator: a newer instance with
        our transactional.id fenced it (TransactionFailed, fatal). Otherwise the coordinator may have
        ended the epoch: replace the producer, initialised again (its open transaction is aborted)."""
        open_for = time.monotonic() - self._begun_at
        fenced = error.code() not in FENCING_ERRORS or open_for < self._transaction_timeout
        if fenced:
            raise TransactionFailed(f"{error.str()} (transaction open {open_for:.1f}s)", fatal=True)
        log.warning("transaction.producer_replaced", error=error.name(), open_seconds=round(open_for, 1),
                    reason="the transaction outlived transaction.timeout.ms: the coordinator ended its epoch")
        self._replaced.inc()
        old, self._producer = self._producer, Producer(self._producer_config)
        old.purge()  # what it still holds was in the aborted transaction: read again from PubNub
        try:
            self._call(self._producer.init_transactions, keep_waiting)
            self._begin()
        except KafkaException as exc:
            raise TransactionFailed(f"a new producer could not be initialised: {exc.args[0].str()}",
                                    fatal=True) from None
