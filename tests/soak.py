"""Chaos soak (`make soak`, not part of `make test`): a worker group under a random schedule of every
fault the sandbox and the broker launcher can inject, with steady traffic; the verdict by uuid.

Three `ingest run` processes share the specs through a consumer group on a broker of the soak's own
(it is stopped and restarted). The soak runs at-least-once, then exactly-once, each for half of
`--minutes`. A fault is drawn every few seconds from FAULTS; each line of the schedule is printed
as it happens, with the seed first, so `--seed N` replays the same draws. At the end of each mode the
faults are cleared, every worker runs again, and what Kafka holds is compared with what the sandbox
published:

- lost: good notifications missing from their topic. PubNub's buffer is set larger than the whole
  soak's traffic, so PubNub still holds everything and the verdict is 0.
- duplicated: notifications seen twice through read_committed; 0 in exactly-once (at-least-once
  counts them only).
- order violations: per spec and partition, a notification whose timetoken is below one read before
  it (`order_violations`: a duplicate is not one, wherever it comes). 0.
- gaps: `replay.gap_suspected` events the workers logged, against the real gaps: missing
  notifications, and subscriptions that lapsed (expired server-side, by a fault or because no one
  renewed them in time), each of which must be reported as a lapse (or, expired early by a
  fault, as a subscription gone) naming it. Other reports, with
  nothing lost, are false alarms and are listed.
- no worker log line holds a traceback.
- the group settled after the faults: every worker running and ready, every spec owned, within
  SETTLE_SECONDS (a group that does not is named in the verdict, which is still given).

Exit status 0 when every verdict holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ingest.config import load_config
from ingest.sandbox.generator import Generated
from ingest.sandbox.kafka import LocalKafka
from ingest.sandbox.server import Sandbox, SandboxSettings, demo_accounts
from tests.integration.faults.scenario import order_violations
from tests.support import WorkerProcess, wait_for
from tests.support.harness import TopicReader, drain_and_compare, write_config

ACCOUNTS = 4
FILTERS = {
    "messages": ["/restapi/v1.0/account/~/extension/~/message-store"],
    "presence": ["/restapi/v1.0/account/~/extension/~/presence"],
    "calls": ["/restapi/v1.0/account/~/telephony/sessions"],
}
WORKERS = 3
RATE = 20.0  # notifications per second
TTL = 30  # subscription lifetime (s): a renewal cycle every ~20 s, so renewal faults are exercised
BUFFER = 200_000  # PubNub's buffer holds the whole soak (write_config tells the workers): every loss is the worker's
WORKER = {"coordination": "group", "apply_specs_on_start": False, "session_timeout_seconds": 6.0,
          "checkpoint_interval_seconds": 0.5, "renewal_margin_seconds": 10, "renewal_jitter_seconds": 2,
          "expires_in_seconds": TTL}
SETTLE_SECONDS = 180.0


@dataclass
class Soak:
    sandbox: Sandbox
    broker: LocalKafka
    workers: list[WorkerProcess]
    rng: random.Random
    started: float = field(default_factory=time.monotonic)

    def log(self, what: str, **details: Any) -> None:
        print(json.dumps({"t": round(time.monotonic() - self.started, 1), "fault": what, **details}), flush=True)

    def live_subscription(self) -> str | None:
        live = self.sandbox.rc.live_subscriptions()
        return self.rng.choice(live).id if live else None

    def running(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    def restart_dead(self) -> None:
        """What an orchestrator does (Kubernetes restarts a pod whose process exited)."""
        for w in self.workers:
            if not w.alive:
                assert w.proc is not None
                self.log("worker-exited", worker=w.name, exit_status=w.proc.returncode, restarted=True)
                w.start()

    def settle(self, specs: int) -> list[str]:
        """Wait until the group serves every spec, restarting a worker that exits meanwhile (seed
        3606330587: one exited 3 in the last broker restart, just after the schedule's last check, and
        stayed down); what still keeps it from that after SETTLE_SECONDS, [] once settled. A group that
        does not settle is a finding, not the end of the soak: the verdict names it (seed 3905723922: two
        exactly-once workers' transactional producers never reached their coordinator again after a
        broker restart; the soak ended in a traceback)."""
        def settled() -> bool:
            self.restart_dead()
            return not _unsettled(self.workers, specs)

        with contextlib.suppress(AssertionError):
            wait_for(settled, SETTLE_SECONDS, interval=1, what="the group settled after the faults")
        return _unsettled(self.workers, specs)


def _rc_5xx(s: Soak) -> dict[str, Any]:
    count = s.rng.randint(2, 6)
    s.sandbox.faults.rc_error("renew", status=s.rng.choice([500, 503]), count=count)
    return {"count": count}


def _rc_429(s: Soak) -> dict[str, Any]:
    retry_after = s.rng.randint(2, 8)
    s.sandbox.faults.rc_error("renew", status=429, count=1, retry_after=retry_after)
    return {"retry_after": retry_after}


def _rc_401(s: Soak) -> dict[str, Any]:
    return {"tokens": s.sandbox.faults.expire_access_tokens()}


def _rc_revoked_refresh(s: Soak) -> dict[str, Any]:
    s.sandbox.faults.expire_access_tokens()
    return {"tokens": s.sandbox.faults.revoke_refresh_tokens()}


def _rc_subscription(action: Callable[[str], None]) -> Callable[[Soak], dict[str, Any]]:
    def fault(s: Soak) -> dict[str, Any]:
        subscription = s.live_subscription()
        if subscription is not None:
            action(subscription)
        return {"subscription": subscription}
    return fault


def _rc_delete(s: Soak) -> dict[str, Any]:
    return _rc_subscription(s.sandbox.faults.delete_subscription)(s)


def _rc_expire(s: Soak) -> dict[str, Any]:
    return _rc_subscription(s.sandbox.faults.expire_subscription)(s)


def _rc_rotation(s: Soak) -> dict[str, Any]:
    return _rc_subscription(s.sandbox.faults.rotate_on_next_renewal)(s)


def _pn_500(s: Soak) -> dict[str, Any]:
    seconds = round(s.rng.uniform(1, 5), 1)
    s.sandbox.faults.pubnub_error(500, seconds=seconds)
    return {"seconds": seconds}


def _pn_drop(s: Soak) -> dict[str, Any]:
    count = s.rng.randint(1, 5)
    s.sandbox.faults.pubnub_drop_connections(count)
    return {"count": count}


def _pn_stall(s: Soak) -> dict[str, Any]:
    s.sandbox.faults.pubnub_stall(5.0, count=2)
    return {"seconds": 5.0, "count": 2}


def _pn_403(s: Soak) -> dict[str, Any]:
    count = s.rng.randint(1, 3)
    s.sandbox.faults.pubnub_error(403, count=count)
    return {"count": count}


def _pn_time_fail(s: Soak) -> dict[str, Any]:
    s.sandbox.faults.pubnub_error(500, count=2)  # a subscribe error makes the SDK probe /time/0
    s.sandbox.faults.pubnub_time_fail(seconds=6)
    return {"seconds": 6}


def _broker_restart(s: Soak) -> dict[str, Any]:
    down = round(s.rng.uniform(3, 20), 1)
    s.broker.stop()
    time.sleep(down)  # the fault is the time the broker stays down
    s.broker.start()
    return {"down": down}


def _worker_signal(sig: signal.Signals) -> Callable[[Soak], dict[str, Any]]:
    def fault(s: Soak) -> dict[str, Any]:
        running = s.running()
        if len(running) < 2:  # keep one worker serving while another restarts
            return {"skipped": "fewer than two workers running"}
        victim = s.rng.choice(running)
        victim.stop(sig, timeout=60)
        pause = round(s.rng.uniform(1, 10), 1)
        time.sleep(pause)  # how long the worker stays down is part of the fault
        victim.start()
        return {"worker": victim.name, "down_after_exit": pause}
    return fault


FAULTS: dict[str, Callable[[Soak], dict[str, Any]]] = {
    "rc-5xx": _rc_5xx, "rc-429": _rc_429, "rc-401": _rc_401, "rc-revoked-refresh": _rc_revoked_refresh,
    "rc-delete": _rc_delete, "rc-expire": _rc_expire, "rc-rotation": _rc_rotation,
    "pubnub-500": _pn_500, "pubnub-drop": _pn_drop, "pubnub-stall": _pn_stall, "pubnub-403": _pn_403,
    "pubnub-time-fail": _pn_time_fail, "broker-restart": _broker_restart,
    "worker-sigkill": _worker_signal(signal.SIGKILL), "worker-sigterm": _worker_signal(signal.SIGTERM),
}


def _missing_by_subscription(missing: list[Generated], started: float) -> list[str]:
    """Missing notifications per subscription, with when they were published (soak time, s)."""
    offset = time.time() - (time.monotonic() - started)  # wall clock of the soak's start
    groups: dict[str, list[float]] = {}
    for g in missing:
        groups.setdefault(g.subscription_id, []).append(g.published_at - offset)
    return [f"{sub}: {len(ts)} published {min(ts):.1f}-{max(ts):.1f} s" for sub, ts in
            sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def _unsettled(workers: list[WorkerProcess], specs: int) -> list[str]:
    """What keeps the group from serving every spec: workers exited or not ready, specs not owned."""
    problems = [f"{w.name} exited" if not w.alive else f"{w.name} not ready" for w in workers
                if not w.alive or not w.ready()]
    owned = sum(max(0, w.owned()) for w in workers)
    return problems + ([f"{owned} of {specs} specs owned"] if owned != specs else [])


def _worker_log_events(workers: list[WorkerProcess], event: str) -> list[dict[str, Any]]:
    found = []
    for w in workers:
        for line in w.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                found.append(json.loads(line))
    return found


def _lapsed(sandbox: Sandbox) -> set[str]:
    """Subscriptions that expired server-side: by a fault, or because no one renewed them in time."""
    return {v.id for v in sandbox.rc.subscriptions(include_dead=True) if v.status == "Expired"}


def _lapse_reports(gaps: list[dict[str, Any]]) -> set[str]:
    """The subscriptions these gap reports name as lapsed (or, expired early by a fault, as gone)."""
    return {g["subscription_id"] for g in gaps
            if "lapse_seconds" in g or str(g.get("reason", "")).startswith("subscription gone")}


def _unreported_lapses(sandbox: Sandbox, workers: list[WorkerProcess]) -> list[str]:
    return sorted(_lapsed(sandbox) - _lapse_reports(_worker_log_events(workers, "replay.gap_suspected")))


def run_mode(guarantee: str, seconds: float, rng: random.Random, directory: Path) -> bool:
    """One soak in one delivery mode; prints its schedule and verdict, returns whether it held."""
    print(f"== {guarantee}: {seconds:.0f} s", flush=True)
    settings = SandboxSettings(accounts=demo_accounts(ACCOUNTS), pubnub_hold_seconds=1.0, rate_limits=False,
                               buffer_size=BUFFER, subscription_ttl_max=TTL)
    with LocalKafka() as broker, Sandbox(settings) as sandbox:
        prefix = f"soak-{guarantee}-{time.time_ns()}"
        path = write_config(directory, sandbox, broker.bootstrap_servers, prefix, subscriptions=FILTERS,
                            worker={**WORKER, "delivery_guarantee": guarantee})
        specs = load_config(path).specs()
        subprocess.run([sys.executable, "-m", "ingest", "apply", "--config", str(path)], check=True, timeout=120)
        base: dict[str, Any] = yaml.safe_load(path.read_text())
        for account in base["accounts"]:
            account["subscriptions"] = []  # the workers take their specs from the spec topic
        workers = [WorkerProcess.in_group(f"{guarantee[:1]}{i}", base, directory) for i in range(1, WORKERS + 1)]
        reader: TopicReader | None = None  # made after the faults: it reads everything from the start
        soak = Soak(sandbox, broker, workers, rng)
        try:
            for w in workers:
                w.start()
            wait_for(lambda: not _unsettled(workers, len(specs)), SETTLE_SECONDS, interval=1,
                     what="the group settled")
            sandbox.generator.start(RATE)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(2, 8))  # the schedule: a fault every few seconds
                name = rng.choice(sorted(FAULTS))
                soak.log(name, **FAULTS[name](soak))
                soak.restart_dead()
            sandbox.faults.clear()
            unsettled = soak.settle(len(specs))
            reader = TopicReader(broker.bootstrap_servers, prefix)
            generated, result = drain_and_compare(sandbox, reader, SETTLE_SECONDS)
            # A subscription a late fault expired server-side is learnt of at its next renewal, up to a
            # lifetime later (seed 3905723922: expired by the last fault 13 s before its renewal was due,
            # and the verdict, which came first, named it unreported): the workers get that long to report
            # every lapse; the verdict names any still unreported.
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not _unreported_lapses(sandbox, workers), 2 * TTL, interval=1,
                         what="every lapse reported")
        finally:
            sandbox.generator.stop()
            if reader is not None:
                reader.close()
            for w in workers:
                w.stop(signal.SIGKILL)
        duplicated = sum(n - 1 for n in result.duplicates.values())
        violations = order_violations(reader.records)
        gaps = _worker_log_events(workers, "replay.gap_suspected")
        lapse_reports = _lapse_reports(gaps)
        lapsed = _lapsed(sandbox)
        tracebacks = [w.name for w in workers if "Traceback" in w.log_path.read_text(errors="replace")]
        verdict = {
            "mode": guarantee, "published": len(generated), "lost": len(result.missing),
            "wrong": len(result.wrong), "duplicated": duplicated, "order_violations": len(violations),
            "tracebacks": tracebacks, "unsettled_after_the_faults": unsettled,
            # Real gaps: notifications missing, and subscriptions that lapsed (RingCentral publishes
            # nothing to an expired subscription; the sandbox's generator neither).
            "lapses": len(lapsed), "lapses_unreported": sorted(lapsed - lapse_reports),
            "gaps_reported": len(gaps), "gaps_reported_as_lapses": len(lapse_reports),
        }
        print(json.dumps({"verdict": verdict}), flush=True)
        for line in _missing_by_subscription(result.missing, soak.started)[:10]:
            print(f"  lost: {line}")
        for line in violations[:5]:
            print(f"  order: {line}")
        for gap in gaps[:5]:
            print(f"  gap reported: {gap}")
        return (not result.missing and not result.wrong and not violations and not tracebacks and not unsettled
                and not verdict["lapses_unreported"] and (guarantee == "at-least-once" or duplicated == 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total time under faults (default: 10)")
    parser.add_argument("--seed", type=int, default=None, help="replay a schedule (default: a new seed)")
    parser.add_argument("--mode", choices=["at-least-once", "exactly-once", "both"], default="both",
                        help="delivery guarantee to soak (default: both, half of the time each)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"soak seed {seed} (replay: make soak SOAK_ARGS='--seed {seed}')", flush=True)
    modes = ["at-least-once", "exactly-once"] if args.mode == "both" else [args.mode]
    rng = random.Random(seed)
    ok = True
    tmp = Path(tempfile.mkdtemp(prefix="ingest-soak-"))
    for mode in modes:
        directory = tmp / mode
        directory.mkdir()
        ok = run_mode(mode, args.minutes * 60 / len(modes), rng, directory) and ok
    if ok:
        shutil.rmtree(tmp)
    print(f"soak seed {seed}: {'PASSED' if ok else f'FAILED (worker configs and logs kept in {tmp})'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
