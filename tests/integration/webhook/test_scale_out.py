"""Any pod may receive any delivery: each pod's table of subscription -> (account, token) follows the
compacted state topic, where the spec's owner records the token (wrapped with the client secret)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from ingest.coordination.keywrap import KeyWrapper
from ingest.coordination.state import SpecState
from ingest.topology import TopicNames, ensure_topics, partition_for
from ingest.transports.webhook import StateTableFeed
from tests.integration.webhook.receiver import ACCOUNT_ID, SUBSCRIPTION, Receiver, notification, running_receiver
from tests.support.waiting import wait_for

CLIENT_SECRET = "cs-scale-out-client-secret"
PARTITIONS = 2


def _record(producer: Producer, topic: str, subscription_id: str, token: str | None, *,
            secret: str = CLIENT_SECRET) -> None:
    spec_id = SUBSCRIPTION.spec_id
    wrapped = None if token is None else KeyWrapper(secret).wrap(token, spec_id, subscription_id)
    state = SpecState(spec_id, ACCOUNT_ID, subscription_id, "", "https://ingest.example.com/hook", 0, time.time(),
                      "pod-0", wrapped_verification_token=wrapped)
    producer.produce(topic, state.encode(), spec_id.encode(), partition=partition_for(spec_id, PARTITIONS))
    producer.flush(30)


@pytest.fixture
def pods(kafka_bootstrap: str, unique_name: str) -> Iterator[tuple[list[Receiver], Producer, str]]:
    topic = TopicNames(unique_name).state
    ensure_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), [topic], partitions=PARTITIONS,
                  replication_factor=1, config={"cleanup.policy": "compact"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    # The owner recorded the subscription before the pods start: they load it at start.
    _record(producer, topic, SUBSCRIPTION.subscription_id, SUBSCRIPTION.verification_token)
    with ExitStack() as stack:
        receivers = []
        for _ in range(2):
            receiver = stack.enter_context(running_receiver(kafka_bootstrap, unique_name, subscriptions=()))
            feed = StateTableFeed({"bootstrap.servers": kafka_bootstrap}, topic, receiver.table,
                                  KeyWrapper(CLIENT_SECRET))
            feed.start()
            stack.callback(feed.stop)
            assert feed.ready()
            receivers.append(receiver)
        yield receivers, producer, topic


def test_every_pod_checks_deliveries_of_a_spec_it_does_not_own(
        pods: tuple[list[Receiver], Producer, str]) -> None:
    receivers, _, _ = pods
    for n, receiver in enumerate(receivers):
        assert receiver.post(notification(n)).status_code == 200
        assert receiver.post(notification(10 + n), token="vt-forged").status_code == 403


def test_a_recreated_subscription_replaces_the_old_token_on_every_pod_and_a_tombstone_removes_it(
        pods: tuple[list[Receiver], Producer, str]) -> None:
    receivers, producer, topic = pods
    new_id, new_token = "a2f5c9b0-2222-4f7e-9d55-000000000002", "vt-recreated-" + "n" * 30
    _record(producer, topic, new_id, new_token)
    for receiver in receivers:
        wait_for(lambda r=receiver: r.post(notification(20, new_id), token=new_token).status_code == 200, 30,
                 "the new subscription accepted")
        assert receiver.post(notification(21)).status_code == 403  # the old subscription is gone
    spec_id = SUBSCRIPTION.spec_id
    producer.produce(topic, None, spec_id.encode(), partition=partition_for(spec_id, PARTITIONS))  # tombstone
    producer.flush(30)
    for receiver in receivers:
        wait_for(lambda r=receiver: r.post(notification(22, new_id), token=new_token).status_code == 403, 30,
                 "the removed spec refused")


def test_a_token_wrapped_with_another_client_secret_is_not_accepted(
        pods: tuple[list[Receiver], Producer, str]) -> None:
    receivers, producer, topic = pods
    other_id, other_token = "a2f5c9b0-3333-4f7e-9d55-000000000003", "vt-other-deployment-" + "o" * 20
    _record(producer, topic, other_id, other_token, secret="cs-another-deployment")
    # Nothing to wait for: such a record must never be accepted; it is probed for 5 s.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert receivers[0].post(notification(30, other_id), token=other_token).status_code == 403
