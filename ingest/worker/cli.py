"""`ingest run --config FILE`: run the worker until SIGTERM/SIGINT, then stop gracefully."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
from pathlib import Path

from ingest.observability import logs
from ingest.observability.logs import redact


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, metavar="FILE",
                        help="worker configuration (YAML); every value can be overridden by INGEST__SECTION__KEY")
    parser.add_argument("--delete-subscriptions-on-exit", action="store_true", default=None,
                        help="delete the RingCentral subscriptions on shutdown instead of keeping them "
                             "alive for the next start (config: worker.delete_subscriptions_on_shutdown)")


def main(args: argparse.Namespace) -> int:
    from ingest.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _invalid(args.config, str(exc))
    logs.configure(config.logging.level)

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
    failed = worker.failed
    undelivered = worker.stop(delete_subscriptions=args.delete_subscriptions_on_exit)
    if failed:
        logs.get_logger(__name__).error("worker.exiting", reason=failed, exit_status=3)
        return 3
    return 0 if undelivered == 0 else 1


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
