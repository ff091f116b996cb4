"""A worker started while Kafka is unreachable waits for it (healthy, not ready) instead of crashing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from ingest.sandbox.kafka import LocalKafka
from ingest.sandbox.server import Sandbox, SandboxSettings
from tests.support import free_port, wait_for
from tests.support.harness import write_config


def _get(port: int, path: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, {}


def test_worker_waits_for_kafka_then_starts(unique_name: str, tmp_path: Path) -> None:
    broker = LocalKafka()  # ports chosen, not started yet
    port = free_port()
    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.5, rate_limits=False)) as sandbox:
        path = write_config(tmp_path, sandbox, broker.bootstrap_servers, unique_name, accounts=1,
                            subscriptions={"m": ["/restapi/v1.0/account/~/extension/~/message-store"]})
        config = yaml.safe_load(path.read_text())
        config["metrics"]["port"] = port
        path.write_text(yaml.safe_dump(config))
        log = (tmp_path / "worker.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _get(port, "/healthz")[0] == 200, 30, what="the health endpoint")
            status, body = _get(port, "/readyz")
            assert status == 503 and "kafka" in body["reason"]
            wait_for(lambda: b"kafka.unreachable" in (tmp_path / "worker.log").read_bytes(), 30,
                     what="the worker saying Kafka is unreachable")
            assert proc.poll() is None  # still waiting, not crashed
            broker.start()
            wait_for(lambda: _get(port, "/readyz")[0] == 200, 90, what="ready once Kafka is there")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
            broker.close()
        assert b"Traceback" not in (tmp_path / "worker.log").read_bytes()


def test_worker_stopped_while_waiting_for_kafka_exits_cleanly(unique_name: str, tmp_path: Path) -> None:
    port = free_port()
    with Sandbox(SandboxSettings(rate_limits=False)) as sandbox:
        path = write_config(tmp_path, sandbox, f"127.0.0.1:{free_port()}", unique_name, accounts=1,
                            subscriptions={"m": ["/restapi/v1.0/account/~/extension/~/message-store"]})
        config = yaml.safe_load(path.read_text())
        config["metrics"]["port"] = port
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: _get(port, "/healthz")[0] == 200, 30, what="the health endpoint")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert b"Traceback" not in out
