"""Typed errors of the RingCentral client. Messages never contain a token, JWT or secret."""

from __future__ import annotations

import re
from typing import Any


class RingCentralError(Exception):
    """Base of every RingCentral client error."""


class NetworkError(RingCentralError):
    """No HTTP answer: connection refused, reset, DNS, timeout. Retry with backoff."""


class ApiError(RingCentralError):
    """RingCentral answered with an error status.

    `error_code` is RingCentral's code (`CMN-102`, `SUB-505`, `OAU-149`, or the OAuth `error` such as
    `invalid_grant`); apps should branch on it (and on `status`), never on `message`.
    `retry_after` is the `Retry-After` header in seconds, when sent.
    """

    def __init__(self, status: int, error_code: str | None, message: str, retry_after: float | None = None,
                 endpoint: str = "") -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        self.retry_after = retry_after
        self.endpoint = endpoint
        super().__init__(f"{endpoint or 'request'}: HTTP {status} {error_code or ''} {message}".replace("  ", " "))

    @property
    def retryable(self) -> bool:
        """Worth another try later: throttling, server trouble, or a request timeout."""
        return self.status in (408, 429) or self.status >= 500


class RateLimited(ApiError):
    """429 from the server, or refused locally because the (user, group) penalty is still running.

    `retry_after` is the remaining penalty in seconds; no request for that group may be sent before.
    `sent` tells whether this request actually reached the server (False: refused locally).
    """

    def __init__(self, retry_after: float, group: str, *, sent: bool, endpoint: str = "",
                 error_code: str | None = "CMN-301", message: str = "Request rate exceeded") -> None:
        super().__init__(429, error_code, message, retry_after, endpoint)
        self.group = group
        self.sent = sent


class AuthError(ApiError):
    """A token request was refused (400/401 on /restapi/oauth/token): credentials are wrong or revoked."""


_BRACKETED_PERMISSION = re.compile(r"\[([A-Za-z][A-Za-z0-9]*)\]")


def missing_permission(exc: BaseException) -> str | None:
    """The app permission a 403 says is missing, else None.

    RingCentral names it in brackets: `In order to call this API endpoint, application needs to have
    [ReadPresence] permission` (CMN-401, also CMN-408 for a user permission) or `Required application
    permission [TelephonySessions] is missing` on subscription creation. No retry can fix that: the app
    (or the user's role) must be given the permission first.
    """
    if not isinstance(exc, ApiError) or exc.status != 403 or "permission" not in exc.message.lower():
        return None
    match = _BRACKETED_PERMISSION.search(exc.message)
    return match.group(1) if match else None


def parse_error_body(body: Any) -> tuple[str | None, str]:
    """(error code, message) from a RingCentral error body, REST or OAuth shape.

    REST: `{"errorCode": "CMN-102", "message": "...", "errors": [{"errorCode": ..., "message": ...}]}`
    OAuth: `{"error": "invalid_grant", "error_description": "...", "errors": [...]}`
    """
    if not isinstance(body, dict):
        return None, ""
    nested = body.get("errors")
    first = nested[0] if isinstance(nested, list) and nested and isinstance(nested[0], dict) else {}
    code = body.get("errorCode") or body.get("error") or first.get("errorCode")
    message = (body.get("message") or body.get("error_description") or body.get("description")
               or first.get("message") or "")
    # A generic top-level code ("TokenInvalid") is less useful than the specific nested one (OAU-149).
    if first.get("errorCode") and code and not str(code)[:3].isupper():
        code = first["errorCode"]
    return (str(code) if code else None), str(message)


class TokenUnavailable(RingCentralError):
    """No access token can be had right now: the last token request failed and its retry time has not come.

    Raised without any network traffic, so that a failing login is not hammered (the Auth group allows
    about 5 requests per user per minute). `retry_after` says when the next attempt will be made.
    """

    def __init__(self, user: str, retry_after: float, cause: str) -> None:
        self.retry_after = retry_after
        self.cause = cause
        super().__init__(f"no access token for {user or 'user'} for another {retry_after:.1f}s ({cause})")
