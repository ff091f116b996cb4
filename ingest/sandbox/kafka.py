"""A real, single-node Apache Kafka broker (KRaft, combined broker+controller) on 127.0.0.1.

The broker jars come from Maven Central through `mvn` into a per-user cache, once; later runs work
offline. Used by the test fixture, `ingest dev kafka`, `ingest demo` and the benchmarks.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka.admin import AdminClient

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.25.1"
SLF4J_VERSION = "2.0.17"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
STARTED_MESSAGE = "Kafka Server started"


class KafkaSetupError(RuntimeError):
    """The local broker cannot be provided; the message says what to do about it."""


def cache_root() -> Path:
    """Per-user cache for downloaded artifacts (`INGEST_CACHE_DIR` overrides)."""
    explicit = os.environ.get("INGEST_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ingest"


_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.ingest</groupId>
  <artifactId>kafka-broker-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencyManagement>
    <dependencies>
      <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-bom</artifactId>
        <version>{LOG4J_VERSION}</version><type>pom</type><scope>import</scope></dependency>
      <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
        <version>{SLF4J_VERSION}</version></dependency>
    </dependencies>
  </dependencyManagement>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId></dependency>
  </dependencies>
</project>
"""

# Properties format: the YAML form would need jackson-dataformat-yaml on the classpath.
_LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.req.name = kafka.request.logger
logger.req.level = WARN
"""


def _require_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KafkaSetupError(
            f"'{name}' was not found on PATH; {why}. Install a JDK 17+ and Maven "
            "(Debian: apt-get install openjdk-17-jdk-headless maven), or set KAFKA_BOOTSTRAP_SERVERS "
            "to use an existing broker."
        )
    return path


def ensure_kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """Resolve the broker's runtime jars into the cache (once) and return the lib directory."""
    lib = cache_root() / f"kafka-{version}" / "lib"
    done = lib.parent / "COMPLETE"
    if done.exists():
        return lib
    mvn = _require_tool("mvn", "it downloads the Kafka broker jars from Maven Central")
    work = Path(tempfile.mkdtemp(prefix="ingest-kafka-pom-"))
    try:
        (work / "pom.xml").write_text(_POM.replace(KAFKA_VERSION, version))
        partial = lib.parent / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        proc = subprocess.run(
            [mvn, "-B", "-q", "-f", str(work / "pom.xml"), f"{DEPENDENCY_PLUGIN}:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={partial}"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise KafkaSetupError(
                f"downloading Apache Kafka {version} with mvn failed (exit {proc.returncode}). Maven "
                f"Central must be reachable for the first run; later runs use {lib}.\n{tail}"
            )
        if not any(p.name.startswith("kafka_2.13-") for p in partial.iterdir()):
            raise KafkaSetupError(f"mvn finished but no kafka_2.13 jar appeared in {partial}")
        shutil.rmtree(lib, ignore_errors=True)
        partial.rename(lib)
        done.write_text(version + "\n")
        return lib
    finally:
        shutil.rmtree(work, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):  # a leading dash reads as a command-line flag
            return cid


@dataclass
class LocalKafka:
    """One broker process. `start()` may be called again after `stop()`: same ports, same data."""

    data_dir: Path | None = None
    heap: str = "512m"
    startup_timeout: float = 90.0
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    # Where clients are told to connect (default: `port`); a test puts a proxy there.
    advertised_port: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _owns_dir: bool = field(default=False, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "broker.out"

    def _write_config(self) -> Path:
        assert self.data_dir is not None
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.advertised_port or self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Start fast and small: no initial rebalance delay, one-partition internal topics,
            # a 2 MiB cleaner buffer instead of 128 MiB, few threads.
            "group.initial.rebalance.delay.ms": "0",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "log.cleaner.dedupe.buffer.size": "2097152",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            # Tests use short group sessions to exercise handover quickly.
            "group.min.session.timeout.ms": "1000",
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "5000",
            "transaction.remove.expired.transaction.cleanup.interval.ms": "5000",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)
        return path

    def _java(self, lib: Path, *args: str, heap: str | None = None) -> list[str]:
        java = _require_tool("java", "the Kafka broker runs on a JDK 17+")
        assert self.data_dir is not None
        opts = [f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.data_dir / 'logs'}", "-Djava.awt.headless=true"]
        if heap:
            opts = [f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", *opts]
        return [java, *opts, "-cp", str(lib / "*"), *args]

    def start(self) -> str:
        """Start (or restart) the broker and wait until it answers metadata requests."""
        if self._proc is not None and self._proc.poll() is None:
            return self.bootstrap_servers
        lib = ensure_kafka_jars()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="ingest-kafka-"))
            self._owns_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)  # `ingest dev kafka --data-dir` may name a new one
        config = self._write_config()
        if not (self.data_dir / "data" / "meta.properties").exists():
            fmt = subprocess.run(
                self._java(lib, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config),
                           "--ignore-formatted"),
                capture_output=True, text=True, check=False,
            )
            if fmt.returncode != 0:
                raise KafkaSetupError(f"formatting KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self._java(lib, "kafka.Kafka", str(config), heap=self.heap),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self._wait_ready()
        return self.bootstrap_servers

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = False
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise KafkaSetupError(
                    f"the Kafka broker exited with status {self._proc.returncode} during startup:\n"
                    + self._log_tail()
                )
            if not started:
                with self.log_path.open("rb") as f:
                    f.seek(max(0, offset - 4096))
                    started = STARTED_MESSAGE.encode() in f.read()
            if started:
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
                with contextlib.suppress(Exception):
                    if admin.list_topics(timeout=2).brokers:
                        return
            time.sleep(0.2)
        self.stop()
        raise KafkaSetupError(f"the Kafka broker was not ready within {self.startup_timeout:.0f}s:\n"
                              + self._log_tail())

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no broker log)"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Kafka's clean shutdown hook), wait, then SIGKILL. Data is kept for a restart."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the broker and delete its data if this object created the directory."""
        self.stop()
        if self._owns_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
