"""State records are written about once per notification when traffic is sparse (each spec's checkpoint
moves every interval): their encoding is on the worker's hot path (orjson, its cost measured in
docs/benchmarks.md, not asserted here), and its format must not change."""

from __future__ import annotations

import json
from dataclasses import asdict

from ingest.coordination.state import RecordedChannel, SpecState

DRAINING = (RecordedChannel("sub-1", "sub-c-1", "ch-1", 17000000000000000, "v1.wrapped"),)


def _record(**changes: object) -> SpecState:
    base = SpecState("acme/messages", "4001", "sub-2", "sub-c-1", "ch-2", 17000000010000000, 1733100000.25, "w1",
                     1733100900.5, "v1.wrapped-key", DRAINING, "v1.wrapped-token")
    return SpecState(**{**asdict(base), "draining": base.draining, **changes})  # type: ignore[arg-type]


def _stdlib(state: SpecState) -> bytes:
    """What the records were before (and what older workers decode): compact stdlib JSON of asdict."""
    values = asdict(state)
    for optional in ("session", "creating_since"):
        if values[optional] is None:
            del values[optional]
    return json.dumps(values, separators=(",", ":")).encode()


def test_a_state_record_is_encoded_byte_for_byte_as_before() -> None:
    for state in [_record(), _record(draining=(), wrapped_key=None, wrapped_verification_token=None),
                  _record(session={"wsc": {"token": "t", "sequence": 7}, "ordinal": 12}),
                  _record(creating_since=1733100001.5)]:
        assert state.encode() == _stdlib(state)
        assert SpecState.decode(state.encode()) == state


def test_values_orjson_refuses_are_still_encoded() -> None:
    state = _record(session={"beyond-64-bits": 2**70})
    assert SpecState.decode(state.encode()) == state
