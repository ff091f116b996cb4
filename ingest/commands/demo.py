"""`ingest demo`: the whole product on one machine, with a live view.

A real Kafka broker, the sandbox (RingCentral + PubNub emulators with a few accounts and steady
generated traffic, a few malformed notifications among it) and one worker. Subscriptions are given a
short lifetime so renewals happen while you watch.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.model import TRANSPORTS
from ingest.observability import logs
from ingest.observability.metrics import Metrics
from ingest.sandbox.worker_config import every_account, renewal_settings, write_worker_config

if TYPE_CHECKING:
    from ingest.topology import TopicNames


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run; 0 = until Ctrl-C (default 60)")
    parser.add_argument("--rate", type=float, default=50.0, help="generated notifications per second (default 50)")
    parser.add_argument("--malformed-ratio", type=float, default=0.02,
                        help="share of deliberately malformed notifications (default 0.02)")
    parser.add_argument("--subscription-ttl", type=float, default=30.0,
                        help="subscription lifetime in seconds, short so renewals show (default 30)")
    parser.add_argument("--prefix", default="demo", help="topic prefix (default: demo)")
    parser.add_argument("--bootstrap-servers", help="use this Kafka instead of starting a local broker")
    parser.add_argument("--transport", choices=TRANSPORTS, default="pubnub",
                        help="how the sandbox delivers to the worker (default: pubnub)")


def write_demo_config(directory: Path, sandbox: Any, *, bootstrap: str, prefix: str, ttl: float,
                      metrics_port: int = 0, transport: str = "pubnub") -> Path:
    """A worker config for every sandbox account, renewing well within the short `ttl` (PubNub), or with
    one WebSocket subscription per account."""
    description = sandbox.describe()
    websocket = transport == "websocket"
    return write_worker_config(directory, description, bootstrap, prefix,
                               every_account(description, one_subscription=websocket), partitions=3,
                               metrics_port=metrics_port, worker=renewal_settings(ttl), transport=transport)


def _total(counter: Any) -> float:
    return float(sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")))


def _quantile(histogram: Any, q: float) -> float | None:
    """Approximate a quantile over all label sets from the cumulative buckets."""
    buckets: dict[float, float] = {}
    for metric in histogram.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    if not buckets:
        return None
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    if total == 0:
        return None
    target, lower = q * total, 0.0
    for edge in edges:
        if buckets[edge] >= target:
            return edge if edge != float("inf") else lower
        lower = edge
    return lower


LEGEND = [
    "legend  published: records written to Kafka, per second since the last frame",
    "        lag: PubNub publish time -> Kafka acknowledgement (p50/p99 upper bucket bounds)",
    "        dead letters: undecryptable or invalid notifications, kept with their reason in <prefix>.dead-letter",
    "        renewals: subscriptions renewed before they expire; duplicates skipped: PubNub redeliveries",
]
FRAME_EVERY_PIPED = 10  # seconds between full frames when stdout is not a terminal (a log, CI)
SAMPLE_WIDTH = 110


@dataclass
class Sample:
    key: str
    headers: dict[str, str]
    value: str


@dataclass
class RecentRecords:
    """The newest record and the record count of each output topic, read by a background consumer
    while the demo runs, so that the view shows what downstream consumers receive."""

    bootstrap: str
    topics: list[str]
    newest: dict[str, Sample] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the consumer thread adds topics while the view iterates
        self._thread = threading.Thread(target=self._run, name="demo-records", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        from confluent_kafka import Consumer

        from ingest.observability.kafka_logs import kafka_log_config

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"demo-view-{time.time_ns()}",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False,
                             "isolation.level": "read_committed", "topic.metadata.refresh.interval.ms": 2000,
                             **kafka_log_config()})
        consumer.subscribe(self.topics)
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(500, 0.5):
                    if msg.error() is None:
                        self._keep(msg)
        finally:
            consumer.close()

    def _keep(self, msg: Any) -> None:
        topic = msg.topic() or ""
        headers = {str(k): (v or b"").decode("utf-8", "replace") for k, v in msg.headers() or []}
        sample = Sample((msg.key() or b"").decode("utf-8", "replace"), headers,
                        (msg.value() or b"").decode("utf-8", "replace"))
        with self._lock:
            self.newest[topic] = sample
            self.counts[topic] = self.counts.get(topic, 0) + 1

    def lines(self) -> list[str]:
        out = []
        width = max(map(len, self.topics))
        with self._lock:
            rows = [(topic, self.counts[topic], self.newest[topic]) for topic in sorted(self.newest)]
        for topic, count, sample in rows:
            line = f"  {topic:<{width}} {count:>6}  key {sample.key:<10} {sample.value}"
            out.append(line if len(line) <= SAMPLE_WIDTH else line[:SAMPLE_WIDTH - 3] + "...")
        return out or ["  (none yet)"]


@dataclass
class DemoInfo:
    """What the frame header says: where everything runs and what is injected on purpose."""

    addresses: str
    faults: str
    started: float = field(default_factory=time.monotonic)
    duration: float = 0.0  # 0: until Ctrl-C


class LiveView:
    """One screen per second: title and clock, addresses, the faults injected on purpose, figures read
    from the worker's own metrics, every subscription, the newest record of each topic, a legend."""

    def __init__(self, metrics: Metrics, worker: Any, info: DemoInfo, records: RecentRecords) -> None:
        self.metrics, self.worker, self.info, self.records = metrics, worker, info, records
        self._last_total, self._last_t = 0.0, time.monotonic()
        self._tty = sys.stdout.isatty()
        self._frames = 0

    def clock(self) -> str:
        elapsed = time.monotonic() - self.info.started
        if self.info.duration <= 0:
            return f"{elapsed:4.0f}s elapsed (Ctrl-C stops)"
        return f"{elapsed:4.0f}s elapsed, {max(0.0, self.info.duration - elapsed):3.0f}s left"

    def figures(self) -> str:
        m = self.metrics
        published = _total(m.notifications_published)
        now = time.monotonic()
        rate = (published - self._last_total) / max(1e-6, now - self._last_t)
        self._last_total, self._last_t = published, now
        p50, p99 = _quantile(m.lag, 0.5), _quantile(m.lag, 0.99)
        return (f"published {published:>8.0f}   {rate:7.1f}/s   lag p50 <= {_fmt(p50)}  p99 <= {_fmt(p99)}   "
                f"dead letters {_total(m.notifications_dead_lettered):.0f}   "
                f"renewals {_total(m.renewals):.0f}   duplicates skipped {_total(m.notifications_duplicate):.0f}")

    def subscriptions(self) -> list[str]:
        wall = time.time()
        lines = []
        for st in sorted(self.worker.manager.snapshot() if self.worker.manager else [], key=lambda s: s.spec_id):
            left = f"{st.expires_at - wall:6.1f}s" if st.expires_at else "   -  "
            lines.append(f"  {st.spec_id:<28} {st.state:<10} expires in {left}  renewals {st.renewals}")
        return lines

    def render(self) -> str:
        return "\n".join([
            f"ingest demo: RingCentral push notifications -> Kafka, on this machine      {self.clock()}",
            self.info.addresses, self.info.faults, "", self.figures(), "",
            "subscriptions (spec, state, time to expiry, renewals)", *self.subscriptions(), "",
            "newest record per topic (topic, records so far, key = account id, value)", *self.records.lines(), "",
            *LEGEND,
        ])

    def show(self) -> None:
        self._frames += 1
        if self._tty:
            sys.stdout.write("\x1b[H\x1b[J" + self.render() + "\n")
        elif self._frames % FRAME_EVERY_PIPED == 1:
            sys.stdout.write("\n" + self.render() + "\n\n")
        else:
            sys.stdout.write(f"{self.clock()}   {self.figures()}\n")
        sys.stdout.flush()


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:5.2f}s"


def summary(args: argparse.Namespace, view: LiveView, generated: int, topics: TopicNames) -> list[str]:
    """What the person just saw, and what to run next."""
    metrics, records, dead_letter_topic = view.metrics, view.records, topics.dead_letter
    elapsed = time.monotonic() - view.info.started
    accounts_note = "every sandbox account subscribed to messages, presence and calls"
    out = [
        f"what you saw ({elapsed:.0f}s): the sandbox generated {generated} notifications ({accounts_note});",
        f"  the worker decrypted and validated them and published {_total(metrics.notifications_published):.0f} "
        "to Kafka, one topic per family, keyed by account id;",
        f"  {_total(metrics.notifications_dead_lettered):.0f} went to {dead_letter_topic}: the "
        f"{args.malformed_ratio:.0%} made malformed on purpose, each with its reason (header error-class);",
        f"  {_total(metrics.renewals):.0f} subscription renewals, because the demo gives subscriptions "
        f"{args.subscription_ttl:.0f}s to live (RingCentral: 15 minutes).",
    ]
    message = records.newest.get(topics.for_family("message-store"))
    if message is not None:
        out += ["", "one record as a consumer sees it (headers, then key and value):"]
        out += [f"  header  {k} = {v[:80]}" for k, v in message.headers.items()]
        out += [f"  key     {message.key}", f"  value   {message.value[:160]}..."]
    out += ["", "next: run the sandbox and a worker yourself, each in its own terminal (docs/getting-started.md):",
            "  ingest dev kafka --port 9092",
            "  export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092   # where you run ingest sandbox and ingest tail",
            "  ingest sandbox --write-config sandbox-worker --rate 20",
            "  ingest run --config sandbox-worker/worker.yaml",
            "  ingest tail sandbox.message-store --max 3"]
    if args.bootstrap_servers:
        out += ["this demo's topics stay on your broker:",
                f"  ingest tail -b {args.bootstrap_servers} {args.prefix}.message-store --max 3"]
    return out


def main(args: argparse.Namespace) -> int:
    from ingest.config import load_config
    from ingest.sandbox.kafka import KafkaSetupError, LocalKafka
    from ingest.sandbox.server import Sandbox, SandboxSettings
    from ingest.worker.runtime import Worker

    logs.configure("WARNING")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    broker: LocalKafka | None = None
    with tempfile.TemporaryDirectory(prefix="ingest-demo-") as tmp:
        try:
            if args.bootstrap_servers:
                bootstrap = args.bootstrap_servers
            else:
                print("starting a local Apache Kafka broker (the first run downloads it with mvn) ...", flush=True)
                broker = LocalKafka()
                bootstrap = broker.start()
        except KafkaSetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            settings = SandboxSettings(subscription_ttl_max=args.subscription_ttl, pubnub_hold_seconds=5.0)
            with Sandbox(settings) as sandbox:
                print("starting the sandbox and a worker ...", flush=True)
                config = load_config(write_demo_config(Path(tmp), sandbox, bootstrap=bootstrap, prefix=args.prefix,
                                                       ttl=args.subscription_ttl, transport=args.transport))
                metrics = Metrics()
                worker = Worker(config, metrics)
                worker.start()
                topics = worker.topics
                records = RecentRecords(bootstrap, topics.all_output_topics())
                records.start()
                info = DemoInfo(
                    addresses=f"kafka {bootstrap}   ringcentral {sandbox.rc_url}   pubnub http://{sandbox.pubnub_origin}"
                              f"   worker metrics http://127.0.0.1:{worker.health.port}/metrics",
                    faults=f"on purpose: {args.malformed_ratio:.0%} of notifications malformed (-> dead letters); "
                           + (f"subscriptions live {args.subscription_ttl:.0f}s, not 15 min (-> renewals)"
                              if args.transport == "pubnub" else "over WebSocket: one connection per account"),
                    duration=args.duration)
                sandbox.generator.start(args.rate, malformed_ratio=args.malformed_ratio)
                view = LiveView(metrics, worker, info, records)
                deadline = info.started + args.duration if args.duration > 0 else float("inf")
                while not stop.wait(1.0) and time.monotonic() < deadline:
                    view.show()
                sandbox.generator.stop()
                worker.stop(delete_subscriptions=True)
                records.stop()
                print()
                print(view.render())
                print()
                print("\n".join(summary(args, view, len(sandbox.generator.generated), topics)))
        finally:
            if broker is not None:
                broker.close()
    return 0
