"""`make verify-image`: build the image and run it as a worker, the way Kubernetes runs it.

Builds the image (`.ci/deploy/build-image.sh`), starts a local broker (`ingest dev kafka`) and the
sandbox (`ingest sandbox --write-config`), runs the image read-only, as its own non-root user, with
no capabilities and only /tmp writable (as the chart does), then checks:

- it is ready: `/readyz` answers 200;
- every notification the sandbox publishes arrives in Kafka (records counted by offsets);
- SIGTERM stops it within the chart's termination grace period, with exit status 0.

Prints the build time and the image size. Not part of `make test`: a cold build takes minutes.
Everything it starts is stopped on the way out, also when a check fails.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests
import yaml
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

ROOT = Path(__file__).resolve().parents[2]
INGEST = ROOT / ".venv" / "bin" / "ingest"
IMAGE = os.environ.get("IMAGE", "localhost/ingest:dev")
CONTAINER = "ingest-verify-image"
PREFIX = "imagecheck"
# Published in batches smaller than the sandbox's replay buffer (100 per subscribe key, as PubNub's):
# a bigger burst overflows it by design (a reported gap), which is not what this checks.
BATCHES = 6
BATCH_SIZE = 50
IMAGE_UID = "10001"
IMAGE_USER = f"{IMAGE_UID}:{IMAGE_UID}"
# The chart's default terminationGracePeriodSeconds (helm/ingest/values.yaml).
GRACE_SECONDS = 30
# Generous: 2 cores shared by many; the first broker start may download its jars.
BROKER_START_SECONDS = 600
STEP_SECONDS = 180


class CheckFailed(Exception):
    """A check of the running image failed; the message says which and why."""


def log(message: str) -> None:
    print(f"verify-image: {message}", flush=True)


def run(argv: list[str], *, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def container_engine() -> list[str]:
    """docker where an engine answers, else podman (as build-image.sh decides)."""
    if shutil.which("docker") and run(["docker", "info"], check=False).returncode == 0:
        return ["docker"]
    return ["podman"]


def run_limits(engine: list[str]) -> list[str]:
    # Inside a container, podman cannot raise the open-files and process limits it copies from the host.
    return ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"] if engine == ["podman"] else []


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class Output:
    """A host process's stdout, read line by line in a thread so that waits can have deadlines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # end of output

    def wait_for(self, wanted: Callable[[str], bool], timeout: float, what: str) -> str:
        """The next line for which `wanted` is true (CheckFailed at the deadline or at the process's exit)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise CheckFailed(f"{what}: the process exited (status {self.proc.wait()})")
            if wanted(line):
                return line
        raise CheckFailed(f"{what}: no such line within {timeout:.0f} s")


@contextlib.contextmanager
def started(argv: list[str]) -> Iterator[Output]:
    """A host process, stopped with SIGTERM (then SIGKILL) on the way out."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        yield Output(proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_image() -> float:
    started_at = time.monotonic()
    subprocess.run(["bash", str(ROOT / ".ci" / "deploy" / "build-image.sh")], check=True, cwd=ROOT)
    return time.monotonic() - started_at


def inspect_image(engine: list[str], field: str) -> str:
    return run([*engine, "image", "inspect", "--format", "{{" + field + "}}", IMAGE]).stdout.strip()


@contextlib.contextmanager
def worker_container(engine: list[str], config_dir: Path, metrics_port: int) -> Iterator[None]:
    """The image as the worker: read-only root, its own user, no capabilities, /tmp its only writable path."""
    run([*engine, "rm", "--force", CONTAINER], check=False)
    run([*engine, "run", "--detach", "--name", CONTAINER, "--network", "host",
         *run_limits(engine), "--read-only", "--tmpfs", "/tmp:rw,size=64m",  # noqa: S108 - the container's own
         "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
         "--volume", f"{config_dir}:{config_dir}:ro",
         "--env", f"INGEST__METRICS__PORT={metrics_port}",
         IMAGE, "run", "--config", str(config_dir / "worker.yaml")])
    try:
        yield
    except BaseException:
        logs = run([*engine, "logs", "--tail", "40", CONTAINER], check=False)
        log("the worker container's last log lines:\n" + logs.stdout + logs.stderr)
        raise
    finally:
        run([*engine, "rm", "--force", CONTAINER], check=False)


def exec_in_container(engine: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    return run([*engine, "exec", CONTAINER, *argv], check=False)


def check_user_and_filesystem(engine: list[str]) -> None:
    uid = exec_in_container(engine, "id", "-u").stdout.strip()
    if uid != IMAGE_UID:
        raise CheckFailed(f"the worker runs as uid {uid!r}, not {IMAGE_USER}")
    if exec_in_container(engine, "touch", "/opt/ingest/written").returncode == 0:
        raise CheckFailed("the root filesystem is writable")
    build_secrets = "test -e /run/secrets/pip-ca || test -e /run/secrets/pip-conf"
    if exec_in_container(engine, "sh", "-c", build_secrets).returncode == 0:
        raise CheckFailed("the build's pip secrets are in the image")


def ready(metrics_port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def records_per_topic(bootstrap: str) -> dict[str, int]:
    """Records in each of the worker's output topics (high minus low watermark, all partitions)."""
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30)
    internal = {f"{PREFIX}.state", f"{PREFIX}.specs"}
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "verify-image"})
    try:
        counts = {}
        for name, topic in metadata.topics.items():
            if not name.startswith(f"{PREFIX}.") or name in internal:
                continue
            marks = (consumer.get_watermark_offsets(TopicPartition(name, p), timeout=30) for p in topic.partitions)
            counts[name] = sum(high - low for low, high in marks)
        return counts
    finally:
        consumer.close()


def publish(rc_url: str, count: int) -> int:
    """Let the sandbox publish `count` notifications to the live subscriptions; how many it published."""
    response = requests.post(f"{rc_url}/sandbox/generator/publish", json={"n": count}, timeout=60)
    response.raise_for_status()
    return int(response.json()["published"])


def live_subscriptions(rc_url: str) -> int:
    """Subscriptions the sandbox holds live (all accounts)."""
    state = requests.get(f"{rc_url}/sandbox/state", timeout=10).json()
    return sum(int(account["live"]) for account in state["accounts"].values())


def configured_subscriptions(config: Path) -> int:
    accounts = yaml.safe_load(config.read_text(encoding="utf-8"))["accounts"]
    return sum(len(account["subscriptions"]) for account in accounts)


def all_arrived(bootstrap: str, published: int) -> bool:
    try:
        return sum(records_per_topic(bootstrap).values()) >= published
    except KafkaException:  # e.g. a topic the worker just created has no leader yet
        return False


def stop_gracefully(engine: list[str]) -> tuple[int, float]:
    """SIGTERM the worker; its exit status and how long it took (CheckFailed past the grace period)."""
    started_at = time.monotonic()
    run([*engine, "kill", "--signal", "TERM", CONTAINER])
    try:
        waited = run([*engine, "wait", CONTAINER], timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"SIGTERM: still running after the {GRACE_SECONDS} s grace period") from exc
    return int(waited.stdout.strip().splitlines()[-1]), time.monotonic() - started_at


def verify(engine: list[str], build_seconds: float) -> None:
    with contextlib.ExitStack() as stack:
        config_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="verify-image-")))
        config_dir.chmod(0o755)  # the image's user (10001) reads the config and secret files
        broker = stack.enter_context(started([str(INGEST), "dev", "kafka"]))
        bootstrap = broker.wait_for(lambda line: line.startswith("KAFKA_BOOTSTRAP_SERVERS="),
                                    BROKER_START_SECONDS, "ingest dev kafka").split("=", 1)[1]
        log(f"broker at {bootstrap}")
        sandbox_output = stack.enter_context(started(
            [str(INGEST), "sandbox", "--json", "--write-config", str(config_dir), "-b", bootstrap,
             "--prefix", PREFIX]))
        sandbox = json.loads(sandbox_output.wait_for(lambda line: line.startswith("{"), STEP_SECONDS, "ingest sandbox"))
        sandbox_output.wait_for(lambda line: line == "ready", STEP_SECONDS, "ingest sandbox")
        log(f"sandbox at {sandbox['rc_url']}, worker config {config_dir / 'worker.yaml'}")

        metrics_port = free_port()
        stack.enter_context(worker_container(engine, config_dir, metrics_port))
        check_user_and_filesystem(engine)
        log(f"container runs as uid {IMAGE_UID} on a read-only root filesystem")
        wait_until("/readyz 200", lambda: ready(metrics_port), STEP_SECONDS)
        log("/readyz answered 200")
        # /readyz is also 200 for a worker that owns no subscription yet (a standby), so wait for the
        # worker's subscriptions to be live before publishing to them.
        wanted = configured_subscriptions(config_dir / "worker.yaml")
        wait_until(f"{wanted} live subscriptions", lambda: live_subscriptions(sandbox["rc_url"]) >= wanted,
                   STEP_SECONDS)
        log(f"the worker's {wanted} subscriptions are live in the sandbox")

        published = 0
        for _ in range(BATCHES):
            published += publish(sandbox["rc_url"], BATCH_SIZE)
            wait_until(f"{published} records in Kafka", functools.partial(all_arrived, bootstrap, published),
                       STEP_SECONDS, interval=1)
        counts = records_per_topic(bootstrap)
        arrived = sum(counts.values())
        dead = counts.get(f"{PREFIX}.dead-letter", 0)
        if published != BATCHES * BATCH_SIZE:
            raise CheckFailed(f"the sandbox published {published} of {BATCHES * BATCH_SIZE} notifications")
        if arrived != published or dead:
            raise CheckFailed(f"{published} notifications published, {arrived} records in Kafka ({dead} dead letters)")
        log(f"{arrived} of {published} notifications arrived in Kafka, 0 dead letters: "
            + ", ".join(f"{name} {n}" for name, n in sorted(counts.items()) if n))

        status, seconds = stop_gracefully(engine)
        if status != 0:
            raise CheckFailed(f"SIGTERM: exit status {status} after {seconds:.1f} s")
        log(f"SIGTERM: exit status 0 after {seconds:.1f} s (grace period {GRACE_SECONDS} s)")

    size_mb = int(inspect_image(engine, ".Size")) / 1e6
    log(f"PASSED: image {IMAGE} ({' '.join(engine)}), {size_mb:.0f} MB, built in {build_seconds:.0f} s")


def main() -> int:
    engine = container_engine()
    build_seconds = build_image()
    user = inspect_image(engine, ".Config.User")
    if user != IMAGE_USER:
        log(f"FAILED: the image's user is {user!r}, not {IMAGE_USER}")
        return 1
    try:
        verify(engine, build_seconds)
    except CheckFailed as exc:
        log(f"FAILED: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
