"""Record values read back from a topic with a real consumer (a fresh group from the beginning), and
numbered sink outcomes to produce them from."""

from __future__ import annotations

from confluent_kafka import Consumer

from ingest.data.pipeline import Outcome
from tests.support.waiting import wait_for


def numbered_outcome(topic: str, n: int, *, error: str | None = None) -> Outcome:
    """A pipeline outcome whose value says its number (`{"n":N}`), for the sink to produce."""
    return Outcome(topic=topic, key=b"809646016", value=b'{"n":%d}' % n, headers=[("uuid", b"u%d" % n)],
                   family="message-store", uuid=f"u{n}", event_time=1_700_000_000.0, error=error)


def read_values(bootstrap: str, topic: str, expected: int, *, committed: bool = False,
                timeout: float = 60) -> list[bytes]:
    """At least `expected` values of `topic`, and any extra that arrive within a second after them.
    `committed`: read_committed (what an exactly-once consumer sees)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-check", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False,
                         "isolation.level": "read_committed" if committed else "read_uncommitted"})
    consumer.subscribe([topic])
    values: list[bytes] = []

    def read() -> bool:
        values.extend(m.value() or b"" for m in consumer.consume(100, 0.5) if not m.error())
        return len(values) >= expected

    try:
        wait_for(read, timeout, f"{expected} {'committed ' if committed else ''}records in {topic}", interval=0)
        values.extend(m.value() or b"" for m in consumer.consume(100, 1.0) if not m.error())  # any extra
    finally:
        consumer.close()
    return values
