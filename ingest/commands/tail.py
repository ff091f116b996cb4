"""`ingest tail TOPIC`: print records with key and headers, the way downstream consumers see them.

Before reading, it checks that the broker answers and that every topic exists, and says which of the
two is wrong in one line (exit 1), instead of librdkafka's retry log and an empty wait.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException

CONNECT_TIMEOUT_SECONDS = 10.0


class TailError(Exception):
    """Kafka is unreachable or a topic is missing; `str(e)` is the one line shown to the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", nargs="+", help="topic name(s), e.g. ringcentral.message-store")
    parser.add_argument("--bootstrap-servers", "-b", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--max", "-n", type=int, default=0,
                        help="stop after N records; 0 runs until Ctrl-C (default: %(default)s)")
    parser.add_argument("--latest", action="store_true", help="start at the end instead of the beginning")
    parser.add_argument("--idle-exit", type=float, default=0.0, metavar="SECONDS",
                        help="exit after this many seconds without a record; 0 never does (default: %(default)s)")


def _consumer(bootstrap: str, latest: bool, broker_down: list[str]) -> Consumer:
    def on_error(error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            broker_down.append(error.str())

    return Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"ingest-tail-{os.getpid()}",
        "auto.offset.reset": "latest" if latest else "earliest", "enable.auto.commit": False,
        "isolation.level": "read_committed",
        # librdkafka would print a %3|FAIL line per connection retry; this command reports an
        # unreachable broker itself, in one line (error_cb above and the metadata check below).
        "log_level": 0, "error_cb": on_error,
    })


def check_topics(consumer: Consumer, bootstrap: str, topics: list[str]) -> None:
    """Raise `TailError` when the broker does not answer in time or a topic does not exist."""
    try:
        metadata = consumer.list_topics(timeout=CONNECT_TIMEOUT_SECONDS)
    except KafkaException:
        raise TailError(f"cannot reach Kafka at {bootstrap} (no answer within {CONNECT_TIMEOUT_SECONDS:g}s)"
                        ) from None
    missing = [t for t in topics if t not in metadata.topics]
    if not missing:
        return
    prefix = missing[0].split(".", 1)[0] + "."
    siblings = sorted(t for t in metadata.topics if t.startswith(prefix))
    hint = (f"topics named {prefix}*: {', '.join(siblings)}" if siblings
            else "a worker creates its topics when it starts")
    raise TailError(f"no topic {', '.join(missing)} on {bootstrap} ({hint})")


def _print_record(msg: Any) -> None:
    headers = {str(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else v
               for k, v in list(msg.headers() or [])}
    value = msg.value() or b""
    print(json.dumps({
        "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
        "key": (msg.key() or b"").decode("utf-8", "replace"), "headers": headers,
        "value": value.decode("utf-8", "replace"),
    }, ensure_ascii=False), flush=True)


def tail(consumer: Consumer, args: argparse.Namespace, broker_down: list[str]) -> None:
    check_topics(consumer, args.bootstrap_servers, args.topic)
    consumer.subscribe(args.topic)
    shown, last = 0, time.monotonic()
    while not args.max or shown < args.max:
        msg = consumer.poll(0.5)
        if broker_down:
            raise TailError(f"lost Kafka at {args.bootstrap_servers}: {broker_down[0]}")
        if msg is None:
            if args.idle_exit and time.monotonic() - last > args.idle_exit:
                return
            continue
        error = msg.error()
        if error is not None:
            raise TailError(f"{msg.topic() or 'Kafka'}: {error.str()}")
        last = time.monotonic()
        _print_record(msg)
        shown += 1


def main(args: argparse.Namespace) -> int:
    if not args.bootstrap_servers:
        print("ingest tail: set --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS", file=sys.stderr)
        return 2
    broker_down: list[str] = []
    consumer = _consumer(args.bootstrap_servers, args.latest, broker_down)
    try:
        tail(consumer, args, broker_down)
    except TailError as exc:
        print(f"ingest tail: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
