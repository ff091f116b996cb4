"""`ingest status --config FILE`: the workers as Kafka sees them.

Group mode (`worker.coordination: group`): the group's members and the spec partitions each owns,
specs from the spec topic. Standalone mode: each worker owns the specs of its own config and joins
no group, so its workers are the ones that wrote the state topic lately. Per spec: owner,
RingCentral subscription, time to expiry and checkpoint age, from the state topic.

Only Kafka is read: the RingCentral secrets and JWTs of the config are not needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, metavar="FILE",
                        help="worker configuration: Kafka connection, topic prefix, coordination mode "
                             "(its secrets need not be readable)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _group_owners(config: Config, group: str) -> tuple[str, list[dict[str, Any]], dict[int, str]]:
    """The group's state, its members and partition -> member."""
    from confluent_kafka.admin import AdminClient

    from ingest.observability.kafka_logs import kafka_log_config, serve_logs

    admin = serve_logs(AdminClient({**config.kafka, **kafka_log_config()}))
    described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    owners: dict[int, str] = {}
    members = []
    for member in described.members:
        assigned = sorted(tp.partition for tp in member.assignment.topic_partitions)
        members.append({"worker": member.client_id, "host": member.host, "partitions": assigned})
        for p in assigned:
            owners[p] = member.client_id
    return described.state.name.lower(), members, owners


def _standalone_workers(states: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Workers that rewrote a state record within two refresh periods (a live worker does so every
    `STATE_REFRESH_SECONDS` at least)."""
    from ingest.coordination.state import STATE_REFRESH_SECONDS

    recent = [s for s in states.values() if now - s.updated_at <= 2 * STATE_REFRESH_SECONDS]
    return [{"worker": worker, "host": "-", "partitions": []}
            for worker in sorted({s.worker_id for s in recent})]


def collect(config: Config) -> dict[str, Any]:
    """The workers, and every spec with its state."""
    from ingest.coordination.specs import read_specs
    from ingest.coordination.state import restore
    from ingest.topology import TopicNames, partition_for

    names, partitions = TopicNames(config.topics.prefix), config.topics.spec_partitions
    states = restore(dict(config.kafka), names.state)
    now = time.time()
    grouped = config.worker.coordination == "group"
    if grouped:
        state, members, owners = _group_owners(config, names.worker_group)
        spec_ids = set(read_specs(config.kafka, names.specs))
    else:
        state, members, owners = "standalone", _standalone_workers(states, now), {}
        spec_ids = set(states) | {s.spec_id for s in config.specs()}
    rows = []
    for spec_id in sorted(spec_ids):
        st = states.get(spec_id)
        p = partition_for(spec_id, partitions)
        rows.append({
            "spec": spec_id, "partition": p,
            "owner": owners.get(p) if grouped else (st.worker_id if st else None),
            "subscription_id": st.subscription_id if st else None,
            "expires_in": round(st.expires_at - now, 1) if st and st.expires_at else None,
            "checkpoint_age": round(now - st.timetoken / 1e7, 1) if st and st.timetoken else None,
            "state_age": round(now - st.updated_at, 1) if st else None,
        })
    for m in members:
        m["specs"] = sum(1 for r in rows if r["owner"] == m["worker"])
        if not grouped:
            m["partitions"] = sorted({r["partition"] for r in rows if r["owner"] == m["worker"]})
    where = names.worker_group if grouped else names.state
    return {"mode": config.worker.coordination, "group": where, "state": state, "members": members,
            "specs": rows}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def headline(status: dict[str, Any]) -> str:
    counts = f"{_count(len(status['members']), 'worker')}, {_count(len(status['specs']), 'spec')}"
    if status["mode"] == "group":
        return f"group {status['group']} ({status['state']}): {counts}"
    return f"standalone workers (live = wrote {status['group']} within the last minute): {counts}"


def main(args: argparse.Namespace) -> int:
    from ingest.config import ConfigError, load_config

    try:
        config = load_config(args.config, secrets=False)
    except ConfigError as exc:
        print(f"ingest status: {exc}", file=sys.stderr)
        return 2
    status = collect(config)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(headline(status))
    for m in status["members"]:
        print(f"  {m['worker']:<32} {m['host']:<20} {_count(m['specs'], 'spec'):>10}  partitions {m['partitions']}")
    print(f"\n  {'spec':<36} {'owner':<28} {'subscription':<38} {'expires in':>10} {'checkpoint age':>15}")
    for r in status["specs"]:
        print(f"  {r['spec']:<36} {r['owner'] or '-':<28} {r['subscription_id'] or '-':<38} "
              f"{_secs(r['expires_in']):>10} {_secs(r['checkpoint_age']):>15}")
    return 0


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"
