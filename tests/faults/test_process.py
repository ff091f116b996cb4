"""The worker process killed with SIGKILL mid-stream (no flush, no last checkpoint) and started again:
the new process restores the checkpoints, renews the same subscriptions and replays from PubNub's
buffer. At-least-once: nothing lost; what the dead process had produced after its last checkpoint
comes again (duplicates, counted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ingest.sandbox.server import Sandbox
from tests.faults.scenario import FaultTolerantReader, Traffic, sandbox_settings, worker_config_file
from tests.harness import wait_for

pytestmark = pytest.mark.slow


class WorkerProcess:
    """`python -m ingest run --config FILE` with its JSON log lines in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def metrics_port(self) -> int | None:
        ports = [e["metrics_port"] for e in self.lines() if e.get("event") == "worker.started"]
        return int(str(ports[-1])) if ports else None

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"the worker exited with {self.proc.returncode}"
        port = self.metrics_port()
        if port is None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)


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
