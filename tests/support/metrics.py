"""Metric samples: from a `Metrics` registry in the test's process, or from a worker's /metrics text."""

from __future__ import annotations

import urllib.request
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from ingest.observability.metrics import Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of an in-process registry (0 when the series does not exist yet)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def scrape(port: int) -> str:
    """The /metrics text of a health server on 127.0.0.1:`port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition: (sample name, its labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` (exactly) whose labels include `labels`."""
    return sum(value for (sample_name, sample_labels), value in samples(text).items()
               if sample_name == name and all(dict(sample_labels).get(k) == want for k, want in labels.items()))
