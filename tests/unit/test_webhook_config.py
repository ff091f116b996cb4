"""`transport: webhook` and its `webhook` section: defaults, the address, and each bad value naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import BASE, CLIENT_SECRET, ENV, JWT, error, load, write

from ingest.worker.supervisor import check_processes

WEBHOOK = BASE + """
transport: webhook
webhook:
  public_url: https://ingest.example.com/
"""


def test_webhook_defaults_and_address(tmp_path: Path) -> None:
    cfg = load(tmp_path, WEBHOOK)
    assert cfg.transport == "webhook"
    assert cfg.webhook is not None
    assert cfg.webhook.address == "https://ingest.example.com/ringcentral/webhook"
    assert (cfg.webhook.host, cfg.webhook.port, cfg.webhook.answer_timeout_seconds) == ("0.0.0.0", 8080, 2.0)


def test_webhook_workers_may_share_their_specs_in_a_group(tmp_path: Path) -> None:
    cfg = load(tmp_path, WEBHOOK + "worker:\n  coordination: group\n")  # any pod receives any delivery
    assert (cfg.transport, cfg.worker.coordination) == ("webhook", "group")


def test_webhook_workers_run_one_process_per_pod(tmp_path: Path) -> None:
    """The processes of one pod cannot all listen on the receiver's port: `--processes N` is refused."""
    cfg = load(tmp_path, WEBHOOK + "worker:\n  coordination: group\n")
    assert check_processes(cfg, 1) is None
    key, problem = check_processes(cfg, 2) or ("", "")
    assert key == "transport" and "WebHook receiver's port" in problem


def test_pubnub_stays_the_default(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.transport == "pubnub" and cfg.webhook is None


def test_webhook_subscriptions_may_live_longer_than_pubnub_ones(tmp_path: Path) -> None:
    cfg = load(tmp_path, WEBHOOK + "worker:\n  expires_in_seconds: 86400\n")
    assert cfg.worker.expires_in_seconds == 86400
    assert "worker.expires_in_seconds: must be at most 900" in error(
        tmp_path, BASE + "worker:\n  expires_in_seconds: 86400\n")


@pytest.mark.parametrize(("extra", "fragment"), [
    ("transport: carrier-pigeon\n", "transport: must be one of pubnub, webhook"),
    ("transport: webhook\n", "webhook: required with transport: webhook"),
    ("transport: webhook\nwebhook:\n  path: /x\n", "webhook.public_url: required key is missing"),
    ("transport: webhook\nwebhook:\n  public_url: http://ingest.example.com\n", "webhook.public_url: must be https"),
    ("transport: webhook\nwebhook:\n  public_url: ingest.example.com\n", "webhook.public_url: expected an https URL"),
    ("transport: webhook\nwebhook:\n  public_url: https://x.example\n  path: hook\n", "webhook.path: expected an"),
    ("transport: webhook\nwebhook:\n  public_url: https://x.example\n  port: 9095\n",
     "webhook.port: must differ from metrics.port (9095)"),
    ("transport: webhook\nwebhook:\n  public_url: https://x.example\n  port: 70000\n", "webhook.port: must be at most"),
    ("transport: webhook\nwebhook:\n  public_url: https://x.example\n  answer_timeout_seconds: 3\n",
     "webhook.answer_timeout_seconds: must be at most 2.5"),
    ("transport: webhook\nwebhook:\n  public_url: https://x.example\n  verification_token: abc\n",
     "webhook.verification_token: unknown key"),
    ("transport: webhook\nwebhook:\n  public_url: https://x.example\n",
     "accounts[0].transport: websocket cannot be used with transport: webhook"),
])
def test_a_bad_webhook_value_names_its_key(tmp_path: Path, extra: str, fragment: str) -> None:
    base = BASE.replace("    jwt_env: ACME_JWT\n", "    jwt_env: ACME_JWT\n    transport: websocket\n") \
        if "accounts[0].transport" in fragment else BASE
    assert fragment in error(tmp_path, base + extra)


def test_a_local_sandbox_may_use_plain_http(tmp_path: Path) -> None:
    cfg = load(tmp_path, BASE + "transport: webhook\nwebhook:\n  public_url: http://127.0.0.1:8080\n  port: 8080\n")
    assert cfg.webhook is not None and cfg.webhook.address == "http://127.0.0.1:8080/ringcentral/webhook"


def test_ingest_run_exits_2_on_a_bad_webhook_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest.cli import main

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, BASE + "transport: webhook\nwebhook:\n  public_url: https://x.example\n  port: 9095\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "webhook.port: must differ from metrics.port (9095)" in err
    assert len(err.strip().splitlines()) == 1
    assert CLIENT_SECRET not in err and JWT not in err
