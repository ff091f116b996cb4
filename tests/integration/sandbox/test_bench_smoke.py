"""The delivery benchmark runs and reports every client (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from tests.bench import sandbox_delivery


def test_sandbox_delivery_bench_prints_rates(capsys: pytest.CaptureFixture[str]) -> None:
    assert sandbox_delivery.main(["--messages", "600", "--repeat", "1", "--payload-size", "512"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["messages"] == 600
    for client in ("requests", "http_client", "raw_socket", "pubnub_sdk"):
        assert result[client]["messages_per_second"] > 0
