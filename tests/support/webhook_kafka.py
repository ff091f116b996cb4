"""The WebHook receiver over the pipeline and a `KafkaSink` alone, without a worker: what the receiver
tests and the WebHook benchmark drive (the worker's handler is `WebhookTransport`). 200 only after
Kafka's acknowledgement, a fast 503 otherwise; a retry (same subscription and `uuid`) within the
de-duplication window is not produced again: it waits for the first copy's acknowledgement."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ingest.data.pipeline import ChannelContext, Pipeline
from ingest.data.sink import KafkaSink, SpecProgress
from ingest.observability.metrics import Metrics
from ingest.transports.webhook import (
    DEFAULT_ANSWER_TIMEOUT,
    DEFAULT_DEDUP_ENTRIES,
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_QUEUED,
    WebhookDelivery,
    WebhookSubscription,
)

_TIMETOKEN_PER_SECOND = 10_000_000


@dataclass(eq=False)
class _AckedProgress(SpecProgress):
    """A spec's progress that wakes the requests waiting for their record's acknowledgement."""

    acked: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def advance(self) -> None:
        super().advance()
        with self.acked:
            self.acked.notify_all()


class _Channel:
    """Per subscription: the pipeline's context, the sink's progress, and the order of timetokens."""

    __slots__ = ("context", "last_timetoken", "lock", "progress")

    def __init__(self, subscription: WebhookSubscription) -> None:
        self.context = ChannelContext(subscription.spec_id, subscription.subscription_id, subscription.account_id,
                                      plaintext=True)
        self.progress = _AckedProgress(subscription.spec_id)
        self.lock = threading.Lock()
        self.last_timetoken = 0

    def next_timetoken(self, received_at: float) -> int:
        """The receive time in 100 ns, strictly increasing per subscription (lock held)."""
        self.last_timetoken = max(self.last_timetoken + 1, int(received_at * _TIMETOKEN_PER_SECOND))
        return self.last_timetoken


class KafkaHandler:
    """`DeliveryHandler` over the pipeline and the sink: 200-after-acknowledgement, fast 503 otherwise."""

    def __init__(self, pipeline: Pipeline, sink: KafkaSink, metrics: Metrics, *,
                 kafka_reachable: Callable[[], bool] = lambda: True, max_queued: int = DEFAULT_MAX_QUEUED,
                 stall_after: float = DEFAULT_ANSWER_TIMEOUT, dedup_window: float = DEFAULT_DEDUP_WINDOW,
                 dedup_entries: int = DEFAULT_DEDUP_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self._pipeline = pipeline
        self._sink = sink
        self._metrics = metrics
        self._kafka_reachable = kafka_reachable
        self._max_queued = max_queued
        self._stall_after = stall_after
        self._dedup_window = dedup_window
        self._dedup_entries = dedup_entries
        self._clock = clock
        self._channels: dict[str, _Channel] = {}
        # (subscription id, uuid) -> (channel, timetoken, forget at): produced recently
        self._recent: OrderedDict[tuple[str, str], tuple[_Channel, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._seen_acknowledged = -1
        self._progress_at = clock()

    def __call__(self, delivery: WebhookDelivery, deadline: float) -> bool:
        self._metrics.received_by_transport["webhook"].inc()
        subscription_id = delivery.subscription.subscription_id
        key = (subscription_id, delivery.uuid) if delivery.uuid else None
        with self._lock:
            now = self._clock()
            self._forget_old(now)
            stalled = self._stalled(now)
            seen = self._recent.get(key) if key is not None else None
            if seen is None and len(self._sink.producer) >= self._max_queued:
                return False  # local queue full: nothing produced, RingCentral is told to come back
            channel = seen[0] if seen is not None else self._channel(delivery.subscription)
        if seen is not None:
            timetoken = seen[1]
            if channel.progress.acked_tt >= timetoken:
                self._metrics.notifications_duplicate.inc()
                return True
        else:
            timetoken = self._produce(channel, delivery)
            if key is not None:
                with self._lock:
                    self._recent[key] = (channel, timetoken, self._clock() + self._dedup_window)
        if stalled:
            return False  # produced all the same (it may land), but no waiting on a Kafka that does not answer
        return self._wait(channel.progress, timetoken, deadline)

    def _channel(self, subscription: WebhookSubscription) -> _Channel:
        """The subscription's channel, made on its first delivery (lock held)."""
        channel = self._channels.get(subscription.subscription_id)
        if channel is None:
            channel = self._channels[subscription.subscription_id] = _Channel(subscription)
        return channel

    def _produce(self, channel: _Channel, delivery: WebhookDelivery) -> int:
        with channel.lock:  # timetokens reach the sink in increasing order, as its watermark needs
            timetoken = channel.next_timetoken(delivery.received_at)
            outcome = self._pipeline.process(delivery.body, channel.context, timetoken)
            self._sink.send(outcome, channel.progress, timetoken, delivery.received_at)
        return timetoken

    def _stalled(self, now: float) -> bool:
        """Kafka unreachable, or records queued and none acknowledged for `stall_after` s (lock held)."""
        acknowledged, queued = self._sink.acknowledged, len(self._sink.producer)
        if acknowledged != self._seen_acknowledged or queued == 0:
            self._seen_acknowledged, self._progress_at = acknowledged, now
        return now - self._progress_at > self._stall_after or not self._kafka_reachable()

    def _forget_old(self, now: float) -> None:
        recent = self._recent
        while recent and (len(recent) > self._dedup_entries or next(iter(recent.values()))[2] <= now):
            recent.popitem(last=False)

    @staticmethod
    def _wait(progress: _AckedProgress, timetoken: int, deadline: float) -> bool:
        with progress.acked:
            while progress.acked_tt < timetoken:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                progress.acked.wait(left)
        return True
