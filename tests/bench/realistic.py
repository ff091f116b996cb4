"""Scenario 4: the production regime: many subscriptions, sparse steady traffic, the worker as `ingest run`.

- steady: 2,000 subscriptions (80 accounts x 25, presence) on 40 PubNub connections; the sandbox
  publishes pre-encrypted notifications round-robin over all of them at fixed rates (200, 1,000 and
  3,000/s), then steps the rate up (x1.5) until the worker no longer sustains it. Per rate, over a
  measured window after a warm-up: the worker's CPU per notification (/proc/<pid>/stat, all
  threads), OS threads and RSS (/proc/<pid>/status), subscribe polls/s and messages per poll (as the
  sandbox answered them), lag p50/p99 (each record's broker append time minus its PubNub timetoken:
  the topics are created with LogAppendTime), and the sandbox's and the broker's CPU beside the
  worker's. A rate is sustained when the worker delivers >= 95 % of it in the window, its lag p99
  is <= 1 s and its backlog is gone within 30 s of the traffic stopping.
- idle: 10,000 subscriptions in one `ingest run` with lifetimes shortened to 90 s (the sandbox's
  rate-limit windows shortened by the same factor), no traffic, three renewal cycles: lapses (from
  the sandbox), OS threads, RSS and CPU per 1,000 subscriptions. (With 30 s lifetimes, ~500
  renewals/s, one loaded process had only 5,800 of 10,000 active after 6 minutes: renewals go first.)
- floor: the C-level work per notification in a tight loop, in the same run on the same payloads
  (`Pipeline.process`: Base64, AES, JSON, routing, validation; then `produce()` and `flush()`).

Load generation stays out of the worker's way: the payloads are encrypted once before the clock
starts, and the sandbox's serving path wakes only the polls of the published channel (its CPU is
reported). The sandbox holds polls 10 s (real PubNub: ~280 s) and answers at most 100 messages per
poll, as real PubNub does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from ingest.data.catalogue import default_catalogue
from ingest.data.pipeline import H_TIMETOKEN, ChannelContext, Pipeline
from ingest.model import Delivery
from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import SandboxSettings, demo_accounts
from ingest.sandbox.worker_config import write_worker_config
from ingest.topology import TopicNames, ensure_topics
from tests.bench.common import Prepared, SandboxProcess, cpu_seconds, percentile, run_in_child
from tests.bench.subscriptions import REAL_LIFETIME, SUBS_PER_ACCOUNT, lapses
from tests.support import WorkerProcess, free_port, wait_for

FIXED_RATES = (200, 1000, 3000)
STEP_FACTOR = 1.5
MAX_RATE = 40_000
SUSTAINED_SHARE = 0.95  # of the offered rate delivered within the window
SUSTAINED_P99_SECONDS = 1.0
CHANNELS_PER_CONNECTION = 50  # the worker's default
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
LIVE_STATES = ("active", "renewing")  # created and live (ingest_subscriptions{state})


def _presence(ext: str) -> list[str]:
    return [f"/restapi/v1.0/account/~/extension/{ext}/presence"]


def _specs(accounts: list[Any], subscriptions: int) -> dict[str, list[tuple[str, list[str]]]]:
    specs: dict[str, list[tuple[str, list[str]]]] = {}
    left = subscriptions
    for a in accounts:
        take = min(SUBS_PER_ACCOUNT, left)
        left -= take
        specs[a.name] = [(f"ext{j}", _presence(ext)) for j, ext in enumerate(a.extensions[:take])]
    return specs


# ---- processes seen from /proc --------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid`, all its threads (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def proc_status(pid: int) -> tuple[int, int]:
    """(OS threads, resident bytes) of process `pid`."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Threads", "VmRSS"):
                values[name] = int(rest.split()[0])
    return values["Threads"], values["VmRSS"] * 1024


def listener_pid(port: int) -> int | None:
    """The process listening on TCP `port` (the broker), if it is ours to read; None otherwise."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        inodes.add(f"socket:[{parts[9]}]")
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


# ---- the steady scenario ----------------------------------------------------------------------------


@dataclass
class Sample:
    """Counters of the measured parties at one instant."""

    at: float
    worker_cpu: float
    sandbox_cpu: float
    broker_cpu: float | None
    published: float
    polls: int
    served: int
    replayed: int

    @classmethod
    def take(cls, rig: Rig) -> Sample:
        stats = rig.sandbox.call("stats")
        return cls(time.time(), proc_cpu_seconds(_pid(rig.worker)), proc_cpu_seconds(rig.sandbox.pid),
                   proc_cpu_seconds(rig.broker) if rig.broker else None,
                   rig.worker.metric("ingest_notifications_published_total"), stats["polls"],
                   stats["messages_served"], stats["replayed"])


@dataclass
class Rig:
    """The parties of the steady scenario."""

    worker: WorkerProcess
    sandbox: SandboxProcess
    broker: int | None  # the broker's pid, if readable
    bootstrap: str
    topics: list[str]  # the output topics whose records carry the lags


def _window(a: Sample, b: Sample, rate: float) -> dict[str, Any]:
    seconds = b.at - a.at
    delivered = b.published - a.published
    polls = b.polls - a.polls
    return {
        "rate_offered": rate, "seconds": seconds, "published": b.replayed - a.replayed, "delivered": delivered,
        "delivered_per_second": delivered / seconds,
        "worker_cores": (b.worker_cpu - a.worker_cpu) / seconds,
        "worker_cpu_us_per_notification": (b.worker_cpu - a.worker_cpu) / delivered * 1e6 if delivered else None,
        "sandbox_cores": (b.sandbox_cpu - a.sandbox_cpu) / seconds,
        "broker_cores": None if a.broker_cpu is None or b.broker_cpu is None
        else (b.broker_cpu - a.broker_cpu) / seconds,
        "polls_per_second": polls / seconds,
        "messages_per_poll": (b.served - a.served) / polls if polls else None,
    }


def record_lags(bootstrap: str, topics: list[str], since: float, until: float, timeout: float = 60) -> list[float]:
    """Seconds from PubNub publish (the record's timetoken header) to the broker's append (the record's
    LogAppendTime) of every record in `topics` published between `since` and `until` (Unix seconds)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-lag-{time.time_ns()}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        metadata = consumer.list_topics(timeout=30)
        wanted = [TopicPartition(t, p, int(since * 1000)) for t in topics for p in metadata.topics[t].partitions]
        starts = consumer.offsets_for_times(wanted, timeout=30)
        assigned = [tp for tp in starts if tp.offset >= 0]  # -1: nothing appended since
        consumer.assign(assigned)
        left = {(tp.topic, tp.partition) for tp in assigned}
        lags: list[float] = []
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for msg in consumer.consume(2000, 1.0):
                if msg.error():
                    left.discard((msg.topic(), msg.partition()))  # partition EOF
                    continue
                timetoken = dict(msg.headers() or []).get(H_TIMETOKEN)
                published = int(timetoken) / 1e7 if timetoken else 0
                if since <= published <= until:
                    lags.append(msg.timestamp()[1] / 1000 - published)
        return lags
    finally:
        consumer.close()


def _step(rig: Rig, rate: float, warmup: float, window: float, profile: Path | None = None) -> dict[str, Any]:
    """One rate: warm up, measure a window, stop the traffic and wait for the backlog, read the lags.
    With `profile`, py-spy records the worker over the window (all threads, native frames, idle off)."""
    rig.sandbox.call("steady", rate)
    time.sleep(warmup)  # the rate settles before the window opens (a measured interval, not a wait for an event)
    spy = _start_profiler(_pid(rig.worker), profile / f"rate-{rate:.0f}.txt", window) if profile else None
    first = Sample.take(rig)
    threads = []
    rss = []
    while time.time() - first.at < window:
        time.sleep(1.0)
        t, r = proc_status(_pid(rig.worker))
        threads.append(t)
        rss.append(r)
    last = Sample.take(rig)
    if spy is not None:
        spy.wait(60)
    sent = rig.sandbox.call("steady", 0)
    drained_at = time.monotonic()
    drained = _wait_quietly(lambda: rig.worker.metric("ingest_notifications_published_total") >= sent, 30)
    lags = record_lags(rig.bootstrap, rig.topics, first.at, last.at)
    out = _window(first, last, rate)
    out.update({
        "lag_p50_seconds": percentile(lags, 0.5), "lag_p99_seconds": percentile(lags, 0.99),
        "lag_max_seconds": max(lags, default=None), "lag_records": len(lags),
        "backlog_drain_seconds": time.monotonic() - drained_at if drained else None,
        "os_threads": max(threads, default=0), "rss_bytes": max(rss, default=0)})
    out["sustained"] = bool(drained and out["delivered"] >= SUSTAINED_SHARE * out["published"]
                            and out["lag_p99_seconds"] is not None
                            and out["lag_p99_seconds"] <= SUSTAINED_P99_SECONDS)
    return out


def _start_profiler(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy over the measured window: every thread, idle ones left out, C frames included (collapsed
    stacks; the profiled window's CPU figures include py-spy's sampling interruptions)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--native", "--rate", "200", "--format", "raw",
                             "--duration", str(round(seconds)), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _pid(worker: WorkerProcess) -> int:
    assert worker.proc is not None
    return worker.proc.pid


def _wait_quietly(predicate: Callable[[], bool], timeout: float) -> bool:
    """`wait_for`, answering False instead of failing at the deadline."""
    try:
        wait_for(predicate, timeout, what="the worker's backlog", interval=0.2)
        return True
    except AssertionError:
        return False


def floor(bootstrap: str, topics_prefix: str, prepared: list[Prepared], repeat: int) -> dict[str, Any]:
    """The C-level work per notification in a tight loop (in its own process): `Pipeline.process`
    and `produce()`, then `flush()`, over the scenario's payloads."""
    from ingest.data.sink import DEFAULT_PRODUCER_CONFIG, REQUIRED_PRODUCER_CONFIG

    pipeline = Pipeline(default_catalogue(), TopicNames(topics_prefix, catalogue=default_catalogue()))
    producer = Producer({**DEFAULT_PRODUCER_CONFIG, "bootstrap.servers": bootstrap, **REQUIRED_PRODUCER_CONFIG})
    producer.list_topics(timeout=10)
    contexts = {p.channel: ChannelContext.from_delivery(
        Delivery(f"bench/{p.subscription_id}", p.account_id, p.subscription_id, "", p.channel, p.key_b64, 0))
        for p in prepared}
    process, produce, poll = pipeline.process, producer.produce, producer.poll

    def loop(rounds: int, first: int) -> int:
        n = first
        for _ in range(rounds):
            for p in prepared:
                n += 1
                o = process(p.payload, contexts[p.channel], n)
                if o.error is not None:
                    raise RuntimeError(f"the floor's payload was dead-lettered: {o.error}")
                while True:
                    try:
                        produce(o.topic, o.value, o.key, headers=o.headers)  # type: ignore[arg-type]
                        break
                    except BufferError:
                        poll(0.05)
        if producer.flush(120):
            raise RuntimeError("the floor's records were not all acknowledged")
        return n - first

    first = loop(1, 0)  # warm: schemas compiled, caches filled, connections made
    cpu0, thread0 = cpu_seconds(), time.thread_time()
    n = loop(repeat, first)
    return {"notifications": n, "cpu_us_per_notification": (cpu_seconds() - cpu0) / n * 1e6,
            "loop_thread_us_per_notification": (time.thread_time() - thread0) / n * 1e6}


def _next_rate(results: list[dict[str, Any]]) -> float | None:
    """The next rate of the step search, or None when it is over: up by STEP_FACTOR from the highest
    sustained rate while the last step held; once one failed, halfway back between the two."""
    held = [float(r["rate_offered"]) for r in results if r["sustained"]]
    failed = [float(r["rate_offered"]) for r in results if not r["sustained"]]
    best = max(held, default=0.0)
    above = min((f for f in failed if f > best), default=None)
    if above is None:
        nxt = best * STEP_FACTOR if best else min(FIXED_RATES) / 2
        return nxt if nxt <= MAX_RATE else None
    if above / max(best, 1) <= 1.25:  # within 25 %: good enough for a 3-run median
        return None
    return round((best + above) / 2, -1) if best else round(above / 2, -1)


def run_steady(bootstrap: str, workdir: Path, *, subscriptions: int = 2000, warmup: float = 2.0,
               window: float = 6.0, search_steps: int = 3, rates: tuple[float, ...] = FIXED_RATES,
               profile: Path | None = None, producer: dict[str, str] | None = None) -> dict[str, Any]:
    accounts = demo_accounts(-(-subscriptions // SUBS_PER_ACCOUNT), extensions_per_account=SUBS_PER_ACCOUNT)
    settings = SandboxSettings(accounts=accounts, pubnub_hold_seconds=10.0, buffer_size=500_000,
                               max_messages_per_response=100)
    prefix = f"bench-real-{time.strftime('%H%M%S')}-{time.time_ns() % 10**6}"
    names = TopicNames(prefix, catalogue=default_catalogue())
    output = [t for t in names.all_output_topics() if t != names.dead_letter]
    # LogAppendTime: a record's timestamp is when the broker appended it (what the lag is measured to).
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), names.all_output_topics(), partitions=6,
                  replication_factor=1, config={"message.timestamp.type": "LogAppendTime"})
    broker = listener_pid(int(bootstrap.split(",", maxsplit=1)[0].rsplit(":", 1)[1]))
    out: dict[str, Any] = {"settings": {
        "subscriptions": subscriptions, "accounts": len(accounts), "per_account": SUBS_PER_ACCOUNT,
        "channels_per_connection": CHANNELS_PER_CONNECTION, "fixed_rates": list(rates),
        "warmup_seconds": warmup, "window_seconds": window, "step_factor": STEP_FACTOR,
        "sustained_share": SUSTAINED_SHARE, "sustained_p99_seconds": SUSTAINED_P99_SECONDS,
        "pubnub_hold_seconds": settings.pubnub_hold_seconds,
        "max_messages_per_response": settings.max_messages_per_response,
        "broker_cpu_measured": broker is not None, "worker": "`ingest run` (subprocess)"}}
    with SandboxProcess(settings) as sandbox:
        port = free_port()
        config = write_worker_config(workdir / prefix, sandbox.describe, bootstrap, prefix,
                                     _specs(accounts, subscriptions), metrics_port=port)
        if producer:  # producer settings to compare (the `kafka:` section of the worker's config)
            doc = yaml.safe_load(config.read_text())
            doc["kafka"].update(producer)
            config.write_text(yaml.safe_dump(doc))
            out["settings"]["producer"] = producer
        worker = WorkerProcess(config, workdir / prefix / "worker.log", name="bench-real", port=port)
        began = time.monotonic()
        try:
            worker.start().wait_ready(300, "the worker's readiness")
            connections = -(-subscriptions // CHANNELS_PER_CONNECTION)
            wait_for(lambda: worker.metric("ingest_subscriptions", state="active") == subscriptions
                     and worker.metric("ingest_pubnub_connections") >= connections, 300,
                     what="every subscription active and its connection open", interval=0.5)
            out["startup_seconds"] = time.monotonic() - began
            prepared: list[Prepared] = sandbox.call("steady-prepare", 2)
            out["avg_plaintext_bytes"] = sum(len(p.plaintext) for p in prepared) / len(prepared)
            out["idle_os_threads"], out["idle_rss_bytes"] = proc_status(_pid(worker))
            rig = Rig(worker, sandbox, broker, bootstrap, output)
            steps = [_step(rig, r, warmup, window, profile) for r in rates]
            for _ in range(search_steps):
                nxt = _next_rate(steps)
                if nxt is None:
                    break
                steps.append(_step(rig, nxt, warmup, window))
        finally:
            worker.stop()
    out["rates"] = {str(s["rate_offered"]): s for s in steps if s["rate_offered"] in rates}
    out["steps"] = steps
    out["max_sustained_rate"] = max((s["rate_offered"] for s in steps if s["sustained"]), default=0)
    # Into the scenario's own topics (they exist; a broker need not create topics on demand).
    out["floor"] = run_in_child(floor, bootstrap, prefix, prepared, 5)
    at_1000 = out["rates"].get("1000", {}).get("worker_cpu_us_per_notification")
    if at_1000:
        out["ratio_cpu_1000_vs_floor"] = at_1000 / out["floor"]["cpu_us_per_notification"]
    return out


# ---- the idle scenario ------------------------------------------------------------------------------


def run_idle(bootstrap: str, workdir: Path, *, subscriptions: int = 10_000, lifetime: float = 90.0,
             cycles: int = 3) -> dict[str, Any]:
    accounts = demo_accounts(-(-subscriptions // SUBS_PER_ACCOUNT), extensions_per_account=SUBS_PER_ACCOUNT)
    margin, jitter = lifetime / 3, lifetime / 6
    observe = cycles * (lifetime - margin - jitter / 2) + lifetime / 3
    factor = lifetime / REAL_LIFETIME
    settings = SandboxSettings(accounts=accounts, subscription_ttl_max=lifetime, pubnub_hold_seconds=10.0,
                               rate_limits=RateLimits(window=60.0 * factor, penalty=60.0 * factor))
    prefix = f"bench-idle-{time.strftime('%H%M%S')}-{time.time_ns() % 10**6}"
    out: dict[str, Any] = {"settings": {
        "subscriptions": subscriptions, "lifetime_seconds": lifetime, "renewal_margin_seconds": margin,
        "renewal_jitter_seconds": jitter, "observe_seconds": observe, "worker": "`ingest run` (subprocess)"}}
    with SandboxProcess(settings) as sandbox:
        port = free_port()
        config = write_worker_config(
            workdir / prefix, sandbox.describe, bootstrap, prefix, _specs(accounts, subscriptions), metrics_port=port,
            worker={"expires_in_seconds": int(lifetime), "renewal_margin_seconds": margin,
                    "renewal_jitter_seconds": jitter})
        worker = WorkerProcess(config, workdir / prefix / "worker.log", name="bench-idle", port=port)
        began = time.monotonic()
        try:
            worker.start().wait_ready(600, "the worker's readiness")
            # Active or being renewed: with 90-s lifetimes ~100-200 renewals/s are in flight at any time, and
            # waiting for an instant with none (every one "active") took 518 s at load average 25-29.
            wait_for(lambda: sum(worker.metric("ingest_subscriptions", state=state) for state in LIVE_STATES)
                     == subscriptions, 600, what="every subscription created", interval=1.0)
            out["startup_seconds"] = time.monotonic() - began
            pid = _pid(worker)
            renewals0 = _renewed(worker)
            cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
            threads, rss = [], []
            while time.monotonic() - t0 < observe:
                time.sleep(1.0)
                t, r = proc_status(pid)
                threads.append(t)
                rss.append(r)
            cores = (proc_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            out["worker"] = {
                "cores": cores, "cpu_per_1000_subscriptions": cores / (subscriptions / 1000),
                "renewals": _renewed(worker) - renewals0,
                "os_threads_max": max(threads), "os_threads_min": min(threads), "rss_max_bytes": max(rss)}
            out["worker"]["renewal_cycles"] = out["worker"]["renewals"] / subscriptions
            subs = sandbox.call("subscriptions")
            created = sandbox.call("created_total")
        finally:
            worker.stop()
    out["lapses"] = lapses(subs, created, subscriptions)
    return out


def _renewed(worker: WorkerProcess) -> float:
    return sum(worker.metric("ingest_subscription_renewals_total", outcome=o) for o in ("ok", "changed"))


def run(bootstrap: str, workdir: Path, *, idle: bool, quick: bool = False) -> dict[str, Any]:
    """The steady scenario, and the idle one when `idle` (`make bench` runs it once: it takes ~5 minutes).
    A failed part is recorded as such; the other's figures are kept."""
    out = {"steady": _kept(lambda: run_steady(bootstrap, workdir, subscriptions=500 if quick else 2000,
                                              search_steps=1 if quick else 3))}
    if idle:
        out["idle"] = _kept(lambda: run_idle(bootstrap, workdir, subscriptions=1000 if quick else 10_000,
                                             lifetime=30.0 if quick else 90.0))
    return out


def _kept(part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return part()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def main(argv: list[str] | None = None) -> int:
    """A quick steady run at chosen rates (before/after comparisons of one change), optionally profiled:

        python -m tests.bench.realistic --rates 1000 --search-steps 0 [--profile DIR]
    """
    parser = argparse.ArgumentParser(description="the realistic scenario's steady part, at chosen rates")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"))
    parser.add_argument("--rates", default=",".join(str(r) for r in FIXED_RATES))
    parser.add_argument("--search-steps", type=int, default=0)
    parser.add_argument("--subscriptions", type=int, default=2000)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy each rate's window into this directory")
    parser.add_argument("--producer", action="append", default=[], metavar="KEY=VALUE",
                        help="a producer setting for the worker (e.g. linger.ms=20); repeatable")
    args = parser.parse_args(argv)
    result = run_steady(args.bootstrap, Path(tempfile.mkdtemp(prefix="bench-realistic-")),
                        subscriptions=args.subscriptions, window=args.window, search_steps=args.search_steps,
                        rates=tuple(int(r) for r in args.rates.split(",")), profile=args.profile,
                        producer=dict(kv.split("=", 1) for kv in args.producer))
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
