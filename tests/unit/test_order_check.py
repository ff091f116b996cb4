"""The order verdict of the fault scenarios and the soak (`order_violations`): a duplicate is allowed
in at-least-once and counted apart; a notification read after a newer one of its spec is a violation."""

from __future__ import annotations

from tests.integration.faults.scenario import order_violations
from tests.support.harness import Record


def _read(*notifications: tuple[str, int] | tuple[str, int, str]) -> list[Record]:
    """Records of spec acme/messages in one partition, in read order: (uuid, timetoken[, topic])."""
    records = []
    for uuid, timetoken, *topic in notifications:
        headers = {"spec-id": "acme/messages", "timetoken": str(timetoken)}
        if uuid:
            headers["uuid"] = uuid
        records.append(Record(topic[0] if topic else "messages", "acme", b"{}", headers))
    return records


def test_back_to_back_duplicates_are_not_violations() -> None:
    # A PubNub reconnect in at-least-once: the last two notifications read again at once.
    assert order_violations(_read(("a", 1), ("b", 2), ("b", 2), ("c", 3), ("c", 3), ("d", 4))) == []


def test_a_replayed_run_after_a_restart_is_not_a_violation() -> None:
    # At-least-once after a SIGKILL: read again from the checkpoint (b), behind what was already written.
    assert order_violations(_read(("a", 1), ("b", 2), ("c", 3), ("b", 2), ("c", 3), ("d", 4))) == []


def test_a_step_back_is_a_violation() -> None:
    violations = order_violations(_read(("a", 1), ("c", 3), ("b", 2), ("d", 4)))
    assert violations == ["messages key acme acme/messages: b at 2 after 3"]


def test_a_step_back_behind_a_duplicate_is_still_a_violation() -> None:
    assert len(order_violations(_read(("a", 1), ("c", 3), ("c", 3), ("b", 2)))) == 1


def test_without_a_uuid_the_timetoken_tells_a_duplicate() -> None:
    assert order_violations(_read(("", 1), ("", 2), ("", 2), ("", 3))) == []
    assert len(order_violations(_read(("", 1), ("", 3), ("", 2)))) == 1


def test_order_is_per_partition() -> None:
    # The dead-letter topic is another partition: read interleaved with the family topic, not a violation.
    assert order_violations(_read(("a", 1), ("c", 3), ("b", 2, "dead-letter"), ("d", 4))) == []
