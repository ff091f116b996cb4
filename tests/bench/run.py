"""`make bench`: every benchmark scenario, several runs, JSON results and the Markdown report.

    python -m tests.bench.run [--runs 3] [--quick] [--out bench-results/] [--report docs/benchmarks.md]
                               [--scenarios throughput,subscriptions] [--render-only]

Uses the broker at KAFKA_BOOTSTRAP_SERVERS if set, else starts its own `LocalKafka`; each scenario
starts its own sandbox. Writes `<out>/run-<i>.json` per run and `<out>/summary.json` (medians,
min, max), then regenerates the report. Absolute figures depend on the machine, so each scenario
also reports ratios against baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench import failover, processes, realistic, report, subscriptions, throughput, webhook, websocket
from tests.bench.common import machine, versions

SCENARIOS = ("throughput", "subscriptions", "failover", "realistic", "processes", "websocket", "webhook")


def _guarded(scenario: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A failed scenario is recorded (and reported) as such; the other scenarios and runs go on."""
    try:
        return scenario()
    except Exception as exc:
        print(f"[bench] scenario failed: {exc!r}", file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def _kafka() -> tuple[str, str | None, Callable[[], None]]:
    """(bootstrap servers, broker version if known, cleanup)."""
    from ingest.sandbox.kafka import KAFKA_VERSION, LocalKafka

    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        return env, f"{KAFKA_VERSION} (external broker; version as configured for the project)", lambda: None
    broker = LocalKafka()
    broker.start()
    return broker.bootstrap_servers, KAFKA_VERSION, broker.stop


def _path_get(doc: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def summarise(runs: list[dict[str, Any]], metrics: list[str]) -> dict[str, dict[str, float | int | None]]:
    """Median, min and max over the runs of each metric (a dotted path into a run's results)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for path in metrics:
        values = [v for r in runs if isinstance(v := _path_get(r, path), int | float) and not isinstance(v, bool)]
        out[path] = {"median": statistics.median(values) if values else None, "min": min(values, default=None),
                     "max": max(values, default=None), "runs": len(values)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not for the report)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--report", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--subscriptions", type=int, default=5000)
    parser.add_argument("--notifications", type=int, default=30000)
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy the worker during each throughput drain (raw stacks) into this directory")
    parser.add_argument("--render-only", action="store_true",
                        help="only regenerate the report from <out>/summary.json (no measurement)")
    args = parser.parse_args(argv)
    if args.render_only:
        args.report.write_text(report.render(json.loads((args.out / "summary.json").read_text())))
        return 0
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.out / "work"
    began = time.time()
    bootstrap, kafka_version, cleanup = _kafka()
    settings = {"runs": args.runs, "quick": args.quick, "scenarios": chosen, "kafka_bootstrap": bootstrap,
                "notifications": 10000 if args.quick else args.notifications,
                "subscriptions": 500 if args.quick else args.subscriptions,
                "subscription_lifetime_seconds": 30.0 if args.quick else 45.0}
    header = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)), "machine": machine(),
              "versions": versions(kafka_version), "settings": settings}
    runs: list[dict[str, Any]] = []
    try:
        for i in range(args.runs):
            result: dict[str, Any] = {"run": i + 1}
            if "throughput" in chosen:
                print(f"[bench] run {i + 1}/{args.runs}: throughput", file=sys.stderr, flush=True)
                result["throughput"] = _guarded(lambda: throughput.run(
                    bootstrap, workdir, notifications=settings["notifications"],
                    lag_seconds=2.0 if args.quick else 5.0, naive_budget=2.0 if args.quick else 8.0,
                    profile_dir=args.profile))
            if "subscriptions" in chosen:
                print(f"[bench] run {i + 1}/{args.runs}: subscriptions", file=sys.stderr, flush=True)
                result["subscriptions"] = _guarded(lambda: subscriptions.run(
                    bootstrap, workdir, subscriptions=settings["subscriptions"],
                    lifetime=settings["subscription_lifetime_seconds"]))
            if "failover" in chosen:
                # Scenario 3: kill -9 of one of two group workers (tests/bench/failover.py).
                print(f"[bench] run {i + 1}/{args.runs}: failover", file=sys.stderr, flush=True)
                result["failover"] = _guarded(lambda: failover.run(bootstrap, workdir))
            if "realistic" in chosen:
                # Scenario 4: the production regime (tests/bench/realistic.py); its idle part runs once.
                print(f"[bench] run {i + 1}/{args.runs}: realistic", file=sys.stderr, flush=True)
                result["realistic"] = _guarded(functools.partial(realistic.run, bootstrap, workdir, idle=i == 0,
                                                                 quick=args.quick))
            if "processes" in chosen and i == 0:  # 1 -> 2 processes in one pod (tests/bench/processes.py), once
                print(f"[bench] run {i + 1}/{args.runs}: processes", file=sys.stderr, flush=True)
                result["processes"] = _guarded(lambda: processes.run(
                    bootstrap, workdir, subscriptions=500 if args.quick else 2000,
                    rates=[1000, 2000] if args.quick else None))
            if "websocket" in chosen:  # many users, sparse traffic, over WebSocket (tests/bench/websocket.py)
                print(f"[bench] run {i + 1}/{args.runs}: websocket", file=sys.stderr, flush=True)
                result["websocket"] = _guarded(lambda: websocket.run(
                    bootstrap, workdir, users=20 if args.quick else 100, seconds=10.0 if args.quick else 30.0))
            if "webhook" in chosen:  # WebHook receiver: 200 after the Kafka ack vs before (tests/bench/webhook.py)
                print(f"[bench] run {i + 1}/{args.runs}: webhook", file=sys.stderr, flush=True)
                result["webhook"] = _guarded(lambda: webhook.run(bootstrap))
            (args.out / f"run-{i + 1}.json").write_text(json.dumps(result, indent=1, default=str))
            runs.append(result)
    finally:
        cleanup()
    summary: dict[str, Any] = {**header, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                               "duration_seconds": time.time() - began,
                               "summary": summarise(runs, report.METRICS), "runs": runs}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    args.report.write_text(report.render(summary))
    print(json.dumps({k: v["median"] for k, v in summary["summary"].items()}, indent=1), flush=True)
    print(f"[bench] {len(runs)} runs in {summary['duration_seconds']:.0f}s; results in {args.out}, report "
          f"{args.report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
