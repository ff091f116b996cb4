"""The worker: wires the control plane (subscriptions) to the data plane (PubNub -> pipeline -> Kafka).

Threads: the SDK's message thread per PubNub connection runs the hot path (pipeline + produce); one
delivery thread serves Kafka acknowledgements; the subscription manager has its own scheduler; one
checkpoint thread writes the state topic (at-least-once) or commits transactions (exactly-once,
standalone); in group mode the membership thread owns the spec consumer and commits transactions.
The data plane never calls RingCentral: it only learns from `on_delivery` which channel to read with
which key.

Two ways to own specs:
- standalone: this worker owns every spec of its config;
- group: workers share the spec topic through a consumer group; assigned partitions are owned specs,
  with their state restored from the co-partitioned state topic on assignment and handed back on
  revocation (final checkpoint or commit first).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from ingest.catalogue import default_catalogue
from ingest.config import Config
from ingest.coordination import GroupMembership
from ingest.health import HealthServer, Heartbeats
from ingest.kafka_logs import kafka_log_config, serve_logs
from ingest.keywrap import KeyWrapper, UnwrapError
from ingest.logs import get_logger
from ingest.metrics import Metrics, SpecMetrics
from ingest.model import Delivery, SubscriptionSpec
from ingest.pipeline import ChannelContext, Pipeline, TopicNames
from ingest.rc.accounts import build_sessions
from ingest.rc.subscriptions import SubscriptionManager
from ingest.sink import KafkaSink, SpecProgress
from ingest.specs.store import apply_specs
from ingest.state import RecordedChannel, SpecState, partition_for, restore
from ingest.topics import COMPACTED, ensure_topics
from ingest.transactions import (
    KeepWaiting,
    TransactionalSink,
    TransactionFailed,
    TransactionPending,
    waiting_at_most,
)
from ingest.transport import PubNubTransport, Received, TransportSettings, timetoken_at

log = get_logger(__name__)
_T = TypeVar("_T")

KAFKA_CHECK_INTERVAL = 5.0
STARTUP_KAFKA_TIMEOUT = 10.0
STATE_REFRESH_SECONDS = 30.0  # state records are rewritten at least this often (liveness, expiry)
# The longest one pass of the checkpoint loop waits for room in a full producer queue (Kafka down or
# slow): the loop feeds the liveness heartbeat, so checkpoints that cannot be queued wait for the next pass.
CHECKPOINT_QUEUE_WAIT = 1.0
# How long a group commit on the membership thread waits on Kafka before it leaves the rest for the
# next pass: the thread must poll its consumer within max.poll.interval.ms (at least 30 s).
GROUP_COMMIT_PATIENCE = 10.0
# A subscription that is live but whose renewal is failing still delivers until it expires.
NOT_READY_STATES = frozenset({"pending", "failed"})
# A former channel (after a restart, or a move at renewal) is drained once PubNub has said it holds nothing more
# for it (a response that was not full), everything read is checkpointed, and neither has moved for
# this long (and at least two checkpoint intervals, so that an exactly-once checkpoint is committed).
DRAIN_QUIET_SECONDS = 5.0
RESTART_WINDOWS_CHECK_SECONDS = 0.5  # how often drains and lapses are looked at


# Python's cyclic GC, with its defaults, took ~10% of the worker's time at full throughput: every
# in-flight record (an entry, an Outcome, its headers) is a tracked container, so generation-0
# collections ran every 700 allocations and full collections walked the whole heap, imports
# included (docs/benchmarks.md).
GC_GENERATION0_THRESHOLD = 50_000


def tune_gc() -> None:
    """For a long-running worker process, once it has started: move everything that exists now
    (modules, config, clients) out of the collector's sight and collect young objects less often.
    Garbage in reference cycles is still collected, in larger batches."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GENERATION0_THRESHOLD, gen1, gen2)


class WorkerStopped(Exception):
    """A stop was requested before the worker finished starting."""


@dataclass(eq=False)  # hashed by identity: the hot path collects the routes a batch touched
class _Route:
    """Everything the hot path needs for one channel, looked up once per message."""

    context: ChannelContext
    progress: SpecProgress
    spec_metrics: SpecMetrics


@dataclass(eq=False)
class _Drain:
    """A spec's former channel, read until nothing is left on it, and recorded in the state record's
    `draining` meanwhile, so that a restart reads it on from its checkpoint.

    After a restart it is read from its recorded checkpoint with a progress of its own, recorded apart
    from the current channel's, so no checkpoint moves past what it still holds unread. After a move at
    renewal it shares the spec's progress (`shared`): the spec's checkpoint already waits for it."""

    recorded: RecordedChannel
    progress: SpecProgress
    observed: tuple[int, int]  # (read up to, checkpointed up to that) when last looked at
    quiet_since: float  # monotonic: since when `observed` has not changed
    shared: bool = False
    checkpoint_before: int = 0  # exactly-once: the checkpoint before the open transaction wrote one


class Worker:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        w = config.worker
        self.worker_id = w.id
        self.metrics = metrics or Metrics()
        catalogue = default_catalogue()
        self.topics = TopicNames(config.topics.prefix, config.topics.routing, catalogue)
        self.spec_topic = self.topics.specs
        self.spec_partitions = config.topics.spec_partitions
        self.pipeline = Pipeline(catalogue, self.topics)
        self.exactly_once = w.delivery_guarantee == "exactly-once"
        self.grouped = w.coordination == "group"
        self.sink: KafkaSink = (
            TransactionalSink(config.kafka, self.metrics, f"{config.topics.prefix}.{self.worker_id}")
            if self.exactly_once else KafkaSink(config.kafka, self.metrics))
        self.transport = PubNubTransport(
            TransportSettings(user_id=self.worker_id, origin=config.ringcentral.pubnub_origin,
                              ssl=config.ringcentral.pubnub_ssl, channels_per_connection=w.channels_per_connection,
                              replay_buffer_messages=w.replay_buffer_messages),
            handler=self._on_notifications, metrics=self.metrics, on_access_denied=self._on_access_denied,
            on_replay_gap=self._on_replay_gap)
        self.heartbeats = Heartbeats()
        self.health = HealthServer(self.metrics, config.metrics.host, config.metrics.port,
                                   liveness=self._liveness, readiness=self._readiness)
        self.manager: SubscriptionManager | None = None
        self.membership: GroupMembership | None = None
        self.fatal_error: str | None = None
        self._routes: dict[str, _Route] = {}  # channel -> route (read lock-free on the hot path)
        self._deliveries: dict[str, Delivery] = {}  # spec id -> current delivery
        self._progress: dict[str, SpecProgress] = {}
        self._restored: dict[str, SpecState] = {}
        self._keys = KeyWrapper(config.ringcentral.client_secret)
        self._wrapped_keys: dict[str, str] = {}  # spec id -> the current delivery's key, wrapped
        self._drains: dict[str, dict[str, _Drain]] = {}  # spec id -> former channel -> its drain
        # spec id -> (when its subscription expired, that subscription's id, the replacement's delivery,
        # "expired" or "gone": see Delivery.lapse_reason)
        self._lapses: dict[str, tuple[float, str, Delivery, str | None]] = {}
        self._restart_windows_thread: threading.Thread | None = None
        self._owned: dict[int, dict[str, SubscriptionSpec]] = {}  # partition -> specs (group mode)
        self._handovers: dict[int, tuple[float, set[str]]] = {}  # partition -> (assigned at, specs not active)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._kafka_ok = False
        self._next_commit = 0.0
        # Exactly-once: checkpoints before the transaction whose commit waits on Kafka (TransactionPending)
        self._uncommitted: dict[str, int] = {}
        self._last_state: dict[str, float] = {}
        self._checkpoint_thread: threading.Thread | None = None
        self._received = self.metrics.notifications_received

    # ---- lifecycle -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask a `start()` that is still waiting for Kafka to give up (signal handlers call this)."""
        self._stop.set()

    def _until_kafka_answers(self, what: str, step: Callable[[], _T]) -> _T:
        """Run a startup step that needs Kafka, retrying with capped backoff while Kafka is unreachable.

        Meanwhile /healthz stays up and /readyz says why the worker is not ready.
        """
        delay = 1.0
        while True:
            try:
                return step()
            except (KafkaException, TimeoutError) as exc:
                self._kafka_ok = False
                self.metrics.kafka_up.set(0)
                error = exc.args[0].name() if exc.args and isinstance(exc.args[0], KafkaError) else str(exc)
                log.warning("kafka.unreachable", step=what, error=error, retry_in=delay)
                if self._stop.wait(delay):
                    raise WorkerStopped(f"stopped while waiting for Kafka ({what})") from None
                delay = min(10.0, delay * 2)

    def start(self) -> None:
        cfg = self.config
        log.info("worker.starting", worker=self.worker_id, coordination=cfg.worker.coordination,
                 guarantee=cfg.worker.delivery_guarantee)
        self.health.start()
        self._until_kafka_answers("create topics", self._ensure_topics)
        self._kafka_ok = True
        self.metrics.kafka_up.set(1)
        self._until_kafka_answers("start the producer", self.sink.start)
        self.transport.start()
        self.manager = SubscriptionManager(
            accounts=build_sessions(cfg, self.metrics), metrics=self.metrics, on_delivery=self._on_delivery,
            renewal_margin=cfg.worker.renewal_margin_seconds, renewal_jitter=cfg.worker.renewal_jitter_seconds,
            expires_in=cfg.worker.expires_in_seconds, adopt_matching=not self.grouped)
        self.manager.start()
        if self.grouped:
            if cfg.worker.apply_specs_on_start and cfg.specs():
                result = apply_specs(cfg.kafka, self.spec_topic, self.spec_partitions, cfg.specs(), prune=False)
                log.info("specs.applied", added=len(result.added), updated=len(result.updated))
            self.membership = GroupMembership(
                cfg.kafka, group_id=self.topics.worker_group, spec_topic=self.spec_topic,
                worker_id=self.worker_id, session_timeout_ms=int(cfg.worker.session_timeout_seconds * 1000),
                owner=self)
            self.membership.start()
        else:
            self._restored = self._until_kafka_answers(
                "restore state", lambda: restore(dict(cfg.kafka), self.topics.state))
            log.info("worker.state_restored", specs=len(self._restored))
            self._check_replay_gaps(self._restored)
            specs = cfg.specs()
            self.metrics.owned_specs.set(len(specs))
            self.manager.set_specs(specs, {s: st.subscription_id for s, st in self._restored.items()})
        self._checkpoint_thread = threading.Thread(target=self._checkpoint_loop, name="checkpoint", daemon=True)
        self._checkpoint_thread.start()
        self._restart_windows_thread = threading.Thread(target=self._restart_windows_loop, name="drains",
                                                        daemon=True)
        self._restart_windows_thread.start()
        log.info("worker.started", worker=self.worker_id, metrics_port=self.health.port)

    def _ensure_topics(self) -> None:
        cfg = self.config
        admin = serve_logs(AdminClient({**cfg.kafka, **kafka_log_config()}))
        partitions, replication = cfg.topics.partitions, cfg.topics.replication_factor
        # A short first timeout: an unreachable Kafka is reported (and retried) within seconds.
        ensure_topics(admin, self.topics.all_output_topics(), partitions=partitions, replication_factor=replication,
                      timeout=STARTUP_KAFKA_TIMEOUT)
        tables = [self.topics.state, *([self.spec_topic] if self.grouped else [])]
        ensure_topics(admin, tables, partitions=self.spec_partitions, replication_factor=replication,
                      config=COMPACTED)

    def stop(self, delete_subscriptions: bool | None = None) -> int:
        """Graceful stop: intake first, then flush within the timeout, then the last checkpoint.

        Returns the number of records Kafka had not acknowledged when the flush timed out (0 = clean).
        Subscriptions stay alive for the next start unless asked to delete them.
        """
        cfg = self.config.worker
        delete = cfg.delete_subscriptions_on_shutdown if delete_subscriptions is None else delete_subscriptions
        log.info("worker.stopping", delete_subscriptions=delete)
        self.transport.stop()
        if self.membership is not None:
            self.membership.stop()  # hands the partitions back: final commit or checkpoint per partition
        self._stop.set()
        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join(5)
        if self._restart_windows_thread is not None:
            self._restart_windows_thread.join(5)
        undelivered = self.sink.flush(cfg.shutdown_timeout_seconds)
        if not self.grouped:
            self._final_checkpoint(list(self._progress), flushed=True)
        if self.manager is not None:
            self.manager.stop(delete_subscriptions=delete)
        self.sink.close()
        self.health.stop()
        log.info("worker.stopped", undelivered=undelivered)
        return undelivered

    def _final_checkpoint(self, spec_ids: list[str], *, flushed: bool = False) -> None:
        """Make everything produced for these specs durable, with its checkpoint (standalone
        exactly-once commits without group metadata: there is no group to be fenced by).
        `flushed`: the caller has just waited for the producer (no second shutdown timeout)."""
        if self.exactly_once:
            self._commit(None, force=True)
        else:
            if not flushed:
                self.sink.flush(self.config.worker.shutdown_timeout_seconds)
            for spec_id in spec_ids:
                self._write_state(spec_id)
            self.sink.flush(5.0)

    # ---- group membership (called on the membership thread) ------------------------------------

    def partition_loaded(self, partition: int, specs: dict[str, SubscriptionSpec]) -> None:
        restored = restore(dict(self.config.kafka), self.topics.state, partitions=[partition])
        self._check_replay_gaps(restored)
        with self._lock:
            self._restored.update(restored)
            self._owned[partition] = dict(specs)
            if specs:
                self._handovers[partition] = (time.monotonic(), set(specs))
        self.metrics.rebalances.labels("assigned").inc()
        self._apply_owned()

    def spec_changed(self, partition: int, spec_id: str, spec: SubscriptionSpec | None) -> None:
        with self._lock:
            owned = self._owned.setdefault(partition, {})
            if spec is None:
                owned.pop(spec_id, None)
            else:
                owned[spec_id] = spec
        self._apply_owned()

    def partitions_revoked(self, partitions: list[int], lost: bool) -> None:
        with self._lock:
            released = [s for p in partitions for s in self._owned.pop(p, {})]
            for p in partitions:
                self._handovers.pop(p, None)
        self.metrics.rebalances.labels("lost" if lost else "revoked").inc()
        if not released:
            return
        for spec_id in released:  # stop intake first, so the last checkpoint covers all that was read
            delivery = self._deliveries.get(spec_id)
            if delivery is not None:
                self.transport.remove_channel(delivery.channel)
            for channel in self._drains.get(spec_id, {}):
                self.transport.remove_channel(channel)
        assert self.manager is not None
        # Stop renewing (the subscriptions live on for the new owner); waits for calls in flight.
        handed = self.manager.release(released)
        for spec_id, subscription_id in handed.items():
            delivery = self._deliveries.get(spec_id)
            if subscription_id and (delivery is None or delivery.subscription_id != subscription_id):
                self._record_subscription(spec_id, subscription_id)  # created while we were handing over
        if self.exactly_once:
            self._hand_over_transactionally(released, lost)
        elif not lost:
            self._final_checkpoint(released)
        with self._lock:
            for spec_id in released:
                self._drop_spec(spec_id)
        self._apply_owned()
        log.info("worker.specs_released", specs=len(released), lost=lost)

    def _record_subscription(self, spec_id: str, subscription_id: str) -> None:
        """Name a subscription that was created or adopted for the spec while we were handing it over
        (no delivery announced for it yet). Only the subscription id changes: the checkpoint and the
        channel it belongs to stay as they were. A record with an empty checkpoint made the next owner
        start from a 30-s lookback: duplicates under exactly-once, and loss where the checkpoint was
        older than the lookback (docs/scaling.md)."""
        delivery, progress = self._deliveries.get(spec_id), self._progress.get(spec_id)
        if delivery is not None and progress is not None:
            recorded: SpecState | None = self._state_record(spec_id, delivery, progress.checkpointed_tt)
        else:
            recorded = self._restored.get(spec_id)
        if recorded is None:
            recorded = SpecState(spec_id, "", subscription_id, "", "", 0, 0.0, self.worker_id)
        elif recorded.subscription_id == subscription_id:
            return  # the record already names it
        state = replace(recorded, subscription_id=subscription_id, updated_at=time.time(), worker_id=self.worker_id)
        # Exactly-once: into the open transaction, committed with the handover.
        self.sink.produce_raw(self.topics.state, spec_id.encode(), state.encode(),
                              partition_for(spec_id, self.spec_partitions))

    def _hand_over_transactionally(self, released: list[str], lost: bool) -> None:
        """Exactly-once handover: nothing produced for a released spec may commit after this point.

        Revoked (cooperative rebalance): commit what was read so far, checkpoints included; the new
        owner resumes right after it. Lost (our session expired, another worker may already own the
        specs): whatever is open must not commit at all, so abort it and read the rest again.
        """
        sink = self.sink
        assert isinstance(sink, TransactionalSink)
        with sink.lock:
            for spec_id in released:
                progress = self._progress.get(spec_id)
                if progress is not None:
                    progress.released = True
            if lost:
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
                            self.fatal_error = f"transaction abort failed: {exc}"
                self._rewind({})
        if not lost:
            self._commit(self.membership.consumer if self.membership else None, force=True)

    def tick(self, consumer: Consumer) -> None:
        if self.exactly_once:
            self._commit(consumer)

    def _apply_owned(self) -> None:
        assert self.manager is not None
        with self._lock:
            specs = [s for owned in self._owned.values() for s in owned.values()]
            known = {s: st.subscription_id for s, st in self._restored.items()}
        self.metrics.owned_specs.set(len(specs))
        self.manager.set_specs(specs, known)

    def _check_replay_gaps(self, restored: dict[str, SpecState]) -> None:
        """Say so when a checkpoint is older than what PubNub still holds: messages may be missing."""
        now = time.time()
        for spec_id, state in restored.items():
            if now - state.updated_at > self.config.worker.replay_buffer_seconds:
                oldest = min((c.timetoken for c in state.recorded_channels() if c.timetoken), default=state.timetoken)
                self._report_gap(spec_id, state.subscription_id, oldest / 1e7, now,
                                 "checkpoint older than the replay buffer")

    def _report_gap(self, spec_id: str, subscription_id: str, missing_from: float, missing_until: float,
                    reason: str, *, counted: bool = False, **extra: object) -> None:
        """A window (unix seconds) whose notifications may be missing; `counted`: the metric already is."""
        if not counted:
            self.metrics.replay_gaps.inc()
        log.warning("replay.gap_suspected", spec=spec_id, subscription_id=subscription_id,
                    missing_from=missing_from, missing_until=missing_until, reason=reason, **extra)

    # ---- control plane -> data plane -----------------------------------------------------------

    def _on_delivery(self, spec_id: str, delivery: Delivery | None) -> None:
        with self._lock:
            previous = self._deliveries.get(spec_id)
            if delivery is None:
                self._drop_spec(spec_id)
                self.sink.produce_raw(self.topics.state, spec_id.encode(), None,
                                      partition_for(spec_id, self.spec_partitions))  # tombstone: spec removed
                return
            self._deliveries[spec_id] = delivery
            previous_key = self._wrapped_keys.get(spec_id)
            self._wrapped_keys[spec_id] = self._wrap(spec_id, delivery)
            self._drains.get(spec_id, {}).pop(delivery.channel, None)  # moved back: no longer a former channel
            progress = self._progress.get(spec_id)
            old_route = self._routes.get(previous.channel) if previous else None
            old_context = old_route.context if old_route else None
            lapse = (delivery.lapsed_since, delivery.lapse_reason)
            lapsed_id = previous.subscription_id if previous else ""
            if progress is None:
                restored = self._restored.get(spec_id)
                progress, old_context = self._resume(spec_id, restored, delivery)
                self._progress[spec_id] = progress
                if restored is not None:
                    lapsed_id = restored.subscription_id
                    if lapse[0] is None:
                        lapse = _lapsed_before(restored, delivery)
            if lapse[0] is not None:
                self._lapses[spec_id] = (lapse[0], lapsed_id, delivery, lapse[1])
            # The previous context keeps the key before a rotation, for notifications still in flight
            # (or, after a restart, still unread since the checkpoint).
            context = ChannelContext.from_delivery(delivery, previous=old_context)
            self._routes[delivery.channel] = _Route(context, progress, self.metrics.spec(spec_id))
            moved = previous is not None and (previous.channel, previous.subscriber_key) != (
                delivery.channel, delivery.subscriber_key)
            if previous is None or moved:
                resume = progress.checkpointed_tt or None
                self.transport.add_channel(delivery.subscriber_key, delivery.channel, resume)
            if moved and previous is not None:
                # The old channel may still hold notifications published before the renewal: read on
                # (its route stays) until drained, however long PubNub takes to hand them over.
                former = RecordedChannel(previous.subscription_id, previous.subscriber_key, previous.channel,
                                         progress.checkpointed_tt, previous_key)
                self._drains.setdefault(spec_id, {})[previous.channel] = _Drain(
                    former, progress, (0, 0), time.monotonic(), shared=True)
            self._note_handover(spec_id)
        log.info("worker.delivery", spec=spec_id, subscription=delivery.subscription_id, moved=bool(moved),
                 rekeyed=bool(previous and previous.encryption_key != delivery.encryption_key))
        if not self.exactly_once:
            self._write_state(spec_id)

    def _wrap(self, spec_id: str, delivery: Delivery) -> str:
        key = delivery.encryption_key
        return self._keys.wrap(key, spec_id, delivery.channel) if key else ""

    def _resume(self, spec_id: str, restored: SpecState | None,
                delivery: Delivery) -> tuple[SpecProgress, ChannelContext | None]:
        """The first delivery of a spec here: resume its channel from the recorded checkpoint, and
        drain every other recorded channel (its subscription gone, or rotated away) from its own.
        Returns the progress, and the recorded context of the same channel (its key may have rotated
        at the first renewal: what is unread since the checkpoint was encrypted with the recorded one)."""
        start_tt, recorded_context = 0, None
        for former in restored.recorded_channels() if restored else []:
            assert restored is not None
            if former.channel == delivery.channel:
                start_tt = former.timetoken
                # Only a fallback: the current key reads the channel too, unless it rotated.
                with contextlib.suppress(UnwrapError):
                    recorded_context = self._recorded_context(spec_id, restored, former)
            else:
                self._start_drain(spec_id, restored, former)
        return SpecProgress(spec_id, start_tt, start_tt, start_tt), recorded_context

    def _recorded_context(self, spec_id: str, restored: SpecState, former: RecordedChannel) -> ChannelContext:
        """The context to read a recorded channel with (UnwrapError: its key cannot be unwrapped)."""
        if former.wrapped_key is None:
            raise UnwrapError("the state record does not hold its key (written by an older version)")
        key = self._keys.unwrap(former.wrapped_key, spec_id, former.channel) if former.wrapped_key else None
        return ChannelContext.from_delivery(Delivery(spec_id, restored.account_id, former.subscription_id,
                                                     former.subscriber_key, former.channel, key, restored.expires_at))

    def _start_drain(self, spec_id: str, restored: SpecState, former: RecordedChannel) -> None:
        """Read a former channel from its checkpoint, with its own progress (lock held); a channel
        whose key cannot be unwrapped is a gap: from its checkpoint until its subscription ended."""
        try:
            context = self._recorded_context(spec_id, restored, former)
        except UnwrapError as exc:
            ended = min(restored.expires_at, time.time()) if restored.expires_at else time.time()
            self._report_gap(spec_id, former.subscription_id, former.timetoken / 1e7, ended,
                             f"recorded channel not readable: {exc}")
            return
        # Nothing of it checkpointed yet: from as far back as PubNub holds.
        tt = former.timetoken or timetoken_at(time.time() - self.config.worker.replay_buffer_seconds)
        progress = SpecProgress(spec_id, tt, tt, tt)
        self._drains.setdefault(spec_id, {})[former.channel] = _Drain(former, progress, (tt, tt), time.monotonic())
        self._routes[former.channel] = _Route(context, progress, self.metrics.spec(spec_id))
        self.transport.add_channel(former.subscriber_key, former.channel, tt)
        log.info("replay.draining", spec=spec_id, subscription_id=former.subscription_id, since=tt / 1e7)

    def _note_handover(self, spec_id: str) -> None:
        for partition, (started, waiting) in list(self._handovers.items()):
            waiting.discard(spec_id)
            if not waiting:
                del self._handovers[partition]
                self.metrics.handover.observe(time.monotonic() - started)

    def _drop_spec(self, spec_id: str) -> None:
        """Forget a spec locally (removed, or handed to another worker); lock held."""
        previous = self._deliveries.pop(spec_id, None)
        self._progress.pop(spec_id, None)
        self._restored.pop(spec_id, None)
        self._last_state.pop(spec_id, None)
        self._wrapped_keys.pop(spec_id, None)
        self._lapses.pop(spec_id, None)
        for channel in self._drains.pop(spec_id, {}):
            self.transport.remove_channel(channel)
            self._routes.pop(channel, None)
        if previous is not None:
            self.transport.remove_channel(previous.channel)
            self._routes.pop(previous.channel, None)
        self.metrics.forget_spec(spec_id)

    def _deliveries_on(self, channels: list[str]) -> list[tuple[str, Delivery]]:
        wanted = set(channels)
        with self._lock:
            return [(spec_id, d) for spec_id, d in self._deliveries.items() if d.channel in wanted]

    def _drains_on(self, channels: list[str]) -> list[tuple[str, _Drain]]:
        wanted = set(channels)
        with self._lock:
            return [(spec_id, d) for spec_id, drains in self._drains.items() for channel, d in drains.items()
                    if channel in wanted]

    def _on_replay_gap(self, channels: list[str], from_tt: int, until_tt: int) -> None:
        reading = [(spec_id, d.subscription_id) for spec_id, d in self._deliveries_on(channels)]
        reading += [(spec_id, d.recorded.subscription_id) for spec_id, d in self._drains_on(channels)]
        for spec_id, subscription_id in dict.fromkeys(reading):  # a rotated channel keeps its subscription id
            self._report_gap(spec_id, subscription_id, from_tt / 1e7, until_tt / 1e7,
                             "catch-up returned a full replay buffer", counted=True)

    def _on_access_denied(self, channels: list[str]) -> None:
        for spec_id, drain in self._drains_on(channels):
            # A former channel PubNub no longer lets us read: what it still holds is lost.
            self._report_gap(spec_id, drain.recorded.subscription_id, drain.progress.acked_tt / 1e7, time.time(),
                             "PubNub denied access to the recorded channel")
            self._end_drain(spec_id, drain.recorded.channel)
        if self.manager is None:
            return
        for spec_id, _ in self._deliveries_on(channels):
            self.manager.report_problem(spec_id, "pubnub-access-denied")

    # ---- after a restart: former channels drained, lapses measured ------------------------------

    def _restart_windows_loop(self) -> None:
        while not self._stop.wait(RESTART_WINDOWS_CHECK_SECONDS):
            try:
                reading = self.transport.reading()
                self._close_lapses(reading)
                self._finish_drains(reading)
            except Exception:
                log.error("worker.drain_check_failed", exc_info=True)

    def _close_lapses(self, reading: set[str]) -> None:
        """A lapse ends when the replacement subscription's channel is read: report its true length."""
        with self._lock:
            closed = [(spec_id, lapse) for spec_id, lapse in self._lapses.items() if lapse[2].channel in reading]
            for spec_id, _ in closed:
                del self._lapses[spec_id]
        now = time.time()
        for spec_id, (since, expired_id, replacement, reason) in closed:
            if reason == "gone":  # since: when it was last known alive, not its end
                self._report_gap(spec_id, expired_id, since, now,
                                 "subscription gone: deleted or expired server-side before its expiry; RingCentral "
                                 "may have published nothing from when it last answered for it until a new "
                                 "subscription was created", replaced_by=replacement.subscription_id)
                continue
            self.metrics.lapses.observe(now - since)
            self._report_gap(spec_id, expired_id, since, now,
                             "subscription lapsed: RingCentral published nothing from its expiry until a new "
                             "subscription was created", lapse_seconds=round(now - since, 2),
                             replaced_by=replacement.subscription_id)

    def _finish_drains(self, reading: set[str]) -> None:
        quiet_for = max(DRAIN_QUIET_SECONDS, 2 * self.config.worker.checkpoint_interval_seconds)
        now = time.monotonic()
        done: list[tuple[str, str]] = []
        with self._lock:
            for spec_id, drains in self._drains.items():
                for channel, drain in drains.items():
                    read_tt = self.transport.last_timetoken(channel) or 0
                    observed = (read_tt, min(read_tt, drain.progress.checkpointed_tt))
                    if channel not in reading or observed != drain.observed:
                        drain.observed, drain.quiet_since = observed, now
                    elif (observed[1] == read_tt and now - drain.quiet_since >= quiet_for
                          and self.transport.caught_up_at(channel) is not None):
                        done.append((spec_id, channel))  # read to its end, and all of it checkpointed
        for spec_id, channel in done:
            self._end_drain(spec_id, channel)

    def _end_drain(self, spec_id: str, channel: str) -> None:
        """Stop reading a former channel and drop it from the spec's state record."""
        with self._lock:
            drain = self._drains.get(spec_id, {}).pop(channel, None)
            if drain is None:
                return
            if not self._drains[spec_id]:
                del self._drains[spec_id]
            self.transport.remove_channel(channel)
            self._routes.pop(channel, None)
            self._last_state.pop(spec_id, None)  # due now: the record must no longer name it
        log.info("replay.drained", spec=spec_id, subscription_id=drain.recorded.subscription_id,
                 until=drain.progress.checkpointed_tt / 1e7)
        if not self.exactly_once:
            self._write_state(spec_id)

    # ---- hot path ------------------------------------------------------------------------------

    def _on_notifications(self, batch: list[Received], received_at: float) -> None:
        routes, process, send = self._routes, self.pipeline.process, self.sink.send
        touched: set[_Route] = set()
        received = 0
        for channel, timetoken, payload, cursor, epoch in batch:
            route = routes.get(channel)
            if route is None:
                continue  # its spec was dropped while the response was in flight
            received += 1
            touched.add(route)
            outcome = process(payload, route.context, timetoken)
            send(outcome, route.progress, timetoken, received_at, cursor=cursor, epoch=epoch)
        # Metrics once per batch: per message they cost more than decryption (docs/benchmarks.md).
        for route in touched:
            route.spec_metrics.last_notification.set(received_at)
        self._received.inc(received)

    # ---- checkpoints, transactions and health --------------------------------------------------

    def _checkpoint_loop(self) -> None:
        interval = self.config.worker.checkpoint_interval_seconds
        next_kafka_check = 0.0
        self.heartbeats.register("checkpoint", max(10.0, interval * 5))
        while not self._stop.wait(interval):
            self.heartbeats.beat("checkpoint")
            try:
                if self.exactly_once:
                    if not self.grouped:
                        self._commit(None)
                else:
                    self._write_checkpoints()
                if time.monotonic() >= next_kafka_check:
                    next_kafka_check = time.monotonic() + KAFKA_CHECK_INTERVAL
                    self._check_kafka()
            except Exception:
                log.error("worker.checkpoint_failed", exc_info=True)

    def _progress_snapshot(self) -> list[tuple[str, SpecProgress]]:
        with self._lock:  # control-plane callbacks add and drop specs concurrently
            return list(self._progress.items())

    def _write_checkpoints(self) -> None:
        now = time.monotonic()
        due = [spec_id for spec_id, progress in self._progress_snapshot()
               if self._state_due(spec_id, progress.acked_tt, progress, now)]
        deadline = now + CHECKPOINT_QUEUE_WAIT
        for written, spec_id in enumerate(due):
            if not self._write_state(spec_id, wait=max(0.0, deadline - time.monotonic())):
                # The producer's queue is full: these stay due (their checkpoints did not move).
                self.metrics.checkpoints_deferred.inc(len(due) - written)
                return

    def _state_due(self, spec_id: str, timetoken: int, progress: SpecProgress, now: float) -> bool:
        """A state record is due when the checkpoint would move, or to refresh the recorded expiry."""
        stale = now - self._last_state.get(spec_id, 0.0) > STATE_REFRESH_SECONDS
        return timetoken > progress.checkpointed_tt or stale or any(
            self._drain_tt(d) > d.progress.checkpointed_tt for d in list(self._drains.get(spec_id, {}).values())
            if not d.shared)

    def _drain_tt(self, drain: _Drain) -> int:
        """Where a former channel's checkpoint may move: acknowledged, or produced into the transaction."""
        return drain.progress.produced_tt if self.exactly_once else drain.progress.acked_tt

    def _write_state(self, spec_id: str, timetoken: int | None = None, *, wait: float | None = None) -> bool:
        """Write the spec's state record; the checkpoint is the acked watermark unless given.
        False if the producer's queue stayed full for `wait` seconds (None: wait for room)."""
        delivery, progress = self._deliveries.get(spec_id), self._progress.get(spec_id)
        if delivery is None or progress is None:
            return True
        tt = progress.acked_tt if timetoken is None else timetoken
        tt = max(tt, progress.checkpointed_tt)
        state = self._state_record(spec_id, delivery, tt)
        if not self.sink.produce_raw(self.topics.state, spec_id.encode(), state.encode(),
                                     partition_for(spec_id, self.spec_partitions), wait=wait):
            return False
        progress.checkpointed_tt = tt
        self._last_state[spec_id] = time.monotonic()
        self.metrics.checkpoints.inc()
        return True

    def _state_record(self, spec_id: str, delivery: Delivery, timetoken: int) -> SpecState:
        # The delivery is announced only when it changes; plain renewals move the expiry recorded here.
        expires_at = self.metrics.subscription_expiry.get(spec_id) or delivery.expires_at
        return SpecState(spec_id, delivery.account_id, delivery.subscription_id, delivery.subscriber_key,
                         delivery.channel, timetoken, time.time(), self.worker_id, expires_at,
                         self._wrapped_keys.get(spec_id), self._draining(spec_id, timetoken))

    def _draining(self, spec_id: str, spec_tt: int) -> tuple[RecordedChannel, ...]:
        """The spec's former channels still draining, each with its checkpoint: the spec's own
        (`spec_tt`) for a shared progress, else its own, moved here."""
        recorded = []
        for drain in list(self._drains.get(spec_id, {}).values()):
            progress = drain.progress
            tt = spec_tt
            if not drain.shared:
                drain.checkpoint_before = progress.checkpointed_tt
                tt = progress.checkpointed_tt = max(self._drain_tt(drain), progress.checkpointed_tt)
            former = drain.recorded
            recorded.append(RecordedChannel(former.subscription_id, former.subscriber_key, former.channel, tt,
                                            former.wrapped_key))
        return tuple(recorded)

    def _commit(self, consumer: Consumer | None, force: bool = False) -> None:
        """Exactly-once: checkpoints into the open transaction, then commit it (every interval).

        On the checkpoint loop (standalone, not forced) nothing waits on Kafka for long, as the loop
        feeds the liveness heartbeat: when a checkpoint cannot be queued within CHECKPOINT_QUEUE_WAIT
        the commit waits for the next pass, and a commit Kafka does not answer is made again every few
        seconds, the heartbeat beating in between (`_waiting_on_kafka`)."""
        now = time.monotonic()
        if not force and (now < self._next_commit or self.fatal_error):
            return
        self._next_commit = now + self.config.worker.checkpoint_interval_seconds
        sink = self.sink
        assert isinstance(sink, TransactionalSink)
        on_loop = consumer is None and not force
        # The checkpoint loop waits on Kafka beating its heartbeat; the membership thread, a handover
        # and a stop only so long (then the call is made again at the next pass, or the transaction
        # ends at the coordinator's timeout, aborted).
        keep_waiting = self._waiting_on_kafka if on_loop else waiting_at_most(GROUP_COMMIT_PATIENCE)
        # Not forced (the checkpoint loop, or the group's membership thread, which must go on polling
        # its consumer): a full producer queue defers the commit rather than waiting for room.
        deadline = now + CHECKPOINT_QUEUE_WAIT
        with sink.lock:
            if sink.unfinished and not self._finish_transaction(keep_waiting):
                return
            committed_before: dict[str, int] = {}  # checkpoints as they stood before this transaction
            for spec_id, progress in self._progress_snapshot():
                if self._state_due(spec_id, progress.produced_tt, progress, now):
                    before = progress.checkpointed_tt
                    wait = None if force else max(0.0, deadline - time.monotonic())
                    if not self._write_state(spec_id, progress.produced_tt, wait=wait):
                        self._defer_commit(committed_before)
                        return
                    committed_before[spec_id] = before
            self._end_transaction(lambda: sink.commit(consumer, keep_waiting), committed_before)

    def _finish_transaction(self, keep_waiting: KeepWaiting | None) -> bool:
        """A pass gave up waiting on Kafka mid-commit: make the call again first (lock held). False
        while Kafka still does not answer, or when the transaction ended aborted (rewound)."""
        sink = self.sink
        assert isinstance(sink, TransactionalSink)
        return self._end_transaction(lambda: sink.finish(keep_waiting), self._uncommitted)

    def _end_transaction(self, end: Callable[[], None], committed_before: dict[str, int]) -> bool:
        """Commit (or finish committing) the open transaction; True once committed. Pending: the
        checkpoints before it are kept for the rewind should it end aborted."""
        try:
            end()
        except TransactionPending:
            self._uncommitted = committed_before
            return False
        except TransactionFailed as exc:
            self._rewind(committed_before)
            if exc.fatal:
                self.fatal_error = f"transaction fenced: {exc}"
                log.error("worker.fenced", error=str(exc))
                self.transport.stop()
            return False
        self._uncommitted = {}
        return True

    def _defer_commit(self, written: dict[str, int]) -> None:
        """The producer's queue is full: commit at the next pass. The checkpoints written into the
        transaction in this pass count as unwritten, so the next pass writes them again (newer)."""
        self.metrics.checkpoints_deferred.inc()
        self._next_commit = 0.0
        for spec_id, before in written.items():
            progress = self._progress.get(spec_id)
            if progress is not None:
                progress.checkpointed_tt = before
            self._last_state.pop(spec_id, None)

    def _waiting_on_kafka(self) -> bool:
        """A transaction call on the checkpoint loop timed out (Kafka down or slow): the loop is alive,
        so it beats its heartbeat; it calls again unless the worker is stopping. Kafka counts as
        unreachable meanwhile (the loop's own check waits for the commit)."""
        self.heartbeats.beat("checkpoint")
        self._kafka_reachable(False)
        return not self._stop.is_set()

    def _rewind(self, committed_before: dict[str, int]) -> None:
        """An aborted transaction hid what it held: read those notifications again from PubNub."""
        with self._lock:
            rewound: set[str] = set()
            for spec_id, progress in self._progress.items():
                if spec_id in committed_before:
                    progress.checkpointed_tt = committed_before[spec_id]
                    self._last_state.pop(spec_id, None)
                if progress.produced_tt > progress.checkpointed_tt:
                    progress.produced_tt = progress.checkpointed_tt
                    rewound.add(spec_id)
                    delivery = self._deliveries.get(spec_id)
                    if delivery is not None:
                        self.transport.rewind(delivery.channel, progress.checkpointed_tt or None)
            for spec_id, drains in self._drains.items():
                for channel, drain in drains.items():
                    progress = drain.progress
                    if drain.shared:  # the spec's progress, rewound above: its old channel goes with it
                        if spec_id in rewound:
                            self.transport.rewind(channel, progress.checkpointed_tt or None)
                        continue
                    if spec_id in committed_before:
                        progress.checkpointed_tt = drain.checkpoint_before
                    if progress.produced_tt > progress.checkpointed_tt:
                        progress.produced_tt = progress.checkpointed_tt
                        self.transport.rewind(channel, progress.checkpointed_tt or None)
        log.warning("worker.rewound", specs=len(self._progress))

    def _check_kafka(self) -> None:
        try:
            self.sink.producer.list_topics(self.topics.state, timeout=3)
            ok = True
        except Exception:
            ok = False
        self._kafka_reachable(ok)

    def _kafka_reachable(self, ok: bool) -> None:
        if ok != self._kafka_ok:
            log.warning("kafka.reachability_changed", reachable=ok)
        self._kafka_ok = ok
        self.metrics.kafka_up.set(1 if ok else 0)

    @property
    def failed(self) -> str | None:
        """Why the worker cannot go on (fenced, or its group membership thread died), or None: the
        process should stop and be started again (`ingest run` exits 3)."""
        if self.fatal_error:
            return self.fatal_error
        if self.membership is not None and self.membership.error is not None:
            return f"group membership failed: {self.membership.error}"
        return None

    def subscriptions_serving(self) -> int:
        """How many owned subscriptions are active with their channel read by the transport: the one
        public "is it serving" check (tests and operators wait on it; nothing reads `_deliveries`)."""
        if self.manager is None:
            return 0
        active = {s.spec_id for s in self.manager.snapshot() if s.state == "active"}
        reading = self.transport.reading()
        with self._lock:
            return sum(1 for spec_id, d in self._deliveries.items() if spec_id in active and d.channel in reading)

    def _liveness(self) -> tuple[bool, str]:
        failed = self.failed
        return (False, failed) if failed else self.heartbeats.check()

    def _readiness(self) -> tuple[bool, str]:
        if not self._kafka_ok:
            return False, "kafka unreachable"
        if self.manager is None:
            return False, "starting"
        now = time.time()
        for status in self.manager.snapshot():
            if status.state == "deleted":
                continue
            if status.expires_at is not None and status.expires_at <= now:
                return False, f"subscription {status.spec_id} has expired ({status.state})"
            if status.state in NOT_READY_STATES or status.expires_at is None:
                return False, f"subscription {status.spec_id} is {status.state}"
        return True, "ok"


def _lapsed_before(restored: SpecState, delivery: Delivery) -> tuple[float | None, str | None]:
    """Whether the recorded subscription lapsed before this (another) one replaced it after a restart
    or handover: (since when, "expired" or "gone" as in Delivery.lapse_reason), or (None, None).
    Replaced before its recorded expiry, it was deleted or expired server-side while no one read it;
    nothing says when, so from when its state record was last written (it was alive then)."""
    if not restored.subscription_id or restored.subscription_id == delivery.subscription_id \
            or restored.expires_at <= 0:
        return None, None
    if restored.expires_at <= time.time():
        return restored.expires_at, "expired"
    return restored.updated_at, "gone"
