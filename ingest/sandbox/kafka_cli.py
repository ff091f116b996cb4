"""`ingest dev kafka`: a local broker for manual work; runs until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from ingest.sandbox.kafka import KafkaSetupError, LocalKafka


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="keep broker data here (default: a temporary directory)")
    parser.add_argument("--port", type=int, help="PLAINTEXT port (default: a free one)")


def main(args: argparse.Namespace) -> int:
    broker = LocalKafka(data_dir=args.data_dir)
    if args.port:
        broker.port = args.port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print("starting Apache Kafka (first run downloads the jars with mvn) ...", flush=True)
        bootstrap = broker.start()
    except KafkaSetupError as exc:
        print(f"error: {exc}")
        return 1
    print(f"KAFKA_BOOTSTRAP_SERVERS={bootstrap}", flush=True)
    print(f"broker log: {broker.log_path}   (Ctrl-C stops the broker)", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the broker ...", flush=True)
        broker.close()
    return 0
