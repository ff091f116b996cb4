"""Per-spec state in a compacted Kafka topic: the RingCentral subscription id and the checkpoint.

Key: spec id. Value: JSON `SpecState`. A worker restores it on start (or, when scaled out, for the
partitions it is assigned), renews the recorded subscription instead of creating one, and resumes
PubNub from the checkpoint timetoken. When the subscription it finds reads another channel (the
recorded one expired, or rotated at the first renewal), the recorded channel is still read from its
checkpoint until drained: the record carries its subscribe key and its AES key, wrapped
(`ingest.coordination.keywrap`), and channels still draining are recorded in `draining` with their own checkpoint.
A transport whose position alone cannot resume reading (WebSocket: the session's `wsc`) records what it
needs at the checkpoint in `session` (`Transport.resume_state`).

Group mode writes an intent before each subscription it creates (`creating_since`, made durable before
the `POST /subscription`), and the record that names the created subscription and its channel drops it: a record
restored with an intent tells the next owner that a subscription may exist that no record names (its
creator died before recording it), created at or after that time; it looks for it and adopts it
(`ingest.rc.subscriptions`, "Orphans of a group member"), or reports a gap when none is alive. That naming
record (the creation record) is made durable too, before the created channel is read, with its checkpoint
at the intent's time: the next owner reads that channel even after the subscription ended unrenewed.

The state topic is co-partitioned with the spec topic by construction: both are written with an
explicit partition, `partition_for(spec_id, n)`, so a worker that owns spec partition p finds the
state of its specs in state partition p, whatever partitioner a client library defaults to.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import orjson

from ingest.coordination.compacted import read_latest
from ingest.observability.logs import get_logger

log = get_logger(__name__)

STATE_REFRESH_SECONDS = 30.0  # a worker rewrites its state records at least this often (liveness, expiry)


@dataclass(frozen=True)
class RecordedChannel:
    """A channel that held the spec's notifications, and what is needed to read it again."""

    subscription_id: str
    subscriber_key: str
    channel: str
    timetoken: int  # every notification of this channel up to here is in Kafka
    wrapped_key: str | None  # the AES key wrapped (ingest.coordination.keywrap); "" unencrypted; None not recorded


@dataclass(frozen=True)
class SpecState:
    spec_id: str
    account_id: str
    subscription_id: str
    subscriber_key: str
    channel: str
    timetoken: int  # every notification of this spec up to here is acknowledged by Kafka
    updated_at: float
    worker_id: str
    expires_at: float = 0.0  # of the RingCentral subscription, as last known (for `ingest status`)
    wrapped_key: str | None = None  # the channel's AES key, wrapped; "" unencrypted; None: not recorded
    draining: tuple[RecordedChannel, ...] = ()  # former channels still being read (restart, rotation)
    # WebHook: the subscription's verification token, wrapped like the AES key (associated data: the spec
    # id and the subscription id), so that every pod's receiver can check deliveries for any spec.
    wrapped_verification_token: str | None = None
    # What the transport needs besides the checkpoint to resume there (WebSocket: the wsc of the checkpointed
    # notification, docs/records.md); None: the position is enough (PubNub).
    session: dict[str, Any] | None = None
    # Group mode: a creation of a subscription for the spec began at this unix time and no record written
    # since names what it created (the intent, docs/records.md); None: none pending.
    creating_since: float | None = None

    def encode(self) -> bytes:
        """Compact JSON, fields in declaration order. A worker writes about one record per notification
        when traffic is sparse (each spec's checkpoint moves every interval), so this is orjson on a
        shallow dict (it serialises the nested dataclasses itself): `dataclasses.asdict` deep-copies
        and the stdlib encoder made it 30-60x slower (docs/benchmarks.md)."""
        values = {name: getattr(self, name) for name in _SPEC_STATE_FIELDS}
        for optional in ("session", "creating_since"):
            if values[optional] is None:
                del values[optional]  # records without one stay readable by workers that predate the field
        try:
            return orjson.dumps(values)
        except (TypeError, orjson.JSONEncodeError):  # what orjson refuses (integers beyond 64 bits): the stdlib
            return json.dumps(values, separators=(",", ":"), default=_recorded_channel).encode()

    @classmethod
    def decode(cls, value: bytes) -> SpecState:
        fields = json.loads(value)
        fields["draining"] = tuple(RecordedChannel(**c) for c in fields.get("draining", ()))
        return cls(**fields)

    def recorded_channels(self) -> list[RecordedChannel]:
        """Every channel this record says may still hold unread notifications, with its checkpoint."""
        current = [RecordedChannel(self.subscription_id, self.subscriber_key, self.channel, self.timetoken,
                                   self.wrapped_key)] if self.channel else []
        return current + [c for c in self.draining if c.channel != self.channel]


_SPEC_STATE_FIELDS = tuple(f.name for f in fields(SpecState))


def _recorded_channel(value: object) -> dict[str, Any]:
    if isinstance(value, RecordedChannel):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def restore(consumer_config: dict[str, str], topic: str, partitions: Iterable[int] | None = None,
            timeout: float = 30.0) -> dict[str, SpecState]:
    """The newest state of every spec in the given partitions (all when None)."""
    states: dict[str, SpecState] = {}
    for key, value in read_latest(consumer_config, topic, partitions, timeout).items():
        try:
            states[key] = SpecState.decode(value)
        except (ValueError, TypeError):
            log.warning("state.undecodable_record", spec=key)
    return states
