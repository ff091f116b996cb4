"""The WebHook receiver through a Kafka outage: fast 503s with Retry-After, and nothing answered 200 is lost.

RingCentral's retry schedule is not documented (reference: ringcentral-websocket-webhook.md), so the test
plays the careful sender: every delivery not answered 200 is sent again until it is.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import requests

from ingest.sandbox.kafka import LocalKafka
from tests.integration.webhook.receiver import Receiver, notification, running_receiver
from tests.support.harness import TopicReader
from tests.support.waiting import wait_for

ANSWER_TIMEOUT = 1.5
BURST = 60


@pytest.fixture
def broker() -> Iterator[LocalKafka]:
    with LocalKafka() as kafka:
        yield kafka


def _send(r: Receiver, n: int) -> tuple[int, float, str | None]:
    started = time.monotonic()
    try:
        answer = r.post(notification(n), timeout=30)
    except requests.RequestException:
        return 0, time.monotonic() - started, None
    return answer.status_code, time.monotonic() - started, answer.headers.get("Retry-After")


def test_a_kafka_outage_during_a_burst_answers_503_fast_and_loses_nothing_answered_200(
        broker: LocalKafka, unique_name: str) -> None:
    with running_receiver(broker.bootstrap_servers, unique_name, answer_timeout=ANSWER_TIMEOUT,
                          producer={"reconnect.backoff.max.ms": "1000"}) as r:
        # A new producer's first record waits for its producer id and the topic's metadata: warm it up.
        wait_for(lambda: _send(r, 0)[0] == 200, 60, "a first delivery answered 200")
        assert [_send(r, n)[0] for n in range(1, 10)] == [200] * 9

        broker.stop()
        try:
            with ThreadPoolExecutor(8) as pool:
                during = list(pool.map(lambda n: _send(r, n), range(10, 10 + BURST)))
        finally:
            broker.start()
        codes = [code for code, _, _ in during]
        slowest = max(seconds for _, seconds, _ in during)
        print(f"during the outage: {codes.count(503)} x 503, {codes.count(200)} x 200, slowest answer {slowest:.2f} s")
        assert codes.count(503) >= BURST - 8, codes  # at most what was in flight when the broker went
        assert set(codes) <= {200, 503}
        assert all(retry == "3" for code, _, retry in during if code == 503)
        assert slowest < ANSWER_TIMEOUT + 1.0, "an answer waited past the answer deadline"

        # RingCentral (here: the test) sends every unanswered delivery again until it gets its 200.
        unanswered = [n for n, (code, _, _) in zip(range(10, 10 + BURST), during, strict=True) if code != 200]
        deadline = time.monotonic() + 120
        while unanswered and time.monotonic() < deadline:
            unanswered = [n for n in unanswered if _send(r, n)[0] != 200]
            if unanswered:
                threading.Event().wait(0.5)
        assert not unanswered, f"{len(unanswered)} deliveries never answered 200 after Kafka came back"

        reader = TopicReader(broker.bootstrap_servers, unique_name)
        try:
            records = reader.poll_until(lambda rs: len({rec.headers.get("uuid") for rec in rs}) >= 10 + BURST, 120)
        finally:
            reader.close()
        stored = {orjson.loads(rec.value)["uuid"] for rec in records}
        missing = {str(uuid.UUID(int=n)) for n in range(10 + BURST)} - stored
        print(f"{len(records)} records for {10 + BURST} notifications ({len(records) - len(stored)} duplicates)")
        assert not missing, f"{len(missing)} notifications answered 200 are not in Kafka"


def test_a_full_local_queue_answers_503_without_producing(kafka_bootstrap: str, unique_name: str) -> None:
    with running_receiver(kafka_bootstrap, unique_name, max_queued=0) as r:
        code, seconds, retry = _send(r, 1)
        assert (code, retry) == (503, "3")
        assert seconds < 1.0
        assert r.sink.acknowledged == 0 and len(r.sink.producer) == 0
