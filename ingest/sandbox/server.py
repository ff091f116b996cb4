"""The sandbox: both emulators on free 127.0.0.1 ports, the generator, faults and the admin API.

    with Sandbox(SandboxSettings(pubnub_hold_seconds=0.5)) as sb:
        sb.rc_url, sb.pubnub_origin, sb.client_id, sb.client_secret, sb.accounts
        sb.generator.publish(10); sb.faults.pubnub_error(500, count=2)

Both servers are `ThreadingHTTPServer`s speaking keep-alive HTTP/1.1 (a thread per connection; a
held long-poll only blocks its own connection). On close, held polls are released and every open
connection is shut down so that clients see the end at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ingest.observability.logs import get_logger, register_secret
from ingest.sandbox.faults import FaultBook, Faults
from ingest.sandbox.generator import Generator
from ingest.sandbox.pubnub import PubNubEmulator, PubNubHandler
from ingest.sandbox.ringcentral import Account, RateLimits, RingCentralEmulator, RingCentralHandler
from ingest.sandbox.websocket import WebSocketEmulator, WebSocketSettings

__all__ = ["Account", "RateLimits", "Sandbox", "SandboxSettings", "demo_accounts"]

log = get_logger(__name__)


def _fake_jwt(rng: random.Random, subject: str) -> str:
    """A JWT-shaped credential string (the sandbox only compares it; it is never parsed)."""
    import base64
    import json

    def part(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")

    sig = base64.urlsafe_b64encode(rng.getrandbits(256).to_bytes(32, "big")).decode().rstrip("=")
    return f"{part({'kid': 'sandbox', 'typ': 'JWT', 'alg': 'RS256'})}.{part({'sub': subject, 'iss': 'sandbox', 'jti': rng.getrandbits(64)})}.{sig}"  # noqa: E501


def demo_accounts(n: int = 3, extensions_per_account: int = 4, seed: int = 1) -> list[Account]:
    """`n` accounts named acme, globex, initech, ... with numeric ids and a few extensions each."""
    names = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell"]
    rng = random.Random(seed * 7919)
    accounts = []
    for i in range(n):
        account_id = str(rng.randrange(10**8, 10**10))
        extensions = tuple(str(rng.randrange(10**8, 10**12)) for _ in range(extensions_per_account))
        name = names[i] if i < len(names) else f"account{i + 1}"
        accounts.append(Account(name, account_id, extensions[0], _fake_jwt(rng, extensions[0]), extensions))
    return accounts


@dataclass
class SandboxSettings:
    """Every knob of the sandbox. Defaults are real-like except the PubNub hold (1 s, real ~280 s)."""

    accounts: list[Account] = field(default_factory=list)  # empty: demo_accounts(3)
    client_id: str = ""  # empty: derived from the seed
    client_secret: str = ""
    subscriber_key: str = ""  # empty: a `sub-c-...` key derived from the seed
    subscription_ttl_max: float = 900.0
    subscription_limit: int = 30
    access_token_ttl: float = 3600
    refresh_token_ttl: float = 604800
    pubnub_hold_seconds: float = 1.0
    buffer_size: int = 100
    buffer_ttl: float = 1200.0
    max_messages_per_response: int = 100
    rate_limits: bool | RateLimits = True  # True: RateLimits() defaults; False: no limits
    seed: int = 1
    payload_size: int = 0  # target average plaintext size in bytes (0: natural sizes, ~300-900 B)
    missing_field_ratio: float = 0.05
    host: str = "127.0.0.1"
    rc_port: int = 0  # 0: a free port
    pubnub_port: int = 0
    ws_port: int = 0
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that tracks its connections, so close() can cut them, and stays quiet
    about clients that hang up."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a worker opening many connections at once (10,000
    # subscriptions over 400 accounts, one HTTP session each) overflowed it, and each dropped SYN cost its
    # client a 1-s (then 3-s) retransmission: creations waited on connect (docs/benchmarks.md).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.connections_lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients drop long-polls and keep-alive connections all the time; that is not an error.
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        log.error("sandbox.request_failed", exc_info=True)

    def cut_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Sandbox:
    """The RingCentral and PubNub emulators, started on free ports; a context manager."""

    def __init__(self, settings: SandboxSettings | None = None) -> None:
        self.settings = s = settings or SandboxSettings()
        rng = random.Random(s.seed)
        self.accounts: list[Account] = list(s.accounts) or demo_accounts(3, seed=s.seed)
        self.client_id = s.client_id or f"sbx{rng.getrandbits(64):016x}"
        self.client_secret = s.client_secret or f"{rng.getrandbits(160):040x}"
        a, b, c, d = rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(48)
        subscriber_key = s.subscriber_key or f"sub-c-{a:08x}-{b:04x}-11e2-{c:04x}-{d:012x}"
        register_secret(self.client_secret)
        for account in self.accounts:
            register_secret(account.jwt)
        limits = s.rate_limits if isinstance(s.rate_limits, RateLimits) else RateLimits() if s.rate_limits else None
        self.book = FaultBook()
        self.pubnub = PubNubEmulator(self.book, hold_seconds=s.pubnub_hold_seconds, buffer_size=s.buffer_size,
                                     buffer_ttl=s.buffer_ttl, max_per_response=s.max_messages_per_response)
        self.rc = RingCentralEmulator(
            self.book, self.accounts, client_id=self.client_id, client_secret=self.client_secret,
            subscriber_key=subscriber_key, subscription_ttl_max=s.subscription_ttl_max,
            subscription_limit=s.subscription_limit, access_token_ttl=s.access_token_ttl,
            refresh_token_ttl=s.refresh_token_ttl, rate_limits=limits, seed=s.seed)
        self.generator = Generator(self.rc, self.pubnub, seed=s.seed, payload_size=s.payload_size,
                                   missing_ratio=s.missing_field_ratio)
        self.websocket = WebSocketEmulator(self.book, self.rc, s.websocket)
        self.generator.routes["WebSocket"] = self.websocket.publish
        self.generator.routes["WebHook"] = self.rc.webhooks.publish
        self.faults = Faults(self.book, self.rc, self.pubnub, self.websocket)
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.rc_url = ""
        self.pubnub_origin = ""

    @property
    def subscriber_key(self) -> str:
        return self.rc.subscriber_key

    def account(self, ref: str) -> Account:
        """An account by name or numeric id."""
        return self.rc.account(ref)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Sandbox:
        s = self.settings
        pn_handler = type("SandboxPubNubHandler", (PubNubHandler,), {"emulator": self.pubnub})
        rc_handler = type("SandboxRingCentralHandler", (RingCentralHandler,),
                          {"emulator": self.rc, "admin_api": [self._admin]})
        pn = _Server((s.host, s.pubnub_port), pn_handler)
        rc = _Server((s.host, s.rc_port), rc_handler)
        self._servers = [rc, pn]
        self.pubnub_origin = f"{s.host}:{pn.server_address[1]}"
        self.rc_url = f"http://{s.host}:{rc.server_address[1]}"
        self.rc.base_url = self.rc_url
        for server, name in ((rc, "sandbox-rc"), (pn, "sandbox-pubnub")):
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.websocket.start(s.host, s.ws_port)
        log.info("sandbox.started", rc_url=self.rc_url, pubnub_origin=self.pubnub_origin, ws_url=self.websocket.url)
        return self

    def close(self) -> None:
        self.generator.stop()
        self.rc.webhooks.close()
        self.pubnub.close()  # releases held polls
        self.websocket.close()
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.cut_connections()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- views -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """URLs, app credentials and accounts (secrets included: this is for the demo user)."""
        return {
            "rc_url": self.rc_url, "pubnub_origin": self.pubnub_origin, "client_id": self.client_id,
            "client_secret": self.client_secret, "subscriber_key": self.subscriber_key, "ws_url": self.websocket.url,
            "accounts": [{"name": a.name, "account_id": a.account_id, "extension_id": a.extension_id,
                          "extensions": list(a.all_extensions()), "jwt": a.jwt} for a in self.accounts],
        }

    def state(self) -> dict[str, Any]:
        """Subscriptions, per-account counters, PubNub buffer stats and armed faults (no secrets)."""
        return {
            "subscriptions": [
                {k: v for k, v in dataclasses.asdict(sv).items() if k not in ("key", "filters")}
                | {"encryption": sv.encryption} for sv in self.rc.subscriptions(include_dead=True)],
            "accounts": self.rc.stats(),
            "pubnub": [dataclasses.asdict(self.pubnub.stats(k)) for k in self.pubnub.sub_keys()],
            "websocket": self.websocket.stats(),
            "generated": self.generator.count(),
            "generator_running": self.generator.running,
            "faults": self.faults.armed(),
            "faults_fired": dict(self.book.fired),
        }

    # ---- admin API (JSON over HTTP on the RingCentral port, under /sandbox) ------------------
    _FAULTS = ("rc_error", "expire_subscription", "delete_subscription", "rotate_on_next_renewal",
               "revoke_refresh_tokens", "expire_access_tokens", "revoke_permission", "pubnub_error",
               "pubnub_drop_connections", "pubnub_stall", "pubnub_time_fail", "pubnub_overflow",
               "ws_drop_connections", "ws_fail_recovery", "ws_close", "ws_stall", "clear")

    def _admin(self, method: str, path: str, body: Any) -> tuple[int, Any]:  # noqa: PLR0911 - a routing table
        args: dict[str, Any] = body if isinstance(body, dict) else {}
        if method == "GET" and path == "/state":
            return 200, self.state()
        if method != "POST":
            return 405, {"error": "use POST (GET only for /sandbox/state)"}
        if path.startswith("/faults/"):
            name = path[len("/faults/"):].replace("-", "_")
            if name not in self._FAULTS:
                return 404, {"error": f"unknown fault {name}", "known": list(self._FAULTS)}
            result = getattr(self.faults, name)(**args)
            return 200, {"ok": True, "result": result}
        if path == "/generator/publish":
            published = self.generator.publish(int(args.get("n", 1)), args.get("kinds"), args.get("malformed"))
            return 200, {"published": len(published),
                         "uuids": [g.uuid for g in published], "timetokens": [g.timetoken for g in published]}
        if path == "/generator/start":
            self.generator.start(float(args.get("rate", 1.0)), args.get("kinds"),
                                 float(args.get("malformed_ratio", 0.0)))
            return 200, {"ok": True}
        if path == "/generator/stop":
            self.generator.stop()
            return 200, {"ok": True}
        return 404, {"error": f"unknown admin path {path}"}
