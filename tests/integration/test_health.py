"""The health server over real HTTP: /metrics from a real `Metrics` registry, /healthz and /readyz.

Kafka reachability is checked against the real broker (and a closed port for "unreachable").
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from confluent_kafka import Producer
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from ingest.observability.health import HealthServer, Heartbeats, KafkaReachability, SubscriptionRow, readiness_check
from ingest.observability.logs import register_secret
from ingest.observability.metrics import FamilyMetrics, Metrics
from tests.support import free_port, samples, wait_for


def ok() -> tuple[bool, str]:
    return True, "ok"


@pytest.fixture
def serve() -> Iterator[Callable[..., HealthServer]]:
    """Start HealthServers on free ports; stop them all at the end of the test."""
    started: list[HealthServer] = []

    def start(metrics: Metrics | None = None, request_deadline: float = 10.0,
              **checks: Callable[[], tuple[bool, str]]) -> HealthServer:
        server = HealthServer(metrics or Metrics(), "127.0.0.1", 0, request_deadline=request_deadline,
                              liveness=checks.get("liveness", ok), readiness=checks.get("readiness", ok))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def get(server: HealthServer, path: str, **kwargs: object) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{server.port}{path}", timeout=5, **kwargs)  # type: ignore[arg-type]


def test_metrics_endpoint_serves_the_registry_in_prometheus_text(serve: Callable[..., HealthServer]) -> None:
    metrics = Metrics()
    family = FamilyMetrics.for_family(metrics, "message-store")
    family.published.inc(3)
    family.lag.observe(0.2)
    metrics.notifications_dead_lettered.labels("presence", "schema").inc()
    metrics.subscription_expiry.set("acme/messages", time.time() + 600)
    metrics.subscription_expiry.set("acme/presence", time.time() - 5)
    server = serve(metrics)

    response = get(server, "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = samples(response.text)
    assert found[("ingest_notifications_published_total", frozenset({("family", "message-store")}))] == 3
    assert found[("ingest_lag_seconds_bucket", frozenset({("family", "message-store"), ("le", "0.25")}))] == 1
    assert found[("ingest_lag_seconds_bucket", frozenset({("family", "message-store"), ("le", "0.1")}))] == 0
    assert found[("ingest_notifications_dead_lettered_total",
                  frozenset({("family", "presence"), ("reason", "schema")}))] == 1
    assert found[("ingest_build_info", frozenset({("version", metrics.build_info._value["version"])}))] == 1
    # Expiry is computed at scrape time: one live subscription, one lapsed (negative), the minimum.
    live = found[("ingest_subscription_expiry_seconds", frozenset({("spec", "acme/messages"), ("account", "acme")}))]
    lapsed = found[("ingest_subscription_expiry_seconds", frozenset({("spec", "acme/presence"), ("account", "acme")}))]
    assert 590 < live <= 600
    assert -10 < lapsed <= -5
    assert found[("ingest_subscription_expiry_min_seconds", frozenset())] == lapsed

    # Prometheus asking for OpenMetrics gets OpenMetrics.
    om = get(server, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert "ingest_lag_seconds" in {f.name for f in parse_openmetrics(om.text)}  # type: ignore[no-untyped-call]


def test_expiry_ages_between_scrapes_and_forgotten_specs_disappear(serve: Callable[..., HealthServer]) -> None:
    now = [1000.0]
    metrics = Metrics()
    metrics.subscription_expiry._clock = lambda: now[0]  # the collector's clock: drive time by hand
    metrics.subscription_expiry.set("acme/messages", 1100.0)
    metrics.spec("acme/messages").last_notification.set(990.0)
    server = serve(metrics)

    key = ("ingest_subscription_expiry_seconds", frozenset({("spec", "acme/messages"), ("account", "acme")}))
    assert samples(get(server, "/metrics").text)[key] == 100
    now[0] = 1130.0  # nobody renewed: the scrape alone shows the lapse
    found = samples(get(server, "/metrics").text)
    assert found[key] == -30
    assert found[("ingest_subscription_expiry_min_seconds", frozenset())] == -30

    metrics.forget_spec("acme/messages")
    names = {name for name, _ in samples(get(server, "/metrics").text)}
    assert "ingest_subscription_expiry_seconds" not in names
    assert "ingest_subscription_expiry_min_seconds" not in names  # no owned subscription, no minimum
    assert "ingest_last_notification_timestamp_seconds" not in names


def test_spec_children_start_the_notification_clock_and_states_drop_to_zero() -> None:
    metrics = Metrics()
    before = time.time()
    spec = metrics.spec("acme/messages")
    assert metrics.spec("acme/messages") is spec  # cached, not rebuilt per message
    assert before <= spec.last_notification._value.get() <= time.time()

    metrics.set_subscription_states({"active": 2, "renewing": 1})
    metrics.set_subscription_states({"active": 3})
    assert metrics.subscriptions.labels("active")._value.get() == 3
    assert metrics.subscriptions.labels("renewing")._value.get() == 0


def test_healthz_fails_when_a_loop_stops_beating_and_recovers(serve: Callable[..., HealthServer]) -> None:
    now = [0.0]
    beats = Heartbeats(clock=lambda: now[0])
    beats.register("pipeline", 10)
    beats.register("scheduler", 30)
    server = serve(liveness=beats.check)

    response = get(server, "/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})

    now[0] = 12.0  # pipeline silent for 12 s > 10 s allowed; scheduler still within 30 s
    response = get(server, "/healthz")
    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["status"] == "fail"
    assert "pipeline" in body["reason"]
    assert "scheduler" not in body["reason"]

    beats.beat("pipeline")
    assert get(server, "/healthz").status_code == 200

    now[0] = 100.0
    beats.beat("pipeline")
    beats.unregister("scheduler")  # a loop that ended on purpose no longer counts
    assert get(server, "/healthz").status_code == 200


def test_readyz_flips_on_lapse_and_kafka_and_back(serve: Callable[..., HealthServer]) -> None:
    kafka = [True]
    owned: list[SubscriptionRow] = [("acme/messages", "active", time.time() + 900)]
    server = serve(readiness=readiness_check(lambda: kafka[0], lambda: list(owned)))
    assert get(server, "/readyz").json() == {"status": "ok"}

    # The subscription lapses in real time: readiness must notice without anyone telling it.
    owned[0] = ("acme/messages", "active", time.time() + 0.3)
    wait_for(lambda: get(server, "/readyz").status_code == 503, 5, what="/readyz answering 503")
    response = get(server, "/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "fail"
    assert "acme/messages expired" in response.json()["reason"]

    owned[0] = ("acme/messages", "active", time.time() + 900)  # renewed
    assert get(server, "/readyz").status_code == 200

    kafka[0] = False
    response = get(server, "/readyz")
    assert (response.status_code, response.json()) == (503, {"status": "fail", "reason": "kafka unreachable"})
    kafka[0] = True
    assert get(server, "/readyz").status_code == 200

    owned.append(("acme/presence", "pending", time.time() + 900))  # owned but not active yet
    response = get(server, "/readyz")
    assert response.status_code == 503
    assert response.json()["reason"] == "subscription acme/presence is pending"
    owned.pop()
    assert get(server, "/readyz").status_code == 200

    owned.clear()  # owning nothing is ready: a standby for the other workers' specs
    assert get(server, "/readyz").status_code == 200


def test_readiness_names_a_bounded_number_of_failures() -> None:
    now = 1000.0
    owned = [(f"acct/sub{i}", "active", now - 1) for i in range(8)]
    ready, reason = readiness_check(lambda: True, lambda: owned, clock=lambda: now)()
    assert not ready
    assert reason.count("expired") == 5
    assert reason.endswith("(and 3 more)")
    ready, _ = readiness_check(lambda: True, lambda: [("a/b", "renewing", now + 60)],
                               ready_states=("active", "renewing"), clock=lambda: now)()
    assert ready


def test_a_raising_check_is_a_redacted_503(serve: Callable[..., HealthServer]) -> None:
    secret = "s3cr3t-token-value-for-test"
    register_secret(secret)

    def broken() -> tuple[bool, str]:
        raise RuntimeError(f"could not read state with {secret}")

    server = serve(readiness=broken)
    response = get(server, "/readyz")
    assert response.status_code == 503
    assert secret not in response.text
    assert response.json()["reason"].startswith("check raised RuntimeError")
    assert get(server, "/healthz").status_code == 200
    assert get(server, "/nope").status_code == 404


def test_stop_releases_the_port(serve: Callable[..., HealthServer]) -> None:
    server = HealthServer(Metrics(), "127.0.0.1", 0, liveness=ok, readiness=ok)
    server.start()
    port = server.port
    assert port != 0
    assert get(server, "/healthz").status_code == 200
    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = HealthServer(Metrics(), "127.0.0.1", port, liveness=ok, readiness=ok)
    again.start()  # the port is free again
    again.stop()


def test_kafka_reachability_against_the_real_broker_and_a_dead_address(
        serve: Callable[..., HealthServer], kafka_bootstrap: str) -> None:
    # The worker's own check (a metadata request with its producer, on its checkpoint loop): readiness
    # and ingest_kafka_up follow the last answer, and a probe never waits on the network.
    metrics = Metrics()
    live = KafkaReachability(metrics)
    server = serve(metrics, readiness=readiness_check(lambda: live.ok, lambda: []))
    assert get(server, "/readyz").json()["reason"] == "kafka unreachable"  # nothing checked yet
    assert live.check(Producer({"bootstrap.servers": kafka_bootstrap}), "any-topic", timeout=10)
    assert get(server, "/readyz").status_code == 200
    assert samples(get(server, "/metrics").text)[("ingest_kafka_up", frozenset())] == 1

    dead_metrics = Metrics()
    dead = KafkaReachability(dead_metrics)
    dead.report(True)  # it answered once, then went away
    server = serve(dead_metrics, readiness=readiness_check(lambda: dead.ok, lambda: []))
    assert not dead.check(Producer({"bootstrap.servers": f"127.0.0.1:{free_port()}", "log_level": 0}),
                          "any-topic", timeout=0.5)
    response = get(server, "/readyz")
    assert (response.status_code, response.json()["reason"]) == (503, "kafka unreachable")
    assert samples(get(server, "/metrics").text)[("ingest_kafka_up", frozenset())] == 0


BURST = 1_000  # concurrent connections: probes of every pod of a node plus scrapes, after a network blip


async def _request(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        return await reader.read()  # HTTP/1.0: the server closes after the answer
    finally:
        writer.close()


async def _burst(port: int, count: int, timeout: float) -> list[bytes | BaseException]:
    """`count` connections at once (a /metrics scrape among every ten /healthz probes)."""
    async def one(i: int) -> bytes:
        return await asyncio.wait_for(_request(port, "/metrics" if i % 10 == 0 else "/healthz"), timeout)
    return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


def _listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen backlog was full (TcpExt)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def test_a_burst_of_1000_concurrent_connections_is_answered(serve: Callable[..., HealthServer]) -> None:
    server = serve()
    overflows = _listen_overflows()
    started = time.monotonic()
    answers = asyncio.run(_burst(server.port, BURST, timeout=15.0))
    took = time.monotonic() - started
    failed = [a for a in answers if not (isinstance(a, bytes) and a.startswith(b"HTTP/1.0 200 "))]
    print(f"\n[health] {BURST} concurrent connections: {BURST - len(failed)} answered in {took:.1f} s, "
          f"listen overflows +{_listen_overflows() - overflows} (machine-wide)")
    assert failed == [], f"{len(failed)} of {BURST} not answered, e.g. {failed[:3]!r}"


def test_a_client_trickling_its_request_is_cut_off_at_the_deadline(serve: Callable[..., HealthServer]) -> None:
    """One byte every 0.2 s: each read is quick, only a deadline for the whole request ends it."""
    deadline = 1.0
    server = serve(request_deadline=deadline)
    request = b"GET /healthz HTTP/1.0\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"  # 45 s at this pace
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
        started = time.monotonic()
        closed_after = None
        for byte in request:
            try:
                slow.sendall(bytes([byte]))
            except OSError:  # reset: the server closed
                closed_after = time.monotonic() - started
                break
            slow.settimeout(0.2)
            try:
                if slow.recv(1) == b"":  # orderly close
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            assert time.monotonic() - started < deadline + 5.0, "the slow client is still connected"
            assert get(server, "/healthz").status_code == 200  # others are served meanwhile
        assert closed_after is not None and deadline <= closed_after < deadline + 5.0, closed_after
        print(f"\n[health] trickling client cut off after {closed_after:.2f} s (deadline {deadline:g} s)")
