"""How fast the sandbox hands pre-buffered messages to one subscriber.

The sandbox must never be the bottleneck of a benchmark of the worker, so this measures its
delivery rate on its own: N notifications (encrypted, ~`--payload-size` bytes of plaintext each)
are generated into the PubNub buffer first, then drained from an old cursor by

- a plain `requests.Session` long-poll loop (the figure asked for; the client library's own cost
  per request, ~1 ms, dominates it),
- the same loop over bare `http.client` (still parsing every response as JSON),
- a raw socket that only reads each response and its cursor (the server's own capacity), and
- the real `pubnub` SDK (native `PubNub`, `with_timetoken`), which parses every envelope.

    python -m tests.bench.sandbox_delivery [--messages 30000] [--payload-size 1024] [--no-sdk]

Prints one JSON object with messages per second for each client (best of `--repeat` runs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import requests

from ingest.sandbox.server import Sandbox, SandboxSettings

PRESENCE = "/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true"


def _subscribe(sb: Sandbox) -> dict[str, Any]:
    account = sb.accounts[0]
    session = requests.Session()
    token = session.post(f"{sb.rc_url}/restapi/oauth/token", auth=(sb.client_id, sb.client_secret),
                         data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                               "assertion": account.jwt}, timeout=10).json()["access_token"]
    answer = session.post(f"{sb.rc_url}/restapi/v1.0/subscription", headers={"Authorization": f"Bearer {token}"},
                          json={"eventFilters": [PRESENCE], "deliveryMode": {"transportType": "PubNub"}},
                          timeout=10)
    answer.raise_for_status()
    mode: dict[str, Any] = answer.json()["deliveryMode"]
    return mode


def drain_with_requests(origin: str, sub_key: str, channel: str, start_tt: int, n: int) -> tuple[float, int]:
    """Seconds to receive `n` messages from cursor `start_tt` with a keep-alive long-poll loop."""
    url = f"http://{origin}/v2/subscribe/{sub_key}/{channel}/0"
    session = requests.Session()
    session.trust_env = False  # no proxy lookup in os.environ on every request
    tt, region, received, polls = start_tt, None, 0, 0
    began = time.perf_counter()
    while received < n:
        params: dict[str, Any] = {"tt": tt, "uuid": "bench"}
        if region is not None:
            params["tr"] = region
        body = json.loads(session.get(url, params=params, timeout=30).content)  # bytes: no str decode
        received += len(body["m"])
        tt, region = int(body["t"]["t"]), body["t"]["r"]
        polls += 1
    return time.perf_counter() - began, polls


def drain_with_http_client(origin: str, sub_key: str, channel: str, start_tt: int, n: int) -> float:
    """The same loop over bare `http.client`: the server's capacity without the client library's cost."""
    host, port = origin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    tt, received = start_tt, 0
    began = time.perf_counter()
    while received < n:
        conn.request("GET", f"/v2/subscribe/{sub_key}/{channel}/0?tt={tt}&uuid=bench")
        body = json.loads(conn.getresponse().read())
        received += len(body["m"])
        tt = int(body["t"]["t"])
    conn.close()
    return time.perf_counter() - began


def drain_with_socket(origin: str, sub_key: str, channel: str, start_tt: int, n: int) -> float:
    """The server's own capacity: a raw keep-alive socket that reads each response whole and takes
    only the cursor and the message count from it (no JSON parsing on the client)."""
    host, port = origin.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    buf = bytearray(1 << 23)
    view = memoryview(buf)
    tt, received = start_tt, 0
    began = time.perf_counter()
    while received < n:
        sock.sendall(f"GET /v2/subscribe/{sub_key}/{channel}/0?tt={tt}&uuid=bench HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode())
        got, total = 0, -1
        while total < 0 or got < total:
            chunk = sock.recv_into(view[got:])
            if not chunk:
                raise ConnectionError("server closed the connection")
            got += chunk
            if total < 0 and (end := buf.find(b"\r\n\r\n", 0, got)) >= 0:
                length = int(bytes(buf[:end]).lower().split(b"content-length:")[1].split(b"\r\n")[0])
                total = end + 4 + length
        body = bytes(buf[total - length:total])
        tt = int(body[11:28])  # {"t":{"t":"<17 digits>"
        received += body.count(b'"p":{"t":"')
    sock.close()
    return time.perf_counter() - began


def drain_with_sdk(origin: str, sub_key: str, channel: str, start_tt: int, n: int) -> float:
    """Seconds for the real SDK to deliver `n` messages to a listener, resuming from `start_tt`."""
    from pubnub.callbacks import SubscribeCallback
    from pubnub.pnconfiguration import PNConfiguration
    from pubnub.pubnub import PubNub

    done = threading.Event()
    count = [0]

    class Counter(SubscribeCallback):  # type: ignore[misc]
        def status(self, pubnub: Any, status: Any) -> None:
            pass

        def presence(self, pubnub: Any, presence: Any) -> None:
            pass

        def message(self, pubnub: Any, message: Any) -> None:
            count[0] += 1
            if count[0] >= n:
                done.set()

    config = PNConfiguration()
    config.subscribe_key = sub_key
    config.user_id = "bench"
    config.ssl = False
    config.origin = origin
    config.daemon = True
    config.suppress_leave_events = True
    pubnub = PubNub(config)
    pubnub.add_listener(Counter())
    began = time.perf_counter()
    pubnub.subscribe().channels([channel]).with_timetoken(start_tt).execute()
    finished = done.wait(600)
    elapsed = time.perf_counter() - began
    pubnub.stop()
    if not finished:
        raise RuntimeError(f"SDK delivered {count[0]} of {n} messages")
    return elapsed


def _serve(settings: SandboxSettings, n: int, conn: Connection) -> None:
    """Child process: run the sandbox, buffer `n` notifications, report where, wait for "stop"."""
    with Sandbox(settings) as sb:
        mode = _subscribe(sb)
        began = time.perf_counter()
        generated = sb.generator.publish(n)
        info = {"pubnub_origin": sb.pubnub_origin, "sub_key": mode["subscriberKey"], "channel": mode["address"],
                "start_tt": generated[0].timetoken - 1,
                "generate_per_second": round(n / (time.perf_counter() - began)),
                "avg_payload_bytes": round(sum(len(g.payload) for g in generated) / n),
                "buffered": sb.pubnub.stats(mode["subscriberKey"]).buffered}
        conn.send(info)
        conn.recv()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--payload-size", type=int, default=1024, help="target plaintext bytes per notification")
    parser.add_argument("--per-response", type=int, default=100, help="messages per subscribe response (real: 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client; the best is reported")
    parser.add_argument("--no-sdk", action="store_true", help="skip the (slower) pubnub SDK measurement")
    args = parser.parse_args(argv)
    n = args.messages
    settings = SandboxSettings(buffer_size=n, max_messages_per_response=args.per_response, rate_limits=False,
                               pubnub_hold_seconds=0.5, payload_size=args.payload_size)
    # The sandbox runs in its own process, as it does in a real benchmark: client and server do not
    # share one GIL, so the figure is the server's rate, not the sum of both sides' work.
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(settings, n, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(300):
            raise RuntimeError("the sandbox process did not start")
        info = parent.recv()
        result: dict[str, Any] = {"messages": n, "per_response": args.per_response,
                                  "generate_per_second": info["generate_per_second"],
                                  "avg_payload_bytes": info["avg_payload_bytes"]}
        if info["buffered"] != n:
            raise RuntimeError(f"only {info['buffered']} of {n} messages buffered")
        where = (info["pubnub_origin"], info["sub_key"], info["channel"], info["start_tt"], n)

        def best(drain: Callable[..., float]) -> dict[str, Any]:
            # Best of --repeat runs: the machine is shared, and the first run also warms the imports.
            runs = [drain(*where) for _ in range(args.repeat)]
            return {"seconds": round(min(runs), 3), "messages_per_second": round(n / min(runs)),
                    "runs_messages_per_second": [round(n / r) for r in runs]}

        result["requests"] = best(lambda *a: drain_with_requests(*a)[0])
        result["http_client"] = best(drain_with_http_client)
        result["raw_socket"] = best(drain_with_socket)
        if not args.no_sdk:
            result["pubnub_sdk"] = best(drain_with_sdk)
    finally:
        parent.send("stop")
        proc.join(10)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
