"""The emulator's WebHook delivery mode: RingCentral POSTing notifications to a subscriber's address.

What RingCentral does (reference: ringcentral-websocket-webhook.md), and what the sandbox does:
- At creation, a validation request: POST to the address with a `Validation-Token` header and no body;
  the answer must be 200 within 3 s, echo the header, and be at most 1024 bytes in all, else the
  creation fails (SUB-525 in the sandbox, as RingCentral reports it).
- Each notification: POST of the JSON envelope, `Content-Type: application/json`,
  `User-Agent: RingCentral-Webhook/8.3`, the subscription's token in `Verification-Token` (or the
  header named by `token_header`, e.g. the 2023 docs' `Validation-Token`).
- RingCentral's retry schedule is not documented: here a delivery not answered 2xx in `timeout`
  seconds is tried `retries` more times, `retry_interval` apart, then dropped (`attempted`, not delivered).
  A subscription whose deliveries were dropped `blacklist_after` times in a row is blacklisted.

Faults (`faults` below): `wrong_token` sends the next N deliveries with a forged token (the receiver
must answer 403 and store nothing); `blacklist(subscription id)` blacklists at once. A slow receiver
or one answering 5xx is the receiver's doing: the sandbox times out, retries and blacklists as above.
"""

from __future__ import annotations

import http.client
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

if TYPE_CHECKING:
    from ingest.sandbox.ringcentral import SubscriptionView

HANDSHAKE_TIMEOUT = 3.0  # RingCentral's limit for the validation answer
MAX_HANDSHAKE_ANSWER = 1024  # bytes, status line and headers included
MAX_TOKEN_LENGTH = 256  # the sandbox's bound on a verificationToken (RingCentral documents none)
USER_AGENT = "RingCentral-Webhook/8.3"


class HandshakeFailed(Exception):
    """The address did not pass the validation request; the message says why."""


@dataclass
class Attempted:
    """One notification's delivery: the answers it got, in order."""

    subscription_id: str
    uuid: str | None
    body: bytes
    codes: list[int] = field(default_factory=list)  # 0: no answer in time (timeout, refused, reset)
    delivered: bool = False  # answered 2xx


@dataclass
class WebhookSettings:
    timeout: float = 3.0
    retries: int = 2
    retry_interval: float = 1.0
    blacklist_after: int = 3  # consecutive dropped deliveries of one subscription
    senders: int = 4
    token_header: str = "Verification-Token"  # noqa: S105 - a header name


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, int, dict[str, str]]:
    """(status, bytes of status line and headers, headers) of one POST; OSError when there is no answer."""
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    try:
        connection.request("POST", parts.path or "/", body, headers)
        answer = connection.getresponse()
        answer.read()
        size = len(f"HTTP/1.1 {answer.status} {answer.reason}\r\n") + 2 + sum(
            len(name) + len(value) + 4 for name, value in answer.getheaders())
        return answer.status, size, dict(answer.getheaders())
    finally:
        connection.close()


class WebhookDeliveries:
    """Sends the handshake and the notifications of WebHook subscriptions (sender threads, a queue)."""

    def __init__(self, blacklist: Callable[[str, str], None], settings: WebhookSettings | None = None) -> None:
        self.settings = settings or WebhookSettings()
        self.ttl_max = 315_360_000.0  # RingCentral's longest WebHook lifetime (10 years); tests shorten it
        self.ttl_default = 7 * 86400.0  # when expiresIn is omitted (UNVERIFIED in the reference: a third-party report)
        self._blacklist = blacklist
        self._queue: queue.Queue[tuple[Attempted, str, str] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._failures_in_a_row: dict[str, int] = {}
        self._forged = 0
        self.attempted: list[Attempted] = []
        self._threads: list[threading.Thread] = []

    # ---- creation ------------------------------------------------------------------------------
    def handshake(self, address: str) -> None:
        """RingCentral's validation request; `HandshakeFailed` says what the address did wrong."""
        token = str(uuid.uuid4())
        started = time.monotonic()
        try:
            status, size, headers = _post(address, b"", {"Validation-Token": token, "User-Agent": USER_AGENT},
                                          HANDSHAKE_TIMEOUT)
        except OSError as exc:
            raise HandshakeFailed(f"no answer from {address} within {HANDSHAKE_TIMEOUT:g} s ({exc})") from None
        took = time.monotonic() - started
        if status != 200 or headers.get("Validation-Token") != token:
            raise HandshakeFailed(f"answer {status} without the Validation-Token echoed")
        if size > MAX_HANDSHAKE_ANSWER or took > HANDSHAKE_TIMEOUT:
            raise HandshakeFailed(f"answer of {size} bytes in {took:.2f} s (at most {MAX_HANDSHAKE_ANSWER} "
                                  f"bytes in {HANDSHAKE_TIMEOUT:g} s)")

    # ---- notifications -------------------------------------------------------------------------
    def deliver(self, subscription_id: str, address: str, token: str, body: bytes, note_uuid: str | None) -> None:
        """Queue one notification for POSTing (the generator must not wait on a slow receiver)."""
        self._start_senders()
        attempt = Attempted(subscription_id, note_uuid, body)
        with self._lock:
            self.attempted.append(attempt)
            if self._forged > 0:
                self._forged -= 1
                token = "forged-" + token[::-1]
        self._queue.put((attempt, address, token))

    def publish(self, sub: SubscriptionView, plaintext: bytes) -> int:
        """The generator's route for WebHook subscriptions (`Generator.routes["WebHook"]`); position 0."""
        try:
            note_uuid = orjson.loads(plaintext).get("uuid")
        except (orjson.JSONDecodeError, AttributeError):
            note_uuid = None  # a deliberately malformed body
        assert sub.webhook_token is not None
        self.deliver(sub.id, sub.channel, sub.webhook_token, plaintext,
                     note_uuid if isinstance(note_uuid, str) else None)
        return 0

    def wrong_token(self, count: int = 1) -> None:
        """Fault: the next `count` deliveries carry a token that is not the subscription's."""
        with self._lock:
            self._forged += count

    def idle(self) -> bool:
        """Nothing queued or being sent (every delivery answered, or dropped)."""
        return self._queue.unfinished_tasks == 0

    def _start_senders(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._threads = [threading.Thread(target=self._send_loop, name=f"sandbox-webhook-{i}", daemon=True)
                             for i in range(self.settings.senders)]
        for thread in self._threads:
            thread.start()

    def _send_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._send(*item)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _send(self, attempt: Attempted, address: str, token: str) -> None:
        s = self.settings
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, s.token_header: token}
        for tried in range(s.retries + 1):
            if tried:
                time.sleep(s.retry_interval)  # the sandbox's own schedule (RingCentral's is undocumented)
            try:
                status = _post(address, attempt.body, headers, s.timeout)[0]
            except OSError:
                status = 0
            attempt.codes.append(status)
            if 200 <= status < 300:
                attempt.delivered = True
                with self._lock:
                    self._failures_in_a_row[attempt.subscription_id] = 0
                return
        with self._lock:
            failures = self._failures_in_a_row.get(attempt.subscription_id, 0) + 1
            self._failures_in_a_row[attempt.subscription_id] = failures
        if failures >= s.blacklist_after:
            self._blacklist(attempt.subscription_id, f"{failures} deliveries in a row failed (last answer {status})")

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []


def webhook_target(mode: dict[str, Any], deliveries: WebhookDeliveries) -> tuple[str, str]:
    """(address, verification token) of a WebHook `deliveryMode`, once the address passed the validation
    request; the API error RingCentral answers otherwise."""
    from ingest.sandbox.ringcentral import api_error  # the emulator imports this module

    address = mode.get("address")
    if not isinstance(address, str) or urlsplit(address).scheme not in ("http", "https") \
            or not urlsplit(address).hostname:
        raise api_error(400, "CMN-101", "Parameter [deliveryMode.address] value is invalid",
                        parameterName="deliveryMode.address")
    token = mode.get("verificationToken", mode.get("validationToken"))
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise api_error(400, "CMN-101", "Parameter [deliveryMode.verificationToken] value is invalid",
                        parameterName="deliveryMode.verificationToken")
    try:
        deliveries.handshake(address)
    except HandshakeFailed as exc:
        raise api_error(400, "SUB-525", f"WebHook address validation failed: {exc}") from None
    return address, token


def webhook_info(info: dict[str, Any], address: str, token: str, blacklisted: tuple[float, str] | None) -> None:
    """Turn a SubscriptionInfo into a WebHook one (delivery mode; status and data once blacklisted)."""
    from ingest.sandbox.ringcentral import iso

    info["deliveryMode"] = {"transportType": "WebHook", "address": address, "verificationToken": token}
    if blacklisted is not None:
        info["status"] = "Blacklisted"
        info["blacklistedData"] = {"blacklistedAt": iso(blacklisted[0]), "reason": blacklisted[1]}
