"""Waiting on events with a deadline (never a bare sleep), and free local ports."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ingest.sandbox.kafka import free_port

__all__ = ["free_port", "free_ports", "holds", "wait_for"]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail (AssertionError naming
    `what`) after `timeout` seconds. It is asked once more at the deadline, so a slow poll still counts."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def holds(predicate: Callable[[], Any], seconds: float, interval: float = 0.05) -> bool:
    """True if `predicate` stays truthy for `seconds` (to assert that something does NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return bool(predicate())


def free_ports(count: int) -> int:
    """A port p such that p .. p+count-1 are all free now (`ingest run --processes N` listens on
    metrics.port and the N ports after it)."""
    while True:
        base = free_port()
        if base + count - 1 <= 65535 and all(_free(port) for port in range(base + 1, base + count)):
            return base


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
