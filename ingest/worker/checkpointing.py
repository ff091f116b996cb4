"""Checkpointing: how what was read becomes durable with its checkpoint. Chosen once, by the delivery
guarantee (`for_config`); the worker calls the same methods either way.

- `StateTopicCheckpoints` (at-least-once): a spec's checkpoint is the newest timetoken whose records
  Kafka has acknowledged; state records are written to the state topic as checkpoints move (every
  interval, on the checkpoint thread); a spec with sparse traffic every SPARSE_RECORD_INTERVALS
  intervals only (`StateTopicCheckpoints.record_due`).
- `TransactionalCheckpoints` (exactly-once): the hot path produces into an open transaction; every
  interval the checkpoints (the newest timetoken produced per spec) go into the same transaction and
  it commits, all in `_commit`. An aborted transaction rewinds the channels it covered. Standalone
  commits on the checkpoint thread; a group member commits on its membership thread with the spec
  consumer's group metadata (zombie fencing), through `on_group_tick`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace

from confluent_kafka import Consumer, KafkaError, KafkaException

from ingest.config import Config
from ingest.coordination.state import STATE_REFRESH_SECONDS, RecordedChannel, SpecState
from ingest.coordination.transactions import (
    KeepWaiting,
    TransactionalSink,
    TransactionFailed,
    TransactionPending,
    waiting_at_most,
)
from ingest.data.pipeline import Outcome
from ingest.data.sink import KafkaSink, SpecProgress
from ingest.model import Delivery
from ingest.observability.logs import get_logger
from ingest.observability.metrics import Metrics
from ingest.rc.subscriptions import CLOCK_SKEW_SECONDS, IntentNotRecorded
from ingest.topology import TopicNames, partition_for
from ingest.transports.base import Received, Transport
from ingest.transports.pubnub import timetoken_at
from ingest.worker.channels import Drain, SpecChannels

log = get_logger(__name__)

# How long a stop's last checkpoints (after the final flush) may wait for room in the producer's queue
# and for Kafka to take them: the supervisor kills a child STOP_SLACK_SECONDS (12 s) after its flush.
FINAL_CHECKPOINT_SECONDS = 5.0
# The longest one pass of the checkpoint loop waits for room in a full producer queue (Kafka down or
# slow): the loop feeds the liveness heartbeat, so checkpoints that cannot be queued wait for the next pass.
CHECKPOINT_QUEUE_WAIT = 1.0
# How long a group commit on the membership thread waits on Kafka before it leaves the rest for the
# next pass: the thread must poll its consumer within max.poll.interval.ms (at least 30 s).
GROUP_COMMIT_PATIENCE = 10.0
# How long a creation waits for its intent to be acknowledged (at-least-once) or committed (exactly-once):
# past it (Kafka down or slow), the creation is tried again later, with backoff.
INTENT_PATIENCE = 10.0
# At-least-once, a spec whose checkpoint moved gets a new state record at the next pass only when its
# last record is this many checkpoint intervals old, or this many notifications of it arrived since:
# with sparse traffic (a few notifications a minute per subscription) nearly every pass moved nearly
# every checkpoint, and the records cost a third of the worker's CPU (docs/benchmarks.md). The price:
# after a crash the restart reads again up to that many intervals more (duplicates, never loss while
# PubNub still holds them: docs/records.md). Busy specs keep a record every interval.
SPARSE_RECORD_INTERVALS = 5
SPARSE_RECORD_NOTIFICATIONS = 10


class Checkpoints(ABC):
    """State records of the specs in `channels`, written through `sink`."""

    def __init__(self, config: Config, metrics: Metrics, *, topics: TopicNames, channels: SpecChannels,
                 transport: Transport, sink: KafkaSink) -> None:
        self.config = config
        self.metrics = metrics
        self.topics = topics
        self.channels = channels
        self.transport = transport
        self.sink = sink
        self.fatal_error: str | None = None  # why this worker must not go on (fenced)
        # Held while a state record is built and queued, and while an intent is noted: a record built
        # before the intent and queued after it would drop the intent while the creation goes on.
        self._records_lock = threading.RLock()
        channels.changed = self.spec_changed

    @abstractmethod
    def produce(self, outcome: Outcome, progress: SpecProgress, notification: Received, received_at: float) -> None:
        """The hot path: one notification's outcome to Kafka."""

    @abstractmethod
    def position(self, progress: SpecProgress) -> int:
        """How far a checkpoint of this progress may move."""

    @abstractmethod
    def on_interval(self) -> None:
        """Every checkpoint interval, on the checkpoint thread."""

    @abstractmethod
    def on_group_tick(self, consumer: Consumer) -> None:
        """After each poll of the group's spec consumer, on the membership thread."""

    @abstractmethod
    def spec_changed(self, spec_id: str) -> None:
        """The spec's state record changed (new delivery, a drain ended)."""

    @abstractmethod
    def final(self, spec_ids: list[str], *, flushed: bool = False) -> None:
        """Make everything produced for these specs durable, with its checkpoint. `flushed`: the
        caller has just waited for the producer (no second shutdown timeout)."""

    @abstractmethod
    def hand_over(self, released: list[str], lost: bool, consumer: Consumer) -> None:
        """The group takes these specs away (lost: our session expired; another worker may own them)."""

    @abstractmethod
    def _write_durably(self, spec_id: str, state: SpecState, abandoned: Callable[[], bool]) -> None:
        """Write a state record and return once it is durable (IntentNotRecorded if not in time, or
        once `abandoned()`)."""

    # ---- state records -------------------------------------------------------------------------

    def state_due(self, spec_id: str, timetoken: int, progress: SpecProgress, now: float) -> bool:
        """A state record is due when the checkpoint would move, or to refresh the recorded expiry."""
        stale = now - self.channels.last_state.get(spec_id, 0.0) > STATE_REFRESH_SECONDS
        return timetoken > progress.checkpointed_tt or stale or any(
            self.position(d.progress) > d.progress.checkpointed_tt
            for d in list(self.channels.drains.get(spec_id, {}).values()) if not d.shared)

    def write_state(self, spec_id: str, timetoken: int | None = None, *, wait: float | None = None) -> bool:
        """Write the spec's state record; the checkpoint is the acked watermark unless given.
        False if the producer's queue stayed full for `wait` seconds (None: wait for room)."""
        channels = self.channels
        delivery, progress = channels.deliveries.get(spec_id), channels.progress.get(spec_id)
        if delivery is None or progress is None:
            return True
        tt = progress.acked_tt if timetoken is None else timetoken
        tt = max(tt, progress.checkpointed_tt)
        # Bounded like the queue's wait: another writer may be waiting for room with the lock held.
        if not self._records_lock.acquire(timeout=-1 if wait is None else wait):
            return False
        try:
            state = self.state_record(spec_id, delivery, tt)
            if not self.sink.produce_raw(self.topics.state, spec_id.encode(), state.encode(),
                                         partition_for(spec_id, self.config.topics.spec_partitions), wait=wait):
                return False
        finally:
            self._records_lock.release()
        progress.checkpointed_tt = tt
        progress.unrecorded = 0
        channels.last_state[spec_id] = time.monotonic()
        self.metrics.checkpoints.inc()
        self.written(delivery.channel, tt)
        return True

    @abstractmethod
    def written(self, channel: str, timetoken: int) -> None:
        """A checkpoint of `channel` was written (at-least-once: it is durable; exactly-once: at commit)."""

    def state_record(self, spec_id: str, delivery: Delivery, timetoken: int, *, move_drains: bool = True) -> SpecState:
        # The delivery is announced only when it changes; plain renewals move the expiry recorded here.
        expires_at = self.metrics.subscription_expiry.get(spec_id) or delivery.expires_at
        return self._naming_created(SpecState(
            spec_id, delivery.account_id, delivery.subscription_id, delivery.subscriber_key, delivery.channel,
            timetoken, time.time(), self.config.worker.id, expires_at, self.channels.wrapped_keys.get(spec_id),
            self._draining(spec_id, timetoken, move_drains), self.channels.wrapped_tokens.get(spec_id),
            self.transport.resume_state(delivery.channel, timetoken), self.channels.creating.get(spec_id)))

    def _naming_created(self, record: SpecState) -> SpecState:
        """The record with the subscription created for its spec and not announced yet (if any) as the
        current one: its channel, read from the creation's time, and its key; the channel the record named
        goes under `draining` with its checkpoint. The intent is over: the record names what it made."""
        created = self.channels.created.get(record.spec_id)
        if created is None or created[0].channel == record.channel:
            return record
        delivery, since_tt = created
        former = tuple(c for c in record.recorded_channels() if c.channel != delivery.channel)
        return replace(record, account_id=delivery.account_id or record.account_id,
                       subscription_id=delivery.subscription_id, subscriber_key=delivery.subscriber_key,
                       channel=delivery.channel, timetoken=since_tt, expires_at=delivery.expires_at,
                       wrapped_key=self.channels.wrap_key(record.spec_id, delivery), draining=former, session=None,
                       creating_since=None)

    def _draining(self, spec_id: str, spec_tt: int, move: bool = True) -> tuple[RecordedChannel, ...]:
        """The spec's former channels still draining, each with its checkpoint: the spec's own
        (`spec_tt`) for a shared progress, else its own, moved here (unless `move` is False: a record
        written outside the checkpoint flow repeats the checkpoints as they stand)."""
        recorded = []
        for drain in list(self.channels.drains.get(spec_id, {}).values()):
            progress = drain.progress
            tt = spec_tt if drain.shared else progress.checkpointed_tt
            if move and not drain.shared:
                drain.checkpoint_before = progress.checkpointed_tt
                tt = progress.checkpointed_tt = max(self.position(progress), progress.checkpointed_tt)
            former = drain.recorded
            recorded.append(RecordedChannel(former.subscription_id, former.subscriber_key, former.channel, tt,
                                            former.wrapped_key))
        return tuple(recorded)

    def record_subscription(self, spec_id: str, subscription_id: str) -> None:
        """Name a subscription that was created or adopted for the spec while we were handing it over
        (no delivery announced for it yet). One created here is named with its channel and key
        (`_naming_created`), so that the next owner reads that channel even if its first renewal moves the
        subscription to another (before, the record kept the old channel and the soak lost what the
        created one received). Otherwise only the subscription id changes: the checkpoint and the
        channel it belongs to stay as they were. A record with an empty checkpoint made the next owner
        start from a 30-s lookback: duplicates under exactly-once, and loss where the checkpoint was
        older than the lookback (docs/scaling.md). A pending intent then stays: the record does not name
        the new channel, and the next owner reads it from the intent's time."""
        with self._records_lock:
            recorded = self._current_record(spec_id)
        if recorded.subscription_id != subscription_id:
            recorded = replace(recorded, subscription_id=subscription_id)
        elif spec_id not in self.channels.created:
            return  # the record already names it
        # Exactly-once: into the open transaction, committed with the handover.
        self.sink.produce_raw(self.topics.state, spec_id.encode(), recorded.encode(),
                              partition_for(spec_id, self.config.topics.spec_partitions))

    def record_creation(self, delivery: Delivery, abandoned: Callable[[], bool] = lambda: False) -> None:
        """A subscription was just created for the spec (RingCentral answered the POST), before its channel
        is read: make a record that names it, channel and wrapped key, durable like the intent
        (`_write_durably`), so that whoever owns the spec next reads that channel from the creation's time,
        whether the subscription is still alive then or not (PubNub keeps the channel's buffer after it
        ended). Every record of the spec names it until it is announced (`SpecChannels.created`).
        IntentNotRecorded: not durable in time (the intent then stands for it), or `abandoned()`."""
        spec_id = delivery.spec_id
        with self._records_lock:
            since = self.channels.creating.get(spec_id, time.time())
            self.channels.created[spec_id] = (delivery, timetoken_at(since - CLOCK_SKEW_SECONDS))
            state = self._current_record(spec_id)
        self._write_durably(spec_id, state, abandoned)

    def record_intent(self, spec_id: str, abandoned: Callable[[], bool] = lambda: False) -> None:
        """Before a subscription is created for the spec: record that a creation is under way (since
        when) and return once that record is durable, so that whoever owns the spec next looks for
        what it created should this worker die before a record names it (`creating_since`,
        docs/records.md). An intent still pending keeps its time: a creation that failed may have
        created one all the same (its answer lost). IntentNotRecorded: not durable in time, or the
        creation was `abandoned()` meanwhile (the spec handed over: a group commit waits for that)."""
        with self._records_lock:
            since = self.channels.creating.setdefault(spec_id, time.time())
        self._write_durably(spec_id, replace(self._current_record(spec_id), creating_since=since), abandoned)

    def _current_record(self, spec_id: str) -> SpecState:
        """The spec's state record as it stands (checkpoints as written, nothing moved), this worker's."""
        channels = self.channels
        delivery, progress = channels.deliveries.get(spec_id), channels.progress.get(spec_id)
        worker_id = self.config.worker.id
        if delivery is not None and progress is not None:
            return self.state_record(spec_id, delivery, progress.checkpointed_tt, move_drains=False)
        restored = channels.restored.get(spec_id)
        creating = channels.creating.get(spec_id)
        if restored is None:
            return self._naming_created(SpecState(spec_id, "", "", "", "", 0, time.time(), worker_id,
                                                  creating_since=creating))
        return self._naming_created(replace(restored, updated_at=time.time(), worker_id=worker_id,
                                            creating_since=creating or restored.creating_since))

    def remove(self, spec_id: str) -> None:
        """The spec was removed: a tombstone deletes its state record."""
        self.sink.produce_raw(self.topics.state, spec_id.encode(), None,
                              partition_for(spec_id, self.config.topics.spec_partitions))


class StateTopicCheckpoints(Checkpoints):
    """At-least-once: checkpoints move over what Kafka acknowledged."""

    def produce(self, outcome: Outcome, progress: SpecProgress, notification: Received, received_at: float) -> None:
        self.sink.send(outcome, progress, notification.position, received_at)

    def __init__(self, config: Config, metrics: Metrics, *, topics: TopicNames, channels: SpecChannels,
                 transport: Transport, sink: KafkaSink) -> None:
        super().__init__(config, metrics, topics=topics, channels=channels, transport=transport, sink=sink)
        # A WebHook sender waits for its answer until the checkpoint is written (`acknowledged`): there
        # every moved checkpoint is written at the next pass.
        interval = config.worker.checkpoint_interval_seconds
        self._sparse_record_age = 0.0 if config.webhook is not None else SPARSE_RECORD_INTERVALS * interval

    def position(self, progress: SpecProgress) -> int:
        return progress.acked_tt

    def record_due(self, spec_id: str, progress: SpecProgress, now: float) -> bool:
        """A moved checkpoint is written when the spec's last record is old enough, or enough of its
        notifications arrived since, or while it drains a former channel (the drain ends once its
        checkpoint is written); the expiry refresh and the drains' checkpoints as in `state_due`."""
        if progress.acked_tt > progress.checkpointed_tt and (
                now - self.channels.last_state.get(spec_id, 0.0) >= self._sparse_record_age
                or progress.unrecorded >= SPARSE_RECORD_NOTIFICATIONS or spec_id in self.channels.drains):
            return True
        return self.state_due(spec_id, progress.checkpointed_tt, progress, now)  # the spec's own: not moved

    def on_interval(self) -> None:
        self._acknowledge_foreign()
        now = time.monotonic()
        due = [spec_id for spec_id, progress in self.channels.progress_snapshot()
               if self.record_due(spec_id, progress, now)]
        deadline = now + CHECKPOINT_QUEUE_WAIT
        for written, spec_id in enumerate(due):
            if not self.write_state(spec_id, wait=max(0.0, deadline - time.monotonic())):
                # The producer's queue is full: these stay due (their checkpoints did not move).
                self.metrics.checkpoints_deferred.inc(len(due) - written)
                return

    def _acknowledge_foreign(self) -> None:
        """Deliveries of specs another worker owns are answered once Kafka has them (no state record:
        the owner's is the spec's)."""
        for channel, progress in self.channels.foreign_snapshot():
            if progress.acked_tt > progress.checkpointed_tt:
                progress.checkpointed_tt = progress.acked_tt
                self.transport.acknowledged(channel, progress.acked_tt)

    def on_group_tick(self, consumer: Consumer) -> None:
        """Nothing: state records are written on the checkpoint thread in a group too."""

    def written(self, channel: str, timetoken: int) -> None:
        self.transport.acknowledged(channel, timetoken)  # everything up to it is acknowledged by Kafka

    def spec_changed(self, spec_id: str) -> None:
        self.write_state(spec_id)

    def final(self, spec_ids: list[str], *, flushed: bool = False) -> None:
        if not flushed:
            self.sink.flush(self.config.worker.shutdown_timeout_seconds)
        # A stop is bounded: with Kafka down the producer's queue can stay full, and a wait for room
        # without deadline held `Worker.stop` for ever. What cannot be queued by the deadline is not
        # lost: the next owner (or the restart) resumes from the checkpoint recorded before and reads it again.
        deadline = time.monotonic() + FINAL_CHECKPOINT_SECONDS
        unwritten: dict[str, dict[str, int]] = {}
        for spec_id in spec_ids:
            if not self.write_state(spec_id, wait=max(0.0, deadline - time.monotonic())):
                unwritten[spec_id] = self._checkpoint_of(spec_id)
        if unwritten:
            log.warning("worker.checkpoints_unwritten", specs=len(unwritten), checkpoints=unwritten,
                        reason="not queued: the producer queue stayed full until the deadline, or the producer failed")
        self.sink.flush(max(0.0, deadline - time.monotonic()))

    def _checkpoint_of(self, spec_id: str) -> dict[str, int]:
        """The checkpoint that was not written, and the one recorded before, which the next owner resumes from."""
        progress = self.channels.progress.get(spec_id)
        if progress is None:
            return {}
        return {"unwritten": progress.acked_tt, "recorded": progress.checkpointed_tt}

    def hand_over(self, released: list[str], lost: bool, consumer: Consumer) -> None:
        if not lost:  # lost: another worker may own them already; it resumes from our last checkpoint
            self.final(released)

    def _write_durably(self, spec_id: str, state: SpecState, abandoned: Callable[[], bool]) -> None:
        """Produce the record and wait for Kafka's acknowledgement of it (the delivery thread serves it)."""
        acknowledged, failures = threading.Event(), []

        def on_delivery(err: KafkaError | None, _msg: object) -> None:  # served by the sink's delivery thread
            if err is not None:
                failures.append(err.name())
            acknowledged.set()

        try:
            self.sink.producer.produce(self.topics.state, state.encode(), spec_id.encode(), on_delivery=on_delivery,
                                       partition=partition_for(spec_id, self.config.topics.spec_partitions))
        except (BufferError, KafkaException) as exc:
            raise IntentNotRecorded(f"the state record could not be queued: {exc!r}") from None
        if not acknowledged.wait(INTENT_PATIENCE):
            raise IntentNotRecorded(f"Kafka did not acknowledge the state record within {INTENT_PATIENCE:.0f}s")
        if failures:
            raise IntentNotRecorded(f"the state record failed: {failures[0]}")


class TransactionalCheckpoints(Checkpoints):
    """Exactly-once: notifications and checkpoints committed in one transaction."""

    def __init__(self, config: Config, metrics: Metrics, *, topics: TopicNames, channels: SpecChannels,
                 transport: Transport, commit_with_group: bool, keep_waiting: Callable[[], bool]) -> None:
        self.transactions = TransactionalSink(config.kafka, metrics, f"{config.topics.prefix}.{config.worker.id}")
        super().__init__(config, metrics, topics=topics, channels=channels, transport=transport,
                         sink=self.transactions)
        self._commit_with_group = commit_with_group
        self._keep_waiting = keep_waiting
        self._next_commit = 0.0
        self._written: dict[str, int] = {}  # channel -> checkpoint written into the open transaction
        # A commit Kafka has not answered yet (TransactionPending): the checkpoints as they stood before
        # it (for the rewind, should it end aborted) and the checkpoints to acknowledge once it commits.
        self._uncommitted: dict[str, int] = {}
        self._unacknowledged: dict[str, int] = {}
        # Transactions are numbered (the open one: `_open_transaction`), so that a writer of an intent
        # learns whether the transaction it wrote into ended committed (`_last_committed`) or aborted.
        self._transaction_ended = threading.Condition()
        self._open_transaction = 1
        self._last_committed = 0

    def produce(self, outcome: Outcome, progress: SpecProgress, notification: Received, received_at: float) -> None:
        self.transactions.send(outcome, progress, notification.position, received_at,
                               superseded=notification.superseded)

    def position(self, progress: SpecProgress) -> int:
        return progress.produced_tt

    def on_interval(self) -> None:
        if not self._commit_with_group:
            self._commit(None)

    def on_group_tick(self, consumer: Consumer) -> None:
        self._commit(consumer)

    def spec_changed(self, spec_id: str) -> None:
        """Nothing now: the next commit writes the record."""

    def written(self, channel: str, timetoken: int) -> None:
        self._written[channel] = timetoken  # acknowledged to the transport once committed

    def final(self, spec_ids: list[str], *, flushed: bool = False) -> None:
        # Standalone commits without group metadata: there is no group to be fenced by.
        self._commit(None, force=True)

    def hand_over(self, released: list[str], lost: bool, consumer: Consumer) -> None:
        """Nothing produced for a released spec may commit after this point.

        Revoked (cooperative rebalance): commit what was read so far, checkpoints included; the new
        owner resumes right after it. Lost (our session expired, another worker may already own the
        specs): whatever is open must not commit at all, so abort it and read the rest again.
        """
        sink = self.transactions
        with sink.lock:
            for spec_id in released:
                progress = self.channels.progress.get(spec_id)
                if progress is not None:
                    progress.released = True
            if lost:
                self._ended(committed=False)  # whatever the open transaction holds never commits
                patience = waiting_at_most(GROUP_COMMIT_PATIENCE)
                # A call under way is finished first; still unanswered, it is made again at the next
                # pass (nothing more goes into that transaction meanwhile).
                if not sink.unfinished or self._finish_transaction(patience):
                    try:
                        sink.abort(patience)
                    except TransactionPending:
                        pass  # made again at the next pass: nothing of it commits
                    except TransactionFailed as exc:
                        if exc.fatal:
                            self._fenced(f"transaction abort failed: {exc}")
                self._rewind({})
        if not lost:
            self._commit(consumer, force=True)

    def _commit(self, consumer: Consumer | None, force: bool = False) -> None:
        """Checkpoints into the open transaction, then commit it (every interval).

        On the checkpoint loop (standalone, not forced) nothing waits on Kafka for long, as the loop
        feeds the liveness heartbeat: when a checkpoint cannot be queued within CHECKPOINT_QUEUE_WAIT
        the commit waits for the next pass, and a commit Kafka does not answer is made again every few
        seconds, the heartbeat beating in between (`keep_waiting`)."""
        now = time.monotonic()
        if not force and (now < self._next_commit or self.fatal_error):
            return
        self._next_commit = now + self.config.worker.checkpoint_interval_seconds
        sink = self.transactions
        on_loop = consumer is None and not force
        # The checkpoint loop waits on Kafka beating its heartbeat; the membership thread, a handover
        # and a stop only so long (then the call is made again at the next pass, or the transaction
        # ends at the coordinator's timeout, aborted).
        keep_waiting = self._keep_waiting if on_loop else waiting_at_most(GROUP_COMMIT_PATIENCE)
        # Not forced (the checkpoint loop, or the group's membership thread, which must go on polling
        # its consumer): a full producer queue defers the commit rather than waiting for room.
        deadline = now + CHECKPOINT_QUEUE_WAIT
        with sink.lock:
            if sink.unfinished and not self._finish_transaction(keep_waiting):
                return
            committed_before: dict[str, int] = {}  # checkpoints as they stood before this transaction
            for spec_id, progress in self.channels.progress_snapshot():
                if self.state_due(spec_id, progress.produced_tt, progress, now):
                    before = progress.checkpointed_tt
                    wait = None if force else max(0.0, deadline - time.monotonic())
                    if not self.write_state(spec_id, progress.produced_tt, wait=wait):
                        self._defer_commit(committed_before)
                        return
                    committed_before[spec_id] = before
            written, self._written = self._written, {}
            # Deliveries of specs another worker owns: answered once this transaction commits (no state
            # record: the owner's is the spec's; an abort rewinds them all, `_rewind`).
            written.update((channel, progress.produced_tt) for channel, progress in self.channels.foreign_snapshot()
                           if progress.produced_tt)
            self._end_transaction(lambda: sink.commit(consumer, keep_waiting), committed_before, written)

    def _finish_transaction(self, keep_waiting: KeepWaiting) -> bool:
        """A pass gave up waiting on Kafka mid-commit: make the call again first (lock held). False
        while Kafka still does not answer, or when the transaction ended aborted (rewound)."""
        return self._end_transaction(lambda: self.transactions.finish(keep_waiting), self._uncommitted,
                                     self._unacknowledged)

    def _end_transaction(self, end: Callable[[], None], committed_before: dict[str, int],
                         written: dict[str, int]) -> bool:
        """Commit (or finish committing) the open transaction; True once committed. Pending: the
        checkpoints before it are kept for the rewind should it end aborted."""
        try:
            end()
        except TransactionPending:
            self._uncommitted, self._unacknowledged = committed_before, written
            return False
        except TransactionFailed as exc:
            self._uncommitted, self._unacknowledged = {}, {}
            self._ended(committed=False)
            self._rewind(committed_before)
            if exc.fatal:
                self._fenced(f"transaction fenced: {exc}")
            return False
        self._uncommitted, self._unacknowledged = {}, {}
        self._ended(committed=True)
        for channel, timetoken in written.items():
            self.transport.acknowledged(channel, timetoken)
        return True

    def _ended(self, *, committed: bool) -> None:
        """The open transaction ended (committed, or aborted); the next one is open."""
        with self._transaction_ended:
            if committed:
                self._last_committed = self._open_transaction
            self._open_transaction += 1
            self._transaction_ended.notify_all()

    def _write_durably(self, spec_id: str, state: SpecState, abandoned: Callable[[], bool]) -> None:
        """Write the record into the open transaction, have it committed at the next pass (not a whole
        interval later), and wait for that commit; an aborted one is written into the next again. A
        group commits on the membership thread, which waits in a handover for the creations of the
        specs it releases: those are `abandoned()`, and end at once."""
        sink = self.transactions
        deadline = time.monotonic() + INTENT_PATIENCE
        while True:
            with sink.lock:  # between two commits; not while a commit waits on Kafka (`unfinished`)
                if self.fatal_error:
                    raise IntentNotRecorded(f"the worker cannot commit: {self.fatal_error}")
                number = self._open_transaction
                written = not sink.unfinished and sink.produce_raw(
                    self.topics.state, spec_id.encode(), state.encode(),
                    partition_for(spec_id, self.config.topics.spec_partitions), wait=CHECKPOINT_QUEUE_WAIT)
                if written:
                    self._next_commit = 0.0
            with self._transaction_ended:
                while self._open_transaction <= number and time.monotonic() < deadline and not abandoned():
                    self._transaction_ended.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                if written and self._last_committed >= number:
                    return
            if abandoned():
                raise IntentNotRecorded("the spec is being handed over")
            if time.monotonic() >= deadline:
                raise IntentNotRecorded(f"the state record was not committed within {INTENT_PATIENCE:.0f}s")

    def _fenced(self, reason: str) -> None:
        """A newer instance serves our specs: read nothing more, and create or renew nothing more (a
        subscription created now would be named by no record: the soak lost what such orphans
        received), until the worker is stopped."""
        self.fatal_error = reason
        log.error("worker.fenced", error=reason)
        self.transport.stop()
        if self.channels.manager is not None:
            self.channels.manager.halt()

    def _defer_commit(self, written: dict[str, int]) -> None:
        """The producer's queue is full: commit at the next pass. The checkpoints written into the
        transaction in this pass count as unwritten, so the next pass writes them again (newer)."""
        self.metrics.checkpoints_deferred.inc()
        self._next_commit = 0.0
        for spec_id, before in written.items():
            progress = self.channels.progress.get(spec_id)
            if progress is not None:
                progress.checkpointed_tt = before
            self.channels.last_state.pop(spec_id, None)

    def _rewind(self, committed_before: dict[str, int]) -> None:
        """An aborted transaction hid what it held: read those notifications again."""
        channels = self.channels
        with channels.lock:
            rewound: set[str] = set()
            for spec_id, progress in channels.progress.items():
                if spec_id in committed_before:
                    progress.checkpointed_tt = committed_before[spec_id]
                    channels.last_state.pop(spec_id, None)
                if progress.produced_tt > progress.checkpointed_tt:
                    progress.produced_tt = progress.checkpointed_tt
                    rewound.add(spec_id)
                    delivery = channels.deliveries.get(spec_id)
                    if delivery is not None:
                        self.transport.rewind(delivery.channel, progress.checkpointed_tt or None)
            for spec_id, drains in channels.drains.items():
                for channel, drain in drains.items():
                    self._rewind_drain(spec_id, channel, drain, rewound, committed_before)
            for channel in channels.foreign:  # what is held there is answered 503: the sender retries it
                self.transport.rewind(channel, None)
        log.warning("worker.rewound", specs=len(channels.progress))

    def _rewind_drain(self, spec_id: str, channel: str, drain: Drain, rewound: set[str],
                      committed_before: dict[str, int]) -> None:
        progress = drain.progress
        if drain.shared:  # the spec's progress, rewound above: its old channel goes with it
            if spec_id in rewound:
                self.transport.rewind(channel, progress.checkpointed_tt or None)
            return
        if spec_id in committed_before:
            progress.checkpointed_tt = drain.checkpoint_before
        if progress.produced_tt > progress.checkpointed_tt:
            progress.produced_tt = progress.checkpointed_tt
            self.transport.rewind(channel, progress.checkpointed_tt or None)


def for_config(config: Config, metrics: Metrics, *, topics: TopicNames, channels: SpecChannels, transport: Transport,
               keep_waiting: Callable[[], bool]) -> Checkpoints:
    """The checkpointing of the configured delivery guarantee (`keep_waiting`: see `TransactionalSink.commit`)."""
    if config.worker.delivery_guarantee == "exactly-once":
        return TransactionalCheckpoints(config, metrics, topics=topics, channels=channels, transport=transport,
                                        commit_with_group=config.worker.coordination == "group",
                                        keep_waiting=keep_waiting)
    return StateTopicCheckpoints(config, metrics, topics=topics, channels=channels, transport=transport,
                                 sink=KafkaSink(config.kafka, metrics))
