"""WebSocket bridging (RFC 6455), for JMAP over WebSocket (RFC 8887, Stalwart's /jmap/ws).

The upgrade request runs the chain's request hooks like any request (authentication, policy,
routing, signed identity headers), then goes to the chosen server on a connection of its own
(mutual TLS as always). On its 101 the proxy answers the client's handshake and relays
*messages*, not bytes: each leg has its own frame parser (wsproto), so every complete message
passes the `websocket_message` hook before it is forwarded (the JMAP guard checks each JMAP
request there, as it checks POST /jmap), a message over `limits.websocket_max_message` closes
the session with 1009, and no extension (compression) is negotiated through the proxy. Pings
are answered on each leg by the proxy. A session idle past `limits.push_idle_timeout`, a
draining proxy and a failing security addon close it (1001, 1001, 1011); a lost leg closes the
other (1014, "bad gateway", towards the client).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools
from multidict import CIMultiDict
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from .errors import ProxyError, UpstreamProtocolError, UpstreamTimeout
from .flow import Response
from .http1 import response_head

if TYPE_CHECKING:
    from .addonmanager import AddonManager
    from .flow import Flow
    from .server import HttpProtocol

__all__ = ["WebSocketData", "WebSocketMessage", "accept_token", "is_websocket_upgrade", "Bridge",
           "UpstreamLeg"]

log = logging.getLogger(__name__)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HIGH = 1 << 20  # bytes of parsed messages waiting for the bridge before the sender is paused
_LOW = 256 << 10
_CLOSE_WAIT = 5.0  # seconds a closing handshake may take before the connections are dropped
_MAX_HEAD = 64 << 10
_MAX_REFUSAL_BODY = 1 << 20  # a non-101 answer to the upgrade is relayed up to this size

# close codes (RFC 6455 section 7.4.1; 1014 from the IANA registry)
NORMAL, GOING_AWAY, TOO_BIG, INTERNAL, RESTART, BAD_GATEWAY, POLICY = 1000, 1001, 1009, 1011, 1012, 1014, 1008


def accept_token(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2). Pure."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def is_websocket_upgrade(method: str, upgrade: bytes | None, key: bytes | None, version: bytes | None) -> bool:
    """Whether a request head asks for a WebSocket the proxy can bridge: GET, `Upgrade:
    websocket`, a Sec-WebSocket-Key of 16 bytes (base64) and version 13. Pure."""
    if method != "GET" or upgrade is None or key is None or version is None:
        return False
    if b"websocket" not in [t.strip() for t in upgrade.lower().split(b",")]:
        return False
    if version.strip() != b"13":
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        return False


class WebSocketMessage:
    """One complete message. `content` is bytes (UTF-8 for text messages); an addon may replace
    it (or `text`) or `drop()` it (it is then not forwarded)."""

    __slots__ = ("from_client", "is_text", "content", "dropped", "timestamp")

    def __init__(self, from_client: bool, is_text: bool, content: bytes) -> None:
        self.from_client = from_client
        self.is_text = is_text
        self.content = content
        self.dropped = False
        self.timestamp = time.time()

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    @text.setter
    def text(self, value: str) -> None:
        self.content = value.encode("utf-8")

    def drop(self) -> None:
        self.dropped = True

    def __repr__(self) -> str:
        who = "client" if self.from_client else "server"
        return f"<WebSocketMessage from {who} {'text' if self.is_text else 'binary'} {len(self.content)} bytes>"


class WebSocketData:
    """`flow.websocket` once the handshake is through (mitmproxy's shape). `messages[-1]` is the
    message the `websocket_message` hook is about; unlike mitmproxy, earlier messages are not
    kept (a session can carry gigabytes)."""

    def __init__(self, bridge: "Bridge", subprotocol: str | None) -> None:
        self._bridge = bridge
        self.subprotocol = subprotocol
        self.messages: list[WebSocketMessage] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_by_client: bool | None = None
        self.messages_from_client = 0
        self.messages_from_server = 0

    def inject(self, content: bytes | str, *, to_client: bool = True) -> None:
        """Send a message of the proxy's own (text for str, binary for bytes) to one side, after
        the message being handled (if it is forwarded)."""
        self._bridge.inject(content, to_client)

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        """End the session: both sides get a Close frame with `code` once the current message
        is handled (and any injected messages are sent)."""
        self._bridge.request_close(code, reason)


class UpstreamLeg(asyncio.Protocol):
    """The connection to the server: first the HTTP answer to the upgrade request, then frames."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.bridge: Bridge | None = None
        self.status = 0
        self.reason = ""
        self.raw: list[tuple[bytes, bytes, bytes]] = []
        self.body: list[bytes] = []
        self.trailing = b""
        self.upgraded = False
        self.head = asyncio.get_running_loop().create_future()  # set when the answer is complete
        self._parser = httptools.HttpResponseParser(self)
        self._size = 0
        self.lost = False
        self._write_paused = False
        self._drain: asyncio.Future | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.bridge is not None:
            self.bridge.upstream_data(data)
            return
        if self.head.done():
            self.trailing += data  # frames before the bridge exists (bounded by the read pause)
            if self.transport is not None and len(self.trailing) > _HIGH:
                self.transport.pause_reading()
            return
        self._size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            self.trailing = data[e.args[0]:] if e.args else b""
            self._settle()
        except httptools.HttpParserError:
            self._fail(UpstreamProtocolError("The upstream answered the WebSocket upgrade with invalid HTTP."))
        else:
            if not self.head.done() and self._size > _MAX_HEAD + _MAX_REFUSAL_BODY:
                self._fail(UpstreamProtocolError("The upstream's answer to the WebSocket upgrade is too large."))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(UpstreamProtocolError("The upstream closed the connection during the WebSocket upgrade."))
        if self.bridge is not None:
            self.bridge.leg_lost(from_client=False)
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.bridge is not None:
            self.bridge.proto.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.bridge is not None:
            self.bridge.proto.resume_reading()
        self._wake_drain()

    def _wake_drain(self) -> None:
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            d.set_result(None)

    async def drain(self) -> None:
        if self._write_paused and not self.lost:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    # llhttp callbacks
    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw.append((name.lower(), name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        # (for a real 101, llhttp then reports the upgrade: it is noted before the awaiting
        # coroutine runs; a 101 without it is refused by the caller)
        self._settle()

    def _settle(self) -> None:
        if not self.head.done():
            self.head.set_result(None)

    def _fail(self, err: ProxyError) -> None:
        if not self.head.done():
            self.head.set_exception(err)
            self.head.exception()  # (retrieved: nobody may be waiting any more, and that is fine)
            if self.transport is not None:
                self.transport.abort()

    # what the server-side code uses
    def header(self, lname: bytes) -> bytes | None:
        for ln, _, v in self.raw:
            if ln == lname:
                return v
        return None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def read_answer(leg: UpstreamLeg, timeout: float) -> None:
    """Wait for the server's whole answer to the upgrade request (raises 504 or 502)."""
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(leg.head)
    except TimeoutError:
        leg.abort()
        raise UpstreamTimeout("The upstream did not answer the WebSocket upgrade in time.") from None


def upstream_response(leg: UpstreamLeg) -> Response:
    """The server's answer as a Response (headers scrubbed when read, as for any response)."""
    resp = Response(leg.status, None, None, reason=leg.reason, raw=leg.raw)
    resp.raw_connection = any(ln == b"connection" for ln, _, _ in leg.raw)
    if leg.status != 101:
        resp.body = b"".join(leg.body)
    else:
        resp.body = b""
    return resp


class Bridge:
    """Relays messages between the client (`proto`, the HttpProtocol that read the upgrade) and
    the server (`leg`), through the `websocket_message` hook. Frames are parsed in the transports'
    callbacks; `run()` handles the messages in order, one at a time, so a hook may wait."""

    def __init__(self, proto: "HttpProtocol", leg: UpstreamLeg, flow: "Flow", mgr: "AddonManager",
                 *, max_message: int, idle_timeout: float, subprotocol: str | None) -> None:
        self.proto = proto
        self.leg = leg
        self.flow = flow
        self.mgr = mgr
        self.max_message = max_message
        self.idle_timeout = idle_timeout
        self.client = Connection(ConnectionType.SERVER)
        self.server = Connection(ConnectionType.CLIENT)
        self.data = WebSocketData(self, subprotocol)
        self._events: deque[tuple[bool, Any]] = deque()
        self._queued = 0
        self._paused: set[bool] = set()  # legs whose reading the backlog paused (True: the client)
        self._wake: asyncio.Future | None = None
        self._parts: dict[bool, list] = {True: [], False: []}
        self._part_size = {True: 0, False: 0}
        self._inject: list[tuple[bytes | str, bool]] = []
        self._close: tuple[int, str] | None = None  # asked for by an addon, or by the proxy
        self._closing_since: float | None = None
        self.last_activity = time.monotonic()
        self.bytes_from_client = 0
        self.bytes_from_server = 0

    # ------------------------------------------------------------------ from the transports
    def client_data(self, data: bytes) -> None:
        self._feed(True, data)

    def upstream_data(self, data: bytes) -> None:
        self._feed(False, data)

    def _feed(self, from_client: bool, data: bytes) -> None:
        self.last_activity = time.monotonic()
        conn = self.client if from_client else self.server
        conn.receive_data(data)
        for ev in conn.events():
            self._push(from_client, ev)

    def leg_lost(self, from_client: bool) -> None:
        """One side's TCP connection is gone."""
        self._push(from_client, None)

    def _push(self, from_client: bool, ev: Any) -> None:
        if isinstance(ev, (TextMessage, BytesMessage)):
            n = len(ev.data)
            self._queued += n
            if self._queued > _HIGH and from_client not in self._paused:
                self._paused.add(from_client)
                (self.proto if from_client else self.leg).pause_reading()
        self._events.append((from_client, ev))
        w, self._wake = self._wake, None
        if w is not None and not w.done():
            w.set_result(None)

    # ------------------------------------------------------------------ for addons
    def inject(self, content: bytes | str, to_client: bool) -> None:
        self._inject.append((content, to_client))

    def request_close(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)

    def shutdown(self, code: int = GOING_AWAY, reason: str = "The proxy is shutting down.") -> None:
        """End the session from outside the relay: the proxy drains (1001), or the chain it runs
        on was replaced by a reload (1012, Service Restart: the client reconnects to the new one)."""
        self.request_close(code, reason)
        self._push(True, _Nudge)

    # ------------------------------------------------------------------ the relay
    def _send(self, to_client: bool, event: Any) -> None:
        conn = self.client if to_client else self.server
        if conn.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        try:
            data = conn.send(event)
        except Exception:  # (wsproto refuses a send in a state that does not allow it)
            return
        if to_client:
            self.proto.write_raw(data)
        else:
            self.leg.write(data)

    def _close_both(self, code: int, reason: str) -> None:
        """Start the closing handshake on both legs (each that is still open)."""
        if self._closing_since is None:
            self._closing_since = time.monotonic()
        if self.data.close_code is None:  # the proxy (or an addon) ends it
            self.data.close_code, self.data.close_reason = code, reason
        reason = _close_reason(reason)
        self._send(True, CloseConnection(code=code, reason=reason))
        self._send(False, CloseConnection(code=code, reason=reason))

    def _done(self) -> bool:
        open_ = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING, ConnectionState.LOCAL_CLOSING)
        client_over = self.proto.closed or self.client.state not in open_
        server_over = self.leg.lost or self.server.state not in open_
        return client_over and server_over

    async def run(self) -> None:
        try:
            await self._relay()
        finally:  # (also when the client left and the cycle was cancelled)
            self._send(False, CloseConnection(code=GOING_AWAY, reason="The client went away."))
            self.leg.close()

    async def _relay(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._done():
            if self._close is not None and self._closing_since is None:
                code, reason = self._close
                self._close_both(code, reason)
            if not self._events:
                now = time.monotonic()
                if self._closing_since is not None:
                    deadline = self._closing_since + _CLOSE_WAIT
                else:
                    deadline = self.last_activity + self.idle_timeout
                if now >= deadline:
                    if self._closing_since is not None:
                        return  # the other side never finished the closing handshake
                    self.request_close(GOING_AWAY, "The WebSocket was idle too long.")
                    continue
                self._wake = loop.create_future()
                try:
                    await asyncio.wait_for(self._wake, deadline - now)
                except asyncio.TimeoutError:
                    pass
                continue
            from_client, ev = self._events.popleft()
            await self._handle(from_client, ev)

    async def _handle(self, from_client: bool, ev: Any) -> None:
        if ev is _Nudge:
            return
        to_client = not from_client
        if ev is None:  # that side's connection is gone: close the other
            if from_client:  # (the relay then waits, a little, for the server's answering close)
                self._send(False, CloseConnection(code=GOING_AWAY, reason="The client went away."))
                if self.data.close_code is None:
                    self.data.close_code, self.data.closed_by_client = 1006, True
                if self._closing_since is None:
                    self._closing_since = time.monotonic()
            else:
                self._send(True, CloseConnection(code=BAD_GATEWAY, reason="The upstream connection was lost."))
                if self._closing_since is None:
                    self._closing_since = time.monotonic()
            return
        if isinstance(ev, Ping):
            self._send(from_client, ev.response())  # answered on the same leg
            return
        if isinstance(ev, CloseConnection):
            # pass the close on, and complete the handshake on the side that started it
            if self.data.closed_by_client is None:
                self.data.closed_by_client = from_client
            if self.data.close_code is None:
                self.data.close_code, self.data.close_reason = ev.code, ev.reason or ""
            code = ev.code if ev.code not in (1005, 1006, 1015) else NORMAL
            self._send(to_client, CloseConnection(code=code, reason=ev.reason or ""))
            self._send(from_client, ev.response())
            if self._closing_since is None:
                self._closing_since = time.monotonic()
            return
        if not isinstance(ev, (TextMessage, BytesMessage)):
            return  # Pong, or anything else wsproto reports: nothing to relay
        n = len(ev.data)
        self._queued -= n
        if self._queued < _LOW and from_client in self._paused:
            self._paused.discard(from_client)
            (self.proto if from_client else self.leg).resume_reading()
        if self._closing_since is not None:
            return  # closing: data frames are no longer relayed
        parts = self._parts[from_client]
        parts.append(ev.data)
        self._part_size[from_client] += n
        if self._part_size[from_client] > self.max_message:
            self.request_close(TOO_BIG, f"A message is larger than {self.max_message} bytes.")
            return
        if not ev.message_finished:
            return
        is_text = isinstance(ev, TextMessage)
        content = "".join(parts).encode("utf-8") if is_text else b"".join(parts)
        parts.clear()
        self._part_size[from_client] = 0
        msg = WebSocketMessage(from_client, is_text, content)
        if from_client:
            self.data.messages_from_client += 1
            self.bytes_from_client += len(content)
        else:
            self.data.messages_from_server += 1
            self.bytes_from_server += len(content)
        if "websocket_message" in self.mgr.present:
            self.data.messages = [msg]
            try:
                await self.mgr.run("websocket_message", self.flow)
            except ProxyError as e:  # a refusal, or a security addon that failed: fail closed
                code = INTERNAL if e.status >= 500 else POLICY
                log.warning("websocket %s: message refused (%s), closing with %d", self.flow.id, e.code, code)
                msg.dropped = True
                self._inject.clear()
                self.request_close(code, e.detail if e.status < 500 else "The message could not be processed.")
        if not msg.dropped:
            self._send(to_client, Message(data=msg.text if msg.is_text else msg.content))
        injected, self._inject = self._inject, []
        for content_, to_c in injected:
            self._send(to_c, Message(data=content_))
        await (self.proto.drain() if to_client else self.leg.drain())


def _close_reason(reason: str) -> str:
    """A close frame's reason fits in 123 bytes of UTF-8 (RFC 6455 section 5.5). Pure."""
    return reason.encode("utf-8")[:123].decode("utf-8", "ignore")


class _NudgeType:
    """Wakes the relay without a message (shutdown)."""


_Nudge = _NudgeType()


def client_101(resp: Response, request_id: str, key: bytes) -> bytes:
    """The 101 the client gets: the server's headers (scrubbed), no extension, our accept."""
    h: CIMultiDict = resp.headers
    for name in ("Sec-WebSocket-Extensions", "Sec-WebSocket-Accept", "Content-Length", "Transfer-Encoding"):
        h.popall(name, None)
    h["Upgrade"] = "websocket"
    h["Connection"] = "Upgrade"
    h["Sec-WebSocket-Accept"] = accept_token(key).decode("ascii")
    h["X-Request-ID"] = request_id
    return response_head(101, "Switching Protocols", h)
