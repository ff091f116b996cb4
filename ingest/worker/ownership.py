"""Ownership: which specs this worker serves. Chosen once, by `worker.coordination` (`for_config`).

- `Standalone`: every spec of the config; their state is restored from the state topic at start,
  and the last checkpoint is written after the final flush.
- `Group`: workers share the spec topic through a consumer group; assigned partitions are owned
  specs, with their state restored from the co-partitioned state topic on assignment and handed back
  on revocation (final checkpoint or commit first). All `Owner` calls come from the membership thread.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import Consumer

from ingest.config import Config
from ingest.coordination.group import GroupMembership
from ingest.coordination.specs import apply_specs
from ingest.coordination.state import SpecState, restore
from ingest.model import SubscriptionSpec
from ingest.observability.logs import get_logger
from ingest.observability.metrics import Metrics
from ingest.rc.subscriptions import SubscriptionManager
from ingest.topology import TopicNames
from ingest.worker.channels import SpecChannels
from ingest.worker.checkpointing import Checkpoints

log = get_logger(__name__)
_T = TypeVar("_T")
# Runs a startup step that needs Kafka, retrying while Kafka is unreachable (`Worker._until_kafka_answers`).
UntilKafkaAnswers = Callable[[str, Callable[[], _T]], _T]


class Ownership(ABC):
    adopt_matching: bool  # the control plane may adopt a live subscription that matches a spec

    def __init__(self, config: Config, metrics: Metrics, *, topics: TopicNames, channels: SpecChannels,
                 checkpoints: Checkpoints) -> None:
        self.config = config
        self.metrics = metrics
        self.topics = topics
        self.channels = channels
        self.checkpoints = checkpoints

    @abstractmethod
    def compacted_topics(self) -> list[str]:
        """The compacted topics this ownership reads and writes (created at start)."""

    @abstractmethod
    def start(self, manager: SubscriptionManager, until_kafka_answers: UntilKafkaAnswers[dict[str, SpecState]]) -> None:
        """Take the first specs and hand them to the control plane."""

    @abstractmethod
    def stop(self) -> None:
        """Before the final flush: hand specs back."""

    @abstractmethod
    def after_flush(self) -> None:
        """After the final flush: the last checkpoints of what is still owned."""

    @abstractmethod
    def delivered(self, spec_id: str) -> None:
        """The spec's channel is announced (its subscription is active here)."""

    @property
    @abstractmethod
    def error(self) -> str | None:
        """Why ownership cannot go on, or None."""


class Standalone(Ownership):
    adopt_matching = True

    def compacted_topics(self) -> list[str]:
        return [self.topics.state]

    def start(self, manager: SubscriptionManager, until_kafka_answers: UntilKafkaAnswers[dict[str, SpecState]]) -> None:
        restored = until_kafka_answers("restore state", lambda: restore(dict(self.config.kafka), self.topics.state))
        self.channels.restored = restored
        log.info("worker.state_restored", specs=len(restored))
        self.channels.check_replay_gaps(restored)
        specs = self.config.specs()
        self.metrics.owned_specs.set(len(specs))
        manager.set_specs(specs, {s: st.subscription_id for s, st in restored.items()})

    def stop(self) -> None:
        """Nothing to hand back."""

    def after_flush(self) -> None:
        self.checkpoints.final(list(self.channels.progress), flushed=True)

    def delivered(self, spec_id: str) -> None:
        """Nothing to measure: no handovers."""

    @property
    def error(self) -> str | None:
        return None


class Group(Ownership):
    adopt_matching = False  # a subscription of another member's spec is not ours to adopt

    def __init__(self, config: Config, metrics: Metrics, *, topics: TopicNames, channels: SpecChannels,
                 checkpoints: Checkpoints) -> None:
        super().__init__(config, metrics, topics=topics, channels=channels, checkpoints=checkpoints)
        self.manager: SubscriptionManager | None = None
        self.membership: GroupMembership | None = None
        self._owned: dict[int, dict[str, SubscriptionSpec]] = {}  # partition -> specs
        self._handovers: dict[int, tuple[float, set[str]]] = {}  # partition -> (assigned at, specs not active)

    def compacted_topics(self) -> list[str]:
        return [self.topics.state, self.topics.specs]

    def start(self, manager: SubscriptionManager, until_kafka_answers: UntilKafkaAnswers[dict[str, SpecState]]) -> None:
        cfg = self.config
        self.manager = manager
        # An intent is durable before each creation: should this worker die before a record names what it
        # created, the next owner finds and adopts it (SubscriptionManager: orphans).
        manager.record_intent = self.checkpoints.record_intent
        # And a record naming what it created (channel, key) is durable before the channel is read: the next
        # owner reads that channel, even once the subscription has ended unrenewed.
        manager.record_creation = self.checkpoints.record_creation
        manager.orphan_missing = self._orphan_missing
        if cfg.worker.apply_specs_on_start and cfg.specs():
            result = apply_specs(cfg.kafka, self.topics.specs, cfg.topics.spec_partitions, cfg.specs(), prune=False)
            log.info("specs.applied", added=len(result.added), updated=len(result.updated))
        self.membership = GroupMembership(
            cfg.kafka, group_id=self.topics.worker_group, spec_topic=self.topics.specs,
            worker_id=cfg.worker.id, session_timeout_ms=int(cfg.worker.session_timeout_seconds * 1000), owner=self)
        self.membership.start()

    def stop(self) -> None:
        if self.membership is not None:
            self.membership.stop()  # hands the partitions back: final commit or checkpoint per partition

    def after_flush(self) -> None:
        """Nothing: every partition was handed back with its last checkpoint."""

    @property
    def error(self) -> str | None:
        if self.membership is not None and self.membership.error is not None:
            return f"group membership failed: {self.membership.error}"
        return None

    def delivered(self, spec_id: str) -> None:
        with self.channels.lock:
            for partition, (started, waiting) in list(self._handovers.items()):
                waiting.discard(spec_id)
                if not waiting:
                    del self._handovers[partition]
                    self.metrics.handover.observe(time.monotonic() - started)

    # ---- `Owner`: called on the membership thread ----------------------------------------------

    def partition_loaded(self, partition: int, specs: dict[str, SubscriptionSpec]) -> None:
        restored = restore(dict(self.config.kafka), self.topics.state, partitions=[partition])
        self.channels.check_replay_gaps(restored)
        with self.channels.lock:
            self.channels.restored.update(restored)
            self._owned[partition] = dict(specs)
            if specs:
                self._handovers[partition] = (time.monotonic(), set(specs))
        self.metrics.rebalances.labels("assigned").inc()
        self._apply_owned()

    def spec_changed(self, partition: int, spec_id: str, spec: SubscriptionSpec | None) -> None:
        with self.channels.lock:
            owned = self._owned.setdefault(partition, {})
            if spec is None:
                owned.pop(spec_id, None)
            else:
                owned[spec_id] = spec
        self._apply_owned()

    def partitions_revoked(self, partitions: list[int], lost: bool) -> None:
        with self.channels.lock:
            released = [s for p in partitions for s in self._owned.pop(p, {})]
            for p in partitions:
                self._handovers.pop(p, None)
        self.metrics.rebalances.labels("lost" if lost else "revoked").inc()
        if not released:
            return
        for spec_id in released:  # stop intake first, so the last checkpoint covers all that was read
            self.channels.stop_reading(spec_id)
        assert self.manager is not None and self.membership is not None
        # Stop renewing (the subscriptions live on for the new owner); waits for calls in flight.
        handed = self.manager.release(released)
        for spec_id, subscription_id in handed.items():
            delivery = self.channels.deliveries.get(spec_id)
            if subscription_id and (delivery is None or delivery.subscription_id != subscription_id):
                self.checkpoints.record_subscription(spec_id, subscription_id)  # created while handing over
        self.checkpoints.hand_over(released, lost, self.membership.consumer)
        for spec_id in released:
            self.channels.drop(spec_id)
        self._apply_owned()
        log.info("worker.specs_released", specs=len(released), lost=lost)

    def _orphan_missing(self, spec_id: str, since: float) -> None:
        """A restored intent whose orphan search found nothing alive: whatever the previous owner may have
        created from then on received notifications no record lets anyone read."""
        self.channels.report_gap(spec_id, "", since, time.time(),
                                 "creation intent without a recorded subscription: the previous owner began "
                                 "creating one and no record names it; none created since is alive, so what "
                                 "it may have received cannot be read", intent_since=since)

    def tick(self, consumer: Consumer) -> None:
        self.checkpoints.on_group_tick(consumer)

    def _apply_owned(self) -> None:
        assert self.manager is not None
        with self.channels.lock:
            specs = [s for owned in self._owned.values() for s in owned.values()]
            restored = list(self.channels.restored.values())
        known = {st.spec_id: st.subscription_id for st in restored}
        intents = {st.spec_id: st.creating_since for st in restored if st.creating_since is not None}
        named = {c.subscription_id for st in restored for c in st.recorded_channels()} | set(known.values())
        self.metrics.owned_specs.set(len(specs))
        self.manager.set_specs(specs, known, intents, named)


def for_config(config: Config, metrics: Metrics, *, topics: TopicNames, channels: SpecChannels,
               checkpoints: Checkpoints) -> Ownership:
    """The ownership of the configured `worker.coordination`."""
    kind = Group if config.worker.coordination == "group" else Standalone
    return kind(config, metrics, topics=topics, channels=channels, checkpoints=checkpoints)
