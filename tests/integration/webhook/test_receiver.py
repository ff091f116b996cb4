"""The WebHook receiver against a real Kafka broker: handshake, token checks, bad input, 200 after the ack."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import orjson
import pytest

from tests.integration.webhook.receiver import PATH, SUBSCRIPTION, Receiver, notification, running_receiver
from tests.support.harness import TopicReader


@pytest.fixture
def receiver(kafka_bootstrap: str, unique_name: str) -> Iterator[Receiver]:
    with running_receiver(kafka_bootstrap, unique_name) as r:
        yield r


@pytest.fixture
def reader(kafka_bootstrap: str, unique_name: str) -> Iterator[TopicReader]:
    r = TopicReader(kafka_bootstrap, unique_name)
    yield r
    r.close()


def _nothing_produced(r: Receiver) -> bool:
    return len(r.sink.producer) == 0 and r.sink.acknowledged == 0


def _raw_exchange(url_port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", url_port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def test_validation_handshake_is_echoed_fast_within_1_kib(receiver: Receiver) -> None:
    port = int(receiver.url.split(":")[2].split("/")[0])
    token = "b6e1f3a0-" + "v" * 50
    started = time.monotonic()
    answer = _raw_exchange(port, f"POST {PATH} HTTP/1.1\r\nHost: ingest.example\r\nValidation-Token: {token}\r\n"
                                 f"Content-Length: 0\r\nUser-Agent: RingCentral-Webhook/8.3\r\n\r\n".encode())
    took = time.monotonic() - started
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    assert f"Validation-Token: {token}" in head.split("\r\n")
    assert len(answer) <= 1024, f"{len(answer)} bytes: RingCentral refuses more than 1024 (SUB-525)"
    assert took < 3.0
    assert _nothing_produced(receiver)


def test_an_oversized_validation_token_is_refused(receiver: Receiver) -> None:
    r = receiver.post(b"", token="x" * 2000, header="Validation-Token")
    assert r.status_code == 400
    assert "Validation-Token" not in r.headers


def test_a_delivery_is_answered_200_once_its_record_is_in_kafka(receiver: Receiver, reader: TopicReader) -> None:
    body = notification(1)
    r = receiver.post(body)
    assert r.status_code == 200
    # Acknowledged before the answer: the sink has counted it already, and a reader finds it byte for byte.
    assert receiver.sink.acknowledged == 1
    records = reader.poll_until(lambda rs: len(rs) >= 1, 60)
    [record] = records
    assert record.topic == receiver.topics.for_family("presence")
    assert record.value == body
    assert record.key == "809646016"
    assert record.headers["uuid"] == str(__import__("uuid").UUID(int=1))
    assert record.headers["subscription-id"] == SUBSCRIPTION.subscription_id
    assert record.headers["spec-id"] == SUBSCRIPTION.spec_id


def test_the_2023_header_name_is_accepted_too(receiver: Receiver) -> None:
    assert receiver.post(notification(2), header="Validation-Token").status_code == 200
    assert receiver.sink.acknowledged == 1


@pytest.mark.parametrize("token", [None, "", "vt-wrong", SUBSCRIPTION.verification_token[:-1],
                                   SUBSCRIPTION.verification_token + "x"])
def test_missing_or_wrong_tokens_get_403_and_kafka_is_not_touched(receiver: Receiver, token: str | None) -> None:
    r = receiver.post(notification(3), token=token)
    assert r.status_code == 403
    assert _nothing_produced(receiver)


def test_an_unknown_subscription_gets_403_even_with_a_known_token(receiver: Receiver) -> None:
    r = receiver.post(notification(4, subscription_id="not-ours"))
    assert r.status_code == 403
    assert _nothing_produced(receiver)


def test_a_forged_malformed_body_gets_403(receiver: Receiver) -> None:
    assert receiver.post(b"{not json", token="vt-forged").status_code == 403
    assert _nothing_produced(receiver)


def test_a_malformed_body_with_a_valid_token_becomes_a_dead_letter(receiver: Receiver, reader: TopicReader) -> None:
    body = b'{"uuid": "u-1", "subscriptionId": '
    assert receiver.post(body).status_code == 200
    [record] = reader.poll_until(lambda rs: len(rs) >= 1, 60)
    assert record.topic == receiver.topics.dead_letter
    assert record.value == body
    assert record.headers["error-class"] == "invalid-json"
    assert record.headers["original-encoding"] == "text"
    assert record.headers["spec-id"] == SUBSCRIPTION.spec_id


def test_an_oversized_body_gets_413(receiver: Receiver) -> None:
    body = notification(5).replace(b'"Ringing"', b'"' + b"R" * (70 * 1024) + b'"')
    assert receiver.post(body).status_code == 413
    assert _nothing_produced(receiver)


def test_a_body_that_is_not_json_gets_415(receiver: Receiver) -> None:
    assert receiver.post(notification(6), content_type="text/plain").status_code == 415
    assert receiver.post(notification(6), content_type="application/json; charset=utf-8").status_code == 200


def test_other_paths_and_methods_are_refused(receiver: Receiver) -> None:
    import requests

    assert requests.get(receiver.url, timeout=10).status_code == 405
    assert requests.post(receiver.url + "x", data=notification(7), timeout=10,
                         headers={"Content-Type": "application/json"}).status_code == 404
    assert _nothing_produced(receiver)


def test_a_retried_delivery_is_not_produced_twice(receiver: Receiver, reader: TopicReader) -> None:
    body = notification(8)
    assert receiver.post(body).status_code == 200
    assert receiver.post(body).status_code == 200
    assert receiver.post(notification(9)).status_code == 200
    records = reader.poll_until(lambda rs: len(rs) >= 2, 60)
    assert sorted(orjson.loads(r.value)["body"]["sequence"] for r in records) == [8, 9]
    assert receiver.metrics.registry.get_sample_value("ingest_notifications_duplicate_total") == 1


def test_the_token_never_reaches_the_logs_or_metrics(receiver: Receiver, capfd: pytest.CaptureFixture[str]) -> None:
    from prometheus_client import generate_latest

    from ingest.observability.logs import redact

    receiver.post(notification(10), token="vt-wrong")
    receiver.post(notification(11))
    assert SUBSCRIPTION.verification_token not in generate_latest(receiver.metrics.registry).decode()
    assert SUBSCRIPTION.verification_token not in repr(SUBSCRIPTION)
    assert redact(f"token={SUBSCRIPTION.verification_token}") == "token=***"


def test_stalled_senders_hold_no_request_thread(receiver: Receiver) -> None:
    """20 connections that sent their headers and one body byte, then stall, against 8 request
    threads: waitress buffers requests in its event loop, so a real delivery is still answered."""
    port = int(receiver.url.split(":")[2].split("/")[0])
    stalled = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 1000\r\nVerification-Token: {SUBSCRIPTION.verification_token}\r\n"
                         f"\r\n{{".encode())
            stalled.append(sock)
        started = time.monotonic()
        assert receiver.post(notification(12)).status_code == 200
        assert time.monotonic() - started < 3.0
    finally:
        for sock in stalled:
            sock.close()


def test_a_body_naming_no_subscription_is_matched_by_its_token_among_all(receiver: Receiver) -> None:
    from ingest.transports.webhook import SubscriptionTable, WebhookSubscription

    table = SubscriptionTable()
    subscriptions = [WebhookSubscription(f"sub-{n}", f"acme/s{n}", "1", f"vt-token-number-{n:04d}") for n in range(50)]
    for subscription in subscriptions:
        table.put(subscription)
    assert table.by_token(b"vt-token-number-0031") == subscriptions[31]
    assert table.by_token(b"vt-token-number-9999") is None
    assert table.by_token(None) is None
    assert table.authenticate("sub-7", b"vt-token-number-0007") == subscriptions[7]
    assert table.authenticate("sub-7", b"vt-token-number-0008") is None
