"""Fixtures for the sandbox tests: a running sandbox, a RingCentral client over `requests`, and
real `pubnub` SDK clients pointed at the emulator."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from pubnub.callbacks import SubscribeCallback
from pubnub.enums import PNReconnectionPolicy
from pubnub.pnconfiguration import PNConfiguration
from pubnub.pubnub import PubNub

from ingest.sandbox.server import Account, Sandbox

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MESSAGE_STORE = "/restapi/v1.0/account/~/extension/~/message-store"
PRESENCE = "/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true"


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    """The sandbox tests' emulator answers held polls after 0.5 s."""
    return {"pubnub_hold_seconds": 0.5}


class RC:
    """A minimal RingCentral client over requests: just enough to drive the emulator in tests."""

    def __init__(self, sb: Sandbox, account: Account) -> None:
        self.sb = sb
        self.account = account
        self.http = requests.Session()
        self.token: dict[str, Any] = {}

    def token_request(self, **form: str) -> requests.Response:
        return self.http.post(f"{self.sb.rc_url}/restapi/oauth/token", data=form,
                              auth=(self.sb.client_id, self.sb.client_secret), timeout=10)

    def login(self) -> dict[str, Any]:
        answer = self.token_request(grant_type=JWT_GRANT, assertion=self.account.jwt)
        assert answer.status_code == 200, answer.text
        self.token = answer.json()
        return self.token

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token['access_token']}"} if self.token else {}
        return self.http.request(method, f"{self.sb.rc_url}{path}", headers=headers, timeout=10, **kwargs)

    def subscribe(self, filters: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        body = {"eventFilters": filters or [MESSAGE_STORE], "deliveryMode": {"transportType": "PubNub"}, **extra}
        answer = self.call("POST", "/restapi/v1.0/subscription", json=body)
        assert answer.status_code == 200, answer.text
        info: dict[str, Any] = answer.json()
        return info


@pytest.fixture
def rc(sandbox: Sandbox) -> RC:
    client = RC(sandbox, sandbox.accounts[0])
    client.login()
    return client


@dataclass
class Listener(SubscribeCallback):  # type: ignore[misc]
    """Records statuses and messages from the SDK (never raises: see the reference, §6 item 1)."""

    messages: list[Any] = field(default_factory=list)
    statuses: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, pubnub: Any, status: Any) -> None:
        with self.lock:
            self.statuses.append(status)

    def message(self, pubnub: Any, message: Any) -> None:
        with self.lock:
            self.messages.append(message)

    def presence(self, pubnub: Any, presence: Any) -> None:
        pass

    def categories(self) -> list[str]:
        with self.lock:
            return [s.category.name for s in self.statuses]

    def received(self) -> list[Any]:
        with self.lock:
            return list(self.messages)


@pytest.fixture
def make_client() -> Iterator[Callable[..., tuple[PubNub, Listener]]]:
    """Real native PubNub clients on the sandbox origin (ssl=False, daemon=True); stopped at teardown."""
    clients: list[PubNub] = []

    def make(target: Sandbox, sub_key: str | None = None, **config: Any) -> tuple[PubNub, Listener]:
        cfg = PNConfiguration()
        cfg.subscribe_key = sub_key or target.subscriber_key
        cfg.publish_key = "convince-pubnub-its-okay"
        cfg.user_id = f"test-{len(clients)}"
        cfg.ssl = False
        cfg.origin = target.pubnub_origin
        cfg.daemon = True
        cfg.reconnect_policy = PNReconnectionPolicy.LINEAR
        cfg.reconnection_interval = 0.2
        cfg.maximum_reconnection_retries = -1
        for key, value in config.items():
            setattr(cfg, key, value)
        pubnub = PubNub(cfg)
        listener = Listener()
        pubnub.add_listener(listener)
        clients.append(pubnub)
        return pubnub, listener

    yield make
    for pubnub in clients:
        pubnub.stop()
