"""The event generator: envelopes, variations, kinds per filter, encryption, payload size, malformed
payloads, steady traffic (reference ringcentral-push-api.md §2, §3)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from ingest.data.catalogue import default_catalogue
from ingest.data.crypto import Cipher, DecryptError
from ingest.data.pipeline import SCHEMA_VIOLATION, ChannelContext, Pipeline
from ingest.sandbox.generator import KINDS, MALFORMED, Generated
from ingest.sandbox.server import Sandbox
from ingest.topology import TopicNames
from tests.support import wait_for
from tests.support.harness import documented_subscription_filters
from tests.support.vectors import VECTOR_CIPHERTEXT, VECTOR_KEY, VECTOR_PLAINTEXT
from tests.unit.test_catalogue import FAMILIES

from .conftest import MESSAGE_STORE, PRESENCE, RC

ALL_FILTERS = [
    MESSAGE_STORE,
    "/restapi/v1.0/account/~/extension/~/message-store/instant?type=SMS",
    "/restapi/v1.0/account/~/extension/~/presence",
    PRESENCE,
    "/restapi/v1.0/account/~/telephony/sessions",
    "/restapi/v1.0/account/~/extension",
    "/restapi/v1.0/account/~/extension/~/voicemail",
    "/restapi/v1.0/account/~/extension/~/fax?direction=Inbound",
    "/restapi/v1.0/subscription/~?threshold=60&interval=15",
]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|\+0000)$")


def _decode(sb: Sandbox, g: Generated) -> dict[str, Any]:
    [view] = [v for v in sb.rc.subscriptions() if v.id == g.subscription_id]
    if isinstance(g.payload, dict):
        return g.payload
    assert view.key is not None
    plaintext = Cipher(view.key).decrypt(g.payload)
    assert plaintext == g.plaintext
    note: dict[str, Any] = json.loads(plaintext)
    return note


def test_the_reference_test_vector_is_reproduced_byte_for_byte() -> None:
    assert Cipher(VECTOR_KEY).encrypt(VECTOR_PLAINTEXT) == VECTOR_CIPHERTEXT


def test_notifications_decrypt_with_the_subscription_key_and_follow_the_filters(sandbox: Sandbox, rc: RC) -> None:
    info = rc.subscribe(ALL_FILTERS, expiresIn=900)
    generated = sandbox.generator.publish(90)
    kinds = Counter(g.kind for g in generated)
    assert set(kinds) == {"message-store", "instant-sms", "presence", "detailed-presence", "telephony-sessions",
                          "extension-list", "voicemail", "fax", "subscription-reminder"}
    assert all(n == 10 for n in kinds.values())  # round robin over the filters
    account, ext = rc.account.account_id, rc.account.extension_id
    for g in generated:
        note = _decode(sandbox, g)  # presence forces encryption: every payload is Base64 AES
        assert isinstance(g.payload, str)
        assert note["uuid"] == g.uuid and note["event"] == g.event
        assert g.subscription_id == info["id"] and g.account_id == account and g.malformed is None
        assert g.channel == info["deliveryMode"]["address"]
        assert TS.match(note["timestamp"])
        assert note.get("subscriptionId", info["id"]) == info["id"]
        assert note.get("ownerId", ext) == ext
        assert isinstance(note["body"], dict)
        if g.kind == "subscription-reminder":
            assert g.event == "/restapi/v1.0/subscription/~?threshold=60&interval=15"
            assert 0 < note["body"]["expiresIn"] <= 900
        else:
            assert g.event.startswith((f"/restapi/v1.0/account/{account}/", "/restapi/v1.0/account/~/"))
    by_kind = {g.kind: g.event.replace(f"/account/{account}/", "/account/~/") for g in generated}
    base = f"/restapi/v1.0/account/~/extension/{ext}"
    assert by_kind["detailed-presence"] == f"{base}/presence?detailedTelephonyState=true"
    assert by_kind["instant-sms"] == f"/restapi/v1.0/account/~/extension/{ext}/message-store/instant?type=SMS"
    assert by_kind["extension-list"] == "/restapi/v1.0/account/~/extension"
    assert by_kind["telephony-sessions"] == "/restapi/v1.0/account/~/telephony/sessions"


def test_real_variations_occur(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(missing_field_ratio=0.2, seed=7)
    client = RC(sb, sb.accounts[0])
    client.login()
    client.subscribe([MESSAGE_STORE, PRESENCE])
    notes = [_decode(sb, g) for g in sb.generator.publish(200)]
    stamps = {n["timestamp"][-1] for n in notes}
    assert stamps == {"Z", "0"}  # both ...Z and ...+0000
    ext_ids = [n["body"]["extensionId"] for n in notes]
    assert any(isinstance(x, int) for x in ext_ids) and any(isinstance(x, str) for x in ext_ids)
    assert any("ownerId" not in n for n in notes) and any("subscriptionId" not in n for n in notes)
    assert any("/account/~/" in n["event"] for n in notes) and any("/account/~/" not in n["event"] for n in notes)
    uuids = [n["uuid"] for n in notes]
    assert len(set(uuids)) == 200
    assert any(u.isdigit() for u in uuids) and any("-" in u for u in uuids)
    # Stamped with the current time, so that lag can be measured downstream.
    now = time.time()
    for n in notes:
        stamp = datetime.strptime(n["timestamp"].replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        assert now - 10 < stamp <= now


def test_kinds_selection_unencrypted_payloads_and_dead_subscriptions(sandbox: Sandbox, rc: RC) -> None:
    store = rc.subscribe([MESSAGE_STORE])
    presence = rc.subscribe([PRESENCE])
    only = sandbox.generator.publish(4, kinds=["message-store"])
    assert {g.subscription_id for g in only} == {store["id"]}
    assert all(isinstance(g.payload, dict) and json.dumps(g.payload, separators=(",", ":")).encode() == g.plaintext
               for g in only)
    with pytest.raises(ValueError, match="unknown kinds"):
        sandbox.generator.publish(1, kinds=["nope"])
    sandbox.faults.delete_subscription(store["id"])
    assert {g.subscription_id for g in sandbox.generator.publish(4)} == {presence["id"]}
    assert sandbox.generator.generated == only + sandbox.generator.generated[4:]
    assert len(sandbox.generator.generated) == 8


def test_payload_size_setting(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(payload_size=1024)
    client = RC(sb, sb.accounts[0])
    client.login()
    client.subscribe([MESSAGE_STORE, "/restapi/v1.0/account/~/extension/~/message-store/instant?type=SMS",
                      "/restapi/v1.0/account/~/telephony/sessions"])
    sizes = [len(g.plaintext or b"") for g in sb.generator.publish(60)]
    average = sum(sizes) / len(sizes)
    assert 900 <= average <= 1400, average


@pytest.mark.parametrize("reason", MALFORMED)
def test_malformed_payloads_fail_the_way_they_claim(sandbox: Sandbox, rc: RC, reason: str) -> None:
    info = rc.subscribe([PRESENCE])
    cipher = Cipher(info["deliveryMode"]["encryptionKey"])
    generated = sandbox.generator.publish(5, malformed=reason)
    assert len(generated) == 5
    for g in generated:
        assert g.malformed == reason and isinstance(g.payload, str)
        if reason in ("bad-base64", "wrong-key", "bad-padding"):
            with pytest.raises(DecryptError) as info_:
                cipher.decrypt(g.payload)
            assert info_.value.reason == ("bad-base64" if reason == "bad-base64" else "bad-padding")
            assert g.uuid is None
        elif reason == "invalid-json":
            with pytest.raises(ValueError):
                json.loads(cipher.decrypt(g.payload))
            assert g.uuid is None
        else:
            note = json.loads(cipher.decrypt(g.payload))
            assert note["uuid"] == g.uuid and not isinstance(note["body"], dict)


def test_malformed_on_unencrypted_subscription(sandbox: Sandbox, rc: RC) -> None:
    rc.subscribe([MESSAGE_STORE])
    [bad] = sandbox.generator.publish(1, malformed="invalid-json")
    assert isinstance(bad.payload, str)
    with pytest.raises(ValueError):
        json.loads(bad.payload)
    [schema] = sandbox.generator.publish(1, malformed="schema-violation")
    assert isinstance(schema.payload, dict) and isinstance(schema.payload["body"], str)


def test_steady_traffic_start_and_stop(sandbox: Sandbox, rc: RC) -> None:
    rc.subscribe([MESSAGE_STORE])
    sandbox.generator.start(100, malformed_ratio=0.3)
    assert sandbox.generator.running
    wait_for(lambda: sandbox.generator.count() >= 40, timeout=5)
    sandbox.generator.stop()
    assert not sandbox.generator.running
    settled = sandbox.generator.count()
    generated = sandbox.generator.generated
    assert len(generated) == settled
    assert any(g.malformed for g in generated) and any(g.malformed is None for g in generated)
    assert [g.timetoken for g in generated] == sorted(g.timetoken for g in generated)
    assert sandbox.pubnub.stats(sandbox.subscriber_key).published == settled


def test_every_documented_family_is_generated_valid_with_its_variations(sandbox: Sandbox, rc: RC) -> None:
    """Subscribed to every documented filter, the generator emits every family, each valid for the pipeline."""
    info = rc.subscribe(documented_subscription_filters(rc.account))
    pipeline = Pipeline(default_catalogue(), TopicNames("rc"))
    ctx = ChannelContext("acme/all", info["id"], rc.account.account_id, Cipher(info["deliveryMode"]["encryptionKey"]))
    generated = sandbox.generator.publish(len(info["eventFilters"]) * 12)
    notes: dict[str, list[dict[str, Any]]] = {}
    for g in generated:
        out = pipeline.process(g.payload, ctx, g.timetoken)
        assert (out.error, out.header("error-message")) == (None, None), g.event
        notes.setdefault(out.family, []).append(_decode(sandbox, g))
    assert set(notes) == FAMILIES
    assert {g.kind for g in generated} == set(KINDS)

    def seen(family: str, predicate: Callable[[dict[str, Any]], bool]) -> bool:
        return any(predicate(n) for n in notes[family])
    # The documented variations, family by family.
    assert all("body" not in n for n in notes["mobile-push"]) and seen("mobile-push", lambda n: "_from" in n)
    assert seen("a2p-sms", lambda n: "/accounts/{accountId}/" in n["event"])  # the consent example's placeholder
    assert seen("a2p-sms", lambda n: n["body"].get("active") is False)  # an opt-in
    assert seen("team-messaging", lambda n: n["event"].endswith("/glip/groups"))
    assert seen("team-messaging", lambda n: None in n["body"].values())
    assert seen("team-messaging", lambda n: set(n["body"]) == {"id", "eventType"})  # GroupLeft
    assert seen("call-queue-presence", lambda n: "member" in n["body"])
    assert seen("call-queue-presence", lambda n: "callQueueId" in n["body"])
    assert seen("call-queue-presence", lambda n: "records" in n["body"])
    assert seen("company-directory", lambda n: "contacts" in n["body"])
    assert seen("company-directory", lambda n: "id" in n["body"])
    assert seen("presence-line", lambda n: isinstance(n["body"]["extension"], list))
    assert seen("presence-line", lambda n: isinstance(n["body"]["extension"], dict))
    assert seen("extension-info", lambda n: "deviceId" in n["body"])
    for family, family_notes in notes.items():
        if family not in ("subscription-reminder", "mobile-push"):
            assert {n["timestamp"][-1] for n in family_notes} == {"Z", "0"}, family  # ...Z and ...+0000


def test_every_documented_family_has_a_schema_violation(sandbox: Sandbox, rc: RC) -> None:
    info = rc.subscribe(documented_subscription_filters(rc.account))
    pipeline = Pipeline(default_catalogue(), TopicNames("rc"))
    ctx = ChannelContext("acme/all", info["id"], rc.account.account_id, Cipher(info["deliveryMode"]["encryptionKey"]))
    outs = [pipeline.process(g.payload, ctx, g.timetoken)
            for g in sandbox.generator.publish(len(info["eventFilters"]), malformed="schema-violation")]
    assert {o.error for o in outs} == {SCHEMA_VIOLATION}
    assert {o.family for o in outs} == FAMILIES


def test_prepared_traffic_is_replayed_round_robin_at_its_rate(sandbox: Sandbox) -> None:
    key = sandbox.subscriber_key
    sandbox.generator.start_prepared(200, [(key, "ch-1", '"first"'), (key, "ch-2", '"second"')])
    assert sandbox.generator.running
    wait_for(lambda: sandbox.generator.replayed >= 40, timeout=5)
    sandbox.generator.stop()
    assert not sandbox.generator.running
    replayed = sandbox.generator.replayed
    assert sandbox.pubnub.stats(key).published == replayed
    assert sandbox.generator.count() == 0  # prepared traffic is not recorded as generated
    body = json.loads(sandbox.pubnub.poll(key, frozenset({"ch-1", "ch-2"}), 1, hold=0))
    assert [(m["c"], m["d"]) for m in body["m"][:4]] == [("ch-1", "first"), ("ch-2", "second")] * 2
