"""OAuth tokens for one (app, user): log in once with the JWT, then only refresh.

RingCentral allows about five parallel sessions per user per app; every JWT login opens one. So:
- one login with the JWT grant, then refresh-token grants for as long as the refresh token lives;
- a new JWT login only when the refresh token is refused (400/401: revoked, expired, already used);
- one token request at a time (a lock): concurrent callers wait and share the result;
- proactive refresh before expiry (lazy, on the next `access_token()` call after the refresh point),
  so a 401 is the exception, not the trigger;
- after a failure no request until its retry time: `Retry-After` on 429/503, a fixed interval on
  5xx/timeouts, a long cool-down when the JWT itself is refused (no retry on 400). In between,
  callers get the still-valid old token, or `TokenUnavailable` without any network traffic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from ingest.observability.logs import get_logger, register_secret
from ingest.observability.metrics import Metrics
from ingest.rc.errors import ApiError, AuthError, NetworkError, RateLimited, TokenUnavailable, parse_error_body
from ingest.rc.http import DEFAULT_PENALTY_SECONDS, DEFAULT_TIMEOUT, retry_after_seconds

log = get_logger(__name__)

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MIN_REFRESH_AHEAD = 60.0  # refresh at least this long before expiry (the JS SDK's handicap) ...
REFRESH_AHEAD_FRACTION = 0.1  # ... or this fraction of the lifetime, whichever is larger ...
MAX_REFRESH_AHEAD_FRACTION = 0.5  # ... but never earlier than half-way (short-lived test tokens)


class TokenManager:
    """Access tokens for one user of one app. Thread-safe; share one per account."""

    def __init__(self, server: str, client_id: str, client_secret: str, jwt: str, metrics: Metrics,  # noqa: PLR0917
                 session: requests.Session | None = None, *, user: str = "",
                 timeout: tuple[float, float] = DEFAULT_TIMEOUT, clock: Callable[[], float] = time.monotonic,
                 retry_interval: float = 10.0, auth_failure_cooldown: float = 300.0) -> None:
        self.server = server.rstrip("/")
        self.metrics = metrics
        self.session = session or requests.Session()
        self.user = user
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.auth_failure_cooldown = auth_failure_cooldown
        self._client = (client_id, client_secret)
        self._jwt = jwt
        register_secret(client_secret)
        register_secret(jwt)
        self._clock = clock
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_expires = 0.0
        self._refresh_at = 0.0
        self._refresh: str | None = None
        self._refresh_expires = 0.0
        self._not_before = 0.0
        self._failure = ""
        self._owner_id: str | None = None
        self.logins = 0  # JWT grants made (sessions opened); for tests and logs
        self.refreshes = 0

    @property
    def owner_id(self) -> str | None:
        """The extension id of the user (token `owner_id`), known after the first grant."""
        return self._owner_id

    def access_token(self) -> str:
        """A valid access token, refreshing (or logging in) first when due. Blocks during a refresh."""
        with self._lock:
            now = self._clock()
            if self._access is not None and now < self._refresh_at:
                return self._access
            if now < self._not_before:
                if self._access is not None and now < self._access_expires:
                    return self._access  # refresh failed earlier but the old token still works
                raise TokenUnavailable(self.user, self._not_before - now, self._failure)
            try:
                self._obtain(now)
            except (ApiError, NetworkError) as exc:
                self._note_failure(exc)
                if self._access is not None and self._clock() < self._access_expires:
                    return self._access
                raise
            assert self._access is not None
            return self._access

    def invalidate(self, token: str | None = None) -> None:
        """The server refused `token` (401): make the next `access_token()` get a new one.

        Ignored when `token` is no longer the current one (another thread already replaced it), so a
        burst of 401s from many threads costs one refresh, not one each.
        """
        with self._lock:
            if token is not None and token != self._access:
                return
            self._refresh_at = 0.0
            self._access_expires = 0.0

    def revoke(self) -> None:
        """End the session (frees one of the user's ~5 session slots). Failures are ignored, not retried."""
        with self._lock:
            token = self._refresh or self._access
            self._access = self._refresh = None
            self._refresh_at = self._access_expires = self._refresh_expires = 0.0
        if token is None:
            return
        try:
            resp = self.session.post(f"{self.server}/restapi/oauth/revoke", data={"token": token},
                                     auth=self._client, timeout=self.timeout)
            self.metrics.api_calls.labels("oauth.revoke", str(resp.status_code)).inc()
        except requests.RequestException:
            self.metrics.api_calls.labels("oauth.revoke", "error").inc()

    # ---- internals (called with the lock held) ---------------------------------------------------

    def _obtain(self, now: float) -> None:
        if self._refresh is not None and now < self._refresh_expires:
            try:
                self._grant("refresh_token", {"grant_type": "refresh_token", "refresh_token": self._refresh})
                return
            except AuthError as exc:
                # Refresh token revoked, expired or already used: the one case for a new JWT login.
                log.warning("rc.token.refresh_refused", user=self.user, error_code=exc.error_code)
                self._refresh = None
        self._grant("jwt", {"grant_type": JWT_GRANT, "assertion": self._jwt})

    def _grant(self, grant: str, form: dict[str, str]) -> None:
        started = self._clock()
        try:
            resp = self.session.post(f"{self.server}/restapi/oauth/token", data=form, auth=self._client,
                                     timeout=self.timeout, headers={"Accept": "application/json"})
        except requests.RequestException as exc:
            self.metrics.api_calls.labels("oauth.token", "error").inc()
            self.metrics.token_refreshes.labels(grant, "error").inc()
            raise NetworkError(f"oauth.token: {type(exc).__name__}") from None
        self.metrics.api_calls.labels("oauth.token", str(resp.status_code)).inc()
        if resp.status_code != 200:
            self.metrics.token_refreshes.labels(grant, "rate-limited" if resp.status_code == 429 else "error").inc()
            raise self._error(resp)
        try:
            body: dict[str, Any] = resp.json()
            access = str(body["access_token"])
            expires_in = float(body.get("expires_in") or 3600)
        except (ValueError, KeyError, TypeError):
            self.metrics.token_refreshes.labels(grant, "error").inc()
            raise ApiError(resp.status_code, None, "token response without access_token", None,
                           "oauth.token") from None
        register_secret(access)
        refresh = body.get("refresh_token")
        if refresh:
            register_secret(str(refresh))
        self._access = access
        self._access_expires = started + expires_in
        ahead = min(max(MIN_REFRESH_AHEAD, REFRESH_AHEAD_FRACTION * expires_in),
                    MAX_REFRESH_AHEAD_FRACTION * expires_in)
        self._refresh_at = started + expires_in - ahead
        self._refresh = str(refresh) if refresh else None
        self._refresh_expires = started + float(body.get("refresh_token_expires_in") or 0) if refresh else 0.0
        if body.get("owner_id") is not None:
            self._owner_id = str(body["owner_id"])
        self._not_before = 0.0
        self._failure = ""
        if grant == "jwt":
            self.logins += 1
        else:
            self.refreshes += 1
        self.metrics.token_refreshes.labels(grant, "ok").inc()
        log.info("rc.token.granted", user=self.user, grant=grant, expires_in=expires_in)

    def _error(self, resp: requests.Response) -> ApiError:
        try:
            code, message = parse_error_body(resp.json())
        except ValueError:
            code, message = None, resp.reason or ""
        wait = retry_after_seconds(resp)
        if resp.status_code == 429:
            return RateLimited(DEFAULT_PENALTY_SECONDS if wait is None else wait, "auth", sent=True,
                               endpoint="oauth.token", error_code=code, message=message)
        if resp.status_code in (400, 401):
            return AuthError(resp.status_code, code, message, wait, "oauth.token")
        return ApiError(resp.status_code, code, message, wait, "oauth.token")

    def _note_failure(self, exc: ApiError | NetworkError) -> None:
        if isinstance(exc, ApiError) and exc.retry_after is not None and exc.status in (429, 503):
            wait = exc.retry_after
        elif isinstance(exc, AuthError):
            wait = self.auth_failure_cooldown  # the JWT itself was refused: retrying now cannot help
        else:
            wait = self.retry_interval
        self._not_before = self._clock() + wait
        self._failure = str(exc)
        log.warning("rc.token.failed", user=self.user, error=str(exc), retry_in=wait)
