"""Secrets never leak: a worker process runs a full scenario (renewals with key rotation, 401, a
refused refresh token and a JWT re-login, 429, 5xx, a PubNub 403, every kind of bad payload) with
known secret values, and none of them (client secret, JWT, access and refresh tokens, AES keys)
appears in its log lines (errors and exception texts included), its metrics and health answers, or
any Kafka record it wrote (headers of every record, dead letters and checkpoints included).

The worker runs as its own process on purpose: the test process knows every secret (the sandbox
registers them with the log redactor), which would mask a worker that forgot to register one.

Also here: Kafka SASL/SSL settings reach librdkafka untouched (and the password stays out of the
output), and the sandbox binds to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from ingest.sandbox.generator import MALFORMED
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.topology import TopicNames
from tests.integration.faults.scenario import (
    KINDS,
    FaultTolerantReader,
    Traffic,
    sandbox_settings,
    worker_config_file,
)
from tests.support import WorkerProcess, wait_for

pytestmark = pytest.mark.slow

TTL = 20
KAFKA_PASSWORD = "kafka-sasl-password-7f3a9c"


def _record_tokens(sandbox: Sandbox) -> list[str]:
    """Every access and refresh token the sandbox issues from now on (its store forgets used ones)."""
    issued: list[str] = []
    lock = threading.Lock()
    new_token: Callable[[], str] = sandbox.rc._new_token

    def recording() -> str:
        token = new_token()
        with lock:
            issued.append(token)
        return token

    setattr(sandbox.rc, "_new_token", recording)  # noqa: B010 - observe the sandbox, change nothing
    return issued


def _read_all(bootstrap: str, topics: list[str]) -> list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]]:
    """(topic, key, value, headers) of every record in `topics`, read to their current end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"secrets-{time.time_ns()}",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(timeout=30).topics
        parts = [TopicPartition(t, p, OFFSET_BEGINNING)
                 for t in topics if t in metadata for p in metadata[t].partitions]
        ends = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
        consumer.assign(parts)
        out: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []
        seen: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(seen.get(k, 0) < end for k, end in ends.items()):
            for msg in consumer.consume(500, 0.5):
                if msg.error():
                    continue
                topic, partition = msg.topic() or "", msg.partition() or 0
                seen[(topic, partition)] = (msg.offset() or 0) + 1
                headers = [(str(k), v if isinstance(v, bytes) else str(v or "").encode())
                           for k, v in list(msg.headers() or [])]
                key, value = msg.key(), msg.value()
                out.append((topic, key if isinstance(key, bytes) else b"", value if isinstance(value, bytes) else b"",
                            headers))
        return out
    finally:
        consumer.close()


def _leaks(secrets: dict[str, str], text: str) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


def test_no_secret_in_logs_metrics_errors_or_records(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with Sandbox(sandbox_settings(subscription_ttl_max=TTL)) as sandbox:
        tokens = _record_tokens(sandbox)
        config = worker_config_file(
            tmp_path, sandbox, kafka_bootstrap, unique_name,
            worker={"renewal_margin_seconds": 10, "renewal_jitter_seconds": 1, "expires_in_seconds": TTL})
        text = config.read_text().replace("level: INFO", "level: DEBUG")  # the most talkative worker
        assert "level: DEBUG" in text
        config.write_text(text)
        worker = WorkerProcess(config, tmp_path / "worker.log").start()
        reader: FaultTolerantReader | None = None
        try:
            worker.wait_ready(60, "the worker ready")
            reader = FaultTolerantReader(kafka_bootstrap, unique_name)  # the worker has created the topics
            traffic = Traffic(sandbox, reader)
            keys = {v.key for v in sandbox.rc.subscriptions(include_dead=True) if v.key}  # before rotation
            traffic.traffic()
            for reason in MALFORMED:  # every dead-letter path, with its error message header
                sandbox.generator.publish(3, kinds=KINDS, malformed=reason)
            # The first renewal cycle: access tokens dead (401), refresh tokens revoked (400 -> JWT
            # login), one 429, one 500, and new AES keys and channels for every subscription.
            sandbox.faults.revoke_refresh_tokens(None)
            sandbox.faults.expire_access_tokens(None)
            sandbox.faults.rc_error("renew", 429, count=1, retry_after=1)
            sandbox.faults.rc_error("renew", 500, count=1)
            sandbox.faults.rotate_on_next_renewal(None)
            wait_for(lambda: sum(v.renewals for v in sandbox.rc.subscriptions()) >= 2, TTL * 2,
                     what="the renewal cycle under fire")
            sandbox.faults.pubnub_error(403, count=1)
            wait_for(lambda: sandbox.book.fired.get("pubnub-error", 0) >= 1, 30, what="the PubNub 403")
            for reason in MALFORMED:  # again, under the rotated keys
                sandbox.generator.publish(3, kinds=KINDS, malformed=reason)
            traffic.wait_traffic(60)
            traffic.verify("secrets scenario")
            worker.wait_ready(30, "the worker ready again")
            answers = {path: worker.get(path) for path in ("/metrics", "/readyz", "/healthz")}
        finally:
            if reader is not None:
                reader.close()
            code = worker.stop()
        assert code == 0

        account = sandbox.accounts[0]
        keys |= {v.key for v in sandbox.rc.subscriptions(include_dead=True) if v.key}
        secrets = {"client secret": sandbox.client_secret, "jwt": account.jwt,
                   **{f"token {i}": t for i, t in enumerate(tokens)},
                   **{f"aes key {i}": k for i, k in enumerate(sorted(keys))},
                   **{f"aes key {i} (hex)": base64.b64decode(k).hex() for i, k in enumerate(sorted(keys))}}
        # The scenario really handled these: 2 grants + 1 refresh at least, and rotated keys.
        assert len(tokens) >= 4 and len(keys) >= 4, (len(tokens), len(keys))

        log = worker.log_path.read_text(errors="replace")
        events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        seen = {e["event"] for e in events}
        assert {"rc.unauthorized_retry", "rc.token.refresh_refused", "rc.rate_limited",
                "subscription.attempt_failed", "transport.connection_lost"} <= seen, sorted(seen)
        assert any("error" in e for e in events)  # exception texts were logged, and are scanned below
        assert _leaks(secrets, log) == []
        for path, body in answers.items():
            assert _leaks(secrets, body) == [], path
        assert "ingest_notifications_dead_lettered_total" in answers["/metrics"]

        names = TopicNames(unique_name)
        topics = [*names.all_output_topics(), names.state]
        records = _read_all(kafka_bootstrap, topics)
        dead = [r for r in records if r[0] == names.dead_letter]
        reasons = {dict(r[3]).get("error-class", b"").decode() for r in dead}
        assert reasons >= {"bad-base64", "bad-padding", "invalid-json", "schema-violation"}, reasons
        assert any(r[0] == names.state for r in records)
        for topic, key, value, headers in records:
            shown = key + b"\n" + b"\n".join(k.encode() + b"=" + v for k, v in headers)
            # Values: decrypted notifications, checkpoints, and dead letters' original (encrypted) payloads.
            shown += b"\n" + value
            assert _leaks(secrets, shown.decode("utf-8", "replace")) == [], (topic, dict(headers))
        print(f"\n[secrets] {len(secrets)} secret values checked against {len(log.splitlines())} log lines, "
              f"{len(answers['/metrics'].splitlines())} metric lines, {len(records)} records "
              f"({len(dead)} dead letters)")


@pytest.mark.parametrize(("protocol", "evidence"), [
    ("SASL_PLAINTEXT", "SASL PLAIN mechanism handshake failed"),
    ("SASL_SSL", "SSL handshake failed"),
])
def test_kafka_sasl_ssl_settings_reach_librdkafka_and_the_password_stays_hidden(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path, protocol: str, evidence: str) -> None:
    # The shared broker only speaks PLAINTEXT: librdkafka's own handshake failure proves that the
    # worker's clients were built with the security settings from the YAML file.
    with Sandbox(sandbox_settings()) as sandbox:
        config = worker_config_file(tmp_path, sandbox, kafka_bootstrap, unique_name, kafka={
            "security.protocol": protocol, "sasl.mechanism": "PLAIN", "sasl.username": "ingest-user",
            "sasl.password": KAFKA_PASSWORD, "debug": "conf,security"})
        worker = WorkerProcess(config, tmp_path / "worker.log").start()
        try:
            # librdkafka's lines come through the JSON log (ingest.observability.kafka_logs): its errors at most once
            # per 10 s per client, so the second dump comes with the next admin client (a retry).
            dump = f"security.protocol = {protocol.lower()}"
            wait_for(lambda: worker.log_path.read_text(errors="replace").count(evidence) >= 2
                     and worker.log_path.read_text(errors="replace").count(dump) >= 2, 60,
                     what=f"librdkafka's {protocol} handshake")
        finally:
            worker.kill()
        out = worker.log_path.read_text(errors="replace")
        # librdkafka's configuration dump of each client (producer, admin client).
        assert out.count(f"security.protocol = {protocol.lower()}") >= 2, out[-2000:]
        assert "sasl.mechanisms = PLAIN" in out
        assert KAFKA_PASSWORD not in out


def test_sandbox_listens_on_loopback_only() -> None:
    assert SandboxSettings().host == "127.0.0.1"
    with Sandbox(SandboxSettings()) as sandbox:
        addresses = [(str(server.server_address[0]), int(server.server_address[1])) for server in sandbox._servers]
        assert [host for host, _ in addresses] == ["127.0.0.1", "127.0.0.1"]
        assert sandbox.rc_url.startswith("http://127.0.0.1:") and sandbox.pubnub_origin.startswith("127.0.0.1:")
        # From any other address of this machine, the ports are closed.
        for ip in _non_loopback_addresses():
            for _, port in addresses:
                with socket.socket() as s, pytest.raises(OSError):
                    s.settimeout(2)
                    s.connect((ip, port))
    help_text = subprocess.run([sys.executable, "-m", "ingest", "sandbox", "--help"], capture_output=True,
                               text=True, check=True, timeout=60).stdout
    assert "(default: 127.0.0.1)" in help_text


def _non_loopback_addresses() -> list[str]:
    found: set[str] = set()
    with contextlib.suppress(OSError):
        found.update(str(i[4][0]) for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outbound interface
            found.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(ip for ip in found if not ip.startswith("127."))
