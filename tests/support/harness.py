"""Helpers for end-to-end tests: a worker config for the sandbox, and a reader of everything the worker
wrote to Kafka, compared with what the sandbox generated (by uuid, and dead letters by payload)."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException

from ingest.sandbox.generator import Generated
from ingest.sandbox.ringcentral import Account
from ingest.sandbox.server import Sandbox
from ingest.sandbox.worker_config import write_worker_config
from ingest.topology import TopicNames
from tests.support.sandbox import STEADY
from tests.unit.test_catalogue import documented_events

# What the generator's kinds are, in the catalogue's words (decided here, independently of the code).
EVERY_KIND_FAMILY = {
    "message-store": "message-store", "instant-sms": "instant-message", "presence": "presence",
    "detailed-presence": "detailed-presence", "telephony-sessions": "telephony-sessions",
    "extension-list": "extension-list", "voicemail": "voicemail", "fax": "fax",
    "subscription-reminder": "subscription-reminder", "account-presence": "account-presence",
    "presence-line": "presence-line", "dnd-status": "dnd-status", "call-queue-presence": "call-queue-presence",
    "extension-info": "extension-info", "favorites": "extension-info", "grant-list": "extension-info",
    "emergency-address": "extension-info", "company-directory": "company-directory",
    "contact-center-numbers": "contact-center-numbers", "a2p-batches": "a2p-sms", "a2p-messages": "a2p-sms",
    "a2p-opt-outs": "a2p-sms", "sms-consents": "a2p-sms", "message-threads": "message-threads",
    "team-posts": "team-messaging", "team-chats": "team-messaging", "team-webhooks": "team-messaging",
    "ringsense": "ringsense", "webinar": "webinar", "missed-calls": "mobile-push", "start-ring": "mobile-push",
    "stop-ring": "mobile-push", "inbound-messages": "mobile-push",
}
# The kinds ALL_FILTERS subscribes to.
KIND_FAMILY = {kind: EVERY_KIND_FAMILY[kind] for kind in (
    "message-store", "instant-sms", "presence", "detailed-presence", "telephony-sessions", "extension-list",
    "voicemail", "fax", "subscription-reminder")}
# The dead-letter reasons each deliberate malformation may produce.
MALFORMED_REASONS = {
    "bad-base64": {"bad-base64"}, "wrong-key": {"bad-padding"}, "bad-padding": {"bad-padding"},
    "invalid-json": {"invalid-json", "no-encryption-key"}, "schema-violation": {"schema-violation"},
}

ALL_FILTERS = {
    "messages": ["/restapi/v1.0/account/~/extension/~/message-store",
                 "/restapi/v1.0/account/~/extension/~/message-store/instant?type=SMS",
                 "/restapi/v1.0/account/~/extension/~/voicemail",
                 "/restapi/v1.0/account/~/extension/~/fax?direction=Inbound"],
    "presence": ["/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true",
                 "/restapi/v1.0/account/~/extension/~/presence"],
    "calls": ["/restapi/v1.0/account/~/telephony/sessions", "/restapi/v1.0/account/~/extension"],
    "reminders": ["/restapi/v1.0/subscription/~?threshold=120&interval=30"],
}


def documented_subscription_filters(account: Account) -> list[str]:
    """Every filter of the catalogue reference, as a client would subscribe to it on this sandbox account."""
    fill = {"{accountId}": "~", "{extensionId}": "~", "{batchId}": "b-3157yoo2", "{groupId}": account.extensions[-1],
            "{deviceId}": "8021", "threshold={seconds}&interval={seconds}": "threshold=60&interval=15"}
    filters = [event for _, event in documented_events()]
    for placeholder, value in fill.items():
        filters = [f.replace(placeholder, value) for f in filters]
    return filters


def write_config(directory: Path, sandbox: Sandbox, bootstrap: str, prefix: str, *,
                 subscriptions: dict[str, list[str]] | None = None, accounts: int | None = None,
                 worker: dict[str, Any] | None = None) -> Path:
    """A worker config for the first `accounts` sandbox accounts, each with `subscriptions`
    (name -> event filters; default: every family), told the sandbox's replay buffer size."""
    subs = list((subscriptions or ALL_FILTERS).items())
    return write_worker_config(directory, sandbox.describe(), bootstrap, prefix,
                               {account.name: subs for account in sandbox.accounts[:accounts]}, partitions=2,
                               # The worker is told the sandbox's real replay buffer, so that a gap it
                               # reports is a gap (a smaller figure made every long catch-up a false alarm).
                               worker={"checkpoint_interval_seconds": 0.5,
                                       "replay_buffer_messages": sandbox.settings.buffer_size, **(worker or {})},
                               log_level="INFO")


@dataclass
class Record:
    topic: str
    key: str
    value: bytes
    headers: dict[str, str]


@dataclass
class TopicReader:
    """Reads every output topic (and the dead-letter topic) of a prefix from the beginning."""

    bootstrap: str
    prefix: str
    isolation: str = "read_committed"
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topics = TopicNames(self.prefix)
        self._consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": f"{self.prefix}-verifier-{time.time_ns()}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False, "isolation.level": self.isolation,
            "topic.metadata.refresh.interval.ms": 1000,
        })
        self._consumer.subscribe(self.topics.all_output_topics())

    def poll_until(self, done: Callable[[list[Record]], bool], timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(self.records):
            for msg in self._consumer.consume(500, 0.5):
                if msg.error():
                    # Partition EOF is harmless; a topic the worker has not created yet will appear.
                    if msg.error().code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                        continue
                    raise KafkaException(msg.error())
                headers = {k: (v or b"").decode("utf-8", "replace") for k, v in msg.headers() or []}
                self.records.append(Record(msg.topic() or "", (msg.key() or b"").decode(), msg.value() or b"",
                                           headers))
        return self.records

    def close(self) -> None:
        self._consumer.close()


def good(generated: Iterable[Generated]) -> list[Generated]:
    return [g for g in generated if g.malformed is None and g.kind in EVERY_KIND_FAMILY]


@dataclass
class Comparison:
    missing: list[Generated]
    duplicates: dict[str, int]
    wrong: list[str]
    dead_missing: list[Generated]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.wrong or self.dead_missing)


def compare(generated: list[Generated], records: list[Record], topics: TopicNames) -> Comparison:
    """Every good notification in its family topic with the right key and headers; every malformed one
    in the dead-letter topic with an expected reason. Duplicates are counted, not failed, here."""
    by_uuid: dict[str, list[Record]] = {}
    dead: dict[bytes, list[Record]] = {}
    for r in records:
        if r.topic == topics.dead_letter:
            dead.setdefault(r.value, []).append(r)
        elif "uuid" in r.headers:
            by_uuid.setdefault(r.headers["uuid"], []).append(r)
    missing, wrong, dead_missing = [], [], []
    duplicates: dict[str, int] = {}
    for g in generated:
        if g.malformed is not None:
            original = g.payload.encode() if isinstance(g.payload, str) else json.dumps(
                g.payload, separators=(",", ":"), ensure_ascii=False).encode()
            found = dead.get(original)
            if not found:
                dead_missing.append(g)
            elif found[0].headers.get("error-class") not in MALFORMED_REASONS[g.malformed]:
                wrong.append(f"{g.malformed}: dead-lettered as {found[0].headers.get('error-class')}")
            continue
        if g.kind not in EVERY_KIND_FAMILY:
            continue
        assert g.uuid is not None
        got = by_uuid.get(g.uuid)
        if not got:
            missing.append(g)
            continue
        if len(got) > 1:
            duplicates[g.uuid] = len(got)
        r, family = got[0], EVERY_KIND_FAMILY[g.kind]
        expected_value = g.plaintext if isinstance(g.payload, str) else None
        problems = []
        if r.topic != topics.for_family(family):
            problems.append(f"topic {r.topic} != {topics.for_family(family)}")
        if r.key != g.account_id:
            problems.append(f"key {r.key} != {g.account_id}")
        if expected_value is not None and r.value != expected_value:
            problems.append("value differs from the decrypted bytes")
        if r.headers.get("family") != family or r.headers.get("timetoken") != str(g.timetoken):
            problems.append(f"headers {r.headers}")
        if r.headers.get("subscription-id") != g.subscription_id or r.headers.get("event") != g.event:
            problems.append(f"headers {r.headers}")
        if problems:
            wrong.append(f"{g.uuid} ({g.kind}): " + "; ".join(problems))
    return Comparison(missing, duplicates, wrong, dead_missing)


def count_by_topic(records: list[Record]) -> Counter[str]:
    return Counter(r.topic for r in records)


class _Reader(Protocol):
    topics: TopicNames

    def poll_until(self, done: Callable[[list[Record]], bool], timeout: float) -> list[Record]: ...


def drain_and_compare(sandbox: Sandbox, reader: _Reader, timeout: float) -> tuple[list[Generated], Comparison]:
    """Stop the generator, read until every good notification it published is in Kafka (or `timeout`),
    and compare: (the good notifications, the comparison)."""
    sandbox.generator.stop()
    generated = good(sandbox.generator.generated)
    wanted = {g.uuid for g in generated}
    records = reader.poll_until(lambda rs: wanted <= {r.headers.get("uuid") for r in rs}, timeout)
    return generated, compare(generated, records, reader.topics)


@contextlib.contextmanager
def observed_worker(directory: Path, bootstrap: str, prefix: str, *, ttl: float = 900.0,
                    worker: dict[str, Any] | None = None) -> Iterator[tuple[Any, Sandbox]]:
    """A sandbox and a started in-process worker (metrics on a free port) reading all event families."""
    from ingest.config import load_config
    from ingest.sandbox.server import SandboxSettings
    from ingest.worker.runtime import Worker

    settings = SandboxSettings(subscription_ttl_max=ttl, **STEADY)
    with Sandbox(settings) as sandbox:
        config = load_config(write_config(directory, sandbox, bootstrap, prefix, accounts=1,
                                          subscriptions={k: v for k, v in ALL_FILTERS.items() if k != "reminders"},
                                          worker=worker))
        w = Worker(config)
        w.start()
        try:
            yield w, sandbox
        finally:
            w.stop(delete_subscriptions=True)
