"""The pipeline on a plaintext channel (a WebHook or WebSocket subscription) given JSON bytes: the record
value is the body byte for byte; what cannot be read becomes a dead letter holding the body as received."""

from __future__ import annotations

from ingest.data.catalogue import default_catalogue
from ingest.data.pipeline import INVALID_JSON, NOT_AN_OBJECT, TOO_LARGE, ChannelContext, Pipeline
from ingest.topology import TopicNames
from tests.support.vectors import VECTOR_PLAINTEXT

CTX = ChannelContext("acme/presence", "sub-1", "809646016", plaintext=True)
TIMETOKEN = 17_648_000_000_000_000


def _pipeline(max_payload_bytes: int = 512 * 1024) -> Pipeline:
    catalogue = default_catalogue()
    return Pipeline(catalogue, TopicNames("rc", catalogue=catalogue), max_payload_bytes=max_payload_bytes)


def test_a_body_is_published_byte_for_byte() -> None:
    body = VECTOR_PLAINTEXT.replace(b",", b", ")  # whitespace as a sender may put it
    out = _pipeline().process(body, CTX, TIMETOKEN)
    assert out.error is None and out.family == "presence"
    assert out.value == body and type(out.value) is bytes
    assert out.header("uuid") == b"db01e7de-5f3c-4ee5-ab72-f8bd3b77e308"


def test_unreadable_bodies_are_dead_letters_holding_the_body() -> None:
    for body, reason in ((b'{"uuid": "u-1", ', INVALID_JSON), (b"[1, 2]", NOT_AN_OBJECT), (b"\xff\xfe", INVALID_JSON)):
        out = _pipeline().process(body, CTX, TIMETOKEN)
        assert (out.error, out.value, out.header("original-encoding")) == (reason, body, b"text")
        assert out.header("spec-id") == b"acme/presence"


def test_a_body_above_the_limit_is_cut_in_its_dead_letter() -> None:
    out = _pipeline(max_payload_bytes=64).process(VECTOR_PLAINTEXT, CTX, TIMETOKEN)
    assert (out.error, out.value) == (TOO_LARGE, VECTOR_PLAINTEXT[:64])
