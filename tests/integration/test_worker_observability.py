"""A running worker's metrics and health endpoints, scraped over HTTP while traffic flows, renewals
happen and faults are injected (sandbox + real broker + real pubnub SDK)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ingest.sandbox.generator import MALFORMED
from ingest.sandbox.kafka import LocalKafka
from tests.support import samples, scrape, total, wait_for
from tests.support.harness import KIND_FAMILY, observed_worker

TTL = 12.0
WORKER = {"renewal_margin_seconds": 4, "renewal_jitter_seconds": 1, "expires_in_seconds": int(TTL)}


def present(text: str, name: str) -> bool:
    """Exported, even if a labelled metric has no series yet (then only its TYPE line shows)."""
    return any(n == name for n, _ in samples(text)) or f"# TYPE {name} " in text


def readyz(port: int) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_every_metric_exists_and_moves(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with observed_worker(tmp_path, kafka_bootstrap, unique_name, ttl=TTL, worker=WORKER) as (worker, sandbox):
        port = worker.health.port
        manager = worker.manager
        assert manager is not None
        wait_for(lambda: sum(s.state == "active" for s in manager.snapshot()) == 3, 30, what="active subscriptions")
        wait_for(lambda: len(worker.intake.pubnub.reading()) == 3, 15, what="PubNub reading")
        before = scrape(port)

        sandbox.generator.publish(10 * len(KIND_FAMILY), kinds=[k for k in KIND_FAMILY if k != "subscription-reminder"])
        for reason in MALFORMED:
            sandbox.generator.publish(2, kinds=["message-store"], malformed=reason)
        sandbox.faults.rc_error(endpoint="renew", status=429, count=1, retry_after=2)
        sandbox.faults.pubnub_error(status=500, count=1)
        wait_for(lambda: total(scrape(port), "ingest_subscription_renewals_total", outcome="ok") >= 3, TTL * 3,
                 what="successful renewals")
        wait_for(lambda: total(scrape(port), "ingest_notifications_published_total") >= 80, 30, what="published")
        after = scrape(port)

        def moved(name: str, **labels: str) -> bool:
            return total(after, name, **labels) > total(before, name, **labels)

        assert moved("ingest_notifications_received_total")
        assert moved("ingest_notifications_published_total", family="presence")
        assert moved("ingest_notifications_dead_lettered_total", reason="bad-padding")
        assert moved("ingest_decrypt_failures_total", reason="bad-base64")
        assert moved("ingest_validation_failures_total")
        assert moved("ingest_lag_seconds_count", family="message-store")
        assert moved("ingest_internal_latency_seconds_count")
        assert moved("ingest_subscription_renewals_total")
        assert moved("ingest_subscription_renewal_margin_seconds_count")
        assert moved("ingest_ringcentral_api_calls_total", endpoint="subscription.renew", status="200")
        assert moved("ingest_ringcentral_rate_limit_penalties_total")
        assert moved("ingest_checkpoints_total")
        assert moved("ingest_pubnub_status_total")
        assert total(after, "ingest_subscription_creations_total") >= 3
        assert total(after, "ingest_token_refreshes_total") >= 1
        assert total(after, "ingest_subscriptions", state="active") == 3
        specs = [s.spec_id for s in manager.snapshot()]
        for spec in specs:
            assert 0 < total(after, "ingest_subscription_expiry_seconds", spec=spec) <= TTL
            assert total(after, "ingest_last_notification_timestamp_seconds", spec=spec) > 0
        assert 0 < total(after, "ingest_subscription_expiry_min_seconds") <= TTL
        assert total(after, "ingest_owned_specs") == 3
        assert total(after, "ingest_kafka_up") == 1
        for declared in ("ingest_kafka_producer_queue_messages", "ingest_kafka_delivery_errors_total",
                         "ingest_build_info", "ingest_pubnub_connections", "ingest_replay_gap_suspected_total"):
            assert present(after, declared), declared
        assert readyz(port)[0] == 200


@pytest.mark.slow
def test_readyz_flips_when_a_subscription_lapses_and_when_kafka_goes(unique_name: str, tmp_path: Path) -> None:
    with LocalKafka() as broker, observed_worker(tmp_path, broker.bootstrap_servers, unique_name, ttl=TTL,
                                                 worker=WORKER) as (worker, sandbox):
        port = worker.health.port
        wait_for(lambda: readyz(port)[0] == 200, 30, what="ready")

        # Renewals fail (503) for longer than the subscriptions live: they lapse, readiness says so.
        sandbox.faults.rc_error(endpoint="*", status=503, seconds=TTL + 2)
        wait_for(lambda: readyz(port)[0] == 503 and "expired" in readyz(port)[1]["reason"], TTL * 2,
                 what="503 for a lapsed subscription")
        wait_for(lambda: readyz(port)[0] == 200, TTL * 4, what="ready again after re-creation")

        broker.stop()
        wait_for(lambda: readyz(port)[0] == 503 and "kafka" in readyz(port)[1]["reason"], 30,
                 what="503 while Kafka is away")
        broker.start()
        wait_for(lambda: readyz(port)[0] == 200, 60, what="ready again with Kafka back")
