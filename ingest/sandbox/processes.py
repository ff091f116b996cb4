"""`ingest run` as a child process with its own config, metrics port and log file: what the scale-out
tests and the failover benchmark start, pause, kill and scrape."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ingest.sandbox.kafka import free_port


class WorkerProcess:
    def __init__(self, name: str, base_config: dict[str, Any], directory: Path) -> None:
        """Write `<directory>/<name>.yaml`: the base config with this worker's id and a free metrics port."""
        self.name = name
        self.port = free_port()
        config = json.loads(json.dumps(base_config))
        config["worker"]["id"] = name
        config["metrics"]["port"] = self.port
        self.config_path = directory / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal it (SIGTERM: graceful) and wait; SIGKILL if it does not end in time."""
        if self.alive:
            self.send(signal.SIGCONT)  # a paused process cannot handle anything else
            self.send(sig)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.wait(10)

    def _get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=3) as resp:
            return int(resp.status), resp.read().decode()

    def metric(self, name: str) -> float:
        """The sum of a metric's samples in the worker's /metrics (raises OSError if unreachable)."""
        text = self._get("/metrics")[1]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in " {")

    def owned(self) -> int:
        """Specs the worker owns, -1 while it cannot be asked."""
        try:
            return int(self.metric("ingest_owned_specs"))
        except OSError:
            return -1

    def ready(self) -> bool:
        try:
            return self._get("/readyz")[0] == 200
        except OSError:
            return False
