"""Event generator: realistic RingCentral notifications, published to each live subscription's channel.

For every live subscription and each of its event filters the generator builds the notification
that filter would receive (bodies modelled on the reference's examples, §3.4), wraps it in the real
envelope (`uuid`, `event`, `timestamp`, `subscriptionId`, `ownerId`, `body`) with the real variation
(numeric or string ids, `...Z` or `...+0000` timestamps, the `~` or numeric account in `event`,
optional fields missing now and then), serializes it compactly, encrypts it with the subscription's
AES key when encryption is on (the `Cipher` of ingest/crypto.py) and publishes it on the PubNub
emulator. Everything published is recorded as a `Generated`, which end-to-end tests compare with
what reached Kafka.

On request it emits malformed payloads instead: bad Base64, the wrong key, bad PKCS#7 padding,
invalid JSON, or a well-formed envelope whose body violates the schema.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from Crypto.Cipher import AES

from ingest.data.crypto import BLOCK, Cipher, DecryptError, decode_key
from ingest.sandbox.pubnub import PubNubEmulator
from ingest.sandbox.ringcentral import EventFilter, RingCentralEmulator, SubscriptionView

KINDS = ("message-store", "instant-sms", "presence", "detailed-presence", "telephony-sessions", "extension-list",
         "voicemail", "fax", "extension-info", "missed-calls", "subscription-reminder", "account-presence",
         "presence-line", "dnd-status", "call-queue-presence", "favorites", "grant-list", "emergency-address",
         "company-directory", "contact-center-numbers", "a2p-batches", "a2p-messages", "a2p-opt-outs", "sms-consents",
         "message-threads", "team-posts", "team-chats", "team-webhooks", "ringsense", "webinar", "start-ring",
         "stop-ring", "inbound-messages")
FLAT_KINDS = frozenset({"missed-calls", "start-ring", "stop-ring", "inbound-messages"})  # mobile push: no `body`
MALFORMED = ("bad-base64", "wrong-key", "bad-padding", "invalid-json", "schema-violation")
_CIPHER_FAULTS = frozenset({"bad-base64", "wrong-key", "bad-padding"})
# How a notification reaches a subscription of a plaintext transport: (subscription, JSON bytes) -> its position.
Route = Callable[[SubscriptionView, bytes], int]
_COMPACT = (",", ":")


@dataclass(frozen=True)
class Generated:
    """One published notification, exactly as it went on the wire."""

    uuid: str | None  # None when the receiver cannot read one (bad base64, wrong key, bad padding, bad JSON)
    subscription_id: str
    account_id: str
    event: str
    kind: str
    malformed: str | None
    channel: str
    timetoken: int
    payload: str | dict[str, Any]  # the `d` value: Base64 text when encrypted, the object when not
    plaintext: bytes | None = None  # the JSON bytes before encryption (None when there were none)
    subscriber_key: str = ""
    published_at: float = 0.0


@dataclass
class _Ctx:
    rng: random.Random
    account_id: str
    extension_id: str
    extensions: tuple[str, ...]
    now: float
    expires_in: int

    def id(self, value: str) -> int | str:
        """Ids arrive as JSON numbers in some payloads and as strings in others (§3.1)."""
        return int(value) if self.rng.random() < 0.5 else value

    def ts(self, offset: float = 0.0, zulu: bool | None = None) -> str:
        return timestamp(self.now + offset, self.rng.random() < 0.5 if zulu is None else zulu)

    def phone(self) -> str:
        return "+1" + str(self.rng.randrange(2002000000, 9899999999))

    def big_id(self) -> str:
        return str(self.rng.randrange(10**11, 10**13))


def timestamp(ts: float, zulu: bool) -> str:
    """Both forms seen in real notifications: `2016-02-18T09:37:24.597Z` and `...597+0000`."""
    text = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    return text + ("Z" if zulu else "+0000")


_NAMES = ("John Smith", "Maria Garcia", "Wei Chen", "Amara Okafor", "Lars Nilsson", "Priya Patel")
_TELEPHONY = ("NoCall", "CallConnected", "Ringing", "OnHold", "ParkedCall")
_WORDS = ("meeting", "tomorrow", "invoice", "please", "call", "back", "about", "the", "contract", "thanks",
          "shipment", "delayed", "confirm", "schedule", "update", "urgent", "review", "customer")


def _text(rng: random.Random, n_bytes: int) -> str:
    words: list[str] = []
    size = 0
    while size < n_bytes:
        w = rng.choice(_WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:max(n_bytes, 1)]


def _message_store(c: _Ctx) -> dict[str, Any]:
    changes: list[dict[str, Any]] = [
        {"type": c.rng.choice(("SMS", "Pager", "VoiceMail", "Fax")), "updatedCount": c.rng.randrange(0, 3),
         "newCount": c.rng.randrange(0, 3)} for _ in range(c.rng.randrange(1, 3))]
    if c.rng.random() < 0.5:  # the 2023 form lists the new message ids
        for ch in changes:
            ch["newMessageIds"] = [int(c.big_id()) for _ in range(int(ch["newCount"]))]
    return {"accountId": c.id(c.account_id), "extensionId": c.id(c.extension_id),
            "lastUpdated": c.ts(-0.2), "changes": changes}


def _message(c: _Ctx, kind: str) -> dict[str, Any]:
    msg_id = c.big_id()
    base = f"/restapi/v1.0/account/{c.account_id}/extension/{c.extension_id}/message-store/{msg_id}"
    body: dict[str, Any] = {
        "id": msg_id, "to": [{"phoneNumber": c.phone(), "location": "Moss Beach, CA"}],
        "from": {"phoneNumber": c.phone(), "name": c.rng.choice(_NAMES)},
        "type": kind, "creationTime": c.ts(-0.5, True), "lastModifiedTime": c.ts(-0.5, True),
        "readStatus": "Unread", "priority": "Normal", "direction": "Inbound", "availability": "Alive",
        "subject": _text(c.rng, c.rng.randrange(8, 60)), "messageStatus": "Received",
    }
    if kind == "SMS":
        body["conversationId"] = str(c.rng.randrange(10**18, 10**19))
        body["attachments"] = [{"uri": f"{base}/content/{msg_id}", "id": msg_id, "type": "Text",
                                "contentType": "text/plain", "size": c.rng.randrange(10, 4096)}]
    elif kind == "VoiceMail":
        body["vmTranscriptionStatus"] = c.rng.choice(("NotAvailable", "Completed", "InProgress"))
        body["attachments"] = [{"uri": f"{base}/content/{msg_id}", "id": msg_id, "type": "AudioRecording",
                                "contentType": "audio/mpeg", "vmDuration": c.rng.randrange(3, 120),
                                "size": c.rng.randrange(10000, 900000)}]
    else:  # Fax
        body["faxPageCount"] = c.rng.randrange(1, 12)
        body["faxResolution"] = c.rng.choice(("High", "Low"))
        body["attachments"] = [{"uri": f"{base}/content/{msg_id}", "id": msg_id, "type": "RenderedDocument",
                                "contentType": "application/pdf", "size": c.rng.randrange(20000, 900000)}]
    if c.rng.random() < 0.2:  # optional fields are sometimes absent
        del body["priority"]
    return body


def _presence(c: _Ctx) -> dict[str, Any]:
    body: dict[str, Any] = {
        "extensionId": c.id(c.extension_id), "telephonyStatus": c.rng.choice(_TELEPHONY),
        "sequence": c.rng.randrange(1, 100000), "presenceStatus": c.rng.choice(("Available", "Busy", "Offline")),
        "userStatus": c.rng.choice(("Available", "Busy", "Offline")), "dndStatus": "TakeAllCalls",
        "meetingStatus": "Disconnected", "allowSeeMyPresence": True, "ringOnMonitoredCall": False,
        "pickUpCallsOnHold": False}
    if c.rng.random() < 0.3:
        for optional in ("meetingStatus", "ringOnMonitoredCall", "pickUpCallsOnHold"):
            body.pop(optional)
    return body


def _active_call(c: _Ctx) -> dict[str, Any]:
    session = c.big_id()
    return {"id": uuidlib.UUID(int=c.rng.getrandbits(128)).hex, "direction": c.rng.choice(("Inbound", "Outbound")),
            "from": c.phone(), "fromName": c.rng.choice(_NAMES), "to": c.phone(),
            "telephonyStatus": c.rng.choice(_TELEPHONY[1:]), "startTime": c.ts(-30, True), "sessionId": session,
            "partyId": f"cs{c.rng.randrange(10**17, 10**18)}-2",
            "telephonySessionId": base64.b64encode(f"cs{session}@10.32.45.84".encode()).decode().rstrip("=")}


def _detailed_presence(c: _Ctx) -> dict[str, Any]:
    body = _presence(c)
    calls = [_active_call(c) for _ in range(c.rng.randrange(0, 3))]
    body["activeCalls"] = calls
    body["totalActiveCalls"] = len(calls)
    return body


def _party(c: _Ctx, ext: str) -> dict[str, Any]:
    return {"accountId": c.id(c.account_id), "extensionId": c.id(ext),
            "id": f"p-{c.rng.getrandbits(128):032x}-{c.rng.randrange(1, 9)}",
            "direction": c.rng.choice(("Inbound", "Outbound")),
            "to": {"phoneNumber": c.phone(), "name": c.rng.choice(_NAMES), "extensionId": ext},
            "from": {"phoneNumber": c.phone()},
            "status": {"code": c.rng.choice(("Setup", "Proceeding", "Answered", "Disconnected", "Hold")),
                       "rcc": False},
            "park": {}, "missedCall": False, "standAlone": False, "muted": False}


def _telephony(c: _Ctx) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sequence": c.rng.randrange(1, 50), "sessionId": c.big_id(),
        "telephonySessionId": f"s-{c.rng.getrandbits(128):032x}", "serverId": "10.13.22.28.TAM",
        "eventTime": c.ts(-0.05, True), "parties": [_party(c, c.extension_id)], "origin": {"type": "Call"}}
    if c.rng.random() < 0.3:
        del body["serverId"]
    return body


def _extension_list(c: _Ctx) -> dict[str, Any]:
    events = []
    for _ in range(c.rng.randrange(1, 4)):
        event: dict[str, Any] = {"extensionId": str(c.rng.choice(c.extensions)),
                                 "eventType": c.rng.choice(("Create", "Update", "Delete"))}
        if event["eventType"] == "Update":
            event["hints"] = c.rng.sample(["ExtensionInfo", "CompanyNumbers", "Permissions", "AnsweringRules"], 2)
        events.append(event)
    return {"extensions": events}


def _extension_info(c: _Ctx) -> dict[str, Any]:
    return {"extensionId": c.id(c.extension_id), "eventType": "Update",
            "hints": [c.rng.choice(("ExtensionInfo", "Permissions", "AnsweringRules"))]}


def _ring(c: _Ctx, action: str) -> dict[str, Any]:
    """The flat call fields of a mobile-push call event (IncomingCallEvent / MissedCallEvent)."""
    fields: dict[str, Any] = {
        "extensionId": c.id(c.extension_id), "action": action, "sessionId": c.big_id(),
        "serverId": "10.13.22.28.TAM", "from": c.phone(), "fromName": c.rng.choice(_NAMES), "to": c.phone(),
        "toName": c.rng.choice(_NAMES), "sid": c.big_id(), "pn_ttl": 30, "pn_apns": {"aps": {"content-available": 1}}}
    if c.rng.random() < 0.3:  # GCM sends `from` as `_from`
        fields["_from"] = fields.pop("from")
    return fields


def _inbound_message(c: _Ctx) -> dict[str, Any]:
    return {"aps": {"alert": {"title": c.rng.choice(_NAMES), "body": _text(c.rng, 30)}, "badge": "1",
                    "sound": "default"},
            "messageId": c.big_id(), "conversationId": c.big_id(), "from": c.phone(), "to": c.phone()}


def _reminder(c: _Ctx) -> dict[str, Any]:
    return {"expiresIn": c.expires_in}


def _presence_line(c: _Ctx) -> dict[str, Any]:
    lines = [{"id": c.id(ext)} for ext in c.rng.sample(c.extensions, min(2, len(c.extensions)))]
    # The page's table shows one `extension{id}`, its example an array of the monitored lines.
    return {"extension": lines if c.rng.random() < 0.5 else lines[0], "sequence": c.rng.randrange(1, 100000)}


def _dnd(c: _Ctx) -> dict[str, Any]:
    return {"extensionId": c.id(c.extension_id), "dndStatus": c.rng.choice(
        ("TakeAllCalls", "DoNotAcceptAnyCalls", "DoNotAcceptDepartmentCalls", "TakeDepartmentCallsOnly"))}


def _call_queue_presence(c: _Ctx) -> dict[str, Any]:
    """The specification's shape, the page's table's and the page's example's (they all disagree)."""
    roll = c.rng.random()
    if roll < 0.4:
        return {"extensionId": c.id(c.extension_id), "callQueueId": c.id(c.big_id()),
                "acceptCalls": c.rng.random() < 0.5}
    if roll < 0.7:
        return {"member": {"id": c.id(c.extension_id)}, "acceptCurrentQueueCalls": c.rng.random() < 0.5}
    return {"records": [{"member": {"id": c.id(ext)}, "acceptCurrentQueueCalls": c.rng.random() < 0.5}
                        for ext in c.extensions]}


def _extension_signal(c: _Ctx) -> dict[str, Any]:
    """Favorites and grant lists: only which extension changed (re-read it through the API)."""
    body: dict[str, Any] = {"extensionId": c.id(c.extension_id)}
    if c.rng.random() < 0.5:
        body["ownerId"] = c.id(c.extension_id)
    return body


def _company_directory(c: _Ctx) -> dict[str, Any]:
    name = c.rng.choice(_NAMES)
    body: dict[str, Any] = {
        "id": c.id(c.rng.choice(c.extensions)), "eventType": c.rng.choice(("Create", "Update", "Delete")),
        "type": "User", "status": c.rng.choice(("Enabled", "Disabled", "NotActivated")),
        "firstName": name.split()[0], "lastName": name.split()[1], "name": name, "extensionNumber": "101",
        "account": {"id": c.id(c.account_id)}, "site": {"id": "main-site", "name": "Main"},
        "phoneNumbers": [{"phoneNumber": c.phone(), "usageType": "DirectNumber", "type": "VoiceFax"}]}
    if body["eventType"] == "Delete":  # a deletion names the entry only
        body = {"id": body["id"], "eventType": "Delete"}
    # The specification's body is one entry; the guide's example wraps the entries in `contacts`.
    return {"contacts": [body]} if c.rng.random() < 0.5 else body


def _contact_center_number(c: _Ctx) -> dict[str, Any]:
    return {"eventType": c.rng.choice(("Created", "Updated", "Deleted")), "phoneNumberInfo": {
        "id": c.id(c.big_id()), "phoneNumber": c.phone(), "paymentType": "Local", "type": "VoiceFax",
        "usageType": "ContactCenterNumber", "status": "Normal", "contactCenterProvider": {"id": "1", "name": "RingCX"}}}


def _a2p_batch(c: _Ctx) -> dict[str, Any]:
    size = c.rng.randrange(1, 500)
    return {"id": f"{c.rng.getrandbits(40):010x}", "from": c.phone(), "batchSize": size,
            "processedCount": c.rng.randrange(0, size + 1), "status": c.rng.choice(("Processing", "Completed")),
            "creationTime": c.ts(-5), "lastModifiedTime": c.ts(-0.1)}


def _a2p_message(c: _Ctx) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": c.big_id(), "from": c.phone(), "to": c.phone(), "text": _text(c.rng, c.rng.randrange(5, 120)),
        "creationTime": c.ts(-2), "lastModifiedTime": c.ts(-0.1), "segmentCount": 1, "cost": 0.007,
        "messageStatus": c.rng.choice(("Queued", "Delivered", "Sent", "SendingFailed", "DeliveryFailed")),
        "batchId": f"{c.rng.getrandbits(40):010x}", "direction": c.rng.choice(("Inbound", "Outbound"))}
    if body["messageStatus"].endswith("Failed"):
        body["errorCode"] = "SMS-RC-410"
    return body


def _a2p_opt_out(c: _Ctx) -> dict[str, Any]:
    return {"from": c.phone(), "to": c.phone(), "active": c.rng.random() < 0.7}  # false: an opt-in


def _sms_consents(c: _Ctx) -> dict[str, Any]:
    nanos = f"{c.rng.randrange(10**9):09d}"  # consent records carry 9 fractional digits
    stamp = c.ts(-1, True)[:-4] + f"{nanos}Z"
    return {"records": [{"from": c.phone(), "to": c.phone(), "optStatus": c.rng.choice(("OptOut", "OptIn")),
                         "source": "Recipient", "lastModifiedTime": stamp} for _ in range(c.rng.randrange(1, 3))]}


def _message_threads(c: _Ctx) -> dict[str, Any]:
    return {"lastModifiedTime": c.ts(-0.3)}


def _nullable(c: _Ctx, body: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """Team-messaging examples carry `null` for absent fields; sometimes they are left out instead."""
    for name in fields:
        if c.rng.random() < 0.5:
            body[name] = None
    return body


def _team_post(c: _Ctx) -> dict[str, Any]:
    event_type = c.rng.choice(("PostAdded", "PostChanged", "PostRemoved"))
    body: dict[str, Any] = {"id": c.big_id(), "groupId": c.big_id(), "eventType": event_type}
    if event_type == "PostRemoved":  # only the ids
        return body
    body.update({"type": "TextMessage", "text": _text(c.rng, 40), "creatorId": c.id(c.extension_id),
                 "creationTime": c.ts(-1, True), "lastModifiedTime": c.ts(-0.5, True)})
    return _nullable(c, body, ("addedPersonIds", "attachments", "activity", "title", "iconUri", "mentions"))


def _team_chat(c: _Ctx) -> dict[str, Any]:
    event_type = c.rng.choice(("GroupRenamed", "GroupJoined", "GroupLeft", "GroupChanged"))
    body: dict[str, Any] = {"id": c.big_id(), "eventType": event_type}
    if event_type == "GroupLeft":  # only the leaver is told, with the id alone
        return body
    members = [str(e) for e in c.extensions]
    body.update({"name": _text(c.rng, 12), "type": c.rng.choice(("PrivateChat", "Group", "Team", "PersonalChat")),
                 "isPublic": c.rng.random() < 0.5, "creationTime": c.ts(-100, True), "lastModifiedTime": c.ts(-1, True),
                 "members": members if c.rng.random() < 0.5 else [{"id": m} for m in members]})
    return _nullable(c, body, ("description",))


def _team_webhook(c: _Ctx) -> dict[str, Any]:
    hook: dict[str, Any] = {
        "id": f"{c.rng.getrandbits(64):016x}", "creatorId": c.id(c.extension_id), "groupIds": [c.big_id()],
        "creationTime": c.ts(-100, True), "lastModifiedTime": c.ts(-1, True),
        "uri": f"https://hooks.ringcentral.com/webhook/{c.rng.getrandbits(64):016x}", "status": "Active"}
    event_type = c.rng.choice(("WebhookCreated", "WebhookUpdated", "WebhookDeleted"))
    if event_type == "WebhookUpdated":  # the change as before/after
        return {"eventType": event_type, "before": {"status": "Active"}, "after": {**hook, "status": "Suspended"}}
    return {"eventType": event_type, **hook}


def _ringsense(c: _Ctx) -> dict[str, Any]:
    return {"sourceRecordId": c.id(c.big_id()), "sourceSessionId": c.big_id(), "domain": "pbx", "title": "Call",
            "recordingDurationMs": c.rng.randrange(1000, 3_600_000), "recordingStartTime": c.ts(-600, True),
            "creationTime": c.ts(-1, True), "lastModifiedTime": c.ts(-1, True),
            "insights": {"Summary": [{"value": _text(c.rng, 60)}]}}


def _webinar(c: _Ctx) -> dict[str, Any]:
    return {"id": c.big_id(), "webinarId": c.id(c.big_id()), "sessionId": c.big_id(),
            "status": c.rng.choice(("Scheduled", "Active", "Finished")), "lastModifiedTime": c.ts(-1, True)}


_BODIES: dict[str, Callable[[_Ctx], dict[str, Any]]] = {
    "message-store": _message_store,
    "instant-sms": lambda c: _message(c, "SMS"),
    "voicemail": lambda c: _message(c, "VoiceMail"),
    "fax": lambda c: _message(c, "Fax"),
    "presence": _presence,
    "detailed-presence": _detailed_presence,
    "telephony-sessions": _telephony,
    "extension-list": _extension_list,
    "extension-info": _extension_info,
    "missed-calls": lambda c: _ring(c, "Missed"),
    "start-ring": lambda c: _ring(c, "StartRing"),
    "stop-ring": lambda c: _ring(c, "StopRing"),
    "inbound-messages": _inbound_message,
    "subscription-reminder": _reminder,
    "account-presence": _presence,
    "presence-line": _presence_line,
    "dnd-status": _dnd,
    "call-queue-presence": _call_queue_presence,
    "favorites": _extension_signal,
    "grant-list": _extension_signal,
    "emergency-address": lambda c: {"extensionId": c.id(c.extension_id), "deviceId": c.id(c.big_id())},
    "company-directory": _company_directory,
    "contact-center-numbers": _contact_center_number,
    "a2p-batches": _a2p_batch,
    "a2p-messages": _a2p_message,
    "a2p-opt-outs": _a2p_opt_out,
    "sms-consents": _sms_consents,
    "message-threads": _message_threads,
    "team-posts": _team_post,
    "team-chats": _team_chat,
    "team-webhooks": _team_webhook,
    "ringsense": _ringsense,
    "webinar": _webinar,
}


def _pad(c: _Ctx, kind: str, body: dict[str, Any], deficit: int) -> bool:
    """Grow realistic fields by about `deficit` bytes; False when this kind has nothing to grow."""
    if kind in ("instant-sms", "voicemail", "fax"):
        body["subject"] = body["subject"] + " " + _text(c.rng, deficit)
    elif kind == "message-store":
        while deficit > 0:
            ids = [int(c.big_id()) for _ in range(min(20, max(1, deficit // 14)))]
            body["changes"].append({"type": "SMS", "updatedCount": 0, "newCount": len(ids), "newMessageIds": ids})
            deficit -= 60 + 14 * len(ids)
    elif kind == "detailed-presence":
        if len(body["activeCalls"]) >= 7:  # the platform lists the latest 7 calls at most
            return False
        while deficit > 0 and len(body["activeCalls"]) < 7:
            body["activeCalls"].append(_active_call(c))
            deficit -= 380
        body["totalActiveCalls"] = len(body["activeCalls"])
    elif kind == "telephony-sessions":
        while deficit > 0:
            body["parties"].append(_party(c, c.rng.choice(c.extensions)))
            deficit -= 380
    elif kind == "extension-list":
        while deficit > 0:
            body["extensions"].append({"extensionId": str(c.rng.choice(c.extensions)), "eventType": "Update",
                                       "hints": ["ExtensionInfo"]})
            deficit -= 70
    else:
        return False
    return True


class Generator:
    """Publishes generated notifications to the live subscriptions of a RingCentral emulator."""

    def __init__(self, rc: RingCentralEmulator, pubnub: PubNubEmulator, *, seed: int = 1, payload_size: int = 0,
                 missing_ratio: float = 0.05) -> None:
        self._rc = rc
        self._pubnub = pubnub
        self._rng = random.Random(f"generator-{seed}")  # own stream: ids must not echo the app secret
        self.payload_size = payload_size
        self.missing_ratio = missing_ratio
        self._lock = threading.RLock()
        self._generated: list[Generated] = []
        self._ciphers: dict[str, Cipher] = {}
        self._offset = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # transportType -> route, for transports other than PubNub (they carry the JSON unencrypted)
        self.routes: dict[str, Route] = {}
        self.replayed = 0  # messages published by start_prepared()

    # ---- recorded output ---------------------------------------------------------------------
    @property
    def generated(self) -> list[Generated]:
        """A snapshot of everything published so far, in publish order."""
        with self._lock:
            return list(self._generated)

    def snapshot(self) -> list[Generated]:
        return self.generated

    def count(self) -> int:
        with self._lock:
            return len(self._generated)

    # ---- publishing --------------------------------------------------------------------------
    def targets(self, kinds: Iterable[str] | None = None) -> list[tuple[SubscriptionView, EventFilter]]:
        wanted = None if kinds is None else set(kinds)
        if wanted is not None and not wanted <= set(KINDS):
            raise ValueError(f"unknown kinds {sorted(wanted - set(KINDS))}; known: {', '.join(KINDS)}")
        return [(s, f) for s in self._rc.live_subscriptions() for f in s.filters
                if wanted is None or f.kind in wanted]

    def publish(self, n: int, kinds: Iterable[str] | None = None, malformed: str | None = None) -> list[Generated]:
        """Publish `n` notifications now, round-robin over the (live subscription, matching filter)
        pairs; all malformed with that reason if `malformed` is given. Returns what was published
        (empty when no live subscription matches)."""
        if malformed is not None and malformed not in MALFORMED:
            raise ValueError(f"unknown malformation {malformed!r}; one of {', '.join(MALFORMED)}")
        return self._publish(n, kinds, lambda: malformed)

    def _publish(self, n: int, kinds: Iterable[str] | None, reason: Callable[[], str | None]) -> list[Generated]:
        targets = self.targets(kinds)
        if not targets or n <= 0:
            return []
        out: list[Generated] = []
        with self._lock:
            while len(out) < n and targets:
                index = self._offset % len(targets)
                sub, flt = targets[index]
                if not self._rc.is_live(sub.id):  # lapsed since the snapshot: silently no more events
                    del targets[index]
                    continue
                self._offset += 1
                out.append(self._one(sub, flt, reason()))
            self._generated.extend(out)
        return out

    def _cipher(self, key: str) -> Cipher:
        cipher = self._ciphers.get(key)
        if cipher is None:
            cipher = self._ciphers[key] = Cipher(key)
        return cipher

    def notification(self, sub: SubscriptionView, flt: EventFilter, now: float | None = None) -> dict[str, Any]:
        """One notification envelope for this subscription and filter (not published)."""
        rng = self._rng
        now = time.time() if now is None else now
        ext = flt.extension_id or sub.extension_id
        account = self._rc.account(sub.account_id)
        ctx = _Ctx(rng, sub.account_id, ext, account.all_extensions(), now, max(0, int(sub.expires_at - now)))
        body = _BODIES[flt.kind](ctx)
        event = self._event_path(flt, sub)
        note_id = str(uuidlib.UUID(int=rng.getrandbits(128), version=4)) if rng.random() < 0.5 \
            else str(rng.randrange(10**18, 9 * 10**18))
        envelope: dict[str, Any] = {"uuid": note_id, "event": event, "timestamp": ctx.ts(),
                                    "subscriptionId": sub.id, "ownerId": sub.extension_id}
        if flt.kind in FLAT_KINDS:
            envelope.update(body)  # mobile push is flat: the fields sit beside the envelope's
            if flt.kind == "inbound-messages":
                del envelope["timestamp"]  # InboundMessageEvent has none
        else:
            envelope["body"] = body
        if rng.random() < self.missing_ratio:
            del envelope[rng.choice(("subscriptionId", "ownerId"))]
        if self.payload_size > 0:
            for _ in range(3):
                deficit = self.payload_size - len(json.dumps(envelope, separators=_COMPACT))
                if deficit <= 16 or not _pad(ctx, flt.kind, body, deficit):
                    break
        return envelope

    def _event_path(self, flt: EventFilter, sub: SubscriptionView) -> str:
        """The `event` of a notification: the filter, with the documented variations of its account part."""
        roll = self._rng.random()
        if flt.kind == "subscription-reminder":
            return flt.requested  # the filter string exactly as subscribed (§3.6)
        if flt.kind == "sms-consents" and roll < 0.3:  # the guide's example keeps the placeholder
            return flt.expanded.replace(f"/accounts/{sub.account_id}/", "/accounts/{accountId}/")
        if flt.kind == "team-chats" and roll < 0.2:  # an outgoing-webhook example reports this path (G2)
            return f"/restapi/v1.0/account/{sub.account_id}/extension/{sub.extension_id}/glip/groups"
        return flt.tilde if roll < 0.3 else flt.expanded  # older events keep `account/~`

    def _one(self, sub: SubscriptionView, flt: EventFilter, malformed: str | None) -> Generated:
        route = self.routes.get(sub.transport)
        if route is not None and malformed in _CIPHER_FAULTS:
            malformed = "invalid-json"  # a plaintext transport has no Base64 or AES to break
        envelope = self.notification(sub, flt)
        note_uuid: str | None = envelope["uuid"]
        if malformed == "schema-violation":
            # Valid JSON, readable uuid and event, but a body that is no object and a bad timestamp.
            envelope["body"] = f"{flt.kind} body lost in transit"
            envelope["timestamp"] = "yesterday"
        plaintext = json.dumps(envelope, separators=_COMPACT, ensure_ascii=False).encode()
        if malformed == "invalid-json":
            plaintext = plaintext[: len(plaintext) // 2]
        if route is not None:
            position = route(sub, plaintext)
            return Generated(None if malformed == "invalid-json" else note_uuid, sub.id, sub.account_id,
                             envelope["event"], flt.kind, malformed, sub.channel, position,
                             plaintext.decode("utf-8", "replace") if malformed == "invalid-json" else envelope,
                             plaintext, sub.subscriber_key, time.time())
        payload: str | dict[str, Any]
        if malformed in ("bad-base64", "wrong-key", "bad-padding") or (malformed and sub.encryption):
            payload = self._broken(sub, plaintext, malformed or "")
        elif sub.encryption and sub.key is not None:
            payload = self._cipher(sub.key).encrypt(plaintext)
        elif malformed == "invalid-json":
            payload = plaintext.decode("utf-8", "replace")  # a string where an object belongs
        else:
            payload = envelope
        if malformed not in (None, "schema-violation"):
            note_uuid = None
        if isinstance(payload, dict):
            tt = self._pubnub.publish_serialized(sub.subscriber_key, sub.channel, plaintext.decode())
        else:
            tt = self._pubnub.publish(sub.subscriber_key, sub.channel, payload)
        return Generated(note_uuid, sub.id, sub.account_id, envelope["event"], flt.kind, malformed, sub.channel,
                         tt, payload, plaintext, sub.subscriber_key, time.time())

    def _broken(self, sub: SubscriptionView, plaintext: bytes, reason: str) -> str:
        key = sub.key or base64.b64encode(self._rng.getrandbits(128).to_bytes(16, "big")).decode()
        if reason == "bad-base64":
            good = self._cipher(key).encrypt(plaintext)
            return "%" + good[1:-4] + "!*"  # characters outside the Base64 alphabet
        if reason == "wrong-key":
            while True:  # a key under which the real key's unpadding fails (it succeeds ~1/256 by chance)
                other = base64.b64encode(self._rng.getrandbits(128).to_bytes(16, "big")).decode()
                text = self._cipher(other).encrypt(plaintext)
                try:
                    self._cipher(key).decrypt(text)
                except DecryptError:
                    return text
        if reason == "bad-padding":
            fill = BLOCK - len(plaintext) % BLOCK
            raw = plaintext + b"\x00" * fill  # a zero pad byte is never valid PKCS#7
            return base64.b64encode(AES.new(decode_key(key), AES.MODE_ECB).encrypt(raw)).decode()
        # invalid-json / schema-violation on an encrypted subscription: well encrypted, bad inside.
        return self._cipher(key).encrypt(plaintext)

    # ---- steady traffic ----------------------------------------------------------------------
    def start(self, rate_per_second: float, kinds: Iterable[str] | None = None, malformed_ratio: float = 0.0) -> None:
        """Publish about `rate_per_second` notifications per second in a background thread until stop()."""
        self.stop()
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be > 0")
        kind_list = None if kinds is None else list(kinds)
        self.targets(kind_list)  # validates the kinds now, not in the thread

        def reason() -> str | None:
            return self._rng.choice(MALFORMED) if malformed_ratio and self._rng.random() < malformed_ratio else None

        # Counted even with no live target: the rate is a rate of attempts.
        self._pace(rate_per_second, lambda due: self._publish(due, kind_list, reason))

    def start_prepared(self, rate_per_second: float, messages: Sequence[tuple[str, str, str]]) -> None:
        """Publish pre-built (subscribe key, channel, data JSON text) messages round-robin at about
        `rate_per_second` until stop(): load that costs the sandbox no generation or encryption (the
        benchmarks' steady traffic). Not recorded in `generated`; `replayed` counts them."""
        self.stop()
        if rate_per_second <= 0 or not messages:
            raise ValueError("rate_per_second must be > 0 and messages not empty")
        by_key: dict[str, list[tuple[str, str]]] = {}
        for sub_key, channel, data_json in messages:
            by_key.setdefault(sub_key, []).append((channel, data_json))
        # Cycled as one sequence per key (the sandbox has one key), keeping the round-robin order.
        cycles = {key: itertools.cycle(items) for key, items in by_key.items()}

        def publish_due(due: int) -> None:
            per_key = -(-due // len(cycles))
            for key, cycle in cycles.items():
                self._pubnub.publish_many(key, itertools.islice(cycle, per_key))
                self.replayed += per_key

        self._pace(rate_per_second, publish_due)

    def _pace(self, rate_per_second: float, publish_due: Callable[[int], object]) -> None:
        """Call `publish_due(n)` every 20 ms in a background thread with what the rate owes since the start."""
        self._stop.clear()

        def run() -> None:
            start = time.monotonic()
            sent = 0
            while not self._stop.wait(0.02):
                due = int((time.monotonic() - start) * rate_per_second) - sent
                if due > 0:
                    publish_due(due)
                    sent += due

        self._thread = threading.Thread(target=run, name="sandbox-generator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
