"""The WebHook receiver through a Kafka outage: fast 503s with Retry-After, and nothing answered 200 is lost.

RingCentral's retry schedule is not documented (reference: ringcentral-websocket-webhook.md), so the test
plays the careful sender: every delivery not answered 200 is sent again until it is.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests

from ingest.sandbox.kafka import LocalKafka
from ingest.sandbox.server import Sandbox
from ingest.worker.runtime import Worker
from tests.integration.webhook.receiver import Receiver, notification, running_receiver
from tests.integration.webhook.workers import webhook_worker
from tests.support.harness import TopicReader
from tests.support.waiting import free_port, wait_for

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


def _carefully_resent(send: Callable[[int], tuple[int, float, str | None]], unanswered: list[int]) -> list[int]:
    """RingCentral (here: the test) sends every unanswered delivery again until it gets its 200; what
    never got it within 120 s."""
    deadline = time.monotonic() + 120
    while unanswered and time.monotonic() < deadline:
        unanswered = [n for n in unanswered if send(n)[0] != 200]
        if unanswered:
            threading.Event().wait(0.5)
    return unanswered


@pytest.fixture(params=["at-least-once", "exactly-once"])
def worker_on_broker(request: pytest.FixtureRequest, broker: LocalKafka, unique_name: str,
                     tmp_path: Path) -> Iterator[tuple[Worker, str, str]]:
    """A `transport: webhook` worker on its own broker: (worker, delivery address, verification token)."""
    with Sandbox() as sandbox:
        account = sandbox.accounts[0]
        worker = webhook_worker(tmp_path, sandbox, broker.bootstrap_servers, unique_name,
                                {account.name: [("presence", ["/restapi/v1.0/account/~/extension/~/presence"])]},
                                port=free_port(), kafka={"reconnect.backoff.max.ms": 1000},
                                worker={"checkpoint_interval_seconds": 0.2, "delivery_guarantee": request.param},
                                webhook={"answer_timeout_seconds": ANSWER_TIMEOUT, "retry_after_seconds": 3})
        worker.start()
        try:
            wait_for(lambda: worker.subscriptions_serving() == 1, 90, "the WebHook subscription served")
            [view] = sandbox.rc.live_subscriptions()
            assert view.webhook_token is not None
            yield worker, view.channel, view.webhook_token
        finally:
            worker.stop(delete_subscriptions=True)


def test_the_worker_answers_503_fast_through_a_kafka_outage_and_loses_nothing_answered_200(
        broker: LocalKafka, worker_on_broker: tuple[Worker, str, str], unique_name: str) -> None:
    worker, address, token = worker_on_broker
    subscription_id = next(iter(worker.channels.deliveries.values())).subscription_id

    def send(n: int) -> tuple[int, float, str | None]:
        started = time.monotonic()
        try:
            answer = requests.post(address, data=notification(n, subscription_id), timeout=30, headers={
                "Content-Type": "application/json", "Verification-Token": token})
        except requests.RequestException:
            return 0, time.monotonic() - started, None
        return answer.status_code, time.monotonic() - started, answer.headers.get("Retry-After")

    wait_for(lambda: send(0)[0] == 200, 60, "a first delivery answered 200")
    assert [send(n)[0] for n in range(1, 10)] == [200] * 9

    broker.stop()
    try:
        with ThreadPoolExecutor(8) as pool:
            during = list(pool.map(send, range(10, 10 + BURST)))
        # The worker has noticed by now (its Kafka check runs every 5 s): answers come at once.
        wait_for(lambda: not worker.kafka.ok, 30, "Kafka reported unreachable")
        noticed = [send(n) for n in range(10 + BURST, 20 + BURST)]
    finally:
        broker.start()
    codes = [code for code, _, _ in during + noticed]
    slowest = max(seconds for _, seconds, _ in during)
    print(f"\n[worker, {worker.config.worker.delivery_guarantee}] during the outage: {codes.count(503)} x 503, "
          f"{codes.count(200)} x 200, slowest answer {slowest:.2f} s; once noticed: slowest "
          f"{max(seconds for _, seconds, _ in noticed) * 1e3:.0f} ms")
    assert set(codes) <= {200, 503} and codes.count(503) >= len(codes) - 8, codes
    assert all(retry == "3" for code, _, retry in during + noticed if code == 503)
    assert slowest < ANSWER_TIMEOUT + 1.0, "an answer waited past the answer deadline"
    assert max(seconds for _, seconds, _ in noticed) < 0.5

    sent = range(20 + BURST)
    never = _carefully_resent(send, [n for n, (code, _, _) in zip(range(10, 20 + BURST), during + noticed,
                                                                   strict=True) if code != 200])
    assert not never, f"{len(never)} deliveries never answered 200 after Kafka came back"
    reader = TopicReader(broker.bootstrap_servers, unique_name)
    try:
        records = reader.poll_until(lambda rs: len({rec.headers.get("uuid") for rec in rs}) >= len(sent), 120)
    finally:
        reader.close()
    stored = [orjson.loads(rec.value)["uuid"] for rec in records]
    missing = {str(uuid.UUID(int=n)) for n in sent} - set(stored)
    print(f"{len(records)} records for {len(sent)} notifications ({len(stored) - len(set(stored))} duplicates)")
    assert not missing, f"{len(missing)} notifications answered 200 are not in Kafka"


def test_a_full_local_queue_answers_503_without_producing(kafka_bootstrap: str, unique_name: str) -> None:
    with running_receiver(kafka_bootstrap, unique_name, max_queued=0) as r:
        code, seconds, retry = _send(r, 1)
        assert (code, retry) == (503, "3")
        assert seconds < 1.0
        assert r.sink.acknowledged == 0 and len(r.sink.producer) == 0
