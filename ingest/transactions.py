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
from collections.abc import Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException

from ingest.logs import get_logger
from ingest.metrics import Metrics
from ingest.pipeline import Outcome
from ingest.sink import REQUIRED_PRODUCER_CONFIG, KafkaSink, SpecProgress, _InFlight
from ingest.transport import Cursor

log = get_logger(__name__)


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
             *, cursor: Cursor | None = None, epoch: int = 0) -> None:
        with self.lock:
            # Read just before a handover (the new owner reads it again) or before a rewind of its
            # channel (it is read again here): producing it now would commit it twice.
            if progress.released or (cursor is not None and cursor.epoch != epoch):
                return
            self._produce(_InFlight(self, progress, outcome, timetoken, received_at))
            progress.produced_tt = timetoken

    def produce_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None,
                    *, wait: float | None = None) -> bool:
        """State records and tombstones go into the open transaction, never between two of them."""
        with self.lock:
            return super().produce_raw(topic, key, value, partition, wait=wait)

    def _delivery_failed(self, entry: _InFlight, err: KafkaError) -> None:
        # Inside a delivery callback (or produce): only record, never call the producer.
        if err.code() == KafkaError._PURGE_QUEUE:
            return  # a record of a transaction we aborted ourselves: already being read again
        # Inside a transaction a failed record dooms the transaction: it is aborted at the next
        # commit and its notifications are read again from PubNub (see Worker._rewind).
        self._failed = err.name()
        self._metrics.delivery_errors.labels(err.name()).inc()

    def commit(self, consumer: Consumer | None) -> None:
        """Commit the open transaction and open the next (the caller holds `lock`, checkpoints written).

        Raises TransactionFailed when the transaction was aborted instead: its records are invisible
        to read_committed consumers and must be produced again; if `fatal`, this producer is fenced.
        """
        producer = self.producer
        if self._failed is not None:
            self._abort(KafkaError(KafkaError._STATE, f"a record failed: {self._failed}"))
        try:
            if consumer is not None:
                producer.send_offsets_to_transaction(consumer.position(consumer.assignment()),
                                                     consumer.consumer_group_metadata(), self._timeout)
            producer.commit_transaction(self._timeout)
        except KafkaException as exc:
            self._abort(exc.args[0])
        self._committed.inc()
        producer.begin_transaction()

    def abort(self) -> None:
        """Abort the open transaction and open the next (the caller holds `lock` and rewinds)."""
        self._aborted.inc()
        self._abort_and_reopen()

    def _abort_and_reopen(self) -> None:
        self._failed = None
        try:
            self.producer.abort_transaction(self._timeout)
            self.producer.begin_transaction()
        except KafkaException as exc:
            raise TransactionFailed(str(exc), fatal=True) from None

    def _abort(self, error: KafkaError) -> None:
        """Abort after `error`, reopen unless fenced, and raise TransactionFailed."""
        self._aborted.inc()
        self._failed = None
        fatal = error.fatal() or error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                                                  KafkaError.INVALID_PRODUCER_EPOCH)
        log.warning("transaction.aborted", error=error.name(), fatal=fatal, reason=error.str())
        if not fatal:
            self._abort_and_reopen()
        raise TransactionFailed(error.str(), fatal=fatal)
