"""A librdkafka client left with no broker: detected from its statistics, so that it is not waited on for good.

librdkafka 2.16 (confluentinc/librdkafka#5301): a KRaft broker in controlled shutdown answers Metadata
with 0 brokers; the client decommissions every broker it knows, bootstrap ones included, and when the
last one was caught mid-reconnect it never bootstraps again. From then on it logs `Skipping metadata
refresh ... no usable brokers` every 0.5 s and makes no connection attempt, whatever Kafka does. Its
statistics show it: the `brokers` map holds only the internal broker and the logical coordinators
(`source` "internal" / "logical"), no broker from `bootstrap.servers` ("configured") or from
metadata ("learned"). A client in an ordinary outage keeps its brokers (state DOWN/CONNECT), and one
that re-bootstraps has its bootstrap broker back within a sample or two, so a client without one for
`NO_BROKER_GRACE_SECONDS` is stuck: the owner gives it up (docs/faults.md).

Cost: librdkafka builds the statistics every `STATS_INTERVAL_MS` on its own thread and hands the JSON
to `stats_cb` from the client's poll. A substring test decides almost every sample; the JSON is parsed
only when no broker address is in it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from ingest.observability.logs import get_logger

log = get_logger(__name__)

STATS_INTERVAL_MS = 5_000
NO_BROKER_GRACE_SECONDS = 30.0
_REAL_SOURCES = ("learned", "configured")  # brokers with an address; "internal" and "logical" have none
_REAL_SOURCE_MARKS = tuple(f'"source":"{source}"' for source in _REAL_SOURCES)


class ClientWithoutBrokers(Exception):
    """A client that knows no broker for good: its owner gives it up."""


def brokerless(stats_json: str) -> dict[str, Any] | None:
    """The parsed statistics sample if its client knows no broker it could connect to, else None."""
    if any(mark in stats_json for mark in _REAL_SOURCE_MARKS):
        return None  # librdkafka writes the JSON without spaces: no parse for the usual sample
    stats: dict[str, Any] = json.loads(stats_json)
    brokers = stats.get("brokers", {}).values()
    return None if any(broker.get("source") in _REAL_SOURCES for broker in brokers) else stats


class BrokerWatch:
    """The `stats_cb` of one client: calls `on_stuck(reason)` once the client has known no broker for
    `grace` seconds (then once more per further `grace`, in case the owner did not give it up).
    Called from the client's poll, on the polling thread: `on_stuck` must only record. Time is the
    sample's own (`ts`, librdkafka's monotonic clock): samples of a client polled late (the test's
    reader after an outage) arrive together but still span the time the client was stuck."""

    def __init__(self, role: str, on_stuck: Callable[[str], None], grace: float = NO_BROKER_GRACE_SECONDS) -> None:
        self._role = role
        self._on_stuck = on_stuck
        self._grace = grace
        self._without_since: float | None = None
        self._lock = threading.Lock()  # a producer is polled by more than one thread (intake waits in poll)

    def __call__(self, stats_json: str) -> None:
        stats = brokerless(stats_json)
        with self._lock:
            if stats is None:
                self._without_since = None
                return
            now = stats["ts"] / 1e6
            if self._without_since is None:
                self._without_since = now
            without_for = now - self._without_since
            if without_for < self._grace:
                return
            self._without_since = now  # report again after another grace, not at every sample
        client = stats.get("name", "unknown")
        log.error("kafka.client_without_brokers", client=client, role=self._role, seconds=round(without_for, 1))
        self._on_stuck(f"kafka {self._role} {client} has known no broker for {without_for:.0f}s "
                       "(librdkafka#5301: it never reconnects)")


def watch_config(watch: BrokerWatch) -> dict[str, Any]:
    """What a client's config gets on top so that `watch` sees its statistics."""
    return {"statistics.interval.ms": STATS_INTERVAL_MS, "stats_cb": watch}
