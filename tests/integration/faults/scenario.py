"""The common shape of a fault scenario: sandbox + in-process worker + steady traffic + a reader of
everything the worker wrote, and the zero-loss verdict by notification uuid.

Scenarios use short TTLs, a 1-s PubNub hold and small volumes (tens of notifications per second), so
each one takes seconds. The sandbox buffers 5,000 messages per key: loss past PubNub's real
100-message buffer is a property of PubNub, not of the worker, and is not what these tests measure.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from ingest.config import load_config
from ingest.observability.kafka_stats import BrokerWatch, watch_config
from ingest.sandbox.generator import Generated
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.topology import TopicNames
from ingest.worker.runtime import Worker
from tests.support import WorkerProcess, all_serving, wait_for
from tests.support.harness import Comparison, Record, TopicReader, drain_and_compare, write_config
from tests.support.sandbox import STEADY

FILTERS = {
    "messages": ["/restapi/v1.0/account/~/extension/~/message-store"],
    "presence": ["/restapi/v1.0/account/~/extension/~/presence"],
}
KINDS = ["message-store", "presence"]
RATE = 20.0
# Harmless while a fresh or restarted broker settles: end of partition, topic not created yet,
# group coordinator moving, broker transport down.
IGNORED_CONSUMER_ERRORS = frozenset({KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART,
                                     KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
                                     KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError._TRANSPORT,
                                     KafkaError._ALL_BROKERS_DOWN})  # notifications per second during a scenario


def sandbox_settings(**overrides: Any) -> SandboxSettings:
    return SandboxSettings(**{**STEADY, **overrides})


def worker_config_file(directory: Path, sandbox: Sandbox, bootstrap: str, prefix: str, *,
                       kafka: dict[str, str] | None = None, worker: dict[str, Any] | None = None,
                       accounts: int = 1) -> Path:
    """`write_config` for FILTERS, plus extra librdkafka properties in the `kafka` section."""
    path = write_config(directory, sandbox, bootstrap, prefix, subscriptions=FILTERS, accounts=accounts,
                        worker=worker)
    if kafka:
        doc = yaml.safe_load(path.read_text())
        doc["kafka"].update(kafka)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else value or b""


def _text(value: str | bytes | None) -> str:
    return _bytes(value).decode("utf-8", "replace")


class FaultTolerantReader(TopicReader):
    """A `TopicReader` that rides out retriable consumer errors (NOT_COORDINATOR, transport errors):
    the reader itself lives through the broker outages these scenarios cause. It assigns every
    partition itself instead of joining a consumer group, so a restarted broker's group coordinator
    cannot keep it waiting. A consumer left with no broker for good (librdkafka#5301: seen once as
    the stuck client of an outage test) is replaced by a new one that goes on from where it was."""

    def __post_init__(self) -> None:
        self.topics = TopicNames(self.prefix)
        self._next: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset of the next record
        self._without_brokers = threading.Event()
        self._consumer = self._new_consumer(60)

    def _new_consumer(self, metadata_timeout: float) -> Consumer:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": f"{self.prefix}-verifier-{time.time_ns()}",
            "enable.auto.commit": False, "isolation.level": self.isolation,
            # A position the restarted broker calls out of range must fail the test, not jump to the
            # end (librdkafka's default) and leave what was skipped "missing".
            "auto.offset.reset": "error",
            **watch_config(BrokerWatch("test reader", lambda _reason: self._without_brokers.set())),
        })
        names = self.topics.all_output_topics()
        # Every topic, every partition: a topic the broker's metadata did not list yet (created a moment
        # ago, on a loaded machine) was silently left out, and a family with a single notification in
        # the run then showed as one "missing" notification (the first on its channel, run after run).
        metadata = wait_for(lambda: self._complete_metadata(consumer, names), metadata_timeout,
                            what="metadata of every output topic")
        consumer.assign([TopicPartition(t, p, self._next.get((t, p), OFFSET_BEGINNING))
                         for t in names for p in metadata[t].partitions])
        return consumer

    @staticmethod
    def _complete_metadata(consumer: Consumer, names: list[str]) -> dict[str, Any] | None:
        topics = consumer.list_topics(timeout=10).topics
        complete = all(t in topics and topics[t].error is None and topics[t].partitions
                       and all(p.leader >= 0 for p in topics[t].partitions.values()) for t in names)
        return topics if complete else None

    def poll_until(self, done: Callable[[list[Record]], bool], timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(self.records):
            for msg in self._consumer.consume(500, 0.5):
                err = msg.error()
                if err is not None:
                    if err.retriable() or err.code() in IGNORED_CONSUMER_ERRORS:
                        continue
                    raise KafkaException(err)
                headers = {_text(k): _text(v) for k, v in list(msg.headers() or [])}
                self.records.append(Record(msg.topic() or "", _text(msg.key()), _bytes(msg.value()), headers))
                self._next[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
            if self._without_brokers.is_set():
                self._replace_consumer()
        return self.records

    def _replace_consumer(self) -> None:
        self._without_brokers.clear()
        # Found stuck 30-35 s into an outage, maybe: the new one waits for the broker's return.
        stuck, self._consumer = self._consumer, self._new_consumer(180)
        stuck.close()  # assigned, not subscribed: no group to leave


def order_violations(records: list[Record]) -> list[str]:
    """Per spec and partition (same topic and key), in the order the consumer read them: the records
    whose PubNub timetoken is below the highest one read before them. A duplicate (its uuid, or without
    one its timetoken, read before there) is not one, wherever it comes: at-least-once allows it, and it
    is counted apart (`Traffic.verify`); what a consumer that drops duplicates by uuid sees must be in order."""
    highest: dict[tuple[str, str, str], int] = {}
    read: set[tuple[str, str, str, str]] = set()
    violations = []
    for r in records:
        spec, tt = r.headers.get("spec-id"), r.headers.get("timetoken")
        if spec is None or tt is None:
            continue
        where = (r.topic, r.key, spec)
        notification = (*where, r.headers.get("uuid") or f"timetoken {tt}")
        if notification in read:
            continue
        read.add(notification)
        if int(tt) < highest.get(where, 0):
            violations.append(f"{r.topic} key {r.key} {spec}: {notification[3]} at {tt} after {highest[where]}")
        highest[where] = max(highest.get(where, 0), int(tt))
    return violations


def record_faults(sandbox: Sandbox) -> dict[str, list[float]]:
    """From now on, when (monotonic time) each sandbox fault was applied, by kind. Observation only."""
    fired: dict[str, list[float]] = {}
    take = sandbox.book.take

    def recording_take(kind: str, **match: str) -> Any:
        hit = take(kind, **match)
        if hit is not None:
            fired.setdefault(kind, []).append(time.monotonic())
        return hit

    setattr(sandbox.book, "take", recording_take)  # noqa: B010
    return fired


@dataclass
class Traffic:
    """Steady sandbox traffic and the verdict on what reached Kafka (whoever the worker is)."""

    sandbox: Sandbox
    reader: FaultTolerantReader

    def traffic(self, rate: float = RATE) -> None:
        self.sandbox.generator.start(rate, kinds=KINDS)

    def wait_traffic(self, more: int, timeout: float = 30.0) -> None:
        """Wait until `more` further notifications have been published."""
        target = self.sandbox.generator.count() + more
        wait_for(lambda: self.sandbox.generator.count() >= target, timeout, what=f"{more} more notifications")

    def probe(self, timeout: float = 60.0) -> float:
        """Publish one notification now; seconds until it is in Kafka (the time to recovery when
        called right after a fault)."""
        started = time.monotonic()
        sent = self.sandbox.generator.publish(1, kinds=KINDS)
        assert sent, "no live subscription to publish the probe to"
        uuid = sent[0].uuid
        self.reader.poll_until(lambda rs: any(r.headers.get("uuid") == uuid for r in rs), timeout)
        assert any(r.headers.get("uuid") == uuid for r in self.reader.records), \
            f"the probe never arrived{self._producer_detail()}"
        return time.monotonic() - started

    def _producer_detail(self) -> str:
        """An in-process worker's producer as the probe failed, to tell a producer that does not deliver
        from a reader that does not read (a loaded run once left the queue full 90 s after the restart)."""
        worker: Worker | None = getattr(self, "worker", None)  # a Scenario's in-process worker
        if worker is None:
            return ""
        return (f"; the worker: ingest_kafka_up={worker.metrics.kafka_up._value.get():.0f}, "
                f"{len(worker.sink.producer)} in the producer queue, {worker.sink.acknowledged} acknowledged")

    def verify(self, label: str, timeout: float = 90.0) -> tuple[Comparison, int]:
        """Stop traffic; every good notification must be in its topic (duplicates counted, printed)."""
        generated, result = drain_and_compare(self.sandbox, self.reader, timeout)
        assert result.ok, (f"{label}: {len(result.missing)} of {len(generated)} missing",
                           [self._missing_detail(g) for g in result.missing[:5]], result.wrong[:3])
        duplicates = sum(n - 1 for n in result.duplicates.values())
        print(f"\n[{label}] {len(generated)} notifications, 0 lost, {duplicates} duplicates")
        return result, duplicates

    def _missing_detail(self, missing: Generated) -> str:
        """What a lost notification was and what its channel holds around it in Kafka, to tell a
        notification never read from one read and never delivered."""
        stored = sorted(int(r.headers["timetoken"]) for r in self.reader.records
                        if r.headers.get("subscription-id") == missing.subscription_id and r.headers.get("timetoken"))
        before = [tt for tt in stored if tt < missing.timetoken][-1:]
        after = [tt for tt in stored if tt > missing.timetoken][:1]
        same_event = sum(1 for r in self.reader.records if r.headers.get("event") == missing.event)
        # Anything that carries its timetoken (a dead letter has no uuid header when its payload did not parse).
        same_tt = [f"{r.topic}: {r.headers.get('error-class')} {r.headers.get('error-message')}"
                   for r in self.reader.records if r.headers.get("timetoken") == str(missing.timetoken)]
        worker: Worker | None = getattr(self, "worker", None)  # a Scenario's in-process worker
        sink = [f"{spec}: acked_tt={p.acked_tt} pending={[e.timetoken for e in list(p.pending)[:3]]} held={p.held}"
                for spec, p in (worker.channels.progress_snapshot() if worker else [])
                if (d := worker.channels.deliveries.get(spec)) and d.subscription_id == missing.subscription_id]
        return (f"{missing.channel} tt={missing.timetoken} uuid={missing.uuid} published_at={missing.published_at:.3f}"
                f" stored before={before} after={after}; with its timetoken: {same_tt}; "
                f"{same_event} records of its event {missing.event}; "
                f"the worker's sink: {sink}")

    def out_of_order(self) -> list[str]:
        """`order_violations` of everything read: empty when order held."""
        return order_violations(self.reader.records)

    def lapsed(self) -> list[str]:
        return [v.id for v in self.sandbox.rc.subscriptions(include_dead=True) if v.status == "Expired"]


@dataclass
class Scenario(Traffic):
    """Traffic around an in-process worker that owns `specs` subscriptions."""

    worker: Worker
    specs: int


@contextlib.contextmanager
def scenario(tmp_path: Path, bootstrap: str, prefix: str, *, settings: SandboxSettings | None = None,
             kafka: dict[str, str] | None = None, worker: dict[str, Any] | None = None,
             before_start: Any = None) -> Iterator[Scenario]:
    """Sandbox + started worker with every subscription active and read; stopped (subscriptions deleted)
    on exit. `before_start(worker)` may adjust a not-yet-started worker."""
    with Sandbox(settings or sandbox_settings()) as sandbox:
        config = load_config(worker_config_file(tmp_path, sandbox, bootstrap, prefix, kafka=kafka, worker=worker))
        w = Worker(config)
        if before_start is not None:
            before_start(w)
        w.start()
        reader = FaultTolerantReader(bootstrap, prefix)
        specs = len(config.specs())
        try:
            wait_for(lambda: all_serving(w, specs), 30, what="active subscriptions")
            yield Scenario(sandbox, reader, w, specs)
        finally:
            sandbox.generator.stop()
            reader.close()
            w.stop(delete_subscriptions=True)


class LivenessWatch:
    """Polls a worker's `/healthz` (on the port `port()` names, once known) every 0.2 s in a thread of
    its own, and keeps every answer that was not 200 (with its body), from `with` until the block ends."""

    def __init__(self, port: Callable[[], int | None]) -> None:
        self._port = port
        self.polls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            port = self._port()
            if port is None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                    resp.read()
            except urllib.error.HTTPError as exc:
                self.failures.append(f"{exc.code}: {exc.read().decode(errors='replace')}")
            except OSError as exc:
                self.failures.append(f"no answer: {exc}")
            self.polls += 1

    def __enter__(self) -> LivenessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def close_all(reader: TopicReader | None, *workers: WorkerProcess | None) -> None:
    """A test's `finally`: close the reader and kill every worker process still running."""
    if reader is not None:
        reader.close()
    for worker in workers:
        if worker is not None and worker.alive:
            worker.kill()
