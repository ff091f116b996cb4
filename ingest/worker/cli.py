"""`ingest run --config FILE`: run the worker until SIGTERM/SIGINT, then stop gracefully.
With `--processes N`, N workers in this pod under one parent (worker/supervisor.py)."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ingest.observability import logs
from ingest.observability.logs import redact

if TYPE_CHECKING:
    from ingest.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, metavar="FILE",
                        help="worker configuration (YAML); every value can be overridden by INGEST__SECTION__KEY")
    parser.add_argument("--delete-subscriptions-on-exit", action="store_true", default=None,
                        help="delete the RingCentral subscriptions on shutdown instead of keeping them "
                             "alive for the next start (config: worker.delete_subscriptions_on_shutdown)")
    parser.add_argument("--processes", type=_positive, default=1, metavar="N",
                        help="run N worker processes in this pod (one per core), sharing the specs through the "
                             "group (needs worker.coordination: group); they serve metrics.port together, and "
                             "listen on 127.0.0.1:port+1..port+N each (default: 1; docs/deployment.md)")
    # Given by `--processes` to its children: the parent's pid (the child stops when it is gone).
    parser.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(args: argparse.Namespace) -> int:
    from ingest.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _invalid(args.config, str(exc))
    logs.configure(config.logging.level)
    return _supervise(args, config) if args.processes > 1 else _run_worker(args, config)


def _run_worker(args: argparse.Namespace, config: Config) -> int:
    if args.parent is not None:  # one of the processes of `--processes N`
        from ingest.worker.supervisor import parent_gone, tag_log_lines

        tag_log_lines(config.worker.id)

    from confluent_kafka import KafkaException

    from ingest.observability.health import ListenError, StoppedWaiting
    from ingest.worker.runtime import Worker

    try:
        worker = Worker(config)
    except KafkaException as exc:  # librdkafka read a certificate or key it cannot use (config check: names only)
        return _invalid(args.config, f"kafka: {exc.args[0].str() if exc.args else exc}")
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        worker.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        worker.start()
    except StoppedWaiting:
        worker.stop()
        return 0
    except ListenError as exc:  # the first thing start() does: nothing else runs yet
        return _invalid(args.config, f"metrics.{exc.setting}: {exc}")
    tune_gc()
    while not stop.wait(1.0):
        # Fenced by a newer owner, or the group membership thread died (it then left the group and
        # owns nothing): stop, and let the orchestrator start us again. A process that lingered
        # failing its liveness probe served nothing until someone restarted it.
        if worker.failed:
            break
        if args.parent is not None and parent_gone(args.parent):
            logs.get_logger(__name__).error("worker.parent_gone", parent=args.parent)
            break
    failed = worker.failed
    undelivered = worker.stop(delete_subscriptions=args.delete_subscriptions_on_exit)
    if failed:
        logs.get_logger(__name__).error("worker.exiting", reason=failed, exit_status=3)
        return 3
    return 0 if undelivered == 0 else 1


def _supervise(args: argparse.Namespace, config: Config) -> int:
    """`--processes N` (N > 1): this process supervises N workers (worker/supervisor.py)."""
    from ingest.observability.health import ListenError
    from ingest.worker.supervisor import check_processes, supervise

    problem = check_processes(config, args.processes)
    if problem is not None:
        key, text = problem
        return _invalid(args.config, f"{key}: {text}")
    supervisor = supervise(args, config)
    try:
        supervisor.health.start()
    except ListenError as exc:
        return _invalid(args.config, f"metrics.{exc.setting}: {exc}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.request_stop())
    return supervisor.run()


def _invalid(path: Path, problem: str) -> int:
    """One line naming the key at fault, exit status 2."""
    print(f"ingest: invalid configuration {path}: {redact(problem)}", file=sys.stderr)
    return 2


# Python's cyclic GC, with its defaults, took ~10% of the worker's time at full throughput: every
# in-flight record (an entry, an Outcome, its headers) is a tracked container, so generation-0
# collections ran every 700 allocations and full collections walked the whole heap, imports
# included (docs/benchmarks.md).
GC_GENERATION0_THRESHOLD = 50_000


def tune_gc() -> None:
    """For a long-running worker process, once it has started: move everything that exists now
    (modules, config, clients) out of the collector's sight and collect young objects less often.
    Garbage in reference cycles is still collected, in larger batches."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GENERATION0_THRESHOLD, gen1, gen2)
