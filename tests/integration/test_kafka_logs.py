"""librdkafka's log lines reach the JSON log, rate-limited and redacted, never as raw stderr lines.

The worker runs as its own process (`ingest run`) against a Kafka address that refuses connections,
with librdkafka reconnecting every few milliseconds: the stream of `Connect ... failed` lines that
printed hundreds of raw `%3|...|FAIL|...` lines on stderr in one outage.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import yaml

from ingest.observability.kafka_logs import LOG_INTERVAL_SECONDS
from tests.support import WorkerProcess, wait_for

JWT = "eyJhbGciOi.kafka-logs-jwt.sig"


def _config(tmp_path: Path) -> Path:
    (tmp_path / "jwt").write_text(JWT)
    (tmp_path / "secret").write_text("client-secret-of-the-app")
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump({
        # client.id = a secret: librdkafka names its clients "<client.id>#producer-N" in every line.
        "kafka": {"bootstrap.servers": "127.0.0.1:1", "reconnect.backoff.ms": 1, "reconnect.backoff.max.ms": 10,
                  "client.id": JWT},
        "ringcentral": {"server": "http://127.0.0.1:1", "client_id": "app", "client_secret_file": "secret"},
        "accounts": [{"name": "acme", "jwt_file": "jwt", "subscriptions": [
            {"name": "m", "event_filters": ["/restapi/v1.0/account/~/extension/~/message-store"]}]}],
        "metrics": {"host": "127.0.0.1", "port": 0},
    }))
    return path


def test_librdkafka_lines_are_json_events_rate_limited_and_redacted(tmp_path: Path) -> None:
    worker = WorkerProcess(_config(tmp_path), tmp_path / "worker.log").start()
    started = time.monotonic()
    try:
        # Kafka is down at start: only the AdminClient creating topics talks to it (nothing else polls
        # that client: its lines reach the log through serve_logs). Wait for a second interval to begin.
        wait_for(lambda: any(e.get("suppressed") for e in worker.lines()), 60,
                 what="a librdkafka line with a suppressed count")
    finally:
        assert worker.stop() == 0
    ran = time.monotonic() - started
    out = worker.log_path.read_text(errors="replace")
    raw = [line for line in out.splitlines() if not line.startswith("{")]
    assert raw == [], raw[:5]  # no `%3|...|FAIL|rdkafka#producer-1| ...`
    events = [json.loads(line) for line in out.splitlines()]
    client_lines = [e for e in events if e["event"] == "kafka.client_log"]
    assert client_lines and all({"client", "facility", "message"} <= e.keys() for e in client_lines)
    kinds = Counter((e["client"], e["facility"], "".join(c for c in e["message"] if not c.isdigit()))
                    for e in client_lines)
    most = math.ceil(ran / LOG_INTERVAL_SECONDS) + 1
    assert max(kinds.values()) <= most, kinds.most_common(3)
    suppressed = sum(int(e.get("suppressed", 0)) for e in client_lines)
    assert suppressed >= 10, suppressed  # librdkafka said it many more times than the log shows
    assert JWT not in out and any(e["client"].startswith("***#") for e in client_lines)
    print(f"\n[kafka-logs] {ran:.0f} s with Kafka refusing: {len(client_lines)} librdkafka lines logged, "
          f"{suppressed} suppressed, 0 raw lines")
