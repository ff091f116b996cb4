"""The worker's transports, chosen once from the config: PubNub (the first transport, always there),
WebSocket for `transport: websocket` accounts, and the WebHook receiver when `webhook:` is configured.

The worker sees one `Transport` (`Intake.transport`) and one batch handler; each transport's batches
reach the handler labelled with the transport's name (the metrics' `transport` label). A new transport
is one more branch here, none in the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ingest.config import Config
from ingest.coordination.keywrap import KeyWrapper
from ingest.model import Delivery
from ingest.observability.metrics import Metrics
from ingest.transports.base import BatchHandler, Received, Transport
from ingest.transports.pubnub import PubNubTransport, TransportSettings
from ingest.transports.webhook import StateTableFeed, WebhookTransport
from ingest.transports.websocket import Gap, WebSocketTransport, WithWebSocket
from ingest.worker.channels import SpecChannels

# A batch, when it arrived (unix seconds), and the name of the transport that read it.
LabelledHandler = Callable[[list[Received], float, str], None]


def _labelled(handler: LabelledHandler, name: str) -> BatchHandler:
    return lambda batch, received_at: handler(batch, received_at, name)


class Intake:
    def __init__(self, config: Config, handler: LabelledHandler, metrics: Metrics, *,
                 kafka_reachable: Callable[[], bool], state_topic: str) -> None:
        w, rc = config.worker, config.ringcentral
        self._group = w.coordination == "group"
        self.pubnub = PubNubTransport(
            TransportSettings(user_id=w.id, origin=rc.pubnub_origin, ssl=rc.pubnub_ssl,
                              channels_per_connection=w.channels_per_connection,
                              replay_buffer_messages=w.replay_buffer_messages, client=w.pubnub_client),
            handler=_labelled(handler, "pubnub"), metrics=metrics)
        self.websocket = WebSocketTransport(_labelled(handler, "websocket"), metrics, on_gap=self._on_websocket_gap) \
            if any(a.transport == "websocket" for a in config.accounts) else None
        # `webhook:` configured: RingCentral POSTs every account's notifications to the receiver.
        self.webhook = None if config.webhook is None else WebhookTransport(
            config.webhook, _labelled(handler, "webhook"), metrics, kafka_reachable=kafka_reachable)
        # In a group every pod checks any delivery against the tokens the owners record in the state topic.
        self.feed = None if self.webhook is None or not self._group else StateTableFeed(
            config.kafka, state_topic, self.webhook.table, KeyWrapper(rc.client_secret))
        self.transport: Transport = self.webhook or (
            self.pubnub if self.websocket is None else WithWebSocket(self.pubnub, self.websocket))
        self._channels: SpecChannels | None = None

    def attach(self, channels: SpecChannels) -> None:
        """Where the transports report what they could not read."""
        self._channels = channels
        self.pubnub.on_access_denied = channels.on_access_denied
        self.pubnub.on_replay_gap = channels.on_replay_gap
        if self.websocket is not None:
            self.websocket.recorded_sessions = self._recorded_session
        if self.webhook is not None and self._group:  # a Service hands any pod any delivery
            self.webhook.read_foreign = lambda s: channels.read_foreign(s.spec_id, s.account_id, s.subscription_id)
            self.webhook.table.removed = channels.forget_foreign

    def load(self, until_kafka_answers: Callable[[str, Callable[[], None]], None]) -> None:
        """Before the transport starts: load the WebHook table from the state topic (group mode)."""
        if self.feed is not None:
            until_kafka_answers("load the WebHook subscription table", self.feed.start)

    def stop(self) -> None:
        if self.feed is not None:
            self.feed.stop()

    def on_delivery(self, spec_id: str, delivery: Delivery | None) -> None:
        if self.webhook is not None:  # the receiver checks deliveries against the current token
            self.webhook.table.apply(spec_id, delivery)

    def not_ready(self) -> str | None:
        if self.webhook is not None and not self.webhook.server.listening():
            return "webhook receiver not listening"
        if self.feed is not None and not self.feed.ready():
            return "webhook subscription table not loaded"
        return None

    def _on_websocket_gap(self, channel: str, gap: Gap) -> None:
        """RingCentral did not keep what a WebSocket session missed (recovery failed, too late, or beyond its
        recovery buffer: `missed` says how many when the sequences tell). After a
        restart or a handover the spec has no delivery yet (the recorded session is being recovered): its
        restored record names the channel."""
        channels = self._channels
        if channels is None:
            return
        with channels.lock:
            specs = {spec_id for spec_id, d in channels.deliveries.items() if d.channel == channel}
            specs |= {spec_id for spec_id, st in channels.restored.items()
                      if st.channel == channel and spec_id not in channels.deliveries}
        for spec_id in specs:
            channels.report_gap(spec_id, gap.lost_subscription_id or "", gap.since, gap.until,
                                f"websocket {gap.reason}: RingCentral did not keep what the session missed",
                                missed=gap.missed)

    def _recorded_session(self, channel: str) -> dict[str, Any] | None:
        """The WebSocket session the restored state record of `channel` holds (restart, handover)."""
        channels = self._channels
        if channels is None:
            return None
        with channels.lock:
            return next((st.session for st in channels.restored.values() if st.channel == channel), None)
