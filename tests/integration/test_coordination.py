"""Group membership on a real broker: what a worker of a fresh deployment meets first."""

from __future__ import annotations

import logging
import threading

import pytest
from confluent_kafka import Consumer
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
