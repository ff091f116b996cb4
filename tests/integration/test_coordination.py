"""Group membership on a real broker: what a worker of a fresh deployment meets first."""

from __future__ import annotations

import logging
import threading

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from ingest.coordination.group import GroupMembership
from ingest.coordination.specs import apply_specs
from ingest.model import SubscriptionSpec
from ingest.topology import COMPACTED, ensure_topics
from tests.support import wait_for


class _Owner:
    """Records what the membership hands its owner."""

    def __init__(self) -> None:
        self.loaded: dict[int, dict[str, SubscriptionSpec]] = {}
        self.changed = threading.Event()

    def partition_loaded(self, partition: int, specs: dict[str, SubscriptionSpec]) -> None:
        self.loaded[partition] = specs
        self.changed.set()

    def spec_changed(self, partition: int, spec_id: str, spec: SubscriptionSpec | None) -> None:
        self.loaded.setdefault(partition, {})
        if spec is not None:
            self.loaded[partition][spec_id] = spec
        self.changed.set()

    def partitions_revoked(self, partitions: list[int], lost: bool) -> None:
        for p in partitions:
            self.loaded.pop(p, None)

    def tick(self, consumer: Consumer) -> None:
        pass


def test_a_spec_topic_that_does_not_exist_yet_is_waited_for(kafka_bootstrap: str, unique_name: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The worker creates the spec topic and joins the group at once; a broker that does not know the
    topic yet answers UNKNOWN_TOPIC_OR_PART. That failed the membership for good (liveness down)."""
    config = {"bootstrap.servers": kafka_bootstrap}
    topic = f"{unique_name}.specs"
    owner = _Owner()
    membership = GroupMembership(config, group_id=f"{unique_name}.workers", spec_topic=topic, worker_id="w1",
                                 session_timeout_ms=6000, owner=owner)
    membership.start()
    try:
        # The consumer meets the missing topic before it exists (librdkafka reports it as an error).
        caplog.set_level(logging.WARNING, logger="ingest.coordination.group")
        wait_for(lambda: membership.error is not None or _reported(caplog, "group.consumer_error"), 30,
                 what="the consumer to look for the topic")
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        ensure_topics(admin, [topic], partitions=2, replication_factor=1, config=COMPACTED)
        spec = SubscriptionSpec(spec_id="acme/messages", account="acme",
                                event_filters=("/restapi/v1.0/account/~/extension/~/message-store",))
        apply_specs(config, topic, 2, [spec], prune=False)
        wait_for(lambda: any(spec.spec_id in specs for specs in owner.loaded.values()) or membership.error,
                 90, what="the spec to reach the owner")
        assert membership.error is None, membership.error
        assert any(specs.get(spec.spec_id) == spec for specs in owner.loaded.values())
    finally:
        membership.stop()


def _reported(caplog: pytest.LogCaptureFixture, event: str) -> bool:
    return any(record.getMessage() == event for record in caplog.records)


class _StuckOnce(_Owner):
    """An owner whose first tick after the partitions are loaded holds the membership thread past
    max.poll.interval.ms, as a commit that waited on a slow Kafka did."""

    def __init__(self, hold_seconds: float) -> None:
        super().__init__()
        self.hold_seconds = hold_seconds
        self.held = threading.Event()
        self.lost: list[int] = []

    def partitions_revoked(self, partitions: list[int], lost: bool) -> None:
        if lost:
            self.lost += partitions
        super().partitions_revoked(partitions, lost)

    def tick(self, consumer: Consumer) -> None:
        if self.loaded and not self.held.is_set():
            self.held.set()
            threading.Event().wait(self.hold_seconds)  # the fault: the thread does not poll meanwhile


def test_a_member_held_past_max_poll_interval_rejoins(kafka_bootstrap: str, unique_name: str) -> None:
    """librdkafka leaves the group for a member that did not poll within max.poll.interval.ms (30 s)
    and reports _MAX_POLL_EXCEEDED on the next poll. That ended the membership thread: the worker
    owned nothing more and, before `ingest run` exited 3 on it, served nothing until restarted."""
    config = {"bootstrap.servers": kafka_bootstrap}
    topic = f"{unique_name}.specs"
    ensure_topics(AdminClient(config), [topic], partitions=2, replication_factor=1, config=COMPACTED)
    spec = SubscriptionSpec(spec_id="acme/messages", account="acme",
                            event_filters=("/restapi/v1.0/account/~/extension/~/message-store",))
    apply_specs(config, topic, 2, [spec], prune=False)
    owner = _StuckOnce(hold_seconds=40)
    membership = GroupMembership(config, group_id=f"{unique_name}.workers", spec_topic=topic, worker_id="w1",
                                 session_timeout_ms=6000, owner=owner)
    membership.start()
    try:
        wait_for(owner.held.is_set, 60, what="the partitions loaded and the thread held")
        wait_for(lambda: owner.lost or membership.error, 120, what="the member to leave the group")
        assert membership.error is None, membership.error
        wait_for(lambda: len(owner.loaded) == 2 or membership.error, 120, what="the partitions assigned again")
        assert membership.error is None, membership.error
        assert any(spec.spec_id in specs for specs in owner.loaded.values())
    finally:
        membership.stop()


def test_an_end_offset_the_broker_cannot_give_at_assignment_is_asked_again(
        kafka_bootstrap: str, unique_name: str) -> None:
    """Assigned while the broker restarts, the partition's end offset is unknown (`_UNKNOWN_PARTITION`,
    as a partition the broker does not know yet). Raised from the assignment callback, it ended the
    membership thread: the worker exited 3 right after creating subscriptions it had not recorded
    (the chaos soak, 171 notifications lost). Here: an assignment naming a partition the topic does
    not have (yet); the membership must go on and load the partitions that exist."""
    config = {"bootstrap.servers": kafka_bootstrap}
    topic = f"{unique_name}.specs"
    ensure_topics(AdminClient(config), [topic], partitions=2, replication_factor=1, config=COMPACTED)
    spec = SubscriptionSpec(spec_id="acme/messages", account="acme",
                            event_filters=("/restapi/v1.0/account/~/extension/~/message-store",))
    apply_specs(config, topic, 2, [spec], prune=False)
    owner = _Owner()
    membership = GroupMembership(config, group_id=f"{unique_name}.workers", spec_topic=topic, worker_id="w1",
                                 session_timeout_ms=6000, owner=owner)
    try:
        membership._on_assign(membership.consumer, [TopicPartition(topic, p) for p in (0, 1, 7)])
        assert membership.assigned == {0, 1, 7}

        def loaded() -> bool:  # what the membership thread does, on this thread
            msg = membership.consumer.poll(0.2)
            if msg is not None:
                membership._on_record(msg)
            membership._check_loaded()
            return len(owner.loaded) == 2

        wait_for(loaded, 60, what="the partitions that exist loaded", interval=0)
        assert any(spec.spec_id in specs for specs in owner.loaded.values())
    finally:
        membership.consumer.close()
