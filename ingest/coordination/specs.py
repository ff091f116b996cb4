"""The spec topic: key = spec id, value = JSON {spec_id, account, event_filters}; a tombstone removes.

Written with an explicit partition (`partition_for`), like the state topic, so the two are
co-partitioned: the worker that owns spec partition p owns the state records of partition p.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from confluent_kafka import Producer

from ingest.coordination.compacted import read_latest
from ingest.model import SubscriptionSpec
from ingest.observability.kafka_logs import kafka_log_config
from ingest.topology import partition_for


def encode_spec(spec: SubscriptionSpec) -> bytes:
    return json.dumps({"spec_id": spec.spec_id, "account": spec.account, "event_filters": list(spec.event_filters)},
                      separators=(",", ":")).encode()


def decode_spec(value: bytes) -> SubscriptionSpec:
    raw = json.loads(value)
    return SubscriptionSpec(str(raw["spec_id"]), str(raw["account"]), tuple(str(f) for f in raw["event_filters"]))


def read_specs(consumer_config: Mapping[str, str], topic: str, partitions: Iterable[int] | None = None
               ) -> dict[str, SubscriptionSpec]:
    return {key: decode_spec(value) for key, value in read_latest(consumer_config, topic, partitions).items()}


@dataclass(frozen=True)
class ApplyResult:
    added: list[str]
    updated: list[str]
    removed: list[str]
    unchanged: int


def plan_specs(current: Mapping[str, SubscriptionSpec], wanted: Mapping[str, SubscriptionSpec], *,
               prune: bool) -> ApplyResult:
    """What applying `wanted` over `current` changes (nothing is written)."""
    added = sorted(k for k in wanted if k not in current)
    updated = sorted(k for k in wanted if k in current and current[k] != wanted[k])
    removed = sorted(k for k in current if k not in wanted) if prune else []
    return ApplyResult(added, updated, removed, len(wanted) - len(added) - len(updated))


def apply_specs(kafka_config: Mapping[str, str], topic: str, partitions: int, desired: Iterable[SubscriptionSpec],
                *, prune: bool = True) -> ApplyResult:
    """Make the spec topic say `desired`: write new and changed specs, tombstone the others (if `prune`)."""
    wanted = {s.spec_id: s for s in desired}
    plan = plan_specs(read_specs(kafka_config, topic), wanted, prune=prune)
    producer = Producer({**kafka_config, "enable.idempotence": "true", "acks": "all", **kafka_log_config()})
    for spec_id in plan.added + plan.updated:
        producer.produce(topic, encode_spec(wanted[spec_id]), spec_id.encode(),
                         partition=partition_for(spec_id, partitions))
    for spec_id in plan.removed:
        producer.produce(topic, None, spec_id.encode(), partition=partition_for(spec_id, partitions))
    if producer.flush(30) != 0:
        raise RuntimeError(f"Kafka did not acknowledge every spec record written to {topic}")
    return plan
