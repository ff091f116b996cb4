"""A WebHook receiver wired to a real Kafka broker, as the worker wires it: pipeline, sink, handler, server."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import requests
from confluent_kafka.admin import AdminClient

from ingest.data.catalogue import default_catalogue
from ingest.data.pipeline import Pipeline
from ingest.data.sink import KafkaSink
from ingest.observability.metrics import Metrics
from ingest.topology import TopicNames, ensure_topics
from ingest.transports.webhook import (
    SubscriptionTable,
    WebhookApp,
    WebhookServer,
    WebhookSubscription,
)
from tests.support.webhook_kafka import KafkaHandler

PATH = "/ringcentral/webhook"
ACCOUNT_ID = "809646016"
SUBSCRIPTION = WebhookSubscription(subscription_id="a2f5c9b0-1111-4f7e-9d55-000000000001",
                                   spec_id="acme/presence", account_id=ACCOUNT_ID,
                                   verification_token="vt-" + "k" * 29)


def notification(n: int, subscription_id: str = SUBSCRIPTION.subscription_id) -> bytes:
    """A presence notification as RingCentral sends it by WebHook (plain JSON, spaces and all)."""
    return orjson.dumps({
        "uuid": str(uuid.UUID(int=n)), "event": f"/restapi/v1.0/account/{ACCOUNT_ID}/extension/62264425004/presence",
        "timestamp": "2026-12-01T22:00:00.000Z", "subscriptionId": subscription_id, "ownerId": "62264425004",
        "body": {"extensionId": 62264425004, "telephonyStatus": "Ringing", "sequence": n},
    }).replace(b",", b", ")


@dataclass
class Receiver:
    """The parts a test pokes at: the URL, the table, the sink (what reached Kafka), the topics."""

    url: str
    table: SubscriptionTable
    sink: KafkaSink
    topics: TopicNames
    metrics: Metrics

    def post(self, body: bytes, *, token: str | None = SUBSCRIPTION.verification_token,
             header: str = "Verification-Token", content_type: str = "application/json",
             timeout: float = 10.0) -> requests.Response:
        headers = {"Content-Type": content_type, "User-Agent": "RingCentral-Webhook/8.3"}
        if token is not None:
            headers[header] = token
        return requests.post(self.url, data=body, headers=headers, timeout=timeout)


@contextlib.contextmanager
def running_receiver(bootstrap: str, prefix: str, *, answer_timeout: float = 2.0, max_queued: int = 10_000,
                     producer: dict[str, str] | None = None, create_topics: bool = True,
                     subscriptions: tuple[WebhookSubscription, ...] = (SUBSCRIPTION,)) -> Iterator[Receiver]:
    topics = TopicNames(prefix)
    if create_topics:
        ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), topics.all_output_topics(), partitions=2,
                      replication_factor=1)
    metrics = Metrics()
    sink = KafkaSink({"bootstrap.servers": bootstrap, **(producer or {})}, metrics)
    sink.start()
    table = SubscriptionTable()
    for subscription in subscriptions:
        table.put(subscription)
    handler = KafkaHandler(Pipeline(default_catalogue(), topics), sink, metrics, max_queued=max_queued,
                           stall_after=answer_timeout)
    app = WebhookApp(path=PATH, table=table, handler=handler, metrics=metrics, max_body_bytes=64 * 1024,
                     answer_timeout=answer_timeout, retry_after=3)
    server = WebhookServer(app, "127.0.0.1", 0, threads=8)
    server.start()
    try:
        yield Receiver(f"http://127.0.0.1:{server.port}{PATH}", table, sink, topics, metrics)
    finally:
        server.stop()
        sink.flush(5)
        sink.close()
