"""`ingest sandbox` as a user runs it: starts, prints URLs and credentials, serves, stops on a signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import requests


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
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
