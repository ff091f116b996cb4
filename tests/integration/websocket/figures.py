"""The WebSocket figures of docs/faults.md and docs/sandbox.md: `python -m tests.integration.websocket.figures`.

Against the sandbox, with the real client: reconnect and recovery times after a socket drop, a planned
close (WSG-903) and a failed recovery; how long a stalled connection takes to be noticed; what is lost
and what is replayed under steady traffic with repeated drops; and the client's receive cost per
notification (CPU seconds of the whole process per notification handed on).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import requests

from ingest.metrics import Metrics
from ingest.rc.http import RingCentralClient
from ingest.rc.tokens import TokenManager
from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.transports.websocket import Gap, Notification, WebSocketSession, WebSocketSettings
from tests.sandbox.conftest import MESSAGE_STORE, wait_for

ROUNDS = 10


class _Run:
    def __init__(self, sb: Sandbox, settings: WebSocketSettings) -> None:
        account, http = sb.accounts[0], requests.Session()
        self.sb, self.metrics = sb, Metrics()
        tokens = TokenManager(sb.rc_url, sb.client_id, sb.client_secret, account.jwt, self.metrics, http,
                              user=account.name)
        client = RingCentralClient(sb.rc_url, tokens, self.metrics, http, user=account.name)
        self.lock = threading.Lock()
        self.uuids: list[str] = []
        self.gaps: list[Gap] = []
        self.session = WebSocketSession(client, [MESSAGE_STORE], self.handle, self.metrics, settings,
                                        on_gap=self.gaps.append, name=account.name)
        self.session.start()
        wait_for(lambda: self.session.connected, timeout=30)

    def handle(self, batch: list[Notification], received_at: float) -> None:
        with self.lock:
            self.uuids.extend(orjson.loads(raw)["uuid"] for raw, _ in batch)

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def _timed(run: _Run, fault: Callable[[], Any], done: Callable[[], bool]) -> float:
    wait_for(lambda: run.session.connected, timeout=30)
    started = time.monotonic()
    fault()
    wait_for(done, timeout=60, interval=0.005)
    return time.monotonic() - started


def _reconnects(run: _Run, reason: str) -> Callable[[], bool]:
    before = run.count("ingest_websocket_reconnects_total", reason=reason)
    return lambda: run.count("ingest_websocket_reconnects_total", reason=reason) > before and run.session.connected


def _summary(name: str, values: list[float]) -> None:
    ms = sorted(v * 1000 for v in values)
    print(f"{name}: median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms over {len(ms)}")


def main() -> None:
    fast = WebSocketSettings(ping_interval=1.0, ping_timeout=2.0, reconnect_min=0.1)
    settings = SandboxSettings(rate_limits=RateLimits(auth=1000), pubnub_hold_seconds=0.5)
    with Sandbox(settings) as sb:
        run = _Run(sb, fast)
        _summary("drop -> recovered", [_timed(run, sb.faults.ws_drop_connections, _reconnects(run, "drop"))
                                      for _ in range(ROUNDS)])
        _summary("WSG-903 -> recovered", [_timed(run, lambda: sb.faults.ws_close("WSG-903"),
                                                 _reconnects(run, "absolute")) for _ in range(ROUNDS)])

        def failed_recovery() -> None:
            sb.faults.ws_fail_recovery(count=1)
            sb.faults.ws_drop_connections()

        def resubscribed() -> Callable[[], bool]:
            gaps = len(run.gaps)
            return lambda: len(run.gaps) > gaps and run.session.connected

        _summary("failed recovery -> subscribed again",
                 [_timed(run, failed_recovery, resubscribed()) for _ in range(ROUNDS)])
        _summary(f"stall -> noticed (ping_interval {fast.ping_interval} s, ping_timeout {fast.ping_timeout} s)",
                 [_timed(run, sb.faults.ws_stall, _reconnects(run, "pong-timeout")) for _ in range(3)])
        run.session.stop()
    with Sandbox(settings) as sb:
        run = _Run(sb, fast)
        sb.generator.start(200)
        for _ in range(ROUNDS):
            time.sleep(0.5)
            sb.faults.ws_drop_connections()
        time.sleep(0.5)
        sb.generator.stop()
        published = [g.uuid for g in sb.generator.generated]
        wait_for(lambda: len(run.uuids) >= len(published), timeout=60)
        print(f"steady 200/s with {ROUNDS} drops: published {len(published)}, handed on {len(run.uuids)}, "
              f"lost {len(set(published) - set(run.uuids))}, twice {len(run.uuids) - len(set(run.uuids))}, "
              f"replays dropped as duplicates {run.count('ingest_notifications_duplicate_total'):.0f}")
        run.session.stop()
    with Sandbox(SandboxSettings(rate_limits=False, pubnub_hold_seconds=0.5, payload_size=900)) as sb:
        run = _Run(sb, WebSocketSettings())
        n = 20000
        cpu, wall = time.process_time(), time.monotonic()
        sb.generator.publish(n)
        wait_for(lambda: len(run.uuids) >= n, timeout=300)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        print(f"{n} notifications of ~900 B through one connection (sandbox and client in one process): "
              f"{n / wall:.0f}/s, {cpu / n * 1e6:.0f} us CPU each (server, generator and client together)")
        run.session.stop()


if __name__ == "__main__":
    main()
