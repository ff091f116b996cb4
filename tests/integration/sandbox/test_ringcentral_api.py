"""The RingCentral emulator over plain `requests`: OAuth, subscriptions, limits, errors, faults
(reference ringcentral-push-api.md §1, §1.4, §1.5, §4, §7)."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from datetime import datetime

import requests

from ingest.data.crypto import Cipher
from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import Sandbox
from tests.support import wait_for

from .conftest import JWT_GRANT, MESSAGE_STORE, PRESENCE, RC

SUBS = "/restapi/v1.0/subscription"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# ---- OAuth -------------------------------------------------------------------------------------


def test_jwt_grant_shape(sandbox: Sandbox) -> None:
    client = RC(sandbox, sandbox.accounts[1])
    token = client.login()
    assert set(token) == {"access_token", "token_type", "expires_in", "refresh_token", "refresh_token_expires_in",
                          "scope", "owner_id"}
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 3599 and token["refresh_token_expires_in"] == 604799
    assert token["owner_id"] == sandbox.accounts[1].extension_id


def test_token_errors(sandbox: Sandbox) -> None:
    url = f"{sandbox.rc_url}/restapi/oauth/token"
    form = {"grant_type": JWT_GRANT, "assertion": sandbox.accounts[0].jwt}
    missing = requests.post(url, data=form, timeout=5)
    assert missing.status_code == 401
    assert missing.json()["error"] == "invalid_client"
    assert missing.json()["errors"][0]["errorCode"] == "OAU-123"
    wrong = requests.post(url, data=form, auth=(sandbox.client_id, "nope"), timeout=5)
    assert wrong.status_code == 401
    bad_jwt = requests.post(url, data={**form, "assertion": "x.y.z"}, auth=(sandbox.client_id, sandbox.client_secret),
                            timeout=5)
    assert bad_jwt.status_code == 400
    assert bad_jwt.json()["error"] == "invalid_grant" and "error_description" in bad_jwt.json()


def test_refresh_is_single_use_and_kills_the_old_access_token(sandbox: Sandbox, rc: RC) -> None:
    old = dict(rc.token)
    answer = rc.token_request(grant_type="refresh_token", refresh_token=old["refresh_token"])
    assert answer.status_code == 200
    new = answer.json()
    assert new["access_token"] != old["access_token"] and new["refresh_token"] != old["refresh_token"]
    again = rc.token_request(grant_type="refresh_token", refresh_token=old["refresh_token"])
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    stale = requests.get(f"{sandbox.rc_url}{SUBS}", headers={"Authorization": f"Bearer {old['access_token']}"},
                         timeout=5)
    assert stale.status_code == 401
    assert stale.json()["errors"][0]["errorCode"] in ("OAU-149", "OAU-213")
    rc.token = new
    assert rc.call("GET", SUBS).status_code == 200


def test_expired_access_token_is_401(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(access_token_ttl=1)
    client = RC(sb, sb.accounts[0])
    assert client.login()["expires_in"] == 0
    answer = wait_for(lambda: [r for r in [client.call("GET", SUBS)] if r.status_code == 401], timeout=5)
    body = answer[0].json()
    assert body["errorCode"] == "TokenInvalid"
    assert body["errors"] == [{"errorCode": "OAU-128", "message": "Access token expired"}]
    # The refresh token still works and gives a working access token.
    client.token = client.token_request(grant_type="refresh_token", refresh_token=client.token["refresh_token"]).json()
    assert client.call("GET", SUBS).status_code == 200


def test_missing_header_revoke_and_token_faults(sandbox: Sandbox, rc: RC) -> None:
    bare = requests.get(f"{sandbox.rc_url}{SUBS}", timeout=5)
    assert bare.status_code == 401 and bare.json()["errorCode"] == "AGW-401"
    revoke = requests.post(f"{sandbox.rc_url}/restapi/oauth/revoke", data={"token": rc.token["access_token"]},
                           auth=(sandbox.client_id, sandbox.client_secret), timeout=5)
    assert revoke.status_code == 200
    assert rc.call("GET", SUBS).status_code == 401
    assert rc.token_request(grant_type="refresh_token", refresh_token=rc.token["refresh_token"]).status_code == 400
    rc.login()
    assert sandbox.faults.expire_access_tokens(sandbox.accounts[0].name) == 1
    assert rc.call("GET", SUBS).json()["errors"][0]["errorCode"] == "OAU-128"
    assert sandbox.faults.revoke_refresh_tokens(sandbox.accounts[0].account_id) >= 1
    assert rc.token_request(grant_type="refresh_token", refresh_token=rc.token["refresh_token"]).status_code == 400
    sandbox.faults.rc_error("token", 503, count=1)
    failed = rc.token_request(grant_type=JWT_GRANT, assertion=rc.account.jwt)
    assert failed.status_code == 503 and "error" in failed.json()
    rc.login()


def test_account_and_extension_info(sandbox: Sandbox, rc: RC) -> None:
    account = rc.call("GET", "/restapi/v1.0/account/~").json()
    assert account["id"] == int(rc.account.account_id)
    ext = rc.call("GET", "/restapi/v1.0/account/~/extension/~").json()
    assert ext["id"] == int(rc.account.extension_id)
    assert ext["account"]["id"] == rc.account.account_id
    assert rc.call("GET", "/restapi/v1.0/account/123/extension/~").status_code == 404


# ---- subscriptions -----------------------------------------------------------------------------


def test_create_shape_matches_the_reference(sandbox: Sandbox, rc: RC) -> None:
    before = time.time()
    info = rc.subscribe([PRESENCE], deliveryMode={"transportType": "PubNub", "encryption": False})
    assert set(info) == {"uri", "id", "creationTime", "status", "eventFilters", "expirationTime", "expiresIn",
                         "deliveryMode"}
    assert UUID.match(info["id"])
    assert info["uri"] == f"{sandbox.rc_url}{SUBS}/{info['id']}"
    assert info["status"] == "Active"
    assert ISO_Z.match(info["creationTime"]) and ISO_Z.match(info["expirationTime"])
    assert info["expiresIn"] == 899
    created = datetime.fromisoformat(info["creationTime"]).timestamp()
    expires = datetime.fromisoformat(info["expirationTime"]).timestamp()
    assert before - 1 < created <= time.time() and abs(expires - created - 900) < 0.01
    account, ext = rc.account.account_id, rc.account.extension_id
    expanded = f"/restapi/v1.0/account/{account}/extension/{ext}/presence?detailedTelephonyState=true"
    assert info["eventFilters"] == [expanded]
    mode = info["deliveryMode"]
    assert mode["transportType"] == "PubNub"
    assert mode["encryption"] is True  # forced by the presence filter although false was asked
    assert re.match(r"^\d+_[0-9a-f]{8}$", mode["address"])
    assert mode["subscriberKey"].startswith("sub-c-") and mode["subscriberKey"] == sandbox.subscriber_key
    assert mode["encryptionAlgorithm"] == "AES"
    assert len(base64.b64decode(mode["encryptionKey"], validate=True)) == 16 and len(mode["encryptionKey"]) == 24


def test_unencrypted_and_expires_in_capped_and_defaulted(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(subscription_ttl_max=60.0)
    client = RC(sb, sb.accounts[0])
    client.login()
    plain = client.subscribe(["/account/~/extension/~/message-store"], expiresIn=10)
    assert plain["deliveryMode"] == {"transportType": "PubNub", "encryption": False,
                                     "address": plain["deliveryMode"]["address"], "subscriberKey": sb.subscriber_key}
    assert plain["expiresIn"] == 9
    assert client.subscribe(expiresIn=100000)["expiresIn"] == 59
    assert client.subscribe()["expiresIn"] == 59
    encrypted = client.subscribe(deliveryMode={"transportType": "PubNub", "encryption": "true"})
    assert encrypted["deliveryMode"]["encryption"] is True


def test_list_get_put_renew_delete(sandbox: Sandbox, rc: RC) -> None:
    info = rc.subscribe([MESSAGE_STORE], expiresIn=300)
    other = RC(sandbox, sandbox.accounts[1])
    other.login()
    other.subscribe()
    listing = rc.call("GET", SUBS).json()
    assert listing["uri"] == f"{sandbox.rc_url}{SUBS}"
    assert [r["id"] for r in listing["records"]] == [info["id"]]  # only this user's
    got = rc.call("GET", f"{SUBS}/{info['id']}").json()
    assert got["id"] == info["id"] and got["expiresIn"] <= 299
    renewed = rc.call("POST", f"{SUBS}/{info['id']}/renew")
    assert renewed.status_code == 200
    assert renewed.json()["expiresIn"] == 899  # default lifetime
    assert renewed.json()["deliveryMode"] == info["deliveryMode"]  # unchanged by default
    put = rc.call("PUT", f"{SUBS}/{info['id']}", json={"eventFilters": [MESSAGE_STORE, PRESENCE], "expiresIn": 120,
                                                        "deliveryMode": {"ignored": True}})
    assert put.status_code == 200
    assert put.json()["expiresIn"] == 119 and len(put.json()["eventFilters"]) == 2
    assert put.json()["deliveryMode"]["encryption"] is True  # a presence filter was added
    empty = rc.call("PUT", f"{SUBS}/{info['id']}")
    assert empty.json()["expiresIn"] == 899
    deleted = rc.call("DELETE", f"{SUBS}/{info['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    for method, path in (("GET", ""), ("POST", "/renew"), ("PUT", ""), ("DELETE", "")):
        gone = rc.call(method, f"{SUBS}/{info['id']}{path}")
        assert gone.status_code == 404
        assert gone.json() == {
            "errorCode": "CMN-102", "message": "Resource for parameter [subscriptionId] is not found",
            "errors": [{"errorCode": "CMN-102", "message": "Resource for parameter [subscriptionId] is not found",
                        "parameterName": "subscriptionId"}],
            "parameterName": "subscriptionId"}
    assert rc.call("GET", f"{SUBS}/not-a-subscription").status_code == 404


def test_bad_filters_and_transport(sandbox: Sandbox, rc: RC) -> None:
    for filters in ([], ["/restapi/v1.0/account/~/nonsense"], ["not a path"],
                    ["/restapi/v1.0/account/~/extension/999/message-store"]):
        answer = rc.call("POST", SUBS, json={"eventFilters": filters, "deliveryMode": {"transportType": "PubNub"}})
        assert answer.status_code == 400, filters
        assert answer.json()["errorCode"] == "SUB-508"
        assert answer.json()["errors"][0]["message"].startswith("Invalid event filters")
    other = f"/restapi/v1.0/account/{sandbox.accounts[1].account_id}/extension/~/message-store"
    assert rc.call("POST", SUBS, json={"eventFilters": [other], "deliveryMode": {"transportType": "PubNub"}}
                   ).json()["errorCode"] == "SUB-406"
    webhook = rc.call("POST", SUBS, json={"eventFilters": [MESSAGE_STORE],
                                          "deliveryMode": {"transportType": "WebHook"}})
    assert webhook.status_code == 400
    reminder = rc.call("POST", SUBS, json={"eventFilters": ["/restapi/v1.0/subscription/~?threshold=800&interval=5"],
                                           "deliveryMode": {"transportType": "PubNub"}})
    assert reminder.status_code == 400 and reminder.json()["errorCode"] == "SUB-516"


def test_subscription_limit_is_sub_505(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(subscription_limit=2)
    client = RC(sb, sb.accounts[0])
    client.login()
    first = client.subscribe()
    client.subscribe()
    over = client.call("POST", SUBS, json={"eventFilters": [MESSAGE_STORE],
                                           "deliveryMode": {"transportType": "PubNub"}})
    assert over.status_code == 403
    assert over.json()["errorCode"] == "SUB-505" and over.json()["message"] == "Subscriptions limit exceeded"
    other = RC(sb, sb.accounts[1])  # the limit is per user
    other.login()
    other.subscribe()
    assert client.call("DELETE", f"{SUBS}/{first['id']}").status_code == 204
    client.subscribe()
    assert sb.rc.created_count[sb.accounts[0].account_id] == 3


def test_expiry_is_silent(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(subscription_ttl_max=1.5)
    client = RC(sb, sb.accounts[0])
    client.login()
    info = client.subscribe()
    assert len(sb.generator.publish(2)) == 2
    wait_for(lambda: not sb.rc.live_subscriptions(), timeout=5)
    assert sb.generator.publish(5) == []  # nothing is published for an expired subscription
    assert sb.pubnub.stats(sb.subscriber_key).published == 2
    assert client.call("GET", SUBS).json()["records"] == []
    assert client.call("POST", f"{SUBS}/{info['id']}/renew").status_code == 404
    [view] = sb.rc.subscriptions(include_dead=True)
    assert view.status == "Expired" and view.id == info["id"]


def test_server_side_expire_delete_and_rotation(sandbox: Sandbox, rc: RC) -> None:
    a, b, c = rc.subscribe([PRESENCE]), rc.subscribe([PRESENCE]), rc.subscribe([PRESENCE])
    sandbox.faults.expire_subscription(a["id"])
    sandbox.faults.delete_subscription(b["id"])
    assert rc.call("GET", f"{SUBS}/{a['id']}").status_code == 404
    assert rc.call("GET", f"{SUBS}/{b['id']}").status_code == 404
    assert {g.subscription_id for g in sandbox.generator.publish(3)} == {c["id"]}
    sandbox.faults.rotate_on_next_renewal(c["id"], key=True, channel=True)
    renewed = rc.call("POST", f"{SUBS}/{c['id']}/renew").json()["deliveryMode"]
    assert renewed["address"] != c["deliveryMode"]["address"]
    assert renewed["encryptionKey"] != c["deliveryMode"]["encryptionKey"]
    again = rc.call("POST", f"{SUBS}/{c['id']}/renew").json()["deliveryMode"]
    assert again == renewed  # only the next renewal rotates
    [g] = sandbox.generator.publish(1)
    assert g.channel == renewed["address"]
    statuses = {v.id: v.status for v in sandbox.rc.subscriptions()}
    assert statuses == {a["id"]: "Expired", b["id"]: "Deleted", c["id"]: "Active"}


# ---- rate limits and injected errors ---------------------------------------------------------


def test_rate_limit_headers_429_and_penalty_reset(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(rate_limits=RateLimits(light=3, medium=2, auth=5, window=60, penalty=1.5))
    client = RC(sb, sb.accounts[0])
    token = client.token_request(grant_type=JWT_GRANT, assertion=client.account.jwt)
    assert token.headers["X-Rate-Limit-Group"] == "auth" and token.headers["X-Rate-Limit-Remaining"] == "4"
    client.token = token.json()
    remaining = []
    for _ in range(3):
        answer = client.call("GET", SUBS)
        assert answer.status_code == 200
        assert answer.headers["X-Rate-Limit-Group"] == "light"
        assert answer.headers["X-Rate-Limit-Limit"] == "3" and answer.headers["X-Rate-Limit-Window"] == "60"
        remaining.append(answer.headers["X-Rate-Limit-Remaining"])
    assert remaining == ["2", "1", "0"]
    limited = client.call("GET", SUBS)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "2"
    assert limited.json()["errorCode"] == "CMN-301"
    # Medium is a separate bucket.
    assert client.call("POST", SUBS, json={"eventFilters": [MESSAGE_STORE],
                                           "deliveryMode": {"transportType": "PubNub"}}).status_code == 200
    # Every request during the penalty restarts it: poking at 1 s keeps it closed past 1.5 s.
    began = time.monotonic()
    wait_for(lambda: time.monotonic() - began > 1.0, interval=0.1)
    assert client.call("GET", SUBS).status_code == 429
    wait_for(lambda: time.monotonic() - began > 1.8, interval=0.1)
    assert client.call("GET", SUBS).status_code == 429  # would have passed without the reset
    quiet = time.monotonic()
    wait_for(lambda: time.monotonic() - quiet > 1.6, interval=0.1)
    # The penalty is over but the 60 s window still holds 3 hits: the limit itself still applies.
    assert client.call("GET", SUBS).status_code == 429


def test_auth_group_limits_logins(make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox()  # Auth: 5 per minute per user
    client = RC(sb, sb.accounts[0])
    codes = [client.token_request(grant_type=JWT_GRANT, assertion=client.account.jwt).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]


def test_injected_rc_errors(sandbox: Sandbox, rc: RC) -> None:
    info = rc.subscribe()
    sandbox.faults.rc_error("renew", 503, count=2)
    codes = [rc.call("POST", f"{SUBS}/{info['id']}/renew").status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    sandbox.faults.rc_error("create", 429, count=1, retry_after=7)
    limited = rc.call("POST", SUBS, json={"eventFilters": [MESSAGE_STORE], "deliveryMode": {"transportType": "PubNub"}})
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert limited.json()["errorCode"] == "CMN-301"
    sandbox.faults.rc_error("*", 500, seconds=0.5)
    assert rc.call("GET", SUBS).status_code == 500
    wait_for(lambda: rc.call("GET", SUBS).status_code == 200, timeout=3)
    sandbox.faults.rc_error("get", 401, count=1)
    unauthorized = rc.call("GET", f"{SUBS}/{info['id']}")
    assert unauthorized.status_code == 401 and unauthorized.json()["errorCode"] == "TokenInvalid"


def test_admin_http_api(sandbox: Sandbox, rc: RC) -> None:
    info = rc.subscribe()
    admin = f"{sandbox.rc_url}/sandbox"
    armed = requests.post(f"{admin}/faults/rc-error", json={"endpoint": "list", "status": 503, "count": 1}, timeout=5)
    assert armed.status_code == 200
    assert rc.call("GET", SUBS).status_code == 503
    published = requests.post(f"{admin}/generator/publish", json={"n": 3}, timeout=5).json()
    assert published["published"] == 3
    requests.post(f"{admin}/faults/expire-subscription", json={"subscription_id": info["id"]}, timeout=5)
    state = requests.get(f"{admin}/state", timeout=5).json()
    assert state["subscriptions"][0]["status"] == "Expired"
    assert state["generated"] == 3
    assert "key" not in state["subscriptions"][0]
    assert requests.post(f"{admin}/faults/nonsense", json={}, timeout=5).status_code == 404
    assert requests.post(f"{admin}/faults/rc-error", json={"endpoint": "bogus"}, timeout=5).status_code == 400


def test_rotation_for_all_subscriptions_is_one_shot_and_events_use_the_new_key(sandbox: Sandbox, rc: RC) -> None:
    first, second = rc.subscribe([PRESENCE]), rc.subscribe([PRESENCE])
    sandbox.faults.rotate_on_next_renewal(None, key=True, channel=False)
    keys = {}
    for sub in (first, second):
        renewed = rc.call("POST", f"{SUBS}/{sub['id']}/renew").json()["deliveryMode"]
        assert renewed["address"] == sub["deliveryMode"]["address"]
        assert renewed["encryptionKey"] != sub["deliveryMode"]["encryptionKey"]
        again = rc.call("POST", f"{SUBS}/{sub['id']}/renew").json()["deliveryMode"]
        assert again["encryptionKey"] == renewed["encryptionKey"]
        keys[sub["id"]] = renewed["encryptionKey"]
    generated = sandbox.generator.publish(4)
    assert {g.subscription_id for g in generated} == set(keys)
    for g in generated:
        assert isinstance(g.payload, str)
        assert Cipher(keys[g.subscription_id]).decrypt(g.payload) == g.plaintext
