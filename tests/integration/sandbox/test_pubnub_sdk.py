"""The PubNub emulator through the real `pubnub` SDK (native PubNub, ssl=False, origin=127.0.0.1:PORT)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ingest.data.crypto import Cipher
from ingest.sandbox.server import Sandbox
from tests.support import holds, wait_for

from .conftest import MESSAGE_STORE, PRESENCE, RC, Listener

MakeClient = Callable[..., tuple[Any, Listener]]


def _connected(listener: Listener) -> bool:
    return "PNConnectedCategory" in listener.categories()


def test_handshake_and_delivery_on_multiplexed_channels(sandbox: Sandbox, make_client: MakeClient) -> None:
    subs = []
    for account in sandbox.accounts:
        client = RC(sandbox, account)
        client.login()
        subs.append(client.subscribe([MESSAGE_STORE]))
    channels = [s["deliveryMode"]["address"] for s in subs]
    pubnub, listener = make_client(sandbox)
    pubnub.subscribe().channels(channels).execute()
    wait_for(lambda: _connected(listener))

    generated = sandbox.generator.publish(12)
    assert {g.channel for g in generated} == set(channels)
    wait_for(lambda: len(listener.received()) >= 12)
    received = listener.received()
    assert len(received) == 12
    by_tt = {m.timetoken: m for m in received}
    for g in generated:
        message = by_tt[g.timetoken]
        assert message.channel == g.channel
        assert message.message == g.payload  # unencrypted: the notification object itself
        assert message.message["uuid"] == g.uuid
    assert [m.timetoken for m in received] == sorted(m.timetoken for m in received)


def test_catch_up_from_an_older_timetoken(sandbox: Sandbox, rc: RC, make_client: MakeClient) -> None:
    sub = rc.subscribe([PRESENCE])
    before = sandbox.generator.publish(2)
    missed = sandbox.generator.publish(5)
    pubnub, listener = make_client(sandbox)
    # Resume from the checkpoint after the first two: exactly the five later ones are replayed.
    pubnub.subscribe().channels([sub["deliveryMode"]["address"]]).with_timetoken(before[-1].timetoken).execute()
    wait_for(lambda: len(listener.received()) >= 5)
    received = listener.received()
    assert [m.timetoken for m in received] == [g.timetoken for g in missed]
    cipher = Cipher(sub["deliveryMode"]["encryptionKey"])
    assert [cipher.decrypt(m.message) for m in received] == [g.plaintext for g in missed]


def test_loss_past_the_buffer_limit_is_detectable(make_sandbox: Callable[..., Sandbox],
                                                  make_client: MakeClient) -> None:
    sb = make_sandbox(buffer_size=10)
    client = RC(sb, sb.accounts[0])
    client.login()
    sub = client.subscribe()
    generated = sb.generator.publish(15)
    checkpoint = generated[0].timetoken - 1
    stats = sb.pubnub.stats(sb.subscriber_key)
    assert stats.dropped_overflow == 5
    assert stats.oldest_timetoken == generated[5].timetoken  # > checkpoint: the gap is visible
    pubnub, listener = make_client(sb)
    pubnub.subscribe().channels([sub["deliveryMode"]["address"]]).with_timetoken(checkpoint).execute()
    wait_for(lambda: len(listener.received()) >= 10)
    received = listener.received()
    assert [m.timetoken for m in received] == [g.timetoken for g in generated[5:]]
    # A client that knows its checkpoint sees the loss: the first replayed message is not the next one.
    assert received[0].message["uuid"] != generated[0].uuid


def test_reconnect_after_injected_500s(sandbox: Sandbox, rc: RC, make_client: MakeClient) -> None:
    channel = rc.subscribe()["deliveryMode"]["address"]
    pubnub, listener = make_client(sandbox)
    pubnub.subscribe().channels([channel]).execute()
    wait_for(lambda: _connected(listener))
    sandbox.faults.pubnub_error(500, count=3)
    wait_for(lambda: "PNUnknownCategory" in listener.categories())
    during = sandbox.generator.publish(2)  # published while the client is failing
    wait_for(lambda: "PNReconnectedCategory" in listener.categories())
    wait_for(lambda: len(listener.received()) >= 2)
    assert [m.timetoken for m in listener.received()] == [g.timetoken for g in during]
    assert sandbox.book.fired["pubnub-error"] == 3


def test_permanent_stop_after_403(sandbox: Sandbox, rc: RC, make_client: MakeClient) -> None:
    channel = rc.subscribe()["deliveryMode"]["address"]
    pubnub, listener = make_client(sandbox)
    pubnub.subscribe().channels([channel]).execute()
    wait_for(lambda: _connected(listener))
    sandbox.faults.pubnub_error(403, count=1)
    status = wait_for(lambda: [s for s in listener.statuses if s.category.name == "PNAccessDeniedCategory"])[0]
    assert status.status_code == 403
    # No retry: over several hold periods no poll arrives and a later message is never delivered.
    polls = sandbox.pubnub.polls
    sandbox.generator.publish(1)
    assert holds(lambda: sandbox.pubnub.polls == polls and not listener.received(), seconds=2.0)
    assert pubnub.get_subscribed_channels() == []


def test_dropped_connection_then_recovery(sandbox: Sandbox, rc: RC, make_client: MakeClient) -> None:
    channel = rc.subscribe()["deliveryMode"]["address"]
    pubnub, listener = make_client(sandbox)
    pubnub.subscribe().channels([channel]).execute()
    wait_for(lambda: _connected(listener))
    sandbox.faults.pubnub_drop_connections(1)
    wait_for(lambda: "PNUnexpectedDisconnectCategory" in listener.categories())
    generated = sandbox.generator.publish(1)
    wait_for(lambda: len(listener.received()) == 1)
    assert listener.received()[0].timetoken == generated[0].timetoken


def test_stalled_poll_is_re_polled_silently(sandbox: Sandbox, rc: RC, make_client: MakeClient) -> None:
    channel = rc.subscribe()["deliveryMode"]["address"]
    pubnub, listener = make_client(sandbox, subscribe_request_timeout=1)
    pubnub.subscribe().channels([channel]).execute()
    wait_for(lambda: _connected(listener))
    sandbox.faults.pubnub_stall(3.0)
    wait_for(lambda: sandbox.book.fired.get("pubnub-stall") == 1)
    generated = sandbox.generator.publish(1)
    wait_for(lambda: len(listener.received()) == 1)
    assert listener.received()[0].timetoken == generated[0].timetoken
    assert [c for c in listener.categories() if c != "PNConnectedCategory"] == []  # a timeout is silent


def test_sdk_publish_get_and_post(sandbox: Sandbox, make_client: MakeClient) -> None:
    pubnub, listener = make_client(sandbox)
    pubnub.subscribe().channels(["ch.a", "ch/b"]).execute()
    wait_for(lambda: _connected(listener))
    first = pubnub.publish().channel("ch.a").message({"hello": "world"}).sync()
    second = pubnub.publish().channel("ch/b").message(["x", 1]).use_post(True).sync()
    wait_for(lambda: len(listener.received()) == 2)
    got = {m.channel: m for m in listener.received()}
    assert got["ch.a"].message == {"hello": "world"}
    assert got["ch.a"].timetoken == first.result.timetoken
    assert got["ch/b"].message == ["x", 1]
    assert got["ch/b"].timetoken == second.result.timetoken
    assert got["ch.a"].publisher == pubnub.config.user_id


def test_time_endpoint_and_give_up_when_time_fails(sandbox: Sandbox, rc: RC, make_client: MakeClient) -> None:
    pubnub, listener = make_client(sandbox, maximum_reconnection_retries=2)
    assert int(pubnub.time().sync().result) > 10**16
    channel = rc.subscribe()["deliveryMode"]["address"]
    pubnub.subscribe().channels([channel]).execute()
    wait_for(lambda: _connected(listener))
    sandbox.faults.pubnub_time_fail(seconds=30)
    sandbox.faults.pubnub_error(500, seconds=30)
    wait_for(lambda: "PNDisconnectedCategory" in listener.categories(), timeout=20)
    assert sandbox.book.fired["pubnub-time-fail"] >= 1
