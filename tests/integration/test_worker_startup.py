"""A worker started while Kafka is unreachable waits for it (healthy, not ready) instead of crashing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ingest.config import load_config
from ingest.sandbox.kafka import LocalKafka
from ingest.sandbox.server import Sandbox, SandboxSettings
from ingest.worker.runtime import Worker
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


def test_not_ready_before_the_owned_specs_are_known(sandbox: Sandbox, kafka_bootstrap: str, unique_name: str,
                                                    tmp_path: Path) -> None:
    """Between "Kafka answers" and "the specs are handed to the subscription manager" (a standalone
    worker restores its state topic first) the worker owns nothing yet: ready then, a rolling update
    would stop the previous pod before this one reads a single subscription."""
    config = load_config(write_config(tmp_path, sandbox, kafka_bootstrap, unique_name, accounts=1,
                                      subscriptions={"presence": ["/restapi/v1.0/account/~/extension/~/presence"]},
                                      worker={"id": unique_name}))
    worker = Worker(config)
    hold = threading.Event()
    own = worker.ownership.start

    def held_start(*args: Any) -> None:
        hold.wait(60)  # the restore "takes" until the test has looked
        own(*args)

    worker.ownership.start = held_start  # type: ignore[method-assign]
    starting = threading.Thread(target=worker.start, daemon=True)
    starting.start()
    try:
        wait_for(lambda: worker.manager is not None and worker.kafka.ok, 60, what="Kafka answering, no specs yet")
        status, body = _get(worker.health.port, "/readyz")
        assert (status, body.get("reason")) == (503, "starting")
        hold.set()
        starting.join(60)
        wait_for(lambda: worker.subscriptions_serving() == 1, 60, what="the subscription serving")
        wait_for(lambda: _get(worker.health.port, "/readyz")[0] == 200, 30, what="/readyz 200")
    finally:
        hold.set()
        starting.join(60)
        worker.stop(delete_subscriptions=True)
