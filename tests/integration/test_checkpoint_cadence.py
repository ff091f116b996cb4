"""How often a spec's state record is written (at-least-once): with sparse traffic at most every
SPARSE_RECORD_INTERVALS checkpoint intervals, yet every moved checkpoint is written in the end; a busy
spec (or one draining a former channel) still at the next pass (sandbox + real broker, in process)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ingest.data.sink import SpecProgress
from ingest.worker.checkpointing import SPARSE_RECORD_INTERVALS, SPARSE_RECORD_NOTIFICATIONS, StateTopicCheckpoints
from tests.support import scrape, total, wait_for
from tests.support.harness import observed_worker

INTERVAL = 0.2  # checkpoint interval: a sparse spec's record then comes at most every second
PACE = 0.25  # one notification every PACE seconds: each pass sees the spec's checkpoint move
NOTIFICATIONS = 16


@pytest.mark.slow
def test_a_sparse_spec_gets_a_record_every_few_intervals_and_its_last_checkpoint_in_the_end(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with observed_worker(tmp_path, kafka_bootstrap, unique_name,
                         worker={"checkpoint_interval_seconds": INTERVAL}) as (worker, sandbox):
        manager = worker.manager
        assert manager is not None
        wait_for(lambda: worker.subscriptions_serving() == 3, 60, what="3 subscriptions served")
        spec_id = next(s.spec_id for s in manager.snapshot() if s.spec_id.endswith("/presence"))
        progress = worker.channels.progress[spec_id]
        wait_for(lambda: progress.checkpointed_tt == progress.acked_tt, 10, what="settled checkpoints")
        before = total(scrape(worker.health.port), "ingest_checkpoints_total")

        last = 0
        for _ in range(NOTIFICATIONS):
            started = time.monotonic()
            (published,) = sandbox.generator.publish(1, kinds=["presence"])
            last = published.timetoken
            wait_for(lambda tt=last: progress.acked_tt >= tt, 30, what="the notification in Kafka")
            time.sleep(max(0.0, started + PACE - time.monotonic()))  # the traffic's pace, not a wait for an event
        wait_for(lambda: progress.checkpointed_tt == last, 10 * SPARSE_RECORD_INTERVALS * INTERVAL,
                 what="the last checkpoint written")
        records = total(scrape(worker.health.port), "ingest_checkpoints_total") - before
        # 16 notifications over >= 4 s: one record per pass before (16), now about one a second (4-5);
        # the two other specs have no traffic (their 30-s refresh may fall in the window).
        assert 2 <= records <= NOTIFICATIONS // 2, records


def test_a_busy_spec_is_written_at_the_next_pass(kafka_bootstrap: str, unique_name: str,
                                                               tmp_path: Path) -> None:
    with observed_worker(tmp_path, kafka_bootstrap, unique_name,
                         worker={"checkpoint_interval_seconds": INTERVAL}) as (worker, _sandbox):
        checkpoints = worker.checkpoints
        assert isinstance(checkpoints, StateTopicCheckpoints)
        spec_id = "not-owned/cadence"  # none of the worker's specs: only the rule is asked
        moved = SpecProgress(spec_id, acked_tt=2, checkpointed_tt=1)
        now = time.monotonic()
        checkpoints.channels.last_state[spec_id] = now  # its record was just written
        assert not checkpoints.record_due(spec_id, moved, now)
        assert checkpoints.record_due(spec_id, moved, now + SPARSE_RECORD_INTERVALS * INTERVAL)
        moved.unrecorded = SPARSE_RECORD_NOTIFICATIONS
        assert checkpoints.record_due(spec_id, moved, now)
        assert not checkpoints.record_due(spec_id, SpecProgress(spec_id, acked_tt=1, checkpointed_tt=1), now + 5)
