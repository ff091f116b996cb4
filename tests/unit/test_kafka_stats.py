"""Detecting a librdkafka client left with no broker (librdkafka#5301) from its statistics.

The samples are real `stats_cb` JSON of librdkafka 2.16.0 (confluent-kafka 2.16.1), captured from 16
idempotent producers on a broker of their own, stopped and started every ~20 s beside two CPU hogs:
one producer got the stopping broker's 0-broker Metadata answer and never delivered again
(`librdkafka-stats-without-brokers.json`, 60 s after the restart: `"brokers":{ }`); another recovered
(`librdkafka-stats-broker-up.json`). In 3 cycles the 15 others had no sample without a broker, the
outage included (their learned broker stays, DOWN).
"""

from __future__ import annotations

import json
from pathlib import Path

from ingest.observability.kafka_stats import NO_BROKER_GRACE_SECONDS, BrokerWatch, brokerless

DATA = Path(__file__).parent / "data"
STUCK = (DATA / "librdkafka-stats-without-brokers.json").read_text()
UP = (DATA / "librdkafka-stats-broker-up.json").read_text()


def at(sample: str, seconds: float) -> str:
    """The sample as librdkafka would write it `seconds` after the stuck one (its `ts`, in µs)."""
    stats = json.loads(sample)
    stats["ts"] = json.loads(STUCK)["ts"] + int(seconds * 1e6)
    return json.dumps(stats)


def test_a_client_without_brokers_is_told_from_one_that_has_its_broker() -> None:
    stuck = brokerless(STUCK)
    assert stuck is not None and stuck["name"] == "rdkafka#producer-12"
    assert brokerless(UP) is None
    assert brokerless(json.dumps(json.loads(UP))) is None  # parsed, not only the substring test


def test_a_client_that_knows_no_broker_for_the_grace_is_reported_once_per_grace() -> None:
    reasons: list[str] = []
    watch = BrokerWatch("producer", reasons.append)
    for seconds in range(0, int(NO_BROKER_GRACE_SECONDS), 5):
        watch(at(STUCK, seconds))
    assert reasons == []
    watch(at(STUCK, NO_BROKER_GRACE_SECONDS))
    assert reasons == ["kafka producer rdkafka#producer-12 has known no broker for 30s "
                       "(librdkafka#5301: it never reconnects)"]
    watch(at(STUCK, NO_BROKER_GRACE_SECONDS + 5))
    assert len(reasons) == 1
    watch(at(STUCK, 2 * NO_BROKER_GRACE_SECONDS))
    assert len(reasons) == 2


def test_a_broker_seen_again_restarts_the_grace() -> None:
    reasons: list[str] = []
    watch = BrokerWatch("producer", reasons.append)
    watch(at(STUCK, 0))
    watch(at(STUCK, 25))
    watch(UP)  # re-bootstrapped in time: the ordinary recovery
    watch(at(STUCK, 35))
    watch(at(STUCK, 60))
    assert reasons == []
