"""The realistic benchmark's search for the maximum sustained rate (a pure function of the steps so far), and
the report of the processes scenario."""

from __future__ import annotations

from typing import Any

from tests.bench.realistic import _next_rate


def steps(*outcomes: tuple[float, bool]) -> list[dict[str, Any]]:
    return [{"rate_offered": rate, "sustained": held} for rate, held in outcomes]


def test_the_rate_steps_up_while_held() -> None:
    assert _next_rate(steps((200, True), (1000, True), (3000, True))) == 4500
    assert _next_rate(steps((200, True), (1000, True), (3000, True), (4500, True))) == 6750


def test_after_a_failure_it_halves_the_gap_and_stops_within_25_percent() -> None:
    assert _next_rate(steps((200, True), (1000, True), (3000, False))) == 2000
    assert _next_rate(steps((200, True), (1000, True), (3000, False), (2000, True))) == 2500
    assert _next_rate(steps((200, True), (1000, True), (3000, False), (2000, True), (2500, True))) is None


def test_nothing_held_searches_below_the_lowest_rate() -> None:
    assert _next_rate(steps((200, False), (1000, False), (3000, False))) == 100


def test_the_report_shows_each_round_of_each_process_count_and_the_ratio_row() -> None:
    from tests.bench.report import METRICS, _processes

    row = {"rate": 4000, "received_per_s": 3990, "worker_cores": 0.3, "cores_by_process": [0.01, 0.14, 0.15],
           "sandbox_cores": 0.05, "broker_cores": None, "lag_p50_seconds": 0.01, "lag_p99_seconds": 0.2,
           "sustained": True}
    one = {"rates": [{**row, "cores_by_process": [0.3]}]}
    part = {"settings": {"processes": 2, "subscriptions": 2000, "window_seconds": 5.0, "settle_seconds": 2.0,
                         "rounds": 2},
            "by_processes": {"1": {"ladders": [one, one]}, "2": {"ladders": [{"rates": [row]}]}},
            "ratios": [1.5, 2.25]}
    lines = _processes([{"run": 1, "processes": part}])
    assert "| 1 | 1 | 4,000/s | 3,990/s | 0.30 | 0.30 | 0.05 | - | 10 ms | 200 ms | yes |" in lines
    assert "| 2 | 1 | 4,000/s | 3,990/s | 0.30 | 0.30 | 0.05 | - | 10 ms | 200 ms | yes |" in lines
    assert "| 1 | 2 | 4,000/s | 3,990/s | 0.30 | 0.01 + 0.14 + 0.15 | 0.05 | - | 10 ms | 200 ms | yes |" in lines
    assert "1.50x, 2.25x" in lines[0]
    assert "processes.sustained_ratio" in METRICS
    assert _processes([{"run": 1}]) == []


def test_a_pods_summary_is_the_median_of_its_ladders() -> None:
    from tests.bench.processes import _summary

    def ladder(top: int, cores: float) -> dict[str, Any]:
        return {"max_sustained_rate": top,
                "at_max": {"worker_cores": cores, "sandbox_cores": 0.1, "broker_cores": 0.2} if top else None}

    summary = _summary([ladder(4500, 0.25), ladder(10000, 0.75), ladder(0, 0.0)])
    assert summary["max_sustained_rate"] == 4500
    assert summary["at_max"] == {"worker_cores": 0.5, "sandbox_cores": 0.1, "broker_cores": 0.2}
