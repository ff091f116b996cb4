"""The one "is the worker serving" check of the in-process tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingest.worker.runtime import Worker


def all_serving(worker: Worker, n: int) -> bool:
    """n subscriptions active, and PubNub answering on every one of their channels."""
    if worker.manager is None:
        return False
    return len(worker.manager.snapshot()) == n and worker.subscriptions_serving() == n
