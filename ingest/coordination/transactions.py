"""Exactly-once into Kafka: notifications and checkpoints committed in one transaction.

The hot path produces inside the open transaction; every commit interval the worker writes each
spec's checkpoint (the newest timetoken produced for it) into the same transaction and commits. A
`read_committed` consumer therefore sees a notification if and only if the checkpoint that covers it
is committed, so a restart, crash or handover resumes exactly after the last visible notification.

Zombie fencing: in group mode the commit carries the spec consumer's group metadata
(`send_offsets_to_transaction`), so a worker whose partitions were reassigned (a newer group
generation) cannot commit any more (KIP-447), and a restarted worker with the same
`transactional.id` fences its previous incarnation at `init_transactions`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException

from ingest.data.pipeline import Outcome
from ingest.data.sink import REQUIRED_PRODUCER_CONFIG, KafkaSink, SpecProgress, _InFlight
from ingest.observability.logs import get_logger
from ingest.observability.metrics import Metrics

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
        super().__init__({"transaction.timeout.ms": "10000", **producer_config,
                          "transactional.id": transactional_id}, metrics)
        # Held by the hot path per record and by the committer per commit (re-entrant: the committer
        # writes checkpoints through produce_raw, which takes it too).
        self.lock = threading.RLock()
        self._timeout = timeout
        self._failed: str | None = None
        self._committed = metrics.transactions.labels("committed")
        self._aborted = metrics.transactions.labels("aborted")

    def start(self) -> None:
        self.producer.init_transactions(self._timeout)
        self.producer.begin_transaction()
        super().start()

    def send(self, outcome: Outcome, progress: SpecProgress, timetoken: int, received_at: float,
             *, superseded: Callable[[], bool] | None = None) -> None:
        """Produce into the open transaction, unless `superseded()`: the channel was rewound since the
        notification was read (it is read again)."""
        entry = _InFlight(self, progress, outcome, timetoken, received_at)
        while True:
            with self.lock:
                # Read just before a handover (the new owner reads it again) or before a rewind of its
                # channel (it is read again here): producing it now would commit it twice.
                if progress.released or (superseded is not None and superseded()):
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
        # commit and its notifications are read again from PubNub (see TransactionalCheckpoints._rewind).
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
        producer.begin_transaction()

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
        self._failed = None
        try:
            self._call(self.producer.abort_transaction, keep_waiting)
            self.producer.begin_transaction()
        except KafkaException as exc:
            raise TransactionFailed(str(exc), fatal=True) from None

    def _abort(self, error: KafkaError, keep_waiting: KeepWaiting | None = None) -> None:
        """Abort after `error`, reopen unless fenced, and raise TransactionFailed."""
        self._aborted.inc()
        self._failed = None
        # A transaction the coordinator timed out during an outage reports a fencing code too, but as
        # abortable: librdkafka bumps the epoch on abort, and this producer goes on.
        fatal = error.fatal() or (error.code() in FENCING_ERRORS and not error.txn_requires_abort())
        log.warning("transaction.aborted", error=error.name(), fatal=fatal, reason=error.str())
        if not fatal:
            self._abort_and_reopen(keep_waiting)
        raise TransactionFailed(error.str(), fatal=fatal)
