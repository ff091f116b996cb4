"""Renewal cycles under fire: short lifetimes, key and channel rotation, a server-side delete, 429 and 401.

Nothing may be lost and no subscription may lapse while the worker owns it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import load_config
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.worker.runtime import Worker
from tests.support import wait_for
from tests.support.harness import TopicReader, drain_and_compare, write_config

TTL = 20.0
CYCLES = 5
FILTERS = {
    "messages": ["/restapi/v1.0/account/~/extension/~/message-store"],
    "presence": ["/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true"],
}


def _renewals(sandbox: Sandbox) -> int:
    return sum(s.renewals for s in sandbox.rc.subscriptions(include_dead=True))


@pytest.mark.slow
def test_five_renewal_cycles_with_rotation_delete_429_and_401_lose_nothing(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    settings = SandboxSettings(subscription_ttl_max=TTL, pubnub_hold_seconds=1.0, buffer_size=5000)
    with Sandbox(settings) as sandbox:
        config = load_config(write_config(
            tmp_path, sandbox, kafka_bootstrap, unique_name, subscriptions=FILTERS, accounts=2,
            worker={"renewal_margin_seconds": 8, "renewal_jitter_seconds": 2, "expires_in_seconds": int(TTL)}))
        worker = Worker(config)
        worker.start()
        reader = TopicReader(kafka_bootstrap, unique_name)
        specs = 2 * len(FILTERS)
        try:
            manager = worker.manager
            assert manager is not None
            wait_for(lambda: sum(s.state == "active" for s in manager.snapshot()) == specs, 30,
                     what="active subscriptions")
            sandbox.generator.start(40)

            # Cycle 1 runs clean. Then: every subscription gets a new key and channel at its next renewal.
            wait_for(lambda: _renewals(sandbox) >= specs, TTL * 2, what="the first renewal cycle")
            sandbox.faults.rotate_on_next_renewal(None, key=True, channel=True)
            wait_for(lambda: _renewals(sandbox) >= 2 * specs, TTL * 2, what="the rotating renewal cycle")

            # A subscription deleted behind the worker's back: the next renewal gets 404 and re-creates.
            victim = next(s for s in sandbox.rc.live_subscriptions())
            created_before = sum(sandbox.rc.created_count.values())
            sandbox.faults.delete_subscription(victim.id)
            wait_for(lambda: sum(sandbox.rc.created_count.values()) > created_before, TTL * 2,
                     what="re-creation of the deleted subscription")

            # Rate limited once (Retry-After 3 s), then every access token expires (401 -> refresh, retry).
            sandbox.faults.rc_error(endpoint="renew", status=429, count=1, retry_after=3)
            sandbox.faults.expire_access_tokens(None)
            wait_for(lambda: _renewals(sandbox) >= CYCLES * specs, TTL * CYCLES, what=f"{CYCLES} renewal cycles")
            generated, result = drain_and_compare(sandbox, reader, 60)
            assert result.ok, (len(result.missing), sorted({g.channel for g in result.missing}), result.wrong[:3])

            views = sandbox.rc.subscriptions(include_dead=True)
            lapsed = [v.id for v in views if v.status == "Expired"]
            assert lapsed == [], f"subscriptions lapsed: {lapsed}"
            assert sandbox.book.fired.get("rc-error", 0) >= 1  # the 429 was really served
            assert worker.metrics.renewals.labels("changed")._value.get() >= specs
            print(f"renewals {_renewals(sandbox)}, notifications {len(generated)}, "
                  f"duplicates {sum(n - 1 for n in result.duplicates.values())}")
        finally:
            reader.close()
            worker.stop(delete_subscriptions=True)
