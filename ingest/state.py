"""Per-spec state in a compacted Kafka topic: the RingCentral subscription id and the checkpoint.

Key: spec id. Value: JSON `SpecState`. A worker restores it on start (or, when scaled out, for the
partitions it is assigned), renews the recorded subscription instead of creating one, and resumes
PubNub from the checkpoint timetoken.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from ingest.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class SpecState:
    spec_id: str
    account_id: str
    subscription_id: str
    subscriber_key: str
    channel: str
    timetoken: int  # every notification of this spec up to here is acknowledged by Kafka
    updated_at: float
    worker_id: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> SpecState:
        return cls(**json.loads(value))


def restore(consumer_config: dict[str, str], topic: str, partitions: Iterable[int] | None = None,
            timeout: float = 30.0) -> dict[str, SpecState]:
    """Read the state topic from the beginning to its current end; the last record per spec wins."""
    consumer = Consumer({**consumer_config, "group.id": "ingest-state-restore", "enable.auto.commit": "false",
                         "isolation.level": "read_committed", "enable.partition.eof": "false"})
    try:
        ends = _end_offsets(consumer, topic, partitions, timeout)
        states: dict[str, SpecState] = {}
        if not ends:
            return states
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                # Under read_committed the end can be an aborted or control record; position tells.
                for tp in consumer.position([TopicPartition(topic, p) for p in list(ends)]):
                    if tp.offset >= ends[tp.partition]:
                        del ends[tp.partition]
                continue
            if msg.error():
                raise KafkaException(msg.error())
            _apply(states, msg.key(), msg.value(), msg.offset())
            partition, offset = msg.partition() or 0, msg.offset() or 0
            if offset + 1 >= ends.get(partition, 0):
                ends.pop(partition, None)
        if ends:
            raise TimeoutError(f"restoring {topic} did not reach the end of partitions {sorted(ends)}")
        return states
    finally:
        consumer.close()


def _end_offsets(consumer: Consumer, topic: str, partitions: Iterable[int] | None, timeout: float) -> dict[int, int]:
    """partition -> end offset, for the non-empty partitions wanted."""
    metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return {}
    ends: dict[int, int] = {}
    for p in sorted(metadata.partitions) if partitions is None else sorted(partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        if high > low:
            ends[p] = high
    return ends


def _apply(states: dict[str, SpecState], key: bytes | None, value: bytes | None, offset: int | None) -> None:
    if key is None:
        return
    if value is None:
        states.pop(key.decode(), None)  # tombstone: the spec was removed
        return
    try:
        states[key.decode()] = SpecState.decode(value)
    except (ValueError, TypeError):
        log.warning("state.undecodable_record", offset=offset)
