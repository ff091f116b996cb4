"""The sandbox's WebHook mode keeps RingCentral's rules: the validation request at creation (200, the
header echoed, within 3 s, at most 1 KiB) and the delivery POSTs (headers, token, retries)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from ingest.sandbox.server import Sandbox, SandboxSettings
from tests.integration.sandbox.conftest import RC
from tests.support.waiting import wait_for

MESSAGES = "/restapi/v1.0/account/~/extension/~/message-store"
TOKEN = "vt-sandbox-test-token-0123456789"


class _Endpoint(BaseHTTPRequestHandler):
    """A subscriber's endpoint whose behaviour is chosen by the path; it records what it received."""

    protocol_version = "HTTP/1.1"
    received: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.received.append((self.path, dict(self.headers), body))
        echo = self.headers.get("Validation-Token", "")
        if self.path == "/slow":
            time.sleep(3.5)
        self.send_response(503 if self.path == "/down" and body else 200)
        if self.path != "/no-echo":
            self.send_header("Validation-Token", echo)
        if self.path == "/big":
            self.send_header("X-Padding", "p" * 1100)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    _Endpoint.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def sandbox_rc() -> Iterator[RC]:
    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.2)) as sb:
        sb.rc.webhooks.settings.retry_interval = 0.1
        client = RC(sb, sb.accounts[0])
        client.login()
        yield client


def _create(rc: RC, address: str, **mode: Any) -> requests.Response:
    return rc.call("POST", "/restapi/v1.0/subscription", json={
        "eventFilters": [MESSAGES], "expiresIn": 3600,
        "deliveryMode": {"transportType": "WebHook", "address": address, "verificationToken": TOKEN, **mode}})


def test_creation_validates_the_address_then_posts_notifications_with_the_token(sandbox_rc: RC, endpoint: str) -> None:
    answer = _create(sandbox_rc, endpoint + "/ok")
    assert answer.status_code == 200, answer.text
    info = answer.json()
    assert info["deliveryMode"] == {"transportType": "WebHook", "address": endpoint + "/ok", "verificationToken": TOKEN}
    assert info["expiresIn"] >= 3590
    [(path, headers, body)] = list(_Endpoint.received)
    assert path == "/ok" and headers["Validation-Token"] and body == b""
    sandbox_rc.sb.generator.publish(2)
    wait_for(sandbox_rc.sb.rc.webhooks.idle, 30, "both delivered")
    posts = list(_Endpoint.received)[1:]
    assert len(posts) == 2
    for _, headers, body in posts:
        assert headers["Verification-Token"] == TOKEN
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"] == "RingCentral-Webhook/8.3"
        assert body.startswith(b'{"uuid":')


@pytest.mark.parametrize(("path", "why"), [("/no-echo", "without the Validation-Token echoed"),
                                           ("/big", "bytes in"), ("/slow", "no answer")])
def test_a_failed_validation_refuses_the_creation(sandbox_rc: RC, endpoint: str, path: str, why: str) -> None:
    answer = _create(sandbox_rc, endpoint + path)
    assert answer.status_code == 400
    assert answer.json()["errorCode"] == "SUB-525"
    assert why in answer.json()["message"]
    assert sandbox_rc.sb.rc.live_subscriptions() == []


def test_an_address_that_is_no_url_or_a_missing_token_is_refused(sandbox_rc: RC) -> None:
    assert _create(sandbox_rc, "ftp://example.com/x").json()["errorCode"] == "CMN-101"
    assert _create(sandbox_rc, "http://127.0.0.1:1/x", verificationToken="").json()["errorCode"] == "CMN-101"


def test_deliveries_answered_5xx_are_retried_then_the_subscription_is_blacklisted(
        sandbox_rc: RC, endpoint: str) -> None:
    info = _create(sandbox_rc, endpoint + "/down").json()
    sandbox_rc.sb.generator.publish(3)
    wait_for(sandbox_rc.sb.rc.webhooks.idle, 30, "all tried")
    assert [a.codes for a in sandbox_rc.sb.rc.webhooks.attempted] == [[503, 503, 503]] * 3
    got = sandbox_rc.call("GET", f"/restapi/v1.0/subscription/{info['id']}").json()
    assert got["status"] == "Blacklisted"
    assert got["blacklistedData"]["reason"].startswith("3 deliveries in a row failed")
    assert sandbox_rc.sb.generator.publish(1) == []  # no more deliveries for it

