"""Kafka faults on a broker of the test's own (the shared development broker is never stopped):
the broker stopped and restarted mid-stream, and stopped long enough for every in-flight record to
hit its delivery timeout. The sink keeps or re-produces every record: nothing lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.sandbox.kafka import LocalKafka
from tests.faults.scenario import Scenario, scenario
from tests.harness import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_broker() -> Iterator[LocalKafka]:
    with LocalKafka() as broker:
        yield broker


def _kafka_up(s: Scenario) -> float:
    return float(s.worker.metrics.kafka_up._value.get())


def _outage(s: Scenario, broker: LocalKafka, seconds_of_traffic: int) -> tuple[float, float]:
    """Stop the broker under steady traffic, keep publishing, restart it; returns (outage s, recovery s)."""
    s.traffic()
    s.wait_traffic(40)
    stopped = time.monotonic()
    broker.stop()
    # The worker notices (readiness) while PubNub keeps delivering into the producer's queue.
    wait_for(lambda: _kafka_up(s) == 0, 20, what="the worker to see Kafka down")
    s.wait_traffic(int(seconds_of_traffic * 20))
    broker.start()
    outage = time.monotonic() - stopped
    recovery = s.probe(timeout=90)
    wait_for(lambda: _kafka_up(s) == 1, 20, what="the worker to see Kafka back")
    return outage, recovery


def test_kafka_broker_stopped_and_restarted_mid_stream(
        own_broker: LocalKafka, unique_name: str, tmp_path: Path) -> None:
    with scenario(tmp_path, own_broker.bootstrap_servers, unique_name) as s:
        outage, recovery = _outage(s, own_broker, seconds_of_traffic=4)
        s.wait_traffic(40)
        s.verify("kafka broker stop/restart")
        print(f"outage {outage:.1f}s, probe delivered {recovery:.1f}s after the restart")


def test_kafka_delivery_timeouts_are_reproduced(own_broker: LocalKafka, unique_name: str, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    # Records time out after 3 s in the producer; the outage is longer, so every record queued in it
    # fails its delivery at least once and must be produced again by the sink.
    caplog.set_level(logging.WARNING, logger="ingest.sink")
    with scenario(tmp_path, own_broker.bootstrap_servers, unique_name,
                  kafka={"message.timeout.ms": "3000"}) as s:
        outage, recovery = _outage(s, own_broker, seconds_of_traffic=6)
        timed_out = s.worker.metrics.delivery_errors.labels("_MSG_TIMED_OUT")._value.get()
        assert timed_out > 0, "no delivery timed out: the fault was not exercised"
        # Each failure is counted, but the log speaks at most once per 10 s (no per-record flood).
        logged = [r for r in caplog.records if r.getMessage() == "kafka.delivery_failed"]
        assert 1 <= len(logged) <= outage / 10 + 2, (len(logged), timed_out)
        s.wait_traffic(40)
        s.verify("kafka delivery timeouts (3 s) during an outage")
        print(f"outage {outage:.1f}s, {timed_out:.0f} delivery timeouts re-produced, "
              f"probe delivered {recovery:.1f}s after the restart")
