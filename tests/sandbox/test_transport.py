"""The worker's PubNub transport (real SDK, batch intake) against the sandbox's PubNub."""

from __future__ import annotations

from typing import Any

from ingest.metrics import Metrics
from ingest.sandbox.server import Sandbox
from ingest.transport import PubNubTransport, Received, TransportSettings

from .conftest import RC, wait_for


def test_payloads_arrive_exactly_in_order_and_signals_are_skipped(sandbox: Sandbox, rc: RC) -> None:
    delivery = rc.subscribe()["deliveryMode"]  # unencrypted: payloads are JSON values, not Base64
    channel, sub_key = delivery["address"], delivery["subscriberKey"]
    got: list[tuple[str, int, Any]] = []

    def handler(batch: list[Received], received_at: float) -> None:
        got.extend((ch, tt, payload) for ch, tt, payload, _cursor, _epoch in batch)

    transport = PubNubTransport(TransportSettings(user_id="test", origin=sandbox.pubnub_origin, ssl=False),
                                handler=handler, metrics=Metrics())
    transport.add_channel(sub_key, channel)
    transport.start()
    try:
        wait_for(lambda: channel in transport.reading())
        # A response of strings only (parsed by orjson), then one with integers beyond 64 bits,
        # which orjson would turn into floats (so the stdlib parses it).
        first = sandbox.pubnub.publish(sub_key, channel, "c3RyaW5n")
        wait_for(lambda: len(got) == 1)
        big = {"n": 123456789012345678901234567890, "negative": -(2**70), "text": "é"}
        second = sandbox.pubnub.publish(sub_key, channel, big)
        sandbox.pubnub.publish(sub_key, channel, "a signal", signal=True)
        third = sandbox.pubnub.publish(sub_key, channel, "bGFzdA==")
        wait_for(lambda: len(got) >= 3)

        assert got == [(channel, first, "c3RyaW5n"), (channel, second, big), (channel, third, "bGFzdA==")]
        assert type(got[1][2]["n"]) is int
    finally:
        transport.stop()
