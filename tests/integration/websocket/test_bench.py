"""The WebSocket benchmark runs and reports its figures (a smoke test: no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

from tests.bench import websocket


def test_many_users_bench_reports_its_figures(kafka_bootstrap: str, tmp_path: Path) -> None:
    result = websocket.run(kafka_bootstrap, tmp_path, users=5, rate=10.0, seconds=2.0)
    worker = result["worker"]
    assert result["published"] > 0 and result["lost"] == 0
    assert worker["notifications_per_second"] > 0 and worker["cpu_us_per_notification"] > 0
    assert worker["lag_p99_seconds"] is not None and worker["threads_per_user"] > 0
