"""Pipeline.process: exact records for good notifications, a precise dead letter for every bad one."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from typing import Any

import orjson
import pytest
from test_catalogue import EXAMPLE_FAMILY, EXAMPLES, FAMILIES, PRESENCE, TELEPHONY

from ingest.data.catalogue import Catalogue, default_catalogue
from ingest.data.crypto import Cipher
from ingest.data.pipeline import (
    BAD_BASE64,
    BAD_LENGTH,
    BAD_PADDING,
    INTERNAL_ERROR,
    INVALID_JSON,
    NO_ENCRYPTION_KEY,
    NOT_AN_OBJECT,
    REASONS,
    SCHEMA_VIOLATION,
    TOO_LARGE,
    UNKNOWN_PAYLOAD_TYPE,
    ChannelContext,
    Outcome,
    Pipeline,
)
from ingest.model import Delivery
from ingest.observability.logs import redact
from ingest.topology import TopicNames
from tests.support.vectors import VECTOR_CIPHERTEXT, VECTOR_KEY, VECTOR_PLAINTEXT

KEY_A = base64.b64encode(bytes(range(16))).decode()
KEY_B = base64.b64encode(bytes(range(16, 32))).decode()
KEY_C = base64.b64encode(bytes(range(32, 48))).decode()
TIMETOKEN = 17_000_000_000_000_123


def delivery(key: str | None = VECTOR_KEY, account: str = "130829004") -> Delivery:
    return Delivery(spec_id="acme/messages", account_id=account, subscription_id="sub-0001",
                    subscriber_key="sub-c-test", channel="1118584868256543_cbe8ceb9", encryption_key=key,
                    expires_at=0.0)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    cat = default_catalogue()
    return Pipeline(cat, TopicNames("rc", catalogue=cat))


@pytest.fixture
def ctx() -> ChannelContext:
    return ChannelContext.from_delivery(delivery())


def compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def headers(outcome: Outcome) -> dict[str, bytes]:
    names = [k for k, _ in outcome.headers]
    assert len(names) == len(set(names)), f"duplicate header in {names}"
    return dict(outcome.headers)


# -- good records -------------------------------------------------------------------------------


def test_vector1_becomes_an_exact_presence_record(pipeline: Pipeline, ctx: ChannelContext) -> None:
    out = pipeline.process(VECTOR_CIPHERTEXT, ctx, TIMETOKEN)
    assert out.error is None
    assert out.topic == "rc.presence"
    assert out.family == "presence"
    assert out.value == VECTOR_PLAINTEXT  # byte for byte, never re-serialised
    assert out.key == b"130829004"  # the event path says account/~: the channel's account
    assert out.uuid == "db01e7de-5f3c-4ee5-ab72-f8bd3b77e308"
    assert out.event_time == pytest.approx(1394657274.712)
    assert headers(out) == {
        "event": b"/restapi/v1.0/account/~/extension/402853446008/presence",
        "family": b"presence",
        "subscription-id": b"sub-0001",  # absent from the envelope: the channel's
        "uuid": b"db01e7de-5f3c-4ee5-ab72-f8bd3b77e308",
        "timestamp": b"2014-03-12T20:47:54.712+0000",
        "timetoken": b"17000000000000123",
        "schema-id": b"https://ingest.invalid/schemas/v1/presence.json",
        "spec-id": b"acme/messages",
    }


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_goes_to_its_family_topic(pipeline: Pipeline, ctx: ChannelContext, name: str) -> None:
    plaintext = compact(EXAMPLES[name])
    out = pipeline.process(Cipher(VECTOR_KEY).encrypt(plaintext), ctx, TIMETOKEN)
    assert out.error is None, headers(out).get("error-message")
    assert out.family == EXAMPLE_FAMILY[name]
    assert out.topic == f"rc.{EXAMPLE_FAMILY[name]}"
    assert out.value == plaintext
    assert headers(out)["family"] == out.family.encode()


def test_numeric_account_in_the_path_is_the_key(pipeline: Pipeline, ctx: ChannelContext) -> None:
    out = pipeline.process(Cipher(VECTOR_KEY).encrypt(compact(TELEPHONY)), ctx, TIMETOKEN)
    assert out.key == b"809646016"
    assert headers(out)["subscription-id"] == b"53300e7c-5e69-42bf-ab4d-179aabc6e869"  # the envelope's own


def test_unencrypted_dict_is_serialised_compactly_once(pipeline: Pipeline) -> None:
    plain = ChannelContext.from_delivery(delivery(key=None))
    doc = copy.deepcopy(PRESENCE)
    doc["body"]["note"] = "Zoë 🎉"  # UTF-8 kept as is
    out = pipeline.process(doc, plain, TIMETOKEN)
    assert out.error is None
    assert out.value == compact(doc) == orjson.dumps(doc)
    assert out.topic == "rc.presence"
    assert out.event_time == pytest.approx(1455788244.597)


def test_minimal_envelope_has_no_uuid_or_timestamp_headers(pipeline: Pipeline, ctx: ChannelContext) -> None:
    doc = {"event": "/restapi/v1.0/account/~/extension/~/presence", "body": {"extensionId": 1}}
    out = pipeline.process(Cipher(VECTOR_KEY).encrypt(compact(doc)), ctx, TIMETOKEN)
    assert out.error is None
    assert "uuid" not in headers(out) and "timestamp" not in headers(out)
    assert out.uuid is None and out.event_time is None


@pytest.mark.parametrize(
    ("event", "family"),
    [("/restapi/v1.0/account/~/extension/~/unheard-of", "other"),
     ("/restapi/v1.0/something/new", "other")],
)
def test_unknown_paths_go_to_the_default_topic(pipeline: Pipeline, ctx: ChannelContext, event: str,
                                               family: str) -> None:
    doc = {"uuid": "1823485288313944239", "event": event, "body": {"anything": [1, "x"]}}
    out = pipeline.process(Cipher(VECTOR_KEY).encrypt(compact(doc)), ctx, TIMETOKEN)
    assert (out.error, out.topic, out.family) == (None, "rc.events", family)
    assert headers(out)["schema-id"] == b"https://ingest.invalid/schemas/v1/envelope.json"


def test_routing_overrides_and_topic_list() -> None:
    cat = default_catalogue()
    topics = TopicNames("acme", {"presence": "acme-presence-v2", "other": "acme.misc"}, catalogue=cat)
    assert topics.for_family("presence") == "acme-presence-v2"
    assert topics.for_family("detailed-presence") == "acme.detailed-presence"
    assert topics.for_family("mobile-push") == "acme.mobile-push"
    assert topics.for_family("other") == "acme.misc"
    assert topics.for_family("never-heard-of") == "acme.events"
    assert (topics.default, topics.dead_letter, topics.state) == ("acme.events", "acme.dead-letter", "acme.state")
    assert topics.all_output_topics() == sorted([
        "acme-presence-v2", *(f"acme.{family}" for family in FAMILIES - {"presence"}),
        "acme.misc", "acme.events", "acme.dead-letter"])
    assert len(topics.all_output_topics()) == 25  # 22 families, `other`, events, dead letters
    assert "acme.state" not in topics.all_output_topics()
    ctx = ChannelContext.from_delivery(delivery())
    out = Pipeline(cat, topics).process(VECTOR_CIPHERTEXT, ctx, 1)
    assert out.topic == "acme-presence-v2"
    with pytest.raises(ValueError, match="presense"):
        TopicNames("acme", {"presense": "typo"})
    with pytest.raises(ValueError, match="prefix"):
        TopicNames("")


# -- dead letters -------------------------------------------------------------------------------


def assert_dead(out: Outcome, reason: str, original: bytes, encoding: bytes,
                family: str = "unknown") -> dict[str, bytes]:
    assert out.error == reason
    assert out.topic == "rc.dead-letter"
    assert out.key == b"130829004"
    assert out.value == original
    assert out.family == family
    h = headers(out)
    assert h["error-class"] == reason.encode()
    assert h["original-encoding"] == encoding
    assert h["error-message"]
    assert h["spec-id"] == b"acme/messages"
    assert h["timetoken"] == str(TIMETOKEN).encode()
    assert "subscription-id" in h
    return h


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("not base64!!", BAD_BASE64),
        ("YWJj\n", BAD_BASE64),
        (base64.b64encode(b"short").decode(), BAD_LENGTH),
        ("", BAD_LENGTH),
        (Cipher(KEY_C).encrypt(VECTOR_PLAINTEXT), BAD_PADDING),
        (Cipher(VECTOR_KEY).encrypt(b'{"event": "/x", "body": {'), INVALID_JSON),
        (Cipher(VECTOR_KEY).encrypt(b"\xff\xfe{}"), INVALID_JSON),
        (Cipher(VECTOR_KEY).encrypt(b'{"a":NaN}'), INVALID_JSON),
        (Cipher(VECTOR_KEY).encrypt(b""), INVALID_JSON),
        (Cipher(VECTOR_KEY).encrypt(b"[1,2,3]"), NOT_AN_OBJECT),
        (Cipher(VECTOR_KEY).encrypt(b'"just a string"'), NOT_AN_OBJECT),
        (Cipher(VECTOR_KEY).encrypt(b"null"), NOT_AN_OBJECT),
    ],
)
def test_undecodable_payloads(pipeline: Pipeline, ctx: ChannelContext, payload: str, reason: str) -> None:
    h = assert_dead(pipeline.process(payload, ctx, TIMETOKEN), reason, payload.encode(), b"base64-ciphertext")
    assert "event" not in h and "family" not in h


def test_schema_violation_keeps_what_is_known(pipeline: Pipeline, ctx: ChannelContext) -> None:
    doc = copy.deepcopy(PRESENCE)
    doc["body"]["sequence"] = "not a number"
    payload = Cipher(VECTOR_KEY).encrypt(compact(doc))
    out = pipeline.process(payload, ctx, TIMETOKEN)
    h = assert_dead(out, SCHEMA_VIOLATION, payload.encode(), b"base64-ciphertext", family="presence")
    assert h["event"] == PRESENCE["event"].encode()
    assert h["uuid"] == PRESENCE["uuid"].encode()
    assert h["timestamp"] == PRESENCE["timestamp"].encode()
    assert h["subscription-id"] == PRESENCE["subscriptionId"].encode()
    assert h["schema-id"] == b"https://ingest.invalid/schemas/v1/presence.json"
    assert b"body/sequence" in h["error-message"]
    assert out.uuid == PRESENCE["uuid"]
    assert out.event_time == pytest.approx(1455788244.597)


def test_body_that_is_not_an_object(pipeline: Pipeline, ctx: ChannelContext) -> None:
    doc = {"uuid": "1823485288313944239", "event": "/restapi/v1.0/x", "body": [1]}
    payload = Cipher(VECTOR_KEY).encrypt(compact(doc))
    assert_dead(pipeline.process(payload, ctx, TIMETOKEN), SCHEMA_VIOLATION, payload.encode(), b"base64-ciphertext",
                family="other")


def test_event_missing_or_not_a_string(pipeline: Pipeline, ctx: ChannelContext) -> None:
    for doc in ({"body": {}}, {"event": 12, "body": {}}):
        payload = Cipher(VECTOR_KEY).encrypt(compact(doc))
        assert_dead(pipeline.process(payload, ctx, TIMETOKEN), SCHEMA_VIOLATION, payload.encode(),
                    b"base64-ciphertext", family="other")


def test_string_payload_without_a_key(pipeline: Pipeline) -> None:
    plain = ChannelContext.from_delivery(delivery(key=None))
    assert_dead(pipeline.process(VECTOR_CIPHERTEXT, plain, TIMETOKEN), NO_ENCRYPTION_KEY, VECTOR_CIPHERTEXT.encode(),
                b"text")


def test_unencrypted_dict_violating_the_schema(pipeline: Pipeline) -> None:
    plain = ChannelContext.from_delivery(delivery(key=None))
    doc = copy.deepcopy(PRESENCE)
    del doc["body"]["extensionId"]
    assert_dead(pipeline.process(doc, plain, TIMETOKEN), SCHEMA_VIOLATION, orjson.dumps(doc), b"json",
                family="presence")


def test_websocket_bytes_are_the_record_value_as_they_arrived(pipeline: Pipeline) -> None:
    websocket = ChannelContext.from_delivery(dataclasses.replace(delivery(key=None), transport="WebSocket"))
    raw = json.dumps(PRESENCE, indent=1).encode()  # not compact: a re-serialised value would differ
    out = pipeline.process(raw, websocket, TIMETOKEN)
    assert out.error is None and out.family == "presence" and out.value == raw  # spaces and all: not re-serialised
    assert_dead(pipeline.process(raw[:40], websocket, TIMETOKEN), INVALID_JSON, raw[:40], b"text")
    assert pipeline.process(raw, ChannelContext.from_delivery(delivery(key=None)), TIMETOKEN).error == \
        UNKNOWN_PAYLOAD_TYPE  # bytes on a PubNub channel stay an unknown payload type


@pytest.mark.parametrize("payload", [[1, 2], 5, 1.5, True, None])
def test_parsed_json_that_is_not_an_object(pipeline: Pipeline, ctx: ChannelContext, payload: Any) -> None:
    assert_dead(pipeline.process(payload, ctx, TIMETOKEN), NOT_AN_OBJECT, compact(payload), b"json")


@pytest.mark.parametrize(
    ("payload", "value", "encoding"),
    [(b"bytes", b"bytes", b"json"), (object, b"<class 'object'>", b"python-repr"),
     ({"event": "/x", "body": {"s": {1, 2}}}, b"{'event': '/x', 'body': {'s': {1, 2}}}", b"python-repr")],
)
def test_python_objects_are_unknown_payload_types(pipeline: Pipeline, ctx: ChannelContext, payload: object,
                                                  value: bytes, encoding: bytes) -> None:
    out = pipeline.process(payload, ctx, TIMETOKEN)
    if isinstance(payload, bytes):  # orjson refuses bytes; repr it is
        value, encoding = repr(payload).encode(), b"python-repr"
    assert_dead(out, UNKNOWN_PAYLOAD_TYPE, value, encoding)


def test_too_large_payloads_are_cut(ctx: ChannelContext) -> None:
    cat = default_catalogue()
    small = Pipeline(cat, TopicNames("rc", catalogue=cat), max_payload_bytes=64)
    assert_dead(small.process(VECTOR_CIPHERTEXT, ctx, TIMETOKEN), TOO_LARGE, VECTOR_CIPHERTEXT[:64].encode(),
                b"base64-ciphertext")
    plain = ChannelContext.from_delivery(delivery(key=None))
    assert_dead(small.process(PRESENCE, plain, TIMETOKEN), TOO_LARGE, orjson.dumps(PRESENCE)[:64], b"json")


def test_internal_errors_never_escape(pipeline: Pipeline) -> None:
    class Exploding(Cipher):
        def decrypt(self, payload: str | bytes) -> bytes:
            raise RuntimeError("boom")

    broken = ChannelContext("acme/messages", "sub-0001", "130829004", Exploding(VECTOR_KEY))
    assert_dead(pipeline.process(VECTOR_CIPHERTEXT, broken, TIMETOKEN), INTERNAL_ERROR, VECTOR_CIPHERTEXT.encode(),
                b"base64-ciphertext")


def test_every_reason_is_listed() -> None:
    assert len(set(REASONS)) == len(REASONS) == 10


# -- key rotation -------------------------------------------------------------------------------


def test_key_rotation_falls_back_to_the_previous_key(pipeline: Pipeline) -> None:
    ctx_a = ChannelContext.from_delivery(delivery(KEY_A))
    ctx_b = ChannelContext.from_delivery(delivery(KEY_B), previous=ctx_a)
    assert ctx_b.previous_cipher is ctx_a.cipher
    old = Cipher(KEY_A).encrypt(VECTOR_PLAINTEXT)
    new = Cipher(KEY_B).encrypt(VECTOR_PLAINTEXT)
    for payload in (old, new):
        out = pipeline.process(payload, ctx_b, TIMETOKEN)
        assert (out.error, out.value) == (None, VECTOR_PLAINTEXT)
    # A renewal that keeps key B keeps A as fallback; dropping `previous` ends the grace period.
    renewed = ChannelContext.from_delivery(delivery(KEY_B), previous=ctx_b)
    assert pipeline.process(old, renewed, TIMETOKEN).error is None
    after_grace = ChannelContext.from_delivery(delivery(KEY_B))
    assert pipeline.process(old, after_grace, TIMETOKEN).error == BAD_PADDING
    # Neither key: the reason is the current key's, and the message says both were tried.
    out = pipeline.process(Cipher(KEY_C).encrypt(VECTOR_PLAINTEXT), ctx_b, TIMETOKEN)
    assert out.error == BAD_PADDING
    assert b"previous key" in headers(out)["error-message"]


def test_undecodable_base64_does_not_try_the_previous_key(pipeline: Pipeline) -> None:
    ctx_b = ChannelContext.from_delivery(delivery(KEY_B), previous=ChannelContext.from_delivery(delivery(KEY_A)))
    out = pipeline.process("@@@@", ctx_b, TIMETOKEN)
    assert out.error == BAD_BASE64
    assert b"previous key" not in headers(out)["error-message"]


# -- secrets --------------------------------------------------------------------------------------


def test_secrets_never_appear_in_dead_letter_headers(pipeline: Pipeline) -> None:
    ctx_b = ChannelContext.from_delivery(delivery(KEY_B), previous=ChannelContext.from_delivery(delivery(KEY_A)))
    assert redact(f"x{KEY_A}y{KEY_B}") == "x***y***"  # from_delivery registered both keys
    # A notification that carries a key in a field the validator quotes back in its error message.
    doc = copy.deepcopy(PRESENCE)
    doc["uuid"] = KEY_B
    doc["body"]["extensionId"] = KEY_A + "/" * 300  # too long an id: quoted in the error
    doc["body"]["sequence"] = KEY_A
    payloads: list[object] = [Cipher(KEY_B).encrypt(compact(doc)), Cipher(KEY_C).encrypt(b"{}"), "!!", doc,
                              Cipher(KEY_B).encrypt(b"[" + KEY_A.encode() + b"]")]
    raw_keys = [base64.b64decode(k) for k in (KEY_A, KEY_B)]
    for payload in payloads:
        out = pipeline.process(payload, ctx_b, TIMETOKEN)
        assert out.error is not None
        message = headers(out)["error-message"]
        for key in (KEY_A, KEY_B):
            assert key.encode() not in message
        for raw in raw_keys:
            assert raw not in message and raw.hex().encode() not in message
        assert KEY_A not in repr(ctx_b) and KEY_B not in repr(ctx_b)


def test_a_catalogue_can_be_shared_by_pipelines() -> None:
    cat = Catalogue()
    one, two = Pipeline(cat, TopicNames("a", catalogue=cat)), Pipeline(cat, TopicNames("b", catalogue=cat))
    ctx = ChannelContext.from_delivery(delivery())
    assert one.process(VECTOR_CIPHERTEXT, ctx, 1).topic == "a.presence"
    assert two.process(VECTOR_CIPHERTEXT, ctx, 1).topic == "b.presence"


def test_micro_benchmark_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import pipeline_micro

    assert pipeline_micro.main(["--seconds", "0.01", "--messages", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["messages"] == 8
    assert 800 <= result["avg_plaintext_bytes"] <= 1400  # "about 1 KiB", as the figures claim
    assert result["pipeline_per_s"] > 0 and result["naive_per_s"] > 0
