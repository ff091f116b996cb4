"""The worker end to end: sandbox (real pubnub SDK, requests) -> worker -> real Kafka broker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ingest.config import load_config
from ingest.sandbox.generator import MALFORMED
from ingest.sandbox.server import Sandbox
from ingest.worker.runtime import Worker
from tests.support import all_serving, wait_for
from tests.support.harness import (
    ALL_FILTERS,
    EVERY_KIND_FAMILY,
    KIND_FAMILY,
    TopicReader,
    compare,
    documented_subscription_filters,
    drain_and_compare,
    write_config,
)
from tests.support.sandbox import STEADY
from tests.unit.test_catalogue import FAMILIES


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    # PubNub holds 100 messages per connection; these tests publish bursts bigger than that on purpose
    # (loss past the buffer is the sandbox's and the gap detector's subject, not this file's).
    return STEADY


def test_every_notification_lands_once_in_its_topic_or_dead_letter(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=2))
    worker = Worker(config)
    worker.start()
    reader = TopicReader(kafka_bootstrap, unique_name)
    try:
        wait_for(lambda: all_serving(worker, 2 * len(ALL_FILTERS)), 30, what="active subscriptions")
        generated = sandbox.generator.publish(20 * len(KIND_FAMILY), kinds=list(KIND_FAMILY))
        for reason in MALFORMED:
            generated += sandbox.generator.publish(2, kinds=["message-store", "presence"], malformed=reason)
        assert {g.kind for g in generated} >= set(KIND_FAMILY)
        records = reader.poll_until(lambda rs: len(rs) >= len(generated), timeout=60)
        result = compare(generated, records, reader.topics)
        missing_kinds = sorted({(g.kind, g.event) for g in result.missing})
        assert result.ok, (len(result.missing), missing_kinds, result.wrong[:3], result.dead_missing[:3])
        assert result.duplicates == {}
        assert len(records) == len(generated)  # nothing extra either
    finally:
        reader.close()
        worker.stop(delete_subscriptions=True)


def test_every_documented_event_reaches_its_family_topic(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    """One subscription to every filter RingCentral documents: each event in its own family's topic."""
    filters = documented_subscription_filters(sandbox.accounts[0])
    config = load_config(write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=1,
                                      subscriptions={"everything": filters}))
    worker = Worker(config)
    worker.start()
    reader = TopicReader(kafka_bootstrap, unique_name)
    try:
        wait_for(lambda: all_serving(worker, 1), 30, what="the subscription active")
        generated = sandbox.generator.publish(3 * len(filters))
        assert {g.kind for g in generated} == set(EVERY_KIND_FAMILY)
        records = reader.poll_until(lambda rs: len(rs) >= len(generated), timeout=60)
        result = compare(generated, records, reader.topics)
        assert result.ok, (len(result.missing), result.wrong[:3])
        assert {r.headers["family"] for r in records} == FAMILIES
        assert {r.topic for r in records} == {f"{unique_name}.{family}" for family in FAMILIES}
        assert len(records) == len(generated)
    finally:
        reader.close()
        worker.stop(delete_subscriptions=True)


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_restart_mid_stream_loses_nothing_and_reuses_subscriptions(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path, guarantee: str) -> None:
    config = load_config(write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=1,
                                      worker={"delivery_guarantee": guarantee}))
    first = Worker(config)
    first.start()
    wait_for(lambda: all_serving(first, len(ALL_FILTERS)), 30, what="active subscriptions")
    created_before = sum(sandbox.rc.created_count.values())
    sandbox.generator.start(200, kinds=["message-store", "presence", "telephony-sessions"])
    wait_for(lambda: sandbox.generator.count() > 300, 20, what="traffic")
    assert first.stop() == 0  # graceful: flushed everything it had
    # Published while no worker runs: PubNub buffers it, the next worker must replay it.
    wait_for(lambda: sandbox.generator.count() > 500, 20, what="traffic during the gap")
    second = Worker(config)
    second.start()
    reader = TopicReader(kafka_bootstrap, unique_name)
    try:
        wait_for(lambda: all_serving(second, len(ALL_FILTERS)), 30, what="subscriptions again")
        wait_for(lambda: sandbox.generator.count() > 900, 20, what="traffic after restart")
        generated, result = drain_and_compare(sandbox, reader, 60)
        assert result.ok, (len(result.missing), result.wrong[:3])
        assert sum(sandbox.rc.created_count.values()) == created_before  # renewed, never re-created
        duplicates = sum(n - 1 for n in result.duplicates.values())
        print(f"restart ({guarantee}): {len(generated)} notifications, {duplicates} duplicates")
        if guarantee == "exactly-once":
            assert duplicates == 0
    finally:
        reader.close()
        second.stop(delete_subscriptions=True)


def _ingest_run(tmp_path: Path, extra: str) -> subprocess.CompletedProcess[str]:
    """`ingest run` with a config whose Kafka and RingCentral are closed ports, plus `extra` YAML."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "kafka: {bootstrap.servers: 127.0.0.1:1}\n"
        "ringcentral: {server: http://127.0.0.1:1, client_id: app, client_secret_env: TEST_SECRET}\n"
        "accounts: [{name: acme, jwt_env: TEST_JWT,\n"
        "            subscriptions: [{name: m, event_filters: [/restapi/v1.0/account/~/extension/~/message-store]}]}]\n"
        + extra)
    env = {**os.environ, "TEST_SECRET": "s3cr3t-value", "TEST_JWT": "jwt-value-123"}
    return subprocess.run([sys.executable, "-m", "ingest", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False, env=env)


@pytest.mark.parametrize(("mistake", "key"), [
    ("worker:\n  renewal_margin_secnds: 10\n", "worker.renewal_margin_secnds"),  # wrong key
    ("worker:\n  renewal_margin_seconds: soon\n", "worker.renewal_margin_seconds"),  # wrong type
    ("topics:\n  partitions: [3]\n", "topics.partitions"),
    ("worker:\n  renewal_margin_seconds: .nan\n", "worker.renewal_margin_seconds"),  # was accepted: never renewed
    ("kafka: {bootstrap.servers: 127.0.0.1:1, linger.msx: 5}\n", "kafka.linger.msx"),  # was a KafkaException
])
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, mistake: str, key: str) -> None:
    proc = _ingest_run(tmp_path, mistake)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "s3cr3t-value" not in proc.stderr and "jwt-value-123" not in proc.stderr


@pytest.mark.parametrize(("metrics", "key", "reason"), [
    ("{host: 127.0.0.1, port: TAKEN}", "metrics.port", "Address already in use"),  # a second worker on the host
    ("{host: no-such-host.invalid, port: 0}", "metrics.host", "'no-such-host.invalid' does not resolve"),
])
def test_metrics_address_unusable_exits_2_naming_the_key(tmp_path: Path, metrics: str, key: str,
                                                         reason: str) -> None:
    with socket.socket() as taken:  # the first worker's port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _ingest_run(tmp_path, "metrics: " + metrics.replace("TAKEN", str(taken.getsockname()[1])) + "\n")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("ingest: ")]
    assert f"{key}: cannot listen on" in line and reason in line, line
