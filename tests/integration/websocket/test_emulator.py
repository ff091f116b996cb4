"""The sandbox's WebSocket emulator, driven by the real `websockets` client and `requests`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from ingest.sandbox.server import Sandbox
from ingest.sandbox.websocket import WebSocketSettings
from tests.integration.sandbox.conftest import MESSAGE_STORE, PRESENCE, RC
from tests.support.waiting import wait_for

SUBSCRIPTION = "/restapi/v1.0/subscription"


def ws_token(rc: RC) -> dict[str, Any]:
    answer = rc.call("POST", "/restapi/oauth/wstoken")
    assert answer.status_code == 200, answer.text
    token: dict[str, Any] = answer.json()
    return token


@contextmanager
def open_socket(rc: RC, wsc: str | None = None, **options: Any) -> Iterator[tuple[ClientConnection, list[Any]]]:
    """A connection and its first frame (which must be ConnectionDetails); closed on exit."""
    token = ws_token(rc)
    url = f"{token['uri']}?access_token={token['ws_access_token']}" + (f"&wsc={wsc}" if wsc else "")
    with connect(url, proxy=None, open_timeout=10, **options) as conn:
        first = json.loads(conn.recv(timeout=10))
        assert first[0]["type"] == "ConnectionDetails", first
        yield conn, first


def request(conn: ClientConnection, method: str, path: str, body: Any = None) -> list[Any]:
    """One ClientRequest; skips notifications until its answer (same messageId) comes."""
    message_id = f"req-{time.monotonic_ns()}"
    meta = {"type": "ClientRequest", "messageId": message_id, "method": method, "path": path}
    conn.send(json.dumps([meta] if body is None else [meta, body]))
    while True:
        frame = json.loads(conn.recv(timeout=10))
        if frame[0]["type"] == "ClientRequest" and frame[0]["messageId"] == message_id:
            return list(frame)


def subscribe(conn: ClientConnection, filters: list[str] | None = None) -> dict[str, Any]:
    answer = request(conn, "POST", SUBSCRIPTION, {"eventFilters": filters or [MESSAGE_STORE],
                                                  "deliveryMode": {"transportType": "WebSocket"}})
    assert answer[0]["status"] == 200, answer
    info: dict[str, Any] = answer[1]
    assert answer[0]["headers"]["WSG-SubscriptionId"] == info["id"]
    return info


def notifications(conn: ClientConnection, n: int, timeout: float = 10) -> list[list[Any]]:
    out: list[list[Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        frame = json.loads(conn.recv(timeout=max(0.0, deadline - time.monotonic())))
        if frame[0]["type"] == "ServerNotification":
            out.append(frame)
    return out


def uuids(frames: list[list[Any]]) -> list[str]:
    return [f[1]["uuid"] for f in frames]


def test_connection_details_first_then_subscription_and_plaintext_notifications(rc: RC, sandbox: Sandbox) -> None:
    with open_socket(rc) as (conn, details):
        meta, body = details
        assert set(meta["wsc"]) == {"token", "sequence"}
        assert body["recoveryBufferSize"] == 100 and body["recoveryTimeout"] == 180
        assert body["idleTimeout"] == 1800 and body["absoluteTimeout"] == 86400 and body["maxActiveRequests"] == 10
        assert "recoveryState" not in body  # only a reconnect with a wsc has one
        info = subscribe(conn, [MESSAGE_STORE, PRESENCE])
        assert info["deliveryMode"] == {"transportType": "WebSocket", "encryption": False}  # presence too
        assert len(info["eventFilters"]) == 2
        published = sandbox.generator.publish(5)
        frames = notifications(conn, 5)
        assert uuids(frames) == [g.uuid for g in published]
        assert [f[1] for f in frames] == [g.payload for g in published]  # the plain envelope, no encryption
        sequences = [f[0]["wsc"]["sequence"] for f in frames]
        assert sequences == sorted(sequences) and [g.timetoken for g in published] == sequences
        assert all(f[1]["subscriptionId"] == info["id"] for f in frames if "subscriptionId" in f[1])


def test_token_is_single_use_and_refused_tokens_fail_the_handshake(rc: RC) -> None:
    token = ws_token(rc)
    url = f"{token['uri']}?access_token={token['ws_access_token']}"
    with connect(url, proxy=None) as conn:
        assert json.loads(conn.recv(timeout=10))[0]["type"] == "ConnectionDetails"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, proxy=None)
    assert refused.value.response.status_code == 401
    assert token["expires_in"] == 30


def test_wstoken_refusal_fault_and_bearer_required(rc: RC, sandbox: Sandbox) -> None:
    sandbox.faults.rc_error("wstoken", 429, count=1, retry_after=7)
    refused = rc.call("POST", "/restapi/oauth/wstoken")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "7"
    sandbox.faults.rc_error("wstoken", 401, count=1)
    assert rc.call("POST", "/restapi/oauth/wstoken").status_code == 401
    anonymous = requests.post(f"{sandbox.rc_url}/restapi/oauth/wstoken", timeout=5)
    assert anonymous.status_code == 401
    assert rc.call("POST", "/restapi/oauth/wstoken").status_code == 200


def test_a_frame_before_connection_details_is_an_error(rc: RC, make_sandbox: Any) -> None:
    token = ws_token(rc)
    with connect(f"{token['uri']}?access_token={token['ws_access_token']}", proxy=None) as conn:
        conn.send(json.dumps([{"type": "Heartbeat", "messageId": "too-early"}]))
        frame = json.loads(conn.recv(timeout=10))
        assert frame[0]["type"] == "Error" and frame[1]["errorCode"] == "WSG-905"
        with pytest.raises(ConnectionClosed):
            conn.recv(timeout=10)


def test_heartbeat_is_answered_and_one_subscription_per_connection(rc: RC, sandbox: Sandbox) -> None:
    with open_socket(rc) as (conn, _):
        conn.send(json.dumps([{"type": "Heartbeat", "messageId": "hb-1"}]))
        answer = json.loads(conn.recv(timeout=10))
        assert answer[0]["type"] == "Heartbeat" and answer[0]["messageId"] == "hb-1"
        first = subscribe(conn)
        second = subscribe(conn, [PRESENCE])
        status = {s.id: s.status for s in sandbox.rc.subscriptions()}
        assert status[first["id"]] == "Deleted" and status[second["id"]] == "Active"
        updated = request(conn, "PUT", f"{SUBSCRIPTION}/{second['id']}", {"eventFilters": [MESSAGE_STORE]})
        assert updated[0]["status"] == 200 and updated[1]["eventFilters"][0].endswith("/message-store")
        assert request(conn, "DELETE", f"{SUBSCRIPTION}/{second['id']}")[0]["status"] == 204
        assert request(conn, "GET", f"{SUBSCRIPTION}/{second['id']}")[0]["status"] == 404
        assert request(conn, "GET", "/restapi/v1.0/account/~")[0]["status"] == 404


def test_client_requests_share_the_rest_faults_and_rate_limits(rc: RC, sandbox: Sandbox) -> None:
    with open_socket(rc) as (conn, _):
        sandbox.faults.rc_error("create", 429, count=1, retry_after=5)
        limited = request(conn, "POST", SUBSCRIPTION, {"eventFilters": [MESSAGE_STORE],
                                                       "deliveryMode": {"transportType": "WebSocket"}})
        assert limited[0]["status"] == 429 and limited[0]["headers"]["Retry-After"] == "5"
        assert limited[1]["errorCode"] == "CMN-301"
        pubnub_mode = request(conn, "POST", SUBSCRIPTION, {"eventFilters": [MESSAGE_STORE],
                                                           "deliveryMode": {"transportType": "PubNub"}})
        assert pubnub_mode[0]["status"] == 400
        sandbox.faults.expire_access_tokens()
        expired = request(conn, "POST", SUBSCRIPTION, {"eventFilters": [MESSAGE_STORE],
                                                       "deliveryMode": {"transportType": "WebSocket"}})
        assert expired[0]["status"] == 401


def test_requests_beyond_max_active_requests_are_refused(make_sandbox: Any) -> None:
    sandbox = make_sandbox(websocket=WebSocketSettings(max_active_requests=2, request_delay=0.2))
    client = RC(sandbox, sandbox.accounts[0])
    client.login()
    with open_socket(client) as (conn, details):
        assert details[1]["maxActiveRequests"] == 2
        for n in range(3):  # three in flight together
            conn.send(json.dumps([{"type": "ClientRequest", "messageId": f"list-{n}", "method": "GET",
                                   "path": SUBSCRIPTION}]))
        answers = {a[0]["messageId"]: a for a in (json.loads(conn.recv(timeout=10)) for _ in range(3))}
        assert [answers[f"list-{n}"][0]["status"] for n in range(3)] == [200, 200, 429]
        assert answers["list-2"][1]["errorCode"] == "WSG-906"
        assert request(conn, "GET", SUBSCRIPTION)[0]["status"] == 200  # one at a time is never refused
    assert sandbox.websocket.stats()["requests_refused"] == 1


def test_recovery_replays_what_was_missed_within_the_timeout(rc: RC, sandbox: Sandbox) -> None:
    with open_socket(rc) as (conn, details):
        info = subscribe(conn)
        before = sandbox.generator.publish(4)
        frames = notifications(conn, 4)
        assert uuids(frames) == [g.uuid for g in before]
        assert details[0]["wsc"]["sequence"] == 0 and [f[0]["wsc"]["sequence"] for f in frames] == [1, 2, 3, 4]
        wsc = frames[1][0]["wsc"]["token"]  # as if the client had handed on only the first two
        assert sandbox.faults.ws_drop_connections() == 1
        with pytest.raises(ConnectionClosed):
            conn.recv(timeout=10)
    wait_for(lambda: sandbox.websocket.stats()["connections"] == 0)
    missed = sandbox.generator.publish(6)  # buffered while nobody is connected
    assert len(missed) == 6
    with open_socket(rc, wsc) as (conn, details):
        assert details[1]["recoveryState"] == "Successful"
        assert details[0]["wsc"]["token"] == wsc and details[0]["wsc"]["sequence"] == 2
        # What came after the position the wsc names: the last 2 read before the drop, then the missed.
        assert uuids(notifications(conn, 2 + 6)) == [g.uuid for g in before[2:] + missed]
        live = sandbox.generator.publish(2)
        assert uuids(notifications(conn, 2)) == [g.uuid for g in live]
        assert {s.id: s.status for s in sandbox.rc.subscriptions()}[info["id"]] == "Active"


def test_recovery_buffer_keeps_the_newest_100(rc: RC, sandbox: Sandbox) -> None:
    with open_socket(rc) as (conn, details):
        subscribe(conn)
        sandbox.faults.ws_drop_connections()
    wait_for(lambda: sandbox.websocket.stats()["connections"] == 0)
    missed = sandbox.generator.publish(130)
    with open_socket(rc, details[0]["wsc"]["token"]) as (conn, again):
        assert again[1]["recoveryState"] == "Successful"
        assert uuids(notifications(conn, 100)) == [g.uuid for g in missed[30:]]
        assert sandbox.websocket.stats()["lost"] == 30  # the recovery knows what the buffer no longer held


def test_failed_recovery_is_a_new_session_and_the_old_subscription_is_gone(rc: RC, sandbox: Sandbox) -> None:
    with open_socket(rc) as (conn, details):
        info = subscribe(conn)
    wait_for(lambda: sandbox.websocket.stats()["connections"] == 0)
    sandbox.faults.ws_fail_recovery(count=1)
    with open_socket(rc, details[0]["wsc"]["token"]) as (conn, again):
        assert again[1]["recoveryState"] == "Failed" and again[1]["recoveryErrorCode"] == "WSG-904"
        assert again[0]["wsc"]["token"] != details[0]["wsc"]["token"]
        assert {s.id: s.status for s in sandbox.rc.subscriptions()}[info["id"]] == "Deleted"
        assert subscribe(conn)["id"] != info["id"]


def test_session_ends_after_the_recovery_timeout(rc: RC, make_sandbox: Any) -> None:
    sb = make_sandbox(websocket=WebSocketSettings(recovery_timeout=0.5))
    client = RC(sb, sb.accounts[0])
    client.login()
    with open_socket(client) as (conn, details):
        info = subscribe(conn)
    wait_for(lambda: {s.id: s.status for s in sb.rc.subscriptions()}[info["id"]] == "Deleted")
    with open_socket(client, details[0]["wsc"]["token"]) as (conn, again):
        assert again[1]["recoveryState"] == "Failed"


def test_idle_and_absolute_timeouts_close_with_their_codes(rc: RC, make_sandbox: Any) -> None:
    sb = make_sandbox(websocket=WebSocketSettings(idle_timeout=0.5))
    client = RC(sb, sb.accounts[0])
    client.login()
    with open_socket(client) as (conn, _):
        frame = json.loads(conn.recv(timeout=10))
        assert frame[0]["type"] == "Error" and frame[1]["errorCode"] == "WSG-902"
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.reason == "WSG-902"
    with open_socket(client) as (conn, _):
        assert sb.faults.ws_close("WSG-903") == 1
        frame = json.loads(conn.recv(timeout=10))
        assert frame[1]["errorCode"] == "WSG-903"


def test_stalled_connection_stops_answering_pings(rc: RC, sandbox: Sandbox) -> None:
    with open_socket(rc, ping_interval=None) as (conn, _):
        subscribe(conn)
        assert conn.ping().wait(5)
        sandbox.faults.ws_stall()
        sandbox.generator.publish(3)
        assert not conn.ping().wait(1.0)  # no pong, no notification
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0.2)
        assert sandbox.websocket.stats()["buffered"] == 3


def test_server_sends_rfc6455_pings(make_sandbox: Any) -> None:
    sb = make_sandbox(websocket=WebSocketSettings(ping_interval=0.2, pong_timeout=5))
    client = RC(sb, sb.accounts[0])
    client.login()
    frames = _FrameLog()
    logger = logging.getLogger("test.websocket.frames")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(frames)
    try:
        with open_socket(client, ping_interval=None, logger=logger):
            wait_for(lambda: frames.count("< PING") >= 2 and frames.count("> PONG") >= 2, timeout=10)
    finally:
        logger.removeHandler(frames)


class _FrameLog(logging.Handler):
    """The `websockets` debug log of one connection: `< PING ...` is a frame received, `> PONG` one sent."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, prefix: str) -> int:
        return sum(1 for line in list(self.lines) if line.startswith(prefix))
