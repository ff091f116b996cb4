"""1 -> N worker processes in one pod (`ingest run --processes N`) on a quick sparse scenario.

Many subscriptions (presence, 25 per account), steady traffic spread over all of them at a ladder of
rates; the worker runs as `ingest run` (group coordination) with 1, then N processes. Per rate, over a
fixed window: the worker's CPU (every process of the pod, from /proc), notifications received,
lag p50/p99 (from the `ingest_lag_seconds` buckets of the pod's one /metrics: an upper bound),
the sandbox's CPU beside it. The maximum sustained rate is the highest rate whose window received
>= 95% of the rate asked of the generator with lag p99 <= 1 s (what the generator really published
is reported beside it).

    python -m tests.bench.processes --bootstrap 127.0.0.1:19092 --processes 2

The full realistic scenario is `make bench` (tests/bench/run.py); this one exists to compare process
counts on the same machine in minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ingest.sandbox.server import SandboxSettings, demo_accounts
from ingest.sandbox.worker_config import write_worker_config
from tests.bench.common import SandboxProcess, machine
from tests.support import WorkerProcess, samples, wait_for
from tests.support.waiting import free_ports

SUBS_PER_ACCOUNT = 25
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SUSTAINED_LAG_P99 = 1.0
SUSTAINED_SHARE = 0.95


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _pod_pids(pid: int) -> list[int]:
    """The pod's process and its children (the workers of --processes N)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, ValueError):
                continue
    return pids


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _lag_buckets(text: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for (name, labels), value in samples(text).items():
        if name == "ingest_lag_seconds_bucket":
            le = float(dict(labels)["le"])
            out[le] = out.get(le, 0.0) + value
    return out


def _quantile_bound(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile of the observations between two scrapes."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = delta.get(float("inf"), 0.0)
    if total <= 0:
        return None
    return next(le for le in sorted(delta) if delta[le] >= q * total)


def _received(text: str) -> float:
    return sum(v for (name, _), v in samples(text).items() if name == "ingest_notifications_received_total")


def _generated(sandbox: SandboxProcess) -> int:
    """Notifications the sandbox's generator has published so far (its admin API)."""
    origin = sandbox.describe["rc_url"].removeprefix("http://")
    with urllib.request.urlopen(f"http://{origin}/sandbox/state", timeout=30) as resp:
        return int(json.loads(resp.read())["generated"])


def _owned(pod: WorkerProcess) -> float:
    try:
        return sum(v for (name, _), v in samples(pod.get("/metrics")).items() if name == "ingest_owned_specs")
    except OSError:
        return -1


def measure(bootstrap: str, workdir: Path, sandbox: SandboxProcess, *, processes: int, subscriptions: int,
            rates: list[int], window: float) -> dict[str, Any]:
    prefix = f"bench-procs{processes}-{time.strftime('%H%M%S')}-{time.time_ns() % 10**6}"
    accounts = sandbox.describe["accounts"][: -(-subscriptions // SUBS_PER_ACCOUNT)]
    specs = {a["name"]: [(f"ext{j}", [f"/restapi/v1.0/account/~/extension/{ext}/presence"])
                         for j, ext in enumerate(a["extensions"][:SUBS_PER_ACCOUNT])] for a in accounts}
    path = write_worker_config(workdir / prefix, sandbox.describe, bootstrap, prefix, specs, worker={
        "coordination": "group", "apply_specs_on_start": False})
    config = yaml.safe_load(path.read_text())
    config["topics"]["spec_partitions"] = 16
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "ingest", "apply", "--config", str(path)], check=True,
                   capture_output=True, timeout=120)
    for account in config["accounts"]:
        account["subscriptions"] = []
    config["worker"]["id"] = "bench"
    config["metrics"]["port"] = port = free_ports(1 + processes)
    path.write_text(yaml.safe_dump(config))
    args = ["--processes", str(processes)] if processes > 1 else []
    pod = WorkerProcess(path, path.with_suffix(".log"), port=port, args=args).start()
    out: dict[str, Any] = {"processes": processes, "subscriptions": subscriptions, "rates": []}
    try:
        started = time.monotonic()
        wait_for(lambda: _owned(pod) == subscriptions and pod.ready(), 600, interval=1,
                 what=f"{subscriptions} subscriptions owned and ready")
        out["startup_seconds"] = round(time.monotonic() - started, 1)
        assert pod.proc is not None
        pids = _pod_pids(pod.proc.pid)
        out["threads"] = {str(p): _threads(p) for p in pids}
        out["rss_mib"] = {str(p): round(_rss_bytes(p) / 2**20) for p in pids}
        for rate in rates:
            sandbox.call("rate", rate, None)
            time.sleep(3)  # a measurement window, not a wait for an event: traffic settles first
            text0, t0 = pod.get("/metrics"), time.monotonic()
            cpu0 = {p: _cpu_seconds(p) for p in pids}
            sb0, gen0 = _cpu_seconds(sandbox.pid), _generated(sandbox)
            time.sleep(window)
            text1, seconds = pod.get("/metrics"), time.monotonic() - t0
            cpu = {p: _cpu_seconds(p) - cpu0[p] for p in pids}
            sandbox_cpu, published = _cpu_seconds(sandbox.pid) - sb0, _generated(sandbox) - gen0
            received = _received(text1) - _received(text0)
            b0, b1 = _lag_buckets(text0), _lag_buckets(text1)
            p99 = _quantile_bound(b0, b1, 0.99)
            worker_cpu = sum(cpu.values())
            row = {"rate": rate, "published_per_s": round(published / seconds), "received_per_s":
                   round(received / seconds), "worker_cores": round(worker_cpu / seconds, 2),
                   "cores_by_process": [round(c / seconds, 2) for c in cpu.values()],
                   "worker_us_per_notification": round(worker_cpu / received * 1e6) if received else None,
                   "sandbox_cores": round(sandbox_cpu / seconds, 2),
                   "lag_p50_le": _quantile_bound(b0, b1, 0.5), "lag_p99_le": p99}
            # Sustained: the worker kept up with the rate asked for (a generator that fell short of it
            # is a limit of the machine, not a sustained rate of the worker).
            row["sustained"] = bool(received >= SUSTAINED_SHARE * rate * seconds
                                    and p99 is not None and p99 <= SUSTAINED_LAG_P99)
            out["rates"].append(row)
            print(json.dumps(row), flush=True)
        sandbox.call("rate", 0, None)
        sustained = [r["rate"] for r in out["rates"] if r["sustained"]]
        out["max_sustained_rate"] = max(sustained, default=0)
        out["exit_status"] = pod.stop(timeout=60)
    finally:
        pod.stop(timeout=60)  # first: a sandbox that failed must not leave the worker running
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            sandbox.call("rate", 0, None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--subscriptions", type=int, default=500)
    parser.add_argument("--rates", default="250,500,1000,2000,3000")
    parser.add_argument("--window", type=float, default=10.0)
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    accounts = demo_accounts(-(-args.subscriptions // SUBS_PER_ACCOUNT), extensions_per_account=SUBS_PER_ACCOUNT)
    settings = SandboxSettings(accounts=accounts, rate_limits=False, pubnub_hold_seconds=10.0, buffer_size=1000)
    runs = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-processes-"))  # kept: the workers' logs
    for processes in sorted({1, args.processes}):
        with SandboxProcess(settings) as sandbox:  # a fresh one: no subscription of the previous run left
            runs.append(measure(args.bootstrap, workdir, sandbox, processes=processes,
                                subscriptions=args.subscriptions, rates=rates, window=args.window))
    one, many = runs[0], runs[-1]
    result = {"machine": machine(), "workdir": str(workdir), "runs": runs,
              "sustained_ratio": (many["max_sustained_rate"] / one["max_sustained_rate"]
                                  if one["max_sustained_rate"] else None)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
