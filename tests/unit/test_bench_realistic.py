"""The realistic benchmark's search for the maximum sustained rate (a pure function of the steps so far)."""

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
