"""The catalogue routes every family and the schemas accept real payloads and reject malformed ones.

EXAMPLES are the reference's example bodies (ringcentral-push-api.md §3.4, tidied as documented there),
test vector 1's plaintext (§2.3), and, for the families the reference has no full example of, bodies
built from the official schema's fields (voicemail, fax, renewal reminder). test_pipeline*.py reuse them.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ingest
from ingest import catalogue as catalogue_module
from ingest.catalogue import Catalogue, CatalogueError, default_catalogue, schemas_dir

VECTOR1 = json.loads(
    b'{"timestamp":"2014-03-12T20:47:54.712+0000","body":{"extensionId":402853446008,"telephonyStatus":"OnHold"},'
    b'"event":"/restapi/v1.0/account/~/extension/402853446008/presence",'
    b'"uuid":"db01e7de-5f3c-4ee5-ab72-f8bd3b77e308"}'
)

MESSAGE_STORE = {
    "timestamp": "2014-04-29T14:29:27.408+0000", "uuid": "b11c9430-9687-4498-b12b-3fcb470bfe04",
    "event": "/restapi/v1.0/account/~/extension/406149828004/message-store",
    "ownerId": "406149828004", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "body": {"accountId": "406149828004", "extensionId": "406149828004", "lastUpdated": "2014-04-29T14:29:20.531+0000",
             "changes": [{"type": "Pager", "updatedCount": 1, "newCount": 0},
                         {"type": "SMS", "updatedCount": 0, "newCount": 1}]},
}
# The 2023 form: numeric ids, newMessageIds, VoiceMail spelling, numeric-account event path.
MESSAGE_STORE_2023 = {
    "uuid": "5482723895830476383", "event": "/restapi/v1.0/account/233676004/extension/233676004/message-store",
    "timestamp": "2023-05-10T10:01:02.345Z", "subscriptionId": "2e7f4a6c-3b2d-4f7e-9a1b-0c8d7e6f5a4b",
    "ownerId": "233676004",
    "body": {"accountId": 233676004, "extensionId": 233676004, "lastUpdated": "2023-05-10T10:01:01.000Z",
             "changes": [{"type": "VoiceMail", "newCount": 1, "updatedCount": 0, "newMessageIds": [12756735005]},
                         {"type": "SMS", "newCount": 2, "updatedCount": 0,
                          "newMessageIds": [12756735006, 12756737005]}]},
}
INSTANT_SMS = {
    "uuid": "ed1cf00c-0420-4bf5-a0ae-e659bb9f77e0",
    "event": "/restapi/v1.0/account/~/extension/823476228762/message-store/instant?type=SMS",
    "subscriptionId": "dc853541-66ac-45d8-a289-1a239fd72888", "ownerId": "823476228762",
    "timestamp": "2013-06-14T12:00:00.000Z",
    "body": {"id": "606090030016", "to": [{"phoneNumber": "+16508974563", "location": "Moss Beach, CA"}],
             "from": {"phoneNumber": "+14157809227", "name": "John Smith"}, "type": "SMS",
             "creationTime": "2016-02-22T17:01:00.000Z", "lastModifiedTime": "2016-02-22T17:01:00.000Z",
             "readStatus": "Unread", "priority": "Normal",
             "attachments": [{"uri": "/restapi/v1.0/account/~/extension/823476228762/message-store/2640223004/content/"
                                     "2640223004", "id": "606090030016", "type": "Text",
                              "contentType": "text/plain", "size": 4096}],
             "direction": "Inbound", "availability": "Alive", "subject": "Hi there", "messageStatus": "Received",
             "conversationId": "7876416245344257449"},
}
PRESENCE = {
    "uuid": "045b81dc-9f73-4864-84de-08aa6324a7f5", "event": "/restapi/v1.0/account/~/extension/6610372004/presence",
    "timestamp": "2016-02-18T09:37:24.597Z", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "ownerId": "6610372004",
    "body": {"extensionId": "6610372004", "telephonyStatus": "CallConnected", "sequence": 2698,
             "presenceStatus": "Busy", "userStatus": "Available", "meetingStatus": "Disconnected",
             "dndStatus": "TakeAllCalls", "allowSeeMyPresence": True, "ringOnMonitoredCall": False,
             "pickUpCallsOnHold": False},
}
DETAILED_PRESENCE = copy.deepcopy(PRESENCE)
DETAILED_PRESENCE["event"] = "/restapi/v1.0/account/~/extension/6610372004/presence?detailedTelephonyState=true"
DETAILED_PRESENCE["body"].update({"totalActiveCalls": 1, "activeCalls": [{
    "id": "39247ebfdc324e3b96d7519672aec3e4", "direction": "Inbound", "queueCall": True, "from": "+18775380038",
    "fromName": "John Wang", "to": "+18445810019", "telephonyStatus": "CallConnected",
    "startTime": "2016-02-18T09:37:24.322Z", "sessionId": "17133704004", "partyId": "cs171843418296416309-2",
    "telephonySessionId": "Y3MxNjk4ODA5MTYxMzUyOTU5OUAxMC4zMi40NS44NA"}]})
TELEPHONY = {
    "uuid": "1823485288313944239", "event": "/restapi/v1.0/account/809646016/extension/809646016/telephony/sessions",
    "timestamp": "2020-06-14T19:27:18.390Z", "subscriptionId": "53300e7c-5e69-42bf-ab4d-179aabc6e869",
    "ownerId": "809646016",
    "body": {"sequence": 3, "sessionId": "425008160016", "telephonySessionId": "s-a6abd24ca6774373a8120a3390d3cbe8",
             "serverId": "10.13.22.28.TAM", "eventTime": "2020-06-14T19:27:18.340Z",
             "parties": [{"accountId": "809646016", "extensionId": "809646016",
                          "id": "p-a6abd24ca6774373a8120a3390d3cbe8-2", "direction": "Inbound",
                          "to": {"phoneNumber": "+19043014558", "name": "TESTER Babji", "extensionId": "809646016"},
                          "from": {"phoneNumber": "+14083388064"}, "status": {"code": "Setup", "rcc": False},
                          "park": {}, "missedCall": False, "standAlone": False, "muted": False}],
             "origin": {"type": "Call"}},
}
EXTENSION_LIST = {
    "timestamp": "2014-04-29T14:29:27.408+0000", "subscriptionId": "a45645-0001-cc71-9de3-674476722",
    "ownerId": "1500723004", "uuid": "b11c9430-9687-4498-b12b-3fcb470bfe04",
    "event": "/restapi/v1.0/account/~/extension",
    "body": {"extensions": [{"extensionId": "74953947939", "eventType": "Delete"},
                            {"extensionId": "8798797945", "eventType": "Create"},
                            {"extensionId": "8475874957", "eventType": "Update",
                             "hints": ["ExtensionInfo", "CompanyNumbers"]}]},
}
VOICEMAIL = {
    "uuid": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "event": "/restapi/v1.0/account/~/extension/~/voicemail",
    "timestamp": "2021-03-01T08:00:00.000Z", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "ownerId": 6610372004,
    "body": {"id": 11950867004, "type": "VoiceMail", "from": {"phoneNumber": "+14155550100", "name": "Ann"},
             "to": [{"extensionNumber": "101", "name": "Bob"}], "creationTime": "2021-03-01T07:59:58.000Z",
             "readStatus": "Unread", "priority": "Normal", "direction": "Inbound", "availability": "Alive",
             "messageStatus": "Received", "vmTranscriptionStatus": "NotAvailable",
             "attachments": [{"id": 11950867004, "uri": "/restapi/v1.0/account/1/extension/2/message-store/3/content/4",
                              "type": "AudioRecording", "contentType": "audio/mpeg", "vmDuration": 21}]},
}
FAX = {
    "uuid": "7bc9a1d2-11e4-4a56-9cde-0f1e2d3c4b5a",
    "event": "/restapi/v1.0/account/~/extension/~/fax?direction=Inbound",
    "timestamp": "2021-03-01T09:00:00.000+0000", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "body": {"id": "11950867010", "type": "Fax", "from": {"phoneNumber": "+14155550101"},
             "to": [{"phoneNumber": "+14155550102"}], "direction": "Inbound", "faxResolution": "High",
             "faxPageCount": 2,
             "attachments": [{"id": "1", "uri": "/restapi/v1.0/x", "type": "RenderedDocument",
                              "contentType": "application/pdf"}]},
}
REMINDER = {
    "uuid": "8234712349871234987", "event": "/restapi/v1.0/subscription/~?threshold=60&interval=15",
    "timestamp": "2024-01-01T00:00:00.000Z", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "ownerId": "6610372004", "body": {"expiresIn": 59},
}

EXAMPLES: dict[str, dict[str, Any]] = {
    "vector1": VECTOR1, "message-store": MESSAGE_STORE, "message-store-2023": MESSAGE_STORE_2023,
    "instant-message": INSTANT_SMS, "presence": PRESENCE, "detailed-presence": DETAILED_PRESENCE,
    "telephony-sessions": TELEPHONY, "extension-list": EXTENSION_LIST, "voicemail": VOICEMAIL, "fax": FAX,
    "subscription-reminder": REMINDER,
}
EXAMPLE_FAMILY = {name: ("presence" if name == "vector1" else name.removesuffix("-2023")) for name in EXAMPLES}


@pytest.fixture(scope="module")
def cat() -> Catalogue:
    return default_catalogue()


@pytest.mark.parametrize(
    ("event", "family", "account"),
    [
        ("/restapi/v1.0/account/~/extension/~/message-store", "message-store", None),
        ("/restapi/v1.0/account/123/extension/456/message-store", "message-store", "123"),
        ("/restapi/v1.0/account/~/extension/~/message-store?type=VoiceMail&direction=Inbound", "message-store", None),
        ("/restapi/v1.0/account/~/extension/~/message-store/instant?type=SMS", "instant-message", None),
        ("/restapi/v1.0/account/130829004/extension/~/message-store/instant?type=SMS", "instant-message", "130829004"),
        ("/restapi/v1.0/account/~/extension/~/presence", "presence", None),
        ("/restapi/v1.0/account/~/extension/402853446008/presence", "presence", None),
        ("/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true", "detailed-presence", None),
        ("/restapi/v1.0/account/2021383004/extension/2021383004/presence?detailedTelephonyState=true&sipData=true",
         "detailed-presence", "2021383004"),
        ("/restapi/v1.0/account/~/extension/~/presence?sipData=true&detailedTelephonyState=TRUE",
         "detailed-presence", None),
        ("/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=false", "presence", None),
        ("/restapi/v1.0/account/~/telephony/sessions", "telephony-sessions", None),
        ("/restapi/v1.0/account/809646016/telephony/sessions?direction=Inbound&statusCode=Setup",
         "telephony-sessions", "809646016"),
        ("/restapi/v1.0/account/809646016/extension/809646016/telephony/sessions", "telephony-sessions", "809646016"),
        ("/restapi/v1.0/account/~/extension", "extension-list", None),
        ("/restapi/v1.0/account/77/extension", "extension-list", "77"),
        ("/restapi/v1.0/account/~/extension/~/voicemail", "voicemail", None),
        ("/restapi/v1.0/account/5/extension/6/voicemail", "voicemail", "5"),
        ("/restapi/v1.0/account/~/extension/~/fax?direction=Inbound", "fax", None),
        ("/restapi/v1.0/account/~/extension/~/fax", "fax", None),
        ("/restapi/v1.0/subscription/~?threshold=60&interval=15", "subscription-reminder", None),
        ("/restapi/v1.0/subscription/ed329ec1-0600-4560-b6dc-c764399e9a54?threshold=120&interval=60",
         "subscription-reminder", None),
        # Families without their own schema: envelope only, default topic.
        ("/restapi/v1.0/account/~/extension/~", "extension-info", None),
        ("/restapi/v1.0/account/~/presence", "account-presence", None),
        ("/restapi/v1.0/account/~/extension/~/missed-calls", "missed-calls", None),
        ("/restapi/v1.0/account/~/extension/171857008/presence/line/presence", "presence-line", None),
        ("/team-messaging/v1/posts", "team-messaging", None),
        # Unknown or malformed paths: the default family.
        ("/restapi/v1.0/account/~/extension/~/unheard-of", "other", None),
        ("/restapi/v1.0/account/abc/extension/~/presence", "other", None),
        ("/restapi/v1.0/account/~/extension/~/presence/extra", "other", None),
        ("restapi/v1.0/account/~/extension", "other", None),
        ("", "other", None),
        ("/restapi/v1.0/account/9/whatever", "other", "9"),
    ],
)
def test_routing(cat: Catalogue, event: str, family: str, account: str | None) -> None:
    route = cat.route(event)
    assert route.family.name == family
    assert route.account_id == account
    assert cat.resolve(event) is route.family


def test_families_with_schema_have_topics_and_distinct_schemas(cat: Catalogue) -> None:
    with_schema = {n for n, f in cat.families.items() if f.has_schema}
    assert with_schema == {"message-store", "instant-message", "presence", "detailed-presence", "telephony-sessions",
                           "extension-list", "voicemail", "fax", "subscription-reminder"}
    assert len({cat.families[n].schema_id for n in with_schema}) == len(with_schema)
    for name in with_schema:
        assert cat.families[name].topic_suffix == name
    for name in set(cat.families) - with_schema:
        assert cat.families[name].schema_id == cat.envelope.schema_id
        assert cat.families[name].topic_suffix is None
    assert cat.default.name == "other"


def test_route_cache_returns_same_answer_and_stays_bounded(cat: Catalogue) -> None:
    local = Catalogue()
    first = local.route("/restapi/v1.0/account/~/extension/~/presence")
    assert local.route("/restapi/v1.0/account/~/extension/~/presence") is first
    for i in range(catalogue_module.ROUTE_CACHE_SIZE + 10):
        local.route(f"/restapi/v1.0/account/{i}/extension/~/presence")
    assert len(local._cache) <= catalogue_module.ROUTE_CACHE_SIZE
    assert local.route("/restapi/v1.0/account/~/extension/~/presence").family.name == "presence"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_route_and_validate(cat: Catalogue, name: str) -> None:
    doc = EXAMPLES[name]
    family = cat.resolve(doc["event"])
    assert family.name == EXAMPLE_FAMILY[name]
    errors = [e.message for e in family.validator.iter_errors(doc)]
    assert errors == []
    assert cat.envelope.validator.is_valid(doc)


def _walk(doc: Any, path: str) -> tuple[Any, Any]:
    """The container of the dotted `path` (list indices are numbers) and the last step."""
    steps: list[Any] = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = doc
    for step in steps[:-1]:
        target = target[step]
    return target, steps[-1]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target, last = _walk(doc, path)
        target[last] = value
    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target, last = _walk(doc, path)
        del target[last]
    return mutate


MUTATIONS: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    # envelope
    ("vector1", "no event", _drop("event")),
    ("vector1", "no body", _drop("body")),
    ("vector1", "body is a list", _set("body", [1, 2])),
    ("vector1", "body is a string", _set("body", "x")),
    ("vector1", "event not a string", _set("event", 42)),
    ("vector1", "event not a path", _set("event", "restapi")),
    ("vector1", "uuid not a uuid", _set("uuid", "not-a-uuid")),
    ("vector1", "uuid a number", _set("uuid", 123)),
    ("vector1", "timestamp without zone", _set("timestamp", "2014-03-12T20:47:54.712")),
    ("vector1", "timestamp garbage", _set("timestamp", "yesterday")),
    ("presence", "subscriptionId a number", _set("subscriptionId", 5)),
    ("presence", "ownerId a bool", _set("ownerId", True)),
    ("presence", "ownerId empty", _set("ownerId", "")),
    # presence
    ("vector1", "presence without extensionId", _drop("body.extensionId")),
    ("vector1", "extensionId a float", _set("body.extensionId", 1.5)),
    ("vector1", "extensionId negative", _set("body.extensionId", -1)),
    ("presence", "unknown telephonyStatus", _set("body.telephonyStatus", "Dancing")),
    ("presence", "sequence a string", _set("body.sequence", "2698")),
    ("presence", "allowSeeMyPresence a string", _set("body.allowSeeMyPresence", "true")),
    ("detailed-presence", "activeCalls an object", _set("body.activeCalls", {})),
    ("detailed-presence", "active call direction", _set("body.activeCalls.0.direction", "Sideways")),
    ("detailed-presence", "totalActiveCalls negative", _set("body.totalActiveCalls", -1)),
    # message store
    ("message-store", "no changes", _drop("body.changes")),
    ("message-store", "changes not a list", _set("body.changes", {"type": "SMS"})),
    ("message-store", "unknown message type", _set("body.changes.0.type", "Carrier pigeon")),
    ("message-store", "count a string", _set("body.changes.0.newCount", "1")),
    ("message-store-2023", "newMessageIds not a list", _set("body.changes.0.newMessageIds", 5)),
    ("message-store", "lastUpdated not a date", _set("body.lastUpdated", "2014-04-29")),
    # instant message
    ("instant-message", "no from", _drop("body.from")),
    ("instant-message", "to not a list", _set("body.to", {"phoneNumber": "+1"})),
    ("instant-message", "type Fax", _set("body.type", "Fax")),
    ("instant-message", "size a string", _set("body.attachments.0.size", "4096")),
    # telephony
    ("telephony-sessions", "no parties", _drop("body.parties")),
    ("telephony-sessions", "party without status", _drop("body.parties.0.status")),
    ("telephony-sessions", "status without code", _drop("body.parties.0.status.code")),
    ("telephony-sessions", "sequence a string", _set("body.sequence", "3")),
    # extension list
    ("extension-list", "no extensions", _drop("body.extensions")),
    ("extension-list", "unknown eventType", _set("body.extensions.0.eventType", "Explode")),
    ("extension-list", "hints not a list", _set("body.extensions.2.hints", "ExtensionInfo")),
    # voicemail, fax, reminder
    ("voicemail", "type SMS", _set("body.type", "SMS")),
    ("voicemail", "no id", _drop("body.id")),
    ("voicemail", "vmDuration a string", _set("body.attachments.0.vmDuration", "21")),
    ("fax", "faxPageCount a string", _set("body.faxPageCount", "2")),
    ("fax", "type Voicemail", _set("body.type", "Voicemail")),
    ("subscription-reminder", "no expiresIn", _drop("body.expiresIn")),
    ("subscription-reminder", "expiresIn a string", _set("body.expiresIn", "59")),
]


@pytest.mark.parametrize(("name", "what", "mutate"), MUTATIONS, ids=[f"{n}:{w}" for n, w, _ in MUTATIONS])
def test_mutated_examples_are_rejected(cat: Catalogue, name: str, what: str,
                                       mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = copy.deepcopy(EXAMPLES[name])
    mutate(doc)
    family = cat.resolve(doc["event"]) if isinstance(doc.get("event"), str) else cat.default
    assert not family.validator.is_valid(doc), what


@pytest.mark.parametrize(
    ("name", "what", "mutate"),
    [
        ("presence", "no uuid/timestamp/subscriptionId/ownerId",
         lambda d: [d.pop(k) for k in ("uuid", "timestamp", "subscriptionId", "ownerId")]),
        ("presence", "decimal uuid", _set("uuid", "1823485288313944239")),
        ("presence", "+0000 timestamp", _set("timestamp", "2016-02-18T09:37:24.597+0000")),
        ("presence", "+00:00 timestamp", _set("timestamp", "2016-02-18T09:37:24.597+00:00")),
        ("presence", "timestamp without fraction", _set("timestamp", "2016-02-18T09:37:24Z")),
        ("presence", "numeric ids", _set("body.extensionId", 6610372004)),
        ("presence", "unknown extra fields", _set("body.somethingNew", {"x": [1]})),
        ("presence", "unknown envelope field", _set("newEnvelopeField", "x")),
        ("message-store", "Voicemail spelling", _set("body.changes.0.type", "Voicemail")),
        ("voicemail", "Voicemail spelling", _set("body.type", "Voicemail")),
        ("extension-list", "flat official shape",
         _set("body", {"extensionId": "1", "eventType": "Update", "ownerId": "2"})),
        ("telephony-sessions", "numeric party ids", _set("body.parties.0.extensionId", 809646016)),
    ],
)
def test_real_world_variations_are_accepted(cat: Catalogue, name: str, what: str,
                                            mutate: Callable[[dict[str, Any]], Any]) -> None:
    doc = copy.deepcopy(EXAMPLES[name])
    mutate(doc)
    family = cat.resolve(doc["event"])
    assert [e.message for e in family.validator.iter_errors(doc)] == [], what


def test_unknown_family_is_validated_against_the_envelope(cat: Catalogue) -> None:
    family = cat.resolve("/restapi/v1.0/account/~/extension/~/missed-calls")
    assert family.validator.is_valid({"event": "/restapi/v1.0/account/~/extension/~/missed-calls", "body": {"a": 1}})
    assert not family.validator.is_valid({"event": "/restapi/v1.0/account/~/extension/~/missed-calls", "body": 1})


def test_schemas_dir_finds_the_repo_checkout() -> None:
    assert schemas_dir() == Path(ingest.__file__).resolve().parent.parent / "schemas"


def test_schemas_dir_prefers_the_installed_wheel_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site-packages" / "ingest"
    shutil.copytree(schemas_dir(), package / "_schemas")
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(ingest, "__file__", str(package / "__init__.py"))
    assert schemas_dir() == package / "_schemas"
    installed = Catalogue(schemas_dir())
    assert installed.resolve(PRESENCE["event"]).validator.is_valid(PRESENCE)


def test_every_schema_is_draft_2020_12_with_an_id() -> None:
    for path in schemas_dir().glob("*.json"):
        if path.name == "catalogue.json":
            continue
        doc = json.loads(path.read_text())
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema", path.name
        assert doc["$id"].endswith("/" + path.name)


def test_broken_catalogue_is_reported(tmp_path: Path) -> None:
    shutil.copytree(schemas_dir(), tmp_path / "s")
    spec = json.loads((tmp_path / "s" / "catalogue.json").read_text())
    spec["routes"].append({"pattern": "/x", "family": "nope"})
    (tmp_path / "s" / "catalogue.json").write_text(json.dumps(spec))
    with pytest.raises(CatalogueError, match="unknown family 'nope'"):
        Catalogue(tmp_path / "s")
    spec["routes"].pop()
    spec["families"]["ghost"] = {"schema": "ghost.json", "topic": "ghost"}
    (tmp_path / "s" / "catalogue.json").write_text(json.dumps(spec))
    with pytest.raises(CatalogueError, match=r"ghost\.json"):
        Catalogue(tmp_path / "s")
