"""`transport: webhook` workers as `ingest run` builds them, for the tests that start one or more."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ingest.config import load_config
from ingest.sandbox.server import Sandbox
from ingest.sandbox.worker_config import Subscriptions, write_worker_config
from ingest.worker.runtime import Worker


def webhook_worker(directory: Path, sandbox: Sandbox, bootstrap: str, prefix: str, subscriptions: Subscriptions, *,
                   port: int, address_port: int | None = None, worker: Mapping[str, Any] | None = None,
                   webhook: Mapping[str, Any] | None = None, kafka: Mapping[str, Any] | None = None,
                   topics: Mapping[str, Any] | None = None) -> Worker:
    """A worker (not started) whose receiver listens on `port`; RingCentral (the sandbox) POSTs its
    subscriptions' notifications to `address_port` (default `port`: its own receiver). The mappings
    are merged into their config sections."""
    path = write_worker_config(directory, sandbox.describe(), bootstrap, prefix, subscriptions, partitions=2,
                               worker=worker)
    raw = yaml.safe_load(path.read_text())
    raw["transport"] = "webhook"
    raw["webhook"] = {"public_url": f"http://127.0.0.1:{address_port or port}", "host": "127.0.0.1", "port": port,
                      **(webhook or {})}
    raw["kafka"].update(kafka or {})
    raw["topics"].update(topics or {})
    path.write_text(yaml.safe_dump(raw))
    return Worker(load_config(path))
