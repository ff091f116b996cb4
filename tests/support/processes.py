"""`ingest run` as a child process: what the fault, scale-out and soak tests start, pause, kill and scrape."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.metrics import total
from tests.support.waiting import free_port, free_ports, wait_for


class WorkerProcess:
    """`python -m ingest run --config FILE` in a session of its own, its output (JSON log lines) in a file."""

    def __init__(self, config_path: Path, log_path: Path, *, name: str = "worker", port: int | None = None,
                 args: Sequence[str] = ()) -> None:
        """Not started yet (`start()`). `port`: the metrics port of the config, if fixed (else read from the log).
        `args`: more flags of `ingest run` (`--processes 2`)."""
        self.config_path = config_path
        self.log_path = log_path
        self.name = name
        self.port = port
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def in_group(cls, name: str, base_config: dict[str, Any], directory: Path,
                 args: Sequence[str] = ()) -> WorkerProcess:
        """Write `<directory>/<name>.yaml`: the base config with this worker's id and a free metrics port."""
        config = json.loads(json.dumps(base_config))
        config["worker"]["id"] = name
        processes = int(args[list(args).index("--processes") + 1]) if "--processes" in args else 1
        config["metrics"]["port"] = port = free_ports(1 + processes) if processes > 1 else free_port()
        config_path = directory / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        return cls(config_path, directory / f"{name}.log", name=name, port=port, args=args)

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", str(self.config_path),
                                          *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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

    def kill(self) -> None:
        """SIGKILL to its whole session, and reap it."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal it (SIGTERM: graceful) and wait; SIGKILL if it does not end in time. Its exit code
        (None if it was never started)."""
        if self.alive:
            self.send(signal.SIGCONT)  # a paused process cannot handle anything else
            self.send(sig)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return None if self.proc is None else self.proc.returncode

    def lines(self) -> list[dict[str, object]]:
        """Its JSON log lines so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def metrics_port(self) -> int | None:
        if self.port is not None:
            return self.port
        ports = [e["metrics_port"] for e in self.lines() if e.get("event") == "worker.started"]
        return int(str(ports[-1])) if ports else None

    def get(self, path: str) -> str:
        """GET a path of the worker's health port (/metrics, /readyz, /healthz); the body as text
        (raises OSError while it cannot be reached)."""
        port = self.metrics_port()
        assert port is not None, "the worker has not said its metrics port yet"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return str(resp.read().decode())
        except urllib.error.HTTPError as exc:  # 503 from /readyz still has a body
            return str(exc.read().decode())

    def ready(self) -> bool:
        """/readyz answers 200 (False while it cannot be asked or the process has ended)."""
        port = self.metrics_port()
        if port is None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout: float, what: str) -> None:
        """Wait until it is ready, failing at once if the process ends first."""
        def ready_or_ended() -> bool:
            assert self.alive, f"the worker exited with {self.proc.returncode if self.proc else None}"
            return self.ready()

        wait_for(ready_or_ended, timeout, what=what)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples in its /metrics (raises OSError if unreachable)."""
        return total(self.get("/metrics"), name, **labels)

    def owned(self) -> int:
        """Specs the worker owns, -1 while it cannot be asked."""
        try:
            return int(self.metric("ingest_owned_specs"))
        except OSError:
            return -1
