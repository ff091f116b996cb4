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

from ingest.data.pipeline import Outcome
from ingest.data.sink import REQUIRED_PRODUCER_CONFIG, KafkaSink, SpecProgress, _InFlight, close_producer
from ingest.observability.logs import get_logger
from ingest.observability.metrics import Metrics

log = get_logger(__name__)

# With a `keep_waiting` callback, each transaction call waits at most this long for Kafka, then the
# caller hears that Kafka is slow or down (and beats its loop's heartbeat) and the call is made again.
# Short: with the loop's Kafka check (3 s) and scheduling on a loaded machine, 5 s left the loop
# silent for 10.0 s of its allowed 10 s in two loaded runs of the outage test.
CALL_TIMEOUT = 2.0
HUNG_SLACK = 10.0  # a transaction call still blocked this long past its own timeout is hung (see _bounded)
FENCING_ERRORS = (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)
# How a transaction the coordinator may have ended is refused: a fencing error, or INVALID_TXN_STATE for
# its abort (seen after a broker restart, the transaction open 91 s; librdkafka makes it fatal). A newer
# instance is never answered INVALID_TXN_STATE: it bumped the epoch, which the coordinator checks first.
ENDED_BY_THE_COORDINATOR = (*FENCING_ERRORS, KafkaError.INVALID_TXN_STATE)
KeepWaiting = Callable[[], bool]
"""Called each time a transaction call timed out; True: make the call again."""
Step = Callable[[float], object]  # one transaction call, given its timeout
OnError = Callable[[KafkaError, "KeepWaiting | None"], None]


def waiting_at_most(seconds: float) -> KeepWaiting:
    """Patience for the transaction calls of a thread that must get back to other work in time (the
    group membership thread polls its consumer within max.poll.interval.ms)."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() < deadline


class TransactionFailed(Exception):
    """The open transaction was aborted; `fatal` means this producer is fenced and must stop."""

    def __init__(self, message: str, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


class TransactionPending(Exception):
    """Kafka did not answer a transaction call within the caller's patience. The transaction stays as
    it is (nothing in it visible, nothing dropped); nothing more goes into it (intake waits) until
    `TransactionalSink.finish` has made the call again and succeeded."""


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
        self._unfinished: tuple[list[Step], OnError] | None = None  # calls left by a TransactionPending

    def start(self) -> None:
        self.producer.init_transactions(self._timeout)
        self._begin()
        super().start()

    def _begin(self) -> None:
        self.producer.begin_transaction()
        self._begun_at = time.monotonic()

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
                # Queued, or refused (which dooms the transaction); not while a commit is unfinished.
                if self._unfinished is None and self._try_produce(entry) is not None:
                    progress.produced_tt = timetoken
                    return
            # The local queue is full, or a commit waits on Kafka: wait without the lock, so that
            # commits go on meanwhile.
            self._poll(0.1)

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

    def _producer_failed(self, error: KafkaError) -> None:
        # Fenced, or the coordinator ended our epoch: the committer meets the error at its next
        # transaction call, tells the two apart and stops or replaces the producer (`_abort`).
        log.warning("kafka.producer_fatal_error", error=error.name(), reason=error.str())

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
        `CALL_TIMEOUT` s, instead of giving up after one call of `timeout` s; once it says no,
        TransactionPending: the rest is left for `finish`.
        """
        producer = self.producer
        if self._failed is not None:
            self._abort(KafkaError(KafkaError._STATE, f"a record failed: {self._failed}"), keep_waiting)
        steps: list[Step] = []
        if consumer is not None:
            # Read from the consumer here, on the caller's thread (the membership thread, maybe inside a
            # rebalance callback), not in the step: the step runs on a thread of its own (`_bounded`),
            # and a consumer call from there waits for the rebalance callback that waits for the step
            # (seen as a send-offsets "hung" at every handover, the producer replaced and the
            # handover's state records lost).
            offsets, group = consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
            steps.append(lambda timeout: producer.send_offsets_to_transaction(offsets, group, timeout))
        steps += [producer.commit_transaction, self._committed_step]
        self._run(steps, self._abort, keep_waiting)

    @property
    def unfinished(self) -> bool:
        """A transaction call gave up waiting on Kafka (TransactionPending): `finish` comes first."""
        return self._unfinished is not None

    def finish(self, keep_waiting: KeepWaiting | None = None) -> None:
        """Make the calls a pass gave up on again, and the rest of its commit, abort or producer
        replacement (the caller holds `lock`). Returns once committed; raises as `commit` does."""
        assert self._unfinished is not None
        steps, on_error = self._unfinished
        self._run(steps, on_error, keep_waiting)

    def abort(self, keep_waiting: KeepWaiting | None = None) -> None:
        """Abort the open transaction and open the next (the caller holds `lock`, has finished any
        unfinished call, and rewinds). TransactionPending: the abort is made again by `finish`."""
        self._aborted.inc()
        self._failed = None
        self._run([self.producer.abort_transaction, self._begin_step], self._replace_unless_fenced, keep_waiting)

    def _call(self, call: Step, keep_waiting: KeepWaiting | None) -> None:
        """A transaction call; made again while it times out (Kafka slow or down) and `keep_waiting()`."""
        while True:
            try:
                _bounded(call, self._timeout if keep_waiting is None else CALL_TIMEOUT, keep_waiting)
                return
            except KafkaException as exc:
                if keep_waiting is None or not exc.args[0].retriable() or not keep_waiting():
                    raise

    def _run(self, steps: list[Step], on_error: OnError, keep_waiting: KeepWaiting | None) -> None:
        """Make each call in turn, each again while Kafka does not answer and `keep_waiting()`. When the
        caller's patience ends first, the calls left are kept for `finish` (TransactionPending): a
        commit that timed out must be made again, never dropped, as it may already be under way at
        the coordinator. Any other error goes to `on_error`, which raises TransactionFailed."""
        self._unfinished = None
        for i, step in enumerate(steps):
            try:
                self._call(step, keep_waiting)
            except CallHung as exc:
                # Whatever it was doing, a new producer's init_transactions ends the transaction (it
                # aborts it, or completes a commit the coordinator had already begun).
                self._replace(str(exc), keep_waiting, pending=exc.call)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if keep_waiting is not None and error.retriable():
                    self._unfinished = (steps[i:], on_error)
                    log.warning("transaction.pending", error=error.name(), reason=error.str())
                    raise TransactionPending(error.str()) from None
                on_error(error, keep_waiting)
                return

    def _begin_step(self, _timeout: float) -> None:
        self._begin()

    def _committed_step(self, _timeout: float) -> None:
        self._committed.inc()
        self._begin()

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
        self._run([self.producer.abort_transaction, self._begin_step, _fail(error.str())],
                  self._replace_unless_fenced, keep_waiting)

    def _replace_unless_fenced(self, error: KafkaError, keep_waiting: KeepWaiting | None) -> None:
        """The producer cannot go on (`error` is fatal). A transaction open for less than
        `transaction.timeout.ms` cannot have been timed out by the coordinator: a newer instance with
        our transactional.id fenced it (TransactionFailed, fatal). Otherwise the coordinator may have
        ended the epoch: replace the producer, initialised again (its open transaction is aborted),
        and raise TransactionFailed (not fatal) for the caller to read the aborted records again."""
        open_for = time.monotonic() - self._begun_at
        fenced = error.code() not in ENDED_BY_THE_COORDINATOR or open_for < self._transaction_timeout
        if fenced:
            raise TransactionFailed(f"{error.str()} (transaction open {open_for:.1f}s)", fatal=True)
        self._replace(f"the transaction outlived transaction.timeout.ms ({open_for:.1f}s): the coordinator "
                      f"ended its epoch ({error.name()})", keep_waiting)

    def _replace(self, reason: str, keep_waiting: KeepWaiting | None, pending: threading.Thread | None = None) -> None:
        """Go on with a new producer, initialised again (which ends the old one's transaction), and
        raise TransactionFailed (not fatal) for the caller to read the aborted records again. The old
        one is closed once its `pending` call (hung) has returned: left open, it kept its threads and
        connections, reconnecting to Kafka for as long as the process lived."""
        log.warning("transaction.producer_replaced", reason=reason)
        self._replaced.inc()
        old, self._producer = self._producer, Producer(self._producer_config)
        old.purge(blocking=False)  # what it still holds was in the aborted transaction: read again from PubNub
        self._closing = [thread for thread in self._closing if thread.is_alive()]
        self._closing.append(close_producer(old, after=pending))
        self._run([self._producer.init_transactions, self._begin_step, _fail(reason)], _init_failed, keep_waiting)


class CallHung(Exception):
    """A transaction call still blocked long past its own timeout; `call` is its thread, still running."""

    def __init__(self, message: str, call: threading.Thread) -> None:
        super().__init__(message)
        self.call = call


def _bounded(call: Step, timeout: float, keep_waiting: KeepWaiting | None) -> None:
    """Make the call on a thread of its own and wait for it at most `timeout` + HUNG_SLACK seconds,
    calling `keep_waiting()` every CALL_TIMEOUT s past `timeout` (the checkpoint loop beats its
    heartbeat there). librdkafka's send_offsets_to_transaction was seen blocked
    for minutes, past its timeout, during and after a broker restart (the transaction had failed
    meanwhile: OUT_OF_ORDER_SEQUENCE_NUMBER): it held the group membership thread past
    max.poll.interval.ms, and the worker lost its partitions and never polled again to rejoin. A
    hung call's thread is left behind (CallHung names it); its producer is replaced, and closed once
    the call returns."""
    outcome: list[BaseException | None] = []

    def make() -> None:
        try:
            call(timeout)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=make, name="transaction-call", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout)
    hung_at = time.monotonic() + HUNG_SLACK
    while not outcome and time.monotonic() < hung_at:
        if keep_waiting is not None:
            # Only a heartbeat here: its answer cannot end a call that is under way. Giving up on
            # it early replaced the producer while the old one's call (an init_transactions) was
            # still pending, and that one, completing later, fenced its replacement.
            keep_waiting()
        thread.join(min(CALL_TIMEOUT, max(0.0, hung_at - time.monotonic())))
    if not outcome:
        raise CallHung(f"a transaction call was still blocked {time.monotonic() - started:.0f}s after it was "
                       f"made (timeout {timeout:.0f}s)", thread)
    if outcome[0] is not None:
        raise outcome[0]


def _fail(reason: str) -> Step:
    """The last step after an abort: the caller hears that the transaction's records must be read again."""
    def fail(_timeout: float) -> None:
        raise TransactionFailed(reason, fatal=False)
    return fail


def _init_failed(error: KafkaError, _keep_waiting: KeepWaiting | None) -> None:
    raise TransactionFailed(f"a new producer could not be initialised: {error.str()}", fatal=True)
