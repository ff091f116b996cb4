"""Scenario 1: throughput of one worker process, with two baselines measured in the same run.

- worker: N encrypted notifications (~1 KiB plaintext, mixed families) across 100 subscriptions
  (10 accounts x 10) are built in the sandbox while the worker's PubNub connections are all
  reading, then released into PubNub's buffer in one tight loop; the clock starts just before the
  release and stops when Kafka has acknowledged all N (acks=all, idempotence). Measured in the
  worker's own process: notifications/s, CPU seconds per 10,000, peak RSS, threads.
- the same drain again with at most 100 messages per subscribe response, as real PubNub answers
  (after the lag phase): every poll costs the worker a fixed amount of CPU.
- lag: afterwards a steady stream at a fixed rate (fresh timestamps) for a few seconds; lag is the
  worker's own `ingest_lag_seconds` observation (Kafka acknowledgement time minus the notification's
  timestamp), recorded exactly, p50/p99.
- baseline (a): the raw confluent-kafka producer (same settings) sending the same decrypted values
  with the same keys and headers to the same broker, then flush: the ceiling of the Kafka leg. It
  runs right before and right after the worker's drain (the machine's speed drifts).
- baseline (b): the naive pipeline (new AES cipher per message, stdlib json, pure-Python
  `jsonschema.validate` with the same schemas, produce), over the same encrypted payloads, for a
  bounded time (it is slow).

The sandbox answers subscribe polls with up to 1,000 messages (real PubNub: 100) and buffers every
notification of the run (real: 100 per channel): the scenario measures the worker, not PubNub's
replay limits.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from ingest.data.catalogue import default_catalogue
from ingest.data.pipeline import ChannelContext, Pipeline
from ingest.model import Delivery
from ingest.sandbox.server import SandboxSettings, demo_accounts
from ingest.sandbox.worker_config import write_worker_config
from ingest.topology import TopicNames, ensure_topics
from tests.bench.common import (
    SPAWN,
    Prepared,
    SandboxProcess,
    cpu_seconds,
    peak_rss_bytes,
    percentile,
    run_in_child,
)

ACCOUNTS = 10
SUBS_PER_ACCOUNT = 10
PER_RESPONSE = 1000
REAL_PER_RESPONSE = 100  # what real PubNub returns per subscribe response at most
PAYLOAD_SIZE = 1024
RawRecord = tuple[str, bytes, bytes, list[tuple[str, bytes]]]  # topic, key, value, headers


def _filters(ext: str) -> list[str]:
    """One extension's mixed families (presence forces encryption, as on the real platform)."""
    base = f"/restapi/v1.0/account/~/extension/{ext}"
    return [f"{base}/message-store", f"{base}/message-store/instant?type=SMS",
            f"{base}/presence?detailedTelephonyState=true", f"{base}/telephony/sessions"]


# ---- the worker in its own process ------------------------------------------------------------


class _LagChildTee:
    """One family's lag histogram child that also records every value it is given."""

    def __init__(self, inner: Any, record: list[float]) -> None:
        self.inner = inner
        self.record = record

    def observe_many(self, values: Any) -> None:
        values = list(values)
        self.inner.observe_many(values)
        self.record.extend(values)


class _LagTee:
    """`metrics.lag` replacement: `.labels(family)` children also record every observed lag."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.values: list[float] = []

    def labels(self, *labels: str) -> _LagChildTee:
        return _LagChildTee(self.inner.labels(*labels), self.values)


def _wait_acknowledged(sink: Any, target: int, timeout: float) -> bool:
    """Until the sink has accounted for `target` acknowledged records (5 ms resolution)."""
    deadline = time.monotonic() + timeout
    while sink.acknowledged < target:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _worker_main(config_path: str, specs: int, conn: Connection) -> None:
    from ingest.config import load_config
    from ingest.worker.cli import tune_gc
    from ingest.worker.runtime import Worker

    worker = Worker(load_config(Path(config_path)))
    lag = _LagTee(worker.metrics.lag)
    worker.metrics.lag = lag  # type: ignore[assignment]
    started = time.monotonic()
    worker.start()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert worker.manager is not None
            states = worker.manager.snapshot()
            channels = {d.channel for d in list(worker.channels.deliveries.values())}
            if (len(states) == specs and all(s.state == "active" for s in states) and len(channels) == specs
                    and channels <= worker.intake.pubnub.reading()):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the worker's subscriptions did not all become active and read")
        tune_gc()  # as `ingest run` does once started
        conn.send({"startup_seconds": round(time.monotonic() - started, 2),
                   "connections": worker.intake.pubnub.connection_count})
        while True:
            command, arg = conn.recv()
            if command == "stop":
                break
            if command == "arm":  # measure the next `arg` deliveries
                start = worker.sink.acknowledged
                cpu0, t0 = cpu_seconds(), time.perf_counter()
                conn.send("armed")
                if not _wait_acknowledged(worker.sink, start + arg, 600):
                    raise RuntimeError(f"only {worker.sink.acknowledged - start} of {arg} acknowledged")
                seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
                conn.send({"notifications": arg, "seconds": seconds, "cpu_seconds": cpu,
                           "threads": threading.active_count(), "peak_rss_bytes": peak_rss_bytes(),
                           "published": sum(s.value for m in worker.metrics.notifications_published.collect()
                                            for s in m.samples if s.name.endswith("_total")),
                           "dead_lettered": sum(s.value for m in worker.metrics.notifications_dead_lettered.collect()
                                                for s in m.samples if s.name.endswith("_total"))})
            elif command == "lag-start":
                lag.values.clear()
                conn.send(worker.sink.acknowledged)
            elif command == "lag-wait":  # wait until `arg` deliveries in total, then report the lags
                _wait_acknowledged(worker.sink, arg, 120)
                values = list(lag.values)
                conn.send({"observed": len(values), "p50_seconds": percentile(values, 0.5),
                           "p99_seconds": percentile(values, 0.99), "max_seconds": max(values, default=None)})
    finally:
        worker.stop(delete_subscriptions=True)
    conn.send("stopped")


class _WorkerProcess:
    def __init__(self, config_path: Path, specs: int) -> None:
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_worker_main, args=(str(config_path), specs, child), daemon=True,
                                  name="bench-worker")
        self.proc.start()
        self.ready: dict[str, Any] = self.recv(240)

    def recv(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.5):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                break
        else:
            return self.conn.recv()
        if not self.conn.poll(0):
            raise TimeoutError(f"the worker process did not answer within {timeout}s (alive: {self.proc.is_alive()})")
        return self.conn.recv()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def send(self, command: str, arg: Any = None) -> None:
        self.conn.send((command, arg))

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.send("stop")
                self.recv(60)
            except (OSError, EOFError, TimeoutError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# ---- baselines (each in its own process) ------------------------------------------------------


def _producer_config(bootstrap: str) -> dict[str, str]:
    from ingest.data.sink import DEFAULT_PRODUCER_CONFIG, REQUIRED_PRODUCER_CONFIG

    return {**DEFAULT_PRODUCER_CONFIG, "bootstrap.servers": bootstrap, **REQUIRED_PRODUCER_CONFIG}


def baseline_raw_producer(bootstrap: str, records: list[RawRecord]) -> dict[str, Any]:
    """Baseline (a): the raw producer, same settings, same records; timed from the first produce to flush."""
    producer = Producer(_producer_config(bootstrap))
    producer.list_topics(timeout=10)  # connected before the clock starts, as the worker is
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    produce, poll = producer.produce, producer.poll
    for topic, key, value, headers in records:
        while True:
            try:
                produce(topic, value, key, headers=headers)  # type: ignore[arg-type]
                break
            except BufferError:
                poll(0.05)
    left = producer.flush(120)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if left:
        raise RuntimeError(f"{left} records not acknowledged")
    return {"notifications": len(records), "seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": peak_rss_bytes()}


def baseline_naive(bootstrap: str, topic: str, items: list[tuple[str, str, str]], budget: float) -> dict[str, Any]:
    """Baseline (b): the naive pipeline + produce, for at most `budget` seconds of processing."""
    from tests.bench.pipeline_micro import NaivePipeline

    naive = NaivePipeline(compiled=False)
    producer = Producer(_producer_config(bootstrap))
    producer.list_topics(timeout=10)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    deadline = t0 + budget
    done = dead = 0
    for i, (payload, key_b64, account) in enumerate(items):
        target, key, value, headers = naive.process(payload, key_b64, account, i)
        dead += target == "dead-letter"
        producer.produce(topic, value, key, headers=headers)  # type: ignore[arg-type]
        producer.poll(0)
        done += 1
        if time.perf_counter() >= deadline:
            break
    producer.flush(60)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"notifications": done, "dead_lettered": dead, "seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_bytes": peak_rss_bytes()}


# ---- the scenario -------------------------------------------------------------------------------


def _rates(result: dict[str, Any]) -> dict[str, Any]:
    n, seconds, cpu = result["notifications"], result["seconds"], result["cpu_seconds"]
    return {**result, "notifications_per_second": n / seconds, "cpu_seconds_per_10k": cpu / n * 10_000}


def _raw_records(prepared: list[Prepared], topics: TopicNames) -> list[RawRecord]:
    """What the worker's pipeline produces for `prepared`: baseline (a)'s input."""
    pipeline = Pipeline(default_catalogue(), topics)
    contexts: dict[str, ChannelContext] = {}
    records = []
    for i, p in enumerate(prepared):
        ctx = contexts.get(p.channel)
        if ctx is None:
            ctx = contexts[p.channel] = ChannelContext.from_delivery(
                Delivery(f"bench/{p.subscription_id}", p.account_id, p.subscription_id, "", p.channel, p.key_b64, 0))
        o = pipeline.process(p.payload, ctx, i + 1)
        records.append((o.topic, o.key, o.value, o.headers))
    return records


def _combined(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Baseline (a) measured just before and just after the worker: both together, and each one."""
    both = {key: before[key] + after[key] for key in ("notifications", "seconds", "cpu_seconds")}
    return {**_rates({**both, "peak_rss_bytes": max(before["peak_rss_bytes"], after["peak_rss_bytes"])}),
            "before": _rates(before), "after": _rates(after)}


def _drain(worker: _WorkerProcess, sandbox: SandboxProcess, notifications: int) -> tuple[dict[str, Any], float]:
    """Release the prepared notifications and wait for the worker to report them all acknowledged;
    returns its measurement and how long the release took."""
    worker.send("arm", notifications)
    if worker.recv(30) != "armed":
        raise RuntimeError("the worker did not arm")
    released_at = time.perf_counter()
    sandbox.call("release")
    release_seconds = time.perf_counter() - released_at
    result: dict[str, Any] = worker.recv(600)
    if result["dead_lettered"]:
        raise RuntimeError(f"{result['dead_lettered']} notifications were dead-lettered")
    return result, release_seconds


def _start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on the worker (threads holding the GIL: what limits it), until SIGINT."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--gil", "--rate", "250", "--format", "raw",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches (no signal for it); the drain must not start before
    return proc


def _stop_profiler(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def run(bootstrap: str, workdir: Path, *, notifications: int = 30_000, lag_rate: float = 2000,
        lag_seconds: float = 5.0, naive_budget: float = 10.0, kafka_admin: Any = None,
        profile_dir: Path | None = None) -> dict[str, Any]:
    stamp = time.strftime("%H%M%S") + f"-{time.time_ns() % 10**6}"
    prefix = f"bench-tp-{stamp}"
    accounts = demo_accounts(ACCOUNTS, extensions_per_account=SUBS_PER_ACCOUNT)
    buffered = 2 * notifications + int(lag_rate * lag_seconds * 2) + 1000  # two drains and the lag phase
    settings = SandboxSettings(accounts=accounts, buffer_size=buffered, max_messages_per_response=PER_RESPONSE,
                               payload_size=PAYLOAD_SIZE, pubnub_hold_seconds=1.0)
    specs = {a.name: [(f"ext{j}", _filters(ext)) for j, ext in enumerate(a.extensions[:SUBS_PER_ACCOUNT])]
             for a in accounts}
    out: dict[str, Any] = {"settings": {
        "notifications": notifications, "subscriptions": ACCOUNTS * SUBS_PER_ACCOUNT,
        "accounts": ACCOUNTS, "payload_size_target": PAYLOAD_SIZE, "sandbox_max_messages_per_response": PER_RESPONSE,
        "real_max_messages_per_response": REAL_PER_RESPONSE,
        "sandbox_buffer_size": settings.buffer_size, "topic_partitions": 6, "lag_rate_per_second": lag_rate,
        "lag_seconds": lag_seconds, "naive_budget_seconds": naive_budget, "worker": "own process (spawn)",
        "channels_per_connection": 50, "producer": _producer_config(bootstrap)}}
    topics_a = TopicNames(f"{prefix}-raw", catalogue=default_catalogue())
    naive_topic = f"{prefix}-naive"
    admin = kafka_admin or AdminClient({"bootstrap.servers": bootstrap})
    # Created now, so that the broker has settled their partitions long before baseline (a) runs.
    ensure_topics(admin, [*topics_a.all_output_topics(), naive_topic], partitions=6, replication_factor=1)
    with SandboxProcess(settings) as sandbox:
        config = write_worker_config(workdir / prefix, sandbox.describe, bootstrap, prefix, specs)
        worker = _WorkerProcess(config, ACCOUNTS * SUBS_PER_ACCOUNT)
        try:
            out["worker_startup"] = worker.ready
            prepared: list[Prepared] = sandbox.call("prepare", notifications, None)
            # Baseline (a) right before and right after the worker's drain, so that the ratio compares
            # like with like on a machine whose speed drifts (docs/benchmarks.md).
            records = _raw_records(prepared, topics_a)
            a_before = run_in_child(baseline_raw_producer, bootstrap, records)
            out["avg_plaintext_bytes"] = sum(len(p.plaintext) for p in prepared) / len(prepared)
            out["avg_payload_chars"] = sum(len(p.payload) for p in prepared) / len(prepared)
            spy = _start_profiler(worker.pid, profile_dir / f"{prefix}.raw") if profile_dir else None
            result, out["release_seconds"] = _drain(worker, sandbox, notifications)
            _stop_profiler(spy)
            out["worker"] = _rates(result)
            a_after = run_in_child(baseline_raw_producer, bootstrap, records)
            out["baseline_a_raw_producer"] = _combined(a_before, a_after)
            # Lag under a steady stream.
            worker.send("lag-start")
            base = worker.recv(30)
            before = sandbox.call("rate", lag_rate, None)
            time.sleep(lag_seconds)
            published = sandbox.call("rate", 0, None) - before
            worker.send("lag-wait", base + published)
            out["lag"] = {**worker.recv(180), "published": published}
            # The same drain again at PubNub's real cap per response: each poll costs the worker a
            # fixed ~1-4 ms (httpx, the SDK), which 1,000 messages per response hide.
            sandbox.call("per_response", REAL_PER_RESPONSE)
            sandbox.call("prepare", notifications, None)
            out["worker_real_cap"] = _rates(_drain(worker, sandbox, notifications)[0])
        finally:
            worker.close()

    items = [(p.payload, p.key_b64, p.account_id) for p in prepared]
    out["baseline_b_naive"] = _rates(run_in_child(baseline_naive, bootstrap, naive_topic, items, naive_budget))
    w = out["worker"]["notifications_per_second"]
    out["ratios"] = {"worker_vs_raw_producer": w / out["baseline_a_raw_producer"]["notifications_per_second"],
                     "worker_vs_naive": w / out["baseline_b_naive"]["notifications_per_second"]}
    return out
