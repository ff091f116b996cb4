"""librdkafka's log lines as JSON events (`kafka.client_log`), rate-limited and redacted.

Left alone, librdkafka prints its own lines on stderr (`%3|...|FAIL|rdkafka#producer-1| ...`), 938
of them in one broker outage, beside the JSON log. Every client is created with
`{**config, **kafka_log_config()}` instead: confluent-kafka then queues the client's log lines and
hands them to our logger from the client's `poll()` / `flush()` / consumer `poll()`. Producers and
consumers are polled anyway; an AdminClient is not (its calls return futures), so its creation
site wraps it in `serve_logs(...)`, which polls it from one background thread while it lives.

Rate limit: per (client, facility, message with its numbers blanked), one line per
`LOG_INTERVAL_SECONDS`; the next line of that kind carries `suppressed`, the count dropped in
between. Lines at librdkafka's debug level exist only when the `debug` property asks for them:
they are always shown and never dropped. Other lines follow `logging.level`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ingest.observability.logs import redact

LOG_INTERVAL_SECONDS = 10.0
MAX_KINDS = 1_000  # kinds remembered for the rate limit; past this, kinds quiet for an interval are forgotten
POLL_INTERVAL_SECONDS = 0.5  # how often `serve_logs` polls the clients nobody else polls
_NUMBERS = re.compile(r"\d+")  # "after 0ms", broker ids, addresses: the same kind of line


class _RateLimitedJson(logging.Filter):
    """Turns confluent-kafka's log record ("%s [%s] %s" % (facility, client, text)) into a JSON
    event, or drops it when its kind was shown less than `interval` seconds ago."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._kinds: dict[tuple[str, str, str], tuple[float, int]] = {}  # kind -> (shown at, suppressed since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 3:
            return True  # not confluent-kafka's shape: leave it as it is
        facility, client, text = (str(a) for a in args)
        debug = record.levelno <= logging.DEBUG  # asked for with the `debug` property
        if not debug and record.levelno < logging.getLogger().getEffectiveLevel():
            return False
        suppressed = 0 if debug else self._admit((client, facility, _NUMBERS.sub("#", text)))
        if suppressed is None:
            return False
        if not logging.getLogger().handlers:  # a command that configured no JSON log (tail, status): plain text
            record.args = (facility, client, redact(text))
            return True
        record.msg, record.args = "kafka.client_log", ()
        record.fields = {"client": client, "facility": facility, "message": redact(text),
                         **({"suppressed": suppressed} if suppressed else {})}
        return True

    def _admit(self, kind: tuple[str, str, str]) -> int | None:
        """None: drop (shown recently); else show, with the number dropped since it was last shown."""
        now = self._clock()
        with self._lock:
            shown_at, suppressed = self._kinds.get(kind, (None, 0))
            if shown_at is not None and now - shown_at < self._interval:
                self._kinds[kind] = (shown_at, suppressed + 1)
                return None
            if len(self._kinds) >= MAX_KINDS:
                self._kinds = {k: v for k, v in self._kinds.items() if now - v[0] < self._interval}
            self._kinds[kind] = (now, 0)
            return suppressed


_LOGGER = logging.getLogger("ingest.kafka.librdkafka")
_LOGGER.setLevel(logging.DEBUG)  # the filter decides: librdkafka's debug lines pass at any logging.level
_LOGGER.addFilter(_RateLimitedJson(LOG_INTERVAL_SECONDS))


def kafka_log_config() -> dict[str, Any]:
    """What every Kafka client's config gets on top: its log lines go to the JSON log."""
    return {"logger": _LOGGER}


class _Pollable(Protocol):
    def poll(self, timeout: float = ...) -> Any: ...


_C = TypeVar("_C", bound=_Pollable)
_unpolled: weakref.WeakSet[Any] = weakref.WeakSet()
_pump_lock = threading.Lock()
_pump: threading.Thread | None = None


def serve_logs(client: _C) -> _C:
    """Poll `client` (an AdminClient: nothing else polls it) every `POLL_INTERVAL_SECONDS` while it
    lives, so that its queued log lines reach the log. Returns the client."""
    global _pump
    with _pump_lock:
        _unpolled.add(client)
        if _pump is None:
            _pump = threading.Thread(target=_poll_forever, name="kafka-log-pump", daemon=True)
            _pump.start()
    return client


def _poll_forever() -> None:
    while True:
        _poll_each()
        time.sleep(POLL_INTERVAL_SECONDS)


def _poll_each() -> None:
    """One round over the clients. No reference to one outlives it: the loop variable, kept over the
    sleep, held the last client polled, so it never left the set and was never destroyed (an
    AdminClient of every worker start stayed alive, reconnecting to Kafka, for as long as the process)."""
    for client in list(_unpolled):  # weak references: a client dropped by its owner leaves the set
        with contextlib.suppress(Exception):  # a client being torn down; its lines are lost, nothing else
            client.poll(0)
