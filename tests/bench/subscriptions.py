"""Scenario 2: many subscriptions in one worker process, kept alive through several renewal cycles.

5,000 subscriptions (200 accounts x 25, under the sandbox's real per-user limit of 30) are created by
one worker, with lifetimes shortened (default 45 s instead of 900 s; margin 15 s, jitter 7.5 s) so
that at least three renewal cycles fit in the observation window. The sandbox's rate-limit windows
and penalties are shortened by the same factor (the request *counts* per window stay real), so the
compressed schedule meets the same limits a 15-minute schedule would.

Measured in the worker's own process: startup (all subscriptions active; then every channel read,
which waits for each new connection's first long-poll: the sandbox holds polls 10 s here),
renewal punctuality (seconds before expiry each renewal completed, from the worker's own
`ingest_subscription_renewal_margin_seconds` observations, recorded exactly), RSS, threads (Python
and OS), CPU per second of wall time while no notification flows (renewals and long-polls only).
Lapses come from the sandbox: subscriptions that expired (or were re-created) during the run.
"""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import SandboxSettings, demo_accounts
from ingest.sandbox.worker_config import write_worker_config
from tests.bench.common import (
    SPAWN,
    SandboxProcess,
    cpu_seconds,
    current_rss_bytes,
    peak_rss_bytes,
    percentile,
)

SUBS_PER_ACCOUNT = 25
REAL_LIFETIME = 900.0


class _Recorder:
    """Stands in for the renewal-margin histogram: observes into it and keeps every value."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.inner.observe(value)
        self.values.append(value)


def _os_threads() -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


def _worker_main(config_path: str, specs: int, observe_seconds: float, conn: Connection) -> None:
    from ingest.config import load_config
    from ingest.worker.cli import tune_gc
    from ingest.worker.runtime import Worker

    worker = Worker(load_config(Path(config_path)))
    margins = _Recorder(worker.metrics.renewal_margin)
    worker.metrics.renewal_margin = margins  # type: ignore[assignment]
    t0 = time.monotonic()
    worker.start()
    tune_gc()  # as `ingest run` does once started
    result: dict[str, Any] = {}
    try:
        assert worker.manager is not None
        deadline = t0 + 600
        while time.monotonic() < deadline:
            states = worker.manager.snapshot()
            active = sum(s.state == "active" for s in states)
            if active == specs and "all_active_seconds" not in result:
                result["all_active_seconds"] = time.monotonic() - t0
            channels = {d.channel for d in list(worker.channels.deliveries.values())}
            if active == specs and len(channels) == specs and channels <= worker.intake.pubnub.reading():
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"only {active} of {specs} subscriptions active after {deadline - t0:.0f}s")
        result["startup_seconds"] = time.monotonic() - t0
        result["connections"] = worker.intake.pubnub.connection_count
        result["rss_after_startup_bytes"] = current_rss_bytes()
        # Observation: no notifications, only renewals and long-polls.
        margins.values.clear()
        cpu0, w0 = cpu_seconds(), time.monotonic()
        rss_max, samples = 0, []
        while time.monotonic() - w0 < observe_seconds:
            time.sleep(1.0)
            rss = current_rss_bytes()
            rss_max = max(rss_max, rss)
            samples.append((round(time.monotonic() - w0, 1), round(cpu_seconds() - cpu0, 3)))
        wall, cpu = time.monotonic() - w0, cpu_seconds() - cpu0
        states = worker.manager.snapshot()
        values = margins.values
        result.update({
            "observed_seconds": wall, "cpu_seconds": cpu, "cpu_fraction_of_one_core": cpu / wall,
            "renewals": len(values), "renewal_cycles": len(values) / specs,
            "renewal_margin_min_seconds": min(values, default=None),
            "renewal_margin_p01_seconds": percentile(values, 0.01),
            "renewal_margin_p50_seconds": percentile(values, 0.5),
            "renewal_margin_max_seconds": max(values, default=None),
            "renewals_completed_after_expiry": sum(v <= 0 for v in values),
            "active_at_end": sum(s.state in {"active", "renewing"} for s in states),
            "rss_max_bytes": rss_max, "peak_rss_bytes": peak_rss_bytes(),
            "python_threads": threading.active_count(), "os_threads": _os_threads(),
        })
        conn.send(result)
        conn.recv()  # the parent has read the sandbox's view; now stop
    finally:
        worker.stop(delete_subscriptions=True)


def run(bootstrap: str, workdir: Path, *, subscriptions: int = 5000, lifetime: float = 45.0,
        cycles: int = 3) -> dict[str, Any]:
    accounts_n = -(-subscriptions // SUBS_PER_ACCOUNT)
    margin, jitter = lifetime / 3, lifetime / 6
    # A renewal cycle lasts lifetime - margin - jitter/2 on average; observe `cycles` of them and a bit.
    observe = cycles * (lifetime - margin - jitter / 2) + lifetime / 3
    factor = lifetime / REAL_LIFETIME
    limits = RateLimits(window=60.0 * factor, penalty=60.0 * factor)
    accounts = demo_accounts(accounts_n, extensions_per_account=SUBS_PER_ACCOUNT)
    settings = SandboxSettings(accounts=accounts, subscription_ttl_max=lifetime, rate_limits=limits,
                               pubnub_hold_seconds=10.0, buffer_size=1000)
    specs: dict[str, list[tuple[str, list[str]]]] = {}
    left = subscriptions
    for a in accounts:
        take = min(SUBS_PER_ACCOUNT, left)
        left -= take
        specs[a.name] = [(f"ext{j}", [f"/restapi/v1.0/account/~/extension/{ext}/presence"])
                         for j, ext in enumerate(a.extensions[:take])]
    prefix = f"bench-subs-{time.strftime('%H%M%S')}-{time.time_ns() % 10**6}"
    worker_settings = {"expires_in_seconds": int(lifetime), "renewal_margin_seconds": margin,
                       "renewal_jitter_seconds": jitter}
    out: dict[str, Any] = {"settings": {
        "subscriptions": subscriptions, "accounts": accounts_n, "per_account": SUBS_PER_ACCOUNT,
        "lifetime_seconds": lifetime, "renewal_margin_seconds": margin, "renewal_jitter_seconds": jitter,
        "observe_seconds": observe, "rate_limit_window_seconds": limits.window,
        "rate_limit_penalty_seconds": limits.penalty, "light_per_window": limits.light,
        "medium_per_window": limits.medium, "pubnub_hold_seconds": settings.pubnub_hold_seconds,
        "channels_per_connection": 50, "worker": "own process (spawn)"}}
    with SandboxProcess(settings) as sandbox:
        config = write_worker_config(workdir / prefix, sandbox.describe, bootstrap, prefix, specs,
                                     worker=worker_settings)
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=_worker_main, args=(str(config), subscriptions, observe, child), daemon=True,
                             name="bench-subs-worker")
        proc.start()
        try:
            deadline = time.monotonic() + 600 + observe + 60
            while not parent.poll(1.0):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the subscriptions worker died or did not finish")
            out["worker"] = parent.recv()
            subs = sandbox.call("subscriptions")
            created = sandbox.call("created_total")
            parent.send("stop")
        finally:
            proc.join(120)
            if proc.is_alive():
                proc.kill()
    out["sandbox"] = {"statuses": _statuses(subs), "created_total": created,
                      "renewals_total": sum(r for *_, r, _c in subs)}
    out["lapses"] = lapses(subs, created, subscriptions)
    return out


def _statuses(subs: list[tuple[Any, ...]]) -> dict[str, int]:
    statuses: dict[str, int] = {}
    for _id, status, _exp, _renewals, _created in subs:
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


def lapses(subs: list[tuple[Any, ...]], created: int, subscriptions: int) -> int:
    """From the sandbox's view (its "subscriptions" and "created_total"): subscriptions that expired
    (events stopped), plus those that had to be created again."""
    return _statuses(subs).get("Expired", 0) + max(0, created - subscriptions)
