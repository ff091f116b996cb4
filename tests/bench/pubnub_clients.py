"""What one PubNub subscribe poll costs the worker's process, per client: many channels, sparse traffic.

The sandbox runs in its own process and publishes itself (pre-encoded Base64 payloads spread evenly
over every channel), so this process does nothing but read: the PubNub transport with a counting
handler, or the SDK's asyncio client (`PubNubAsyncio`, one instance per connection of 50 channels, a
listener counting messages). Over a measured window after every connection answered: CPU of this
process per poll and per notification (and the kernel's share of it), messages per poll (polls
counted by the sandbox), OS threads, RSS, and the sandbox's own CPU.

    python -m tests.bench.pubnub_clients [--client lean|sdk|sdk-asyncio] [--channels 2000] [--rate 1000]
                                         [--seconds 20]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import resource
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from ingest.observability.metrics import Metrics
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.transports.base import Received
from ingest.transports.pubnub import PubNubTransport, TransportSettings, timetoken_at
from tests.support import wait_for

SUB_KEY = "sub-c-bench"
CHANNELS_PER_CONNECTION = 50


def _channel(i: int) -> str:
    return f"RCNOTIFY_bench_{i:06d}"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _proc_status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# ---- the sandbox process --------------------------------------------------------------------------

def _serve(pipe: Connection, channels: int, rate: float, payload_size: int) -> None:
    """Run the sandbox, publish `rate`/s round-robin over the channels on command, answer stats."""
    sb = Sandbox(SandboxSettings(pubnub_hold_seconds=10.0, rate_limits=False, buffer_size=20_000)).start()
    pipe.send(sb.pubnub_origin)
    data = json.dumps(base64.b64encode(os.urandom(payload_size)).decode())  # a Base64 ciphertext's shape
    names = [_channel(i) for i in range(channels)]
    stopping = threading.Event()

    def publish() -> None:
        tick, sent, began = 0.01, 0, time.monotonic()
        while not stopping.wait(tick):
            due = int((time.monotonic() - began) * rate)
            for _ in range(due - sent):
                sb.pubnub.publish_serialized(SUB_KEY, names[sent % channels], data)
                sent += 1

    publisher = threading.Thread(target=publish, daemon=True)
    while True:
        command = pipe.recv()
        if command == "publish":
            publisher.start()
        elif command == "stats":
            pipe.send((sb.pubnub.polls, _cpu_seconds()))
        else:
            stopping.set()
            sb.close()
            return


# ---- the clients ----------------------------------------------------------------------------------

class _Counter:
    def __init__(self) -> None:
        self.received = 0

    def on_batch(self, batch: list[Received], received_at: float) -> None:
        self.received += len(batch)


def _run_transport(client: str, origin: str, channels: int, counter: _Counter) -> Any:
    settings = TransportSettings(user_id="bench", origin=origin, ssl=False, client=client,
                                 channels_per_connection=CHANNELS_PER_CONNECTION)
    transport = PubNubTransport(settings, handler=counter.on_batch, metrics=Metrics())
    for i in range(channels):
        transport.add_channel(SUB_KEY, _channel(i))
    transport.start()
    wait_for(lambda: len(transport.reading()) == channels, 120, what="every channel read")
    return transport


def _run_sdk_asyncio(origin: str, channels: int, counter: _Counter) -> Any:
    """One `PubNubAsyncio` per connection on one loop thread; a plain listener counts messages."""
    from pubnub.callbacks import SubscribeCallback
    from pubnub.pnconfiguration import PNConfiguration
    from pubnub.pubnub_asyncio import PubNubAsyncio

    class Listener(SubscribeCallback):  # type: ignore[misc]
        def status(self, pubnub: Any, status: Any) -> None:
            pass

        def message(self, pubnub: Any, message: Any) -> None:
            counter.received += 1

        def presence(self, pubnub: Any, presence: Any) -> None:
            pass

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    resume = timetoken_at(time.time())

    async def start() -> list[Any]:
        clients = []
        names = [_channel(i) for i in range(channels)]
        for i in range(0, channels, CHANNELS_PER_CONNECTION):
            cfg = PNConfiguration()
            cfg.subscribe_key, cfg.user_id, cfg.ssl, cfg.origin = SUB_KEY, "bench", False, origin
            pubnub = PubNubAsyncio(cfg)
            pubnub.add_listener(Listener())
            pubnub.subscribe().channels(names[i:i + CHANNELS_PER_CONNECTION]).with_timetoken(resume).execute()
            clients.append(pubnub)
        return clients

    clients = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    time.sleep(5)  # no "reading" signal without a status listener; the handshakes are answered at once
    return loop, clients


def measure(client: str, channels: int, rate: float, seconds: float, payload_size: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child, channels, rate, payload_size), daemon=True)
    server.start()
    try:
        origin = parent.recv()
        counter = _Counter()
        running = _run_sdk_asyncio(origin, channels, counter) if client == "sdk-asyncio" \
            else _run_transport(client, origin, channels, counter)
        parent.send("publish")
        time.sleep(5)  # warm-up: every connection in its steady long-poll rhythm
        parent.send("stats")
        polls0, server_cpu0 = parent.recv()
        received0, cpu0, system0, wall0 = counter.received, _cpu_seconds(), _system_seconds(), time.monotonic()
        time.sleep(seconds)
        parent.send("stats")
        polls1, server_cpu1 = parent.recv()
        received, cpu, wall = counter.received - received0, _cpu_seconds() - cpu0, time.monotonic() - wall0
        system = _system_seconds() - system0
        polls = polls1 - polls0
        result = {
            "client": client, "channels": channels, "rate": rate, "seconds": round(wall, 1),
            "notifications_per_second": round(received / wall), "polls_per_second": round(polls / wall, 1),
            "messages_per_poll": round(received / max(polls, 1), 1),
            "cores": round(cpu / wall, 3), "system_share": round(system / max(cpu, 1e-9), 2),
            "cpu_us_per_poll": round(cpu / max(polls, 1) * 1e6),
            "cpu_us_per_notification": round(cpu / max(received, 1) * 1e6),
            "threads": _proc_status("Threads"), "rss_mib": round(_proc_status("VmRSS") / 1024),
            "sandbox_cores": round((server_cpu1 - server_cpu0) / wall, 3),
        }
        if client == "sdk-asyncio":
            loop, _ = running
            loop.call_soon_threadsafe(loop.stop)
        else:
            running.stop()
        return result
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", choices=("lean", "sdk", "sdk-asyncio"), default="lean")
    parser.add_argument("--channels", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--payload-size", type=int, default=1024)
    args = parser.parse_args()
    print(json.dumps(measure(args.client, args.channels, args.rate, args.seconds, args.payload_size)))


if __name__ == "__main__":
    main()
