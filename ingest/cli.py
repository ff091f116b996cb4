"""The `ingest` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args) -> exit status`; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from ingest import __version__

# (command, module, one-line help). `dev` groups developer tools: `ingest dev kafka`.
COMMANDS: list[tuple[str, str, str]] = [
    ("run", "ingest.worker.cli", "run the worker: own subscriptions, publish notifications to Kafka"),
    ("demo", "ingest.commands.demo", "everything on one machine: local Kafka, sandbox, worker and a live view"),
    ("sandbox", "ingest.sandbox.cli", "the local RingCentral + PubNub emulator"),
    ("tail", "ingest.commands.tail", "print records of a topic with their headers"),
    ("apply", "ingest.commands.specs", "write subscription specs to the spec topic (adds, updates, removes)"),
    ("status", "ingest.commands.status", "show the workers (group or standalone), specs, expiry, checkpoint age"),
]
DEV_COMMANDS: list[tuple[str, str, str]] = [
    ("kafka", "ingest.sandbox.kafka_cli", "start a local Apache Kafka broker and print its address"),
]


def _add(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
         commands: list[tuple[str, str, str]]) -> None:
    for name, module_name, help_text in commands:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Commands whose module is not part of this build are left out; an import error
            # inside an existing module is a bug and surfaces.
            if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
                raise
            continue
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(parser)
        parser.set_defaults(handler=module.main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingest", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.description = "RingCentral push notifications (PubNub) into Kafka, keyed by account."
    parser.add_argument("--version", action="version", version=f"ingest {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add(sub, COMMANDS)
    dev_help = "developer tools (local Kafka broker)"
    dev = sub.add_parser("dev", help=dev_help, description=dev_help)
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="TOOL", required=True)
    _add(dev_sub, DEV_COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C (SIGINT) stops every command, however it was started: a shell script that starts a
    # command in the background passes SIGINT on as ignored, and the command then could not be
    # stopped the way its help says (seen: `ingest sandbox` and `ingest dev kafka` ignoring it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return int(handler(args))
