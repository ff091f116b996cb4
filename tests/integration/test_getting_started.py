"""docs/getting-started.md, followed as a person would: each command below is in the document verbatim
and runs here as a shell command. The Kafka of the document (`ingest dev kafka --port 9092` and
`export KAFKA_BOOTSTRAP_SERVERS=...`) is the shared test broker; `make demo` is tests/integration/test_demo.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from confluent_kafka.admin import AdminClient

from tests.integration.test_helm import REPO, _find_helm
from tests.support import wait_for

DOC = REPO / "docs" / "getting-started.md"
SANDBOX = "ingest sandbox --write-config sandbox-worker --rate 20"
RUN = "ingest run --config sandbox-worker/worker.yaml"
TAIL = "ingest tail sandbox.message-store --max 3"
STATUS = "ingest status --config sandbox-worker/worker.yaml"
HELM = "helm template ingest ./helm/ingest -n ingest -f docs/examples/values.yaml"
PREFIX = "sandbox"  # the topic prefix `ingest sandbox --write-config` writes (the document's topics)


def documented(command: str) -> str:
    """`command`, after checking that the document shows it as a line of a shell block."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.DOTALL)
    lines = {line.split("  #", 1)[0].strip() for block in blocks for line in block.splitlines()}
    assert command in lines, f"docs/getting-started.md no longer shows: {command}"
    return command


@contextlib.contextmanager
def background(command: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A documented long-running command, stopped with Ctrl-C (SIGINT) at the end, whatever happens."""
    with log.open("wb") as out:
        # `exec`: Ctrl-C reaches the command itself, as in a terminal, not a shell around it.
        proc = subprocess.Popen(f"exec {documented(command)}", shell=True,  # noqa: S602 - typed into a shell
                                cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(documented(command), shell=True,  # noqa: S602 - as typed into a shell
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def _forget_earlier_runs(bootstrap: str) -> None:
    """The document's topic names are fixed: remove what an earlier run left on the shared broker."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    old = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{PREFIX}.")]
    for future in admin.delete_topics(old, operation_timeout=30).values() if old else []:
        future.result()
    wait_for(lambda: not any(t.startswith(f"{PREFIX}.") for t in admin.list_topics(timeout=10).topics), 60,
             what="the earlier run's topics deleted")


def test_the_documented_path_from_sandbox_to_status(kafka_bootstrap: str, tmp_path: Path) -> None:
    _forget_earlier_runs(kafka_bootstrap)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), str(Path(_find_helm()).parent),
                                    os.environ["PATH"]])}
    sandbox_log, worker_log = tmp_path / "sandbox.log", tmp_path / "worker.log"
    with background(SANDBOX, tmp_path, env, sandbox_log) as sandbox:
        wait_for(lambda: "ready" in sandbox_log.read_text() or sandbox.poll() is not None, 60, what="sandbox ready")
        banner = sandbox_log.read_text()
        print(banner)
        assert f"start a worker     : {RUN}" in banner
        assert "traffic            : ~20 notifications/s to live subscriptions" in banner

        with background(RUN, tmp_path, env, worker_log) as worker:
            wait_for(lambda: "worker.started" in worker_log.read_text() or worker.poll() is not None, 120,
                     what="worker.started in the worker's log")
            assert worker.poll() is None, worker_log.read_text()

            tail = run(TAIL, tmp_path, env)
            print(tail.stdout, tail.stderr)
            assert tail.returncode == 0, tail.stderr
            assert len(tail.stdout.splitlines()) == 3
            assert all('"topic": "sandbox.message-store"' in line for line in tail.stdout.splitlines())

            status = ""

            def nine_subscriptions() -> bool:
                nonlocal status
                status = run(STATUS, tmp_path, env).stdout
                return status.startswith("standalone workers") and status.splitlines()[0].endswith(
                    "1 worker, 9 specs") and _subscribed(status) == 9

            wait_for(nine_subscriptions, 90, interval=2, what=f"status with 9 subscriptions:\n{status}")
            print(status)
        assert worker.returncode == 0, worker_log.read_text()[-2000:]
        print(worker_log.read_text()[:1500])
    assert sandbox.returncode == 0

    helm = run(HELM, REPO, env)
    assert helm.returncode == 0, helm.stderr
    assert "kind: Deployment" in helm.stdout


def _subscribed(status: str) -> int:
    """Spec rows of `ingest status` that name a subscription id."""
    rows = [line.split() for line in status.splitlines() if line.startswith("  ") and "/" in line.split()[0]]
    return sum(1 for row in rows if len(row) >= 3 and row[2] != "-")
