"""`ingest status --config FILE`: the worker group as Kafka sees it.

Workers (group members) and the spec partitions each owns, and per spec: owner, RingCentral
subscription, time to expiry and checkpoint age, read from the spec and state topics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, metavar="FILE",
                        help="worker configuration: Kafka connection and topic prefix")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect(config: Any) -> dict[str, Any]:
    """The group's members and assignments, and every spec with its state."""
    from confluent_kafka.admin import AdminClient

    from ingest.kafka_logs import kafka_log_config, serve_logs
    from ingest.pipeline import TopicNames
    from ingest.specs.store import read_specs
    from ingest.state import partition_for, restore

    names, partitions = TopicNames(config.topics.prefix), config.topics.spec_partitions
    group = names.worker_group
    admin = serve_logs(AdminClient({**config.kafka, **kafka_log_config()}))
    described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    owners: dict[int, str] = {}
    members = []
    for member in described.members:
        assigned = sorted(tp.partition for tp in member.assignment.topic_partitions)
        members.append({"worker": member.client_id, "host": member.host, "partitions": assigned})
        for p in assigned:
            owners[p] = member.client_id
    specs = read_specs(config.kafka, names.specs)
    states = restore(dict(config.kafka), names.state)
    now = time.time()
    rows = []
    for spec_id in sorted(specs):
        state = states.get(spec_id)
        p = partition_for(spec_id, partitions)
        rows.append({
            "spec": spec_id, "partition": p, "owner": owners.get(p),
            "subscription_id": state.subscription_id if state else None,
            "expires_in": round(state.expires_at - now, 1) if state and state.expires_at else None,
            "checkpoint_age": round(now - state.timetoken / 1e7, 1) if state and state.timetoken else None,
            "state_age": round(now - state.updated_at, 1) if state else None,
        })
    for m in members:
        m["specs"] = sum(1 for r in rows if r["owner"] == m["worker"])
    return {"group": group, "state": str(described.state), "members": members, "specs": rows}


def main(args: argparse.Namespace) -> int:
    from ingest.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ingest status: {exc}", file=sys.stderr)
        return 2
    status = collect(config)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"group {status['group']} ({status['state']}), {len(status['members'])} workers, "
          f"{len(status['specs'])} specs")
    for m in status["members"]:
        print(f"  {m['worker']:<32} {m['host']:<20} {m['specs']:>5} specs  partitions {m['partitions']}")
    print(f"\n  {'spec':<36} {'owner':<28} {'subscription':<38} {'expires in':>10} {'checkpoint age':>15}")
    for r in status["specs"]:
        print(f"  {r['spec']:<36} {r['owner'] or '-':<28} {r['subscription_id'] or '-':<38} "
              f"{_secs(r['expires_in']):>10} {_secs(r['checkpoint_age']):>15}")
    return 0


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"
