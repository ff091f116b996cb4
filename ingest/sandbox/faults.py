"""Fault injection for the sandbox: what the emulators consult, and the API tests call.

`FaultBook` holds the armed rules; the RingCentral and PubNub emulators ask it, at the start of each
request, whether this request should fail and how. A rule lasts either for a number of matching
requests (`count`) or for a time (`seconds`), whichever is given. `Faults` is the public facade
(the same operations are exposed over HTTP under `/sandbox/faults/...` on the RingCentral port).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.sandbox.pubnub import PubNubEmulator
    from ingest.sandbox.ringcentral import RingCentralEmulator
    from ingest.sandbox.websocket import WebSocketEmulator

RC_ENDPOINTS = ("token", "wstoken", "revoke", "create", "list", "get", "put", "renew", "delete", "account",
                "extension", "*")


@dataclass
class Rule:
    """One armed fault. `remaining` counts matching requests left (None: unlimited until `until`)."""

    kind: str
    params: dict[str, Any]
    remaining: int | None
    until: float | None

    def alive(self, now: float) -> bool:
        if self.until is not None and now >= self.until:
            return False
        return self.remaining is None or self.remaining > 0


def _limits(count: int | None, seconds: float | None) -> tuple[int | None, float | None]:
    if count is None and seconds is None:
        count = 1
    if count is not None and count < 1:
        raise ValueError("count must be >= 1")
    until = time.monotonic() + seconds if seconds is not None else None
    return count, until


class FaultBook:
    """Thread-safe store of armed rules; `take` consumes one use of the first matching rule."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self.fired: dict[str, int] = {}  # kind -> how many requests a fault was applied to

    def arm(self, kind: str, params: dict[str, Any], count: int | None, seconds: float | None) -> None:
        remaining, until = _limits(count, seconds)
        with self._lock:
            self._rules.append(Rule(kind, params, remaining, until))

    def armed_any(self) -> bool:
        """Whether any rule is armed (read without the lock: a hot path asks it before `take`)."""
        return bool(self._rules)

    def take(self, kind: str, **match: str) -> dict[str, Any] | None:
        """The parameters of a live rule of `kind` whose match keys fit, or None. Consumes one use."""
        if not self._rules:  # fast path: no faults armed (read without the lock is fine for a list)
            return None
        now = time.monotonic()
        with self._lock:
            self._rules = [r for r in self._rules if r.alive(now)]
            for rule in self._rules:
                if rule.kind != kind or not _matches(rule.params, match):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                self.fired[kind] = self.fired.get(kind, 0) + 1
                return dict(rule.params)
        return None

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def armed(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [
                {"kind": r.kind, **r.params, "remaining": r.remaining,
                 "seconds_left": None if r.until is None else round(r.until - now, 3)}
                for r in self._rules if r.alive(now)
            ]


def _matches(params: dict[str, Any], match: dict[str, str]) -> bool:
    for key, value in match.items():
        wanted = params.get(key)
        if wanted not in (None, "*", value):
            return False
    return True


class Faults:
    """The fault-injection API (Python side). Every method also exists as POST /sandbox/faults/<name>."""

    def __init__(self, book: FaultBook, rc: RingCentralEmulator, pubnub: PubNubEmulator,
                 websocket: WebSocketEmulator) -> None:
        self.book = book
        self._rc = rc
        self._pubnub = pubnub
        self._websocket = websocket

    # ---- RingCentral -------------------------------------------------------------------------
    def rc_error(self, endpoint: str = "*", status: int = 500, count: int | None = None,
                 seconds: float | None = None, retry_after: int | None = None) -> None:
        """Fail RingCentral calls on `endpoint` (see RC_ENDPOINTS) with `status` (500/503/429/401/...)
        for `count` calls or `seconds`. 429 carries `Retry-After: retry_after` (default 60)."""
        if endpoint not in RC_ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {', '.join(RC_ENDPOINTS)}")
        if status < 400 or status > 599:
            raise ValueError("status must be a 4xx or 5xx code")
        self.book.arm("rc-error", {"endpoint": endpoint, "status": int(status), "retry_after": retry_after},
                      count, seconds)

    def expire_subscription(self, subscription_id: str) -> None:
        """Make a subscription expire now (silently: no more events, then 404 CMN-102)."""
        self._rc.expire_subscription(subscription_id)

    def delete_subscription(self, subscription_id: str) -> None:
        """Delete a subscription server-side, as if another client had deleted it."""
        self._rc.delete_subscription_server_side(subscription_id)

    def rotate_on_next_renewal(self, subscription_id: str | None = None, key: bool = True,
                               channel: bool = True) -> None:
        """At the next renew/PUT of this subscription (None: of each existing one), issue a new AES
        key and/or a new channel address; the renewal response carries them."""
        self._rc.rotate_on_next_renewal(subscription_id, key=key, channel=channel)

    def revoke_refresh_tokens(self, account: str | None = None) -> int:
        """Invalidate every refresh token of an account (name or numeric id; None: all). Returns how many."""
        return self._rc.revoke_refresh_tokens(account)

    def expire_access_tokens(self, account: str | None = None) -> int:
        """Expire every access token of an account (name or numeric id; None: all). Returns how many."""
        return self._rc.expire_access_tokens(account)

    def revoke_permission(self, permission: str, account: str | None = None) -> None:
        """The app loses an app permission (e.g. `ReadPresence`) for an account (name or id; None: all): new
        subscriptions whose filters need it are refused with 403 CMN-401 naming it."""
        self._rc.revoke_permission(permission, account)

    # ---- PubNub ------------------------------------------------------------------------------
    def pubnub_error(self, status: int = 500, count: int | None = None, seconds: float | None = None,
                     channel: str | None = None) -> None:
        """Answer subscribe polls with `status` (403 gives PubNub's Access Manager body) for `count`
        polls or `seconds`; `channel` limits it to polls that include that channel."""
        if status < 400 or status > 599:
            raise ValueError("status must be a 4xx or 5xx code")
        self.book.arm("pubnub-error", {"status": int(status), "channel": channel}, count, seconds)

    def pubnub_drop_connections(self, count: int = 1, channel: str | None = None) -> None:
        """Close the socket of the next `count` subscribe polls without answering."""
        self.book.arm("pubnub-drop", {"channel": channel}, count, None)

    def pubnub_stall(self, seconds: float, count: int = 1, channel: str | None = None) -> None:
        """Delay the next `count` subscribe polls by `seconds` before they are answered normally
        (longer than the client's read timeout: the SDK silently re-polls)."""
        self.book.arm("pubnub-stall", {"seconds": float(seconds), "channel": channel}, count, None)

    def pubnub_time_fail(self, count: int | None = None, seconds: float | None = None) -> None:
        """Make `GET /time/0` answer 500 (the SDK's reconnect probe; enough failures make it give up)."""
        self.book.arm("pubnub-time-fail", {}, count, seconds)

    def pubnub_overflow(self, sub_key: str | None = None) -> int:
        """Push every buffered message out of the replay buffer (publishes buffer_size filler messages
        on a channel nobody reads). Returns how many messages were dropped."""
        return self._pubnub.overflow(sub_key or self._rc.subscriber_key)

    # ---- WebSocket (refusing the token is rc_error(endpoint="wstoken")) ----------------------------
    def ws_drop_connections(self, count: int | None = None) -> int:
        """Cut `count` open WebSocket connections (None: all) without a close frame; their sessions wait
        `recoveryTimeout` for a reconnect with `wsc`. Returns how many were cut."""
        return self._websocket.drop_connections(count)

    def ws_fail_recovery(self, count: int | None = None, seconds: float | None = None) -> None:
        """The next `count` reconnects with a `wsc` (or those within `seconds`) get `recoveryState: Failed`:
        a new session, the old subscription deleted, what it buffered lost."""
        self.book.arm("ws-fail-recovery", {}, count, seconds)

    def ws_close(self, code: str = "WSG-902", count: int | None = None) -> int:
        """Close `count` open connections (None: all) now as the idle (WSG-902) or 24-hour (WSG-903)
        timeout does: an `Error` frame with that code, then a close frame."""
        return self._websocket.force_close(code, count)

    def ws_stall(self, count: int | None = None) -> int:
        """Black-hole `count` open connections (None: all): they stop sending anything (pongs included)
        until the client gives up on them; notifications wait in the recovery buffer."""
        return self._websocket.stall(count)

    def clear(self) -> None:
        """Disarm every rule (state changes already made, like expiries, stay)."""
        self.book.clear()

    def armed(self) -> list[dict[str, Any]]:
        return self.book.armed()
