"""RingCentral WebSocket emulator: wstoken, sessions with `wsc` recovery, ClientRequest, ServerNotification.

Protocol facts: /work/shared/reference/ringcentral-websocket-webhook.md (reference §WebSocket 1-12).
The server is `websockets`' threaded server (a thread per connection, like the HTTP emulators).

- `POST /restapi/oauth/wstoken` (on the RingCentral port; `RingCentralEmulator.ws_tokens` is this
  module's `issue_token`) gives a single-use token valid `token_ttl` seconds.
- `ws://host:port/ws?access_token=T[&wsc=W]`: a bad, used or expired token is refused in the
  handshake (HTTP 401). The first frame is `ConnectionDetails` (meta `wsc`); a client frame that
  arrives before it is answered with an `Error` and the socket is closed (the client broke the rule).
- A session (identified by its `wsc` token) owns at most one subscription (a second POST replaces
  the first), and keeps the last `recovery_buffer` notifications. When its socket goes, the session
  waits `recovery_timeout` seconds for a reconnect with its `wsc`: then `recoveryState: Successful`
  and what the client may have missed is replayed; later (or when the `ws_fail_recovery` fault is
  armed) `recoveryState: Failed`, a new session, and the old subscription is deleted.
- Every frame's `wsc` names the session *and* a position in it: the token is `<session>.<sequence>`
  (the reference says to keep the newest wsc, by sequence; whether RingCentral's token changes per frame
  is UNVERIFIED, this reading is the one that lets a server know what the client has). A recovery
  replays the buffered notifications after that sequence; what the buffer no longer holds is counted
  as lost (`lost` in the stats). The ConnectionDetails of a recovery carries the recovered position.
- A ClientRequest is in flight from its arrival to its answer: the server answers what has arrived (during
  `request_delay`, and whatever is already waiting) together, and refuses the requests beyond
  `maxActiveRequests` among them: status 429, `WSG-906` (the emulator's choice of code).
- RFC 6455 pings every `ping_interval` (pong within `pong_timeout`, else the server closes);
  `Heartbeat` frames are answered. A connection with no client frame for `idle_timeout` gets
  `Error` WSG-902 and is closed; every connection is closed after `absolute_timeout` with WSG-903.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from ingest.observability.logs import get_logger, register_secret
from ingest.sandbox.ringcentral import API, ApiError, _injected, api_error

if TYPE_CHECKING:
    from ingest.sandbox.faults import FaultBook
    from ingest.sandbox.ringcentral import RingCentralEmulator, SubscriptionView
    from ingest.sandbox.ringcentral import _Session as OAuthSession

log = get_logger(__name__)

SUBSCRIPTION = f"{API}/subscription"
IDLE_CLOSE = "WSG-902"
ABSOLUTE_CLOSE = "WSG-903"
RECOVERY_FAILED = "WSG-904"  # the emulator's choice: the reference names no code for a failed recovery
EARLY_FRAME = "WSG-905"  # the emulator's choice: a client frame before ConnectionDetails
TOO_MANY_REQUESTS = "WSG-906"  # the emulator's choice: the reference documents the limit, not its error


@dataclass(frozen=True)
class WebSocketSettings:
    """The server's limits, as `ConnectionDetails` announces them (real values by default)."""

    recovery_buffer: int = 100
    recovery_timeout: float = 180.0
    idle_timeout: float = 1800.0
    absolute_timeout: float = 86400.0
    max_active_requests: int = 10
    max_connections_per_session: int = 50
    token_ttl: float = 30.0
    ping_interval: float = 30.0
    pong_timeout: float = 10.0
    details_delay: float = 0.05  # a short pause before ConnectionDetails: exposes clients that send first
    request_delay: float = 0.0  # how long a ClientRequest takes to answer: what arrives meanwhile is in flight too


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _meta(kind: str, message_id: str | None = None, status: int = 200, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "messageId": message_id or str(uuid.uuid4()), "status": status,
            "headers": {"RCRequestId": str(uuid.uuid4())}, **extra}


def _frame(meta: dict[str, Any], body: Any = None) -> str:
    return json.dumps([meta] if body is None else [meta, body], separators=(",", ":"))


class _Connection(ServerConnection):
    """A server connection that can be black-holed (the `ws_stall` fault): while `stalled`, nothing it
    would send (pongs, notifications, close frames) leaves the machine, as on a half-open TCP path."""

    stalled = False
    rc_session: OAuthSession | None = None

    def send_data(self) -> None:
        if self.stalled:
            for _ in self.protocol.data_to_send():
                pass
            return
        super().send_data()


@dataclass
class _Buffered:
    sequence: int
    frame: str


@dataclass
class _WsSession:
    id: str
    oauth: OAuthSession  # the OAuth session whose token opened the newest connection
    created_at: float
    buffer: deque[_Buffered]
    sequence: int = 0  # of the newest notification
    subscription_id: str | None = None
    connection: _Connection | None = None
    disconnected_at: float = 0.0
    recoveries: int = 0
    lost: int = 0  # notifications a recovery could not replay any more (pushed out of the buffer)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wsc_meta(self, sequence: int) -> dict[str, Any]:
        return {"token": f"{self.id}.{sequence}", "sequence": sequence}


class WebSocketEmulator:
    """Sessions, tokens and connections of the WebSocket delivery mode."""

    def __init__(self, book: FaultBook, rc: RingCentralEmulator, settings: WebSocketSettings | None = None) -> None:
        self.book = book
        self.rc = rc
        self.settings = settings or WebSocketSettings()
        self.url = ""
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[OAuthSession | None, float]] = {}  # ws token -> (OAuth session, expiry)
        self._sessions: dict[str, _WsSession] = {}  # session id (the wsc token before its `.`) -> session
        self._by_subscription: dict[str, _WsSession] = {}
        self._server: Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.counts = {"opened": 0, "recovered": 0, "recovery_failed": 0, "replayed": 0, "refused": 0,
                       "idle_closes": 0, "absolute_closes": 0, "early_frames": 0, "requests": 0, "heartbeats": 0,
                       "requests_refused": 0}

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, host: str, port: int) -> None:
        s = self.settings
        self._server = serve(self._handle, host, port, process_request=self._check_token,
                             create_connection=_Connection, ping_interval=s.ping_interval,
                             ping_timeout=s.pong_timeout, close_timeout=2, server_header=None)
        bound = self._server.socket.getsockname()
        self.url = f"ws://{host}:{bound[1]}/ws"
        self.rc.ws_tokens = self.issue_token
        for target, name in ((self._server.serve_forever, "sandbox-ws"), (self._reap_loop, "sandbox-ws-reaper")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for conn in self._connections():
            conn.stalled = False
            with contextlib.suppress(OSError):
                conn.close_socket()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    # ---- tokens and handshake --------------------------------------------------------------------
    def issue_token(self, oauth: OAuthSession) -> dict[str, Any]:
        """The answer of POST /restapi/oauth/wstoken for an authenticated OAuth session."""
        token = secrets.token_urlsafe(32)
        register_secret(token)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (oauth, now + self.settings.token_ttl)
        return {"ws_access_token": token, "uri": self.url, "expires_in": int(self.settings.token_ttl)}

    def _check_token(self, conn: ServerConnection, request: Request) -> Response | None:
        """Refuse the handshake (401) unless the URL carries a valid, unused token; single use."""
        url = urlsplit(request.path)
        token = parse_qs(url.query).get("access_token", [""])[0]
        with self._lock:
            oauth, expires = self._tokens.pop(token, (None, 0.0))
        if url.path != "/ws" or oauth is None or expires <= time.monotonic():
            self.counts["refused"] += 1
            body = json.dumps({"errorCode": "WSG-401", "message": "Invalid or expired WebSocket token"}).encode()
            return Response(HTTPStatus.UNAUTHORIZED, "Unauthorized",
                            Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))]), body)
        assert isinstance(conn, _Connection)
        conn.rc_session = oauth
        return None

    # ---- a connection ----------------------------------------------------------------------------
    def _handle(self, conn: ServerConnection) -> None:
        assert isinstance(conn, _Connection) and conn.rc_session is not None and conn.request is not None
        self.counts["opened"] += 1
        if self._sent_early(conn):
            return
        wsc = parse_qs(urlsplit(conn.request.path).query).get("wsc", [""])[0]
        session, details, position = self._attach(conn, conn.rc_session, wsc)
        try:
            self._serve(conn, session, details, position)
        finally:
            self._detach(session, conn)

    def _sent_early(self, conn: _Connection) -> bool:
        time.sleep(self.settings.details_delay)
        try:
            conn.recv(timeout=0)
        except TimeoutError:
            return False
        except ConnectionClosed:
            return True
        self.counts["early_frames"] += 1
        with contextlib.suppress(ConnectionClosed):
            conn.send(_frame(_meta("Error", status=400), {"errorCode": EARLY_FRAME,
                                                          "message": "Frame received before ConnectionDetails"}))
            conn.close(1008, EARLY_FRAME)
        return True

    def _attach(self, conn: _Connection, oauth: OAuthSession,
                wsc: str) -> tuple[_WsSession, dict[str, Any], int]:
        """Recover the session named by `wsc`, or open a new one: the ConnectionDetails body, and the
        sequence the client has (what follows it is replayed)."""
        s = self.settings
        now = time.time()
        details: dict[str, Any] = {
            "creationTime": _iso(now), "maxConnectionsPerSession": s.max_connections_per_session,
            "recoveryBufferSize": s.recovery_buffer, "recoveryTimeout": int(s.recovery_timeout),
            "idleTimeout": int(s.idle_timeout), "absoluteTimeout": int(s.absolute_timeout),
            "maxActiveRequests": s.max_active_requests}
        session_id, _, sequence = wsc.rpartition(".")
        with self._lock:
            old = self._sessions.get(session_id) if wsc else None
            # A session whose socket the server still holds is recoverable too: the client has seen it end
            # (it reconnects within milliseconds of a close, before this side has finished closing).
            recoverable = (old is not None and old.oauth.account is oauth.account
                           and (old.connection is not None or now - old.disconnected_at < s.recovery_timeout))
            if wsc and recoverable and sequence.isdigit() and self.book.take("ws-fail-recovery") is None:
                assert old is not None
                old.connection, old.oauth = conn, oauth
                old.recoveries += 1
                self.counts["recovered"] += 1
                return old, details | {"recoveryState": "Successful"}, min(int(sequence), old.sequence)
            if wsc:
                self.counts["recovery_failed"] += 1
                details |= {"recoveryState": "Failed", "recoveryErrorCode": RECOVERY_FAILED}
                if old is not None:
                    self._end(old)
            session = _WsSession(secrets.token_urlsafe(24), oauth, now, deque(maxlen=s.recovery_buffer),
                                 connection=conn)
            register_secret(session.id)
            self._sessions[session.id] = session
            return session, details, 0

    def _serve(self, conn: _Connection, session: _WsSession, details: dict[str, Any], position: int) -> None:
        s = self.settings
        with session.lock, contextlib.suppress(ConnectionClosed):  # gone already: the handler ends below
            conn.send(_frame(_meta("ConnectionDetails", wsc=session.wsc_meta(position)), details))
            if details.get("recoveryState") == "Successful":
                self._replay(conn, session, position)
        opened = last_frame = time.monotonic()
        while True:
            idle_at, absolute_at = last_frame + s.idle_timeout, opened + s.absolute_timeout
            try:
                raw = conn.recv(timeout=max(0.0, min(idle_at, absolute_at) - time.monotonic()))
            except TimeoutError:
                self._timeout_close(conn, IDLE_CLOSE if idle_at <= absolute_at else ABSOLUTE_CLOSE)
                return
            except ConnectionClosed:
                return
            last_frame = time.monotonic()
            try:
                frames = [raw, *self._arrived_meanwhile(conn)]
            except ConnectionClosed:
                return
            active = 0
            for frame in frames:
                answer, active = self._answer(session, frame, active)
                if answer is not None:
                    with contextlib.suppress(ConnectionClosed):
                        conn.send(answer)

    def _arrived_meanwhile(self, conn: _Connection) -> list[str | bytes]:
        """The frames that arrive while the first is being answered (`request_delay`) and those waiting."""
        frames: list[str | bytes] = []
        deadline = time.monotonic() + self.settings.request_delay
        while True:
            try:
                frames.append(conn.recv(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                return frames

    def _replay(self, conn: _Connection, session: _WsSession, position: int) -> None:
        """After a recovery: the buffered notifications after the client's position (session lock held)."""
        oldest = session.buffer[0].sequence if session.buffer else session.sequence + 1
        session.lost += max(0, oldest - position - 1)
        for item in list(session.buffer):
            if item.sequence > position:
                conn.send(item.frame)
                self.counts["replayed"] += 1

    def _timeout_close(self, conn: _Connection, code: str) -> None:
        self.counts["idle_closes" if code == IDLE_CLOSE else "absolute_closes"] += 1
        message = "Idle timeout" if code == IDLE_CLOSE else "Absolute connection timeout"
        with contextlib.suppress(ConnectionClosed):
            conn.send(_frame(_meta("Error", status=400), {"errorCode": code, "message": message}))
            conn.close(1000, code)

    def _detach(self, session: _WsSession, conn: _Connection) -> None:
        with self._lock:
            if session.connection is conn:
                session.connection = None
                session.disconnected_at = time.time()

    def _end(self, session: _WsSession) -> None:
        """The session is over (lock held): its subscription goes with it."""
        self._sessions.pop(session.id, None)
        if session.subscription_id is not None:
            self._by_subscription.pop(session.subscription_id, None)
            with contextlib.suppress(KeyError):
                self.rc.delete_subscription_server_side(session.subscription_id)

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.1):
            now = time.time()
            with self._lock:
                for session in list(self._sessions.values()):
                    if session.connection is None and now - session.disconnected_at >= self.settings.recovery_timeout:
                        self._end(session)

    # ---- frames from the client ------------------------------------------------------------------
    def _answer(self, session: _WsSession, raw: str | bytes, active: int) -> tuple[str | None, int]:
        """The answer to one client frame, and the ClientRequests in flight with it (`active` before it)."""
        try:
            frame = json.loads(raw)
            meta = frame[0]
            kind, message_id = meta["type"], str(meta.get("messageId") or "")
        except (ValueError, KeyError, IndexError, TypeError):
            return _frame(_meta("Error", status=400), {"errorCode": "WSG-400", "message": "Malformed frame"}), active
        if kind == "Heartbeat":
            self.counts["heartbeats"] += 1
            return _frame(_meta("Heartbeat", message_id)), active
        if kind != "ClientRequest":
            return _frame(_meta("Error", message_id, 400),
                          {"errorCode": "WSG-400", "message": f"Unexpected {kind}"}), active
        self.counts["requests"] += 1
        if active >= self.settings.max_active_requests:
            self.counts["requests_refused"] += 1
            return _frame(_meta("ClientRequest", message_id, 429),
                          {"errorCode": TOO_MANY_REQUESTS, "message": "Too many active requests"}), active
        return self._client_answer(session, meta, frame, message_id), active + 1

    def _client_answer(self, session: _WsSession, meta: dict[str, Any], frame: list[Any], message_id: str) -> str:
        body = frame[1] if len(frame) > 1 and isinstance(frame[1], dict) else {}
        try:
            status, answer, headers = self._client_request(session, str(meta.get("method", "")).upper(),
                                                           str(meta.get("path", "")), body)
        except ApiError as err:
            status, answer, headers = err.status, err.body, err.headers
        reply = _meta("ClientRequest", message_id, status)
        reply["headers"].update(headers)
        return _frame(reply, answer)

    def _client_request(self, session: _WsSession, method: str, path: str,
                        body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        """REST over the socket, routed to the RingCentral emulator's subscription API."""
        rc, oauth = self.rc, session.oauth
        rc.authenticate(f"Bearer {oauth.access_token}")  # 401 once the token behind the socket died
        path = path.rstrip("/")
        sub_id = path[len(SUBSCRIPTION) + 1:] if path.startswith(SUBSCRIPTION + "/") else None
        endpoint = {("POST", None): "create", ("GET", None): "list"}.get((method, sub_id)) if sub_id is None \
            else {"GET": "get", "PUT": "put", "DELETE": "delete"}.get(method)
        if endpoint is None or (path != SUBSCRIPTION and sub_id is None) or (sub_id and "/" in sub_id):
            raise api_error(404, "CMN-120", "Invalid URI")
        headers = self._rate_limit(oauth, "light" if endpoint in ("get", "list") else "medium")
        hit = self.book.take("rc-error", endpoint=endpoint)
        if hit is not None:
            raise _injected(int(hit["status"]), endpoint, hit.get("retry_after"))
        if endpoint == "create":
            info = rc.create(oauth, body, transport="WebSocket")
            self._bind(session, str(info["id"]))
            return 200, info, headers | {"WSG-SubscriptionId": str(info["id"])}
        if endpoint == "list":
            return 200, rc.list_for(oauth), headers
        assert sub_id is not None
        if endpoint == "get":
            return 200, rc.get(oauth, sub_id), headers
        if endpoint == "put":
            return 200, rc.renew(oauth, sub_id, body), headers
        rc.delete(oauth, sub_id)
        with self._lock:
            if session.subscription_id == sub_id:
                session.subscription_id = None
                self._by_subscription.pop(sub_id, None)
        return 204, None, headers

    def _rate_limit(self, oauth: OAuthSession, group: str) -> dict[str, str]:
        limiter = self.rc.rate_limiter
        if limiter is None:
            return {}
        headers, retry_after = limiter.check(oauth.account.extension_id, self.rc.client_id, group)
        if retry_after is not None:
            err = api_error(429, "CMN-301", "Request rate exceeded")
            err.headers.update(headers | {"Retry-After": str(int(retry_after))})
            raise err
        return headers

    def _bind(self, session: _WsSession, subscription_id: str) -> None:
        """One subscription per connection: a new one replaces (deletes) the session's previous one."""
        with self._lock:
            previous = session.subscription_id
            if previous is not None and previous != subscription_id:
                self._by_subscription.pop(previous, None)
                with contextlib.suppress(KeyError):
                    self.rc.delete_subscription_server_side(previous)
            session.subscription_id = subscription_id
            self._by_subscription[subscription_id] = session

    # ---- notifications (the generator's route for WebSocket subscriptions) -----------------------
    def publish(self, sub: SubscriptionView, plaintext: bytes) -> int:
        """Deliver one notification (JSON bytes, sent as they are) to the session of `sub`; buffered for
        recovery. Returns its sequence in the session (0: no session holds this subscription)."""
        with self._lock:
            session = self._by_subscription.get(sub.id)
        if session is None:
            return 0
        with session.lock:
            session.sequence += 1
            meta = _meta("ServerNotification", wsc=session.wsc_meta(session.sequence))
            frame = "[" + json.dumps(meta, separators=(",", ":")) + "," + plaintext.decode("utf-8", "replace") + "]"
            session.buffer.append(_Buffered(session.sequence, frame))
            conn = session.connection
            if conn is not None and not conn.stalled:
                with contextlib.suppress(ConnectionClosed):  # the session's next connection replays it
                    conn.send(frame)
            return session.sequence

    # ---- faults ----------------------------------------------------------------------------------
    def _connections(self) -> list[_Connection]:
        with self._lock:
            return [s.connection for s in self._sessions.values() if s.connection is not None]

    def drop_connections(self, count: int | None = None) -> int:
        """Cut the TCP connection of `count` open sockets (None: all), without a close frame."""
        conns = self._connections()[:count]
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.socket.shutdown(2)
        return len(conns)

    def force_close(self, code: str, count: int | None = None) -> int:
        """Close `count` open sockets (None: all) as the idle (WSG-902) or absolute (WSG-903) timeout does."""
        if code not in (IDLE_CLOSE, ABSOLUTE_CLOSE):
            raise ValueError(f"code must be {IDLE_CLOSE} or {ABSOLUTE_CLOSE}")
        conns = self._connections()[:count]
        for conn in conns:
            self._timeout_close(conn, code)
        return len(conns)

    def stall(self, count: int | None = None) -> int:
        """Black-hole `count` open sockets (None: all): no pong, no notification leaves them any more (those
        stay in the recovery buffer); the client has to notice by its own pings."""
        conns = self._connections()[:count]
        for conn in conns:
            conn.stalled = True
        return len(conns)

    # ---- views -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            sessions = list(self._sessions.values())
        return {"url": self.url, "sessions": len(sessions),
                "connections": sum(1 for s in sessions if s.connection is not None),
                "buffered": sum(len(s.buffer) for s in sessions), "lost": sum(s.lost for s in sessions),
                **self.counts}
