"""Shared pieces of the benchmark scenarios: the sandbox in its own process, worker configs, the
machine description, percentiles and child processes.

Every measured party runs in a process of its own (spawned, not forked): the sandbox, the worker,
each baseline. They then do not share one GIL, and each one's CPU time and peak RSS are its own.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ingest.data.crypto import Cipher
from ingest.sandbox.server import Sandbox, SandboxSettings

SPAWN = multiprocessing.get_context("spawn")


# ---- the sandbox in a child process ----------------------------------------------------------


@dataclass
class Prepared:
    """One notification built in the sandbox but not yet published (what the baselines replay)."""

    channel: str
    subscription_id: str
    account_id: str
    key_b64: str
    payload: str  # Base64 ciphertext, exactly as PubNub delivers it
    plaintext: bytes  # the JSON RingCentral serialised


_QUERIES: dict[str, Callable[[Sandbox], Any]] = {
    "live": lambda sb: len(sb.rc.live_subscriptions()),
    "subscriptions": lambda sb: [(s.id, s.status, s.expires_at, s.renewals, s.created_at)
                                 for s in sb.rc.subscriptions(include_dead=True)],
    "created_total": lambda sb: sb.rc.created_total,
    # uuids of the good notifications published so far (what must reach Kafka)
    "generated": lambda sb: [g.uuid for g in sb.generator.generated if g.malformed is None and g.uuid],
}


def _sandbox_main(settings: SandboxSettings, conn: Connection) -> None:
    """Child process: serve the sandbox and answer commands from the parent until "stop"."""
    with Sandbox(settings) as sb:
        ciphers: dict[str, Cipher] = {}
        ready: list[tuple[str, str, str]] = []  # (sub key, channel, data json) waiting for "release"
        pool: list[tuple[str, str, str]] = []  # what "steady" replays round-robin
        conn.send(sb.describe())
        while True:
            command, args = conn.recv()
            if command == "stop":
                conn.send(None)
                return
            if command in _QUERIES:
                conn.send(_QUERIES[command](sb))
            elif command == "prepare":
                out, ready = _prepare(sb, ciphers, *args)
                conn.send(out)
            elif command == "release":
                # The prepared notifications go into PubNub's buffer in one tight loop (~10 us each).
                publish = sb.pubnub.publish_serialized
                for sub_key, channel, data in ready:
                    publish(sub_key, channel, data)
                conn.send(len(ready))
                ready = []
            elif command == "steady-prepare":  # `args[0]` encrypted notifications per target for "steady"
                prepared, pool = _prepare(sb, ciphers, args[0] * len(sb.generator.targets()), None)
                conn.send(prepared)
            elif command == "steady":  # replay the pool at `args[0]` per second (0: stop); answers the count
                if args[0] > 0:
                    sb.generator.start_prepared(args[0], pool)
                else:
                    sb.generator.stop()
                conn.send(sb.generator.replayed)
            elif command == "stats":
                conn.send({"polls": sb.pubnub.polls, "messages_served": sb.pubnub.messages_served,
                           "replayed": sb.generator.replayed})
            elif command == "per_response":  # messages per subscribe response from now on
                sb.pubnub.max_per_response = args[0]
                conn.send(None)
            elif command == "rate":
                rate, kinds = args
                if rate > 0:
                    sb.generator.start(rate, kinds)
                else:
                    sb.generator.stop()
                conn.send(sb.generator.count())
            else:
                conn.send(ValueError(f"unknown command {command!r}"))


def _prepare(sb: Sandbox, ciphers: dict[str, Cipher], n: int, kinds: list[str] | None
             ) -> tuple[list[Prepared], list[tuple[str, str, str]]]:
    """`n` notifications round-robin over the live (subscription, filter) pairs, encrypted, not published."""
    targets = sb.generator.targets(kinds)
    out: list[Prepared] = []
    ready: list[tuple[str, str, str]] = []
    for i in range(n):
        sub, flt = targets[i % len(targets)]
        assert sub.key is not None, "the benchmark subscriptions are encrypted"
        cipher = ciphers.get(sub.key) or ciphers.setdefault(sub.key, Cipher(sub.key))
        plaintext = json.dumps(sb.generator.notification(sub, flt), separators=(",", ":"),
                               ensure_ascii=False).encode()
        payload = cipher.encrypt(plaintext)
        ready.append((sub.subscriber_key, sub.channel, json.dumps(payload)))
        out.append(Prepared(sub.channel, sub.id, sub.account_id, sub.key, payload, plaintext))
    return out, ready


class SandboxProcess:
    """The sandbox served by a child process; `describe` holds its URLs and credentials."""

    def __init__(self, settings: SandboxSettings) -> None:
        self._conn, child = SPAWN.Pipe()
        self._proc = SPAWN.Process(target=_sandbox_main, args=(settings, child), daemon=True, name="bench-sandbox")
        self._proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("the sandbox process did not start")
        self.describe: dict[str, Any] = self._conn.recv()
        self._lock = threading.Lock()

    def call(self, command: str, *args: Any, timeout: float = 600) -> Any:
        with self._lock:
            self._conn.send((command, args))
            if not self._conn.poll(timeout):
                raise TimeoutError(f"sandbox command {command} took over {timeout}s")
            answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def pid(self) -> int:
        return self._proc.pid or 0

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            self.call("stop", timeout=20)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- measuring ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_in_child(target: Callable[..., Any], *args: Any, timeout: float = 900) -> Any:
    """Run `target(*args)` in a spawned process and return its result (an exception is re-raised)."""
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_child_main, args=(target, args, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{getattr(target, '__name__', target)} did not finish within {timeout}s")
        ok, value = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if not ok:
        raise RuntimeError(f"{getattr(target, '__name__', target)} failed in its process:\n{value}")
    return value


def _child_main(target: Callable[..., Any], args: tuple[Any, ...], conn: Connection) -> None:
    import traceback

    try:
        conn.send((True, target(*args)))
    except BaseException:
        conn.send((False, traceback.format_exc()))


# ---- the machine -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "ram_bytes": mem, "kernel": platform.release(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def versions(kafka_version: str | None) -> dict[str, Any]:
    from importlib.metadata import version

    import confluent_kafka

    return {"python": platform.python_version(), "librdkafka": confluent_kafka.libversion()[0],
            "confluent_kafka": version("confluent-kafka"), "kafka_broker": kafka_version,
            "pubnub": version("pubnub"), "cryptography": version("cryptography"), "orjson": version("orjson"),
            "jsonschema_rs": version("jsonschema-rs"), "jsonschema": version("jsonschema"),
            "httpx": version("httpx")}
