"""One RingCentral user per configured account: its token manager, HTTP client and resolved ids."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import requests

from ingest.config import Config
from ingest.observability.metrics import Metrics
from ingest.rc.http import RingCentralClient
from ingest.rc.tokens import TokenManager

if TYPE_CHECKING:
    from ingest.transports.websocket import WebSocketTransport


class AccountSession:
    """Everything the subscription manager needs for one account (one user of the app).

    `account_id`/`extension_id` are the numeric ids behind `~`, resolved once with
    `GET /restapi/v1.0/account/~/extension/~` (Light group) and cached.
    """

    def __init__(self, name: str, tokens: TokenManager, client: RingCentralClient,
                 account_id: str | None = None, extension_id: str | None = None) -> None:
        self.name = name
        self.tokens = tokens
        self.client = client
        self.account_id = account_id
        self.extension_id = extension_id
        self._lock = threading.Lock()

    def resolve(self) -> tuple[str, str]:
        """(account id, extension id); one API call the first time, cached afterwards."""
        with self._lock:
            if self.account_id is None or self.extension_id is None:
                ext = self.client.get_extension()
                account = ext.get("account")
                account = account if isinstance(account, dict) else {}
                self.account_id = str(account.get("id") or "") or None
                self.extension_id = str(ext.get("id") or "") or self.tokens.owner_id
                if not self.account_id or not self.extension_id:
                    raise ValueError(f"account {self.name}: extension info lacks account.id/id")
            return self.account_id, self.extension_id

    def close(self) -> None:
        """Revoke the session's tokens (frees a session slot of the user)."""
        self.tokens.revoke()


def build_sessions(config: Config, metrics: Metrics, *, timeout: tuple[float, float] = (5.0, 30.0),
                   websocket: WebSocketTransport | None = None) -> Mapping[str, AccountSession]:
    """One `AccountSession` per configured account, each with its own HTTP connection pool; a
    `transport: websocket` account's client makes its subscription over its WebSocket session."""
    rc = config.ringcentral
    sessions: dict[str, AccountSession] = {}
    for account in config.accounts:
        http = requests.Session()
        tokens = TokenManager(rc.server, rc.client_id, rc.client_secret, account.jwt, metrics, http,
                              user=account.name, timeout=timeout)
        client = RingCentralClient(rc.server, tokens, metrics, http, user=account.name, timeout=timeout) \
            if account.transport != "websocket" or websocket is None \
            else websocket.client_for(account.name, rc.server, tokens, http, timeout)
        sessions[account.name] = AccountSession(account.name, tokens, client)
    return sessions
