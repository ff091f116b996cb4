"""The command line: `ingest --version/--help`, `ingest dev kafka` (a real broker until Ctrl-C), and the
broker launcher's messages when its tools are missing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient

from ingest import __version__

INGEST = [sys.executable, "-m", "ingest"]


def test_version_and_help() -> None:
    version = subprocess.run([*INGEST, "--version"], capture_output=True, text=True, check=True, timeout=30)
    assert version.stdout.strip() == f"ingest {__version__}"
    help_text = subprocess.run([*INGEST, "--help"], capture_output=True, text=True, check=True, timeout=30).stdout
    for command in ("run", "demo", "sandbox", "tail", "apply", "status", "dev"):
        assert re.search(rf"^\s+{command}\s", help_text, re.MULTILINE), command


def test_dev_kafka_prints_its_address_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen([*INGEST, "dev", "kafka", "--data-dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    bootstrap = None
    deadline = time.monotonic() + 120
    while bootstrap is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "ingest dev kafka ended before printing its address"
        if line.startswith("KAFKA_BOOTSTRAP_SERVERS="):
            bootstrap = line.strip().split("=", 1)[1]
    assert bootstrap is not None
    assert AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).brokers
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert "stopping the broker" in proc.stdout.read()


def _without(tool: str) -> str:
    """A PATH where `tool` is absent (everything else of the current PATH kept)."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / tool).exists())


def test_missing_java_is_an_actionable_error(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _without("java")}
    proc = subprocess.run([*INGEST, "dev", "kafka", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 1
    assert "'java' was not found" in proc.stdout and "JDK 17" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_missing_maven_on_a_fresh_cache_is_an_actionable_error(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _without("mvn"), "INGEST_CACHE_DIR": str(tmp_path / "empty-cache")}
    proc = subprocess.run([*INGEST, "dev", "kafka", "--data-dir", str(tmp_path / "data")], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 1
    assert "'mvn' was not found" in proc.stdout and "Maven" in proc.stdout


def _ingest(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INGEST, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)


def test_tail_of_a_missing_topic_is_one_line_and_exit_1(kafka_bootstrap: str, unique_name: str) -> None:
    proc = _ingest("tail", "-b", kafka_bootstrap, f"{unique_name}.message-store", "--max", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ingest tail: no topic {unique_name}.message-store on {kafka_bootstrap} "
        "(a worker creates its topics when it starts)"]
    assert proc.stdout == ""


def test_tail_of_an_unreachable_broker_is_one_line_and_exit_1() -> None:
    from ingest.sandbox.kafka import free_port

    bootstrap = f"127.0.0.1:{free_port()}"
    proc = _ingest("tail", "-b", bootstrap, "ringcentral.message-store")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ingest tail: cannot reach Kafka at {bootstrap} (no answer within 10s)"]
