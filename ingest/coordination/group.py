"""Workers share the specs through Kafka: one consumer group on the spec topic.

The partitions a worker is assigned are the specs it owns (cooperative-sticky assignment keeps
movement small when workers come and go). This module owns the group consumer and its thread; it
reads each assigned partition from the beginning (the topic is a table of desired specs, not a
queue), tells the owner when a partition is fully loaded, forwards later changes, and gives the
owner a chance to finish its work on partitions before they are handed over.

Every callback runs on the membership thread, the only thread that touches the consumer. That is
also where exactly-once commits happen (`Owner.tick`), because a transactional commit carries the
consumer's group metadata: a worker fenced by a newer group generation cannot commit (KIP-447).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from ingest.coordination.specs import decode_spec
from ingest.model import SubscriptionSpec
from ingest.observability.kafka_logs import kafka_log_config
from ingest.observability.kafka_stats import BrokerWatch, ClientWithoutBrokers, watch_config
from ingest.observability.logs import get_logger

log = get_logger(__name__)

POLL_SECONDS = 0.05
# Consumer errors that pass: the spec topic a worker has just created is not in every broker's
# metadata yet (seen failing a fresh group for good, with liveness down); the broker is away.
_TRANSIENT = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._TRANSPORT,
                        KafkaError._ALL_BROKERS_DOWN, KafkaError._UNKNOWN_PARTITION, KafkaError._TIMED_OUT,
                        KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE})
UNKNOWN_END = -1  # a partition's end the broker could not give at assignment: asked again while loading
TRANSIENT_LOG_INTERVAL = 10.0
STABLE_OFFSETS_TIMEOUT = 60.0  # longer than any transaction may stay open (transaction.timeout.ms)


class Owner(Protocol):
    """What the worker does with ownership; all calls come from the membership thread."""

    def partition_loaded(self, partition: int, specs: dict[str, SubscriptionSpec]) -> None: ...
    def spec_changed(self, partition: int, spec_id: str, spec: SubscriptionSpec | None) -> None: ...
    def partitions_revoked(self, partitions: list[int], lost: bool) -> None: ...
    def tick(self, consumer: Consumer) -> None: ...


class GroupMembership:
    def __init__(self, kafka_config: Mapping[str, str], *, group_id: str, spec_topic: str, worker_id: str,
                 session_timeout_ms: int, owner: Owner) -> None:
        self.spec_topic = spec_topic
        self.owner = owner
        self._without_brokers: str | None = None  # set by the consumer's BrokerWatch
        self.consumer = Consumer({**self._config(kafka_config, group_id, worker_id, session_timeout_ms),
                                  **kafka_log_config(), **watch_config(BrokerWatch("group consumer", self._stuck))})
        self._loading: dict[int, tuple[int, dict[str, SubscriptionSpec]]] = {}  # partition -> (end, specs)
        self.assigned: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._transient_logged = -TRANSIENT_LOG_INTERVAL

    @staticmethod
    def _config(kafka_config: Mapping[str, str], group_id: str, worker_id: str, session_timeout_ms: int
                ) -> dict[str, Any]:
        return {
            **kafka_config,
            "group.id": group_id,
            "client.id": worker_id,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, session_timeout_ms // 5),
            "max.poll.interval.ms": max(session_timeout_ms, 30000),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # Also makes librdkafka fetch committed offsets with RequireStable (KIP-447): the fetch
            # waits while another member's transaction holds pending offsets (see _finish_loading).
            "isolation.level": "read_committed",
        }

    def start(self) -> None:
        self.consumer.subscribe([self.spec_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self._thread = threading.Thread(target=self._run, name="group-membership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Leave the group: the owner gets `partitions_revoked` for everything (from `close`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self.consumer.poll(POLL_SECONDS)
                if msg is not None:
                    self._on_record(msg)
                if self._without_brokers is not None:  # it never reconnects: the thread ends, the worker exits 3
                    raise ClientWithoutBrokers(self._without_brokers)
                self._check_loaded()
                self.owner.tick(self.consumer)
        except BaseException as exc:  # the worker's health check reports a dead membership thread
            self.error = exc
            log.error("group.failed", exc_info=True)
        finally:
            try:
                self.consumer.close()  # triggers on_revoke for what we hold, then leaves the group
            except Exception:
                log.warning("group.close_failed", exc_info=True)

    def _stuck(self, reason: str) -> None:
        self._without_brokers = reason  # inside the consumer's poll: only record

    # ---- assignment callbacks (inside poll/close, on this thread) -----------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        mine = [TopicPartition(self.spec_topic, tp.partition, OFFSET_BEGINNING) for tp in partitions]
        for tp in mine:
            self._loading[tp.partition] = (self._end_offset(tp.partition, timeout=10), {})
        self.assigned |= {tp.partition for tp in mine}
        consumer.incremental_assign(mine)
        log.info("group.assigned", partitions=sorted(tp.partition for tp in mine))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_up([tp.partition for tp in partitions], lost=False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_up([tp.partition for tp in partitions], lost=True)

    def _give_up(self, partitions: list[int], lost: bool) -> None:
        owned = [p for p in partitions if p in self.assigned]
        for p in partitions:
            self._loading.pop(p, None)
        self.assigned -= set(partitions)
        if owned:
            self.owner.partitions_revoked(owned, lost)
        log.info("group.revoked", partitions=sorted(partitions), lost=lost)

    # ---- the table -----------------------------------------------------------------------------

    def _on_record(self, msg: Any) -> None:
        error = msg.error()
        if error:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            if error.retriable() or error.code() in _TRANSIENT:
                self._log_transient(error)
                return
            if error.code() == KafkaError._MAX_POLL_EXCEEDED:
                # This thread was held up past max.poll.interval.ms (Kafka slow, a long handover):
                # librdkafka has left the group and the partitions went as lost (`_on_lost`). The next
                # poll joins again; raising here ended the thread, and the worker served nothing more.
                log.warning("group.rejoining", reason=error.str())
                return
            raise KafkaException(error)
        partition, key = msg.partition(), msg.key()
        if key is None or partition not in self.assigned:
            return
        spec_id = key.decode()
        value = msg.value()
        try:
            spec = decode_spec(value) if value is not None else None
        except (ValueError, KeyError, TypeError):
            log.warning("group.bad_spec_record", spec=spec_id, partition=partition, offset=msg.offset())
            return
        loading = self._loading.get(partition)
        if loading is not None:
            end, specs = loading
            if spec is None:
                specs.pop(spec_id, None)
            else:
                specs[spec_id] = spec
            if end != UNKNOWN_END and msg.offset() + 1 >= end:
                self._finish_loading(partition)
        else:
            self.owner.spec_changed(partition, spec_id, spec)

    def _log_transient(self, error: KafkaError) -> None:
        now = time.monotonic()
        if now >= self._transient_logged + TRANSIENT_LOG_INTERVAL:
            self._transient_logged = now
            log.warning("group.consumer_error", error=error.name(), reason=error.str(), retrying=True)

    def _check_loaded(self) -> None:
        """A partition is loaded once the position reaches the end seen at assignment."""
        if not self._loading:
            return
        for partition, (known_end, specs) in list(self._loading.items()):
            end = known_end if known_end != UNKNOWN_END else self._end_offset(partition, timeout=1)
            if end == UNKNOWN_END:
                continue
            self._loading[partition] = (end, specs)
            if end == 0:
                self._finish_loading(partition)
                continue
            [tp] = self.consumer.position([TopicPartition(self.spec_topic, partition)])
            if tp.offset >= end:
                self._finish_loading(partition)

    def _end_offset(self, partition: int, timeout: float) -> int:
        """The partition's end now, or UNKNOWN_END while the broker cannot say (it is restarting:
        unknown partition, no leader, transport errors). Raising here, inside the assignment
        callback, ended the membership thread: in the chaos soak a worker exited 3 right after it had
        created subscriptions it had not recorded yet, and what they received was never read."""
        try:
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.spec_topic, partition),
                                                              timeout=timeout, cached=False)
        except KafkaException as exc:
            error = exc.args[0]
            if not (error.retriable() or error.code() in _TRANSIENT):
                raise
            self._log_transient(error)
            return UNKNOWN_END
        return int(high)

    def _finish_loading(self, partition: int) -> None:
        loading = self._loading.pop(partition, None)
        if loading is not None:
            started = time.monotonic()
            # The previous owner may have been paused inside a commit: its transaction already holds
            # this partition's offsets (sent with its old, then valid, group generation) and may still
            # commit, with checkpoints we must see. A read_committed consumer's offset fetch waits
            # until that transaction is committed or aborted (KIP-447), so the state restored next is
            # final.
            self.consumer.committed([TopicPartition(self.spec_topic, partition)], timeout=STABLE_OFFSETS_TIMEOUT)
            self.owner.partition_loaded(partition, loading[1])
            log.info("group.partition_loaded", partition=partition, specs=len(loading[1]),
                     seconds=round(time.monotonic() - started, 3))
