"""Scenario: many users, sparse traffic, over WebSocket (RingCentral's current push channel).

    python -m tests.bench.websocket BOOTSTRAP [--users 100] [--rate 20] [--seconds 30]

A WebSocket connection carries one user's one subscription, so the realistic load is many sockets with
a few notifications each: `users` accounts with `transport: websocket` in one worker process (spawned),
the sandbox in another, the generator publishing `rate` notifications/s round-robin over the users.
The same figures as the PubNub scenarios, to put side by side in docs/benchmarks.md: users,
notifications/s delivered, the worker's CPU per notification (all of it, and above its idle cost),
its threads (OS, and per user), RSS, and the lag (Kafka acknowledgement minus the notification's
timestamp, the worker's own `ingest_lag_seconds`) p50/p99; plus what was published and not delivered.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import SandboxSettings, demo_accounts
from ingest.sandbox.worker_config import write_worker_config
from tests.bench.common import SPAWN, SandboxProcess, cpu_seconds, current_rss_bytes, percentile
from tests.bench.subscriptions import _os_threads
from tests.bench.throughput import _LagTee, _wait_acknowledged

FILTERS = ["/restapi/v1.0/account/~/extension/~/message-store",
           "/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true"]


def _worker_main(config_path: str, users: int, conn: Connection) -> None:
    from ingest.config import load_config
    from ingest.worker.cli import tune_gc
    from ingest.worker.runtime import Worker

    worker = Worker(load_config(Path(config_path)))
    lag = _LagTee(worker.metrics.lag)
    worker.metrics.lag = lag  # type: ignore[assignment]
    threads_before = _os_threads()
    started = time.monotonic()
    worker.start()
    try:
        deadline = started + 300
        while worker.subscriptions_serving() < users:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {worker.subscriptions_serving()} of {users} users served after 300 s")
            time.sleep(0.2)
        tune_gc()  # as `ingest run` does once started
        threads = _os_threads()
        conn.send({"startup_seconds": round(time.monotonic() - started, 2), "os_threads": threads,
                   "python_threads": threading.active_count(),
                   "threads_per_user": (threads - threads_before) / users, "rss_bytes": current_rss_bytes()})
        while True:
            command, arg = conn.recv()
            if command == "stop":
                break
            if command == "measure":  # `arg` seconds of whatever traffic the parent arranged
                lag.values.clear()
                acked0, cpu0, t0 = worker.sink.acknowledged, cpu_seconds(), time.monotonic()
                time.sleep(arg)
                conn.send({"seconds": time.monotonic() - t0, "cpu_seconds": cpu_seconds() - cpu0,
                           "delivered": worker.sink.acknowledged - acked0})
            elif command == "settle":  # until `arg` deliveries in all; then the lags of the measured window
                _wait_acknowledged(worker.sink, arg, 60)
                values = list(lag.values)
                conn.send({"delivered_total": worker.sink.acknowledged, "lag_observed": len(values),
                           "lag_p50_seconds": percentile(values, 0.5), "lag_p99_seconds": percentile(values, 0.99),
                           "os_threads": _os_threads(), "rss_bytes": current_rss_bytes()})
    finally:
        worker.stop(delete_subscriptions=True)
    conn.send("stopped")


def _answer(conn: Connection, proc: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not conn.poll(0.5):
        if not proc.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the WebSocket worker did not answer within {timeout:.0f} s "
                               f"(alive: {proc.is_alive()})")
    return conn.recv()


def run(bootstrap: str, workdir: Path, *, users: int = 100, rate: float = 20.0,
        seconds: float = 30.0) -> dict[str, Any]:
    accounts = demo_accounts(users, extensions_per_account=1)
    # One wstoken per user at start (Auth group, 5 a minute per user): the real limits hold.
    settings = SandboxSettings(accounts=accounts, rate_limits=RateLimits(), pubnub_hold_seconds=10.0)
    out: dict[str, Any] = {"settings": {"users": users, "rate_per_second": rate, "seconds": seconds,
                                        "filters_per_subscription": len(FILTERS), "worker": "own process (spawn)"}}
    prefix = f"bench-ws-{time.strftime('%H%M%S')}-{time.time_ns() % 10**6}"
    with SandboxProcess(settings) as sandbox:
        specs = {a.name: [("all", list(FILTERS))] for a in accounts}
        config = write_worker_config(workdir / prefix, sandbox.describe, bootstrap, prefix, specs,
                                     transport="websocket")
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=_worker_main, args=(str(config), users, child), daemon=True,
                             name="bench-ws-worker")
        proc.start()
        try:
            out["startup"] = _answer(parent, proc, 360)
            parent.send(("measure", seconds))
            idle = _answer(parent, proc, seconds + 60)
            published0 = sandbox.call("rate", rate, None)
            parent.send(("measure", seconds))
            loaded = _answer(parent, proc, seconds + 60)
            published = sandbox.call("rate", 0, None) - published0
            parent.send(("settle", published))
            settled = _answer(parent, proc, 120)
            parent.send(("stop", None))
            _answer(parent, proc, 120)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    idle_cpu_rate = idle["cpu_seconds"] / idle["seconds"]
    notifications = max(1, loaded["delivered"])
    out["worker"] = {
        "users": users, "connections": users,
        "notifications_per_second": loaded["delivered"] / loaded["seconds"],
        "cpu_us_per_notification": loaded["cpu_seconds"] / notifications * 1e6,
        "cpu_us_per_notification_above_idle":
            max(0.0, loaded["cpu_seconds"] - idle_cpu_rate * loaded["seconds"]) / notifications * 1e6,
        "idle_cpu_fraction_of_one_core": idle_cpu_rate,
        "loaded_cpu_fraction_of_one_core": loaded["cpu_seconds"] / loaded["seconds"],
        "os_threads": settled["os_threads"], "threads_per_user": out["startup"]["threads_per_user"],
        "rss_bytes": settled["rss_bytes"], "lag_p50_seconds": settled["lag_p50_seconds"],
        "lag_p99_seconds": settled["lag_p99_seconds"], "lag_observed": settled["lag_observed"],
    }
    out["published"] = published
    out["lost"] = max(0, published - settled["delivered_total"])  # nothing was published before
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("bootstrap")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workdir", type=Path, default=Path("bench-results/work"))
    args = parser.parse_args()
    print(json.dumps(run(args.bootstrap, args.workdir, users=args.users, rate=args.rate, seconds=args.seconds),
                     indent=1, default=str))


if __name__ == "__main__":
    main()
