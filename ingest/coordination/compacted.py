"""Reading a compacted topic as a table: the newest value of every key, up to the current end."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from ingest.observability.kafka_logs import kafka_log_config

_NOT_READY = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT)


def read_latest(consumer_config: Mapping[str, str], topic: str, partitions: Iterable[int] | None = None,
                timeout: float = 30.0) -> dict[str, bytes]:
    """key -> value of the newest record per key, tombstoned keys left out.

    Reads with read_committed, so records of aborted transactions are never taken, and up to the
    high watermark, so a transaction still open (a previous owner's commit under way, a paused or
    killed worker's) is waited for until it ends: reading only to the last stable offset (what a
    read_committed consumer's watermarks report) took the checkpoints from before it, and when it
    then committed, its notifications were produced again by the new owner (a duplicate through
    read_committed in the three-worker exactly-once test).
    """
    ends = _high_watermarks(consumer_config, topic, partitions, timeout)
    if not ends:
        return {}
    consumer = Consumer({**consumer_config, "group.id": f"ingest-table-reader-{topic}", **kafka_log_config(),
                         "enable.auto.commit": "false", "isolation.level": "read_committed"})
    try:
        table: dict[str, bytes] = {}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                # The end may be a transaction marker or an aborted record, never delivered: ask position.
                for tp in consumer.position([TopicPartition(topic, p) for p in list(ends)]):
                    if tp.offset >= ends[tp.partition]:
                        del ends[tp.partition]
                continue
            if msg.error():
                raise KafkaException(msg.error())
            key, value = msg.key(), msg.value()
            partition, offset = msg.partition() or 0, msg.offset() or 0
            if key is not None:
                if value is None:
                    table.pop(key.decode(), None)
                else:
                    table[key.decode()] = value
            if offset + 1 >= ends.get(partition, 0):
                ends.pop(partition, None)
        if ends:
            raise TimeoutError(f"reading {topic} did not reach the end of partitions {sorted(ends)} (a transaction "
                               f"still open?)")
        return table
    finally:
        consumer.close()


def _high_watermarks(consumer_config: Mapping[str, str], topic: str, partitions: Iterable[int] | None,
                     timeout: float) -> dict[int, int]:
    """partition -> high watermark (open transactions included), for the non-empty partitions wanted."""
    consumer = Consumer({**consumer_config, "group.id": f"ingest-table-reader-{topic}", **kafka_log_config(),
                         "enable.auto.commit": "false", "isolation.level": "read_uncommitted"})
    try:
        return _end_offsets(consumer, topic, partitions, timeout)
    finally:
        consumer.close()


def _end_offsets(consumer: Consumer, topic: str, partitions: Iterable[int] | None, timeout: float) -> dict[int, int]:
    """partition -> end offset (as the consumer's isolation level sees it), for the non-empty partitions wanted."""
    metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return {}
    ends: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    for p in sorted(metadata.partitions) if partitions is None else sorted(partitions):
        while True:
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                break
            except KafkaException as exc:
                # A topic created a moment ago may not have its leaders yet.
                if exc.args[0].code() not in _NOT_READY or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if high > low:
            ends[p] = high
    return ends
