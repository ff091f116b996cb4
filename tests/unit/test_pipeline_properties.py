"""Property tests: whatever arrives, `process` returns; bad input is a dead letter, good input its topic."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ingest.data.catalogue import default_catalogue
from ingest.data.crypto import Cipher
from ingest.data.pipeline import (
    INVALID_JSON,
    NO_ENCRYPTION_KEY,
    NOT_AN_OBJECT,
    REASONS,
    SCHEMA_VIOLATION,
    TOO_LARGE,
    ChannelContext,
    Outcome,
    Pipeline,
)
from ingest.model import Delivery
from ingest.topology import TopicNames

KEY = base64.b64encode(b"property-test-k!").decode()
OTHER_KEY = base64.b64encode(b"another-key-16b!").decode()
ACCOUNT = "400131004"
CAT = default_catalogue()
PIPELINE = Pipeline(CAT, TopicNames("rc", catalogue=CAT), max_payload_bytes=256 * 1024)
CIPHER = Cipher(KEY)
CTX = ChannelContext.from_delivery(Delivery("acme/all", ACCOUNT, "sub-prop", "sub-c-x", "ch_1", KEY, 0.0))
PLAIN_CTX = ChannelContext.from_delivery(Delivery("acme/all", ACCOUNT, "sub-prop", "sub-c-x", "ch_2", None, 0.0))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def check_invariants(out: Outcome, ctx: ChannelContext = CTX) -> None:
    """What holds for every outcome, good or bad."""
    assert isinstance(out.value, bytes) and isinstance(out.key, bytes)
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in out.headers)
    assert out.key.isdigit()  # an account id, never `~`
    h = dict(out.headers)
    assert h["spec-id"] == b"acme/all"
    if out.error is None:
        assert out.topic != "rc.dead-letter"
        assert "error-class" not in h
    else:
        assert out.error in REASONS
        assert out.topic == "rc.dead-letter"
        assert out.key == ctx.key
        assert h["error-class"] == out.error.encode()
        assert KEY.encode() not in h["error-message"] and OTHER_KEY.encode() not in h["error-message"]
        assert len(h["error-message"]) <= 4 * 512


# -- strategies for valid notifications ---------------------------------------------------------

SAFE_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
NUMERIC = st.integers(min_value=1, max_value=10**14)
IDS = st.one_of(NUMERIC, NUMERIC.map(str))
SEGMENT = st.one_of(st.just("~"), NUMERIC.map(str))
STAMPS = st.datetimes(min_value=datetime(2010, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)).flatmap(
    lambda d: st.sampled_from([d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}" + z
                               for z in ("Z", "+0000")]))
UUIDS = st.one_of(st.uuids().map(str), st.integers(min_value=0, max_value=10**19).map(str))
PHONE = st.fixed_dictionaries({"phoneNumber": st.from_regex(r"\+1[0-9]{10}", fullmatch=True)},
                              optional={"name": SAFE_TEXT, "extensionId": IDS, "location": SAFE_TEXT})
TEL = st.sampled_from(["NoCall", "CallConnected", "Ringing", "OnHold", "ParkedCall"])
PRES = st.sampled_from(["Offline", "Busy", "Available"])
DIRECTION = st.sampled_from(["Inbound", "Outbound"])
EXTRA = st.dictionaries(st.from_regex(r"x[A-Za-z]{1,8}", fullmatch=True),
                        st.one_of(SAFE_TEXT, st.integers(), st.booleans(), st.none()), max_size=2)


def with_extra(body: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """RingCentral adds fields over time: unknown fields must not matter."""
    return st.builds(lambda b, e: {**e, **b}, body, EXTRA)


PRESENCE_BODY = st.fixed_dictionaries(
    {"extensionId": IDS},
    optional={"telephonyStatus": TEL, "presenceStatus": PRES, "userStatus": PRES, "sequence": st.integers(0, 10**6),
              "dndStatus": st.sampled_from(["TakeAllCalls", "DoNotAcceptAnyCalls"]),
              "allowSeeMyPresence": st.booleans(),
              "meetingStatus": st.sampled_from(["Connected", "Disconnected"])})
ACTIVE_CALL = st.fixed_dictionaries({}, optional={
    "id": SAFE_TEXT, "direction": DIRECTION, "from": SAFE_TEXT, "to": SAFE_TEXT, "telephonyStatus": TEL,
    "sessionId": IDS, "startTime": STAMPS, "queueCall": st.booleans()})
DETAILED_BODY = st.builds(lambda b, calls: {**b, "activeCalls": calls, "totalActiveCalls": len(calls)},
                          PRESENCE_BODY, st.lists(ACTIVE_CALL, max_size=7))
CHANGE = st.fixed_dictionaries(
    {"type": st.sampled_from(["Fax", "SMS", "VoiceMail", "Voicemail", "Pager"])},
    optional={"newCount": st.integers(0, 99), "updatedCount": st.integers(0, 99),
              "newMessageIds": st.lists(IDS, max_size=3)})
MESSAGE_BODY = st.fixed_dictionaries({"changes": st.lists(CHANGE, max_size=4)},
                                     optional={"extensionId": IDS, "accountId": IDS, "lastUpdated": STAMPS})


def message_record(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"id": IDS, "type": st.just(kind), "from": PHONE, "to": st.lists(PHONE, min_size=1, max_size=3)},
        optional={"subject": SAFE_TEXT, "creationTime": STAMPS, "direction": DIRECTION, "readStatus": SAFE_TEXT,
                  "attachments": st.lists(st.fixed_dictionaries({"id": IDS, "uri": SAFE_TEXT},
                                                                optional={"size": st.integers(0, 10**7)}), max_size=2)})


PARTY = st.fixed_dictionaries(
    {"status": st.fixed_dictionaries({"code": st.sampled_from(["Setup", "Proceeding", "Answered", "Disconnected"])})},
    optional={"id": SAFE_TEXT, "accountId": IDS, "extensionId": IDS, "direction": DIRECTION, "from": PHONE,
              "to": PHONE, "missedCall": st.booleans()})
TELEPHONY_BODY = st.fixed_dictionaries(
    {"telephonySessionId": SAFE_TEXT, "parties": st.lists(PARTY, min_size=1, max_size=3)},
    optional={"sequence": st.integers(0, 10**4), "sessionId": IDS, "eventTime": STAMPS})
EXT_CHANGE = st.fixed_dictionaries({"extensionId": IDS, "eventType": st.sampled_from(["Create", "Update", "Delete"])},
                                   optional={"hints": st.lists(SAFE_TEXT, max_size=3)})
EXT_LIST_BODY = st.fixed_dictionaries({"extensions": st.lists(EXT_CHANGE, max_size=4)})
REMINDER_BODY = st.fixed_dictionaries({"expiresIn": st.integers(0, 900)})
EXT_INFO_BODY = st.fixed_dictionaries({"extensionId": IDS}, optional={
    "eventType": st.sampled_from(["Update", "Delete"]), "hints": st.lists(SAFE_TEXT, max_size=3), "deviceId": IDS})
DND_BODY = st.fixed_dictionaries({"extensionId": IDS, "dndStatus": st.sampled_from(
    ["TakeAllCalls", "DoNotAcceptAnyCalls", "DoNotAcceptDepartmentCalls", "TakeDepartmentCallsOnly", "Unknown"])})
LINE_BODY = st.fixed_dictionaries({"extension": st.fixed_dictionaries({"id": IDS})},
                                  optional={"sequence": st.integers(0, 10**6)})
THREADS_BODY = st.fixed_dictionaries({"lastModifiedTime": STAMPS})
E164 = st.from_regex(r"\+1[0-9]{10}", fullmatch=True)
OPT_OUT_BODY = st.fixed_dictionaries({"from": E164, "to": E164}, optional={"active": st.booleans()})
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | SAFE_TEXT,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SAFE_TEXT, inner, max_size=3),
                        max_leaves=10)
OTHER_BODY = st.dictionaries(SAFE_TEXT, ANY_JSON, max_size=4)

ACCT = "/restapi/v1.0/account/{a}"
EXT = ACCT + "/extension/{e}"
FAMILIES: dict[str, tuple[list[str], st.SearchStrategy[dict[str, Any]]]] = {
    "presence": ([EXT + "/presence", EXT + "/presence?detailedTelephonyState=false"], PRESENCE_BODY),
    "detailed-presence": ([EXT + "/presence?detailedTelephonyState=true",
                           EXT + "/presence?sipData=true&detailedTelephonyState=true"], DETAILED_BODY),
    "message-store": ([EXT + "/message-store", EXT + "/message-store?type=SMS&direction=Inbound"], MESSAGE_BODY),
    "instant-message": ([EXT + "/message-store/instant?type=SMS"], message_record("SMS")),
    "voicemail": ([EXT + "/voicemail"], message_record("VoiceMail")),
    "fax": ([EXT + "/fax", EXT + "/fax?direction=Inbound"], message_record("Fax")),
    "telephony-sessions": ([ACCT + "/telephony/sessions", EXT + "/telephony/sessions?direction=Inbound"],
                           TELEPHONY_BODY),
    "extension-list": ([ACCT + "/extension"], EXT_LIST_BODY),
    "subscription-reminder": (["/restapi/v1.0/subscription/~?threshold=120&interval=60"], REMINDER_BODY),
    "other": (["/restapi/v1.0/account/{a}/unheard-of/{e}", "/brand-new/v2/thing"], OTHER_BODY),
    "mobile-push": ([EXT + "/missed-calls"], OTHER_BODY),  # flat payloads; a `body`, when there, is any object
    "extension-info": ([EXT, EXT + "/favorite", EXT + "/grant", ACCT + "/device/8021/emergency-address"],
                       EXT_INFO_BODY),
    "dnd-status": ([EXT + "/presence/dnd"], DND_BODY),
    "presence-line": ([EXT + "/presence/line"], LINE_BODY),
    "message-threads": ([ACCT + "/message-threads/sync", ACCT + "/message-threads/entries/sync"], THREADS_BODY),
    "a2p-sms": ([ACCT + "/a2p-sms/opt-outs"], OPT_OUT_BODY),
}


@st.composite
def notifications(draw: st.DrawFn, family: str | None = None) -> tuple[str, dict[str, Any]]:
    name = family or draw(st.sampled_from(sorted(FAMILIES)))
    paths, body = FAMILIES[name]
    event = draw(st.sampled_from(paths)).format(a=draw(SEGMENT), e=draw(SEGMENT))
    envelope = draw(st.fixed_dictionaries({}, optional={
        "uuid": UUIDS, "timestamp": STAMPS, "subscriptionId": st.uuids().map(str), "ownerId": IDS}))
    # Real payloads put the fields in different orders; keep the draw's order.
    doc = {**envelope, "event": event, "body": draw(with_extra(body))}
    return name, doc


def expected_topic(family: str) -> str:
    return PIPELINE.topics.for_family(family)


def expected_key(doc: dict[str, Any]) -> bytes:
    account = doc["event"].split("/")[4] if doc["event"].startswith("/restapi/v1.0/account/") else "~"
    return (ACCOUNT if account == "~" else account.split("?")[0]).encode()


# -- good notifications ---------------------------------------------------------------------------


@SETTINGS
@given(notifications())
def test_valid_encrypted_notifications_reach_their_family_topic(item: tuple[str, dict[str, Any]]) -> None:
    family, doc = item
    plaintext = compact(doc)
    out = PIPELINE.process(CIPHER.encrypt(plaintext), CTX, 17_000_000_000_000_000)
    check_invariants(out)
    assert out.error is None, dict(out.headers).get("error-message")
    assert out.family == family
    assert out.topic == expected_topic(family)
    assert out.value == plaintext
    assert out.key == expected_key(doc)
    assert out.uuid == doc.get("uuid")
    assert dict(out.headers).get("uuid") == (doc["uuid"].encode() if "uuid" in doc else None)
    if "timestamp" in doc:
        assert out.event_time is not None and 1.26e9 < out.event_time < 2.21e9


@SETTINGS
@given(notifications())
def test_valid_unencrypted_notifications_reach_their_family_topic(item: tuple[str, dict[str, Any]]) -> None:
    family, doc = item
    out = PIPELINE.process(copy.deepcopy(doc), PLAIN_CTX, 1)
    check_invariants(out, PLAIN_CTX)
    assert (out.error, out.family, out.topic) == (None, family, expected_topic(family))
    assert json.loads(out.value) == doc


# -- bad notifications ---------------------------------------------------------------------------


@SETTINGS
@given(st.text(max_size=2000))
def test_random_text_is_a_dead_letter(payload: str) -> None:
    out = PIPELINE.process(payload, CTX, 1)
    check_invariants(out)
    assert out.error is not None
    assert out.value == payload.encode("utf-8", "surrogatepass")


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_ciphertext_is_a_dead_letter(raw: bytes) -> None:
    payload = base64.b64encode(raw).decode()
    out = PIPELINE.process(payload, CTX, 1)
    check_invariants(out)
    assert out.error is not None


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_plaintext_never_escapes(plaintext: bytes) -> None:
    out = PIPELINE.process(CIPHER.encrypt(plaintext), CTX, 1)
    check_invariants(out)
    if out.error is None:  # only if the bytes happen to be a valid notification
        assert out.value == plaintext


@SETTINGS
@given(notifications(), st.data())
def test_truncated_ciphertext_or_plaintext_is_a_dead_letter(item: tuple[str, dict[str, Any]],
                                                             data: st.DataObject) -> None:
    _, doc = item
    plaintext = compact(doc)
    ciphertext = CIPHER.encrypt(plaintext)
    cut = data.draw(st.integers(0, len(ciphertext) - 1))
    check_invariants(out := PIPELINE.process(ciphertext[:cut], CTX, 1))
    assert out.error is not None
    cut = data.draw(st.integers(0, len(plaintext) - 1))
    out = PIPELINE.process(CIPHER.encrypt(plaintext[:cut]), CTX, 1)
    check_invariants(out)
    assert out.error == INVALID_JSON


@SETTINGS
@given(notifications())
def test_wrong_key_is_a_dead_letter(item: tuple[str, dict[str, Any]]) -> None:
    out = PIPELINE.process(Cipher(OTHER_KEY).encrypt(compact(item[1])), CTX, 1)
    check_invariants(out)
    assert out.error is not None


@SETTINGS
@given(ANY_JSON)
def test_json_that_is_not_an_object(value: Any) -> None:
    assume(not isinstance(value, dict))
    out = PIPELINE.process(CIPHER.encrypt(compact(value)), CTX, 1)
    check_invariants(out)
    assert out.error == NOT_AN_OBJECT
    # Unencrypted, the SDK hands over the parsed value; a str there is indistinguishable from ciphertext.
    out = PIPELINE.process(value, PLAIN_CTX, 1)
    check_invariants(out, PLAIN_CTX)
    assert out.error == (NO_ENCRYPTION_KEY if isinstance(value, str) else NOT_AN_OBJECT)


@SETTINGS
@given(OTHER_BODY)
def test_objects_without_an_envelope_violate_the_schema(doc: dict[str, Any]) -> None:
    assume(not (isinstance(doc.get("event"), str) and isinstance(doc.get("body"), dict)))
    out = PIPELINE.process(CIPHER.encrypt(compact(doc)), CTX, 1)
    check_invariants(out)
    assert out.error == SCHEMA_VIOLATION


WRONG_TYPES = st.sampled_from([[], "text", 1.5, True, None, {"nested": 1}])


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid notification (of a family with a schema) broken in one known way."""
    _, doc = draw(notifications(draw(st.sampled_from([f for f in FAMILIES if f not in ("other", "mobile-push")]))))
    doc = copy.deepcopy(doc)
    body = doc["body"]
    required = {"presence": "extensionId", "detailed-presence": "extensionId", "message-store": "changes",
                "instant-message": "from", "voicemail": "id", "fax": "type", "telephony-sessions": "parties",
                "extension-list": "extensions", "subscription-reminder": "expiresIn", "extension-info": "extensionId",
                "dnd-status": "dndStatus", "presence-line": "extension", "message-threads": "lastModifiedTime",
                "a2p-sms": "to"}[CAT.resolve(doc["event"]).name]
    how = draw(st.sampled_from(["drop-required", "retype-required", "body-not-object", "drop-event", "bad-stamp",
                                "bad-uuid"]))
    if how == "drop-required":
        del body[required]
    elif how == "retype-required":
        wrong = draw(WRONG_TYPES)
        # presence-line's `extension` is one line or a list of lines (schemas/presence-line.json says why).
        allowed = {"changes": list, "parties": list, "extensions": list, "from": dict, "extensionId": str, "id": str,
                   "extension": (dict, list), "to": str}
        assume(not isinstance(wrong, allowed.get(required, ())))
        body[required] = wrong
    elif how == "body-not-object":
        doc["body"] = draw(st.one_of(st.lists(st.integers(), max_size=2), SAFE_TEXT, st.integers(), st.none()))
    elif how == "drop-event":
        del doc["event"]
    elif how == "bad-stamp":
        doc["timestamp"] = draw(st.sampled_from(["2020-01-01", "2020-01-01T00:00:00", "now", "", "2020-01-01 00:00Z"]))
    else:
        doc["uuid"] = draw(st.sampled_from(["", "x" * 36, "1234-5678", "🎉"]))
    return doc


@SETTINGS
@given(mutated())
def test_mutated_notifications_violate_the_schema(doc: dict[str, Any]) -> None:
    for ctx, payload in ((CTX, CIPHER.encrypt(compact(doc))), (PLAIN_CTX, doc)):
        out = PIPELINE.process(payload, ctx, 1)
        check_invariants(out, ctx)
        assert out.error == SCHEMA_VIOLATION


@SETTINGS
@given(st.text(max_size=200))
def test_unicode_edge_cases(text: str) -> None:
    """Any string in a body field: fine if it is proper Unicode; lone surrogates are not valid JSON text."""
    doc = {"event": "/restapi/v1.0/account/~/extension/~/presence", "body": {"extensionId": "1", "note": text}}
    ascii_json = json.dumps(doc, separators=(",", ":")).encode()  # \\uXXXX escapes, lone surrogates included
    has_lone_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    out = PIPELINE.process(CIPHER.encrypt(ascii_json), CTX, 1)
    check_invariants(out)
    assert out.error == (INVALID_JSON if has_lone_surrogate else None)
    out = PIPELINE.process(doc, PLAIN_CTX, 1)  # an already-parsed dict always has a serialisation
    check_invariants(out, PLAIN_CTX)
    assert out.error is None and json.loads(out.value) == doc


@settings(max_examples=10, deadline=None)
@given(st.integers(300_000, 2_000_000))
def test_huge_payloads(size: int) -> None:
    doc = {"event": "/restapi/v1.0/account/~/extension/~/presence", "body": {"extensionId": "1", "blob": "A" * size}}
    encrypted = CIPHER.encrypt(compact(doc))
    for ctx, payload in ((CTX, encrypted), (PLAIN_CTX, doc)):
        out = PIPELINE.process(payload, ctx, 1)
        check_invariants(out, ctx)
        assert out.error == TOO_LARGE
        assert len(out.value) <= PIPELINE.max_payload_bytes


def test_large_but_acceptable_payload_is_published_whole() -> None:
    doc = {"event": "/restapi/v1.0/account/~/extension/~/presence", "body": {"extensionId": "1", "blob": "é" * 90_000}}
    out = PIPELINE.process(CIPHER.encrypt(compact(doc)), CTX, 1)
    assert out.error is None and out.value == compact(doc)


@SETTINGS
@given(st.one_of(st.binary(max_size=50), st.complex_numbers(allow_nan=False), st.sets(st.integers(), max_size=3),
                 st.frozensets(SAFE_TEXT, max_size=2), st.tuples(st.integers()), st.builds(object),
                 st.dictionaries(SAFE_TEXT, st.sets(st.integers(), min_size=1), min_size=1, max_size=2),
                 st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2)))
def test_python_objects_never_escape(payload: object) -> None:
    out = PIPELINE.process(payload, CTX, 1)
    check_invariants(out)
    assert out.error is not None


@pytest.mark.parametrize("timetoken", [0, 1, 17_000_000_000_000_000, 2**70])
def test_timetoken_header_is_decimal(timetoken: int) -> None:
    out = PIPELINE.process({"event": "/x", "body": {}}, PLAIN_CTX, timetoken)
    assert dict(out.headers)["timetoken"] == str(timetoken).encode()
