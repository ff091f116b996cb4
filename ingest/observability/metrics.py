"""Every Prometheus metric the worker exports, in one place.

Names follow Prometheus conventions: base units, `_total` for counters, `_seconds` for times, label
sets bounded (family, reason, endpoint, status, category, state, spec). Hot-path code must not call
`.labels(...)` per message: take the child once (see `FamilyMetrics`) and reuse it.

Metrics live in a dedicated registry (not the global default) so that several workers can run in
one test process and each scrape shows only its own worker.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ingest import __version__
from ingest.model import TRANSPORTS

# Lag from the notification's own timestamp to the Kafka acknowledgement: RingCentral stamps events
# with millisecond precision; push pipelines normally sit between 50 ms and a few seconds.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
INTERNAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Buckets:
    """One label set of a `BatchHistogram`."""

    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts = self._bounds, self._counts
        with self._lock:
            for value in values:
                counts[bisect_left(bounds, value)] += 1  # bucket `le` holds value <= le
                self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip((*map(floatToGoString, self._bounds), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        return buckets, total


class BatchHistogram(Collector):
    """A histogram for the hot path, fed a batch at a time (`observe_many`).

    Exposition is the same as prometheus_client's `Histogram` (`_bucket`, `_count`, `_sum`), but
    prometheus_client takes two locks and scans the buckets for every observation: at two histograms
    per notification that cost more than decrypting it. Here a batch takes one lock and a bisect
    per value (docs/benchmarks.md).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (), *,
                 buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._bounds = tuple(sorted(buckets))
        self._children: dict[tuple[str, ...], _Buckets] = {}
        self._lock = threading.Lock()
        if not labelnames:
            self._children[()] = _Buckets(self._bounds)
        registry.register(self)

    def labels(self, *values: str) -> _Buckets:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        with self._lock:
            child = self._children.get(values)
            if child is None:
                child = self._children[values] = _Buckets(self._bounds)
            return child

    def observe_many(self, values: Iterable[float]) -> None:
        self.labels().observe_many(values)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            children = list(self._children.items())
        for labels, child in children:
            buckets, total = child.snapshot()
            family.add_metric(list(labels), buckets, total)
        return [family]


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.build_info = Info("ingest_build", "Version of the running worker.", registry=r)
        self.build_info.info({"version": __version__})

        # Data plane
        self.notifications_received = Counter(
            "ingest_notifications_received_total", "Notifications received, by transport (pubnub, websocket).",
            ["transport"], registry=r)
        # An account's transport (pubnub, websocket), or the worker's WebHook receiver (transport: webhook).
        self.received_by_transport = {name: self.notifications_received.labels(name)
                                      for name in (*TRANSPORTS, "webhook")}
        self.notifications_published = Counter(
            "ingest_notifications_published_total", "Notifications acknowledged by Kafka, by family.",
            ["family"], registry=r)
        self.notifications_dead_lettered = Counter(
            "ingest_notifications_dead_lettered_total",
            "Notifications sent to the dead-letter topic, by family (if known) and reason.",
            ["family", "reason"], registry=r)
        self.notifications_duplicate = Counter(
            "ingest_notifications_duplicate_total",
            "Notifications received again (replay after reconnect or restart) and skipped.", registry=r)
        self.decrypt_failures = Counter(
            "ingest_decrypt_failures_total", "Payloads that could not be decrypted, by reason.", ["reason"],
            registry=r)
        self.validation_failures = Counter(
            "ingest_validation_failures_total", "Notifications that failed JSON Schema validation, by family.",
            ["family"], registry=r)
        self.lag = BatchHistogram(
            "ingest_lag_seconds",
            "End-to-end lag: Kafka acknowledgement time minus the notification's own timestamp.",
            ("family",), buckets=LAG_BUCKETS, registry=r)
        self.internal_latency = BatchHistogram(
            "ingest_internal_latency_seconds", "PubNub receipt to Kafka acknowledgement.",
            buckets=INTERNAL_BUCKETS, registry=r)
        self.last_notification = Gauge(
            "ingest_last_notification_timestamp_seconds",
            "Unix time of the last notification received, per subscription spec.", ["spec"], registry=r)

        # Kafka
        self.producer_queue = Gauge(
            "ingest_kafka_producer_queue_messages", "Messages waiting in the producer's local queue.",
            registry=r)
        self.delivery_errors = Counter(
            "ingest_kafka_delivery_errors_total", "Kafka delivery failures, by error name.", ["error"],
            registry=r)
        self.checkpoints = Counter(
            "ingest_checkpoints_total", "Checkpoint records written to the state topic.", registry=r)
        self.checkpoints_deferred = Counter(
            "ingest_checkpoints_deferred_total",
            "Checkpoints left for the next pass because the producer's queue was full.", registry=r)
        self.kafka_up = Gauge("ingest_kafka_up", "1 when the Kafka cluster answered the last check.", registry=r)

        # Control plane
        self.subscriptions = Gauge(
            "ingest_subscriptions", "Owned subscriptions by state.", ["state"], registry=r)
        # Expiry is computed at scrape time from the recorded expiration times (see SubscriptionExpiry):
        # ingest_subscription_expiry_seconds{spec,account}, ingest_subscription_expiry_min_seconds and
        # ingest_subscription_expiry_timestamp_seconds{spec,account}.
        self.subscription_expiry = SubscriptionExpiry(registry=r)
        self.renewals = Counter(
            "ingest_subscription_renewals_total", "Subscription renewals, by outcome.", ["outcome"], registry=r)
        self.renewal_margin = Histogram(
            "ingest_subscription_renewal_margin_seconds",
            "How long before expiry each renewal completed (punctuality).",
            buckets=(0, 5, 15, 30, 60, 90, 120, 180, 300, 600), registry=r)
        self.creations = Counter(
            "ingest_subscription_creations_total", "Subscriptions created, by reason.", ["reason"], registry=r)
        self.creation_failures = Counter(
            "ingest_subscription_creation_failures_total",
            "Subscription creations (first creation or re-creation) that failed, by reason.", ["reason"],
            registry=r)
        self.deletions = Counter(
            "ingest_subscription_deletions_total", "Subscriptions deleted, by outcome.", ["outcome"], registry=r)
        self.token_refreshes = Counter(
            "ingest_token_refreshes_total", "OAuth token requests, by grant and outcome.", ["grant", "outcome"],
            registry=r)
        self.api_calls = Counter(
            "ingest_ringcentral_api_calls_total", "RingCentral API calls, by endpoint and HTTP status.",
            ["endpoint", "status"], registry=r)
        self.rate_limit_penalties = Counter(
            "ingest_ringcentral_rate_limit_penalties_total", "429 answers from RingCentral, by rate-limit group.",
            ["group"], registry=r)
        self.pubnub_status = Counter(
            "ingest_pubnub_status_total", "PubNub status events, by category.", ["category"], registry=r)
        self.pubnub_connections = Gauge(
            "ingest_pubnub_connections", "Open PubNub subscribe connections.", registry=r)
        self.websocket_connections = Gauge(
            "ingest_websocket_connections", "Open RingCentral WebSocket connections (one per user session).",
            registry=r)
        self.websocket_reconnects = Counter(
            "ingest_websocket_reconnects_total",
            "WebSocket connections ended, by reason (drop, idle, absolute, pong-timeout, unauthorized, error).",
            ["reason"], registry=r)
        self.websocket_recoveries = Counter(
            "ingest_websocket_recoveries_total",
            "Session recoveries, by outcome: Successful, Failed (a gap), expired (beyond recoveryTimeout: a gap).",
            ["outcome"], registry=r)
        # Scale-out
        self.owned_specs = Gauge("ingest_owned_specs", "Specs this worker owns (assigned spec partitions).",
                                 registry=r)
        self.rebalances = Counter("ingest_rebalances_total", "Spec partitions assigned or revoked, by kind.",
                                  ["kind"], registry=r)
        self.handover = Histogram(
            "ingest_handover_seconds",
            "From a spec partition's assignment to every one of its subscriptions being read again.",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120), registry=r)
        self.transactions = Counter(
            "ingest_transactions_total", "Kafka transactions (exactly-once mode), by outcome.", ["outcome"],
            registry=r)
        self.lapses = Histogram(
            "ingest_subscription_lapse_seconds",
            "Subscription lapses: from the expiry of a subscription to its replacement being read (RingCentral "
            "published nothing meanwhile).",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.replay_gaps = Counter(
            "ingest_replay_gap_suspected_total",
            "Resumes where the gap may exceed PubNub's replay buffer (messages may be missing).", registry=r)

        self._specs: dict[str, SpecMetrics] = {}
        self._specs_lock = threading.Lock()
        self._states_seen: set[str] = set()

    # -- helpers that keep per-spec and per-state series consistent ------------------------------------

    def spec(self, spec_id: str) -> SpecMetrics:
        """Cached label children for one spec; the first call marks the start of reading its channel.

        `ingest_last_notification_timestamp_seconds{spec}` is initialised to that moment, so that a
        subscription that never receives anything still ages (and the no-notification alert can fire).
        """
        with self._specs_lock:
            found = self._specs.get(spec_id)
            if found is None:
                found = SpecMetrics(last_notification=self.last_notification.labels(spec_id))
                found.last_notification.set(time.time())
                self._specs[spec_id] = found
            return found

    def forget_spec(self, spec_id: str) -> None:
        """Drop every per-spec series (spec removed, or its partition moved to another worker).

        Without this a worker that lost a spec would keep exporting its expiry, which would age into
        a false "lapsed" alert while the new owner renews it.
        """
        with self._specs_lock:
            if self._specs.pop(spec_id, None) is not None:
                self.last_notification.remove(spec_id)
        self.subscription_expiry.remove(spec_id)

    def set_subscription_states(self, counts: Mapping[str, int]) -> None:
        """Set `ingest_subscriptions{state}` from a full count; states no longer present drop to 0."""
        for state in self._states_seen - counts.keys():
            self.subscriptions.labels(state).set(0)
        for state, count in counts.items():
            self.subscriptions.labels(state).set(count)
        self._states_seen.update(counts)


@dataclass(frozen=True)
class SpecMetrics:
    """Label children for one spec, resolved once (`Metrics.spec`) and reused per message."""

    last_notification: Gauge


def account_of(spec_id: str) -> str:
    """The account part of a spec id ("<account>/<subscription>")."""
    return spec_id.split("/", 1)[0]


class SubscriptionExpiry:
    """Seconds until each owned subscription expires, computed when Prometheus scrapes.

    The control plane records each subscription's absolute expiration time (`set`); the remaining
    seconds are derived at scrape time. A gauge that the scheduler pushed periodically would freeze
    at a healthy value exactly when the scheduler hangs, hiding the lapse this metric exists to show.

    Exports `ingest_subscription_expiry_seconds{spec,account}` (negative once lapsed),
    `ingest_subscription_expiry_timestamp_seconds{spec,account}` and
    `ingest_subscription_expiry_min_seconds` (absent while the worker owns no subscription).
    """

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expires_at: dict[str, float] = {}
        if registry is not None:
            registry.register(self)

    def set(self, spec_id: str, expires_at: float) -> None:
        """Record the absolute (unix time) expiration of the spec's live subscription."""
        with self._lock:
            self._expires_at[spec_id] = expires_at

    def remove(self, spec_id: str) -> None:
        with self._lock:
            self._expires_at.pop(spec_id, None)

    def get(self, spec_id: str) -> float | None:
        """The recorded expiration of one spec's subscription (unix time), if any."""
        with self._lock:
            return self._expires_at.get(spec_id)

    def snapshot(self) -> dict[str, float]:
        """spec id -> expires_at (unix time), a copy."""
        with self._lock:
            return dict(self._expires_at)

    def describe(self) -> list[Metric]:
        return list(self._families({}, 0.0))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.snapshot(), self._clock()))

    @staticmethod
    def _families(expires: Mapping[str, float], now: float) -> list[Metric]:
        remaining = GaugeMetricFamily(
            "ingest_subscription_expiry_seconds",
            "Seconds until each owned subscription expires (negative once lapsed).", labels=["spec", "account"])
        at = GaugeMetricFamily(
            "ingest_subscription_expiry_timestamp_seconds",
            "Unix time at which each owned subscription expires.", labels=["spec", "account"])
        minimum = GaugeMetricFamily(
            "ingest_subscription_expiry_min_seconds",
            "Seconds until the first owned subscription expires (minimum over all; absent if none owned).")
        for spec_id, expires_at in sorted(expires.items()):
            labels = [spec_id, account_of(spec_id)]
            remaining.add_metric(labels, expires_at - now)
            at.add_metric(labels, expires_at)
        if expires:
            minimum.add_metric([], min(expires.values()) - now)
        return [remaining, at, minimum]


@dataclass(frozen=True)
class FamilyMetrics:
    """Label children for one event family, resolved once and reused per message."""

    published: Counter
    lag: _Buckets

    @classmethod
    def for_family(cls, m: Metrics, family: str) -> FamilyMetrics:
        return cls(m.notifications_published.labels(family), m.lag.labels(family))
