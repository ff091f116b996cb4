"""TokenManager and RingCentralClient against the sandbox's RingCentral emulator (real HTTP)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import requests

from ingest.observability.metrics import Metrics
from ingest.rc.errors import ApiError, AuthError, RateLimited, TokenUnavailable, parse_error_body
from ingest.rc.http import RingCentralClient
from ingest.rc.tokens import TokenManager
from ingest.sandbox.server import Sandbox
from tests.support import sample, wait_for


@pytest.fixture
def short_tokens_sandbox(make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    return make_sandbox(access_token_ttl=3)


def make(sb: Sandbox, metrics: Metrics, *, jwt: str | None = None,
         retry_interval: float = 10.0) -> tuple[TokenManager, RingCentralClient]:
    account = sb.accounts[0]
    http = requests.Session()
    tokens = TokenManager(sb.rc_url, sb.client_id, sb.client_secret, jwt or account.jwt, metrics, http,
                          user=account.name, timeout=(2.0, 5.0), retry_interval=retry_interval)
    return tokens, RingCentralClient(sb.rc_url, tokens, metrics, http, user=account.name, timeout=(2.0, 5.0))


def stats(sb: Sandbox) -> dict[str, int]:
    return sb.rc.stats()[sb.accounts[0].account_id]


def test_one_login_shared_by_concurrent_callers(sandbox: Sandbox) -> None:
    m = Metrics()
    tokens, _ = make(sandbox, m)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(tokens.access_token())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 20 and len(set(results)) == 1
    assert stats(sandbox)["tokens_issued"] == 1 and tokens.logins == 1
    assert tokens.owner_id == sandbox.accounts[0].extension_id
    assert sample(m, "ingest_token_refreshes_total", grant="jwt", outcome="ok") == 1


def test_proactive_refresh_uses_refresh_token_not_jwt(short_tokens_sandbox: Sandbox) -> None:
    sandbox = short_tokens_sandbox
    m = Metrics()
    tokens, client = make(sandbox, m)
    first = tokens.access_token()
    # expires_in=2: refreshed half-way, i.e. before the token expires; never a second JWT login.
    wait_for(lambda: tokens.access_token() != first, 5, "a proactive refresh")
    for _ in range(3):
        current = tokens.access_token()
        wait_for(lambda c=current: tokens.access_token() != c, 5, "another refresh")  # type: ignore[misc]
    client.list_subscriptions()  # the refreshed token works
    assert tokens.logins == 1 and tokens.refreshes >= 4
    s = stats(sandbox)
    assert s["refreshed"] == tokens.refreshes and s["tokens_issued"] == 1 + tokens.refreshes
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.list", status="401") == 0


def test_401_refreshes_once_and_retries(sandbox: Sandbox) -> None:
    m = Metrics()
    tokens, client = make(sandbox, m)
    client.list_subscriptions()
    assert sandbox.faults.expire_access_tokens(sandbox.accounts[0].name) == 1
    assert client.list_subscriptions() == []  # 401 -> refresh -> retried once, transparently
    assert tokens.logins == 1 and tokens.refreshes == 1
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.list", status="401") == 1
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.list", status="200") == 2
    # A 401 that persists is raised after the single retry, not retried forever.
    sandbox.faults.rc_error(endpoint="list", status=401, count=2)
    with pytest.raises(ApiError) as info:
        client.list_subscriptions()
    assert info.value.status == 401 and info.value.error_code == "OAU-128"
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.list", status="401") == 3


def test_refused_refresh_token_falls_back_to_one_jwt_login(sandbox: Sandbox) -> None:
    m = Metrics()
    tokens, client = make(sandbox, m)
    client.list_subscriptions()
    sandbox.faults.revoke_refresh_tokens(sandbox.accounts[0].name)
    sandbox.faults.expire_access_tokens(sandbox.accounts[0].name)
    client.list_subscriptions()
    assert tokens.logins == 2 and tokens.refreshes == 0
    assert sample(m, "ingest_token_refreshes_total", grant="refresh_token", outcome="error") == 1
    assert stats(sandbox)["tokens_issued"] == 2


def test_bad_jwt_is_not_retried(sandbox: Sandbox) -> None:
    m = Metrics()
    tokens, _ = make(sandbox, m, jwt="not-a-valid-jwt-credential")
    with pytest.raises(AuthError) as info:
        tokens.access_token()
    assert info.value.status == 400 and "not-a-valid-jwt-credential" not in str(info.value)
    with pytest.raises(TokenUnavailable) as later:
        tokens.access_token()  # within the cool-down: no request at all
    assert later.value.retry_after > 200
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="oauth.token", status="400") == 1


def test_token_429_and_503_wait_for_retry_after(sandbox: Sandbox) -> None:
    m = Metrics()
    tokens, _ = make(sandbox, m)
    sandbox.faults.rc_error(endpoint="token", status=429, retry_after=1, count=1)
    with pytest.raises(RateLimited):
        tokens.access_token()
    with pytest.raises(TokenUnavailable) as info:
        tokens.access_token()
    assert 0.5 < info.value.retry_after <= 1.0
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="oauth.token", status="429") == 1
    wait_for(lambda: _try(tokens), 3, "the token after Retry-After")
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="oauth.token", status="200") == 1

    tokens2, _ = make(sandbox, m, retry_interval=0.5)
    sandbox.faults.rc_error(endpoint="token", status=500, count=1)
    with pytest.raises(ApiError):
        tokens2.access_token()
    with pytest.raises(TokenUnavailable):
        tokens2.access_token()
    wait_for(lambda: _try(tokens2), 3, "the token after the retry interval")
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="oauth.token", status="500") == 1


def _try(tokens: TokenManager) -> bool:
    try:
        tokens.access_token()
    except TokenUnavailable:
        return False
    return True


def test_429_penalty_silences_the_group_only(sandbox: Sandbox) -> None:
    m = Metrics()
    _, client = make(sandbox, m)
    client.list_subscriptions()
    sandbox.faults.rc_error(endpoint="list", status=429, retry_after=2, count=1)
    started = time.monotonic()
    with pytest.raises(RateLimited) as info:
        client.list_subscriptions()
    assert info.value.sent and info.value.group == "light" and info.value.retry_after == 2
    assert sample(m, "ingest_ringcentral_rate_limit_penalties_total", group="light") == 1
    sent_before = sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.list", status="429")
    # During the penalty: refused locally, nothing reaches the server (a request would reset the penalty).
    while time.monotonic() - started < 1.5:
        with pytest.raises(RateLimited) as again:
            client.get_subscription("any")  # also Light
        assert not again.value.sent and 0 < (again.value.retry_after or 0) <= 2
        time.sleep(0.1)
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.get", status="404") == 0
    assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.list",
                  status="429") == sent_before
    # Another group (Medium) is not affected.
    created = client.create_subscription(["/restapi/v1.0/account/~/extension/~/message-store"], 60)
    wait_for(lambda: client.penalty_remaining("subscription.list") == 0, 3, "the end of the penalty")
    assert time.monotonic() - started >= 1.9
    assert [r["id"] for r in client.list_subscriptions()] == [created["id"]]


def test_error_bodies_are_typed(sandbox: Sandbox) -> None:
    _, client = make(sandbox, Metrics())
    with pytest.raises(ApiError) as info:
        client.renew_subscription("does-not-exist")
    assert (info.value.status, info.value.error_code) == (404, "CMN-102")
    assert "subscriptionId" in info.value.message
    with pytest.raises(ApiError) as bad:
        client.create_subscription([], 60)
    assert (bad.value.status, bad.value.error_code) == (400, "SUB-508")
    sandbox.faults.rc_error(endpoint="create", status=503, retry_after=7, count=1)
    with pytest.raises(ApiError) as unavailable:
        client.create_subscription(["/restapi/v1.0/account/~/extension/~/message-store"], 60)
    assert unavailable.value.retryable and unavailable.value.retry_after == 7


def test_parse_error_body_shapes() -> None:
    assert parse_error_body({"errorCode": "TokenInvalid", "message": "m",
                             "errors": [{"errorCode": "OAU-149", "message": "x"}]}) == ("OAU-149", "m")
    assert parse_error_body({"error": "invalid_grant", "error_description": "Token is revoked",
                             "errors": [{"errorCode": "OAU-211"}]}) == ("OAU-211", "Token is revoked")
    assert parse_error_body({"errorCode": "CMN-301", "message": "Request rate exceeded"}) == (
        "CMN-301", "Request rate exceeded")
    assert parse_error_body("oops") == (None, "")
