"""The worker process killed with SIGKILL mid-stream (no flush, no last checkpoint) and started again:
the new process restores the checkpoints, renews the same subscriptions and replays from PubNub's
buffer. At-least-once: nothing lost; what the dead process had produced after its last checkpoint
comes again (duplicates, counted)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from ingest.sandbox.server import Sandbox
from tests.faults.scenario import FaultTolerantReader, Traffic, WorkerProcess, sandbox_settings, worker_config_file
from tests.harness import wait_for

pytestmark = pytest.mark.slow


def test_sigkill_mid_stream_and_restart_lose_nothing(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    with Sandbox(sandbox_settings()) as sandbox:
        config = worker_config_file(tmp_path, sandbox, kafka_bootstrap, unique_name)
        first = WorkerProcess(config, tmp_path / "first.log")
        second: WorkerProcess | None = None
        reader: FaultTolerantReader | None = None
        try:
            wait_for(first.ready, 60, what="the first worker ready")
            reader = FaultTolerantReader(kafka_bootstrap, unique_name)
            s = Traffic(sandbox, reader)
            created = sandbox.rc.created_total
            s.traffic()
            s.wait_traffic(100)
            first.kill()
            killed = time.monotonic()
            assert first.proc.returncode == -signal.SIGKILL
            s.wait_traffic(60)  # published while no worker runs: only PubNub's buffer holds it
            second = WorkerProcess(config, tmp_path / "second.log")
            wait_for(second.ready, 60, what="the second worker ready")
            restart = time.monotonic() - killed
            recovery = s.probe()
            s.wait_traffic(60)
            _, duplicates = s.verify("SIGKILL mid-stream + restart")
            assert sandbox.rc.created_total == created, "the restarted worker created new subscriptions"
            assert second.terminate() == 0
            print(f"down {restart:.1f}s (kill -> ready), probe {recovery:.1f}s, duplicates {duplicates} "
                  f"(produced after the last checkpoint of the killed process)")
        finally:
            if reader is not None:
                reader.close()
            for proc in (first, second):
                if proc is not None and proc.proc.poll() is None:
                    proc.kill()
