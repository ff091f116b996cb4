"""RingCentral emulator: OAuth (JWT and refresh grants), the subscription API, rate limits, account info.

Shapes, codes and rules follow docs/reference ringcentral-push-api.md (§1 subscriptions, §1.4 errors,
§1.5 rate limits, §4 auth, §7 emulator checklist). Where the reference is silent (exact OAuth error
codes, 500 bodies) the choice made here is listed in docs/sandbox.md.

The emulator state is independent of HTTP; `RingCentralHandler` is a thin adapter. Expiry is lazy:
a subscription is live while `now < expires_at` and not deleted, so it stops receiving events the
moment it lapses, silently, exactly as the real service.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from ingest.sandbox.faults import FaultBook
from ingest.sandbox.webhook import WebhookDeliveries, webhook_info, webhook_target

API = "/restapi/v1.0"
# A WebSocket subscription has no expiry of its own: its WebSocket session ends it (deleting it).
WEBSOCKET_LIFETIME = 10 * 365 * 86400.0
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPE = "ReadAccounts ReadMessages ReadPresence CallControl SubscriptionPubNub"


@dataclass(frozen=True)
class Account:
    """A RingCentral account of the sandbox, logged in as its main extension with `jwt`."""

    name: str
    account_id: str  # digits
    extension_id: str  # digits: the main extension, the user the JWT logs in as
    jwt: str
    extensions: tuple[str, ...] = ()  # every extension id of the account (the main one included)

    def all_extensions(self) -> tuple[str, ...]:
        return self.extensions if self.extension_id in self.extensions else (self.extension_id, *self.extensions)


@dataclass(frozen=True)
class RateLimits:
    """Per (user, app, group) limits: requests per window, and the penalty after an excess."""

    light: int = 50
    medium: int = 40
    heavy: int = 10
    auth: int = 5
    window: float = 60.0
    penalty: float = 60.0


class ApiError(Exception):
    """An HTTP error answer: status, JSON body and extra headers."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def api_error(status: int, code: str, message: str, **extra: str) -> ApiError:
    """The platform's single-error body: top-level errorCode/message beside the `errors` array (§1.4)."""
    return ApiError(status, {"errorCode": code, "message": message,
                             "errors": [{"errorCode": code, "message": message, **extra}], **extra})


def oauth_error(status: int, error: str, code: str, description: str) -> ApiError:
    """RFC 6749 fields plus `errors`, as the token endpoint answers (§1.4)."""
    return ApiError(status, {"error": error, "error_description": description,
                             "errors": [{"errorCode": code, "message": description}]})


def token_invalid(code: str, message: str) -> ApiError:
    return ApiError(401, {"errorCode": "TokenInvalid", "message": message,
                          "errors": [{"errorCode": code, "message": message}]})


def not_found(subscription_id: str) -> ApiError:
    return api_error(404, "CMN-102", "Resource for parameter [subscriptionId] is not found",
                     parameterName="subscriptionId")


def iso(ts: float) -> str:
    """ISO 8601 with milliseconds and `Z`, as `creationTime`/`expirationTime` are written."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ---- event filters ----------------------------------------------------------------------------

_ACCOUNT_RE = re.compile(r"^/restapi/v1\.0/account/(~|\d+)(/.*)?$")
_EXT_RE = re.compile(r"^/extension/(~|\d+)(/.*)?$")
_EXT_KINDS = {
    "/message-store": "message-store",
    "/message-store/instant": "instant-sms",
    "/presence": "presence",
    "/presence/line": "presence-line",
    "/presence/line/presence": "presence",
    "/favorite/presence": "presence",
    "/presence/dnd": "dnd-status",
    "/favorite": "favorites",
    "/grant": "grant-list",
    "/telephony/sessions": "telephony-sessions",
    "/voicemail": "voicemail",
    "/fax": "fax",
    "/missed-calls": "missed-calls",
    "/start-ring": "start-ring",
    "/stop-ring": "stop-ring",
    "/inbound-messages": "inbound-messages",
    "": "extension-info",
}
_ACCOUNT_KINDS = {
    "/extension": "extension-list", "/presence": "account-presence", "/telephony/sessions": "telephony-sessions",
    "/a2p-sms/batches": "a2p-batches", "/a2p-sms/messages": "a2p-messages", "/a2p-sms/opt-outs": "a2p-opt-outs",
    "/message-threads/sync": "message-threads", "/message-threads/entries/sync": "message-threads",
    "/directory/entries": "company-directory", "/phone-number": "contact-center-numbers",
}
_ACCOUNT_PATTERNS = (
    (re.compile(r"^/a2p-sms/batches/[0-9A-Za-z-]+$"), "a2p-batches"),
    (re.compile(r"^/call-queues/\d+/presence$"), "call-queue-presence"),
    (re.compile(r"^/device/\d+/emergency-address$"), "emergency-address"),
)
# Filters outside /restapi/v1.0/account/...: (pattern, kind); group 1, when the pattern has one, is the account.
_OTHER_FILTERS = (
    (re.compile(r"^/restapi/v2/accounts/(~|\d+)/sms/consents$"), "sms-consents"),
    (re.compile(r"^/ai/ringsense/v1/public/accounts/(~|\d+)/domains/(?:pbx|rcv|rcx|ms-teams|nice-incontact)/insights$"),
     "ringsense"),
    (re.compile(r"^(?:/team-messaging/v1|/restapi/v1\.0/glip)/posts$"), "team-posts"),
    (re.compile(r"^(?:/team-messaging/v1/(?:chats|groups)|/restapi/v1\.0/glip/groups)$"), "team-chats"),
    (re.compile(r"^/restapi/v1\.0/glip/webhooks$"), "team-webhooks"),
    (re.compile(r"^/webinar/(?:configuration/v1/company/sessions|runtime/v1/company/sessions/state"
                r"|registration/v1/company/sessions/(?:state|registrants))$"), "webinar"),
)
PRESENCE_KINDS = frozenset({"presence", "detailed-presence", "account-presence", "presence-line", "dnd-status",
                            "call-queue-presence"})  # encryption is forced for these (§3.5)
# The app permission RingCentral checks for each kind of filter (ringcentral-event-catalogue.md §1; where the
# sources disagree, the event-filter page). Kinds not listed need none beyond the subscription itself.
PERMISSIONS = {
    "message-store": "ReadMessages", "instant-sms": "ReadMessages", "voicemail": "ReadMessages", "fax": "ReadMessages",
    "presence": "ReadPresence", "detailed-presence": "ReadPresence", "presence-line": "ReadPresence",
    "call-queue-presence": "ReadPresence", "account-presence": "ReadAccounts", "dnd-status": "ReadAccounts",
    "telephony-sessions": "CallControl", "extension-list": "ReadAccounts", "extension-info": "ReadAccounts",
    "grant-list": "ReadAccounts", "emergency-address": "ReadAccounts", "company-directory": "ReadAccounts",
    "contact-center-numbers": "ReadAccounts", "favorites": "ReadContacts", "a2p-batches": "ReadAccounts",
    "a2p-messages": "ReadAccounts", "a2p-opt-outs": "ReadAccounts", "sms-consents": "SMS", "message-threads": "SMS",
    "team-posts": "TeamMessaging", "team-chats": "TeamMessaging", "team-webhooks": "TeamMessaging",
    "ringsense": "RingSense", "webinar": "ReadWebinars",
}


@dataclass(frozen=True)
class EventFilter:
    """One accepted event filter: how the client sent it, its expanded form, and what it emits."""

    requested: str  # full form as sent (relative forms get /restapi/v1.0 prepended)
    expanded: str  # `~` replaced by numeric ids (what the API returns)
    tilde: str  # account as `~`, extension numeric: the older event path form
    kind: str  # generator kind label
    extension_id: str | None  # the extension the events are about (None: account-wide)


def parse_filter(raw: str, account: Account, caller_ext: str, ttl_max: float) -> EventFilter:
    """Validate and expand one filter; raises ApiError (400 SUB-508/516, 403 SUB-406)."""
    if not isinstance(raw, str) or not raw:
        raise _bad_filters([raw])
    full = raw if raw.startswith(API) else API + raw if raw.startswith(("/account/", "/subscription/")) else raw
    path, _, query = full.partition("?")
    params = parse_qs(query)
    if path == f"{API}/subscription/~":
        try:
            threshold = int(params["threshold"][0])
            interval = int(params["interval"][0])
        except (KeyError, ValueError):
            raise api_error(400, "SUB-516", "Invalid reminder parameters") from None
        if threshold <= 0 or interval <= 0 or threshold > ttl_max / 2 or interval > threshold / 2:
            raise api_error(400, "SUB-516", "Invalid reminder parameters")
        return EventFilter(full, full, full, "subscription-reminder", None)
    m = _ACCOUNT_RE.match(path)
    if not m:
        return _other_filter(full, path, account)
    acct, rest = m.group(1), m.group(2) or ""
    _check_account(acct, account)
    ext: str | None = None
    em = _EXT_RE.match(rest)
    if em:
        ext = caller_ext if em.group(1) == "~" else em.group(1)
        if ext not in account.all_extensions():
            raise _bad_filters([raw])
        sub = em.group(2) or ""
        kind = _EXT_KINDS.get(sub)
        if kind == "presence" and params.get("detailedTelephonyState") == ["true"]:
            kind = "detailed-presence"
        if kind == "instant-sms" and params.get("type") != ["SMS"]:
            kind = None
        tail = f"/extension/{ext}{sub}"
    else:
        kind = _ACCOUNT_KINDS.get(rest) or next((k for pattern, k in _ACCOUNT_PATTERNS if pattern.match(rest)), None)
        tail = rest
    if kind is None:
        raise _bad_filters([raw])
    q = f"?{query}" if query else ""
    expanded = f"{API}/account/{account.account_id}{tail}{q}"
    tilde = f"{API}/account/~{tail}{q}"
    return EventFilter(full, expanded, tilde, kind, ext)


def _check_account(acct: str, account: Account) -> None:
    if acct not in ("~", account.account_id):
        raise api_error(403, "SUB-406", "Not allowed subscribe for events to extensions of other account")


def _other_filter(full: str, path: str, account: Account) -> EventFilter:
    """A filter outside /restapi/v1.0/account/: A2P consents, RingSense, team messaging, webinars."""
    for pattern, kind in _OTHER_FILTERS:
        match = pattern.match(path)
        if match:
            if pattern.groups:
                _check_account(match.group(1), account)
                start, end = match.span(1)
                return EventFilter(full, full[:start] + account.account_id + full[end:], full, kind, None)
            return EventFilter(full, full, full, kind, None)
    raise _bad_filters([full])


def insufficient_permissions(permission: str) -> ApiError:
    """What the platform answers when the app lacks a permission: CMN-401 under `InsufficientPermissions`,
    with `permissionName` (the body quoted in ringcentral/ringcentral-web-phone issue #154)."""
    message = f"In order to call this API endpoint, application needs to have [{permission}] permission"
    return ApiError(403, {"errorCode": "InsufficientPermissions", "message": message,
                          "errors": [{"errorCode": "CMN-401", "message": message, "permissionName": permission}],
                          "permissionName": permission})


def _bad_filters(filters: list[Any]) -> ApiError:
    shown = ", ".join(str(f) for f in filters)
    return api_error(400, "SUB-508", f"Invalid event filters: [{shown}]")


# ---- state ------------------------------------------------------------------------------------


@dataclass
class _Session:
    account: Account
    client_id: str
    access_token: str
    access_expires: float
    refresh_token: str
    refresh_expires: float


@dataclass
class _Subscription:
    id: str
    account: Account
    extension_id: str
    client_id: str
    filters: list[EventFilter]
    encryption: bool
    key: str | None
    channel: str
    subscriber_key: str
    created_at: float
    expires_at: float
    deleted: bool = False
    rotate_key: bool = False
    rotate_channel: bool = False
    renewals: int = 0
    transport: str = "PubNub"  # "WebSocket": created over a socket, lives as long as its session
    webhook_token: str | None = None  # WebHook: the verificationToken (channel holds the address)
    webhook_lifetime: float = 0.0  # WebHook: the lifetime granted at creation (a renewal grants it again)
    blacklisted: tuple[float, str] | None = None  # WebHook: (when, reason); no more deliveries

    def live(self, now: float) -> bool:
        return not self.deleted and now < self.expires_at


@dataclass(frozen=True)
class SubscriptionView:
    """Server-side snapshot of a subscription, for assertions and for the generator."""

    id: str
    account: str  # account name
    account_id: str
    extension_id: str
    status: str  # "Active", "Expired" or "Deleted"
    created_at: float
    expires_at: float
    deleted: bool
    channel: str
    subscriber_key: str
    key: str | None  # Base64 AES key, None when encryption is off
    encryption: bool
    event_filters: tuple[str, ...]  # expanded, as the API returns them
    filters: tuple[EventFilter, ...] = field(repr=False, default=())
    renewals: int = 0
    transport: str = "PubNub"
    webhook_token: str | None = field(repr=False, default=None)  # set: a WebHook subscription (channel: address)

    @property
    def live(self) -> bool:
        return self.status == "Active" and time.time() < self.expires_at


class _RateLimiter:
    """Sliding window per (user, app, group); during a penalty every request restarts it (§1.5)."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._hits: dict[tuple[str, str, str], deque[float]] = {}
        self._penalty: dict[tuple[str, str, str], float] = {}

    def limit(self, group: str) -> int:
        return int(getattr(self.limits, group))

    def check(self, user: str, app: str, group: str) -> tuple[dict[str, str], float | None]:
        """Headers for this response, and the Retry-After seconds if it must be refused."""
        limit = self.limit(group)
        window = self.limits.window
        now = time.monotonic()
        key = (user, app, group)
        headers = {"X-Rate-Limit-Group": group, "X-Rate-Limit-Limit": str(limit),
                   "X-Rate-Limit-Window": str(int(window))}
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - window:
                hits.popleft()
            penalty_until = self._penalty.get(key, 0.0)
            if now < penalty_until or len(hits) >= limit:
                # A request made during the penalty resets it: the client must stay silent.
                self._penalty[key] = now + self.limits.penalty
                headers["X-Rate-Limit-Remaining"] = "0"
                return headers, self.limits.penalty
            hits.append(now)
            headers["X-Rate-Limit-Remaining"] = str(limit - len(hits))
            return headers, None


class RingCentralEmulator:
    """The RingCentral side of the sandbox: accounts, tokens, subscriptions, limits."""

    def __init__(self, faults: FaultBook, accounts: list[Account], *, client_id: str, client_secret: str,
                 subscriber_key: str, subscription_ttl_max: float = 900.0, subscription_limit: int = 30,
                 access_token_ttl: float = 3600, refresh_token_ttl: float = 604800,
                 rate_limits: RateLimits | None = None, seed: int = 1) -> None:
        self.faults = faults
        self.accounts = list(accounts)
        self.client_id = client_id
        self.client_secret = client_secret
        self.subscriber_key = subscriber_key
        self.subscription_ttl_max = subscription_ttl_max
        self.subscription_limit = subscription_limit
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.rate_limiter = _RateLimiter(rate_limits) if rate_limits is not None else None
        self.base_url = "http://127.0.0.1"
        self._rng = random.Random(f"rc-{seed}")  # own stream: ids must not echo the app secret
        self._lock = threading.RLock()
        self._by_jwt = {a.jwt: a for a in accounts}
        self._access: dict[str, _Session] = {}
        self._refresh: dict[str, _Session] = {}
        self._subs: dict[str, _Subscription] = {}
        self.created_count: dict[str, int] = {a.account_id: 0 for a in accounts}
        self._counts: dict[str, dict[str, int]] = {
            a.account_id: {"created": 0, "renewed": 0, "deleted": 0, "tokens_issued": 0, "refreshed": 0}
            for a in accounts}
        self._missing_permissions: dict[str, set[str]] = {}  # account id -> app permissions it lacks
        # POST /restapi/oauth/wstoken: set by the WebSocket emulator (ingest/sandbox/websocket.py)
        self.ws_tokens: Callable[[_Session], dict[str, Any]] | None = None
        self.webhooks = WebhookDeliveries(self.blacklist)

    def _require_permission(self, account: Account, permission: str) -> None:
        with self._lock:
            lacking = permission in self._missing_permissions.get(account.account_id, set())
        if lacking:
            raise insufficient_permissions(permission)

    def revoke_permission(self, permission: str, account: str | None = None) -> None:
        """From now on, subscriptions asking for events that need `permission` are refused (403 CMN-401), and
        so is `GET .../extension/{id}` when it is `ReadAccounts`."""
        with self._lock:
            for account_id in self._accounts_matching(account):
                self._missing_permissions.setdefault(account_id, set()).add(permission)

    # ---- lookup ------------------------------------------------------------------------------
    def account(self, ref: str) -> Account:
        for a in self.accounts:
            if ref in (a.name, a.account_id):
                return a
        raise KeyError(f"unknown account {ref!r}")

    def _accounts_matching(self, ref: str | None) -> set[str]:
        return {a.account_id for a in self.accounts} if ref is None else {self.account(ref).account_id}

    # ---- OAuth -------------------------------------------------------------------------------
    def _new_token(self) -> str:
        # Opaque, like the platform's (`U1BCMDFUMDRKV1MwMXx...`); random, not derived from the seed.
        return base64.urlsafe_b64encode(b"SBX01|" + secrets.token_bytes(30)).decode().rstrip("=")

    def _issue(self, account: Account, client_id: str, access_ttl: float | None) -> dict[str, Any]:
        now = time.time()
        ttl = self.access_token_ttl if access_ttl is None else min(access_ttl, self.access_token_ttl)
        session = _Session(account, client_id, self._new_token(), now + ttl, self._new_token(),
                           now + self.refresh_token_ttl)
        self._access[session.access_token] = session
        self._refresh[session.refresh_token] = session
        self._counts[account.account_id]["tokens_issued"] += 1
        return {"access_token": session.access_token, "token_type": "bearer", "expires_in": max(0, int(ttl) - 1),
                "refresh_token": session.refresh_token,
                "refresh_token_expires_in": max(0, int(self.refresh_token_ttl) - 1),
                "scope": SCOPE, "owner_id": account.extension_id}

    def check_client(self, authorization: str | None) -> str:
        """The client id from a valid Basic header, else 401 invalid_client."""
        if not authorization or not authorization.startswith("Basic "):
            raise oauth_error(401, "invalid_client", "OAU-123", "Client authentication is required")
        try:
            cid, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        except ValueError:
            raise oauth_error(401, "invalid_client", "OAU-123", "Client authentication is required") from None
        if cid != self.client_id or not secrets.compare_digest(secret, self.client_secret):
            raise oauth_error(401, "invalid_client", "OAU-123", "Invalid client")
        return cid

    def token_user(self, form: dict[str, str]) -> str | None:
        """Which user a token request is about (for the Auth rate-limit group), without consuming it."""
        with self._lock:
            if form.get("grant_type") == JWT_GRANT:
                account = self._by_jwt.get(form.get("assertion", ""))
                return account.extension_id if account else None
            session = self._refresh.get(form.get("refresh_token", ""))
            return session.account.extension_id if session else None

    def token(self, client_id: str, form: dict[str, str]) -> dict[str, Any]:
        grant = form.get("grant_type")
        ttl = float(form["access_token_ttl"]) if form.get("access_token_ttl", "").isdigit() else None
        with self._lock:
            if grant == JWT_GRANT:
                account = self._by_jwt.get(form.get("assertion", ""))
                if account is None:
                    raise oauth_error(400, "invalid_grant", "OAU-140", "Invalid resource owner credentials")
                return self._issue(account, client_id, ttl)
            if grant == "refresh_token":
                session = self._refresh.pop(form.get("refresh_token", ""), None)
                if session is None or session.client_id != client_id:
                    raise oauth_error(400, "invalid_grant", "OAU-211", "Token is revoked")
                if time.time() >= session.refresh_expires:
                    raise oauth_error(400, "invalid_grant", "OAU-212", "Token is expired")
                # Single use: the refresh token is gone, and the access token it came with dies now.
                self._access.pop(session.access_token, None)
                self._counts[session.account.account_id]["refreshed"] += 1
                return self._issue(session.account, client_id, ttl)
        raise oauth_error(400, "unsupported_grant_type", "OAU-250", f"Unsupported grant type: {grant}")

    def revoke(self, token: str) -> None:
        """Ends the session the token (access or refresh) belongs to; unknown tokens are ignored."""
        with self._lock:
            session = self._access.get(token) or self._refresh.get(token)
            if session is not None:
                self._access.pop(session.access_token, None)
                self._refresh.pop(session.refresh_token, None)

    def authenticate(self, authorization: str | None) -> _Session:
        if not authorization:
            raise ApiError(401, {"errorCode": "AGW-401", "message": "Authorization header is not specified"})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise token_invalid("OAU-151", "Authorization method is not supported")
        with self._lock:
            session = self._access.get(token)
        if session is None:
            raise token_invalid("OAU-149", "Invalid token")
        if time.time() >= session.access_expires:
            raise token_invalid("OAU-128", "Access token expired")
        return session

    def revoke_refresh_tokens(self, account: str | None) -> int:
        ids = self._accounts_matching(account)
        with self._lock:
            doomed = [t for t, s in self._refresh.items() if s.account.account_id in ids]
            for t in doomed:
                del self._refresh[t]
        return len(doomed)

    def expire_access_tokens(self, account: str | None) -> int:
        ids = self._accounts_matching(account)
        now = time.time()
        n = 0
        with self._lock:
            for s in self._access.values():
                if s.account.account_id in ids and s.access_expires > now:
                    s.access_expires = now
                    n += 1
        return n

    # ---- subscriptions -----------------------------------------------------------------------
    def _new_channel(self, account: Account) -> str:
        return f"{self._rng.randrange(10**13, 10**16)}_{self._rng.getrandbits(32):08x}"

    def _new_key(self) -> str:
        return base64.b64encode(self._rng.getrandbits(128).to_bytes(16, "big")).decode()

    def _parse_filters(self, raw: Any, session: _Session) -> list[EventFilter]:
        if not isinstance(raw, list) or not raw:
            raise _bad_filters(raw if isinstance(raw, list) else [raw])
        filters = [parse_filter(f, session.account, session.account.extension_id, self.subscription_ttl_max)
                   for f in raw]
        for needed in dict.fromkeys(PERMISSIONS[f.kind] for f in filters if f.kind in PERMISSIONS):
            self._require_permission(session.account, needed)
        seen: dict[str, EventFilter] = {}
        for f in filters:  # duplicates collapse, as the effective filter list has each once
            seen.setdefault(f.expanded, f)
        return list(seen.values())

    def _expires_in(self, body: dict[str, Any], webhook: bool = False) -> float:
        longest = self.webhooks.ttl_max if webhook else self.subscription_ttl_max
        value = body.get("expiresIn")
        if value is None:
            return min(self.webhooks.ttl_default, longest) if webhook else longest
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise api_error(400, "CMN-101", "Parameter [expiresIn] value is invalid", parameterName="expiresIn")
        return min(float(value), longest)

    def create(self, session: _Session, body: dict[str, Any], transport: str = "PubNub") -> dict[str, Any]:
        """POST /subscription over REST (PubNub) or over a WebSocket session (`transport="WebSocket"`)."""
        mode = body.get("deliveryMode")
        kind = mode.get("transportType") if isinstance(mode, dict) else None
        # Over REST: PubNub or WebHook (ingest/sandbox/webhook.py); over a socket: WebSocket.
        if kind != transport and not (transport == "PubNub" and kind == "WebHook"):
            raise api_error(400, "CMN-101", "Parameter [deliveryMode.transportType] value is invalid",
                            parameterName="deliveryMode.transportType")
        assert isinstance(mode, dict)
        filters = self._parse_filters(body.get("eventFilters"), session)
        webhook = webhook_target(mode, self.webhooks) if kind == "WebHook" else None
        plaintext = transport != "PubNub"  # WebSocket delivers unencrypted and ignores expiresIn
        ttl = WEBSOCKET_LIFETIME if plaintext else self._expires_in(body, webhook=webhook is not None)
        encryption = mode.get("encryption") in (True, "true", "True")
        if any(f.kind in PRESENCE_KINDS for f in filters) and webhook is None:
            encryption = True  # forced for presence, whatever the client asked (§3.5)
        encryption = encryption and not plaintext
        now = time.time()
        account = session.account
        with self._lock:
            live = [s for s in self._subs.values() if s.account.account_id == account.account_id
                    and s.client_id == session.client_id and s.live(now)]
            if len(live) >= self.subscription_limit:
                raise api_error(403, "SUB-505", "Subscriptions limit exceeded")
            sub = _Subscription(str(uuid.UUID(int=self._rng.getrandbits(128), version=4)), account,
                                account.extension_id, session.client_id, filters, encryption,
                                self._new_key() if encryption else None,
                                webhook[0] if webhook else "" if plaintext else self._new_channel(account),
                                "" if plaintext or webhook else self.subscriber_key, now, now + ttl,
                                transport=kind if webhook else transport,
                                webhook_token=webhook[1] if webhook else None, webhook_lifetime=ttl)
            self._subs[sub.id] = sub
            self.created_count[account.account_id] += 1
            self._counts[account.account_id]["created"] += 1
            return self._info(sub, now)

    def _owned(self, session: _Session, subscription_id: str, now: float) -> _Subscription:
        sub = self._subs.get(subscription_id)
        if (sub is None or not sub.live(now) or sub.account.account_id != session.account.account_id
                or sub.client_id != session.client_id):
            raise not_found(subscription_id)
        return sub

    def list_for(self, session: _Session) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            records = [self._info(s, now) for s in self._subs.values()
                       if s.live(now) and s.account.account_id == session.account.account_id
                       and s.client_id == session.client_id]
        return {"uri": f"{self.base_url}{API}/subscription", "records": records}

    def get(self, session: _Session, subscription_id: str) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            return self._info(self._owned(session, subscription_id, now), now)

    def renew(self, session: _Session, subscription_id: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """POST .../renew (body None) or PUT (filters and/or expiresIn; other fields ignored)."""
        now = time.time()
        with self._lock:
            sub = self._owned(session, subscription_id, now)
            ttl = self.subscription_ttl_max
            if body:
                if "eventFilters" in body:
                    sub.filters = self._parse_filters(body["eventFilters"], session)
                    if (any(f.kind in PRESENCE_KINDS for f in sub.filters) and not sub.encryption
                            and sub.transport == "PubNub"):
                        sub.encryption, sub.key = True, self._new_key()
                ttl = self._expires_in(body, webhook=sub.webhook_token is not None)
            elif sub.webhook_token is not None:
                ttl = min(sub.webhook_lifetime, self.webhooks.ttl_max)  # renewed for the lifetime it was granted
            sub.expires_at = now + (WEBSOCKET_LIFETIME if sub.transport == "WebSocket" else ttl)
            self._apply_rotation(sub)
            sub.renewals += 1
            self._counts[sub.account.account_id]["renewed"] += 1
            return self._info(sub, now)

    def _apply_rotation(self, sub: _Subscription) -> None:
        if sub.rotate_key and sub.encryption:
            sub.key = self._new_key()
        if sub.rotate_channel:
            sub.channel = self._new_channel(sub.account)
        sub.rotate_key = sub.rotate_channel = False

    def delete(self, session: _Session, subscription_id: str) -> None:
        now = time.time()
        with self._lock:
            sub = self._owned(session, subscription_id, now)
            sub.deleted = True
            self._counts[sub.account.account_id]["deleted"] += 1

    def _info(self, sub: _Subscription, now: float) -> dict[str, Any]:
        mode: dict[str, Any] = {"transportType": "PubNub", "encryption": sub.encryption, "address": sub.channel,
                                "subscriberKey": sub.subscriber_key}
        if sub.transport != "PubNub":
            mode = {"transportType": sub.transport, "encryption": False}
        elif sub.encryption:
            mode["encryptionAlgorithm"] = "AES"
            mode["encryptionKey"] = sub.key
        info = {"uri": f"{self.base_url}{API}/subscription/{sub.id}", "id": sub.id,
                "creationTime": iso(sub.created_at), "status": "Active",
                "eventFilters": [f.expanded for f in sub.filters],
                "expirationTime": iso(sub.expires_at),
                "expiresIn": max(0, math.ceil(sub.expires_at - now) - 1), "deliveryMode": mode}
        if sub.webhook_token is not None:
            webhook_info(info, sub.channel, sub.webhook_token, sub.blacklisted)
        return info

    # ---- server-side operations (faults, assertions, generator) ------------------------------
    def blacklist(self, subscription_id: str, reason: str) -> None:
        """WebHook: RingCentral gives up on the address for good (no more deliveries; status Blacklisted)."""
        with self._lock:
            sub = self._subs[subscription_id]
            if sub.blacklisted is None:
                sub.blacklisted = (time.time(), reason)

    def expire_subscription(self, subscription_id: str) -> None:
        with self._lock:
            sub = self._subs[subscription_id]
            sub.expires_at = min(sub.expires_at, time.time())

    def delete_subscription_server_side(self, subscription_id: str) -> None:
        with self._lock:
            self._subs[subscription_id].deleted = True

    def rotate_on_next_renewal(self, subscription_id: str | None, key: bool = True, channel: bool = True) -> None:
        with self._lock:
            subs = list(self._subs.values()) if subscription_id is None else [self._subs[subscription_id]]
            for sub in subs:
                sub.rotate_key, sub.rotate_channel = key, channel

    def subscriptions(self, include_dead: bool = True) -> list[SubscriptionView]:
        now = time.time()
        with self._lock:
            subs = list(self._subs.values())
        views = []
        for s in subs:
            status = "Deleted" if s.deleted else "Active" if now < s.expires_at else "Expired"
            if not include_dead and status != "Active":
                continue
            views.append(SubscriptionView(
                s.id, s.account.name, s.account.account_id, s.extension_id, status, s.created_at, s.expires_at,
                s.deleted, s.channel, s.subscriber_key, s.key, s.encryption,
                tuple(f.expanded for f in s.filters), tuple(s.filters), s.renewals, s.transport, s.webhook_token))
        return views

    def is_live(self, subscription_id: str) -> bool:
        """Whether events may still be published for this subscription (checked per notification)."""
        sub = self._subs.get(subscription_id)
        return sub is not None and sub.live(time.time()) and sub.blacklisted is None

    def live_subscriptions(self) -> list[SubscriptionView]:
        return self.subscriptions(include_dead=False)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per account id: created, renewed, deleted, tokens_issued, refreshed, live."""
        live = self.live_subscriptions()
        with self._lock:
            out = {acct: dict(c) for acct, c in self._counts.items()}
        for acct, counts in out.items():
            counts["live"] = sum(1 for s in live if s.account_id == acct)
        return out

    @property
    def created_total(self) -> int:
        return sum(self.created_count.values())

    # ---- account info ------------------------------------------------------------------------
    def account_info(self, session: _Session, ref: str) -> dict[str, Any]:
        account = session.account
        if ref not in ("~", account.account_id):
            raise api_error(404, "CMN-102", "Resource for parameter [accountId] is not found",
                            parameterName="accountId")
        return {"uri": f"{self.base_url}{API}/account/{account.account_id}", "id": int(account.account_id),
                "serviceInfo": {"uri": f"{self.base_url}{API}/account/{account.account_id}/service-info"},
                "mainNumber": "+1650" + account.account_id[-7:].rjust(7, "0"), "status": "Confirmed",
                "setupWizardState": "Completed"}

    def extension_info(self, session: _Session, acct_ref: str, ext_ref: str) -> dict[str, Any]:
        account = session.account
        self._require_permission(account, "ReadAccounts")
        ext = account.extension_id if ext_ref == "~" else ext_ref
        if acct_ref not in ("~", account.account_id) or ext not in account.all_extensions():
            raise api_error(404, "CMN-102", "Resource for parameter [extensionId] is not found",
                            parameterName="extensionId")
        number = str(101 + account.all_extensions().index(ext))
        return {"uri": f"{self.base_url}{API}/account/{account.account_id}/extension/{ext}", "id": int(ext),
                "extensionNumber": number, "name": f"{account.name} {number}", "type": "User",
                "status": "Enabled",
                "account": {"uri": f"{self.base_url}{API}/account/{account.account_id}", "id": account.account_id}}


# ---- HTTP adapter --------------------------------------------------------------------------------

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_SUB_ITEM = re.compile(r"^/restapi/v1\.0/subscription/([^/]+)(/renew)?$")
_ACCOUNT_PATH = re.compile(r"^/restapi/v1\.0/account/([^/]+)(?:/extension/([^/]+))?$")

# Admin hook: (method, path under /sandbox, parsed JSON body) -> (status, JSON-able answer).
AdminHandler = Callable[[str, str, Any], tuple[int, Any]]


def _injected(status: int, endpoint: str, retry_after: int | None) -> ApiError:
    """The body of an injected failure: the same shapes as the real platform's."""
    if status == 429:
        err = api_error(429, "CMN-301", "Request rate exceeded")
        err.headers["Retry-After"] = str(60 if retry_after is None else retry_after)
        return err
    if status == 401:
        return token_invalid("OAU-128", "Access token expired")
    if endpoint == "token":
        return oauth_error(status, "temporarily_unavailable" if status == 503 else "server_error",
                           "CMN-201" if status == 503 else "CMN-500", "Service Temporary Unavailable"
                           if status == 503 else "Internal Server Error")
    if status == 503:
        err = api_error(503, "CMN-201", "Service Temporary Unavailable")
        if retry_after is not None:
            err.headers["Retry-After"] = str(retry_after)
        return err
    return api_error(status, "CMN-500" if status >= 500 else f"CMN-{status}", _REASONS.get(status, "Error"))


class RingCentralHandler(BaseHTTPRequestHandler):
    """Routes REST calls to a `RingCentralEmulator` (class attribute `emulator`); `/sandbox/*` to `admin`."""

    protocol_version = "HTTP/1.1"
    emulator: ClassVar[RingCentralEmulator]
    admin_api: ClassVar[list[AdminHandler]] = []  # zero or one handler (a list keeps it unbound)
    server_version = "nginx"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: URLs are harmless, but the sandbox stays quiet like the real service."""

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"Content-Length: {len(body)}",
                 "Connection: keep-alive", f"RCRequestId: {uuid.uuid4()}"]
        if payload is not None:
            lines.append("Content-Type: application/json; charset=utf-8")
        lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
        try:
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        except OSError:
            self.close_connection = True

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, raw: bytes) -> dict[str, Any]:
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            raise api_error(400, "CMN-101", "Parameter [body] value is invalid") from None
        if not isinstance(value, dict):
            raise api_error(400, "CMN-101", "Parameter [body] value is invalid")
        return value

    def _handle(self, method: str) -> None:
        raw = self._body()
        path = urlsplit(self.path).path.rstrip("/") or "/"
        headers: dict[str, str] = {}
        try:
            if path.startswith("/sandbox/"):
                self._admin(method, path, raw)
                return
            status, payload = self._dispatch(method, path, raw, headers)
        except ApiError as err:
            headers.update(err.headers)
            status, payload = err.status, err.body
        self._send(status, payload, headers)

    def _admin(self, method: str, path: str, raw: bytes) -> None:
        if not self.admin_api:
            self._send(404, {"error": "no admin API"})
            return
        try:
            body = json.loads(raw) if raw.strip() else {}
            status, answer = self.admin_api[0](method, path[len("/sandbox"):], body)
        except (ValueError, KeyError, TypeError) as exc:
            status, answer = 400, {"error": f"{type(exc).__name__}: {exc}"}
        self._send(status, answer)

    def _limit(self, user: str, group: str, headers: dict[str, str]) -> None:
        limiter = self.emulator.rate_limiter
        if limiter is None:
            return
        rl_headers, retry_after = limiter.check(user, self.emulator.client_id, group)
        headers.update(rl_headers)
        if retry_after is not None:
            headers["Retry-After"] = str(math.ceil(retry_after))
            raise api_error(429, "CMN-301", "Request rate exceeded")

    def _fault(self, endpoint: str) -> None:
        hit = self.emulator.faults.take("rc-error", endpoint=endpoint)
        if hit is not None:
            raise _injected(int(hit["status"]), endpoint, hit.get("retry_after"))

    def _dispatch(  # noqa: PLR0911, PLR0912, PLR0915 - one flat routing table reads best
        self, method: str, path: str, raw: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        em = self.emulator
        if path == "/restapi/oauth/token" and method == "POST":
            client_id = em.check_client(self.headers.get("Authorization"))
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            self._limit(em.token_user(form) or f"client:{client_id}", "auth", headers)
            self._fault("token")
            return 200, em.token(client_id, form)
        if path == "/restapi/oauth/revoke" and method == "POST":
            em.check_client(self.headers.get("Authorization"))
            self._fault("revoke")
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            em.revoke(form.get("token", ""))
            return 200, None
        if path == "/restapi/oauth/wstoken" and method == "POST" and em.ws_tokens is not None:
            session = em.authenticate(self.headers.get("Authorization"))
            self._limit(session.account.extension_id, "auth", headers)
            self._fault("wstoken")
            return 200, em.ws_tokens(session)
        if not path.startswith(API + "/"):
            raise api_error(404, "CMN-120", "Invalid URI")
        session = em.authenticate(self.headers.get("Authorization"))
        user = session.account.extension_id
        if path == f"{API}/subscription":
            if method == "POST":
                self._limit(user, "medium", headers)
                self._fault("create")
                return 200, em.create(session, self._json(raw))
            if method == "GET":
                self._limit(user, "light", headers)
                self._fault("list")
                return 200, em.list_for(session)
            raise api_error(405, "CMN-114", "Method not allowed")
        m = _SUB_ITEM.match(path)
        if m:
            sub_id, renew = m.group(1), m.group(2)
            if renew and method == "POST":
                self._limit(user, "light", headers)
                self._fault("renew")
                return 200, em.renew(session, sub_id, None)
            if not renew and method == "GET":
                self._limit(user, "light", headers)
                self._fault("get")
                return 200, em.get(session, sub_id)
            if not renew and method == "PUT":
                self._limit(user, "medium", headers)
                self._fault("put")
                return 200, em.renew(session, sub_id, self._json(raw))
            if not renew and method == "DELETE":
                self._limit(user, "medium", headers)
                self._fault("delete")
                em.delete(session, sub_id)
                return 204, None
            raise api_error(405, "CMN-114", "Method not allowed")
        m = _ACCOUNT_PATH.match(path)
        if m and method == "GET":
            self._limit(user, "light", headers)
            if m.group(2) is None:
                self._fault("account")
                return 200, em.account_info(session, m.group(1))
            self._fault("extension")
            return 200, em.extension_info(session, m.group(1), m.group(2))
        raise api_error(404, "CMN-120", "Invalid URI")
