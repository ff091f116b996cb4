"""`Received`, one per notification on the hot path: immutable (a named tuple: 1.3 us to build against
a frozen dataclass's 4.2, measured in docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ingest.transports.base import Received


@dataclass
class _Stream:
    epoch: int = 0


def test_a_received_notification_cannot_be_changed_and_knows_when_it_was_superseded() -> None:
    stream = _Stream()
    received = Received("ch-1", 17000000000000001, "cipher", stream, stream.epoch)
    with pytest.raises(AttributeError):
        received.payload = "other"  # type: ignore[misc]
    assert not received.superseded()
    stream.epoch += 1  # the channel was rewound
    assert received.superseded()
