"""`transport: webhook` end to end: sandbox -> HTTP -> the worker -> Kafka. The worker creates WebHook
subscriptions (the sandbox validates its address), receives the POSTs, and answers 200 only once the
record is in Kafka with its checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ingest.coordination.keywrap import KeyWrapper
from ingest.coordination.state import restore
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.topology import TopicNames
from ingest.worker.runtime import Worker
from tests.integration.webhook.workers import webhook_worker
from tests.support.harness import TopicReader
from tests.support.waiting import free_port, wait_for

FILTERS = ["/restapi/v1.0/account/~/extension/~/message-store", "/restapi/v1.0/account/~/extension/~/presence"]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.2)) as sb:
        sb.rc.webhooks.settings.retry_interval = 0.2
        yield sb


@pytest.fixture
def worker(sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> Iterator[Worker]:
    w = webhook_worker(tmp_path, sandbox, kafka_bootstrap, unique_name,
                       {a.name: [("events", FILTERS)] for a in sandbox.accounts[:2]}, port=free_port(),
                       worker={"checkpoint_interval_seconds": 0.2})
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


def test_renewal_reminders_delivered_by_webhook_are_stored_like_any_event(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    """RingCentral's reminder filter (`/restapi/v1.0/subscription/~?threshold=S&interval=S`, body
    `{"expiresIn": N}`) is an event filter like the others: a spec that asks for it gets its reminders
    in the `subscription-reminder` topic. Renewal does not wait for them (the control plane renews on
    its own schedule, `worker.renewal_margin_seconds` before the expiry)."""
    reminder = "/restapi/v1.0/subscription/~?threshold=120&interval=60"
    account = sandbox.accounts[0]
    w = webhook_worker(tmp_path, sandbox, kafka_bootstrap, unique_name, {account.name: [("reminders", [reminder])]},
                       port=free_port(), worker={"checkpoint_interval_seconds": 0.2})
    w.start()
    try:
        wait_for(lambda: w.subscriptions_serving() == 1, 90, "the WebHook subscription served")
        generated = sandbox.generator.publish(3, kinds=["subscription-reminder"])
        assert len(generated) == 3
        wait_for(sandbox.rc.webhooks.idle, 60, "every reminder answered")
        assert all(a.delivered for a in sandbox.rc.webhooks.attempted)
        reader = TopicReader(kafka_bootstrap, unique_name)
        try:
            records = reader.poll_until(lambda rs: len(rs) >= 3, 60)
        finally:
            reader.close()
    finally:
        w.stop(delete_subscriptions=True)
    assert {r.topic for r in records} == {TopicNames(unique_name).for_family("subscription-reminder")}
    assert sorted(r.value for r in records) == sorted(g.plaintext for g in generated)
