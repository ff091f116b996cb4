"""Scenario 3: failover. Two worker processes (`ingest run`, coordination: group, at-least-once)
share 200 specs (10 accounts x 20) through the spec topic; the sandbox publishes a steady stream;
the worker that owns more specs is killed with SIGKILL. Measured:

- failover time: from the kill to the first record in Kafka (its CreateTime) of a spec the killed
  worker owned, against the target of session timeout + 5 s;
- lost: good notifications the sandbox published that never reached Kafka (compared by uuid);
- duplicated: extra copies (at-least-once replays from the last checkpoint: expected, bounded).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer

from ingest.sandbox.server import SandboxSettings, demo_accounts
from ingest.sandbox.worker_config import write_worker_config
from tests.bench.common import SandboxProcess
from tests.support import WorkerProcess

ACCOUNTS = 10
SPECS_PER_ACCOUNT = 20
SPECS = ACCOUNTS * SPECS_PER_ACCOUNT
PARTITIONS = 12
SESSION_TIMEOUT = 10.0  # the product's default
RATE = 200.0  # notifications per second during the scenario


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def _headers(msg: Any) -> dict[str, str]:
    return {k: v.decode() if isinstance(v, bytes) else str(v or "") for k, v in msg.headers() or []}


def _setup(sandbox: SandboxProcess, bootstrap: str, prefix: str, directory: Path) -> dict[str, Any]:
    """Writes the worker config, applies the specs to the spec topic; returns the workers' base config."""
    specs = {a["name"]: [(f"s{i:02d}", ["/restapi/v1.0/account/~/extension/~/message-store"])
                         for i in range(SPECS_PER_ACCOUNT)] for a in sandbox.describe["accounts"]}
    path = write_worker_config(directory, sandbox.describe, bootstrap, prefix, specs, log_level="INFO", worker={
        "coordination": "group", "delivery_guarantee": "at-least-once", "apply_specs_on_start": False,
        "session_timeout_seconds": SESSION_TIMEOUT, "checkpoint_interval_seconds": 0.5})
    base: dict[str, Any] = yaml.safe_load(path.read_text())
    base["topics"]["spec_partitions"] = PARTITIONS
    path.write_text(yaml.safe_dump(base))
    applied = subprocess.run([sys.executable, "-m", "ingest", "apply", "--config", str(path)],
                             capture_output=True, text=True, timeout=120, check=False)
    if applied.returncode != 0:
        raise RuntimeError(f"ingest apply failed: {applied.stderr[-2000:]}")
    for account in base["accounts"]:
        account["subscriptions"] = []  # the workers take their specs from the spec topic
    return base


class _Reader:
    """Every record of the output topics: (uuid, spec id, CreateTime in seconds)."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        from ingest.topology import TopicNames

        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}-reader",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.consumer.subscribe(TopicNames(prefix).all_output_topics())
        self.records: list[tuple[str, str, float]] = []

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(1000, 0.2):
                if not msg.error():
                    h = _headers(msg)
                    self.records.append((h.get("uuid", ""), h.get("spec-id", ""), msg.timestamp()[1] / 1000))

    def first_after(self, specs: set[str], since: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain(0.5)
            after = [t for _u, spec, t in self.records if spec in specs and t > since]
            if after:
                return min(after)
        return None

    def copies(self, uuids: list[str], timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        seen: dict[str, int] = {}
        while time.monotonic() < deadline:
            self.drain(1.0)
            seen = {}
            for u, _spec, _t in self.records:
                seen[u] = seen.get(u, 0) + 1
            if all(u in seen for u in uuids):
                break
        return seen


def run(bootstrap: str, workdir: Path) -> dict[str, Any]:
    from ingest.commands.status import collect
    from ingest.config import load_config

    prefix = f"bench-fo-{time.strftime('%H%M%S')}-{time.time_ns() % 10**6}"
    directory = (workdir / prefix).resolve()
    settings = SandboxSettings(accounts=demo_accounts(ACCOUNTS), pubnub_hold_seconds=1.0, rate_limits=False,
                               buffer_size=50000)
    out: dict[str, Any] = {"settings": {"specs": SPECS, "workers": 2, "spec_partitions": PARTITIONS,
                                        "session_timeout_seconds": SESSION_TIMEOUT, "rate_per_second": RATE,
                                        "delivery_guarantee": "at-least-once"}}
    with SandboxProcess(settings) as sandbox:
        base = _setup(sandbox, bootstrap, prefix, directory)
        config = load_config(directory / "worker.yaml")

        def owners() -> dict[int, str]:
            status = collect(config)
            return {p: m["worker"] for m in status["members"] for p in m["partitions"]}

        def stable(live: list[WorkerProcess]) -> bool:
            o = owners()
            return (sorted(o) == list(range(PARTITIONS)) and set(o.values()) == {w.name for w in live}
                    and sum(w.owned() for w in live) == SPECS and all(w.ready() for w in live))

        started = time.monotonic()
        workers = [WorkerProcess.in_group(f"{prefix}-w{i}", base, directory).start() for i in (1, 2)]
        reader = _Reader(bootstrap, prefix)
        try:
            _wait(lambda: stable(workers), 180, "two workers sharing the specs")
            out["group_ready_seconds"] = time.monotonic() - started
            sandbox.call("rate", RATE, None)
            reader.drain(5.0)
            before = owners()
            rows = collect(config)["specs"]
            owned_by = {w.name: {r["spec"] for r in rows if before.get(r["partition"]) == w.name} for w in workers}
            victim = max(workers, key=lambda w: len(owned_by[w.name]))
            survivor = next(w for w in workers if w is not victim)
            killed_at = time.time()
            victim.stop(signal.SIGKILL)
            first = reader.first_after(owned_by[victim.name], killed_at, 90)
            _wait(lambda: stable([survivor]), 120, "the killed worker's specs moved")
            reader.drain(5.0)
            sandbox.call("rate", 0, None)
            generated: list[str] = sandbox.call("generated")
            seen = reader.copies(generated, 90)
            out.update({
                "moved_specs": len(owned_by[victim.name]),
                "failover_seconds": None if first is None else first - killed_at,
                "target_seconds": SESSION_TIMEOUT + 5, "notifications": len(generated),
                "lost": sum(u not in seen for u in generated),
                "duplicated": sum(seen.get(u, 1) - 1 for u in set(generated)),
            })
        finally:
            sandbox.call("rate", 0, None)
            reader.consumer.close()
            for w in workers:
                w.stop()
    return out
