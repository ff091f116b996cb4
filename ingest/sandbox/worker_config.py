"""A worker configuration for a running sandbox, with the secrets in files as in production.

The demo, the benchmarks and the tests all run real workers against the sandbox; this is the one
place that knows how a sandbox's description maps onto the worker's configuration keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ingest.config import MAX_PUBNUB_EXPIRES_IN

# account name -> [(subscription name, event filters)]
Subscriptions = Mapping[str, list[tuple[str, list[str]]]]

# What the demo and `ingest sandbox --write-config` subscribe every sandbox account to:
# subscription name -> event filters (messages, presence and calls families).
SANDBOX_FILTERS: dict[str, list[str]] = {
    "messages": ["/restapi/v1.0/account/~/extension/~/message-store",
                 "/restapi/v1.0/account/~/extension/~/message-store/instant?type=SMS"],
    "presence": ["/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true"],
    "calls": ["/restapi/v1.0/account/~/telephony/sessions", "/restapi/v1.0/account/~/extension"],
}


def every_account(sandbox: Mapping[str, Any], *, one_subscription: bool = False) -> Subscriptions:
    """`SANDBOX_FILTERS` for every account of `sandbox` (`Sandbox.describe()`); `one_subscription`: all of
    them in one subscription per account (`transport: websocket` carries one)."""
    # Fresh lists per account: shared ones would be written as YAML anchors (&id001), hard to read.
    if one_subscription:
        merged = [f for filters in SANDBOX_FILTERS.values() for f in filters]
        return {account["name"]: [("all", list(merged))] for account in sandbox["accounts"]}
    return {account["name"]: [(name, list(f)) for name, f in SANDBOX_FILTERS.items()]
            for account in sandbox["accounts"]}


def renewal_settings(ttl: float) -> dict[str, Any]:
    """`worker` settings for a sandbox whose subscriptions live `ttl` seconds: none for RingCentral's
    15 minutes (the worker's defaults), else renew a third of the lifetime before expiry."""
    if ttl >= MAX_PUBNUB_EXPIRES_IN:
        return {}
    margin = max(2.0, ttl / 3)
    return {"renewal_margin_seconds": margin, "renewal_jitter_seconds": margin / 4,
            "expires_in_seconds": int(ttl)}


def write_worker_config(directory: Path, sandbox: Mapping[str, Any], bootstrap: str, prefix: str,
                        subscriptions: Subscriptions, *, partitions: int = 6, worker: Mapping[str, Any] | None = None,
                        metrics_port: int = 0, log_level: str = "WARNING", transport: str = "pubnub") -> Path:
    """Write `worker.yaml` (plus the JWT and client-secret files) into `directory`; returns its path.

    `sandbox` is `Sandbox.describe()`; accounts without subscriptions are left out.
    """
    directory = directory.resolve()  # file paths in the config are relative to the config's directory
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / "client_secret"
    secret.write_text(sandbox["client_secret"])
    accounts = []
    for account in sandbox["accounts"]:
        subs = subscriptions.get(account["name"])
        if not subs:
            continue
        jwt = directory / f"{account['name']}.jwt"
        jwt.write_text(account["jwt"])
        accounts.append({"name": account["name"], "jwt_file": str(jwt),
                         **({"transport": transport} if transport != "pubnub" else {}),
                         "subscriptions": [{"name": n, "event_filters": f} for n, f in subs]})
    config = {
        "kafka": {"bootstrap.servers": bootstrap},
        "topics": {"prefix": prefix, "partitions": partitions, "replication_factor": 1},
        "ringcentral": {"server": sandbox["rc_url"], "client_id": sandbox["client_id"],
                        "client_secret_file": str(secret), "pubnub_origin": sandbox["pubnub_origin"],
                        "pubnub_ssl": False},
        "accounts": accounts,
        "worker": {"shutdown_timeout_seconds": 10, **(worker or {})},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "logging": {"level": log_level},
    }
    path = directory / "worker.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
