"""The worker: wires the control plane (subscriptions) to the data plane (transport -> pipeline -> Kafka).

Two choices are made once, at construction, each an object behind one interface:
- ownership (`worker.coordination`): `Standalone` owns every spec of its config; `Group` shares the
  spec topic with other workers through a consumer group (worker/ownership.py);
- checkpointing (`worker.delivery_guarantee`): state records after Kafka's acknowledgement
  (at-least-once) or notifications and checkpoints in one transaction (exactly-once)
  (worker/checkpointing.py).
The channels read per spec, their drains and lapses live in `SpecChannels` (worker/channels.py).

Threads: the transport's intake threads run the hot path (`_on_notifications`: pipeline + produce);
one delivery thread serves Kafka acknowledgements; the subscription manager has its own scheduler;
the checkpoint thread calls `Checkpoints.on_interval`; the restart-windows thread ends drains and
lapses; in group mode the membership thread owns the spec consumer. The data plane never calls
RingCentral: it only learns from `_on_delivery` which channel to read with which key.
"""

from __future__ import annotations

import threading
import time

from confluent_kafka.admin import AdminClient

from ingest.config import Config
from ingest.coordination.keywrap import KeyWrapper
from ingest.data.catalogue import default_catalogue
from ingest.data.pipeline import Pipeline
from ingest.data.sink import KafkaSink
from ingest.model import Delivery
from ingest.observability.health import (
    HealthServer,
    Heartbeats,
    KafkaReachability,
    SubscriptionRow,
    readiness_check,
)
from ingest.observability.kafka_logs import kafka_log_config, serve_logs
from ingest.observability.logs import get_logger
from ingest.observability.metrics import Metrics
from ingest.rc.accounts import build_sessions
from ingest.rc.subscriptions import STATES, SubscriptionManager
from ingest.topology import COMPACTED, TopicNames, ensure_topics
from ingest.transports.base import Received
from ingest.worker import checkpointing, ownership
from ingest.worker.channels import Route, SpecChannels
from ingest.worker.intake import Intake

log = get_logger(__name__)

KAFKA_CHECK_INTERVAL = 5.0
STARTUP_KAFKA_TIMEOUT = 10.0
# A subscription that is live but whose renewal is failing still delivers until it expires.
READY_STATES = frozenset(STATES) - {"pending", "failed", "deleted"}
RESTART_WINDOWS_CHECK_SECONDS = 0.5  # how often drains and lapses are looked at


class Worker:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        w = config.worker
        self.worker_id = w.id
        self.metrics = metrics or Metrics()
        catalogue = default_catalogue()
        self.topics = TopicNames(config.topics.prefix, config.topics.routing, catalogue)
        self.pipeline = Pipeline(catalogue, self.topics)
        self.kafka = KafkaReachability(self.metrics)
        self.intake = Intake(config, self._on_notifications, self.metrics, kafka_reachable=lambda: self.kafka.ok,
                             state_topic=self.topics.state)
        self.channels = SpecChannels(w, self.metrics, self.intake.transport,
                                     KeyWrapper(config.ringcentral.client_secret), threading.RLock())
        self.intake.attach(self.channels)
        self.checkpoints = checkpointing.for_config(config, self.metrics, topics=self.topics, channels=self.channels,
                                                    transport=self.intake.transport,
                                                    keep_waiting=self._waiting_on_kafka)
        self.ownership = ownership.for_config(config, self.metrics, topics=self.topics, channels=self.channels,
                                              checkpoints=self.checkpoints)
        self.heartbeats = Heartbeats()
        self._subscriptions_ready = readiness_check(lambda: self.kafka.ok, self._subscription_rows,
                                                    ready_states=READY_STATES)
        self.health = HealthServer(self.metrics, config.metrics.host, config.metrics.port, liveness=self._liveness,
                                   readiness=self._readiness)
        self.manager: SubscriptionManager | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Set once ownership has handed its specs to the manager (standalone: after restoring the state
        # topic): until then the worker owns nothing yet, and readiness says "starting", not "ready".
        self._owning = threading.Event()

    @property
    def sink(self) -> KafkaSink:
        return self.checkpoints.sink

    @sink.setter
    def sink(self, sink: KafkaSink) -> None:
        """Replace the sink before `start()` (tests give one a setting the config refuses)."""
        self.checkpoints.sink = sink

    # ---- lifecycle -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask a `start()` that is still waiting for Kafka to give up (signal handlers call this)."""
        self._stop.set()

    def start(self) -> None:
        cfg = self.config
        log.info("worker.starting", worker=self.worker_id, coordination=cfg.worker.coordination,
                 guarantee=cfg.worker.delivery_guarantee)
        self.health.start()
        self.kafka.until_answers("create topics", self._ensure_topics, self._stop)
        self.kafka.report(True, quiet=True)
        self.kafka.until_answers("start the producer", self.sink.start, self._stop)
        self.intake.load(lambda what, step: self.kafka.until_answers(what, step, self._stop))
        self.channels.transport.start()
        self.manager = self.channels.manager = SubscriptionManager(
            accounts=build_sessions(cfg, self.metrics, websocket=self.intake.websocket), metrics=self.metrics,
            on_delivery=self._on_delivery,
            renewal_margin=cfg.worker.renewal_margin_seconds, renewal_jitter=cfg.worker.renewal_jitter_seconds,
            expires_in=cfg.worker.expires_in_seconds, adopt_matching=self.ownership.adopt_matching,
            webhook_address=cfg.webhook.address if cfg.webhook is not None else None)
        self.manager.start()
        self.ownership.start(self.manager, lambda what, step: self.kafka.until_answers(what, step, self._stop))
        self._owning.set()
        for name, loop in (("checkpoint", self._checkpoint_loop), ("drains", self._restart_windows_loop)):
            thread = threading.Thread(target=loop, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("worker.started", worker=self.worker_id, metrics_port=self.health.port)

    def _ensure_topics(self) -> None:
        cfg = self.config
        admin = serve_logs(AdminClient({**cfg.kafka, **kafka_log_config()}))
        partitions, replication = cfg.topics.partitions, cfg.topics.replication_factor
        # A short first timeout: an unreachable Kafka is reported (and retried) within seconds.
        ensure_topics(admin, self.topics.all_output_topics(), partitions=partitions, replication_factor=replication,
                      timeout=STARTUP_KAFKA_TIMEOUT)
        ensure_topics(admin, self.ownership.compacted_topics(), partitions=cfg.topics.spec_partitions,
                      replication_factor=replication, config=COMPACTED)

    def stop(self, delete_subscriptions: bool | None = None) -> int:
        """Graceful stop: intake first, then flush within the timeout, then the last checkpoint.

        Returns the number of records Kafka had not acknowledged when the flush timed out (0 = clean).
        Subscriptions stay alive for the next start unless asked to delete them.
        """
        cfg = self.config.worker
        delete = cfg.delete_subscriptions_on_shutdown if delete_subscriptions is None else delete_subscriptions
        log.info("worker.stopping", delete_subscriptions=delete)
        self.channels.transport.stop()
        self.intake.stop()
        self.ownership.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        undelivered = self.sink.flush(cfg.shutdown_timeout_seconds)
        self.ownership.after_flush()
        if self.manager is not None:
            self.manager.stop(delete_subscriptions=delete)
        self.sink.close()
        self.health.stop()
        log.info("worker.stopped", undelivered=undelivered)
        return undelivered

    # ---- control plane -> data plane -----------------------------------------------------------

    def _on_delivery(self, spec_id: str, delivery: Delivery | None) -> None:
        self.intake.on_delivery(spec_id, delivery)
        if delivery is None:  # the spec was removed
            self.channels.drop(spec_id)
            self.checkpoints.remove(spec_id)
            return
        self.channels.deliver(spec_id, delivery)
        self.ownership.delivered(spec_id)
        self.checkpoints.spec_changed(spec_id)

    def _restart_windows_loop(self) -> None:
        while not self._stop.wait(RESTART_WINDOWS_CHECK_SECONDS):
            try:
                self.channels.check_restart_windows()
            except Exception:
                log.error("worker.drain_check_failed", exc_info=True)

    # ---- hot path ------------------------------------------------------------------------------

    def _on_notifications(self, batch: list[Received], received_at: float, transport: str) -> None:
        routes = self.channels.routes
        touched: dict[Route, int] = {}  # route -> notifications of this batch
        received = 0
        for notification in batch:
            route = routes.get(notification.channel)
            if route is None:
                continue  # its spec was dropped while the response was in flight
            received += 1
            touched[route] = touched.get(route, 0) + 1
            outcome = self.pipeline.process(notification.payload, route.context, notification.position)
            self.checkpoints.produce(outcome, route.progress, notification, received_at)
        # Metrics once per batch: per message they cost more than decryption (docs/benchmarks.md).
        for route, count in touched.items():
            route.spec_metrics.last_notification.set(received_at)
            route.progress.unrecorded += count  # sets how soon its next state record comes (checkpointing)
        self.metrics.received_by_transport[transport].inc(received)

    # ---- checkpoints and health ----------------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        interval = self.config.worker.checkpoint_interval_seconds
        next_kafka_check = 0.0
        self.heartbeats.register("checkpoint", max(10.0, interval * 5))
        while not self._stop.wait(interval):
            self.heartbeats.beat("checkpoint")
            try:
                self.checkpoints.on_interval()
                if time.monotonic() >= next_kafka_check:
                    next_kafka_check = time.monotonic() + KAFKA_CHECK_INTERVAL
                    self.kafka.check(self.sink.producer, self.topics.state)
            except Exception:
                log.error("worker.checkpoint_failed", exc_info=True)

    def _waiting_on_kafka(self) -> bool:
        """A transaction call on the checkpoint loop timed out (Kafka down or slow): the loop is alive,
        so it beats its heartbeat; it calls again unless the worker is stopping. Kafka counts as
        unreachable meanwhile (the loop's own check waits for the commit)."""
        self.heartbeats.beat("checkpoint")
        self.kafka.report(False)
        return not self._stop.is_set()

    @property
    def failed(self) -> str | None:
        """Why the worker cannot go on (fenced, its producer failed for good, or its group membership
        thread died), or None: the process should stop and be started again (`ingest run` exits 3)."""
        return self.checkpoints.fatal_error or self.sink.fatal_error or self.ownership.error

    def subscriptions_serving(self) -> int:
        """How many owned subscriptions are active with their channel read by the transport: the one
        public "is it serving" check (tests and operators wait on it)."""
        if self.manager is None:
            return 0
        return self.channels.serving({s.spec_id for s in self.manager.snapshot() if s.state == "active"})

    def _liveness(self) -> tuple[bool, str]:
        failed = self.failed
        return (False, failed) if failed else self.heartbeats.check()

    def _readiness(self) -> tuple[bool, str]:
        not_ready = self.intake.not_ready()
        return (False, not_ready) if not_ready else self._subscriptions_ready()

    def _subscription_rows(self) -> list[SubscriptionRow] | None:
        if self.manager is None or not self._owning.is_set():
            return None  # starting
        return [(s.spec_id, s.state, s.expires_at) for s in self.manager.snapshot() if s.state != "deleted"]
