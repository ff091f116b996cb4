"""Shared fixtures: one real Apache Kafka broker for the whole session.

If KAFKA_BOOTSTRAP_SERVERS is set, tests use that broker instead of starting one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from ingest.sandbox.kafka import LocalKafka
from tests.support.sandbox import make_sandbox, sandbox, sandbox_options  # noqa: F401  (the one sandbox fixture)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with LocalKafka() as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A topic/group name prefix no other test (or earlier run on a shared broker) uses."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    return f"t-{base}-{uuid.uuid4().hex[:8]}"
