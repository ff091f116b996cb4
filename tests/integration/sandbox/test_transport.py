"""The worker's PubNub transport (real SDK, batch intake) against the sandbox's PubNub."""

from __future__ import annotations

import threading
from typing import Any

from ingest.observability.metrics import Metrics
from ingest.sandbox.server import Sandbox
from ingest.transports.pubnub import PubNubTransport, Received, TransportSettings
from tests.support import wait_for

from .conftest import RC


def test_payloads_arrive_exactly_in_order_and_signals_are_skipped(sandbox: Sandbox, rc: RC) -> None:
    delivery = rc.subscribe()["deliveryMode"]  # unencrypted: payloads are JSON values, not Base64
    channel, sub_key = delivery["address"], delivery["subscriberKey"]
    got: list[tuple[str, int, Any]] = []

    def handler(batch: list[Received], received_at: float) -> None:
        got.extend((r.channel, r.position, r.payload) for r in batch)

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


def test_a_channel_moved_to_a_new_connection_is_handed_on_in_order(sandbox: Sandbox, rc: RC) -> None:
    """The old connection may still be handing on a batch when its channel's new connection reads the
    next one; the newer batch must wait. (Run side by side, the newer notifications reached Kafka
    first and the checkpoint passed the older ones still in flight.)"""
    delivery = rc.subscribe()["deliveryMode"]
    channel, sub_key = delivery["address"], delivery["subscriberKey"]
    other = rc.subscribe()["deliveryMode"]
    assert other["subscriberKey"] == sub_key
    calls: list[list[int]] = []
    first_call_entered, release_first_call, second_call = threading.Event(), threading.Event(), threading.Event()

    def handler(batch: list[Received], received_at: float) -> None:
        calls.append([r.position for r in batch if r.channel == channel])
        if len(calls) == 1:  # the old connection, stalled (a loaded machine) while handing on
            first_call_entered.set()
            release_first_call.wait(30)
        else:
            second_call.set()

    transport = PubNubTransport(TransportSettings(user_id="test", origin=sandbox.pubnub_origin, ssl=False),
                                handler=handler, metrics=Metrics())
    transport.add_channel(sub_key, channel)
    transport.start()
    try:
        wait_for(lambda: channel in transport.reading())
        older = sandbox.pubnub.publish(sub_key, channel, "b2xkZXI=")
        assert first_call_entered.wait(30)
        # A second channel replaces the connection; the new one resumes after `older` and reads `newer`.
        transport.add_channel(sub_key, other["address"])
        wait_for(lambda: {channel, other["address"]} <= transport.reading(), 30)
        newer = sandbox.pubnub.publish(sub_key, channel, "bmV3ZXI=")
        # The newer batch must not be handed on while the older one still is (a bounded wait for an
        # absence: with the old code it arrived within milliseconds).
        handed_on_early = second_call.wait(3)
        release_first_call.set()
        wait_for(second_call.is_set, 30)
        assert not handed_on_early, f"a newer batch was handed on beside an older one: {calls}"
        assert [tt for call in calls for tt in call] == [older, newer]
    finally:
        release_first_call.set()
        transport.stop()


def _threads_started_since(before: set[threading.Thread]) -> int:
    """Threads started since `before`, but the in-process sandbox's (one per HTTP connection it serves)."""
    return sum(1 for t in threading.enumerate()
               if t not in before and not t.name.endswith("(process_request_thread)"))


def _threads_reading(sandbox: Sandbox, channels: int) -> int:
    """How many threads a transport started to read `channels` channels (50 per connection)."""
    before = set(threading.enumerate())
    transport = PubNubTransport(TransportSettings(user_id="test", origin=sandbox.pubnub_origin, ssl=False),
                                handler=lambda batch, received_at: None, metrics=Metrics())
    for i in range(channels):
        transport.add_channel("sub-c-threads", f"threads-{channels}-{i}")
    transport.start()
    try:
        wait_for(lambda: len(transport.reading()) == channels, 60, what=f"{channels} channels read")
        assert transport.connection_count == channels // 50
        return _threads_started_since(before)
    finally:
        transport.stop()


def test_the_transport_threads_do_not_grow_with_the_channels(sandbox: Sandbox) -> None:
    """1 connection (50 channels) and 10 connections (500): the same few threads. The SDK's threaded
    client ran several per connection (380 at 2,000 subscriptions, docs/benchmarks.md)."""
    threads = {channels: _threads_reading(sandbox, channels) for channels in (50, 500)}
    assert threads[500] == threads[50] <= 3, f"threads started per channel count: {threads}"
