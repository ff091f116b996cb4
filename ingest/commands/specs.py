"""`ingest apply -f SPECS --config WORKER.yaml`: declare the subscriptions the worker group must keep.

Adds new specs, updates changed ones and (unless --no-prune) removes specs the file no longer lists;
the owning workers react within moments: create, move or delete RingCentral subscriptions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from ingest.model import SubscriptionSpec

SPEC_FILE_FORMAT = """\
spec file (-f): the `accounts` section of a worker config, without credentials:

  accounts:
    - name: acme                  # must be an account of the worker config (its JWT is there)
      subscriptions:
        - name: messages          # spec id: acme/messages
          event_filters:
            - /restapi/v1.0/account/~/extension/~/message-store

Without -f, the worker config's own accounts and subscriptions are applied.
"""


class UnknownAccounts(Exception):
    """Specs name accounts for which the worker config holds no credentials."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = SPEC_FILE_FORMAT
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("-f", "--file", type=Path, metavar="SPECS",
                        help="spec file (format below); default: the worker config's own")
    parser.add_argument("--config", "-c", type=Path, required=True, metavar="FILE",
                        help="worker configuration: Kafka connection, topic prefix and the accounts workers "
                             "hold credentials for")
    parser.add_argument("--no-prune", action="store_true", help="keep specs that the file does not list")
    parser.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")


def check_accounts(specs: Iterable[SubscriptionSpec], known: Iterable[str], config_path: Path) -> None:
    """Refuse specs of accounts the workers cannot log in to: they would only log
    `subscription.unknown_account` and never subscribe."""
    names = set(known)
    unknown = sorted({s.account for s in specs if s.account not in names})
    if unknown:
        raise UnknownAccounts(f"no credentials for account(s) {', '.join(unknown)} in {config_path} "
                              f"(its accounts: {', '.join(sorted(names)) or 'none'}); add them there (name and "
                              "jwt_file or jwt_env) first, so that workers can log in")


def main(args: argparse.Namespace) -> int:
    from ingest.config import ConfigError, load_config, load_specs
    from ingest.coordination.specs import apply_specs, plan_specs, read_specs
    from ingest.topology import TopicNames

    try:
        config = load_config(args.config, secrets=False)  # only the account names matter here
    except ConfigError as exc:
        print(f"ingest apply: {exc}", file=sys.stderr)
        return 2
    try:
        specs = load_specs(args.file) if args.file else config.specs()
    except ConfigError as exc:
        print(f"ingest apply: {exc} (spec file format: ingest apply --help)", file=sys.stderr)
        return 2
    try:
        check_accounts(specs, (a.name for a in config.accounts), args.config)
    except UnknownAccounts as exc:
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

    from ingest.observability.kafka_logs import kafka_log_config, serve_logs
    from ingest.topology import COMPACTED, ensure_topics

    ensure_topics(serve_logs(AdminClient({**config.kafka, **kafka_log_config()})), [topic],
                  partitions=config.topics.spec_partitions, replication_factor=config.topics.replication_factor,
                  config=COMPACTED)
    result = apply_specs(config.kafka, topic, config.topics.spec_partitions, specs, prune=not args.no_prune)
    print(f"{topic}: {len(result.added)} added, {len(result.updated)} updated, {len(result.removed)} removed, "
          f"{result.unchanged} unchanged")
    return 0
