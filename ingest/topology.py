"""The topology in one place: topic names, the partition of a spec, and topic creation.

Commands (`ingest status`, `ingest apply`) read names from here without loading the catalogue: only
the per-family topics need it, and they load it when first asked for.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ingest.observability.logs import get_logger

if TYPE_CHECKING:
    from ingest.data.catalogue import Catalogue

log = get_logger(__name__)


class TopicNames:
    """Topic names derived from the configured prefix, with per-family overrides."""

    def __init__(self, prefix: str, routing: Mapping[str, str] | None = None,
                 catalogue: Catalogue | None = None) -> None:
        if not prefix:
            raise ValueError("topics.prefix must not be empty")
        self.prefix = prefix
        self.default = f"{prefix}.events"
        self.dead_letter = f"{prefix}.dead-letter"
        self.state = f"{prefix}.state"
        self.specs = f"{prefix}.specs"  # the compacted spec topic (group mode and `ingest apply`)
        self.worker_group = f"{prefix}.workers"  # the workers' consumer group on the spec topic
        self._routing = dict(routing or {})
        self._catalogue = catalogue
        self._families: dict[str, str] | None = None
        if self._routing:
            self._by_family()  # an unknown family is a configuration error: say so now

    def _by_family(self) -> dict[str, str]:
        if self._families is None:
            from ingest.data.catalogue import default_catalogue  # only output topics need the catalogue

            catalogue = self._catalogue or default_catalogue()
            unknown = sorted(set(self._routing) - set(catalogue.families))
            if unknown:
                raise ValueError(
                    f"topics.routing names unknown families {unknown}; known: {sorted(catalogue.families)}")
            self._families = {
                name: self._routing.get(name) or (f"{self.prefix}.{fam.topic_suffix}" if fam.topic_suffix
                                                   else self.default)
                for name, fam in catalogue.families.items()
            }
        return self._families

    def for_family(self, family: str) -> str:
        """The topic of a family: an override, `<prefix>.<suffix>`, or the default topic."""
        return self._by_family().get(family, self.default)

    def all_output_topics(self) -> list[str]:
        """Every topic records may go to (the state topic is created separately, compacted)."""
        return sorted({*self._by_family().values(), self.default, self.dead_letter})


def partition_for(spec_id: str, partitions: int) -> int:
    """The partition of a spec in the spec topic and in the state topic (CRC-32, stable everywhere).

    It hashes the account part of the spec id ("<account>/<subscription>"), so all specs of an account
    live in one partition and are owned by one worker: one login session per RingCentral user
    (RingCentral allows about five per user and app), and one rate-limit budget in one place. An
    account holds at most 20-30 subscriptions (RingCentral's per-user limit), so this unit stays small.
    """
    return zlib.crc32(spec_id.split("/", 1)[0].encode()) % partitions


# The state and spec topics keep only the newest record per spec.
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
