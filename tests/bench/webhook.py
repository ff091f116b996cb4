"""WebHook receiver benchmarks (docs/benchmarks.md, "WebHook receiver").

    python -m tests.bench.webhook servers          # the HTTP server choice: stdlib, waitress, cheroot
    python -m tests.bench.webhook ack BOOTSTRAP    # 200 after the Kafka acknowledgement vs 200 before it

Each measured server runs in a spawned process of its own; the load comes from two other processes,
8 keep-alive connections each, every POST a distinct ~1 KiB notification, for `SECONDS`. `servers`
adds a run with 64 slow clients holding connections open mid-request (a sender that stalls).
"""

from __future__ import annotations

import http.client
import logging
import multiprocessing
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.queues import Queue
from typing import Any

import orjson

SPAWN = multiprocessing.get_context("spawn")
SECONDS = 8.0
CLIENTS, CONNECTIONS = 2, 8
SLOW_CLIENTS = 64
PATH = "/ringcentral/webhook"
TOKEN = "vt-bench-" + "k" * 34
SUBSCRIPTION_ID = "5b2f0bd6-bench-0000-0000-000000000001"


def _body(n: int) -> bytes:
    return orjson.dumps({
        "uuid": str(uuid.uuid4()), "event": "/restapi/v1.0/account/809646016/extension/62264425004/message-store",
        "timestamp": "2026-12-01T22:00:00.000Z", "subscriptionId": SUBSCRIPTION_ID, "ownerId": "62264425004",
        "body": {"extensionId": 62264425004, "lastUpdated": "2026-12-01T22:00:00.000Z",
                 "changes": [{"type": "SMS", "newCount": 1, "updatedCount": 0}], "pad": "p" * (600 + n % 7)},
    })


# ---- the servers under test ------------------------------------------------------------------


def _plain_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]


class _StdlibHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # without it, each answer waits ~40 ms for a delayed ACK

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve_plain(kind: str, ports: Queue[int]) -> None:
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    if kind == "stdlib":
        stdlib = ThreadingHTTPServer(("127.0.0.1", 0), _StdlibHandler)
        ports.put(stdlib.server_address[1])
        stdlib.serve_forever()
    elif kind == "waitress":
        from waitress.server import create_server

        server = create_server(_plain_wsgi, host="127.0.0.1", port=0, threads=16)
        ports.put(server.effective_port)
        server.run()
    else:
        from cheroot.wsgi import Server

        cheroot = Server(("127.0.0.1", 0), _plain_wsgi, numthreads=16)
        cheroot.prepare()
        ports.put(cheroot.bind_addr[1])
        cheroot.serve()


def _serve_receiver(bootstrap: str, prefix: str, answer_first: bool, ports: Queue[int]) -> None:
    """The real receiver (pipeline, sink, KafkaHandler, waitress); `answer_first`: 200 before the ack."""
    from confluent_kafka.admin import AdminClient

    from ingest.data.catalogue import default_catalogue
    from ingest.data.pipeline import Pipeline
    from ingest.data.sink import KafkaSink
    from ingest.observability.metrics import Metrics
    from ingest.topology import TopicNames, ensure_topics
    from ingest.transports.webhook import (
        DeliveryHandler,
        SubscriptionTable,
        WebhookApp,
        WebhookDelivery,
        WebhookServer,
        WebhookSubscription,
    )
    from tests.support.webhook_kafka import KafkaHandler

    topics = TopicNames(prefix)
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), topics.all_output_topics(), partitions=6,
                  replication_factor=1)
    metrics = Metrics()
    sink = KafkaSink({"bootstrap.servers": bootstrap}, metrics)
    sink.start()
    table = SubscriptionTable()
    table.put(WebhookSubscription(SUBSCRIPTION_ID, "bench/messages", "809646016", TOKEN))
    kafka = KafkaHandler(Pipeline(default_catalogue(), topics), sink, metrics, max_queued=100_000)

    def before_the_ack(delivery: WebhookDelivery, deadline: float) -> bool:
        kafka(delivery, time.monotonic())  # produced, not waited for
        return True

    handler: DeliveryHandler = before_the_ack if answer_first else kafka
    app = WebhookApp(path=PATH, table=table, handler=handler, metrics=metrics)
    server = WebhookServer(app, "127.0.0.1", 0, threads=16)
    server.start()
    ports.put(server.port)
    threading.Event().wait()


# ---- load ------------------------------------------------------------------------------------


def _client(port: int, connections: int, seconds: float, out: Queue[tuple[list[float], int]]) -> None:
    latencies: list[float] = []
    failed = [0]
    stop = time.monotonic() + seconds

    def one(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        n = index
        while time.monotonic() < stop:
            started = time.perf_counter()
            conn.request("POST", PATH, _body(n), {"Content-Type": "application/json", "Verification-Token": TOKEN})
            answer = conn.getresponse()
            answer.read()
            latencies.append(time.perf_counter() - started)
            failed[0] += answer.status != 200
            n += connections
    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((latencies, failed[0]))


def _stall(port: int, count: int, seconds: float) -> None:
    """Connections that send headers and one body byte, then nothing (a stalled sender)."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 1000\r\n\r\n{{".encode())
        held.append(sock)
    time.sleep(seconds)
    for sock in held:
        sock.close()


def _measure(serve: Callable[..., None], args: tuple[Any, ...], *, slow: int = 0) -> dict[str, float | int]:
    """answers_per_second, p50_seconds, p99_seconds and not_200 of one server under the load."""
    ports: Queue[int] = SPAWN.Queue()
    server = SPAWN.Process(target=serve, args=(*args, ports), daemon=True)
    server.start()
    port = ports.get(timeout=120)
    try:
        staller = None
        if slow:
            staller = SPAWN.Process(target=_stall, args=(port, slow, SECONDS + 5), daemon=True)
            staller.start()
            time.sleep(2)
        out: Queue[tuple[list[float], int]] = SPAWN.Queue()
        clients = [SPAWN.Process(target=_client, args=(port, CONNECTIONS, SECONDS, out)) for _ in range(CLIENTS)]
        for c in clients:
            c.start()
        results = [out.get(timeout=SECONDS + 120) for _ in clients]
        for c in clients:
            c.join()
        if staller is not None:
            staller.kill()
    finally:
        server.kill()
    latencies = sorted(x for lat, _ in results for x in lat)
    failed = sum(f for _, f in results)
    if not latencies:
        return {"answers_per_second": 0, "not_200": failed}
    return {"answers_per_second": len(latencies) / SECONDS, "p50_seconds": latencies[len(latencies) // 2],
            "p99_seconds": latencies[int(len(latencies) * 0.99)], "not_200": failed}


def _row(label: str, figures: dict[str, float | int]) -> str:
    if not figures["answers_per_second"]:
        return f"| {label} | 0 | - | - | {figures['not_200']} |"
    return (f"| {label} | {figures['answers_per_second']:,.0f} | {figures['p50_seconds'] * 1e3:.1f} | "
            f"{figures['p99_seconds'] * 1e3:.1f} | {figures['not_200']} |")


def run(bootstrap: str) -> dict[str, Any]:
    """`make bench`'s scenario: the receiver answering 200 after the Kafka acknowledgement, and the
    baseline in the same run (the same server answering 200 before producing is acknowledged)."""
    prefix = f"bench-webhook-{uuid.uuid4().hex[:8]}"
    baseline = _measure(_serve_receiver, (bootstrap, prefix, True))
    after_ack = _measure(_serve_receiver, (bootstrap, prefix, False))
    ratio = after_ack["answers_per_second"] / baseline["answers_per_second"] if baseline["answers_per_second"] else None
    return {"settings": {"seconds": SECONDS, "clients": CLIENTS, "connections": CONNECTIONS},
            "baseline_answer_first": baseline, "after_ack": after_ack, "ratio_after_ack_vs_baseline": ratio}


def main(argv: list[str]) -> None:
    print("| server | answers/s | p50 ms | p99 ms | not 200 |")
    print("|---|---|---|---|---|")
    if argv[:1] == ["servers"]:
        for kind in ("stdlib", "waitress", "cheroot"):
            print(_row(kind, _measure(_serve_plain, (kind,))), flush=True)
        for kind in ("stdlib", "waitress", "cheroot"):
            print(_row(f"{kind}, {SLOW_CLIENTS} stalled senders", _measure(_serve_plain, (kind,), slow=SLOW_CLIENTS)),
                  flush=True)
    elif argv[:1] == ["ack"] and len(argv) == 2:
        figures = run(argv[1])
        print(_row("200 before the Kafka ack (baseline)", figures["baseline_answer_first"]), flush=True)
        print(_row("200 after the Kafka ack", figures["after_ack"]), flush=True)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
