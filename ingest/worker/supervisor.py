"""`ingest run --processes N`: N worker processes in one pod, sharing the specs of the group.

One CPython process runs its hot path on one core (the GIL); a pod with more cores runs more
processes. The processes are ordinary group members (`worker.coordination: group`): each owns the
spec partitions the group assigns it, exactly as N pods would. This parent owns no spec and reads
no notification; it only supervises (docs/deployment.md, "Several processes per pod"):

- Worker ids: child i is `<worker.id>-<i>`, the same id at every restart of that child, so an
  exactly-once child's transactional ids fence its own previous incarnation.
- Ports: the parent serves the pod's port (`metrics.host:metrics.port`); child i serves its own
  `/metrics`, `/healthz` and `/readyz` on 127.0.0.1:`metrics.port + 1 + i`, inside the pod only.
  The pod's `/metrics` is every child's metrics with a `worker` label (the child's id), plus the
  parent's own `ingest_worker_processes*` series; `/healthz` fails when a child's liveness fails or
  the parent's supervising loop stalls; `/readyz` is ready when every child is.
- A child that ends on its own is started again after 1, 2, 4, 8 s...; one that ended
  `RESTART_LIMIT` times within `RESTART_WINDOW_SECONDS` (a crash loop), or that exits 2 (its
  configuration), makes the parent stop the others and exit with that status (3 for the crash
  loop): Kubernetes then restarts the container, with its own back-off.
- SIGTERM or SIGINT: every child gets SIGTERM and stops gracefully (flush, last checkpoint); one
  still running `shutdown_timeout_seconds + STOP_SLACK_SECONDS` later is killed. The exit status is
  the highest of the children's (0: all clean; a child killed or ended by a signal counts as 1).
- Logs: every line of a child carries `"worker": "<its id>"`; the parent's lines come from the
  logger `ingest.worker.supervisor`.
- A child whose parent has gone (killed without passing a signal on) stops by itself
  (`parent_gone`): no orphan keeps its specs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ingest.config import Config
from ingest.observability.health import HealthServer, Heartbeats
from ingest.observability.logs import get_logger

log = get_logger(__name__)

CHILD_HOST = "127.0.0.1"  # a child's HTTP port is reached by the parent only
SUPERVISE_INTERVAL_SECONDS = 0.5
FIRST_RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 30.0
RESTART_LIMIT = 5  # ends of one child within the window that count as a crash loop
RESTART_WINDOW_SECONDS = 300.0
CRASH_LOOP_EXIT_STATUS = 3  # as a worker that cannot go on (`ingest run` exits 3)
CONFIG_EXIT_STATUS = 2
# The chart's grace period is shutdown_timeout_seconds + 15: the children flush for up to the
# timeout, then write their last checkpoint; the parent kills what is left just before Kubernetes would.
STOP_SLACK_SECONDS = 12.0
# A child's port does not answer while it imports and starts (~2 s; more on a loaded node).
STARTUP_GRACE_SECONDS = 60.0
CHILD_REQUEST_TIMEOUT_SECONDS = 2.0
PROCESS_LABEL = "worker"


def child_port(base_port: int, index: int) -> int:
    return base_port + 1 + index


def child_worker_id(pod_worker_id: str, index: int) -> str:
    return f"{pod_worker_id}-{index}"


def check_processes(config: Config, processes: int) -> tuple[str, str] | None:
    """(key, problem) if `config` cannot run `processes` processes in one pod, else None."""
    if processes <= 1:
        return None
    if config.worker.coordination != "group":
        return ("worker.coordination", f"--processes {processes} needs group (the processes share the specs "
                                       f"through the group), got {config.worker.coordination}")
    if config.webhook is not None:
        # One receiver port per pod: N processes cannot all listen on it (run N pods instead).
        return ("transport", f"--processes {processes} cannot share the WebHook receiver's port; run one "
                             f"process per pod with transport webhook")
    if config.metrics.port == 0 or child_port(config.metrics.port, processes - 1) > 65535:
        return ("metrics.port", f"--processes {processes} needs a fixed port with {processes} free ports after it "
                                f"(the processes listen on 127.0.0.1:port+1..port+{processes}), "
                                f"got {config.metrics.port}")
    return None


@dataclass
class Child:
    """One worker process of the pod, started again (same id, same port) when it ends."""

    index: int
    worker_id: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while it waits to be started again
    answered: bool = False  # its health port has answered since it was (last) started
    ends: deque[float] = field(default_factory=deque)  # when it ended, within the restart window

    @property
    def running(self) -> bool:
        # `returncode` is set by the supervising loop's poll(): HTTP threads read it, never wait.
        return self.proc is not None and self.proc.returncode is None


class ChildrenMetrics(Collector):
    """The pod's `/metrics`: every running child's exposition, its samples labelled with the child's id.

    A child's families are read at each scrape (one local HTTP request per child); a child that does
    not answer (starting, restarting) is left out of that scrape: `ingest_worker_processes_running`
    tells that it is missing."""

    def __init__(self, children: Callable[[], Iterable[Child]]) -> None:
        self._children = children

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for child in self._children():
            if not child.running:
                continue
            try:
                _, text = _get(child.port, "/metrics")
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                merged.samples.extend(s._replace(labels={**s.labels, PROCESS_LABEL: child.worker_id})
                                      for s in family.samples)
        return list(families.values())


def _get(port: int, path: str) -> tuple[int, str]:
    """GET a child's health port: (status, body); OSError when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{CHILD_HOST}:{port}{path}",
                                    timeout=CHILD_REQUEST_TIMEOUT_SECONDS) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:  # a 503 of /healthz or /readyz carries the reason
        return exc.code, exc.read().decode()


def _reason(body: str) -> str:
    try:
        return str(json.loads(body).get("reason", body))
    except ValueError:
        return body[:200]


class Supervisor:
    """The parent of `ingest run --processes N` (see the module's doc)."""

    def __init__(self, config_path: Path, config: Config, processes: int, child_args: list[str]) -> None:
        self._config_path = config_path
        self._config = config
        self._child_args = child_args
        self.children = [Child(i, child_worker_id(config.worker.id, i), child_port(config.metrics.port, i))
                         for i in range(processes)]
        self._stop = threading.Event()
        self._heartbeats = Heartbeats()
        registry = CollectorRegistry()
        Gauge("ingest_worker_processes", "Worker processes this pod runs (ingest run --processes).",
              registry=registry).set(processes)
        self._running = Gauge("ingest_worker_processes_running", "Worker processes of this pod that are running.",
                              registry=registry)
        self._restarts = Counter("ingest_worker_process_restarts", "Worker processes started again after they ended.",
                                 registry=registry)
        registry.register(ChildrenMetrics(lambda: self.children))
        self.registry = registry
        self.health = HealthServer(self, config.metrics.host, config.metrics.port, liveness=self._liveness,
                                   readiness=self._readiness)

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Start the children, keep them running until asked to stop; the exit status. The health
        server must be started (`health.start()`) before."""
        log.info("supervisor.starting", processes=len(self.children), worker=self._config.worker.id,
                 metrics_port=self.health.port)
        for child in self.children:
            self._start(child)
        self._heartbeats.register("supervisor", max(10.0, SUPERVISE_INTERVAL_SECONDS * 20))
        status: int | None = None
        while status is None and not self._stop.wait(SUPERVISE_INTERVAL_SECONDS):
            self._heartbeats.beat("supervisor")
            status = self._tend()
        return self._stop_children(status)

    # ---- children ------------------------------------------------------------------------------

    def _start(self, child: Child) -> None:
        env = {**os.environ, "INGEST__WORKER__ID": child.worker_id, "INGEST__METRICS__HOST": CHILD_HOST,
               "INGEST__METRICS__PORT": str(child.port)}
        command = [sys.executable, "-m", "ingest", "run", "--config", str(self._config_path),
                   "--parent", str(os.getpid()), *self._child_args]
        child.proc = subprocess.Popen(command, env=env)  # its output is the pod's (stdout, stderr)
        child.started_at = time.monotonic()
        child.restart_at = None
        child.answered = False
        log.info("supervisor.worker_started", child=child.worker_id, pid=child.proc.pid, port=child.port)

    def _tend(self) -> int | None:
        """One look at every child: note the ones that ended, start again the ones due. An exit
        status when the pod must stop (a configuration error, a crash loop), else None."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                continue
            if child.restart_at is None:
                status = self._ended(child, now)
                if status is not None:
                    return status
            elif now >= child.restart_at:
                self._restarts.inc()
                self._start(child)
        self._running.set(sum(c.running for c in self.children))
        return None

    def _ended(self, child: Child, now: float) -> int | None:
        assert child.proc is not None
        code = child.proc.returncode
        child.ends.append(now)
        while child.ends and now - child.ends[0] > RESTART_WINDOW_SECONDS:
            child.ends.popleft()
        if code == CONFIG_EXIT_STATUS:
            log.error("supervisor.worker_invalid_config", child=child.worker_id, exit_status=code)
            return CONFIG_EXIT_STATUS
        if len(child.ends) >= RESTART_LIMIT:
            log.error("supervisor.crash_loop", child=child.worker_id, exit_status=code, ends=len(child.ends),
                      window_seconds=RESTART_WINDOW_SECONDS)
            return CRASH_LOOP_EXIT_STATUS
        delay = min(MAX_RESTART_DELAY_SECONDS, FIRST_RESTART_DELAY_SECONDS * 2 ** (len(child.ends) - 1))
        child.restart_at = now + delay
        log.warning("supervisor.worker_ended", child=child.worker_id, exit_status=code, restart_in=delay)
        return None

    def _stop_children(self, status: int | None) -> int:
        """SIGTERM to every running child, wait for them within the grace period, kill the rest.
        `status`: why the pod stops (None: asked to); else the highest of the children's statuses."""
        running = [c for c in self.children if c.running]
        log.info("supervisor.stopping", running=len(running), reason="signal" if status is None else status)
        for child in running:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._config.worker.shutdown_timeout_seconds + STOP_SLACK_SECONDS
        codes = []
        for child in running:
            assert child.proc is not None
            try:
                code = child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("supervisor.worker_killed", child=child.worker_id)
                child.proc.kill()
                code = child.proc.wait()
            codes.append(code if code >= 0 else 1)  # ended by a signal: a failure
        self._running.set(0)
        final = max(codes, default=0) if status is None else status
        log.info("supervisor.stopped", exit_status=final, worker_statuses=codes)
        self.health.stop()
        return final

    # ---- the pod's probes ----------------------------------------------------------------------

    def _liveness(self) -> tuple[bool, str]:
        ok, reason = self._heartbeats.check()
        if not ok:
            return ok, reason
        problems = []
        for child in self.children:
            if not child.running:
                continue  # ended: started again shortly, or the pod stops (the supervising loop's beat says)
            try:
                status, body = _get(child.port, "/healthz")
            except OSError:
                # Not yet listening while it starts; silent once it has answered (hung, or paused);
                # or it has just ended (the supervising loop has not seen it yet).
                ended = child.proc is not None and child.proc.poll() is not None
                if not ended and (child.answered or time.monotonic() - child.started_at > STARTUP_GRACE_SECONDS):
                    problems.append(f"{child.worker_id}: its health port does not answer")
                continue
            child.answered = True
            if status != 200:
                problems.append(f"{child.worker_id}: {_reason(body)}")
        return (False, "; ".join(problems)) if problems else (True, "ok")

    def _readiness(self) -> tuple[bool, str]:
        problems = []
        for child in self.children:
            if not child.running:
                problems.append(f"{child.worker_id}: restarting")
                continue
            try:
                status, body = _get(child.port, "/readyz")
            except OSError:
                problems.append(f"{child.worker_id}: starting")
                continue
            if status != 200:
                problems.append(f"{child.worker_id}: {_reason(body)}")
        return (False, "; ".join(problems)) if problems else (True, "ok")


def supervise(args: argparse.Namespace, config: Config) -> Supervisor:
    """The parent for `ingest run --processes N` with `args`; each child gets the same flags."""
    child_args = ["--delete-subscriptions-on-exit"] if args.delete_subscriptions_on_exit else []
    return Supervisor(args.config, config, args.processes, child_args)


def tag_log_lines(worker_id: str) -> None:
    """Every log line of this (child) process says which worker it comes from."""

    def add_worker(record: logging.LogRecord) -> bool:
        record.fields = {PROCESS_LABEL: worker_id, **(getattr(record, "fields", None) or {})}
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(add_worker)


def parent_gone(parent_pid: int) -> bool:
    """The parent that started this child has ended (the child was handed to another parent)."""
    return os.getppid() != parent_pid
