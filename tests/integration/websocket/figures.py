"""The WebSocket figures of docs/faults.md and docs/sandbox.md: `python -m tests.integration.websocket.figures`.

Against the sandbox, with the real client: reconnect and recovery times after a socket drop, a planned
close (WSG-903) and a failed recovery; how long a stalled connection takes to be noticed; what is lost
and what is replayed under steady traffic with repeated drops; and the client's receive cost per
notification (CPU seconds of the whole process per notification handed on).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import requests
from websockets.sync.client import connect

from ingest.observability.metrics import Metrics
from ingest.rc.http import RingCentralClient
from ingest.rc.tokens import TokenManager
from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.transports.websocket import Gap, Notification, WebSocketSession, WebSocketSettings
from tests.integration.sandbox.conftest import MESSAGE_STORE
from tests.support.waiting import wait_for

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
    client_cost()
    many_users()


def many_users(users: int = 100, seconds: float = 30.0, rate: float = 20.0) -> None:
    """The realistic scenario (many users, sparse traffic) in the client: one session (thread, socket,
    `websockets`' reader thread) per user, the pings from one shared thread; RSS, threads and CPU of this
    process. Through the worker: tests/bench/websocket.py."""
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "sandbox", "--json", "--no-rate-limits",
                             "--accounts", str(users), "--extensions", "1"], stdout=subprocess.PIPE, text=True)
    sessions: list[WebSocketSession] = []
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        rss, threads = _rss_kib(), threading.active_count()
        received: list[int] = []
        for account in info["accounts"]:
            http, metrics = requests.Session(), Metrics()
            tokens = TokenManager(info["rc_url"], info["client_id"], info["client_secret"], account["jwt"], metrics,
                                  http)
            client = RingCentralClient(info["rc_url"], tokens, metrics, http)
            session = WebSocketSession(client, [MESSAGE_STORE], lambda batch, _: received.append(len(batch)), metrics)
            session.start()
            sessions.append(session)
        wait_for(lambda: all(s.connected for s in sessions), timeout=120)
        print(f"{users} users: +{(_rss_kib() - rss) / users:.0f} KiB RSS and "
              f"+{(threading.active_count() - threads) / users:.0f} threads per session")
        for label, traffic in (("idle", 0.0), (f"{rate:g} notifications/s in all", rate)):
            if traffic:
                requests.post(f"{info['rc_url']}/sandbox/generator/start", json={"rate": traffic}, timeout=30)
            cpu = time.process_time()
            time.sleep(seconds)
            print(f"{users} users, {label}: {(time.process_time() - cpu) / seconds * 100:.1f}% of a core")
        requests.post(f"{info['rc_url']}/sandbox/generator/stop", timeout=30)
    finally:
        for session in sessions:
            session.stop(timeout=1)
        proc.terminate()
        proc.wait(30)


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def client_cost(n: int = 20000) -> None:
    """CPU of this process only (the sandbox runs in its own): the bare `websockets` receive loop, and
    the session (frame split, uuid de-duplication, positions) on top of it."""
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "sandbox", "--json", "--no-rate-limits",
                             "--payload-size", "900"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        account, http, metrics = info["accounts"][0], requests.Session(), Metrics()
        tokens = TokenManager(info["rc_url"], info["client_id"], info["client_secret"], account["jwt"], metrics, http)
        client = RingCentralClient(info["rc_url"], tokens, metrics, http)
        for compression in ("deflate", None):
            _bare(client, info, n, compression)
        received: list[int] = []
        session = WebSocketSession(client, [MESSAGE_STORE], lambda batch, _: received.append(len(batch)), metrics)
        session.start()
        wait_for(lambda: session.connected, timeout=30)
        _cost("WebSocketSession (split, de-duplication, positions)", n, info,
              lambda: wait_for(lambda: sum(received) >= n, timeout=300, interval=0.05))
        session.stop()
    finally:
        proc.terminate()
        proc.wait(30)


def _bare(client: RingCentralClient, info: dict[str, Any], n: int, compression: str | None) -> None:
    token = client.ws_token()
    with connect(f"{token['uri']}?access_token={token['ws_access_token']}", proxy=None, max_size=None,
                 compression=compression) as ws:
        ws.recv(timeout=10)
        ws.send(json.dumps([{"type": "ClientRequest", "messageId": "1", "method": "POST",
                             "path": "/restapi/v1.0/subscription"},
                            {"eventFilters": [MESSAGE_STORE], "deliveryMode": {"transportType": "WebSocket"}}]))
        subscription = json.loads(ws.recv(timeout=10))[1]["id"]
        _cost(f"bare websockets recv loop, compression {compression}", n, info,
              lambda: [ws.recv(timeout=60) for _ in range(n)])
        ws.send(json.dumps([{"type": "ClientRequest", "messageId": "2", "method": "DELETE",
                             "path": f"/restapi/v1.0/subscription/{subscription}"}]))
        ws.recv(timeout=10)  # the generator publishes round-robin: to the next session's subscription only


def _cost(name: str, n: int, info: dict[str, Any], receive: Callable[[], Any]) -> None:
    publisher = threading.Thread(target=requests.post, args=(f"{info['rc_url']}/sandbox/generator/publish",),
                                 kwargs={"json": {"n": n}, "timeout": 300})
    cpu, wall = time.process_time(), time.monotonic()
    publisher.start()
    receive()
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    publisher.join()
    print(f"{name}: {n} notifications of ~900 B as the sandbox sends them, {n / wall:.0f}/s, "
          f"{cpu / n * 1e6:.1f} us CPU each in the client process")


if __name__ == "__main__":
    main()
