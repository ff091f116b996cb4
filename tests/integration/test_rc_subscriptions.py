"""SubscriptionManager against the sandbox (real HTTP): reuse, renewals, rotation, faults, removal."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
import requests

from ingest.config import load_config
from ingest.model import Delivery, SubscriptionSpec
from ingest.observability.metrics import Metrics
from ingest.rc.accounts import AccountSession, build_sessions
from ingest.rc.errors import ApiError, missing_permission
from ingest.rc.http import RingCentralClient
from ingest.rc.subscriptions import CLOCK_SKEW_SECONDS, SubscriptionManager, normalize_filters
from ingest.rc.tokens import TokenManager
from ingest.sandbox.ringcentral import SubscriptionView
from ingest.sandbox.server import Sandbox, SandboxSettings
from tests.support import holds, sample, wait_for

MSG = "/restapi/v1.0/account/~/extension/~/message-store"
PRESENCE = "/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true"



class Recorder:
    """Collects on_delivery calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Delivery | None]] = []
        self._lock = threading.Lock()

    def __call__(self, spec_id: str, delivery: Delivery | None) -> None:
        with self._lock:
            self.calls.append((spec_id, delivery))

    def of(self, spec_id: str) -> list[Delivery | None]:
        with self._lock:
            return [d for s, d in self.calls if s == spec_id]

    def last(self, spec_id: str) -> Delivery | None:
        calls = self.of(spec_id)
        return calls[-1] if calls else None


class RequestLog:
    """Response hook on the account's requests.Session: every request it sent, as answered."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, str, str, int]] = []  # (time, method, path, status)
        # (sent, answered, rate-limit group, status, Retry-After): "sent" = answered - elapsed
        self.groups: list[tuple[float, float, str, int, float]] = []

    def hook(self, resp: requests.Response, *args: object, **kwargs: object) -> None:
        now = time.monotonic()
        self.entries.append((now, resp.request.method or "", resp.request.path_url, resp.status_code))
        self.groups.append((now - resp.elapsed.total_seconds(), now, resp.headers.get("X-Rate-Limit-Group", ""),
                            resp.status_code, float(resp.headers.get("Retry-After") or 0)))


def sessions_for(sb: Sandbox, metrics: Metrics, logs: dict[str, RequestLog] | None = None
                 ) -> dict[str, AccountSession]:
    out = {}
    for a in sb.accounts:
        http = requests.Session()
        if logs is not None:
            logs[a.name] = RequestLog()
            http.hooks["response"].append(logs[a.name].hook)
        tokens = TokenManager(sb.rc_url, sb.client_id, sb.client_secret, a.jwt, metrics, http, user=a.name,
                              timeout=(2.0, 5.0))
        client = RingCentralClient(sb.rc_url, tokens, metrics, http, user=a.name, timeout=(2.0, 5.0))
        out[a.name] = AccountSession(a.name, tokens, client)
    return out


@contextmanager
def manager(sb: Sandbox, *, margin: float = 3.0, jitter: float = 0.3, expires_in: int = 900,
            sessions: dict[str, AccountSession] | None = None, metrics: Metrics | None = None,
            recorder: Recorder | None = None, delete_on_stop: bool = False) -> Iterator[
                tuple[SubscriptionManager, Recorder, Metrics]]:
    m = metrics or Metrics()
    rec = recorder or Recorder()
    mgr = SubscriptionManager(accounts=sessions or sessions_for(sb, m), metrics=m, on_delivery=rec,
                              renewal_margin=margin, renewal_jitter=jitter, expires_in=expires_in)
    mgr.start()
    try:
        yield mgr, rec, m
    finally:
        mgr.stop(delete_subscriptions=delete_on_stop)


def spec(account: str, name: str, *filters: str) -> SubscriptionSpec:
    return SubscriptionSpec(spec_id=f"{account}/{name}", account=account, event_filters=tuple(filters or (MSG,)))


def server_sub(sb: Sandbox, sub_id: str | None) -> SubscriptionView:
    [view] = [s for s in sb.rc.subscriptions(include_dead=True) if s.id == sub_id]
    return view


def active(mgr: SubscriptionManager, spec_id: str) -> bool:
    return any(s.spec_id == spec_id and s.state == "active" for s in mgr.snapshot())


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    """Subscriptions live 6 s at most: a renewal every ~3 s with a 3 s margin."""
    with Sandbox(SandboxSettings(subscription_ttl_max=6, pubnub_hold_seconds=0.2)) as box:
        yield box


def test_config_to_live_subscriptions_and_renewal_cycles(sb: Sandbox, tmp_path: Path) -> None:
    acme, globex = sb.accounts[0], sb.accounts[1]
    cfg_file = tmp_path / "worker.yaml"
    cfg_file.write_text(f"""
kafka: {{bootstrap.servers: 127.0.0.1:1}}
ringcentral: {{server: "{sb.rc_url}", client_id: "{sb.client_id}", client_secret_env: SECRET}}
accounts:
  - name: {acme.name}
    jwt_env: ACME_JWT
    subscriptions:
      - {{name: messages, event_filters: ["{MSG}"]}}
      - {{name: presence, event_filters: ["{PRESENCE}"]}}
  - name: {globex.name}
    jwt_env: GLOBEX_JWT
    subscriptions:
      - {{name: messages, event_filters: ["/account/~/extension/~/message-store"]}}
worker: {{renewal_margin_seconds: 3, renewal_jitter_seconds: 0.3, expires_in_seconds: 6}}
""")
    cfg = load_config(cfg_file, {"SECRET": sb.client_secret, "ACME_JWT": acme.jwt, "GLOBEX_JWT": globex.jwt})
    m = Metrics()
    rec = Recorder()
    mgr = SubscriptionManager(accounts=build_sessions(cfg, m), metrics=m, on_delivery=rec,
                              renewal_margin=cfg.worker.renewal_margin_seconds,
                              renewal_jitter=cfg.worker.renewal_jitter_seconds,
                              expires_in=cfg.worker.expires_in_seconds)
    mgr.set_specs(cfg.specs())
    mgr.start()
    try:
        wait_for(lambda: all(s.state == "active" for s in mgr.snapshot()), 10, "three active subscriptions")
        first = {s: rec.last(s) for s in ("acme/messages", "acme/presence", "globex/messages")}
        d = first["acme/presence"]
        assert d is not None and d.account_id == acme.account_id and d.encryption_key
        assert d.subscriber_key == sb.subscriber_key
        view = server_sub(sb, d.subscription_id)
        assert view.channel == d.channel and view.key == d.encryption_key
        assert first["globex/messages"] is not None and first["globex/messages"].account_id == globex.account_id
        # Several renewal cycles: every subscription is renewed before it expires, never re-created.
        wait_for(lambda: all(s.renewals >= 3 for s in mgr.snapshot()), 20, "three renewals each")
        assert sb.rc.created_total == 3
        assert all(v.status == "Active" for v in sb.rc.subscriptions(include_dead=True))
        assert all(len(rec.of(s)) == 1 for s in first)  # nothing changed: reported once
        assert sample(m, "ingest_subscription_renewals_total", outcome="ok") >= 9
        assert sample(m, "ingest_subscription_renewals_total", outcome="error") == 0
        assert sample(m, "ingest_subscription_creations_total", reason="new") == 3
        assert sample(m, "ingest_subscriptions", state="active") == 3
        assert sample(m, "ingest_subscription_renewal_margin_seconds_count") >= 9
        # Renewal completed about `margin` before expiry (3 s +- jitter), never after it.
        margin_sum = sample(m, "ingest_subscription_renewal_margin_seconds_sum")
        assert 2.0 <= margin_sum / sample(m, "ingest_subscription_renewal_margin_seconds_count") <= 3.5
        assert sample(m, "ingest_subscription_renewal_margin_seconds_bucket", le="0.0") == 0
        expiry = sample(m, "ingest_subscription_expiry_seconds", spec="acme/messages", account="acme")
        assert 0 < expiry <= 6
        assert 0 < sample(m, "ingest_subscription_expiry_min_seconds") <= expiry
        # One login per account; tokens were not re-requested per call.
        assert sample(m, "ingest_token_refreshes_total", grant="jwt", outcome="ok") == 2
    finally:
        mgr.stop()


def test_restart_reuses_subscriptions_instead_of_creating(sb: Sandbox) -> None:
    acme = sb.accounts[0].name
    specs = [spec(acme, "a", MSG), spec(acme, "b", PRESENCE), spec(acme, "twin", MSG)]
    with manager(sb) as (mgr, rec, _):
        mgr.set_specs(specs)
        wait_for(lambda: all(s.state == "active" for s in mgr.snapshot()), 10, "active")
        before = {s.spec_id: s.subscription_id or "" for s in mgr.snapshot()}
    assert sb.rc.created_total == 3
    # A new process: new sessions, no state. It lists, matches the filters (with `~` expanded by the
    # server), renews and reuses each one; the two specs with equal filters get one each.
    with manager(sb) as (mgr2, rec2, m2):
        mgr2.set_specs(specs)
        wait_for(lambda: all(s.state == "active" for s in mgr2.snapshot()), 10, "active after restart")
        after = {s.spec_id: s.subscription_id or "" for s in mgr2.snapshot()}
        assert sorted(after.values()) == sorted(before.values())
        assert after[f"{acme}/b"] == before[f"{acme}/b"]
        assert sb.rc.created_total == 3
        assert sample(m2, "ingest_subscription_creations_total", reason="new") == 0
        assert sample(m2, "ingest_ringcentral_api_calls_total", endpoint="subscription.list", status="200") == 1
        assert all(len(rec2.of(s.spec_id)) == 1 for s in specs)
    # A new owner handed the recorded ids renews them directly, without even listing.
    with manager(sb) as (mgr3, _, m3):
        mgr3.set_specs(specs, known_ids=before)
        wait_for(lambda: all(s.state == "active" for s in mgr3.snapshot()), 10, "active with known ids")
        assert {s.spec_id: s.subscription_id for s in mgr3.snapshot()} == before
        assert sample(m3, "ingest_ringcentral_api_calls_total", endpoint="subscription.list", status="200") == 0
        assert sb.rc.created_total == 3
    del rec


def test_known_id_that_is_gone_falls_back_to_create(sb: Sandbox) -> None:
    acme = sb.accounts[0].name
    with manager(sb) as (mgr, rec, m):
        mgr.set_specs([spec(acme, "a")], known_ids={f"{acme}/a": "0b7c1e5e-dead-4bee-8f00-000000000000"})
        wait_for(lambda: active(mgr, f"{acme}/a"), 10, "active")
        assert sb.rc.created_total == 1
        assert sample(m, "ingest_subscription_creations_total", reason="new") == 1
        assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.renew", status="404") == 1
        assert len(rec.of(f"{acme}/a")) == 1


def test_rotation_at_renewal_is_reported(sb: Sandbox) -> None:
    acme = sb.accounts[0].name
    with manager(sb) as (mgr, rec, m):
        mgr.set_specs([spec(acme, "p", PRESENCE)])
        wait_for(lambda: rec.last(f"{acme}/p") is not None, 10, "first delivery")
        first = rec.last(f"{acme}/p")
        assert first is not None
        sb.faults.rotate_on_next_renewal(first.subscription_id, key=True, channel=True)
        wait_for(lambda: len(rec.of(f"{acme}/p")) == 2, 10, "the rotated delivery")
        second = rec.last(f"{acme}/p")
        assert second is not None and second.subscription_id == first.subscription_id
        assert second.channel != first.channel and second.encryption_key != first.encryption_key
        view = server_sub(sb, first.subscription_id)
        assert (view.channel, view.key) == (second.channel, second.encryption_key)
        assert sample(m, "ingest_subscription_renewals_total", outcome="changed") == 1
        # Key only: reported again; a renewal without change is not.
        sb.faults.rotate_on_next_renewal(first.subscription_id, key=True, channel=False)
        wait_for(lambda: len(rec.of(f"{acme}/p")) == 3, 10, "the re-keyed delivery")
        third = rec.last(f"{acme}/p")
        assert third is not None and third.channel == second.channel and third.encryption_key != second.encryption_key
        renewed = mgr.snapshot()[0].renewals
        wait_for(lambda: mgr.snapshot()[0].renewals >= renewed + 1, 10, "a plain renewal")
        assert len(rec.of(f"{acme}/p")) == 3


def test_server_side_delete_and_expiry_are_recreated(sb: Sandbox) -> None:
    acme = sb.accounts[0].name
    with manager(sb) as (mgr, rec, m):
        mgr.set_specs([spec(acme, "a")])
        wait_for(lambda: rec.last(f"{acme}/a") is not None, 10, "first delivery")
        first = rec.last(f"{acme}/a")
        assert first is not None
        sb.faults.delete_subscription(first.subscription_id)
        wait_for(lambda: len(rec.of(f"{acme}/a")) == 2, 10, "re-created after delete")
        second = rec.last(f"{acme}/a")
        assert second is not None and second.subscription_id != first.subscription_id
        assert sample(m, "ingest_subscription_renewals_total", outcome="not-found") == 1
        assert sample(m, "ingest_subscription_creations_total", reason="not-found") == 1
        assert sample(m, "ingest_subscription_deletions_total", outcome="not-found") == 1  # stale id dropped
        sb.faults.expire_subscription(second.subscription_id)
        wait_for(lambda: len(rec.of(f"{acme}/a")) == 3, 10, "re-created after expiry")
        live = sb.rc.subscriptions(include_dead=False)
        assert [v.id for v in live] == [rec.last(f"{acme}/a").subscription_id]  # type: ignore[union-attr]
        wait_for(lambda: active(mgr, f"{acme}/a"), 5, "active again")


def test_report_problem_verifies_and_recreates_at_once() -> None:
    # Subscriptions live 60 s: no renewal happens during the test, only the report can trigger a check.
    with Sandbox(SandboxSettings(subscription_ttl_max=60)) as sb, manager(sb, margin=3) as (mgr, rec, m):
        acme = sb.accounts[0].name
        mgr.set_specs([spec(acme, "a")])
        wait_for(lambda: rec.last(f"{acme}/a") is not None, 10, "first delivery")
        first = rec.last(f"{acme}/a")
        assert first is not None
        mgr.report_problem(f"{acme}/a", "pubnub-access-denied")  # healthy: verified, nothing changes
        wait_for(lambda: sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.get",
                                  status="200") == 1, 5, "the verification")
        assert len(rec.of(f"{acme}/a")) == 1 and active(mgr, f"{acme}/a")
        sb.faults.delete_subscription(first.subscription_id)

        def reported_and_recreated() -> bool:
            # The data plane keeps reporting; verifications are throttled (VERIFY_MIN_INTERVAL).
            mgr.report_problem(f"{acme}/a", "pubnub-access-denied")
            return len(rec.of(f"{acme}/a")) == 2

        wait_for(reported_and_recreated, 10, "re-created after the report")
        assert rec.last(f"{acme}/a").subscription_id != first.subscription_id  # type: ignore[union-attr]
        assert sample(m, "ingest_subscription_creations_total", reason="not-found") == 1
        assert sample(m, "ingest_subscription_renewals_total", outcome="ok") == 0  # no renewal did it


def test_429_on_renewal_stays_silent_for_the_whole_penalty() -> None:
    with Sandbox(SandboxSettings(subscription_ttl_max=10)) as sb:
        acme = sb.accounts[0].name
        logs: dict[str, RequestLog] = {}
        m = Metrics()
        with manager(sb, margin=6, jitter=0.2, sessions=sessions_for(sb, m, logs), metrics=m) as (mgr, rec, _):
            mgr.set_specs([spec(acme, "a"), spec(acme, "b", PRESENCE)])
            wait_for(lambda: all(s.state == "active" for s in mgr.snapshot()), 10, "active")
            sb.faults.rc_error(endpoint="renew", status=429, retry_after=2, count=1)
            wait_for(lambda: any(e[3] == 429 for e in logs[acme].entries), 10, "the 429")
            wait_for(lambda: sample(m, "ingest_subscription_renewals_total", outcome="ok") >= 2, 10,
                       "both renewed after the penalty")
            entries = list(logs[acme].entries)
            [hit] = [i for i, e in enumerate(entries) if e[3] == 429]
            after = [e for e in entries[hit + 1:]]
            assert after, "no request after the penalty"
            # Nothing was sent for the account during the 2 s penalty (each request would reset it).
            assert after[0][0] - entries[hit][0] >= 2.0 - 0.05, after[0]
            assert sample(m, "ingest_ringcentral_rate_limit_penalties_total", group="light") == 1
            assert sample(m, "ingest_subscription_renewals_total", outcome="rate-limited") >= 1
            assert sb.rc.created_total == 2  # renewed in time, nothing re-created
            wait_for(lambda: all(s.state == "active" for s in mgr.snapshot()), 5, "active again")
            del rec


def test_401_on_renewal_refreshes_and_retries_once(sb: Sandbox) -> None:
    acme = sb.accounts[0].name
    m = Metrics()
    sessions = sessions_for(sb, m)
    with manager(sb, sessions=sessions, metrics=m) as (mgr, rec, _):
        mgr.set_specs([spec(acme, "a")])
        wait_for(lambda: active(mgr, f"{acme}/a"), 10, "active")
        sb.faults.expire_access_tokens(acme)
        wait_for(lambda: mgr.snapshot()[0].renewals >= 1, 10, "a renewal")
        assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.renew", status="401") == 1
        assert sample(m, "ingest_ringcentral_api_calls_total", endpoint="subscription.renew", status="200") >= 1
        assert sample(m, "ingest_subscription_renewals_total", outcome="error") == 0
        assert sessions[acme].tokens.refreshes == 1 and sessions[acme].tokens.logins == 1
        # Refresh token revoked as well: the refresh is refused, then exactly one new JWT login.
        sb.faults.revoke_refresh_tokens(acme)
        sb.faults.expire_access_tokens(acme)
        renewed = mgr.snapshot()[0].renewals
        wait_for(lambda: mgr.snapshot()[0].renewals > renewed, 10, "a renewal after re-login")
        assert sessions[acme].tokens.logins == 2
        assert sample(m, "ingest_subscription_renewals_total", outcome="error") == 0
        assert sb.rc.created_total == 1 and len(rec.of(f"{acme}/a")) == 1


def test_5xx_on_renewal_backs_off_and_retries(sb: Sandbox) -> None:
    acme = sb.accounts[0].name
    with manager(sb) as (mgr, rec, m):
        mgr.set_specs([spec(acme, "a")])
        wait_for(lambda: active(mgr, f"{acme}/a"), 10, "active")
        sub_id = mgr.snapshot()[0].subscription_id
        sb.faults.rc_error(endpoint="renew", status=500, count=2)
        wait_for(lambda: mgr.snapshot()[0].state == "retrying", 10, "the retrying state")
        assert "500" in (mgr.snapshot()[0].last_error or "")
        assert sample(m, "ingest_subscription_renewals_total", outcome="error") >= 1
        wait_for(lambda: mgr.snapshot()[0].renewals >= 1, 10, "the renewal after backoff")
        assert sample(m, "ingest_subscription_renewals_total", outcome="error") == 2
        assert mgr.snapshot()[0].subscription_id == sub_id and sb.rc.created_total == 1
        assert server_sub(sb, sub_id).status == "Active"
        assert len(rec.of(f"{acme}/a")) == 1


def test_outage_longer_than_lifetime_recreates(sb: Sandbox) -> None:
    acme = sb.accounts[0].name
    with manager(sb) as (mgr, rec, m):
        mgr.set_specs([spec(acme, "a")])
        wait_for(lambda: active(mgr, f"{acme}/a"), 10, "active")
        first = mgr.snapshot()[0].subscription_id
        sb.faults.rc_error(endpoint="renew", status=503, seconds=7)  # longer than the 5 s left: it lapses
        wait_for(lambda: len(rec.of(f"{acme}/a")) == 2, 15, "a new subscription after the outage")
        assert mgr.snapshot()[0].subscription_id != first
        assert sample(m, "ingest_subscription_creations_total", reason="expired") + sample(
            m, "ingest_subscription_creations_total", reason="not-found") == 1


def test_removing_a_spec_deletes_its_subscription(sb: Sandbox) -> None:
    acme = sb.accounts[0].name
    with manager(sb) as (mgr, rec, m):
        mgr.set_specs([spec(acme, "a"), spec(acme, "b", PRESENCE)])
        wait_for(lambda: all(s.state == "active" for s in mgr.snapshot()), 10, "active")
        doomed = rec.last(f"{acme}/b")
        assert doomed is not None
        mgr.set_specs([spec(acme, "a")])
        assert rec.of(f"{acme}/b")[-1] is None  # the data plane hears at once
        wait_for(lambda: server_sub(sb, doomed.subscription_id).deleted, 5, "server-side deletion")
        assert sample(m, "ingest_subscription_deletions_total", outcome="ok") == 1
        assert {s.spec_id: s.state for s in mgr.snapshot()} == {f"{acme}/a": "active", f"{acme}/b": "deleted"}
        assert sample(m, "ingest_subscriptions", state="active") == 1
        # Changing a spec's filters replaces its subscription.
        old = rec.last(f"{acme}/a")
        assert old is not None
        mgr.set_specs([spec(acme, "a", PRESENCE)])
        wait_for(lambda: len(rec.of(f"{acme}/a")) == 2, 10, "the replacement")
        assert rec.last(f"{acme}/a").subscription_id != old.subscription_id  # type: ignore[union-attr]
        wait_for(lambda: server_sub(sb, old.subscription_id).deleted, 5, "old one deleted")
    # stop(delete_subscriptions=True) leaves nothing behind.
    with manager(sb, delete_on_stop=True) as (mgr2, _, _m2):
        mgr2.set_specs([spec(acme, "a", PRESENCE), spec(acme, "c")])
        wait_for(lambda: all(s.state == "active" for s in mgr2.snapshot()), 10, "active")
    assert sb.rc.subscriptions(include_dead=False) == []


def test_normalize_filters() -> None:
    a = normalize_filters(["/restapi/v1.0/account/~/extension/~/presence?sipData=true&detailedTelephonyState=true",
                           "/account/~/telephony/sessions"], "11", "22")
    b = normalize_filters(["/restapi/v1.0/account/11/telephony/sessions",
                           "/restapi/v1.0/account/11/extension/22/presence?detailedTelephonyState=true&sipData=true"],
                          "11", "22")
    assert a == b
    assert normalize_filters(["/restapi/v1.0/account/~/extension/~/presence"], "11", "22") != \
        normalize_filters(["/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true"], "11", "22")
    assert normalize_filters(["/restapi/v2/accounts/~/sms/consents",
                              "/ai/ringsense/v1/public/accounts/~/domains/pbx/insights"], "11", "22") == \
        normalize_filters(["/ai/ringsense/v1/public/accounts/11/domains/pbx/insights",
                           "/restapi/v2/accounts/11/sms/consents"], "11", "22")


def test_many_subscriptions_are_renewed_punctually() -> None:
    """500 specs over 10 accounts, one scheduler thread: every renewal lands before expiry.

    (Measured by hand with the same setup: 5,000 specs, TTL 60 s, margin 20 s: all renewed 15-30 s
    before expiry, none lapsed; see the control-plane report.)"""
    from ingest.sandbox.server import demo_accounts

    accounts = demo_accounts(10)
    n = 500
    with Sandbox(SandboxSettings(accounts=accounts, subscription_ttl_max=12, subscription_limit=n,
                                 rate_limits=False)) as sb, manager(sb, margin=4, jitter=2) as (mgr, rec, m):
        mgr.set_specs([spec(accounts[i % 10].name, f"s{i}") for i in range(n)])
        wait_for(lambda: sum(s.state == "active" for s in mgr.snapshot()) == n, 60, "all active")
        assert len({d.subscription_id for _, d in rec.calls if d is not None}) == n
        wait_for(lambda: min(s.renewals for s in mgr.snapshot()) >= 2, 60, "two renewals each")
        assert sb.rc.created_total == n
        assert all(v.status == "Active" for v in sb.rc.subscriptions(include_dead=True))
        assert sample(m, "ingest_subscription_renewal_margin_seconds_bucket", le="0.0") == 0
        assert sample(m, "ingest_subscription_renewals_total", outcome="error") == 0
        assert sample(m, "ingest_subscriptions", state="failed") == 0


def test_real_rate_limiter_penalties_are_never_interrupted() -> None:
    """The sandbox's limiter (sliding window; any request during a penalty restarts it) with a Light
    limit too small for the renewals: after every 429, the account sends nothing in that group until
    Retry-After has passed, and every spec ends up active again."""
    from ingest.sandbox.server import RateLimits

    limits = RateLimits(light=4, medium=40, auth=5, window=5, penalty=2)
    with Sandbox(SandboxSettings(subscription_ttl_max=8, rate_limits=limits)) as sb:
        acme = sb.accounts[0].name
        logs: dict[str, RequestLog] = {}
        m = Metrics()
        with manager(sb, margin=4, jitter=0.5, sessions=sessions_for(sb, m, logs), metrics=m) as (mgr, _, _m):
            mgr.set_specs([spec(acme, f"s{i}") for i in range(6)])
            wait_for(lambda: sample(m, "ingest_ringcentral_rate_limit_penalties_total", group="light") >= 2, 30,
                       "two penalties")
            wait_for(lambda: all(s.state == "active" for s in mgr.snapshot()), 30, "all active after penalties")
            entries = list(logs[acme].groups)
        penalties = [(answered, g, ra) for _, answered, g, status, ra in entries if status == 429]
        assert penalties
        for t429, group, retry_after in penalties:
            assert retry_after == 2
            # Requests already in flight when the 429 arrived cannot be helped; none may be *sent* after.
            during = [e for e in entries if e[2] == group and t429 < e[0] < t429 + retry_after - 0.05]
            assert during == [], f"sent during the {group} penalty that began at {t429}: {during}"


def test_a_stop_right_after_a_handover_keeps_the_handed_subscriptions(sb: Sandbox) -> None:
    """A group worker stopped gracefully hands its specs over, then stops its manager at once. The
    released specs' removals were still queued then, and `stop` deleted every queued removal's
    subscription: the new owner found them gone (8 of 40 in one run), and RingCentral published
    nothing for them until it created new ones."""
    specs = [spec(sb.accounts[0].name, f"s{i:02d}") for i in range(20)]
    with manager(sb) as (mgr, _rec, _m):
        mgr.set_specs(specs)
        wait_for(lambda: all(active(mgr, s.spec_id) for s in specs), 60, what="every subscription active")
        handed = mgr.release([s.spec_id for s in specs])
        mgr.stop()
    live = {view.id for view in sb.rc.live_subscriptions()}
    assert len(set(handed.values())) == len(specs)
    deleted = set(handed.values()) - live
    assert not deleted, f"{len(deleted)} handed-over subscriptions deleted at stop"


def test_missing_app_permission_fails_the_spec_once_naming_it(sb: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    """403 CMN-401 for a filter's permission: one clear error, the spec `failed`, no retry loop."""
    caplog.set_level(logging.WARNING, logger="ingest")
    acme = sb.accounts[0].name
    sb.faults.revoke_permission("ReadPresence", account=acme)
    metrics, logs = Metrics(), {}
    with manager(sb, metrics=metrics, sessions=sessions_for(sb, metrics, logs)) as (mgr, rec, _):
        mgr.set_specs([spec(acme, "presence", PRESENCE), spec(acme, "messages")])
        wait_for(lambda: active(mgr, f"{acme}/messages"), 10, "the spec whose permissions are all granted")
        wait_for(lambda: {s.spec_id: s.state for s in mgr.snapshot()}[f"{acme}/presence"] == "failed", 10, "failed")
        [status] = [s for s in mgr.snapshot() if s.spec_id == f"{acme}/presence"]
        assert "lacks the permission ReadPresence" in (status.last_error or "")

        def refused_creates() -> int:
            return sum(1 for _, method, path, code in logs[acme].entries
                       if (method, path, code) == ("POST", "/restapi/v1.0/subscription", 403))
        assert holds(lambda: refused_creates() == 1, 12)  # a retry would come after 8-10 s
        reports = [getattr(r, "fields", {}) for r in caplog.records
                   if r.getMessage() == "subscription.permission_missing"]
        assert [(r["spec"], r["permission"]) for r in reports] == [(f"{acme}/presence", "ReadPresence")]
        assert rec.of(f"{acme}/presence") == []


def test_missing_read_accounts_fails_the_account_id_lookup_once_naming_it(sb: Sandbox) -> None:
    """Without ReadAccounts the worker cannot learn the account id (the record key): no spec can start."""
    acme = sb.accounts[0].name
    sb.faults.revoke_permission("ReadAccounts", account=acme)
    metrics, logs = Metrics(), {}
    with manager(sb, metrics=metrics, sessions=sessions_for(sb, metrics, logs)) as (mgr, _, _):
        mgr.set_specs([spec(acme, "messages")])
        wait_for(lambda: mgr.snapshot()[0].state == "failed", 10, "failed")
        assert "lacks the permission ReadAccounts" in (mgr.snapshot()[0].last_error or "")

        def refused_lookups() -> int:
            return sum(1 for _, method, path, code in logs[acme].entries
                       if (method, path, code) == ("GET", "/restapi/v1.0/account/~/extension/~", 403))
        assert holds(lambda: refused_lookups() == 1, 12)  # a retry would come after 8-10 s
        assert sb.rc.created_total == 0


@pytest.mark.parametrize(("status", "message", "permission"), [
    (403, "In order to call this API endpoint, application needs to have [ReadPresence] permission", "ReadPresence"),
    (403, "Required application permission [TelephonySessions] is missing.", "TelephonySessions"),
    (403, "In order to call this API endpoint, user needs to have [ReadCallLog] permission for requested resource.",
     "ReadCallLog"),
    (403, "Subscriptions limit exceeded", None),
    (403, "Not allowed subscribe for events to extensions of other account", None),
    (401, "Required application permission [X] is missing.", None),
])
def test_missing_permission_is_read_from_the_error(status: int, message: str, permission: str | None) -> None:
    assert missing_permission(ApiError(status, "CMN-401", message)) == permission


def test_a_halted_manager_creates_and_renews_nothing(sb: Sandbox) -> None:
    """A fenced worker halts its control plane at once: specs it is given afterwards get no
    subscription (one created then would be named by no state record: the soak lost what such
    orphans received), and what it has is no longer renewed."""
    account = sb.accounts[0].name
    with manager(sb) as (mgr, _rec, _m):
        mgr.set_specs([spec(account, "before")])
        wait_for(lambda: active(mgr, f"{account}/before"), 30, what="the first subscription active")
        created, [before] = sb.rc.created_total, sb.rc.live_subscriptions()
        mgr.halt()
        mgr.set_specs([spec(account, "before"), spec(account, "after")])
        # Renewed every ~3 s while the manager runs (6-s lifetimes): expiring shows that renewals
        # stopped (one already on its way at the halt may still land).
        wait_for(lambda: not sb.rc.is_live(before.id), 30, what="the subscription expiring unrenewed")
        assert sb.rc.created_total == created


def test_orphans_created_since_an_intent_are_adopted_one_per_spec_and_nothing_else(sb: Sandbox) -> None:
    """A group member restores two specs with identical filters whose records hold intents (their
    creator died before recording what it created) and a third without one. Each of the two adopts
    one of the orphans created since the intent, whichever (identical filters receive the same
    events), and a third, later one is deleted; the one the record names is deleted (it was being
    replaced); a subscription created
    before the intent, and one whose filters no intent's spec has, are left alone; the third spec,
    without an intent, creates its own."""
    account = sb.accounts[0].name
    m = Metrics()
    sessions = sessions_for(sb, m)
    client = sessions[account].client
    recorded = client.create_subscription([MSG], 900)["id"]
    stray = client.create_subscription([MSG], 900)  # before the intent: someone else's
    first_orphan = client.create_subscription([MSG], 900)
    orphans = {first_orphan["id"], client.create_subscription([MSG], 900)["id"]}
    other_filters = client.create_subscription([PRESENCE], 900)["id"]
    retried = client.create_subscription([MSG], 900)["id"]  # a third: a creation retried after a lost answer
    before, after = (datetime.fromisoformat(info["creationTime"]).timestamp() for info in (stray, first_orphan))
    assert before < after, (stray["creationTime"], first_orphan["creationTime"])
    intent = (before + after) / 2 + CLOCK_SKEW_SECONDS  # looked for from (before + after) / 2
    created = sb.rc.created_total
    rec = Recorder()
    mgr = SubscriptionManager(accounts=sessions, metrics=m, on_delivery=rec, renewal_margin=3.0,
                              renewal_jitter=0.3, adopt_matching=False)
    mgr.start()
    try:
        specs = [spec(account, "a"), spec(account, "b"), spec(account, "c")]
        mgr.set_specs(specs, {f"{account}/a": recorded}, {f"{account}/a": intent, f"{account}/b": intent},
                      {recorded})
        wait_for(lambda: all(rec.last(s.spec_id) for s in specs), 30, what="every spec's delivery")
        adopted = {d.subscription_id for s in ("a", "b") if (d := rec.last(f"{account}/{s}")) is not None}
        assert len(adopted) == 2 and adopted <= orphans | {retried}, adopted  # the earliest, unless created together
        [unadopted] = (orphans | {retried}) - adopted
        own = rec.last(f"{account}/c")
        assert own is not None and own.subscription_id not in orphans | {retried, stray["id"], other_filters, recorded}
        assert sb.rc.created_total == created + 1  # only the spec without an intent created one
        wait_for(lambda: not sb.rc.is_live(recorded), 10, what="the recorded (replaced) subscription deleted")
        # All the third received, the adopted ones (created before it, same filters) received too.
        wait_for(lambda: not sb.rc.is_live(unadopted), 10, what="the orphan no spec adopts deleted")
        assert sb.rc.is_live(stray["id"]) and sb.rc.is_live(other_filters)
    finally:
        mgr.stop(delete_subscriptions=True)


def test_an_intent_without_an_orphan_alive_is_reported_unless_a_spec_with_its_filters_adopted_one(sb: Sandbox) -> None:
    """Three specs restored with intents: two with identical filters share the one orphan alive (one
    adopts it, the other finds it claimed: what it would have received, the adopted one receives), the
    third finds none alive for its filters: only that one is reported (`orphan_missing`, a gap), and it
    creates its own subscription."""
    account = sb.accounts[0].name
    m = Metrics()
    sessions = sessions_for(sb, m)
    orphan = sessions[account].client.create_subscription([MSG], 900)
    intent = datetime.fromisoformat(orphan["creationTime"]).timestamp()
    missing: list[tuple[str, float]] = []
    rec = Recorder()
    mgr = SubscriptionManager(accounts=sessions, metrics=m, on_delivery=rec, renewal_margin=3.0,
                              renewal_jitter=0.3, adopt_matching=False)
    mgr.orphan_missing = lambda spec_id, since: missing.append((spec_id, since))
    mgr.start()
    try:
        specs = [spec(account, "a"), spec(account, "b"), spec(account, "p", PRESENCE)]
        # The presence spec's intent is older than any lifetime: what it created may have ended since. (A
        # younger intent with nothing alive created nothing: not a gap; test_scaleout.py saw that false alarm.)
        old_intent = intent - 1000
        mgr.set_specs(specs, {}, {**dict.fromkeys((s.spec_id for s in specs), intent), f"{account}/p": old_intent})
        wait_for(lambda: all(rec.last(s.spec_id) for s in specs), 30, what="every spec's delivery")
        assert orphan["id"] in {d.subscription_id for s in specs if (d := rec.last(s.spec_id)) is not None}
        assert missing == [(f"{account}/p", old_intent)], missing
    finally:
        mgr.stop(delete_subscriptions=True)
