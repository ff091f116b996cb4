"""Sandbox -> HTTP -> receiver -> real Kafka: WebHook subscriptions created (handshake), renewed, blacklisted
and created again, and every notification RingCentral (the sandbox) POSTs read back from Kafka."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from ingest.model import Delivery, SubscriptionSpec
from ingest.observability.metrics import Metrics
from ingest.rc.subscriptions import SubscriptionManager
from ingest.sandbox.server import Sandbox, SandboxSettings
from tests.integration.test_rc_subscriptions import sessions_for
from tests.integration.webhook.receiver import Receiver, running_receiver
from tests.support.harness import TopicReader
from tests.support.waiting import wait_for

MESSAGES = "/restapi/v1.0/account/~/extension/~/message-store"
SPEC = SubscriptionSpec(spec_id="acme/messages", account="acme", event_filters=(MESSAGES,))


@dataclass
class Wired:
    sandbox: Sandbox
    receiver: Receiver
    manager: SubscriptionManager
    deliveries: list[tuple[str, Delivery | None]]

    def subscription_id(self) -> str | None:
        return next((s.subscription_id for s in self.manager.snapshot() if s.state == "active"), None)


@contextmanager
def wired(bootstrap: str, prefix: str, *, max_queued: int = 10_000) -> Iterator[Wired]:
    """What the worker wires in WebHook mode: the manager's deliveries fill the receiver's table."""
    # Subscriptions live 6 s: renewed every ~3 s, so a blacklisting is found within seconds.
    with Sandbox(SandboxSettings(subscription_ttl_max=6, pubnub_hold_seconds=0.2)) as sb, \
            running_receiver(bootstrap, prefix, max_queued=max_queued) as receiver:
        sb.rc.webhooks.settings.retry_interval = 0.2
        sb.rc.webhooks.ttl_max = 6
        seen: list[tuple[str, Delivery | None]] = []

        def on_delivery(spec_id: str, delivery: Delivery | None) -> None:
            seen.append((spec_id, delivery))
            receiver.table.apply(spec_id, delivery)

        metrics = Metrics()
        sessions = sessions_for(sb, metrics)
        manager = SubscriptionManager(accounts={"acme": sessions[sb.accounts[0].name]}, metrics=metrics,
                                      on_delivery=on_delivery, renewal_margin=3.0, renewal_jitter=0.3,
                                      webhook_address=receiver.url)
        manager.start()
        try:
            manager.set_specs([SubscriptionSpec(SPEC.spec_id, "acme", SPEC.event_filters)])
            w = Wired(sb, receiver, manager, seen)
            wait_for(lambda: w.subscription_id() is not None, 60, "the WebHook subscription active")
            yield w
        finally:
            manager.stop(delete_subscriptions=True)


@pytest.fixture
def reader(kafka_bootstrap: str, unique_name: str) -> Iterator[TopicReader]:
    r = TopicReader(kafka_bootstrap, unique_name)
    yield r
    r.close()


def test_notifications_posted_by_the_sandbox_land_in_kafka_byte_for_byte(
        kafka_bootstrap: str, unique_name: str, reader: TopicReader) -> None:
    with wired(kafka_bootstrap, unique_name) as w:
        view = next(s for s in w.sandbox.rc.subscriptions() if s.id == w.subscription_id())
        assert view.channel == w.receiver.url and view.webhook_token  # created as WebHook, handshake passed
        generated = w.sandbox.generator.publish(30)
        wait_for(w.sandbox.rc.webhooks.idle, 60, "every delivery answered")
        attempts = w.sandbox.rc.webhooks.attempted
        assert len(attempts) == 30 and all(a.delivered for a in attempts)
        # A 503 (a first record waiting on the new producer's id under load) was retried: only 200 and 503.
        assert {code for a in attempts for code in a.codes} <= {200, 503}
        records = reader.poll_until(lambda rs: len(rs) >= 30, 90)
        by_value = {r.value for r in records}
        assert all(g.plaintext in by_value for g in generated)
        assert len(records) == 30


def test_a_forged_token_is_refused_and_nothing_reaches_kafka(kafka_bootstrap: str, unique_name: str) -> None:
    with wired(kafka_bootstrap, unique_name) as w:
        w.sandbox.rc.webhooks.wrong_token(2)
        w.sandbox.generator.publish(2)
        wait_for(w.sandbox.rc.webhooks.idle, 60, "every delivery answered")
        assert {tuple(a.codes) for a in w.sandbox.rc.webhooks.attempted} == {(403, 403, 403)}
        assert w.receiver.sink.acknowledged == 0


def test_a_blacklisted_subscription_is_deleted_created_again_and_the_gap_reported(
        kafka_bootstrap: str, unique_name: str) -> None:
    with wired(kafka_bootstrap, unique_name) as w:
        first = w.subscription_id()
        assert first is not None
        w.sandbox.rc.blacklist(first, "test: the endpoint kept failing")
        wait_for(lambda: w.subscription_id() not in (None, first), 60, "a new subscription")
        [replacement] = [d for _, d in w.deliveries if d is not None and d.subscription_id == w.subscription_id()]
        assert replacement.lapse_reason == "blacklisted"
        assert replacement.channel == replacement.subscription_id  # what the data plane routes by
        assert replacement.lapsed_since is not None
        old = next(s for s in w.sandbox.rc.subscriptions() if s.id == first)
        assert old.deleted
        w.sandbox.generator.publish(3)
        wait_for(w.sandbox.rc.webhooks.idle, 60, "every delivery answered")
        assert [a.delivered for a in w.sandbox.rc.webhooks.attempted] == [True] * 3


def test_a_receiver_answering_503_gets_blacklisted_and_its_subscription_recreated(
        kafka_bootstrap: str, unique_name: str) -> None:
    # No room in the local queue: every delivery is answered 503, as when Kafka is down for long.
    with wired(kafka_bootstrap, unique_name, max_queued=0) as w:
        first = w.subscription_id()
        w.sandbox.generator.publish(3)
        wait_for(lambda: w.subscription_id() not in (None, first), 60, "blacklisted and created again")
        assert {tuple(a.codes) for a in w.sandbox.rc.webhooks.attempted} == {(503, 503, 503)}
        assert w.receiver.sink.acknowledged == 0
