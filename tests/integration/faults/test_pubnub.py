"""PubNub faults against the real SDK: 500s, dropped connections, stalled polls, a failing `/time/0`
reconnect probe, and 403. The worker must keep reading from its cursor: nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.worker.runtime import Worker
from tests.integration.faults.scenario import record_faults, scenario
from tests.support import all_serving, wait_for

pytestmark = pytest.mark.slow


def _status(worker: Worker, category: str) -> float:
    return float(worker.metrics.pubnub_status.labels(category)._value.get())


def test_pubnub_500s_lose_nothing(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with scenario(tmp_path, kafka_bootstrap, unique_name) as s:
        s.traffic()
        s.wait_traffic(40)
        s.sandbox.faults.pubnub_error(500, seconds=3)
        s.wait_traffic(60)  # traffic continues while every poll fails
        recovery = s.probe()
        assert s.sandbox.book.fired.get("pubnub-error", 0) >= 1
        assert _status(s.worker, "Unknown") >= 1  # the SDK saw the 500s (PNUnknownCategory)
        s.wait_traffic(40)
        s.verify("pubnub 500 for 3 s")
        print(f"recovery {recovery:.1f}s after the storm")


def test_pubnub_dropped_connections_lose_nothing(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with scenario(tmp_path, kafka_bootstrap, unique_name) as s:
        s.traffic()
        s.wait_traffic(40)
        s.sandbox.faults.pubnub_drop_connections(count=3)
        recovery = s.probe()
        wait_for(lambda: s.sandbox.book.fired.get("pubnub-drop", 0) >= 3, 30, what="three dropped polls")
        assert _status(s.worker, "UnexpectedDisconnect") >= 1
        s.wait_traffic(60)
        s.verify("pubnub dropped connections x3")
        print(f"probe latency {recovery:.1f}s")


def test_pubnub_stalled_polls_past_the_read_timeout_lose_nothing(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    def short_read_timeout(worker: Worker) -> None:
        # Production keeps the SDK's 310 s; a 3-s read timeout makes a 5-s stall a real client timeout.
        worker.intake.pubnub.settings.subscribe_request_timeout = 3

    with scenario(tmp_path, kafka_bootstrap, unique_name, before_start=short_read_timeout) as s:
        fired = record_faults(s.sandbox)
        s.traffic()
        s.wait_traffic(40)
        s.sandbox.faults.pubnub_stall(5.0, count=2)
        wait_for(lambda: len(fired.get("pubnub-stall", [])) >= 2, 30, what="two stalled polls")
        # The client gave up on the first stalled poll at its read timeout and polled again.
        first, second = fired["pubnub-stall"][:2]
        assert 2.5 < second - first < 5.0, f"second poll {second - first:.1f}s after the first"
        recovery = s.probe()
        s.wait_traffic(60)
        s.verify("pubnub stalled polls (5 s > 3 s read timeout) x2")
        print(f"recovery {recovery:.1f}s after the second stall began")


def test_pubnub_failing_time_probe_lose_nothing(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with scenario(tmp_path, kafka_bootstrap, unique_name) as s:
        s.traffic()
        s.wait_traffic(40)
        # A subscribe error sends the SDK to its reconnect loop, whose /time/0 probe keeps failing.
        s.sandbox.faults.pubnub_time_fail(seconds=8)
        s.sandbox.faults.pubnub_error(500, seconds=2)
        wait_for(lambda: s.sandbox.book.fired.get("pubnub-time-fail", 0) >= 2, 30, what="failed /time/0 probes")
        recovery = s.probe()
        assert all_serving(s.worker, s.specs)
        s.wait_traffic(40)
        s.verify("pubnub /time/0 failing for 8 s")
        print(f"recovery {recovery:.1f}s; /time/0 failures {s.sandbox.book.fired.get('pubnub-time-fail')}")


def test_pubnub_403_replaces_the_connection_and_loses_nothing(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with scenario(tmp_path, kafka_bootstrap, unique_name) as s:
        s.traffic()
        s.wait_traffic(40)
        ids = {v.id for v in s.sandbox.rc.live_subscriptions()}
        s.sandbox.faults.pubnub_error(403, count=1)
        wait_for(lambda: _status(s.worker, "AccessDenied") >= 1, 30, what="the 403")
        recovery = s.probe()
        s.wait_traffic(60)
        s.verify("pubnub 403")
        # The subscription was verified (GET), found alive and kept: no re-creation.
        assert {v.id for v in s.sandbox.rc.live_subscriptions()} == ids
        print(f"recovery {recovery:.1f}s after the 403")
