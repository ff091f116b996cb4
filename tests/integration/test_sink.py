"""The Kafka sink against a real broker: watermarks, batched delivery accounting, refused records."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from ingest.data.sink import KafkaSink, SpecProgress
from ingest.observability.metrics import INTERNAL_BUCKETS, BatchHistogram, Metrics
from ingest.topology import ensure_topics
from tests.support import wait_for
from tests.support.records import numbered_outcome, read_values

TT = 17_000_000_000_000_000



def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@pytest.fixture
def sink(kafka_bootstrap: str) -> Iterator[KafkaSink]:
    # Unknown topics fail fast (default: retried for 30 s) so that the refusal path is reached quickly.
    sink = KafkaSink({"bootstrap.servers": kafka_bootstrap, "topic.metadata.propagation.max.ms": "1000",
                      "topic.metadata.refresh.interval.ms": "500"}, Metrics())
    sink.start()
    yield sink
    sink.flush(10)
    sink.close()


def test_watermark_and_metrics_follow_acknowledgements(sink: KafkaSink, kafka_bootstrap: str,
                                                       unique_name: str) -> None:
    topic = f"{unique_name}.events"
    ensure_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), [topic], partitions=3, replication_factor=1)
    progress = SpecProgress("spec-a")
    for n in range(1, 201):
        sink.send(numbered_outcome(topic, n, error="schema-violation" if n % 50 == 0 else None), progress, TT + n, 0.0)

    wait_for(lambda: progress.acked_tt == TT + 200, 30, "all 200 acknowledged")
    assert not progress.pending
    assert sink.acknowledged == 200
    metrics = sink._metrics
    assert _sample(metrics, "ingest_notifications_published_total", {"family": "message-store"}) == 196
    assert _sample(metrics, "ingest_notifications_dead_lettered_total",
                   {"family": "message-store", "reason": "schema-violation"}) == 4
    assert _sample(metrics, "ingest_validation_failures_total", {"family": "message-store"}) == 4
    assert _sample(metrics, "ingest_lag_seconds_count", {"family": "message-store"}) == 196
    assert _sample(metrics, "ingest_internal_latency_seconds_count") == 200
    assert sorted(read_values(kafka_bootstrap, topic, 200)) == sorted(b'{"n":%d}' % n for n in range(1, 201))


def test_records_refused_for_a_missing_topic_are_kept_until_it_exists(sink: KafkaSink, kafka_bootstrap: str,
                                                                      unique_name: str) -> None:
    topic = f"{unique_name}.events"  # not created yet (the broker does not auto-create topics)
    progress = SpecProgress("spec-b")
    for n in range(1, 6):
        sink.send(numbered_outcome(topic, n), progress, TT + n, 0.0)

    # Refused by produce() (_UNKNOWN_TOPIC) or failed in delivery (UNKNOWN_TOPIC_OR_PART), depending
    # on whether librdkafka already knows the topic is missing when a record is produced (again).
    def refused() -> float:
        return sum(_sample(sink._metrics, "ingest_kafka_delivery_errors_total", {"error": error})
                   for error in ("_UNKNOWN_TOPIC", "UNKNOWN_TOPIC_OR_PART"))

    wait_for(lambda: refused() >= 5, 30, "the records to be refused")
    assert progress.acked_tt == 0  # nothing acknowledged, so no checkpoint can pass them
    assert len(progress.pending) == 5

    ensure_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), [topic], partitions=1, replication_factor=1)
    wait_for(lambda: progress.acked_tt == TT + 5, 60, "the kept records to be delivered once the topic exists")
    # Held in order and produced again in order: the partition holds them as sent.
    assert read_values(kafka_bootstrap, topic, 5) == [b'{"n":%d}' % n for n in range(1, 6)]


def test_batch_histogram_exposes_what_prometheus_client_would() -> None:
    """Same observations, same exposition text as prometheus_client's Histogram (except `_created`)."""
    values = [0.0, 0.001, 0.0010001, 0.004, 0.05, 0.7, 3.0, 9.99, 10.0, 11.0, 250.0, -1.0]
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "doc", ["family"], buckets=INTERNAL_BUCKETS, registry=theirs)
    batch = BatchHistogram("x_seconds", "doc", ("family",), buckets=INTERNAL_BUCKETS, registry=ours)
    for v in values:
        reference.labels("a").observe(v)
    batch.labels("a").observe_many(values[:5])
    for v in values[5:]:
        batch.labels("a").observe(v)

    def text(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert text(ours) == text(theirs)


def test_a_held_spec_keeps_at_most_a_queue_of_records_then_delivers_them_in_order(
        kafka_bootstrap: str, unique_name: str) -> None:
    # The spec's first record fails (its topic is missing): the spec is held, and newer records wait
    # in the sink. Past queue.buffering.max.messages waiting records, intake waits (back-pressure).
    sink = KafkaSink({"bootstrap.servers": kafka_bootstrap, "queue.buffering.max.messages": "5",
                      "topic.metadata.propagation.max.ms": "1000", "topic.metadata.refresh.interval.ms": "500"},
                     Metrics())
    sink.start()
    topic = f"{unique_name}.events"
    progress = SpecProgress("spec-c")
    sent: list[int] = []

    def intake() -> None:
        for n in range(2, 21):
            sink.send(numbered_outcome(topic, n), progress, TT + n, 0.0)
            sent.append(n)

    try:
        sink.send(numbered_outcome(topic, 1), progress, TT + 1, 0.0)
        wait_for(lambda: progress.held, 30, "the spec to be held")
        thread = threading.Thread(target=intake, daemon=True)
        thread.start()
        wait_for(lambda: sum(e.waiting for e in list(progress.pending)) >= 5, 30, "five records waiting")
        wait_for(lambda: len(sent) >= 4, 30, "intake to queue behind the hold")
        assert thread.is_alive() and len(sent) < 10, sent  # waiting for room, not growing memory
        ensure_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), [topic], partitions=1,
                      replication_factor=1)
        wait_for(lambda: progress.acked_tt == TT + 20, 60, "every record delivered once the topic exists")
        thread.join(10)
        assert read_values(kafka_bootstrap, topic, 20) == [b'{"n":%d}' % n for n in range(1, 21)]
    finally:
        sink.flush(10)
        sink.close()
