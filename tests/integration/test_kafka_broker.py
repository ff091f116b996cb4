"""The local broker is a real Apache Kafka: idempotence, transactions and compaction work on it."""

from __future__ import annotations

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic


def _create_topic(bootstrap: str, name: str, partitions: int = 1, config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, partitions, 1, config=config or {})], operation_timeout=30)
    futures[name].result(timeout=30)


def _consume_all(bootstrap: str, topic: str, expected: int, isolation: str = "read_committed",
                 idle_limit: int = 10) -> list[tuple[bytes | None, bytes | None]]:
    """Read from the beginning until `expected` records arrived or `idle_limit` empty polls in a row."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"{topic}-reader", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": isolation,
    })
    consumer.subscribe([topic])
    out: list[tuple[bytes | None, bytes | None]] = []
    idle = 0
    try:
        while len(out) < expected or idle < 2:
            msg = consumer.poll(1.0)
            if msg is None:
                idle += 1
                if idle >= idle_limit or (len(out) >= expected and idle >= 2):
                    break
                continue
            idle = 0
            if msg.error():
                raise KafkaException(msg.error())
            out.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return out


def test_idempotent_producer_round_trip(kafka_bootstrap: str, unique_name: str) -> None:
    topic = unique_name
    _create_topic(kafka_bootstrap, topic, partitions=3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    delivered: list[str] = []
    errors: list[object] = []

    def on_delivery(err: object, msg: object) -> None:
        if err is not None:
            errors.append(err)
        else:
            delivered.append(msg.key().decode())  # type: ignore[attr-defined]

    sent = [(f"acct-{i % 5}", f"value-{i}") for i in range(200)]
    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []
    assert len(delivered) == len(sent)

    got = _consume_all(kafka_bootstrap, topic, expected=len(sent))
    assert sorted((k.decode(), v.decode()) for k, v in got if k and v) == sorted(sent)
    # Per-key order is preserved (same key -> same partition, in produce order).
    by_key: dict[str, list[str]] = {}
    for k, v in got:
        assert k is not None and v is not None
        by_key.setdefault(k.decode(), []).append(v.decode())
    for key, values in by_key.items():
        assert values == [v for k, v in sent if k == key]


def test_transaction_abort_invisible_commit_visible(kafka_bootstrap: str, unique_name: str) -> None:
    topic = unique_name
    _create_topic(kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{topic}-tx"})
    producer.init_transactions(30)

    producer.begin_transaction()
    for i in range(5):
        producer.produce(topic, key=b"k", value=f"aborted-{i}".encode())
    producer.flush(30)
    producer.abort_transaction(30)

    producer.begin_transaction()
    for i in range(5):
        producer.produce(topic, key=b"k", value=f"committed-{i}".encode())
    producer.commit_transaction(30)

    committed = [v.decode() for _, v in _consume_all(kafka_bootstrap, topic, expected=5) if v]
    assert committed == [f"committed-{i}" for i in range(5)]

    # read_uncommitted sees the aborted records too: proof that they were written and then hidden.
    everything = [v.decode() for _, v in _consume_all(kafka_bootstrap, topic, expected=10,
                                                      isolation="read_uncommitted") if v]
    assert sorted(everything) == sorted([f"aborted-{i}" for i in range(5)] + committed)


def test_admin_creates_compacted_topic(kafka_bootstrap: str, unique_name: str) -> None:
    topic = unique_name
    _create_topic(kafka_bootstrap, topic, partitions=2, config={"cleanup.policy": "compact"})
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    metadata = admin.list_topics(topic, timeout=10)
    assert len(metadata.topics[topic].partitions) == 2
    resource = ConfigResource("topic", topic)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    assert configs["cleanup.policy"].value == "compact"
