"""The sandbox fixture: a running RingCentral + PubNub emulator, closed at the end of the test.

Its settings are `SandboxSettings(**sandbox_options)`. A folder (conftest.py), a module or a test
that needs other settings overrides the `sandbox_options` fixture, or parametrises it:
`@pytest.mark.parametrize("sandbox_options", [{"access_token_ttl": 3}])`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ingest.sandbox.server import Sandbox, SandboxSettings

# Scenario tests: a 1-s PubNub hold, no rate limits, and 5,000 messages of replay buffer per key
# (loss past PubNub's real 100-message buffer is a property of PubNub, not what these tests measure).
STEADY = {"pubnub_hold_seconds": 1.0, "rate_limits": False, "buffer_size": 5000}


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    """`SandboxSettings` keywords of this test's sandboxes (none: the emulator's defaults)."""
    return {}


@pytest.fixture
def make_sandbox(sandbox_options: dict[str, Any]) -> Iterator[Callable[..., Sandbox]]:
    """Start sandboxes with `sandbox_options` and these overrides; all closed at teardown."""
    started: list[Sandbox] = []

    def make(**overrides: Any) -> Sandbox:
        sb = Sandbox(SandboxSettings(**{**sandbox_options, **overrides})).start()
        started.append(sb)
        return sb

    yield make
    for sb in started:
        sb.close()


@pytest.fixture
def sandbox(make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    return make_sandbox()
