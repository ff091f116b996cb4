"""Values shared by the control plane and the data plane."""

from __future__ import annotations

from dataclasses import dataclass, field

TRANSPORTS = ("pubnub", "websocket")  # an account's `transport` (config); pubnub by default (what existing apps use)


@dataclass(frozen=True)
class Delivery:
    """Where and how to read one spec's notifications; the control plane's word to the data plane."""

    spec_id: str
    account_id: str
    subscription_id: str
    subscriber_key: str
    channel: str
    encryption_key: str | None = field(repr=False)  # a secret: never in a repr, log or error
    expires_at: float
    # Set when this subscription replaces one that expired first (e.g. RingCentral was down through
    # the renewals): that expiry, the start of a window in which RingCentral published nothing.
    lapsed_since: float | None = None
    # "expired" (lapsed_since is its expiry), or "gone": found deleted or expired server-side before
    # its expiry (lapsed_since is when RingCentral last answered for it), or "blacklisted" (WebHook:
    # RingCentral stopped delivering; lapsed_since is its `blacklistedAt`, else when last confirmed).
    lapse_reason: str | None = None
    # deliveryMode.transportType: "PubNub" (encrypted or not), "WebSocket" or "WebHook" (JSON bytes as they arrived).
    transport: str = "PubNub"
    # WebHook: the token every delivery of this subscription carries (the receiver checks it). A secret.
    verification_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SubscriptionSpec:
    """A desired subscription: which account, which event filters."""

    spec_id: str  # "<account name>/<subscription name>"
    account: str
    event_filters: tuple[str, ...]
