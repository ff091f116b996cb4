"""`ingest sandbox` as a user runs it: starts, prints URLs and credentials, serves, stops on a signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import requests

from ingest.config import load_config


def test_sandbox_command_serves_until_interrupted() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "sandbox", "--json", "--hold", "0.2", "--accounts", "2",
                             "--subscription-ttl-max", "30", "--rate", "5"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert len(info["accounts"]) == 2
        assert info["rc_url"].startswith("http://127.0.0.1:")
        assert info["pubnub_origin"].startswith("127.0.0.1:")
        token = requests.post(f"{info['rc_url']}/restapi/oauth/token", auth=(info["client_id"], info["client_secret"]),
                              data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                    "assertion": info["accounts"][0]["jwt"]}, timeout=10).json()
        created = requests.post(f"{info['rc_url']}/restapi/v1.0/subscription",
                                headers={"Authorization": f"Bearer {token['access_token']}"},
                                json={"eventFilters": ["/restapi/v1.0/account/~/extension/~/message-store"],
                                      "deliveryMode": {"transportType": "PubNub"}}, timeout=10).json()
        assert created["expiresIn"] == 29
        now = requests.get(f"http://{info['pubnub_origin']}/time/0", timeout=10).json()
        assert isinstance(now[0], int)
        state = requests.get(f"{info['rc_url']}/sandbox/state", timeout=10).json()
        assert state["generator_running"] is True
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0  # generous: a loaded 2-core machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_write_config_gives_a_ready_worker_config_and_says_how_to_start_traffic(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "sandbox", "--accounts", "2", "--write-config",
                             str(tmp_path / "w"), "-b", "127.0.0.1:1", "--prefix", "p"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or lines[-1] != "ready":
            line = proc.stdout.readline()
            assert line, f"ingest sandbox ended early:\n{lines}"
            lines.append(line.rstrip("\n"))
        rc_url = next(x.split(": ", 1)[1] for x in lines if x.startswith("  RingCentral server"))
        assert f"  worker config      : {tmp_path / 'w' / 'worker.yaml'}   (Kafka 127.0.0.1:1, topics p.*)" in lines
        assert f"  start a worker     : ingest run --config {tmp_path / 'w' / 'worker.yaml'}" in lines
        assert "  traffic            : none (--rate 0); start ~20 notifications/s with" in lines
        curl = lines[lines.index("  traffic            : none (--rate 0); start ~20 notifications/s with") + 1]
        assert curl == f"    curl -X POST {rc_url}/sandbox/generator/start -d '{{\"rate\": 20}}'"

        config = load_config(tmp_path / "w" / "worker.yaml")
        assert (config.ringcentral.server, config.ringcentral.pubnub_ssl) == (rc_url, False)
        assert config.kafka["bootstrap.servers"] == "127.0.0.1:1" and config.topics.prefix == "p"
        assert [a.name for a in config.accounts] == ["acme", "globex"]
        assert {s.name for s in config.accounts[0].subscriptions} == {"messages", "presence", "calls"}
        assert requests.post(f"{rc_url}/sandbox/generator/start", data=json.dumps({"rate": 20}), timeout=10).ok
        assert requests.get(f"{rc_url}/sandbox/state", timeout=10).json()["generator_running"] is True
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0  # generous: a loaded 2-core machine
    finally:  # whatever failed, nothing is left running (a failed run left this sandbox up for hours)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
