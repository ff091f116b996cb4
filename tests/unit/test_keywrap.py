"""Subscription keys in state records: wrapped with the deployment's client secret, bound to spec and
channel; records written before keys were recorded still decode."""

from __future__ import annotations

import json

import pytest

from ingest.coordination.keywrap import KeyWrapper, UnwrapError
from ingest.coordination.state import RecordedChannel, SpecState
from ingest.transports.websocket import Position, recorded_session, session_of_record
from tests.support.vectors import VECTOR_KEY

SECRET = "client-secret-of-the-app"


def test_a_wrapped_key_opens_only_with_the_same_secret_spec_and_channel() -> None:
    wrapped = KeyWrapper(SECRET).wrap(VECTOR_KEY, "acme/messages", "ch-1")
    assert VECTOR_KEY not in wrapped and wrapped.startswith("v1.")
    assert KeyWrapper(SECRET).unwrap(wrapped, "acme/messages", "ch-1") == VECTOR_KEY
    for secret, spec, channel in [("rotated", "acme/messages", "ch-1"), (SECRET, "acme/other", "ch-1"),
                                  (SECRET, "acme/messages", "ch-2")]:
        with pytest.raises(UnwrapError):
            KeyWrapper(secret).unwrap(wrapped, spec, channel)
    for damaged in ["v2." + wrapped[3:], wrapped[:-4], "v1.not base64!"]:
        with pytest.raises(UnwrapError):
            KeyWrapper(SECRET).unwrap(damaged, "acme/messages", "ch-1")


def test_state_record_round_trip_with_draining_channels() -> None:
    former = RecordedChannel("sub-1", "sub-c-1", "ch-1", 17000000000000000, "v1.xyz")
    state = SpecState("acme/messages", "4001", "sub-2", "sub-c-1", "ch-2", 17000000010000000, 1.0, "w1", 2.0,
                      "", (former,))
    decoded = SpecState.decode(state.encode())
    assert decoded == state
    assert [c.channel for c in decoded.recorded_channels()] == ["ch-2", "ch-1"]


def test_a_record_written_before_keys_were_recorded_still_decodes() -> None:
    legacy = {"spec_id": "acme/messages", "account_id": "4001", "subscription_id": "sub-1",
              "subscriber_key": "sub-c-1", "channel": "ch-1", "timetoken": 5, "updated_at": 1.0, "worker_id": "w1",
              "expires_at": 2.0}
    decoded = SpecState.decode(json.dumps(legacy).encode())
    assert decoded.draining == () and decoded.wrapped_key is None  # None: the key is not known
    assert decoded.recorded_channels() == [RecordedChannel("sub-1", "sub-c-1", "ch-1", 5, None)]


def test_a_websocket_session_round_trips_and_pubnub_records_do_not_carry_one() -> None:
    filters = ["/restapi/v1.0/account/~/extension/~/message-store"]
    position = Position("session-1.41", 41, "sub-2", 1700000000.5, 1700000000)
    state = SpecState("acme/messages", "4001", "sub-2", "websocket", "websocket:acme", position.ordinal, 1.0, "w1",
                      session=recorded_session(position, filters))
    decoded = SpecState.decode(state.encode())
    assert decoded == state
    assert session_of_record(decoded.session) == (position, filters)
    pubnub = SpecState("acme/messages", "4001", "sub-1", "sub-c-1", "ch-1", 5, 1.0, "w1", 2.0, "")
    assert "session" not in json.loads(pubnub.encode())  # readable by workers that predate the field
    assert SpecState.decode(pubnub.encode()).session is None
    assert session_of_record({"wsc": "session-1.41"}) is None  # unreadable: the worker subscribes again
