"""The intent in a state record (`creating_since`): written only while a creation is pending."""

from __future__ import annotations

import json

from ingest.coordination.state import SpecState


def test_an_intent_round_trips_and_a_record_without_one_does_not_carry_the_field() -> None:
    pending = SpecState("acme/messages", "4001", "sub-1", "sub-c-1", "ch-1", 5, 1.0, "w1", 2.0, "",
                        creating_since=1700000000.25)
    assert SpecState.decode(pending.encode()) == pending
    settled = SpecState("acme/messages", "4001", "sub-2", "sub-c-1", "ch-2", 5, 1.0, "w1", 2.0, "")
    assert "creating_since" not in json.loads(settled.encode())  # readable by workers that predate the field
    assert SpecState.decode(settled.encode()).creating_since is None
