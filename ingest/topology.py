"""Creating the worker's topics when they are missing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ingest.observability.logs import get_logger

log = get_logger(__name__)

# The state topic keeps only the newest checkpoint per spec.
COMPACTED = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "3600000"}


def ensure_topics(admin: AdminClient, names: Iterable[str], *, partitions: int, replication_factor: int,
                  config: Mapping[str, str] | None = None, timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created."""
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = sorted(set(names) - existing)
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(n, partitions, replication_factor, config=dict(config or {})) for n in missing],
        operation_timeout=timeout, request_timeout=timeout)
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another worker was faster
                raise
    if created:
        log.info("kafka.topics_created", topics=created)
    return created
