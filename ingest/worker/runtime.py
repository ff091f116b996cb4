"""The worker: wires the control plane (subscriptions) to the data plane (PubNub -> pipeline -> Kafka).

Threads: the SDK's message thread per PubNub connection runs the hot path (pipeline + produce); one
delivery thread serves Kafka acknowledgements; one checkpoint thread writes the state topic and
watches Kafka; the subscription manager has its own scheduler. The data plane never calls RingCentral:
it only learns from `on_delivery` which channel to read with which key.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka.admin import AdminClient

from ingest.catalogue import default_catalogue
from ingest.config import Config
from ingest.health import HealthServer, Heartbeats
from ingest.logs import get_logger
from ingest.metrics import Metrics, SpecMetrics
from ingest.model import Delivery
from ingest.pipeline import ChannelContext, Pipeline, TopicNames
from ingest.rc.accounts import build_sessions
from ingest.rc.subscriptions import SubscriptionManager
from ingest.sink import KafkaSink, SpecProgress
from ingest.state import SpecState, restore
from ingest.topics import COMPACTED, ensure_topics
from ingest.transport import OLD_CHANNEL_GRACE_SECONDS, PubNubTransport, TransportSettings

log = get_logger(__name__)

KAFKA_CHECK_INTERVAL = 5.0


@dataclass
class _Route:
    """Everything the hot path needs for one channel, looked up once per message."""

    context: ChannelContext
    progress: SpecProgress
    spec_metrics: SpecMetrics


class Worker:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.worker_id = config.worker.id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics or Metrics()
        catalogue = default_catalogue()
        self.topics = TopicNames(config.topics.prefix, config.topics.routing, catalogue)
        self.pipeline = Pipeline(catalogue, self.topics)
        self.sink = KafkaSink(config.kafka, self.metrics)
        self.transport = PubNubTransport(
            TransportSettings(user_id=self.worker_id, origin=config.ringcentral.pubnub_origin,
                              ssl=config.ringcentral.pubnub_ssl,
                              channels_per_connection=config.worker.channels_per_connection),
            handler=self._on_message, metrics=self.metrics, on_access_denied=self._on_access_denied)
        self.heartbeats = Heartbeats()
        self.health = HealthServer(self.metrics, config.metrics.host, config.metrics.port,
                                   liveness=self.heartbeats.check, readiness=self._readiness)
        self.manager: SubscriptionManager | None = None
        self._routes: dict[str, _Route] = {}  # channel -> route (read lock-free on the hot path)
        self._deliveries: dict[str, Delivery] = {}  # spec id -> current delivery
        self._progress: dict[str, SpecProgress] = {}
        self._restored: dict[str, SpecState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._kafka_ok = False
        self._checkpoint_thread: threading.Thread | None = None
        self._received = self.metrics.notifications_received

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        log.info("worker.starting", worker=self.worker_id, specs=len(cfg.specs()),
                 guarantee=cfg.worker.delivery_guarantee)
        self.health.start()
        admin = AdminClient(dict(cfg.kafka))
        partitions, replication = cfg.topics.partitions, cfg.topics.replication_factor
        ensure_topics(admin, self.topics.all_output_topics(), partitions=partitions, replication_factor=replication)
        ensure_topics(admin, [self.topics.state], partitions=partitions, replication_factor=replication,
                      config=COMPACTED)
        self._kafka_ok = True
        self.metrics.kafka_up.set(1)
        self._restored = restore(dict(cfg.kafka), self.topics.state)
        log.info("worker.state_restored", specs=len(self._restored))
        self.sink.start()
        self.transport.start()
        self.manager = SubscriptionManager(
            accounts=build_sessions(cfg, self.metrics), metrics=self.metrics, on_delivery=self._on_delivery,
            renewal_margin=cfg.worker.renewal_margin_seconds, renewal_jitter=cfg.worker.renewal_jitter_seconds,
            expires_in=cfg.worker.expires_in_seconds)
        self.manager.set_specs(cfg.specs(), {s: st.subscription_id for s, st in self._restored.items()})
        self.manager.start()
        self._checkpoint_thread = threading.Thread(target=self._checkpoint_loop, name="checkpoint", daemon=True)
        self._checkpoint_thread.start()
        log.info("worker.started", worker=self.worker_id, metrics_port=self.health.port)

    def stop(self, delete_subscriptions: bool | None = None) -> int:
        """Graceful stop: intake first, then flush within the timeout, then the last checkpoint.

        Returns the number of records Kafka had not acknowledged when the flush timed out (0 = clean).
        Subscriptions stay alive for the next start unless asked to delete them.
        """
        cfg = self.config.worker
        delete = cfg.delete_subscriptions_on_shutdown if delete_subscriptions is None else delete_subscriptions
        log.info("worker.stopping", delete_subscriptions=delete)
        self.transport.stop()
        undelivered = self.sink.flush(cfg.shutdown_timeout_seconds)
        self._stop.set()
        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join(5)
        self._write_checkpoints()
        self.sink.flush(min(5.0, cfg.shutdown_timeout_seconds))
        if self.manager is not None:
            self.manager.stop(delete_subscriptions=delete)
        self.sink.close()
        self.health.stop()
        log.info("worker.stopped", undelivered=undelivered)
        return undelivered

    # ---- control plane -> data plane -----------------------------------------------------------

    def _on_delivery(self, spec_id: str, delivery: Delivery | None) -> None:
        with self._lock:
            previous = self._deliveries.get(spec_id)
            if delivery is None:
                self._forget(spec_id, previous)
                return
            self._deliveries[spec_id] = delivery
            progress = self._progress.get(spec_id)
            restored = self._restored.get(spec_id)
            if progress is None:
                start_tt = restored.timetoken if restored and restored.channel == delivery.channel else 0
                progress = self._progress[spec_id] = SpecProgress(spec_id, start_tt, start_tt)
            old_route = self._routes.get(previous.channel) if previous else None
            # The previous context keeps the key before a rotation, for notifications still in flight.
            context = ChannelContext.from_delivery(delivery, previous=old_route.context if old_route else None)
            self._routes[delivery.channel] = _Route(context, progress, self.metrics.spec(spec_id))
            moved = previous is not None and (previous.channel, previous.subscriber_key) != (
                delivery.channel, delivery.subscriber_key)
            if previous is None or moved:
                resume = progress.acked_tt or None
                if previous is None and restored is not None and restored.channel != delivery.channel:
                    resume = None  # the channel changed while no one owned the spec: read it from the start
                self.transport.add_channel(delivery.subscriber_key, delivery.channel, resume)
            if moved and previous is not None:
                # The old channel may still hold notifications published before the renewal.
                self.transport.remove_channel(previous.channel, grace=OLD_CHANNEL_GRACE_SECONDS)
                threading.Timer(OLD_CHANNEL_GRACE_SECONDS + 1, self._drop_route, (previous.channel,)).start()
        log.info("worker.delivery", spec=spec_id, subscription=delivery.subscription_id,
                 moved=bool(previous and moved), rekeyed=bool(previous and previous.encryption_key !=
                                                               delivery.encryption_key))
        self._write_state(spec_id)

    def _forget(self, spec_id: str, previous: Delivery | None) -> None:
        self._deliveries.pop(spec_id, None)
        self._progress.pop(spec_id, None)
        if previous is not None:
            self.transport.remove_channel(previous.channel)
            self._routes.pop(previous.channel, None)
        self.metrics.forget_spec(spec_id)
        self.sink.produce_raw(self.topics.state, spec_id.encode(), None)  # tombstone

    def _drop_route(self, channel: str) -> None:
        with self._lock:
            if all(d.channel != channel for d in self._deliveries.values()):
                self._routes.pop(channel, None)

    def _on_access_denied(self, channels: list[str]) -> None:
        if self.manager is None:
            return
        for spec_id, d in list(self._deliveries.items()):
            if d.channel in channels:
                self.manager.report_problem(spec_id, "pubnub-access-denied")

    # ---- hot path ------------------------------------------------------------------------------

    def _on_message(self, channel: str, timetoken: int, payload: Any, received_at: float) -> None:
        route = self._routes.get(channel)
        if route is None:
            return
        self._received.inc()
        route.spec_metrics.last_notification.set(received_at)
        outcome = self.pipeline.process(payload, route.context, timetoken)
        self.sink.send(outcome, route.progress, timetoken, received_at)

    # ---- checkpoints and health ----------------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        interval = self.config.worker.checkpoint_interval_seconds
        next_kafka_check = 0.0
        self.heartbeats.register("checkpoint", max(10.0, interval * 5))
        while not self._stop.wait(interval):
            self.heartbeats.beat("checkpoint")
            try:
                self._write_checkpoints()
                if time.monotonic() >= next_kafka_check:
                    next_kafka_check = time.monotonic() + KAFKA_CHECK_INTERVAL
                    self._check_kafka()
            except Exception:
                log.error("worker.checkpoint_failed", exc_info=True)

    def _write_checkpoints(self) -> None:
        for spec_id, progress in list(self._progress.items()):
            if progress.acked_tt > progress.checkpointed_tt:
                self._write_state(spec_id)

    def _write_state(self, spec_id: str) -> None:
        delivery, progress = self._deliveries.get(spec_id), self._progress.get(spec_id)
        if delivery is None or progress is None:
            return
        acked = progress.acked_tt
        state = SpecState(spec_id, delivery.account_id, delivery.subscription_id, delivery.subscriber_key,
                          delivery.channel, acked, time.time(), self.worker_id)
        self.sink.produce_raw(self.topics.state, spec_id.encode(), state.encode())
        progress.checkpointed_tt = acked
        self.metrics.checkpoints.inc()

    def _check_kafka(self) -> None:
        try:
            self.sink.producer.list_topics(self.topics.state, timeout=3)
            ok = True
        except Exception:
            ok = False
        if ok != self._kafka_ok:
            log.warning("kafka.reachability_changed", reachable=ok)
        self._kafka_ok = ok
        self.metrics.kafka_up.set(1 if ok else 0)

    def _readiness(self) -> tuple[bool, str]:
        if not self._kafka_ok:
            return False, "kafka unreachable"
        if self.manager is None:
            return False, "starting"
        now = time.time()
        for status in self.manager.snapshot():
            if status.state not in {"active", "renewing"}:
                return False, f"subscription {status.spec_id} is {status.state}"
            if status.expires_at is None or status.expires_at <= now:
                return False, f"subscription {status.spec_id} has expired"
        return True, "ok"
