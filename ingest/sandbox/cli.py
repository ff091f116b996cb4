"""`ingest sandbox`: the RingCentral + PubNub emulator on free local ports, until Ctrl-C.

Prints the URLs and the demo credentials (app client id/secret, account JWTs: sandbox values, made
for copying into a worker config), then serves. The admin API (faults, generator) is on the
RingCentral port under /sandbox; see docs/sandbox.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

from ingest.sandbox.generator import KINDS
from ingest.sandbox.ringcentral import RateLimits
from ingest.sandbox.server import Sandbox, SandboxSettings, demo_accounts
from ingest.sandbox.websocket import WebSocketSettings
from ingest.sandbox.worker_config import every_account, renewal_settings, write_worker_config

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SandboxSettings()
    limits = RateLimits()
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=d.host, help="bind address (default: %(default)s)")
    net.add_argument("--rc-port", type=int, default=0, help="RingCentral port (default: a free one)")
    net.add_argument("--pubnub-port", type=int, default=0, help="PubNub port (default: a free one)")
    net.add_argument("--ws-port", type=int, default=0, help="WebSocket port (default: a free one)")
    rc = parser.add_argument_group("RingCentral")
    rc.add_argument("--accounts", type=int, default=3, help="number of demo accounts (default: %(default)s)")
    rc.add_argument("--extensions", type=int, default=4, help="extensions per account (default: %(default)s)")
    rc.add_argument("--subscription-ttl-max", type=float, default=d.subscription_ttl_max,
                    help="cap and default of expiresIn, seconds (default: %(default)s)")
    rc.add_argument("--subscription-limit", type=int, default=d.subscription_limit,
                    help="subscriptions per user per app before 403 SUB-505 (default: %(default)s)")
    rc.add_argument("--access-token-ttl", type=float, default=d.access_token_ttl,
                    help="access token lifetime, seconds (default: %(default)s)")
    rc.add_argument("--refresh-token-ttl", type=float, default=d.refresh_token_ttl,
                    help="refresh token lifetime, seconds (default: %(default)s)")
    rc.add_argument("--no-rate-limits", action="store_true", help="disable the Light/Medium/Auth limits")
    rc.add_argument("--light", type=int, default=limits.light,
                    help="Light group requests per window (default: %(default)s)")
    rc.add_argument("--medium", type=int, default=limits.medium,
                    help="Medium group requests per window (default: %(default)s)")
    rc.add_argument("--auth", type=int, default=limits.auth,
                    help="Auth group requests per window (default: %(default)s)")
    rc.add_argument("--rate-window", type=float, default=limits.window,
                    help="rate-limit window, seconds (default: %(default)s)")
    rc.add_argument("--penalty", type=float, default=limits.penalty, help="429 penalty, seconds (default: %(default)s)")
    pn = parser.add_argument_group("PubNub")
    pn.add_argument("--hold", type=float, default=d.pubnub_hold_seconds,
                    help="long-poll hold, seconds (real PubNub: ~280; default: %(default)s)")
    pn.add_argument("--buffer-size", type=int, default=d.buffer_size,
                    help="replay buffer per subscribe key, messages (default: %(default)s)")
    pn.add_argument("--buffer-ttl", type=float, default=d.buffer_ttl,
                    help="replay buffer retention, seconds (default: %(default)s)")
    pn.add_argument("--per-response", type=int, default=d.max_messages_per_response,
                    help="messages per subscribe response (default: %(default)s)")
    ws_defaults = WebSocketSettings()
    ws = parser.add_argument_group("WebSocket")
    ws.add_argument("--ws-recovery-timeout", type=float, default=ws_defaults.recovery_timeout,
                    help="seconds a session waits for a reconnect with its wsc (default: %(default)s)")
    ws.add_argument("--ws-idle-timeout", type=float, default=ws_defaults.idle_timeout,
                    help="seconds without a client frame before WSG-902 (default: %(default)s)")
    ws.add_argument("--ws-absolute-timeout", type=float, default=ws_defaults.absolute_timeout,
                    help="seconds before every connection is closed with WSG-903 (default: %(default)s)")
    gen = parser.add_argument_group("event generator")
    gen.add_argument("--seed", type=int, default=d.seed,
                     help="seed of the accounts' ids and keys and of the generated traffic (default: %(default)s)")
    gen.add_argument("--rate", type=float, default=0.0,
                     help="steady notifications per second to live subscriptions (default: 0, off)")
    gen.add_argument("--kinds", default="", help=f"comma-separated subset of: {', '.join(KINDS)} (default: all)")
    gen.add_argument("--malformed-ratio", type=float, default=0.0,
                     help="share of deliberately broken payloads (default: %(default)s)")
    gen.add_argument("--payload-size", type=int, default=0,
                     help="target average notification size, bytes; 0 = natural size (default: %(default)s)")
    wk = parser.add_argument_group("worker config")
    wk.add_argument("--write-config", type=Path, metavar="DIR",
                    help="write DIR/worker.yaml (secrets in files beside it) for a worker against this sandbox: "
                         "every account subscribed to messages, presence and calls")
    wk.add_argument("--bootstrap-servers", "-b", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_BOOTSTRAP),
                    help="Kafka of that worker (default: $KAFKA_BOOTSTRAP_SERVERS, else %(default)s)")
    wk.add_argument("--prefix", default="sandbox", help="topic prefix of that worker (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the URLs and credentials as one JSON line")


def settings_from(args: argparse.Namespace) -> SandboxSettings:
    limits: bool | RateLimits = False if args.no_rate_limits else RateLimits(
        light=args.light, medium=args.medium, auth=args.auth, window=args.rate_window, penalty=args.penalty)
    return SandboxSettings(
        accounts=demo_accounts(args.accounts, args.extensions, seed=args.seed),
        subscription_ttl_max=args.subscription_ttl_max, subscription_limit=args.subscription_limit,
        access_token_ttl=args.access_token_ttl, refresh_token_ttl=args.refresh_token_ttl,
        pubnub_hold_seconds=args.hold, buffer_size=args.buffer_size, buffer_ttl=args.buffer_ttl,
        max_messages_per_response=args.per_response, rate_limits=limits, seed=args.seed,
        payload_size=args.payload_size, host=args.host, rc_port=args.rc_port, pubnub_port=args.pubnub_port,
        ws_port=args.ws_port, websocket=WebSocketSettings(
            recovery_timeout=args.ws_recovery_timeout, idle_timeout=args.ws_idle_timeout,
            absolute_timeout=args.ws_absolute_timeout))


def _print_banner(sb: Sandbox) -> None:
    info = sb.describe()
    print("RingCentral + PubNub sandbox (Ctrl-C stops it)")
    print(f"  RingCentral server : {info['rc_url']}")
    print(f"  PubNub origin      : {info['pubnub_origin']}   (ssl=False)")
    print(f"  WebSocket          : {info['ws_url']}   (token: POST /restapi/oauth/wstoken)")
    print(f"  admin API          : {info['rc_url']}/sandbox/state   (faults: POST /sandbox/faults/<name>)")
    print(f"  client_id          : {info['client_id']}")
    print(f"  client_secret      : {info['client_secret']}")
    print(f"  subscribe key      : {info['subscriber_key']}")
    for account in info["accounts"]:
        print(f"  account {account['name']:<10} id {account['account_id']}  main extension {account['extension_id']}")
        print(f"    jwt: {account['jwt']}")


def _write_config(sb: Sandbox, args: argparse.Namespace) -> None:
    info = sb.describe()
    path = write_worker_config(args.write_config, info, args.bootstrap_servers, args.prefix, every_account(info),
                               worker=renewal_settings(args.subscription_ttl_max), log_level="INFO")
    print(f"  worker config      : {path}   (Kafka {args.bootstrap_servers}, topics {args.prefix}.*)")
    print(f"  start a worker     : ingest run --config {args.write_config / 'worker.yaml'}", flush=True)


def _start_traffic(sb: Sandbox, args: argparse.Namespace) -> None:
    if args.rate > 0:
        kinds = [k for k in args.kinds.split(",") if k] or None
        sb.generator.start(args.rate, kinds, args.malformed_ratio)
        print(f"  traffic            : ~{args.rate:g} notifications/s to live subscriptions", flush=True)
        return
    # Without this line, a worker and `ingest tail` would wait in silence.
    print("  traffic            : none (--rate 0); start ~20 notifications/s with")
    print(f"    curl -X POST {sb.rc_url}/sandbox/generator/start -d '{{\"rate\": 20}}'", flush=True)


def main(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sb = Sandbox(settings_from(args)).start()
    try:
        if args.json:
            print(json.dumps(sb.describe()), flush=True)
        else:
            _print_banner(sb)
        if args.write_config:
            _write_config(sb, args)
        _start_traffic(sb, args)
        print("ready", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sb.close()
    return 0
