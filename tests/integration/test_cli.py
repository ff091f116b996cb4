"""The command line: `ingest --version/--help`, `ingest dev kafka` (a real broker until Ctrl-C), and the
broker launcher's messages when its tools are missing."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from ingest import __version__
from ingest.cli import build_parser
from tests.support import free_port

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
    try:
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
        assert proc.wait(120) == 0
        assert "stopping the broker" in proc.stdout.read()
    finally:  # a failed assertion must not leave the broker running (it outlived a failed run by 15 min)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # `ingest dev kafka` stops its broker on Ctrl-C
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


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
    # A typo next to existing topics: they are named.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(f"{unique_name}.message-store", 1, 1)])[f"{unique_name}.message-store"].result(30)
    proc = _ingest("tail", "-b", kafka_bootstrap, f"{unique_name}.message-stor")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ingest tail: no topic {unique_name}.message-stor on {kafka_bootstrap} "
        f"(topics named {unique_name}.*: {unique_name}.message-store)"]


def test_tail_of_an_unreachable_broker_is_one_line_and_exit_1() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    proc = _ingest("tail", "-b", bootstrap, "ringcentral.message-store")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ingest tail: cannot reach Kafka at {bootstrap} (no answer within 10s)"]


def _subparsers(parser: argparse.ArgumentParser, path: str = "ingest") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{path} {name}")


def test_every_command_has_a_description_and_every_option_its_default() -> None:
    undescribed, undefaulted = [], []
    for path, parser in _subparsers(build_parser()):
        if not parser.description:
            undescribed.append(path)
        for action in parser._actions:
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            if takes_value and action.default not in (None, argparse.SUPPRESS) \
                    and "default" not in (action.help or ""):
                undefaulted.append(f"{path} {action.option_strings[-1]}")
    assert (undescribed, undefaulted) == ([], [])
    dev_help = _ingest("dev", "--help").stdout
    assert "developer tools" in dev_help.split("positional arguments")[0].split("\n", 2)[2]


def _worker_config(tmp_path: Path) -> Path:
    """A worker config for account `acme` only; its secrets come from variables that are not set (apply
    only needs the account names)."""
    path = tmp_path / "worker.yaml"
    path.write_text(
        "kafka: {bootstrap.servers: 127.0.0.1:1}\n"
        "ringcentral: {client_id: app, client_secret_env: APPLY_TEST_UNSET}\n"
        "accounts:\n  - {name: acme, jwt_env: APPLY_TEST_UNSET}\n")
    return path


def test_apply_refuses_an_account_no_worker_can_log_in_to(tmp_path: Path) -> None:
    specs = tmp_path / "specs.yaml"
    specs.write_text("accounts:\n  - name: globex\n    subscriptions:\n"
                     "      - {name: messages, event_filters: [/restapi/v1.0/account/~/extension/~/message-store]}\n")
    proc = _ingest("apply", "--config", str(_worker_config(tmp_path)), "-f", str(specs))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"ingest apply: no credentials for account(s) globex in {tmp_path / 'worker.yaml'} (its accounts: acme); "
        "add them there (name and jwt_file or jwt_env) first, so that workers can log in"]


def test_apply_help_shows_the_spec_file_format_and_a_plain_list_points_there(tmp_path: Path) -> None:
    help_text = _ingest("apply", "--help").stdout
    assert "spec file (-f): the `accounts` section of a worker config, without credentials:" in help_text
    assert "      subscriptions:\n        - name: messages          # spec id: acme/messages" in help_text
    specs = tmp_path / "specs.yaml"
    specs.write_text("- name: acme\n  subscriptions: []\n")
    proc = _ingest("apply", "--config", str(_worker_config(tmp_path)), "-f", str(specs))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"ingest apply: {specs}: the top level must be a mapping of sections, got a list "
        "(spec file format: ingest apply --help)"]


def test_tail_says_so_when_the_broker_goes_away(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    from ingest.sandbox.kafka import LocalKafka

    with LocalKafka(data_dir=tmp_path / "kafka") as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        admin.create_topics([NewTopic("tail-me", 1, 1)])["tail-me"].result(30)
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
        producer.produce("tail-me", b"one", b"key")
        assert producer.flush(30) == 0
        proc = subprocess.Popen([*INGEST, "tail", "-b", broker.bootstrap_servers, "tail-me"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and '"value": "one"' in proc.stdout.readline()
            broker.stop()
            assert proc.wait(120) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.stderr is not None
    lines = proc.stderr.read().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ingest tail: lost Kafka at {broker.bootstrap_servers}: "), lines


def test_ctrl_c_stops_a_command_started_with_sigint_ignored() -> None:
    """A script that starts a command in the background hands SIGINT on as ignored (POSIX); `ingest
    sandbox` and `ingest dev kafka` then ignored Ctrl-C and had to be killed."""
    command = " ".join([*INGEST, "sandbox", "--accounts", "1", "--hold", "0.2"])
    proc = subprocess.Popen(["sh", "-c", f"trap '' INT; exec {command}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.strip() == "ready":
                break
        else:
            raise AssertionError("ingest sandbox ended before it was ready")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0  # generous: a loaded 2-core machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
