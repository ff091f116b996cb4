"""`transport: webhook` end to end: sandbox -> HTTP -> the worker -> Kafka. The worker creates WebHook
subscriptions (the sandbox validates its address), receives the POSTs, and answers 200 only once the
record is in Kafka with its checkpoint."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from ingest.config import load_config
from ingest.coordination.keywrap import KeyWrapper
from ingest.coordination.state import restore
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.sandbox.worker_config import write_worker_config
from ingest.topology import TopicNames
from ingest.worker.runtime import Worker
from tests.support.harness import TopicReader
from tests.support.waiting import wait_for

FILTERS = ["/restapi/v1.0/account/~/extension/~/message-store", "/restapi/v1.0/account/~/extension/~/presence"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.2)) as sb:
        sb.rc.webhooks.settings.retry_interval = 0.2
        yield sb


@pytest.fixture
def worker(sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> Iterator[Worker]:
    path = write_worker_config(tmp_path, sandbox.describe(), kafka_bootstrap, unique_name,
                               {a.name: [("events", FILTERS)] for a in sandbox.accounts[:2]}, partitions=2,
                               worker={"checkpoint_interval_seconds": 0.2})
    raw = yaml.safe_load(path.read_text())
    port = _free_port()
    raw["transport"] = "webhook"
    raw["webhook"] = {"public_url": f"http://127.0.0.1:{port}", "host": "127.0.0.1", "port": port}
    path.write_text(yaml.safe_dump(raw))
    w = Worker(load_config(path))
    w.start()
    try:
        wait_for(lambda: w.subscriptions_serving() == 2, 90, "both WebHook subscriptions served")
        yield w
    finally:
        w.stop(delete_subscriptions=True)


def test_the_worker_stores_every_posted_notification_before_answering_200(
        sandbox: Sandbox, worker: Worker, kafka_bootstrap: str, unique_name: str) -> None:
    assert all(s.webhook_token for s in sandbox.rc.live_subscriptions())
    generated = sandbox.generator.publish(40)
    wait_for(sandbox.rc.webhooks.idle, 90, "every delivery answered")
    attempts = sandbox.rc.webhooks.attempted
    assert len(attempts) == 40 and all(a.delivered for a in attempts), [a.codes for a in attempts]
    reader = TopicReader(kafka_bootstrap, unique_name)
    try:
        records = reader.poll_until(lambda rs: len(rs) >= 40, 90)
    finally:
        reader.close()
    assert {g.plaintext for g in generated} <= {r.value for r in records}
    forged = sandbox.rc.webhooks
    forged.wrong_token(1)
    sandbox.generator.publish(1)
    wait_for(forged.idle, 60, "the forged delivery answered")
    assert forged.attempted[-1].codes == [403, 403, 403]


def test_the_state_records_carry_each_subscription_token_wrapped_for_the_other_pods(
        sandbox: Sandbox, worker: Worker, kafka_bootstrap: str, unique_name: str) -> None:
    tokens = {s.id: s.webhook_token for s in sandbox.rc.live_subscriptions()}
    keys = KeyWrapper(sandbox.client_secret)

    def recorded() -> dict[str, str]:
        states = restore({"bootstrap.servers": kafka_bootstrap}, TopicNames(unique_name).state)
        return {s.subscription_id: keys.unwrap(s.wrapped_verification_token, s.spec_id, s.subscription_id)
                for s in states.values() if s.wrapped_verification_token}

    wait_for(lambda: recorded() == tokens, 60, "every token recorded")


def test_readiness_covers_the_receiver(worker: Worker) -> None:
    url = f"http://127.0.0.1:{worker.health.port}/readyz"
    wait_for(lambda: requests.get(url, timeout=10).status_code == 200, 60, "ready")
    assert worker.intake.webhook is not None
    worker.intake.webhook.server.stop()
    answer = requests.get(url, timeout=10)
    assert (answer.status_code, "webhook receiver not listening" in answer.text) == (503, True)


def test_a_notification_posted_again_is_answered_200_and_not_stored_twice(
        sandbox: Sandbox, worker: Worker, kafka_bootstrap: str, unique_name: str) -> None:
    [first] = sandbox.generator.publish(1)
    wait_for(sandbox.rc.webhooks.idle, 60, "the delivery answered")
    [attempt] = sandbox.rc.webhooks.attempted
    assert attempt.delivered
    view = next(s for s in sandbox.rc.live_subscriptions() if s.id == first.subscription_id)
    assert worker.intake.webhook is not None
    again = requests.post(view.channel, data=attempt.body, timeout=10, headers={
        "Content-Type": "application/json", "Verification-Token": view.webhook_token or ""})
    assert again.status_code == 200
    assert worker.metrics.registry.get_sample_value("ingest_notifications_duplicate_total") == 1
    reader = TopicReader(kafka_bootstrap, unique_name)
    try:
        records = reader.poll_until(lambda rs: len(rs) >= 2, 10)  # waits the full 10 s: a second must not come
    finally:
        reader.close()
    assert [r.value for r in records] == [first.plaintext]
