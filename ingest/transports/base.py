"""The one intake interface of the data plane: what a transport hands the worker, and what the worker
asks of a transport. PubNub (`transports/pubnub.py`) is the first implementation.

The worker routes by *channel*: the name under which one subscription's notifications arrive (a
PubNub channel; for a WebSocket, the subscription id a server message names; for a WebHook, the
subscription id of the request, or the address it was posted to). It learns which channels to read
from the control plane (`Delivery`) and tells the transport with `add_channel` / `remove_channel`.

A transport calls its `BatchHandler` with every new notification of one read, in order, as one batch
of `Received`; one batch at a time (the handler is not re-entrant per transport, and per channel the
order of batches is the order of reading). Each `Received` carries an opaque *position*: an integer
that grows along its channel, from which reading can resume and up to which a checkpoint covers
what was read:

- PubNub: the message's timetoken (resumable: a restart replays from the checkpoint);
- WebSocket: the session's sequence number (`wsc`); a new session starts a new sequence, so the
  transport keeps the positions it hands on growing (e.g. session start time * 1e7 + sequence);
- WebHook: a position the receiver assigns per channel as requests arrive (nothing to resume from:
  the sender retries what was not answered 200).

Payloads are raw: PubNub hands on the Base64 ciphertext (the pipeline decrypts with the channel's
key); a WebSocket or WebHook transport hands on plaintext JSON text, and its deliveries carry no
encryption key (`Delivery.encryption_key` None), which the pipeline reads as "not encrypted".

Acknowledgement: the worker calls `acknowledged(channel, position)` for a spec's current channel when
everything up to `position` on it is durable in Kafka: at-least-once when the checkpoint is written
(Kafka acknowledged every record up to it), exactly-once when the transaction holding it commits.
PubNub and WebSocket ignore it: PubNub's positions are resumable; a WebSocket checkpoint records
`resume_state(channel, position)`, the wsc a new owner recovers the session with. A WebHook
receiver holds each request until then and answers 200 (or answers 503 when the worker stops first,
so that the sender retries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol


class Stream(Protocol):
    """A channel's read state inside the transport, as far as a notification's reader needs it."""

    @property
    def epoch(self) -> int:
        """Bumped by `Transport.rewind`: whatever was read before is read again."""
        ...


class Received(NamedTuple):
    """One new notification, as read (nothing decoded yet). Immutable: a named tuple, which is built in a
    third of the time of a frozen dataclass (`object.__setattr__` per field): one per notification
    (docs/benchmarks.md)."""

    channel: str
    position: int  # grows along the channel; what a checkpoint records (see the module docstring)
    payload: Any  # raw: Base64 ciphertext (PubNub), or plaintext JSON text
    stream: Stream  # the channel's read state when this was read
    epoch: int  # `stream.epoch` when this was read

    def superseded(self) -> bool:
        """The channel was rewound since this was read: it will be read (and handed on) again."""
        return self.stream.epoch != self.epoch


# Every new notification of one read, in order, and when they arrived (unix seconds). Must not raise.
BatchHandler = Callable[[list[Received], float], None]
# Channels the transport may no longer read (PubNub: a 403): what they still hold is lost.
AccessDeniedHandler = Callable[[list[str]], None]
# (channels, from position, until position): a catch-up may have skipped what lies between.
GapHandler = Callable[[list[str], int, int], None]


class Transport(Protocol):
    """What the worker asks of a transport. Implementations take a `BatchHandler` (and optionally an
    `AccessDeniedHandler` and a `GapHandler`) at construction and call them from their own threads."""

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop reading; no handler is called after this returns."""
        ...

    def add_channel(self, source: str, channel: str, resume: int | None = None) -> None:
        """Start reading `channel` after position `resume` (a checkpoint), or from a short lookback
        (None). `source`: what the channel is read through, channels of one source may share a
        connection (PubNub: the subscriber key; WebSocket: the session; WebHook: unused)."""
        ...

    def remove_channel(self, channel: str) -> None: ...

    def rewind(self, channel: str, position: int | None) -> None:
        """Read `channel` again after `position` (None: from where reading began), e.g. after an
        aborted transaction hid what was read; bumps the channel's `Stream.epoch`. A transport
        that cannot re-read (WebHook) answers the requests still held with an error instead, so
        that the sender retries them."""
        ...

    def position(self, channel: str) -> int | None:
        """The newest position handed on for `channel` (or where reading starts); None if not read."""
        ...

    def caught_up_at(self, channel: str) -> float | None:
        """When (monotonic) the transport last knew it had read everything the sender held for the
        channel; None until then. Former channels are dropped once caught up and checkpointed."""
        ...

    def reading(self) -> set[str]:
        """Channels being read now (their connection open and answered)."""
        ...

    def acknowledged(self, channel: str, position: int) -> None:
        """Everything up to `position` on `channel` is durable in Kafka (see the module docstring)."""
        ...

    def resume_state(self, channel: str, position: int) -> dict[str, Any] | None:
        """What a checkpoint at `position` must record besides the position to resume reading there after a
        restart or a handover (JSON-able; WebSocket: the session's wsc then); None: the position is enough."""
        ...
