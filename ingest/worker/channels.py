"""The channels a worker reads, per spec: what the control plane announced (`Delivery`), where each
channel's notifications go (`Route`, read lock-free by the hot path), the delivery progress, the
former channels still draining after a restart or a move at renewal, and the lapses to measure.

The control plane changes it through `deliver` / `drop`; the transport reports gaps and denied
channels; the restart-windows thread ends drains and lapses (`check_restart_windows`). Checkpoints
are not written here: `changed(spec_id)` tells the checkpointing that a spec's record is due.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Gauge

from ingest.config import WorkerConfig
from ingest.coordination.keywrap import KeyWrapper, UnwrapError
from ingest.coordination.state import RecordedChannel, SpecState
from ingest.data.pipeline import ChannelContext
from ingest.data.sink import SpecProgress
from ingest.model import Delivery
from ingest.observability.logs import get_logger
from ingest.observability.metrics import Metrics, SpecMetrics
from ingest.rc.subscriptions import CLOCK_SKEW_SECONDS, SubscriptionManager
from ingest.transports.base import Transport
from ingest.transports.pubnub import timetoken_at

log = get_logger(__name__)

# A former channel (after a restart, or a move at renewal) is drained once the transport has said it holds nothing
# more for it, everything read is checkpointed, and neither has moved for this long (and at least two checkpoint
# intervals, so that an exactly-once checkpoint is committed).
DRAIN_QUIET_SECONDS = 5.0
# A former channel refused by PubNub (403) for this long is given up, and what it held reported as a gap.
# One refusal is not enough: a one-off 403 (the soak's) ended drains whose channels PubNub still held,
# and the transport replaces a refused connection every 5 s (PubNub caches a 403 that long).
DRAIN_REFUSED_SECONDS = 30.0
# A foreign channel's spec is the owner's to report (its last-notification age feeds an alert): what is
# received here for it goes to a gauge no registry exports.
_FOREIGN_SPEC_METRICS = SpecMetrics(Gauge("ingest_foreign_last_notification", "not exported", registry=None))


@dataclass(eq=False)  # hashed by identity: the hot path collects the routes a batch touched
class Route:
    """Everything the hot path needs for one channel, looked up once per message."""

    context: ChannelContext
    progress: SpecProgress
    spec_metrics: SpecMetrics


@dataclass(eq=False)
class Drain:
    """A spec's former channel, read until nothing is left on it, and recorded in the state record's
    `draining` meanwhile, so that a restart reads it on from its checkpoint.

    After a restart it is read from its recorded checkpoint with a progress of its own, recorded apart
    from the current channel's, so no checkpoint moves past what it still holds unread. After a move at
    renewal it shares the spec's progress (`shared`): the spec's checkpoint already waits for it."""

    recorded: RecordedChannel
    progress: SpecProgress
    observed: tuple[int, int]  # (read up to, checkpointed up to that) when last looked at
    quiet_since: float  # monotonic: since when `observed` has not changed
    shared: bool = False
    checkpoint_before: int = 0  # exactly-once: the checkpoint before the open transaction wrote one
    refused_since: float | None = None  # monotonic: the first 403 on this channel since it was last read


class SpecChannels:
    """The per-spec tables of the data plane (see the module docstring); everything that changes them
    holds `lock`, except the hot path, which only reads `routes`."""

    def __init__(self, settings: WorkerConfig, metrics: Metrics, transport: Transport, keys: KeyWrapper,
                 lock: threading.RLock) -> None:
        self.settings = settings
        self.metrics = metrics
        self.transport = transport
        self.keys = keys
        self.lock = lock  # the worker's: control-plane callbacks, checkpoints and ownership share it
        self.manager: SubscriptionManager | None = None  # set once the control plane runs
        self.changed: Callable[[str], None] = lambda spec_id: None  # a spec's state record is due now
        self.routes: dict[str, Route] = {}  # channel -> route (read lock-free on the hot path)
        self.deliveries: dict[str, Delivery] = {}  # spec id -> current delivery
        self.progress: dict[str, SpecProgress] = {}
        self.restored: dict[str, SpecState] = {}
        self.wrapped_keys: dict[str, str] = {}  # spec id -> the current delivery's key, wrapped
        # spec id -> the current WebHook subscription's verification token, wrapped (every pod's receiver reads it)
        self.wrapped_tokens: dict[str, str] = {}
        self.drains: dict[str, dict[str, Drain]] = {}  # spec id -> former channel -> its drain
        # spec id -> (when its subscription expired, that subscription's id, the replacement's delivery)
        # spec id -> (since when, the lapsed subscription's id, the replacement's delivery, "expired" or
        # "gone" as in Delivery.lapse_reason)
        self.lapses: dict[str, tuple[float, str, Delivery, str | None]] = {}
        # (spec id, subscription id, unread channel?) -> the window last reported as a gap of that kind for it
        self._gaps_reported: dict[tuple[str, str, bool], tuple[float, float]] = {}
        self.last_state: dict[str, float] = {}  # spec id -> when its state record was last written (monotonic)
        # Group mode: spec id -> when this worker began creating a subscription for it (its intent, in every
        # state record of the spec until the delivery of what it created: SpecState.creating_since).
        self.creating: dict[str, float] = {}
        # Group mode: spec id -> a subscription created for it and not announced yet (its delivery), with the
        # timetoken its channel is read from (the intent's, less the clock skew). Every state record of the spec
        # names it, channel and key, from before it is read until its delivery (`Checkpoints.record_creation`).
        self.created: dict[str, tuple[Delivery, int]] = {}
        # WebHook in a group: channel (subscription id) -> the progress of deliveries received here for a
        # spec another worker owns. Produced like the owner's, acknowledged once in Kafka (exactly-once:
        # committed), but never checkpointed here: the owner's state record is the spec's.
        self.foreign: dict[str, SpecProgress] = {}

    def progress_snapshot(self) -> list[tuple[str, SpecProgress]]:
        with self.lock:  # control-plane callbacks add and drop specs concurrently
            return list(self.progress.items())

    def foreign_snapshot(self) -> list[tuple[str, SpecProgress]]:
        with self.lock:
            return list(self.foreign.items())

    def serving(self, active: set[str]) -> int:
        """How many of these active specs have their current channel read by the transport."""
        reading = self.transport.reading()
        with self.lock:
            return sum(1 for spec_id, d in self.deliveries.items() if spec_id in active and d.channel in reading)

    # ---- control plane -> data plane -----------------------------------------------------------

    def deliver(self, spec_id: str, delivery: Delivery) -> None:
        """Read the spec's (new) channel; a former one is drained, a restored checkpoint resumed."""
        with self.lock:
            if delivery.channel in self.foreign:  # now ours (a handover): read with the spec's own progress
                self.forget_foreign(delivery.channel)
            previous = self.deliveries.get(spec_id)
            self.deliveries[spec_id] = delivery
            self.creating.pop(spec_id, None)  # the next record names what the creation made, channel and all
            self.created.pop(spec_id, None)  # announced: recorded as the current delivery from now on
            previous_key = self.wrapped_keys.get(spec_id)
            self.wrapped_keys[spec_id] = self.wrap_key(spec_id, delivery)
            if delivery.verification_token:
                self.wrapped_tokens[spec_id] = self.keys.wrap(delivery.verification_token, spec_id,
                                                              delivery.subscription_id)
            self.drains.get(spec_id, {}).pop(delivery.channel, None)  # moved back: no longer a former channel
            progress = self.progress.get(spec_id)
            old_route = self.routes.get(previous.channel) if previous else None
            old_context = old_route.context if old_route else None
            lapse = (delivery.lapsed_since, delivery.lapse_reason)
            lapsed_id = previous.subscription_id if previous else ""
            if progress is None:
                restored = self.restored.get(spec_id)
                progress, old_context = self._resume(spec_id, restored, delivery)
                self.progress[spec_id] = progress
                if restored is not None:
                    lapsed_id = restored.subscription_id
                    if lapse[0] is None:
                        lapse = _lapsed_before(restored, delivery)
            if lapse[0] is not None:
                self.lapses[spec_id] = (lapse[0], lapsed_id, delivery, lapse[1])
            # The previous context keeps the key before a rotation, for notifications still in flight
            # (or, after a restart, still unread since the checkpoint).
            context = ChannelContext.from_delivery(delivery, previous=old_context)
            self.routes[delivery.channel] = Route(context, progress, self.metrics.spec(spec_id))
            moved = previous is not None and (previous.channel, previous.subscriber_key) != (
                delivery.channel, delivery.subscriber_key)
            if previous is None or moved:
                self.transport.add_channel(delivery.subscriber_key, delivery.channel, progress.checkpointed_tt or None)
            if moved and previous is not None:
                # The old channel may still hold notifications published before the renewal: read on
                # (its route stays) until drained, however long PubNub takes to hand them over.
                former = RecordedChannel(previous.subscription_id, previous.subscriber_key, previous.channel,
                                         progress.checkpointed_tt, previous_key)
                self.drains.setdefault(spec_id, {})[previous.channel] = Drain(
                    former, progress, (0, 0), time.monotonic(), shared=True)
        log.info("worker.delivery", spec=spec_id, subscription=delivery.subscription_id, moved=bool(moved),
                 rekeyed=bool(previous and previous.encryption_key != delivery.encryption_key))

    def wrap_key(self, spec_id: str, delivery: Delivery) -> str:
        """The delivery's AES key as a state record holds it: wrapped; "" when unencrypted."""
        key = delivery.encryption_key
        return self.keys.wrap(key, spec_id, delivery.channel) if key else ""

    def _resume(self, spec_id: str, restored: SpecState | None,
                delivery: Delivery) -> tuple[SpecProgress, ChannelContext | None]:
        """The first delivery of a spec here: resume its channel from the recorded checkpoint, and
        drain every other recorded channel (its subscription gone, or rotated away) from its own.
        Returns the progress, and the recorded context of the same channel (its key may have rotated
        at the first renewal: what is unread since the checkpoint was encrypted with the recorded one).
        A channel no record names, of a spec whose record holds an intent, is read from the intent's
        time: it may be the subscription the intent's creator made and died before recording (adopted,
        `SubscriptionManager`), and all it ever held is then read; a channel created just now holds nothing older."""
        start_tt, recorded_context = 0, None
        if restored is not None and restored.creating_since is not None:
            start_tt = timetoken_at(restored.creating_since - CLOCK_SKEW_SECONDS)
        for former in restored.recorded_channels() if restored else []:
            assert restored is not None
            if former.channel == delivery.channel:
                start_tt = former.timetoken
                # Only a fallback: the current key reads the channel too, unless it rotated.
                with contextlib.suppress(UnwrapError):
                    recorded_context = self._recorded_context(spec_id, restored, former)
            else:
                self._start_drain(spec_id, restored, former)
        return SpecProgress(spec_id, start_tt, start_tt, start_tt), recorded_context

    def _recorded_context(self, spec_id: str, restored: SpecState, former: RecordedChannel) -> ChannelContext:
        """The context to read a recorded channel with (UnwrapError: its key cannot be unwrapped)."""
        if former.wrapped_key is None:
            raise UnwrapError("the state record does not hold its key (written by an older version)")
        key = self.keys.unwrap(former.wrapped_key, spec_id, former.channel) if former.wrapped_key else None
        return ChannelContext.from_delivery(Delivery(spec_id, restored.account_id, former.subscription_id,
                                                     former.subscriber_key, former.channel, key, restored.expires_at))

    def _start_drain(self, spec_id: str, restored: SpecState, former: RecordedChannel) -> None:
        """Read a former channel from its checkpoint, with its own progress (lock held); a channel
        whose key cannot be unwrapped is a gap: from its checkpoint until its subscription ended."""
        try:
            context = self._recorded_context(spec_id, restored, former)
        except UnwrapError as exc:
            ended = min(restored.expires_at, time.time()) if restored.expires_at else time.time()
            self.report_gap(spec_id, former.subscription_id, former.timetoken / 1e7, ended,
                            f"recorded channel not readable: {exc}", unread_channel=True)
            return
        # Nothing of it checkpointed yet: from as far back as PubNub holds.
        tt = former.timetoken or timetoken_at(time.time() - self.settings.replay_buffer_seconds)
        progress = SpecProgress(spec_id, tt, tt, tt)
        self.drains.setdefault(spec_id, {})[former.channel] = Drain(former, progress, (tt, tt), time.monotonic())
        self.routes[former.channel] = Route(context, progress, self.metrics.spec(spec_id))
        self.transport.add_channel(former.subscriber_key, former.channel, tt)
        log.info("replay.draining", spec=spec_id, subscription_id=former.subscription_id, since=tt / 1e7)

    def stop_reading(self, spec_id: str) -> None:
        """Stop intake for a spec that is being handed over (its last checkpoint then covers all read)."""
        delivery = self.deliveries.get(spec_id)
        if delivery is not None:
            self.transport.remove_channel(delivery.channel)
        for channel in self.drains.get(spec_id, {}):
            self.transport.remove_channel(channel)

    def drop(self, spec_id: str) -> None:
        """Forget a spec locally (removed, or handed to another worker)."""
        with self.lock:
            previous = self.deliveries.pop(spec_id, None)
            self.progress.pop(spec_id, None)
            self.restored.pop(spec_id, None)
            self.last_state.pop(spec_id, None)
            self.creating.pop(spec_id, None)
            self.created.pop(spec_id, None)
            self.wrapped_keys.pop(spec_id, None)
            self.wrapped_tokens.pop(spec_id, None)
            self.lapses.pop(spec_id, None)
            for channel in self.drains.pop(spec_id, {}):
                self.transport.remove_channel(channel)
                self.routes.pop(channel, None)
            if previous is not None:
                self.transport.remove_channel(previous.channel)
                self.routes.pop(previous.channel, None)
        self.metrics.forget_spec(spec_id)

    # ---- WebHook in a group: deliveries of specs another worker owns ---------------------------

    def read_foreign(self, spec_id: str, account_id: str, channel: str) -> None:
        """Produce what arrives on `channel` (a subscription of a spec this worker does not own: a
        Service hands any pod any delivery) with a progress of its own, which writes no state record."""
        with self.lock:
            if channel in self.routes:
                return  # ours, or already read as foreign
            delivery = Delivery(spec_id, account_id, channel, "", channel, None, 0.0, transport="WebHook")
            progress = self.foreign[channel] = SpecProgress(spec_id)
            self.routes[channel] = Route(ChannelContext.from_delivery(delivery), progress, _FOREIGN_SPEC_METRICS)
            self.transport.add_channel("", channel)
        log.info("webhook.foreign_channel", spec=spec_id, subscription_id=channel)

    def forget_foreign(self, channel: str) -> None:
        """Stop reading a foreign channel (its subscription is gone, or its spec became ours); requests
        still held on it are answered 503, and the sender retries them."""
        with self.lock:
            progress = self.foreign.pop(channel, None)
            if progress is None:
                return
            self.routes.pop(channel, None)
            self.transport.remove_channel(channel)

    # ---- gaps: windows whose notifications may be missing -------------------------------------

    def check_replay_gaps(self, restored: dict[str, SpecState]) -> None:
        """Say so when a checkpoint is older than what PubNub still holds: messages may be missing."""
        now = time.time()
        for spec_id, state in restored.items():
            if now - state.updated_at > self.settings.replay_buffer_seconds:
                oldest = min((c.timetoken for c in state.recorded_channels() if c.timetoken), default=state.timetoken)
                self.report_gap(spec_id, state.subscription_id, oldest / 1e7, now,
                                "checkpoint older than the replay buffer", unread_channel=True)

    def report_gap(self, spec_id: str, subscription_id: str, missing_from: float, missing_until: float,
                   reason: str, *, counted: bool = False, unread_channel: bool = False, **extra: object) -> None:
        """A window (unix seconds) whose notifications may be missing; `counted`: the metric already is.
        A subscription loses notifications in two ways: RingCentral delivered nothing to it (it lapsed,
        was gone, a WebSocket session was not recovered), or what its channel held could not be read
        (`unread_channel`: PubNub refused it or no longer held it, its key did not open). One loss is
        reported once: a window overlapping the last one of the same kind for the same subscription is
        the same loss seen twice (a failed WebSocket recovery is also a subscription "gone"). A lapse and
        a refused channel of one subscription are two losses: each is reported, the lapse with its length."""
        kind = (spec_id, subscription_id, unread_channel)
        with self.lock:
            last = self._gaps_reported.get(kind)
            if last is not None and missing_from <= last[1] and last[0] <= missing_until:
                return
            self._gaps_reported[kind] = (missing_from, missing_until)
        if not counted:
            self.metrics.replay_gaps.inc()
        log.warning("replay.gap_suspected", spec=spec_id, subscription_id=subscription_id,
                    missing_from=missing_from, missing_until=missing_until, reason=reason, **extra)

    def _deliveries_on(self, channels: list[str]) -> list[tuple[str, Delivery]]:
        wanted = set(channels)
        with self.lock:
            return [(spec_id, d) for spec_id, d in self.deliveries.items() if d.channel in wanted]

    def _drains_on(self, channels: list[str]) -> list[tuple[str, Drain]]:
        wanted = set(channels)
        with self.lock:
            return [(spec_id, d) for spec_id, drains in self.drains.items() for channel, d in drains.items()
                    if channel in wanted]

    def on_replay_gap(self, channels: list[str], from_tt: int, until_tt: int) -> None:
        reading = [(spec_id, d.subscription_id) for spec_id, d in self._deliveries_on(channels)]
        reading += [(spec_id, d.recorded.subscription_id) for spec_id, d in self._drains_on(channels)]
        for spec_id, subscription_id in dict.fromkeys(reading):  # a rotated channel keeps its subscription id
            self.report_gap(spec_id, subscription_id, from_tt / 1e7, until_tt / 1e7,
                            "catch-up returned a full replay buffer", counted=True, unread_channel=True)

    def on_access_denied(self, channels: list[str]) -> None:
        for spec_id, drain in self._drains_on(channels):
            now = time.monotonic()
            if drain.refused_since is None:
                drain.refused_since = now
            if now - drain.refused_since < DRAIN_REFUSED_SECONDS:
                log.info("replay.drain_refused", spec=spec_id, subscription_id=drain.recorded.subscription_id,
                         refused_for=round(now - drain.refused_since, 1))
                continue  # read on once the transport has replaced the connection
            # A former channel PubNub no longer lets us read: what it still holds is lost.
            self.report_gap(spec_id, drain.recorded.subscription_id, drain.progress.acked_tt / 1e7, time.time(),
                            "PubNub denied access to the recorded channel", unread_channel=True)
            self._end_drain(spec_id, drain.recorded.channel)
        if self.manager is None:
            return
        for spec_id, _ in self._deliveries_on(channels):
            self.manager.report_problem(spec_id, "pubnub-access-denied")

    # ---- after a restart: former channels drained, lapses measured ------------------------------

    def check_restart_windows(self) -> None:
        reading = self.transport.reading()
        self._close_lapses(reading)
        self._finish_drains(reading)

    def _close_lapses(self, reading: set[str]) -> None:
        """A lapse ends when the replacement subscription's channel is read: report its true length."""
        with self.lock:
            closed = [(spec_id, lapse) for spec_id, lapse in self.lapses.items() if lapse[2].channel in reading]
            for spec_id, _ in closed:
                del self.lapses[spec_id]
        now = time.time()
        for spec_id, (since, expired_id, replacement, reason) in closed:
            if reason == "gone":  # since: when it was last known alive, not its end
                self.report_gap(spec_id, expired_id, since, now,
                                 "subscription gone: deleted or expired server-side before its expiry; RingCentral "
                                 "may have published nothing from when it last answered for it until a new "
                                 "subscription was created", replaced_by=replacement.subscription_id)
                continue
            self.metrics.lapses.observe(now - since)
            self.report_gap(spec_id, expired_id, since, now,
                            "subscription lapsed: RingCentral published nothing from its expiry until a new "
                            "subscription was created", lapse_seconds=round(now - since, 2),
                            replaced_by=replacement.subscription_id)

    def _finish_drains(self, reading: set[str]) -> None:
        quiet_for = max(DRAIN_QUIET_SECONDS, 2 * self.settings.checkpoint_interval_seconds)
        now = time.monotonic()
        done: list[tuple[str, str]] = []
        with self.lock:
            for spec_id, drains in self.drains.items():
                for channel, drain in drains.items():
                    read_tt = self.transport.position(channel) or 0
                    observed = (read_tt, min(read_tt, drain.progress.checkpointed_tt))
                    if channel not in reading or observed != drain.observed:
                        if observed[0] != drain.observed[0]:
                            drain.refused_since = None  # read since a 403: a later one-off 403 starts afresh
                        drain.observed, drain.quiet_since = observed, now
                    elif (observed[1] == read_tt and now - drain.quiet_since >= quiet_for
                          and self.transport.caught_up_at(channel) is not None):
                        done.append((spec_id, channel))  # read to its end, and all of it checkpointed
        for spec_id, channel in done:
            self._end_drain(spec_id, channel)

    def _end_drain(self, spec_id: str, channel: str) -> None:
        """Stop reading a former channel and drop it from the spec's state record."""
        with self.lock:
            drain = self.drains.get(spec_id, {}).pop(channel, None)
            if drain is None:
                return
            if not self.drains[spec_id]:
                del self.drains[spec_id]
            self.transport.remove_channel(channel)
            self.routes.pop(channel, None)
            self.last_state.pop(spec_id, None)  # due now: the record must no longer name it
        log.info("replay.drained", spec=spec_id, subscription_id=drain.recorded.subscription_id,
                 until=drain.progress.checkpointed_tt / 1e7)
        self.changed(spec_id)


def _lapsed_before(restored: SpecState, delivery: Delivery) -> tuple[float | None, str | None]:
    """Whether the recorded subscription lapsed before this (another) one replaced it after a restart
    or handover: (since when, "expired" or "gone" as in Delivery.lapse_reason), or (None, None).
    Replaced before its recorded expiry, it was deleted or expired server-side while no one read it;
    nothing says when, so from when its state record was last written (it was alive then)."""
    if not restored.subscription_id or restored.subscription_id == delivery.subscription_id \
            or restored.expires_at <= 0:
        return None, None
    if restored.expires_at <= time.time():
        return restored.expires_at, "expired"
    return restored.updated_at, "gone"
