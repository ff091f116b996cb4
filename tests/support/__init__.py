"""The one test support package: waiting, worker processes, the sandbox fixture, metric samples,
free ports and the "subscriptions serving" check. Tests import from here, never copy."""

from tests.support.metrics import sample, samples, scrape, total
from tests.support.processes import WorkerProcess
from tests.support.serving import all_serving
from tests.support.waiting import free_port, holds, wait_for

__all__ = ["WorkerProcess", "all_serving", "free_port", "holds", "sample", "samples", "scrape", "total", "wait_for"]
