"""Patches of the pubnub SDK (pinned: pubnub>=10.8,<11) that the PubNub transport installs on each
instance: one TLS context for every connection, each response decoded once, messages handed on as
one batch per subscribe response in the poll thread, and the SDK's per-channel registry listener
detached. Each was measured (docs/benchmarks.md); the end-to-end tests fail if a new SDK version
stops calling what is replaced here."""

from __future__ import annotations

import functools
import json
import ssl
import threading
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from pubnub.pubnub import PubNub
from pubnub.request_handlers.httpx import HttpxRequestHandler

from ingest.observability.logs import get_logger

log = get_logger(__name__)


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every connection: building one (CA bundle included) costs ~30 ms of CPU."""
    return httpx.create_ssl_context()


class _DecodedOnce(httpx.Response):
    """A response whose body is decoded to text once, and parsed with orjson when that is exact.

    The SDK logs every response body at debug level, so it reads `.text` whatever the log level
    (httpx decodes incrementally, then copies), and then parses `.json()` from the bytes, which
    decodes them again: two decodes and a copy of every 1.5 MB subscribe response. orjson parses
    such a response ~1.5x as fast as the stdlib, but turns integers beyond 64 bits into floats, so
    its result is used only when every message payload is a string (RingCentral's encrypted
    Base64): an unencrypted payload, or any other endpoint's answer, goes to the stdlib.
    """

    @property
    def text(self) -> str:
        text: str | None = getattr(self, "_text", None)
        if text is None:
            text = self._text = self.content.decode(self.encoding or "utf-8", errors="replace")
        return text

    def json(self, **kwargs: Any) -> Any:
        if not kwargs:
            try:
                doc = orjson.loads(self.content)
            except orjson.JSONDecodeError:
                doc = None
            if only_string_payloads(doc):
                return doc
        return json.loads(self.text, **kwargs)


def only_string_payloads(doc: Any) -> bool:
    """Every message payload of a subscribe response is a string: orjson's parse of it is exact."""
    messages = doc.get("m") if type(doc) is dict else None
    return type(messages) is list and all(type(m) is dict and type(m.get("d")) is str for m in messages)


class _Transport(httpx.HTTPTransport):
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        return _DecodedOnce(response.status_code, headers=response.headers, stream=response.stream,
                            extensions=response.extensions)


class RequestHandler(HttpxRequestHandler):  # type: ignore[misc]
    """The SDK's own httpx handler, except that its `httpx.Client` reuses one TLS context and
    decodes each response once (`_DecodedOnce`).

    Every connection (re)start is a new PubNub instance with a new client, and the SDK builds each
    client's TLS context from scratch (even with ssl off): with thousands of channels starting or
    moving, that alone saturated a core and made renewals late (docs/benchmarks.md). Everything
    else, including HTTP/2 and certificate verification, is the SDK's default.
    """

    _session: httpx.Client | None
    _session_lock: threading.Lock

    def _ensure_session(self) -> httpx.Client:
        with self._session_lock:
            if self._session is None or self._session.is_closed:
                self._session = httpx.Client(transport=_Transport(http2=True, verify=ssl_context()))
            return self._session


def drop_registry_listener(pubnub: PubNub) -> None:
    """Detach the SDK's subscription-registry listener, which serves only per-subscription
    `on_message` handlers (we use one plain listener instead). The SDK calls it for every message
    and it tests every subscribed channel against the message, so it cost ~1.5 us per channel of the
    connection per message: ~30% of the worker's CPU at 50 channels (docs/benchmarks.md)."""
    registry_listener = getattr(getattr(pubnub, "_subscription_registry", None), "subscription_registry_callback", None)
    if registry_listener is not None:
        pubnub.remove_listener(registry_listener)


def install_batch_intake(pubnub: PubNub, on_batch: Callable[[list[dict[str, Any]]], None]) -> None:
    """Hand each subscribe response's messages to `on_batch` as they came, in the SDK's poll thread.

    The SDK's own path builds three objects per message (`SubscribeMessage`, `PublishMetadata`,
    `PNMessageResult`), queues each to a second thread and dispatches it to every listener: about a
    third of the worker's CPU (docs/benchmarks.md). Here the SDK still does everything else
    (the long-poll, reconnection, the Connected status, advancing its timetoken and region), from
    the same response with its messages taken out. Processing in the poll thread also bounds
    memory: the next poll starts when this response is done (the SDK's own queue is unbounded).

    This replaces a method of the SDK's subscription manager (pinned: pubnub>=10.8,<11); the
    end-to-end tests fail if a new SDK version stops calling it.
    """
    manager = pubnub._subscription_manager
    sdk_handle = manager._handle_endpoint_call

    def handle_endpoint_call(raw_result: dict[str, Any], status: Any) -> None:
        messages = raw_result.get("m") or []
        sdk_handle({**raw_result, "m": []}, status)
        try:
            on_batch(messages)
        except Exception:  # pragma: no cover - the handler must not raise; a raise would stop this connection
            log.error("transport.handler_failed", exc_info=True, messages=len(messages))

    manager._handle_endpoint_call = handle_endpoint_call
