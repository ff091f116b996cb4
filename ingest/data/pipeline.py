"""One notification in, one Kafka record out: decrypt -> parse -> route -> validate -> `Outcome`.

Pure: no I/O, no logging, no metrics. `Pipeline.process` never raises; a notification that cannot be
published to its family topic becomes a dead letter whose `error` names the reason (`REASONS`).

The record value is the decrypted notification exactly as RingCentral serialised it (no
re-serialisation). When the subscription is unencrypted the PubNub SDK has already parsed the JSON
into a dict; that dict is serialised once, compactly (orjson: no spaces, UTF-8, keys in their
original order; NaN/Infinity, which are not JSON, become null).

Hot-path notes: everything that depends only on the family (topic, header pairs), on the channel
(key, spec id, subscription id) or on the event path (family, path account key, event header) is
built once and cached; per message only the values that really vary (uuid, timestamp, timetoken)
are encoded.

Record contract (documented for consumers in docs/records.md):

- key: numeric account id, ASCII (from `/restapi/v1.0/account/<digits>/`, else the channel's account)
- headers (values UTF-8): `event`, `family`, `subscription-id`, `uuid` (when the notification has
  one), `timestamp` (notification's own, as sent), `timetoken` (PubNub, decimal), `schema-id`
  (`$id` of the schema that validated the record), `spec-id`
- dead letters add `error-class` (the reason label), `error-message` (human readable, secrets
  redacted) and `original-encoding` (`ENCODING_*`); their value is the original payload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from ingest.data.catalogue import Catalogue, Family
from ingest.data.crypto import BAD_BASE64, BAD_LENGTH, BAD_PADDING, Cipher, DecryptError
from ingest.model import Delivery
from ingest.observability.logs import redact, register_secret
from ingest.topology import TopicNames

# Header names (str for confluent-kafka; values are bytes).
H_EVENT = "event"
H_FAMILY = "family"
H_SUBSCRIPTION_ID = "subscription-id"
H_UUID = "uuid"
H_TIMESTAMP = "timestamp"
H_TIMETOKEN = "timetoken"
H_SCHEMA_ID = "schema-id"
H_SPEC_ID = "spec-id"
H_ERROR_CLASS = "error-class"
H_ERROR_MESSAGE = "error-message"
H_ORIGINAL_ENCODING = "original-encoding"

# Dead-letter reasons (the `error` of an Outcome, the `error-class` header, the metrics label).
NO_ENCRYPTION_KEY = "no-encryption-key"  # a string payload on a channel that has no key
INVALID_JSON = "invalid-json"  # decrypted bytes are not RFC 8259 JSON (or not UTF-8)
NOT_AN_OBJECT = "not-an-object"  # valid JSON, but not an object
SCHEMA_VIOLATION = "schema-violation"  # the envelope or the family schema rejects it
TOO_LARGE = "too-large"  # payload above max_payload_bytes; the dead letter keeps its first bytes
UNKNOWN_PAYLOAD_TYPE = "unknown-payload-type"  # neither str nor JSON (a Python object the SDK should not give)
INTERNAL_ERROR = "internal-error"  # a bug in the pipeline; the message never escapes
REASONS = (BAD_BASE64, BAD_LENGTH, BAD_PADDING, NO_ENCRYPTION_KEY, INVALID_JSON, NOT_AN_OBJECT,
           SCHEMA_VIOLATION, TOO_LARGE, UNKNOWN_PAYLOAD_TYPE, INTERNAL_ERROR)
_KEY_DEPENDENT = frozenset({BAD_PADDING, INVALID_JSON, NOT_AN_OBJECT})  # worth a retry with the previous key

# `original-encoding` of a dead letter's value.
ENCODING_CIPHERTEXT = b"base64-ciphertext"  # the Base64 string as received
ENCODING_TEXT = b"text"  # a string received on a channel without a key, UTF-8
ENCODING_JSON = b"json"  # an already-parsed payload (dict, list, ...) serialised as compact JSON
ENCODING_REPR = b"python-repr"  # not JSON-serialisable: Python repr()

UNKNOWN_FAMILY = "unknown"  # family label of dead letters that could not be read far enough
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024  # PubNub caps messages at 32 KiB; Kafka's default record limit is 1 MB
MAX_HEADER_TEXT = 1024  # envelope strings copied into dead-letter headers are cut to this length
MAX_ERROR_MESSAGE = 512
_TARGET_CACHE_SIZE = 4096
_MAX_CACHED_EVENT_LEN = 1024


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # never fails, even on lone surrogates


class ChannelContext:
    """Per-channel constants: build once per Delivery, reuse for every message of the channel."""

    __slots__ = ("_encryption_key", "account_id", "cipher", "key", "plaintext", "previous_cipher", "spec_header",
                 "spec_id", "subscription_header", "subscription_id")

    def __init__(self, spec_id: str, subscription_id: str, account_id: str, cipher: Cipher | None = None,
                 previous_cipher: Cipher | None = None, *, encryption_key: str | None = None,
                 plaintext: bool = False) -> None:
        self.spec_id = spec_id
        self.subscription_id = subscription_id
        self.account_id = account_id
        self.cipher = cipher
        self.previous_cipher = previous_cipher
        self._encryption_key = encryption_key  # only to tell a key rotation from a renewal; never shown
        self.plaintext = plaintext  # the transport hands on JSON bytes as they arrived (WebSocket), never encrypted
        self.key = _utf8(account_id)
        self.spec_header = (H_SPEC_ID, _utf8(spec_id))
        self.subscription_header = (H_SUBSCRIPTION_ID, _utf8(subscription_id))

    @classmethod
    def from_delivery(cls, delivery: Delivery, previous: ChannelContext | None = None) -> ChannelContext:
        """A context for `delivery`; with `previous`, a rotated-out key stays usable as fallback.

        When the key changed, the previous context's key becomes `previous_cipher` (messages
        encrypted before the rotation may still be in flight or replayed). When it did not change,
        the previous fallback is carried over. The caller drops the fallback after its grace period
        by building a context without `previous`.
        """
        key = delivery.encryption_key
        register_secret(key)
        cipher = Cipher(key) if key else None
        fallback: Cipher | None = None
        if previous is not None:
            if previous.cipher is not None and previous._encryption_key != key:
                fallback = previous.cipher
            else:
                fallback = previous.previous_cipher
        return cls(delivery.spec_id, delivery.subscription_id, delivery.account_id, cipher, fallback,
                   encryption_key=key, plaintext=delivery.transport != "PubNub")


@dataclass(slots=True, kw_only=True, repr=False, eq=False)
class Outcome:
    """One processed notification: a record for its family topic, or a dead letter (`error` set)."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    family: str
    uuid: str | None
    event_time: float | None  # the notification's timestamp as unix seconds (lag metric)
    error: str | None

    def header(self, name: str) -> bytes | None:
        """The first header called `name` (convenience for tests and tools; not for the hot path)."""
        return next((v for k, v in self.headers if k == name), None)

    def __repr__(self) -> str:
        return (f"Outcome(topic={self.topic!r}, family={self.family!r}, error={self.error!r}, "
                f"uuid={self.uuid!r}, {len(self.value)} bytes)")


class _Reject(Exception):
    """Internal control flow: this notification becomes a dead letter with `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _FamilyOut:
    """Per-family constants: topic and the header pairs that never change."""

    __slots__ = ("family", "family_header", "name", "schema_header", "topic")

    def __init__(self, family: Family, topic: str) -> None:
        self.family = family
        self.name = family.name
        self.topic = topic
        self.family_header = (H_FAMILY, _utf8(family.name))
        self.schema_header = (H_SCHEMA_ID, _utf8(family.schema_id))


class _Target:
    """Per-event-path constants: family, the account key from the path (if numeric), event header."""

    __slots__ = ("event_header", "out", "path_key")

    def __init__(self, out: _FamilyOut, path_key: bytes | None, event_header: tuple[str, bytes]) -> None:
        self.out = out
        self.path_key = path_key
        self.event_header = event_header


def _event_time(timestamp: object) -> float | None:
    """Unix seconds of `2014-03-12T20:47:54.712+0000` or `2016-02-18T09:37:24.597Z` (fromisoformat, 3.11+)."""
    if type(timestamp) is not str or len(timestamp) > 64:
        return None
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # RingCentral stamps in UTC
    return moment.timestamp()


def _open(cipher: Cipher, payload: str) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = cipher.decrypt(payload)
    except DecryptError as exc:
        raise _Reject(exc.reason, str(exc)) from None
    return raw, _parse(raw)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Reject(INVALID_JSON, f"payload is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise _Reject(NOT_AN_OBJECT, f"notification is a JSON {type(doc).__name__}, not an object")
    return doc


def _serialise(payload: object) -> bytes:
    """Compact JSON of an already-parsed payload; falls back to the stdlib for what orjson refuses."""
    try:
        return orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError):
        # Integers beyond 64 bits, non-str keys, lone surrogates: the stdlib copes (ASCII-escaped).
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("ascii")


class Pipeline:
    """Turns notifications into Outcomes; one instance per worker, safe to share across channels."""

    def __init__(self, catalogue: Catalogue, topics: TopicNames, *,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.catalogue = catalogue
        self.topics = topics
        self.max_payload_bytes = max_payload_bytes
        self._outs = {name: _FamilyOut(fam, topics.for_family(name)) for name, fam in catalogue.families.items()}
        self._no_event = _Target(self._outs[catalogue.default.name], None, (H_EVENT, b""))
        self._targets: dict[str, _Target] = {}

    def process(self, payload: object, ctx: ChannelContext, timetoken: int) -> Outcome:
        """Decrypt, parse, route and validate one notification. Never raises."""
        raw: bytes | None = None
        doc: dict[str, Any] | None = None
        target: _Target | None = None
        try:
            raw, doc = self._decode(payload, ctx)
            event = doc.get("event")
            target = self._target(event) if type(event) is str else self._no_event
            out = target.out
            try:
                valid = out.family.validator.is_valid(doc)
            except ValueError as exc:  # a dict holding Python objects JSON has no type for
                raise _Reject(UNKNOWN_PAYLOAD_TYPE, f"payload holds a non-JSON value: {exc}") from None
            if not valid:
                raise _Reject(SCHEMA_VIOLATION, self._violation(out.family, doc))

            uuid = doc.get("uuid")
            timestamp = doc.get("timestamp")
            subscription = doc.get("subscriptionId")
            headers = [target.event_header, out.family_header,
                       ctx.subscription_header if subscription is None or subscription == ctx.subscription_id
                       else (H_SUBSCRIPTION_ID, _utf8(subscription)),
                       (H_TIMETOKEN, str(timetoken).encode("ascii")), out.schema_header, ctx.spec_header]
            if uuid is not None:
                headers.append((H_UUID, uuid.encode("utf-8", "surrogatepass")))
            if timestamp is not None:
                headers.append((H_TIMESTAMP, timestamp.encode("utf-8", "surrogatepass")))
            return Outcome(topic=out.topic, key=target.path_key or ctx.key, value=raw, headers=headers,
                           family=out.name, uuid=uuid, event_time=_event_time(timestamp), error=None)
        except _Reject as rejected:
            return self._dead(payload, ctx, timetoken, rejected.reason, rejected.message,
                              doc=doc, target=target, raw=raw)
        except Exception as exc:
            return self._internal_error(payload, ctx, timetoken, exc)

    def _decode(self, payload: object, ctx: ChannelContext) -> tuple[bytes, dict[str, Any]]:
        """The record value and the parsed notification, or `_Reject`."""
        if isinstance(payload, bytes) and ctx.plaintext:  # JSON as it arrived (WebSocket): the record value
            return self._checked_size(payload), _parse(payload)
        if isinstance(payload, str):
            if ctx.cipher is None:
                raise _Reject(NO_ENCRYPTION_KEY, "string payload on a channel without an encryption key")
            if len(payload) > self.max_payload_bytes:
                raise _Reject(TOO_LARGE, f"payload of {len(payload)} characters exceeds {self.max_payload_bytes}")
            try:
                return _open(ctx.cipher, payload)
            except _Reject as first:
                if ctx.previous_cipher is None or first.reason not in _KEY_DEPENDENT:
                    raise
                try:  # encrypted before a key rotation?
                    return _open(ctx.previous_cipher, payload)
                except _Reject:
                    raise _Reject(first.reason, first.message + " (previous key tried too)") from None
        if isinstance(payload, dict):
            try:
                raw = orjson.dumps(payload)
                doc: dict[str, Any] = payload
            except (TypeError, orjson.JSONEncodeError):
                # Integers beyond 64 bits, non-str keys, lone surrogates: the stdlib copes (ASCII-escaped);
                # validate what the record will really hold.
                try:
                    raw = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("ascii")
                except (TypeError, ValueError, RecursionError) as exc:
                    raise _Reject(UNKNOWN_PAYLOAD_TYPE,
                                  f"payload dict is not JSON-serialisable ({type(exc).__name__})") from None
                doc = _parse(raw)
            return self._checked_size(raw), doc
        if payload is None or isinstance(payload, list | int | float | bool):
            raise _Reject(NOT_AN_OBJECT, f"payload is a JSON {type(payload).__name__}, not an object")
        raise _Reject(UNKNOWN_PAYLOAD_TYPE, f"payload of Python type {type(payload).__name__} is neither str nor dict")

    def _checked_size(self, raw: bytes) -> bytes:
        if len(raw) > self.max_payload_bytes:
            raise _Reject(TOO_LARGE, f"payload of {len(raw)} bytes exceeds {self.max_payload_bytes}")
        return raw

    def _internal_error(self, payload: object, ctx: ChannelContext, timetoken: int, exc: Exception) -> Outcome:
        message = f"internal error in the pipeline ({type(exc).__name__})"
        try:
            return self._dead(payload, ctx, timetoken, INTERNAL_ERROR, message)
        except Exception:  # last resort: a dead letter without the payload, still never an exception
            return Outcome(topic=self.topics.dead_letter, key=ctx.key, value=b"",
                           headers=[(H_ERROR_CLASS, INTERNAL_ERROR.encode()), (H_ERROR_MESSAGE, message.encode())],
                           family=UNKNOWN_FAMILY, uuid=None, event_time=None, error=INTERNAL_ERROR)

    def _target(self, event: str) -> _Target:
        target = self._targets.get(event)
        if target is None:
            route = self.catalogue.route(event)
            path_key = route.account_id.encode("ascii") if route.account_id else None
            target = _Target(self._outs[route.family.name], path_key, (H_EVENT, _utf8(event)))
            if len(event) <= _MAX_CACHED_EVENT_LEN:
                if len(self._targets) >= _TARGET_CACHE_SIZE:
                    self._targets.clear()  # bounded; real traffic has a handful of distinct paths
                self._targets[event] = target
        return target

    # -- dead letters ----------------------------------------------------------------------------

    @staticmethod
    def _violation(family: Family, doc: dict[str, Any]) -> str:
        error = next(iter(family.validator.iter_errors(doc)), None)
        if error is None:
            return f"rejected by {family.schema_id}"
        where = "/".join(str(p) for p in error.instance_path) or "(root)"
        return f"{family.name}: at {where}: {error.message}"

    def _dead(self, payload: object, ctx: ChannelContext, timetoken: int, reason: str, message: str, *,
              doc: dict[str, Any] | None = None, target: _Target | None = None, raw: bytes | None = None) -> Outcome:
        """A dead letter: original payload as value, headers as far as known, error details."""
        value, encoding = self._original(payload, ctx, raw)
        message = redact(message)[:MAX_ERROR_MESSAGE]
        headers: list[tuple[str, bytes]] = [ctx.spec_header, (H_TIMETOKEN, str(timetoken).encode("ascii"))]
        family = UNKNOWN_FAMILY
        uuid: str | None = None
        event_time: float | None = None
        subscription_header = ctx.subscription_header
        if target is not None and doc is not None:
            family = target.out.name
            headers += [target.event_header, target.out.family_header, target.out.schema_header]
            text = {name: doc.get(field) for name, field in
                    ((H_UUID, "uuid"), (H_TIMESTAMP, "timestamp"), (H_SUBSCRIPTION_ID, "subscriptionId"))}
            for name, field_value in text.items():
                if isinstance(field_value, str) and field_value:
                    pair = (name, _utf8(field_value[:MAX_HEADER_TEXT]))
                    if name == H_SUBSCRIPTION_ID:
                        subscription_header = pair
                    else:
                        headers.append(pair)
            raw_uuid = text[H_UUID]
            uuid = raw_uuid if isinstance(raw_uuid, str) else None
            event_time = _event_time(text[H_TIMESTAMP])
        headers += [subscription_header, (H_ERROR_CLASS, reason.encode("ascii")),
                    (H_ERROR_MESSAGE, _utf8(message)), (H_ORIGINAL_ENCODING, encoding)]
        return Outcome(topic=self.topics.dead_letter, key=ctx.key, value=value, headers=headers, family=family,
                       uuid=uuid, event_time=event_time, error=reason)

    def _original(self, payload: object, ctx: ChannelContext, raw: bytes | None) -> tuple[bytes, bytes]:
        """The payload as received, as bytes (cut to max_payload_bytes so Kafka accepts the record)."""
        limit = self.max_payload_bytes
        if isinstance(payload, bytes) and ctx.plaintext:
            return payload[:limit], ENCODING_TEXT
        if isinstance(payload, str):
            encoding = ENCODING_CIPHERTEXT if ctx.cipher is not None else ENCODING_TEXT
            return _utf8(payload[:limit])[:limit], encoding
        if raw is not None and payload is not None and isinstance(payload, dict):
            return raw[:limit], ENCODING_JSON
        try:
            return _serialise(payload)[:limit], ENCODING_JSON
        except (TypeError, ValueError, RecursionError):
            try:
                return _utf8(repr(payload))[:limit], ENCODING_REPR
            except Exception:
                return b"", ENCODING_REPR
