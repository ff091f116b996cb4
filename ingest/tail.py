"""`ingest tail TOPIC`: print records with key and headers, the way downstream consumers see them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from confluent_kafka import Consumer, KafkaException

from ingest.kafka_logs import kafka_log_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", nargs="+", help="topic name(s)")
    parser.add_argument("--bootstrap-servers", "-b", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--max", "-n", type=int, default=0, help="stop after N records (0: run until Ctrl-C)")
    parser.add_argument("--latest", action="store_true", help="start at the end instead of the beginning")
    parser.add_argument("--idle-exit", type=float, default=0.0, metavar="SECONDS",
                        help="exit after this many seconds without a record (0: never)")


def main(args: argparse.Namespace) -> int:
    if not args.bootstrap_servers:
        print("ingest tail: set --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS", file=sys.stderr)
        return 2
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap_servers, "group.id": f"ingest-tail-{os.getpid()}",
        "auto.offset.reset": "latest" if args.latest else "earliest", "enable.auto.commit": False,
        "isolation.level": "read_committed", **kafka_log_config(),
    })
    consumer.subscribe(args.topic)
    shown, last = 0, time.monotonic()
    try:
        while not args.max or shown < args.max:
            msg = consumer.poll(0.5)
            if msg is None:
                if args.idle_exit and time.monotonic() - last > args.idle_exit:
                    break
                continue
            if msg.error():
                raise KafkaException(msg.error())
            last = time.monotonic()
            headers = {str(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                       for k, v in list(msg.headers() or [])}
            value = msg.value() or b""
            print(json.dumps({
                "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                "key": (msg.key() or b"").decode("utf-8", "replace"), "headers": headers,
                "value": value.decode("utf-8", "replace"),
            }, ensure_ascii=False), flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
