"""WebSocket tests use the sandbox fixtures of tests/sandbox/conftest.py (until tests/support exists)."""

from tests.sandbox.conftest import RC, make_sandbox, rc, sandbox, wait_for

__all__ = ["RC", "make_sandbox", "rc", "sandbox", "wait_for"]
