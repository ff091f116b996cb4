"""Structured logs: one JSON object per line on stderr, with secrets scrubbed.

Components log events (`log.info("subscription.renewed", subscription_id=..., expires_in=...)`),
not prose. Every value passes through the redactor, which knows the secrets the process holds
(client secret, JWTs, tokens, AES keys) and replaces them wherever they appear.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

# Copy-on-write: `redact` runs on every thread that logs and reads whichever tuple is current, while
# a registration (token refresh, key rotation) on another thread swaps in a new one. Iterating a
# shared set instead raised "Set changed size during iteration" and lost the log line.
_secrets: tuple[str, ...] = ()
_registered: set[str] = set()  # the same secrets, for the membership test (under the lock)
_secrets_lock = threading.Lock()
MIN_SECRET_LEN = 6  # shorter strings would scrub ordinary words


def register_secret(value: str | None) -> None:
    """Remember a secret so that it is scrubbed from every log line and error text (thread-safe)."""
    global _secrets
    if value and len(value) >= MIN_SECRET_LEN:
        with _secrets_lock:
            if value not in _registered:
                _registered.add(value)
                _secrets = (*_secrets, value)


def redact(text: str) -> str:
    for secret in _secrets:  # one snapshot: registrations meanwhile replace the tuple, not mutate it
        if secret in text:
            text = text.replace(secret, "***")
    return text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error_class"] = type(exc).__name__
            entry["error"] = str(exc)
        return redact(json.dumps(entry, default=str, separators=(",", ":")))


class EventLogger:
    """A thin wrapper so call sites read `log.info("event.name", key=value)`."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def _emit(self, level: int, event: str, exc: bool, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, event, exc_info=exc, extra={"fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, False, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, event, exc_info, fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def configure(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The PubNub SDK logs request URLs at DEBUG; keep third parties at WARNING.
    for noisy in ("pubnub", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime
