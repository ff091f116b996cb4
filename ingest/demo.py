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
from pathlib import Path
from typing import Any

from ingest import logs
from ingest.metrics import Metrics
from ingest.sandbox.worker_config import write_worker_config

DEMO_FILTERS = {
    "messages": ["/restapi/v1.0/account/~/extension/~/message-store",
                 "/restapi/v1.0/account/~/extension/~/message-store/instant?type=SMS"],
    "presence": ["/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true"],
    "calls": ["/restapi/v1.0/account/~/telephony/sessions", "/restapi/v1.0/account/~/extension"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run; 0 = until Ctrl-C (default 60)")
    parser.add_argument("--rate", type=float, default=50.0, help="generated notifications per second (default 50)")
    parser.add_argument("--malformed-ratio", type=float, default=0.02,
                        help="share of deliberately malformed notifications (default 0.02)")
    parser.add_argument("--subscription-ttl", type=float, default=30.0,
                        help="subscription lifetime in seconds, short so renewals show (default 30)")
    parser.add_argument("--prefix", default="demo", help="topic prefix (default: demo)")
    parser.add_argument("--bootstrap-servers", help="use this Kafka instead of starting a local broker")


def write_demo_config(directory: Path, sandbox: Any, *, bootstrap: str, prefix: str, ttl: float,
                      metrics_port: int = 0) -> Path:
    """A worker config for every sandbox account, renewing well within the short `ttl`."""
    margin = max(2.0, ttl / 3)
    subscriptions = {a.name: list(DEMO_FILTERS.items()) for a in sandbox.accounts}
    return write_worker_config(directory, sandbox.describe(), bootstrap, prefix, subscriptions, partitions=3,
                               metrics_port=metrics_port,
                               worker={"renewal_margin_seconds": margin, "renewal_jitter_seconds": margin / 4,
                                       "expires_in_seconds": int(ttl)})


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


class LiveView:
    """One screen of figures per second, read from the worker's own metrics."""

    def __init__(self, metrics: Metrics, worker: Any) -> None:
        self.metrics, self.worker = metrics, worker
        self._last_total, self._last_t = 0.0, time.monotonic()
        self._tty = sys.stdout.isatty()

    def render(self) -> str:
        m = self.metrics
        published = _total(m.notifications_published)
        now = time.monotonic()
        rate = (published - self._last_total) / max(1e-6, now - self._last_t)
        self._last_total, self._last_t = published, now
        p50, p99 = _quantile(m.lag, 0.5), _quantile(m.lag, 0.99)
        lines = [
            f"published {published:>8.0f}   {rate:7.1f}/s   lag p50 <= {_fmt(p50)}  p99 <= {_fmt(p99)}   "
            f"dead letters {_total(m.notifications_dead_lettered):.0f}   "
            f"renewals {_total(m.renewals):.0f}   duplicates skipped {_total(m.notifications_duplicate):.0f}",
        ]
        wall = time.time()
        for st in sorted(self.worker.manager.snapshot() if self.worker.manager else [], key=lambda s: s.spec_id):
            left = f"{st.expires_at - wall:6.1f}s" if st.expires_at else "   -  "
            lines.append(f"  {st.spec_id:<28} {st.state:<10} expires in {left}  renewals {st.renewals}")
        return "\n".join(lines)

    def show(self) -> None:
        text = self.render()
        if self._tty:
            sys.stdout.write("\x1b[H\x1b[J" + text + "\n")
        else:
            sys.stdout.write(text.splitlines()[0] + "\n")
        sys.stdout.flush()


def _show_first(bootstrap: str, topic: str) -> None:
    """Print one record the way `ingest tail` does (key, headers, value), shortened."""
    from confluent_kafka import Consumer

    from ingest.kafka_logs import kafka_log_config

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"demo-show-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, **kafka_log_config()})
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            headers = {str(k): (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))[:80]
                       for k, v in list(msg.headers() or [])}
            print(f"  key     {(msg.key() or b'').decode()}")
            for name, value in headers.items():
                print(f"  header  {name} = {value}")
            print(f"  value   {(msg.value() or b'').decode('utf-8', 'replace')[:160]}...")
            return
        print("  (none)")
    finally:
        consumer.close()


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:5.2f}s"


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
                print(f"kafka {bootstrap}   ringcentral {sandbox.rc_url}   pubnub http://{sandbox.pubnub_origin}")
                config = load_config(write_demo_config(Path(tmp), sandbox, bootstrap=bootstrap, prefix=args.prefix,
                                                       ttl=args.subscription_ttl))
                metrics = Metrics()
                worker = Worker(config, metrics)
                worker.start()
                print(f"worker metrics: http://127.0.0.1:{worker.health.port}/metrics", flush=True)
                sandbox.generator.start(args.rate, malformed_ratio=args.malformed_ratio)
                view = LiveView(metrics, worker)
                deadline = time.monotonic() + args.duration if args.duration > 0 else float("inf")
                while not stop.wait(1.0) and time.monotonic() < deadline:
                    view.show()
                sandbox.generator.stop()
                worker.stop(delete_subscriptions=True)
                generated = len(sandbox.generator.generated)
                print()
                print(view.render())
                print(f"\ngenerated {generated} notifications; "
                      f"published {_total(metrics.notifications_published):.0f}, "
                      f"dead-lettered {_total(metrics.notifications_dead_lettered):.0f}")
                topics = worker.topics
                for topic in (topics.for_family("message-store"), topics.dead_letter):
                    print(f"\nfirst record of {topic}:")
                    _show_first(bootstrap, topic)
                print("\nto keep the topics after the demo, run a broker of your own (`make kafka`) and pass it:")
                print("  ingest demo --bootstrap-servers HOST:PORT      then      ingest tail -b HOST:PORT TOPIC")
        finally:
            if broker is not None:
                broker.close()
    return 0
