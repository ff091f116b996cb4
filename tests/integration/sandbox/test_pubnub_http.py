"""The PubNub emulator's wire protocol, checked with plain `requests` (reference pubnub-protocol.md §2-§4, §8)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import requests

from ingest.sandbox.server import Sandbox
from tests.support import holds, wait_for


def poll(sb: Sandbox, channels: str, tt: int | str | None = None, **params: Any) -> requests.Response:
    query = dict(params)
    if tt is not None:
        query["tt"] = tt
    return requests.get(f"http://{sb.pubnub_origin}/v2/subscribe/{sb.subscriber_key}/{channels}/0",
                        params=query, timeout=10)


def publish(sb: Sandbox, channel: str, message: Any) -> int:
    answer = requests.post(f"http://{sb.pubnub_origin}/publish/pk/{sb.subscriber_key}/0/{quote(channel, safe='')}/0",
                           json=message, timeout=10)
    assert answer.status_code == 200
    body = answer.json()
    assert body[:2] == [1, "Sent"]
    return int(body[2])


def test_handshake_is_immediate_and_carries_no_buffered_messages(sandbox: Sandbox) -> None:
    publish(sandbox, "a", {"n": 1})
    began = time.monotonic()
    answer = poll(sandbox, "a", 0, uuid="w", pnsdk="PubNub-Python/10.4.0", ee="", heartbeat=300, unknown="x")
    assert time.monotonic() - began < 0.4  # not held
    body = answer.json()
    assert body["m"] == []
    assert isinstance(body["t"]["r"], int)
    assert len(body["t"]["t"]) == 17 and body["t"]["t"].isdigit()
    assert poll(sandbox, "a").json()["m"] == []  # no tt at all is a handshake too


def test_envelope_shape_and_strictly_monotonic_timetokens(sandbox: Sandbox) -> None:
    cursor = int(poll(sandbox, "a,b", 0).json()["t"]["t"])
    tts = [publish(sandbox, "a" if i % 2 else "b", {"n": i}) for i in range(20)]
    assert tts == sorted(tts) and len(set(tts)) == 20
    assert all(t > cursor for t in tts)
    body = poll(sandbox, "a,b", cursor).json()
    assert [int(m["p"]["t"]) for m in body["m"]] == tts
    first = body["m"][0]
    assert set(first) >= {"a", "f", "p", "k", "c", "d"}
    assert first["k"] == sandbox.subscriber_key and first["c"] == "b" and first["d"] == {"n": 0}
    assert isinstance(first["p"]["r"], int) and isinstance(first["f"], int)
    assert int(body["t"]["t"]) > tts[-1]


def test_only_requested_channels_and_only_newer_than_tt(sandbox: Sandbox) -> None:
    t1 = publish(sandbox, "a", 1)
    publish(sandbox, "b", 2)
    t3 = publish(sandbox, "a", 3)
    body = poll(sandbox, "a", t1).json()
    assert [int(m["p"]["t"]) for m in body["m"]] == [t3]
    encoded = poll(sandbox, "x,ch%2Fslash", t1 - 1).json()  # URL-encoded names are decoded
    assert encoded["m"] == []
    t4 = publish(sandbox, "ch/slash", "s")
    assert [m["c"] for m in poll(sandbox, "x,ch%2Fslash", t1).json()["m"]] == ["ch/slash"]
    assert t4 > t3


def test_held_poll_returns_its_own_tt_when_nothing_arrives(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(pubnub_hold_seconds=0.6)
    tt = int(poll(sb, "a", 0).json()["t"]["t"])
    began = time.monotonic()
    body = poll(sb, "a", tt).json()
    assert time.monotonic() - began >= 0.55
    assert body == {"t": {"t": str(tt), "r": body["t"]["r"]}, "m": []}


def test_held_polls_wake_on_publish_and_concurrent_polls_each_get_it(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(pubnub_hold_seconds=20)
    tt = int(poll(sb, "a", 0).json()["t"]["t"])
    answers: list[dict[str, Any]] = []

    def hold() -> None:
        answers.append(poll(sb, "a", tt, uuid="same-client").json())

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: sb.pubnub.polls >= 4)
    began = time.monotonic()
    sent = publish(sb, "a", {"x": 1})
    for t in threads:
        t.join(5)
    assert time.monotonic() - began < 2
    assert len(answers) == 3
    assert all([int(m["p"]["t"]) for m in a["m"]] == [sent] for a in answers)


def test_capped_response_continues_from_the_last_returned_message(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(buffer_size=50, max_messages_per_response=7)
    start = int(poll(sb, "a", 0).json()["t"]["t"])
    tts = [publish(sb, "a", i) for i in range(20)]
    seen: list[int] = []
    tt = start
    while len(seen) < 20:
        body = poll(sb, "a", tt).json()
        got = [int(m["p"]["t"]) for m in body["m"]]
        assert 0 < len(got) <= 7
        if len(got) == 7 and len(seen) + 7 < 20:
            assert int(body["t"]["t"]) == got[-1]
        seen += got
        tt = int(body["t"]["t"])
    assert seen == tts


def test_buffer_overflow_and_ttl_are_observable(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(buffer_size=5, buffer_ttl=0.5)
    start = int(poll(sb, "a", 0).json()["t"]["t"])
    tts = [publish(sb, "a", i) for i in range(8)]
    stats = sb.pubnub.stats(sb.subscriber_key)
    assert (stats.buffered, stats.dropped_overflow, stats.oldest_timetoken) == (5, 3, tts[3])
    assert [int(m["p"]["t"]) for m in poll(sb, "a", start).json()["m"]] == tts[3:]
    wait_for(lambda: sb.pubnub.stats(sb.subscriber_key).dropped_expired == 5, timeout=3)
    assert poll(sb, "a", start).json()["m"] == []
    late = publish(sb, "a", "late")
    assert sb.faults.pubnub_overflow() == 1
    stats = sb.pubnub.stats(sb.subscriber_key)
    assert stats.oldest_timetoken is not None and stats.oldest_timetoken > late
    assert poll(sb, "a", start).json()["m"] == []


def test_close_releases_held_polls(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(pubnub_hold_seconds=60)
    tt = int(poll(sb, "a", 0).json()["t"]["t"])
    answers: list[Any] = []

    def hold() -> None:
        try:
            answers.append(poll(sb, "a", tt).json())
        except requests.RequestException as exc:
            answers.append(exc)

    t = threading.Thread(target=hold)
    t.start()
    wait_for(lambda: sb.pubnub.polls >= 2)
    began = time.monotonic()
    sb.close()
    t.join(5)
    assert time.monotonic() - began < 3
    assert answers and answers[0] == {"t": {"t": str(tt), "r": answers[0]["t"]["r"]}, "m": []}


def test_client_disconnect_mid_poll_is_tolerated(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(pubnub_hold_seconds=1.0)
    tt = int(poll(sb, "a", 0).json()["t"]["t"])
    with contextlib.suppress(requests.Timeout):
        requests.get(f"http://{sb.pubnub_origin}/v2/subscribe/{sb.subscriber_key}/a/0", params={"tt": tt},
                     timeout=0.2)
    wait_for(lambda: sb.pubnub.polls >= 2)
    sent = publish(sb, "a", 1)  # the abandoned poll is answered into a closed socket
    assert [int(m["p"]["t"]) for m in poll(sb, "a", tt).json()["m"]] == [sent]


def test_time_leave_heartbeat_and_get_publish(sandbox: Sandbox) -> None:
    base = f"http://{sandbox.pubnub_origin}"
    now = requests.get(f"{base}/time/0", timeout=5).json()
    assert isinstance(now, list) and isinstance(now[0], int) and len(str(now[0])) == 17
    leave = requests.get(f"{base}/v2/presence/sub-key/{sandbox.subscriber_key}/channel/a,b/leave", timeout=5)
    assert leave.json() == {"status": 200, "message": "OK", "action": "leave", "service": "Presence"}
    beat = requests.get(f"{base}/v2/presence/sub-key/{sandbox.subscriber_key}/channel/a/heartbeat",
                        params={"heartbeat": 300}, timeout=5)
    assert beat.json() == {"status": 200, "message": "OK", "service": "Presence"}
    sent = requests.get(f"{base}/publish/pk/{sandbox.subscriber_key}/0/a/0/%7B%22hello%22%3A%20%22world%22%7D",
                        params={"uuid": "pub-1", "meta": '{"m":1}'}, timeout=5).json()
    body = poll(sandbox, "a", int(sent[2]) - 1).json()
    assert body["m"][0]["d"] == {"hello": "world"}
    assert body["m"][0]["i"] == "pub-1" and body["m"][0]["u"] == {"m": 1}


def test_publish_over_32_kib_is_refused(sandbox: Sandbox) -> None:
    answer = requests.post(f"http://{sandbox.pubnub_origin}/publish/pk/{sandbox.subscriber_key}/0/a/0",
                           json="x" * 33000, timeout=5)
    assert answer.status_code == 400 and answer.json()[:2] == [0, "Message Too Large"]


def test_injected_errors_have_pubnub_bodies(sandbox: Sandbox) -> None:
    sandbox.faults.pubnub_error(403, count=1)
    denied = poll(sandbox, "a,b", 0)
    assert denied.status_code == 403
    assert denied.json() == {"message": "Forbidden", "payload": {"channels": ["a", "b"]}, "error": True,
                             "service": "Access Manager", "status": 403}
    sandbox.faults.pubnub_error(500, count=1, channel="zzz")
    assert poll(sandbox, "a", 0).status_code == 200  # armed for another channel
    assert poll(sandbox, "zzz", 0).status_code == 500
    sandbox.faults.pubnub_time_fail(count=1)
    assert requests.get(f"http://{sandbox.pubnub_origin}/time/0", timeout=5).status_code == 500
    assert requests.get(f"http://{sandbox.pubnub_origin}/time/0", timeout=5).status_code == 200
    sandbox.faults.pubnub_drop_connections(1)
    try:
        poll(sandbox, "a", 0)
        raise AssertionError("the connection should have been dropped")
    except requests.ConnectionError:
        pass


def test_publish_many_wakes_only_the_polls_of_its_channels_with_the_whole_batch(
        make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(pubnub_hold_seconds=20)
    tt = int(poll(sb, "a,b", 0).json()["t"]["t"])
    answers: dict[str, dict[str, Any]] = {}

    def hold(channel: str) -> None:
        answers[channel] = poll(sb, channel, tt).json()

    threads = {c: threading.Thread(target=hold, args=(c,)) for c in ("a", "b")}
    for t in threads.values():
        t.start()
    wait_for(lambda: sb.pubnub.polls >= 3)
    served = sb.pubnub.messages_served
    last = sb.pubnub.publish_many(sb.subscriber_key, [("a", '{"n":1}'), ("c", '"elsewhere"'), ("a", '{"n":2}')])
    threads["a"].join(5)
    assert [m["d"] for m in answers["a"]["m"]] == [{"n": 1}, {"n": 2}]  # one answer: the batch was buffered whole
    assert int(answers["a"]["m"][-1]["p"]["t"]) == last
    assert holds(lambda: "b" not in answers, 0.5)  # nothing for b: its poll is still held
    sent = publish(sb, "b", "for b")
    threads["b"].join(5)
    assert [(m["d"], int(m["p"]["t"])) for m in answers["b"]["m"]] == [("for b", sent)]
    assert sb.pubnub.messages_served == served + 3
