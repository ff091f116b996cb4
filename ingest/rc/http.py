"""RingCentral REST client for one (app, user): auth header, 429 penalty silence, typed errors, metrics.

Rate limits are per (user, app, usage-plan group), and every request sent during a 429 penalty
*resets* the penalty. So the client remembers, per group, the time until which it must stay silent,
and refuses to send during it (raising `RateLimited(sent=False)`) instead of making things worse.
The group of an endpoint is known before sending from a table of documented defaults and is
corrected from the `X-Rate-Limit-Group` header whenever the server names it.

A 401 means the access token died early (revoked, session ended): the client tells the token manager
(which refreshes once, however many threads saw the 401) and retries the request once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import requests

from ingest.observability.logs import get_logger
from ingest.observability.metrics import Metrics
from ingest.rc.errors import ApiError, NetworkError, RateLimited, parse_error_body

log = get_logger(__name__)

API = "/restapi/v1.0"
DEFAULT_PENALTY_SECONDS = 60.0  # the documented penalty when a 429 carries no Retry-After
DEFAULT_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds

# endpoint label -> documented usage-plan group (rate-limits.md; spec x-throttling-group).
DEFAULT_GROUPS = {
    "subscription.create": "medium",
    "subscription.list": "light",
    "subscription.get": "light",
    "subscription.update": "medium",
    "subscription.renew": "light",
    "subscription.delete": "medium",
    "extension.get": "light",
    "oauth.wstoken": "auth",
}


class TokenSource(Protocol):
    """What the client needs from a token manager."""

    def access_token(self) -> str: ...

    def invalidate(self, token: str | None = None) -> None: ...


def retry_after_seconds(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: RingCentral sends seconds; fall back to the default penalty


class RingCentralClient:
    """REST calls for one user of one app. Thread-safe: share one per account."""

    def __init__(self, server: str, tokens: TokenSource, metrics: Metrics, session: requests.Session | None = None,
                 *, user: str = "", timeout: tuple[float, float] = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server.rstrip("/")
        self.tokens = tokens
        self.metrics = metrics
        self.session = session or requests.Session()
        self.user = user
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._silent_until: dict[str, float] = {}  # group -> clock time
        self._groups = dict(DEFAULT_GROUPS)  # learned from X-Rate-Limit-Group

    # ---- penalties -------------------------------------------------------------------------------

    def penalty_remaining(self, endpoint: str | None = None) -> float:
        """Seconds of 429 silence left for the group of `endpoint` (or the longest over all groups)."""
        now = self._clock()
        with self._lock:
            if endpoint is None:
                return max([0.0, *(until - now for until in self._silent_until.values())])
            return max(0.0, self._silent_until.get(self._groups.get(endpoint, "light"), 0.0) - now)

    def rate_limited(self, endpoint: str, retry_after: float | None, group: str | None = None,
                     error_code: str | None = None, message: str = "") -> RateLimited:
        """Record a 429 (from `request`, or over a WebSocket): silence for its group until `retry_after`
        (default: the documented penalty), counted. Returns the error to raise."""
        group = (group or self._groups.get(endpoint, "light")).lower()
        wait = DEFAULT_PENALTY_SECONDS if retry_after is None else retry_after
        self._penalize(group, wait)
        self.metrics.rate_limit_penalties.labels(group).inc()
        log.warning("rc.rate_limited", user=self.user, endpoint=endpoint, group=group, retry_after=wait)
        return RateLimited(wait, group, sent=True, endpoint=endpoint, error_code=error_code or "CMN-301",
                           message=message or "Request rate exceeded")

    def _penalize(self, group: str, seconds: float) -> None:
        with self._lock:
            until = self._clock() + seconds
            self._silent_until[group] = max(until, self._silent_until.get(group, 0.0))

    # ---- requests --------------------------------------------------------------------------------

    def request(self, method: str, path: str, endpoint: str, *, json: Any = None,
                expect_body: bool = True) -> Any:
        """Send one API call; returns the parsed JSON body (None for 204/empty).

        Raises `RateLimited` (penalty running or 429), `ApiError` (other error statuses),
        `NetworkError` (no answer), or the token manager's errors when no token can be had.
        """
        for attempt in (1, 2):
            group = self._groups.get(endpoint, "light")
            remaining = self.penalty_remaining(endpoint)
            if remaining > 0:
                raise RateLimited(remaining, group, sent=False, endpoint=endpoint)
            token = self.tokens.access_token()
            resp = self._send(method, path, endpoint, token, json)
            server_group = resp.headers.get("X-Rate-Limit-Group")
            if server_group:
                group = server_group.lower()
                self._groups[endpoint] = group
            if resp.status_code == 401 and attempt == 1:
                log.info("rc.unauthorized_retry", user=self.user, endpoint=endpoint)
                self.tokens.invalidate(token)
                continue
            if resp.status_code == 429:
                code, message = _error_of(resp)
                raise self.rate_limited(endpoint, retry_after_seconds(resp), group, code, message)
            if resp.status_code >= 400:
                code, message = _error_of(resp)
                raise ApiError(resp.status_code, code, message, retry_after_seconds(resp), endpoint)
            if not expect_body or resp.status_code == 204 or not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise ApiError(resp.status_code, None, "response is not JSON", None, endpoint) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, method: str, path: str, endpoint: str, token: str, body: Any) -> requests.Response:
        try:
            resp = self.session.request(method, self.server + path, json=body, timeout=self.timeout,
                                        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        except requests.RequestException as exc:
            self.metrics.api_calls.labels(endpoint, "error").inc()
            raise NetworkError(f"{endpoint}: {type(exc).__name__}") from None
        self.metrics.api_calls.labels(endpoint, str(resp.status_code)).inc()
        return resp

    # ---- the endpoints the control plane uses ----------------------------------------------------

    def get_extension(self) -> dict[str, Any]:
        body: dict[str, Any] = self.request("GET", f"{API}/account/~/extension/~", "extension.get")
        return body

    def list_subscriptions(self) -> list[dict[str, Any]]:
        body = self.request("GET", f"{API}/subscription", "subscription.list")
        records = body.get("records") if isinstance(body, dict) else None
        return [r for r in records or [] if isinstance(r, dict)]

    def get_subscription(self, subscription_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.request("GET", f"{API}/subscription/{subscription_id}", "subscription.get")
        return body

    def create_subscription(self, event_filters: list[str], expires_in: int) -> dict[str, Any]:
        return self._create(event_filters, expires_in, {"transportType": "PubNub", "encryption": True})

    def create_webhook_subscription(self, event_filters: list[str], expires_in: int, address: str,
                                    verification_token: str) -> dict[str, Any]:
        """RingCentral POSTs each notification to `address` with `verification_token` (the field name of the
        API definitions; the 2023 docs say `validationToken`: reference/ringcentral-websocket-webhook.md)."""
        return self._create(event_filters, expires_in, {"transportType": "WebHook", "address": address,
                                                        "verificationToken": verification_token})

    def _create(self, event_filters: list[str], expires_in: int, delivery_mode: dict[str, Any]) -> dict[str, Any]:
        payload = {"eventFilters": event_filters, "deliveryMode": delivery_mode, "expiresIn": expires_in}
        body: dict[str, Any] = self.request("POST", f"{API}/subscription", "subscription.create", json=payload)
        return body

    def renew_subscription(self, subscription_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.request("POST", f"{API}/subscription/{subscription_id}/renew",
                                            "subscription.renew")
        return body

    def ws_token(self) -> dict[str, Any]:
        """A single-use WebSocket token: `{"ws_access_token", "uri", "expires_in"}` (Auth group)."""
        body = self.request("POST", "/restapi/oauth/wstoken", "oauth.wstoken")
        if not isinstance(body, dict) or not body.get("ws_access_token") or not body.get("uri"):
            raise ApiError(200, None, "wstoken answer without ws_access_token or uri", None, "oauth.wstoken")
        return body

    def delete_subscription(self, subscription_id: str) -> None:
        self.request("DELETE", f"{API}/subscription/{subscription_id}", "subscription.delete", expect_body=False)


def _error_of(resp: requests.Response) -> tuple[str | None, str]:
    try:
        return parse_error_body(resp.json())
    except ValueError:
        return None, resp.reason or ""
