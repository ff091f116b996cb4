"""`ingest apply -f SPECS --config WORKER.yaml`: declare the subscriptions the worker group must keep.

Adds new specs, updates changed ones and (unless --no-prune) removes specs the file no longer lists;
the owning workers react within moments: create, move or delete RingCentral subscriptions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", type=Path, metavar="SPECS",
                        help="spec file (accounts with their subscriptions); default: the worker config's own")
    parser.add_argument("--config", "-c", type=Path, required=True, metavar="FILE",
                        help="worker configuration: Kafka connection and topic prefix")
    parser.add_argument("--no-prune", action="store_true", help="keep specs that the file does not list")
    parser.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")


def main(args: argparse.Namespace) -> int:
    from ingest.config import ConfigError, load_config, load_specs
    from ingest.pipeline import TopicNames
    from ingest.specs.store import apply_specs, plan_specs, read_specs

    try:
        config = load_config(args.config)
        specs = load_specs(args.file) if args.file else config.specs()
    except ConfigError as exc:
        print(f"ingest apply: {exc}", file=sys.stderr)
        return 2
    topic = TopicNames(config.topics.prefix).specs
    if args.dry_run:
        current = read_specs(config.kafka, topic)
        wanted = {s.spec_id: s for s in specs}
        plan = plan_specs(current, wanted, prune=True)  # kept with --no-prune, but shown either way
        marks = {**dict.fromkeys(plan.added, "+"), **dict.fromkeys(plan.updated, "~"),
                 **dict.fromkeys(plan.removed, "=" if args.no_prune else "-")}
        for spec_id in sorted(marks):
            print(f"{marks[spec_id]} {spec_id}")
        return 0
    from confluent_kafka.admin import AdminClient

    from ingest.kafka_logs import kafka_log_config, serve_logs
    from ingest.topics import COMPACTED, ensure_topics

    ensure_topics(serve_logs(AdminClient({**config.kafka, **kafka_log_config()})), [topic],
                  partitions=config.topics.spec_partitions, replication_factor=config.topics.replication_factor,
                  config=COMPACTED)
    result = apply_specs(config.kafka, topic, config.topics.spec_partitions, specs, prune=not args.no_prune)
    print(f"{topic}: {len(result.added)} added, {len(result.updated)} updated, {len(result.removed)} removed, "
          f"{result.unchanged} unchanged")
    return 0
