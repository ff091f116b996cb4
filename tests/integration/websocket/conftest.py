"""WebSocket tests: the sandbox tests' RingCentral client (`rc`) and their 0.5-s PubNub hold."""

from tests.integration.sandbox.conftest import rc, sandbox_options

__all__ = ["rc", "sandbox_options"]
