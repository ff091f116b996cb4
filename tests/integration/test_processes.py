"""`ingest run --processes 2`: two worker processes in one "pod" share the specs of the group.

Real broker, sandbox (real pubnub SDK in the children), `ingest run --processes 2` as a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.sandbox.server import Sandbox, demo_accounts
from tests.integration.test_alert_rules import find_promtool
from tests.support import WorkerProcess, samples, wait_for
from tests.support.harness import TopicReader, drain_and_compare, write_config

# Ten accounts over four spec partitions: every partition holds specs (an account's specs share
# one), so each of the two processes owns some whichever partitions the group gives it.
ACCOUNTS = 10
SPECS_PER_ACCOUNT = 1
SPECS = ACCOUNTS * SPECS_PER_ACCOUNT
PARTITIONS = 4
CHILDREN = ("pod-0", "pod-1")


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    return {"accounts": demo_accounts(ACCOUNTS), "pubnub_hold_seconds": 1.0, "rate_limits": False,
            "buffer_size": 5000}


def _group_config(tmp_path: Path, sandbox: Sandbox, bootstrap: str, prefix: str) -> dict[str, Any]:
    """A group config whose specs are in the spec topic already (`ingest apply`), none in the file."""
    subs = {f"s{i}": ["/restapi/v1.0/account/~/extension/~/message-store"] for i in range(SPECS_PER_ACCOUNT)}
    path = write_config(tmp_path, sandbox, bootstrap, prefix, subscriptions=subs, worker={
        "coordination": "group", "apply_specs_on_start": False, "session_timeout_seconds": 6})
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config["topics"]["spec_partitions"] = PARTITIONS
    path.write_text(yaml.safe_dump(config))
    apply = subprocess.run([sys.executable, "-m", "ingest", "apply", "--config", str(path)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert apply.returncode == 0, apply.stderr
    for account in config["accounts"]:
        account["subscriptions"] = []
    return config


@contextlib.contextmanager
def _pod(tmp_path: Path, config: dict[str, Any]) -> Iterator[WorkerProcess]:
    """`ingest run --processes 2` as worker id "pod", not started yet; its whole session is killed at the end."""
    pod = WorkerProcess.in_group("pod", config, tmp_path, args=["--processes", "2"])
    try:
        yield pod
    finally:
        pod.stop()
        if pod.proc is not None:
            with contextlib.suppress(ProcessLookupError):  # children left behind by a failed test
                os.killpg(pod.proc.pid, signal.SIGKILL)


def _owned_by_child(pod: WorkerProcess) -> dict[str, float]:
    """ingest_owned_specs of each child, from the pod's one /metrics."""
    try:
        text = pod.get("/metrics")
    except OSError:
        return {}
    return {dict(labels)["worker"]: value for (name, labels), value in samples(text).items()
            if name == "ingest_owned_specs"}


def _sharing(pod: WorkerProcess) -> bool:
    """Both children own specs, every spec once, and the pod is ready."""
    owned = _owned_by_child(pod)
    return sorted(owned) == list(CHILDREN) and all(owned.values()) and sum(owned.values()) == SPECS and pod.ready()


def _probe(pod: WorkerProcess, path: str) -> str | None:
    """The reason a probe (/healthz, /readyz) of the pod fails, None when it passes."""
    answer = json.loads(pod.get(path))
    return None if answer["status"] == "ok" else str(answer["reason"])


def _child_pids(pod: WorkerProcess) -> dict[str, list[int]]:
    """Each child's pids, in the order the parent started them."""
    pids: dict[str, list[int]] = {}
    for line in pod.lines():
        if line.get("event") == "supervisor.worker_started":
            pids.setdefault(str(line["child"]), []).append(int(str(line["pid"])))
    return pids


def _alive(pid: int) -> bool:
    """Running (an ended orphan may stay a zombie until whoever adopted it reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_processes_share_the_specs_survive_a_killed_one_and_stop_on_sigterm(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    config = _group_config(tmp_path, sandbox, kafka_bootstrap, unique_name)
    reader = TopicReader(kafka_bootstrap, unique_name, isolation="read_uncommitted")
    try:
        with _pod(tmp_path, config) as pod:
            pod.start()
            wait_for(lambda: _sharing(pod), 120, interval=0.5, what="two processes sharing the specs, ready")
            assert json.loads(pod.get("/healthz")) == {"status": "ok"}
            # One exposition for the pod, every family once: promtool's linter accepts it.
            lint = subprocess.run([find_promtool(), "check", "metrics"], input=pod.get("/metrics"),
                                  capture_output=True, text=True, timeout=60, check=False)
            assert lint.returncode == 0, lint.stdout + lint.stderr
            sandbox.generator.start(50)
            wait_for(lambda: sandbox.generator.count() > 50, 30, what="traffic")

            # A child that stops answering (paused) fails the pod's liveness; resumed, it passes again.
            paused = _child_pids(pod)["pod-0"][0]
            os.kill(paused, signal.SIGSTOP)
            try:
                failing = wait_for(lambda: _probe(pod, "/healthz"), 30, interval=0.2, what="liveness failing")
                assert failing == "pod-0: its health port does not answer"
            finally:
                os.kill(paused, signal.SIGCONT)
            wait_for(lambda: _probe(pod, "/healthz") is None, 30, interval=0.2, what="liveness passing again")

            # A child killed outright: the pod is not ready meanwhile, and the parent starts it again
            # under the same worker id.
            victim = _child_pids(pod)["pod-1"][0]
            os.kill(victim, signal.SIGKILL)
            reason = wait_for(lambda: _probe(pod, "/readyz"), 30, interval=0.1, what="the pod not ready")
            assert reason.startswith("pod-1: "), reason
            assert _probe(pod, "/healthz") is None  # being started again: alive
            wait_for(lambda: len(_child_pids(pod).get("pod-1", [])) == 2, 30, what="the killed child started again")
            assert pod.metric("ingest_worker_process_restarts_total") == 1
            wait_for(lambda: _sharing(pod), 120, interval=0.5, what="both processes sharing the specs again")
            wait_for(lambda: sandbox.generator.count() > 200, 30, what="traffic after the restart")

            generated, result = drain_and_compare(sandbox, reader, 90)
            assert not result.missing, f"{len(result.missing)} of {len(generated)} notifications missing"

            # SIGTERM to the parent stops both children gracefully.
            pids = [pid for child in _child_pids(pod).values() for pid in child]
            assert pod.stop(signal.SIGTERM, timeout=60) == 0
            assert not [pid for pid in pids if _alive(pid)]
        lines = pod.lines()
        children = {str(line["worker"]) for line in lines if line.get("logger") != "ingest.worker.supervisor"
                    and "worker" in line}
        assert children == set(CHILDREN)  # every child's lines say which child they come from
        stopped = [line for line in lines if line.get("event") == "worker.stopped"]
        assert sorted(str(line["worker"]) for line in stopped) == sorted(CHILDREN)
        assert all(line["undelivered"] == 0 for line in stopped)
        print(f"--processes 2: {len(generated)} notifications, {len(result.duplicates)} seen twice "
              f"(the killed child's uncheckpointed ones, at-least-once)")
    finally:
        reader.close()
        sandbox.generator.stop()


def test_processes_stop_when_their_parent_is_killed(sandbox: Sandbox, kafka_bootstrap: str, unique_name: str,
                                                   tmp_path: Path) -> None:
    config = _group_config(tmp_path, sandbox, kafka_bootstrap, unique_name)
    with _pod(tmp_path, config) as pod:
        pod.start()
        wait_for(lambda: len([line for line in pod.lines() if line.get("event") == "worker.started"]) == 2, 60,
                 what="both processes started")
        pids = [pid for child in _child_pids(pod).values() for pid in child]
        assert pod.proc is not None
        os.kill(pod.proc.pid, signal.SIGKILL)  # the parent only: nothing passes a signal on
        pod.wait(10)
        wait_for(lambda: not [pid for pid in pids if _alive(pid)], 60, what="the orphaned processes stopping")
        lines = pod.lines()
        assert sorted(str(line["worker"]) for line in lines if line.get("event") == "worker.parent_gone") == \
            list(CHILDREN)
        assert sorted(str(line["worker"]) for line in lines if line.get("event") == "worker.stopped") == \
            list(CHILDREN)


def test_a_process_with_a_bad_configuration_stops_the_pod_with_exit_2(
        sandbox: Sandbox, kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    config = _group_config(tmp_path, sandbox, kafka_bootstrap, unique_name)
    with _pod(tmp_path, config) as pod, socket.socket() as taken:
        assert pod.port is not None
        taken.bind(("127.0.0.1", pod.port + 2))  # process 1's port: it cannot listen, which no restart mends
        taken.listen()
        assert pod.start().wait(120) == 2
        lines = pod.lines()
        assert [line["child"] for line in lines if line.get("event") == "supervisor.worker_invalid_config"] == \
            ["pod-1"]
        assert f"metrics.port: cannot listen on 127.0.0.1:{pod.port + 2}" in pod.log_path.read_text()
        assert not [line for line in lines if line.get("event") == "supervisor.worker_started"
                    and line["child"] == "pod-1"][1:], "a configuration error is not restarted"


def test_several_processes_need_group_coordination(sandbox: Sandbox, kafka_bootstrap: str, unique_name: str,
                                                   tmp_path: Path) -> None:
    path = write_config(tmp_path, sandbox, kafka_bootstrap, unique_name)  # standalone
    run = subprocess.run([sys.executable, "-m", "ingest", "run", "--config", str(path), "--processes", "2"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"ingest: invalid configuration {path}: worker.coordination: "
                                       "--processes 2 needs group (the processes share the specs through the "
                                       "group), got standalone"]
