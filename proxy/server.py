"""The downstream leg: HTTP/1.1 (plain or TLS) as an asyncio Protocol with llhttp (httptools),
and the request cycle that runs the addon chain around the upstream exchange.

One cycle per request, sequential per connection (pipelined requests queue). Bodies stream both
ways with back-pressure unless an addon asks for them buffered.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator

import httptools
from multidict import CIMultiDict

from .errors import (BadRequest, HeadersTooLarge, InternalError, PayloadTooLarge, ProxyError,
                     UpstreamProtocolError, UpstreamTimeout, UpstreamTooLarge, to_response)
from .flow import Flow, Request, Response
from .http1 import (forwarded_client, names_headers, reason_phrase, request_head, request_scrubber, response_head,
                    response_scrubber, rewrite_location, status_line, trace_id_of, valid_request_id)
from .breaker import Circuit
from .health import FALLBACKS
from .jmap import route_class
from .upstream import IDEMPOTENT, NotSent
from . import websocket

if TYPE_CHECKING:
    from .addonmanager import AddonManager
    from .breaker import ServerState
    from .engine import Engine
    from .target import Target
    from .upstream import UpstreamConnection, UpstreamResponse

__all__ = ["HttpProtocol", "RequestBody"]

log = logging.getLogger(__name__)

_BODY_HIGH = 256 << 10
_BODY_LOW = 64 << 10
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NEVER = float("inf")
_RESP_OWN = frozenset({b"x-request-id"})
_RESP_OWN_CHUNKED = frozenset({b"x-request-id", b"content-length"})
_ENGINE_READS = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect", b"x-request-id",
                           b"connection", b"upgrade", b"sec-websocket-key", b"sec-websocket-version",
                           b"traceparent"})
# what the engine sets itself on the upstream request (dropped from the client's, then added)
_ENGINE_SETS = frozenset({b"host", b"x-request-id", b"expect", b"content-length", b"transfer-encoding"})
# names whose value the engine decides on the upstream request (an addon's set_header() of one of
# these is resolved on the materialised headers instead of the raw bytes)
_ENGINE_OWNED = _ENGINE_SETS | {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
_RID_PREFIX = os.urandom(6).hex()  # per process, so ids stay unique across workers
_rid_counter = itertools.count(1)


# where a Task takes over a request's cycle (see HttpProtocol._fast)
_REQUESTHEADERS, _REQUEST, _FORWARD, _RESPONSEHEADERS, _RESPONSE, _SEND = range(6)


class _At:
    """A point in the cycle: the stage, and within a hook the addon index and the awaitable it
    returned; the upstream response once there is one; the server already picked for _FORWARD."""

    __slots__ = ("stage", "index", "pending", "up", "picked")

    def __init__(self, stage: int, index: int = 0, pending: Any = None, up: "UpstreamResponse | None" = None,
                 picked: "tuple[Target, ServerState | None] | None" = None) -> None:
        self.stage = stage
        self.index = index
        self.pending = pending
        self.up = up
        self.picked = picked


# the raw-head scrubbers of the two legs, kept (http1.raw_request_head/raw_response_head, minus two calls)
_REQUEST_SCRUB = request_scrubber(_ENGINE_SETS)
_RESPONSE_SCRUB = response_scrubber(_RESP_OWN)
_RESPONSE_SCRUB_CHUNKED = response_scrubber(_RESP_OWN_CHUNKED)
_HOST_LINES: dict[tuple, bytes] = {}


def _host_line(target: "Target") -> bytes:
    line = _HOST_LINES.get(target.key)
    if line is None:
        line = f"Host: {target.authority}\r\n".encode("latin-1")
        if len(_HOST_LINES) < 1024:
            _HOST_LINES[target.key] = line
    return line


def _forwarded(client: str, scheme: str) -> bytes:
    """The X-Forwarded-For and X-Forwarded-Proto lines the upstream gets: exactly one of each."""
    return f"X-Forwarded-For: {client}\r\nX-Forwarded-Proto: {scheme}\r\n".encode("latin-1")


def new_request_id() -> str:
    """24 hex characters: a random per-process prefix and a counter (cheaper than urandom per request)."""
    return f"{_RID_PREFIX}{next(_rid_counter):012x}"


class RequestBody:
    """A client request body arriving from the parser, read by the cycle; pauses the client
    connection when too much is buffered."""

    __slots__ = ("_proto", "_chunks", "_size", "eof", "_waiter", "received", "_continue")

    def __init__(self, proto: "HttpProtocol", expect_continue: bool) -> None:
        self._proto = proto
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.eof = False
        self._waiter: asyncio.Future | None = None
        self.received = 0
        self._continue = expect_continue

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.received += len(data)
        if self._size > _BODY_HIGH:
            self._proto.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def complete(self) -> bool:
        return self.eof

    def take_all(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._proto.resume_reading()  # a large body may have paused the connection
        return data

    def _send_continue(self) -> None:
        if self._continue:
            self._continue = False
            self._proto.write_raw(_CONTINUE)

    async def read(self) -> bytes:
        """The next chunk, or b'' at the end."""
        self._send_continue()
        while not self._chunks:
            if self.eof:
                return b""
            if self._proto.closed:
                raise asyncio.CancelledError()
            self._waiter = asyncio.get_running_loop().create_future()
            self._proto.resume_reading()
            await self._waiter
            self._waiter = None
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._size < _BODY_LOW:
            self._proto.resume_reading()
        return chunk

    async def read_all(self, cap: int) -> bytes:
        parts = []
        total = 0
        while True:
            chunk = await self.read()
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > cap:
                raise PayloadTooLarge(f"The request body exceeds {cap} bytes.")
            parts.append(chunk)


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, engine: "Engine", scheme: str) -> None:
        self.engine = engine
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self._trusted = False  # the peer is a trusted proxy: its X-Forwarded-For names the client
        self.closed = False
        self._url = b""
        self._limits = engine.config.limits
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._parsing: RequestBody | None = None
        self._queue: deque[tuple[Flow, RequestBody | None, bool]] = deque()
        self._task: asyncio.Task | None = None
        self._write_paused = False
        self._drain: asyncio.Future | None = None
        self._reading_paused = False
        self._upstream: UpstreamConnection | None = None
        self.deadline = _NEVER
        self._must_close = False
        self._busy = False
        self._pending: tuple[Flow, RequestBody | None, bool] | None = None  # parsed, started after the feed
        # the request in progress: its flow, body, chain generation, and (on the path without a
        # Task) the upstream exchange it waits for: (connection, target, server state)
        self._flow: Flow | None = None
        self._body: RequestBody | None = None
        self._gen: Any = None
        self._exchange: tuple[UpstreamConnection, Target, ServerState | None] | None = None
        # a WebSocket upgrade: the client's bytes after its request head (None: plain HTTP), and
        # the bridge once the handshake is through
        self._after_upgrade: bytearray | None = None
        self._ws: websocket.Bridge | None = None

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.scheme == "https":
            tls = transport.get_extra_info("ssl_object")
            if tls is not None and tls.selected_alpn_protocol() == "h2":  # (tls.http2 offered it)
                from .http2 import H2Protocol
                h2 = H2Protocol(self.engine, self.scheme)
                transport.set_protocol(h2)
                h2.connection_made(transport)
                return
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self._forwarded = _forwarded(self.peer, self.scheme)
        trusted = self.engine.trusted_proxies
        self._trusted = bool(trusted) and self.peer in trusted
        self.engine.connections.add(self)
        self._arm(self.engine.config.limits.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine.connections.discard(self)
        self._disarm()
        if self._parsing is not None:
            self._parsing._wake()
        if self._ws is not None:  # the bridge ends the server's side with a closing handshake
            self._ws.leg_lost(from_client=True)
        elif self._task is not None and not self._task.done():
            self._task.cancel()
        ex, self._exchange = self._exchange, None
        if ex is not None:  # waiting for upstream without a Task: the client went away
            conn = ex[0]
            conn._listener = None
            conn.abort()
            self._upstream = None
            self._end(self._flow, 499)  # type: ignore[arg-type]
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            d.set_result(None)

    # Idle and header-read deadlines are checked by the engine's sweeper (Engine._sweep) instead
    # of a timer per request: setting one is a float store.
    def _arm(self, seconds: float) -> None:
        self.deadline = self.loop.time() + seconds

    def _disarm(self) -> None:
        self.deadline = _NEVER

    def expire(self, now: float) -> None:
        """Close the connection if it is idle (or stuck in its request head) past its deadline."""
        if not self._busy and now >= self.deadline and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._after_upgrade is not None:  # WebSocket frames, not HTTP
            if self._ws is not None:
                self._ws.client_data(data)
            else:  # the handshake is still going on: keep them for the bridge
                self._after_upgrade += data
                if len(self._after_upgrade) > _BODY_HIGH:
                    self.pause_reading()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            last = self._queue[-1] if self._queue else self._pending or (self._flow, None, False)
            if last[0] is not None and last[0].request.websocket:
                # a WebSocket upgrade the proxy bridges: what follows the head is the client's
                # first frames (nothing more is read as HTTP on this connection)
                self._after_upgrade = bytearray(data[e.args[0]:] if e.args else b"")
            # any other upgrade is not offered: the request was handled as plain HTTP; close after it
            self._must_close = True
        except httptools.HttpParserError as e:
            # llhttp wraps what a callback raised (HeadersTooLarge, BadRequest) as its context
            cause = e.__context__
            self._reject(cause if isinstance(cause, ProxyError)
                         else BadRequest("The request is not valid HTTP/1.1."))
        p = self._pending
        if p is not None:
            # started once this turn of the loop has read everything that is ready (and outside
            # llhttp's callbacks, which wrap what they raise): the upstream writes of a burst of
            # requests go out together, and the peers are woken once per burst, not per request
            self._pending = None
            self.loop.call_soon(self._launch, *p)

    def _reject(self, err: ProxyError) -> None:
        """A parse-level failure: answer without a cycle and close."""
        if self._busy or self.transport is None:
            if self.transport is not None:
                self.transport.close()
            return
        rid = new_request_id()
        status, headers, body = to_response(err, rid)
        headers += [("X-Request-ID", rid), ("Content-Length", str(len(body))), ("Connection", "close")]
        self.transport.write(response_head(status, "", headers) + body)
        self.transport.close()
        self.engine.metrics.observe_request("other", "OTHER", status, 0.0)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            d.set_result(None)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            await self._drain

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    # ------------------------------------------------------------------ llhttp callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._h = {}
        self._names = False  # a Connection header names a header (beyond Keep-Alive)
        limits = self._limits = self.engine.config.limits  # (this request's, whatever a reload does)
        self.deadline = self.loop.time() + limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header_bytes:
            raise HeadersTooLarge("The request line and headers are too large.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        limits = self._limits
        if self._header_bytes > limits.max_header_bytes or len(self._headers) >= limits.max_headers:
            raise HeadersTooLarge("The request headers are too large.")
        ln = name.lower()
        self._headers.append((ln, name, value))
        if ln in _ENGINE_READS:
            if ln == b"connection":
                if names_headers(value):
                    self._names = True
            elif ln not in self._h:
                self._h[ln] = value

    def on_headers_complete(self) -> None:
        if not self._busy and not self._queue:
            self._disarm()
        parser = self.parser
        h = self._h
        method = parser.get_method().decode("ascii", "replace")
        target = self._url.decode("latin-1")
        host = h.get(b"host")
        client = self.peer
        if self._trusted:  # a load balancer in front: the client is in its X-Forwarded-For
            xff = [v for ln, _, v in self._headers if ln == b"x-forwarded-for"]
            if xff:
                client = forwarded_client(client, xff, self.engine.trusted_proxies)
        req = Request(method, target, raw=self._headers, http_version=parser.get_http_version(),
                      scheme=self.scheme, host=host.decode("latin-1") if host else "", peer=client)
        req.raw_connection = self._names
        if parser.should_upgrade() and b"upgrade" in h and not (b"content-length" in h or b"transfer-encoding" in h):
            req.websocket = websocket.is_websocket_upgrade(method, h.get(b"upgrade"), h.get(b"sec-websocket-key"),
                                                           h.get(b"sec-websocket-version"))
        cl = h.get(b"content-length")
        te = h.get(b"transfer-encoding")
        if te is not None:
            req.chunked = b"chunked" in te.lower()
        elif cl is not None:
            try:
                req.content_length = int(cl)
            except ValueError:
                raise BadRequest("Invalid Content-Length.") from None
        body = None
        if req.chunked or req.content_length:
            expect = h.get(b"expect", b"").lower() == b"100-continue"
            body = self._parsing = RequestBody(self, expect)
        keep_alive = parser.should_keep_alive()
        rid_b = h.get(b"x-request-id")
        rid = rid_b.decode("latin-1") if rid_b is not None else None
        if rid is None or not valid_request_id(rid):
            rid = new_request_id()
        flow = Flow(req, id=rid, client_addr=client)  # type: ignore[arg-type]
        flow.route = route_class(req.path, self.engine.jmap_path)
        tp = h.get(b"traceparent")
        if tp is not None:  # (passed on as it came; its trace id goes into the logs)
            flow.trace_id = trace_id_of(tp)
        if self._busy:
            self._queue.append((flow, body, keep_alive))
            self.pause_reading()  # one request ahead at most
        else:
            self._busy = True
            self._pending = (flow, body, keep_alive)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.feed_eof()
            self._parsing = None

    # ------------------------------------------------------------------ the request cycle
    # A request runs without a Task for as long as nothing has to wait (`_fast`): the chain's hooks
    # answer synchronously, the body is here, an idle upstream connection is ready; the upstream
    # connection then calls back (upstream_done/upstream_head/upstream_failed). The first thing
    # that must wait hands the rest of the cycle to a Task (`_spawn`), which takes over at that
    # point (`_At`): same hooks, same order, same errors either way.

    def _launch(self, flow: Flow, body: RequestBody | None, keep_alive: bool) -> None:
        if self.closed:  # the client left before its request started
            return
        self._busy = True
        eng = self.engine
        gen = self._gen = eng.generation  # the chain this request keeps to its end, whatever a reload swaps in
        gen.in_flight += 1
        eng.in_flight += 1
        eng.metrics.in_flight_value = eng.in_flight
        if not keep_alive:
            self._must_close = True
        flow.upstream = eng.default_target
        self._flow = flow
        self._body = body
        if flow.request.websocket:
            self._must_close = True  # nothing follows a WebSocket on this connection
            task = self._task = self.loop.create_task(self._ws_cycle(flow))
            task.add_done_callback(lambda _t: self._end(flow, 499))
        elif body is None or body.complete:
            self._fast(flow, body)
        else:  # a body still arriving: streamed (or buffered) by the Task
            self._spawn(flow, body, None)

    def _end(self, flow: Flow, status: int) -> None:
        """The request is over (answered, failed or abandoned): count it, log it, go on."""
        if self._flow is not flow:
            return  # ended already
        eng = self.engine
        gen = self._gen
        gen.in_flight -= 1
        eng.in_flight -= 1
        eng.metrics.in_flight_value = eng.in_flight
        elapsed = time.perf_counter() - flow.started
        eng.metrics.observe_request(flow.route, flow.request.method, status, elapsed)
        eng.log_access(flow, status, elapsed)
        if flow._finalizers is not None:
            flow.finish()
        self._upstream = None
        self._flow = self._body = None
        self._exchange = None
        self._ws = None
        self._next()

    def _next(self) -> None:
        self._busy = False
        self._task = None
        if self.closed:
            return
        if self._must_close or self.engine.draining:
            if self.transport is not None:
                self.transport.close()
            return
        if self._queue:
            flow, body, keep_alive = self._queue.popleft()
            self.resume_reading()
            self._launch(flow, body, keep_alive)
        else:
            self._arm(self.engine.config.limits.keepalive_timeout)

    def _spawn(self, flow: Flow, body: RequestBody | None, at: "_At | None",
               err: BaseException | None = None) -> None:
        """The rest of the cycle in a Task, from `at` (None: from the start, or straight to
        answering `err`)."""
        task = self._task = self.loop.create_task(self._cycle(flow, body, at, err))
        # cancelled before its first step, a coroutine runs no finally: end the request here then
        task.add_done_callback(lambda _t: self._end(flow, 499))

    def _fast(self, flow: Flow, body: RequestBody | None) -> None:
        mgr = self._gen.addons
        present = mgr.present
        req = flow.request
        try:
            if "requestheaders" in present:
                r = mgr.run_sync("requestheaders", flow)
                if r is not None:
                    return self._spawn(flow, body, _At(_REQUESTHEADERS, r[0], r[1]))
            if flow.response is None:
                cap = req.body_cap
                if cap is not None:
                    data = body.take_all() if body is not None else b""
                    if len(data) > cap:
                        raise PayloadTooLarge(f"The request body exceeds {cap} bytes.")
                    req.body = data
                    flow.bytes_in = len(data)
                if "request" in present:
                    r = mgr.run_sync("request", flow)
                    if r is not None:
                        return self._spawn(flow, body, _At(_REQUEST, r[0], r[1]))
            if flow.response is not None:  # an addon answered
                return self._spawn(flow, body, _At(_FORWARD))
            self._fast_forward(flow, body)
        except Exception as e:
            self._spawn(flow, body, None, e)

    def _fast_forward(self, flow: Flow, body: RequestBody | None) -> None:
        """Send the request on an idle pooled connection and let it call back; without one (or
        with a body still to stream) the Task connects and sends it."""
        eng = self.engine
        req = flow.request
        primary = flow.upstream or eng.default_target
        picked = eng.health.pick(primary, flow.metadata.get(FALLBACKS), time.monotonic())
        target = picked[0]
        flow.upstream = target
        if target is not primary:
            eng.audit.event("routing.failover", flow, primary=primary.origin, reason="unhealthy_or_open")
        conn = eng.pool.take_idle(target)
        if conn is None:
            return self._spawn(flow, body, _At(_FORWARD, picked=picked))
        data = req.body
        if data is None:
            data = body.take_all() if body is not None else None
            if data is not None:
                req.body = data  # (a replay on another connection sends it again)
        framing = self._framing(flow, data, None)
        head = self._request_head(flow, target, framing)
        self._exchange = (conn, target, picked[1])
        self._upstream = conn
        conn.start(req.method, head, data, eng.pool.opts.response_timeout, self)

    def _exchanged(self, flow: Flow, conn: "UpstreamConnection", target: "Target",
                   st: "ServerState | None", up: "UpstreamResponse") -> None:
        """Book a response head from `target` (what UpstreamPool.exchange and _forward do)."""
        dt = time.perf_counter() - conn.started
        flow.upstream_ms = dt * 1000
        self.engine.metrics.upstream_seconds.observe((target.name,), dt)
        self._answered(flow, target, st, up.status)

    def _answered(self, flow: Flow, target: "Target", st: "ServerState | None", status: int) -> None:
        """`target` answered `status`: its health, and the count by target and status."""
        if st is not None:
            if status < 500:
                st.success(time.monotonic())
            else:
                st.answered(status, flow.client_addr, time.monotonic())
        self.engine.metrics.upstream_requests.inc((target.name, str(status)))

    # UpstreamConnection's listener callbacks (the path without a Task)
    def upstream_done(self, conn: "UpstreamConnection") -> None:
        """The whole response is here: the response hooks, then one write to the client."""
        ex, self._exchange = self._exchange, None
        flow = self._flow
        if ex is None or ex[0] is not conn or flow is None:
            return
        body = self._body
        try:
            up = conn.response()
            self._exchanged(flow, conn, ex[1], ex[2], up)
            flow.response = resp = self._upstream_response(flow, up)
            mgr = self._gen.addons
            present = mgr.present
            if "responseheaders" in present:
                r = mgr.run_sync("responseheaders", flow)
                if r is not None:
                    return self._spawn(flow, body, _At(_RESPONSEHEADERS, r[0], r[1], up))
            resp = flow.response
            if resp.body_cap is not None and resp.body is None:
                if flow.request.method == "HEAD" or up.status in _NO_BODY_STATUS:
                    resp.body = b""
                else:
                    data = conn.buffered()
                    if len(data) > resp.body_cap:
                        conn.close()
                        raise UpstreamTooLarge("The upstream response is larger than the proxy may buffer.")
                    resp.body = data
                self._finish_upstream(up)
            if "response" in present:
                r = mgr.run_sync("response", flow)
                if r is not None:
                    return self._spawn(flow, body, _At(_RESPONSE, r[0], r[1], up))
            status = self._send_now(flow, flow.response, up)
        except Exception as e:
            return self._spawn(flow, body, None, e)
        if status is None:
            return self._spawn(flow, body, _At(_SEND, up=up))
        self._end(flow, status)

    def upstream_head(self, conn: "UpstreamConnection") -> None:
        """Only the head is here (a large or slow body): the Task streams it."""
        ex, self._exchange = self._exchange, None
        flow = self._flow
        if ex is None or ex[0] is not conn or flow is None:
            return
        try:
            up = conn.response()
            self._exchanged(flow, conn, ex[1], ex[2], up)
            flow.response = self._upstream_response(flow, up)
        except Exception as e:
            return self._spawn(flow, self._body, None, e)
        self._spawn(flow, self._body, _At(_RESPONSEHEADERS, up=up))

    def upstream_failed(self, conn: "UpstreamConnection", err: ProxyError) -> None:
        ex = self._exchange
        flow = self._flow
        if ex is None or ex[0] is not conn or flow is None:
            return  # not (or no longer) waiting for this connection
        self._exchange = None
        self._upstream = None
        _, target, st = ex
        eng = self.engine
        flow.upstream_ms = (time.perf_counter() - conn.started) * 1000
        if isinstance(err, UpstreamProtocolError):
            conn.close()
            if flow.request.method in IDEMPOTENT and not conn._got_bytes:
                # a pooled connection that died before answering: the request is sent again on
                # another one (UpstreamPool.exchange's one replay)
                return self._spawn(flow, self._body, _At(_FORWARD, picked=(target, st)))
            eng.metrics.upstream_errors.labels(target.name, "protocol").inc()
        conn.close()
        eng.health.failed(st, err, flow.client_addr)
        self._spawn(flow, self._body, None, err)

    async def _cycle(self, flow: Flow, body: RequestBody | None, at: "_At | None",
                     err: BaseException | None) -> None:
        gen = self._gen
        status = 0
        # set once the chain is through; until then the exchange in progress, if any, is
        # self._upstream (None again once its connection went back to the pool)
        up: UpstreamResponse | None = None
        head_sent = False
        try:
            try:
                if err is not None:
                    raise err
                up = await self._run_chain(flow, body, gen.addons, at)
                resp = flow.response
                assert resp is not None
                if body is not None and not body.complete:
                    self._must_close = True  # unread request body: cannot reuse the connection
                head_sent = True
                status = await self._send(flow, resp, up)
            except ProxyError as e:
                if not head_sent:
                    status = await self._fail(flow, e, up, gen.addons)
                else:  # the upstream failed mid-body (_send aborted the client connection): no bug of ours
                    flow.error = e
                    status = flow.response.status if flow.response is not None else e.status
                    log.warning("request %s %s %s: %s after the response head; connection aborted",
                                flow.id, flow.request.method, flow.request.path, e.code)
                    self._must_close = True
                    self._abort_upstream()
        except asyncio.CancelledError:
            status = status or 499  # the client went away
            self._abort_upstream()
        except Exception as e:  # a bug of ours: never leave the client hanging
            log.error("request %s failed unexpectedly", flow.id, exc_info=e)
            self._abort_upstream()
            if not head_sent and not self.closed:
                status = await self._fail(flow, InternalError("The request could not be processed."), None,
                                          gen.addons)
            else:
                status = status or 500
                self._must_close = True
                if self.transport is not None:
                    self.transport.abort()
            flow.error = flow.error or e
        finally:
            self._end(flow, status)

    async def _ws_cycle(self, flow: Flow) -> None:
        """A WebSocket upgrade (proxy.websocket): the request hooks, the handshake with the
        server on a connection of its own, then the bridge until either side closes. Until the
        101 is out, failures are answered like any request's."""
        mgr = self._gen.addons
        status = 0
        try:
            try:
                if mgr.has("requestheaders"):
                    await mgr.run("requestheaders", flow)
                if flow.response is None and mgr.has("request"):
                    await mgr.run("request", flow)
                if flow.response is None:
                    status = await self._ws_upstream(flow, mgr)
                else:  # an addon answered (a refusal, typically)
                    await self._run_chain(flow, None, mgr, _At(_RESPONSEHEADERS))
                    status = await self._send(flow, flow.response, None)  # type: ignore[arg-type]
            except ProxyError as e:
                if status:
                    raise
                status = await self._fail(flow, e, None, mgr)
        except asyncio.CancelledError:
            status = status or 499
        except Exception as e:  # a bug of ours: never leave the client hanging
            log.error("websocket %s failed unexpectedly", flow.id, exc_info=e)
            flow.error = flow.error or e
            if not status and not self.closed:
                status = await self._fail(flow, InternalError("The request could not be processed."), None, mgr)
            status = status or 500
        finally:
            self._abort_upstream()
            self._end(flow, status)

    async def _ws_upstream(self, flow: Flow, mgr: "AddonManager") -> int:
        eng = self.engine
        req = flow.request
        target, st = eng.health.pick(flow.upstream or eng.default_target, flow.metadata.get(FALLBACKS),
                                     time.monotonic())
        flow.upstream = target
        key = req.header("Sec-WebSocket-Key") or ""
        h = req.headers
        h.popall("Sec-WebSocket-Extensions", None)  # messages are parsed here: no compression through the proxy
        head = self._request_head(flow, target, [("Connection", "Upgrade"), ("Upgrade", "websocket")])
        t0 = time.perf_counter()
        try:
            leg = await eng.pool._connect(target, websocket.UpstreamLeg)
        except ProxyError as e:
            eng.health.failed(st, e, flow.client_addr)
            raise
        self._upstream = leg  # type: ignore[assignment]  # (pause/resume/abort, like a pooled connection)
        leg.write(head)
        try:
            await websocket.read_answer(leg, eng.pool.opts.response_timeout)
        except ProxyError as e:
            eng.health.failed(st, e, flow.client_addr)
            raise
        flow.upstream_ms = (time.perf_counter() - t0) * 1000
        self._answered(flow, target, st, leg.status)
        flow.response = websocket.upstream_response(leg)
        if leg.status == 101:
            accept = leg.header(b"sec-websocket-accept")
            if not leg.upgraded or accept is None or accept.strip() != websocket.accept_token(key.encode("latin-1")):
                raise UpstreamProtocolError("The upstream's WebSocket handshake is not valid.")
            if leg.header(b"sec-websocket-extensions"):
                raise UpstreamProtocolError("The upstream negotiated a WebSocket extension it was not offered.")
        await self._run_chain(flow, None, mgr, _At(_RESPONSEHEADERS))
        resp = flow.response
        if resp.status != 101 or leg.status != 101:  # refused by the server (or by an addon)
            leg.close()
            self._upstream = None
            return await self._send(flow, resp, None)
        proto = resp.headers.get("Sec-WebSocket-Protocol")
        self.write_raw(websocket.client_101(resp, flow.id, key.encode("latin-1")))
        limits = self._limits
        bridge = self._ws = websocket.Bridge(self, leg, flow, mgr, max_message=limits.websocket_max_message,
                                             idle_timeout=limits.push_idle_timeout, subprotocol=proto)
        flow.websocket = bridge.data
        leg.bridge = bridge
        early, self._after_upgrade = self._after_upgrade, bytearray()
        if early:
            bridge.client_data(bytes(early))
        if leg.trailing:
            bridge.upstream_data(leg.trailing)
            leg.resume_reading()
        if leg.lost:
            bridge.leg_lost(from_client=False)
        self.resume_reading()
        eng.metrics.websockets_open += 1
        eng.audit.event("websocket.opened", flow, subprotocol=proto)
        try:
            if mgr.has("websocket_start"):
                try:
                    await mgr.run("websocket_start", flow)
                except ProxyError as e:  # refused, or a security addon failed: close at once
                    bridge.request_close(websocket.INTERNAL if e.status >= 500 else websocket.POLICY,
                                         e.detail if e.status < 500 else "The session could not be set up.")
            await bridge.run()
        finally:
            self._upstream = None  # (bridge.run closed it, after a close frame: no abort)
            eng.metrics.websockets_open -= 1
            flow.bytes_in, flow.bytes_out = bridge.bytes_from_client, bridge.bytes_from_server
            eng.metrics.websocket_messages.inc(("client",), bridge.data.messages_from_client)
            eng.metrics.websocket_messages.inc(("server",), bridge.data.messages_from_server)
            eng.audit.event("websocket.closed", flow, close_code=bridge.data.close_code,
                            closed_by_client=bridge.data.closed_by_client,
                            messages_from_client=bridge.data.messages_from_client,
                            messages_from_server=bridge.data.messages_from_server)
            if mgr.has("websocket_end"):
                try:
                    await mgr.run("websocket_end", flow)
                except Exception:
                    log.exception("websocket_end hook failed for %s", flow.id)
            if self.transport is not None:
                self.transport.close()
        return 101

    def _abort_upstream(self) -> None:
        """Drop the connection of an exchange that cannot finish: self._upstream, set while one
        is in progress and cleared once its connection is back in the pool (_finish_upstream),
        so a pooled connection, maybe carrying another request by now, is never touched."""
        conn, self._upstream = self._upstream, None
        if conn is not None:
            conn.abort()

    async def _run_chain(self, flow: Flow, body: RequestBody | None, mgr: "AddonManager",
                         at: "_At | None" = None) -> "UpstreamResponse | None":
        if at is None:
            at = _At(_REQUESTHEADERS)
        stage, up = at.stage, at.up
        if stage == _SEND:
            return up
        req = flow.request
        if stage == _REQUESTHEADERS:
            if at.pending is not None or mgr.has("requestheaders"):
                await mgr.run("requestheaders", flow, at.index, at.pending)
            if flow.response is None and req.body_cap is not None:
                if body is not None:
                    req.body = await body.read_all(req.body_cap)
                    flow.bytes_in = len(req.body)
                else:
                    req.body = b""
            stage, at = _REQUEST, _At(_REQUEST)
        if stage == _REQUEST:
            if flow.response is None and (at.pending is not None or mgr.has("request")):
                await mgr.run("request", flow, at.index, at.pending)
            stage = _FORWARD
        if stage == _FORWARD:
            if flow.response is None:
                up = await self._forward(flow, body, at.picked)
                flow.response = self._upstream_response(flow, up)
            stage, at = _RESPONSEHEADERS, _At(_RESPONSEHEADERS)
        if stage == _RESPONSEHEADERS:
            if at.pending is not None or mgr.has("responseheaders"):
                await mgr.run("responseheaders", flow, at.index, at.pending)
            resp = flow.response
            assert resp is not None
            if up is not None and resp.body_cap is not None and resp.body is None:
                if flow.request.method == "HEAD" or up.status in _NO_BODY_STATUS:
                    resp.body = b""
                else:
                    resp.body = await up.conn.read_all(resp.body_cap)
                self._finish_upstream(up)
            stage, at = _RESPONSE, _At(_RESPONSE)
        if stage == _RESPONSE:
            if at.pending is not None or mgr.has("response"):
                await mgr.run("response", flow, at.index, at.pending)
        return up

    def _upstream_response(self, flow: Flow, up: "UpstreamResponse") -> Response:
        resp = Response(up.status, None, None, reason=up.reason, raw=up.raw)
        resp.raw_connection = up.connection
        if up.location:
            rh = resp.headers
            rh["Location"] = rewrite_location(rh["Location"], flow.upstream.origin)  # type: ignore[union-attr]
        return resp

    def _framing(self, flow: Flow, data: bytes | None, stream: object) -> list[tuple[str, str]]:
        req = flow.request
        framing: list[tuple[str, str]] = []
        if data is not None:
            if data or req.method in ("POST", "PUT", "PATCH"):
                framing.append(("Content-Length", str(len(data))))
            flow.bytes_in = len(data)
        elif stream is not None:
            if req.content_length is None:
                framing.append(("Transfer-Encoding", "chunked"))
            else:
                framing.append(("Content-Length", str(req.content_length)))
        return framing

    async def _forward(self, flow: Flow, body: RequestBody | None,
                       picked: "tuple[Target, ServerState | None] | None" = None) -> "UpstreamResponse":
        eng = self.engine
        req = flow.request
        health = eng.health
        primary = flow.upstream or eng.default_target
        now = time.monotonic()
        target, st = picked or health.pick(primary, flow.metadata.get(FALLBACKS), now)
        flow.upstream = target
        if picked is None and target is not primary:
            eng.audit.event("routing.failover", flow, primary=primary.origin, reason="unhealthy_or_open")
        stream: AsyncIterator[bytes] | None = None
        data: bytes | None = req.body
        if data is None and body is not None:
            if body.complete:  # the common small body: it arrived with the head
                body._send_continue()
                data = body.take_all()
            else:
                stream = self._body_frames(flow, body, chunked=req.content_length is None)
        framing = self._framing(flow, data, stream)
        head = self._request_head(flow, target, framing)
        t0 = time.perf_counter()
        try:
            try:
                up = await self._attempt(flow, target, st, head, data, stream)
            except ProxyError as e:
                if not isinstance(e, NotSent):
                    raise
                target, st, up = await self._retry(flow, primary, target, st, framing, data, stream, e)
        finally:
            flow.upstream_ms = (time.perf_counter() - t0) * 1000
        self._answered(flow, target, st, up.status)
        self._upstream = up.conn
        return up

    async def _attempt(self, flow: Flow, target: "Target", st: "ServerState | None", head: bytes,
                       data: bytes | None, stream: AsyncIterator[bytes] | None) -> "UpstreamResponse":
        """One exchange with `target`; a failure counts against its health and is raised."""
        try:
            return await self.engine.pool.exchange(target, flow.request.method, head, data, stream)
        except ProxyError as e:
            self.engine.health.failed(st, e, flow.client_addr)
            raise

    async def _retry(self, flow: Flow, primary: "Target", target: "Target", st: "ServerState | None",
                     framing: list[tuple[str, str]], data: bytes | None, stream: AsyncIterator[bytes] | None,
                     err: ProxyError) -> "tuple[Target, ServerState | None, UpstreamResponse]":
        """The request provably never reached `target` (`err` is NotSent): send it again, at most
        retry.attempts times, to the route's next server that may take it, else to the same one
        after a jittered backoff. Nothing of the request was written, so even a POST is safe;
        a streamed body has not been read yet. Raises the last error."""
        eng = self.engine
        health = eng.health
        candidates = (primary, *(flow.metadata.get(FALLBACKS) or ()))
        tried: list[tuple] = [target.key]
        for attempt in range(1, eng.config.retry.attempts + 1):
            found = health.failover(candidates, tried, time.monotonic())
            if found is None and st is not None and st.circuit is Circuit.OPEN:
                raise err  # no other server, and this one's circuit just opened
            health.retries.labels(target.origin, err.code).inc()
            if found is None:  # no other server: the same one, after a pause
                await asyncio.sleep(health.backoff(attempt))
            else:
                target, st = found
                tried.append(target.key)
                flow.upstream = target
                eng.audit.event("routing.failover", flow, primary=primary.origin, reason=err.code)
            head = self._request_head(flow, target, framing)
            try:
                up = await self._attempt(flow, target, st, head, data, stream)
            except ProxyError as e:
                if not isinstance(e, NotSent):
                    raise
                err = e
                continue
            return target, st, up
        raise err

    def _request_head(self, flow: Flow, target: "Target", framing: list[tuple[str, str]]) -> bytes:
        """The upstream request head for `target` (called again for another server on a retry)."""
        req = flow.request
        upath = target.base_path + req.target if target.base_path else req.target
        edits = req.edits
        if edits is not None and not _ENGINE_OWNED.isdisjoint(edits):
            req.headers  # an addon set a header the engine sets too: resolve it on the dict
        if req.headers_read:  # an addon saw (and maybe changed) the headers: serialise those
            h = req.headers
            h["Host"] = target.authority
            h["X-Request-ID"] = flow.id
            if req.host and "X-Forwarded-Host" not in h:
                h["X-Forwarded-Host"] = req.host
            for name in ("Expect", "Transfer-Encoding", "Content-Length"):
                h.popall(name, None)
            h.extend(framing)
            return request_head(req.method, upath, h)
        # nobody looked: forward the parser's bytes, scrubbed the same way
        fwd = self._forwarded if req.peer == self.peer else _forwarded(req.peer, self.scheme)
        add = [_host_line(target), fwd, b"X-Request-ID: ", flow.id.encode("latin-1"), b"\r\n"]
        if req.host:
            add += (b"X-Forwarded-Host: ", req.host.encode("latin-1"), b"\r\n")
        for k, v in framing:
            add.append(f"{k}: {v}\r\n".encode("latin-1"))
        if edits:  # set_header() on the bytes: drop the client's, add the addon's
            add += [f"{n}: {v}\r\n".encode("latin-1") for n, v in edits.values() if v is not None]
        return _REQUEST_SCRUB.head(f"{req.method} {upath} HTTP/1.1\r\n".encode("latin-1"), req.raw, b"".join(add),
                                   req.raw_connection, edits.keys() if edits else None)

    async def _body_frames(self, flow: Flow, body: RequestBody, *, chunked: bool) -> AsyncIterator[bytes]:
        while True:
            chunk = await body.read()
            if not chunk:
                break
            flow.bytes_in += len(chunk)
            yield b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
        if chunked:
            yield b"0\r\n\r\n"

    def _finish_upstream(self, up: "UpstreamResponse") -> None:
        pump = up.pump
        if pump is not None and not pump.done():
            pump.cancel()
            up.conn.close()
        self.engine.pool.release(up.conn)
        self._upstream = None

    def _response_headers(self, flow: Flow, resp: Response) -> CIMultiDict:
        h = resp.headers
        h["X-Request-ID"] = flow.id
        if self._must_close or self.engine.draining:
            h["Connection"] = "close"
            self._must_close = True
        return h

    def _send_now(self, flow: Flow, resp: Response, up: "UpstreamResponse | None") -> int | None:
        """Write the whole answer when it is all here (a buffered or made body, or an upstream
        body already complete): one write. None when the upstream body has to be streamed."""
        status = resp.status
        no_body = flow.request.method == "HEAD" or status in _NO_BODY_STATUS or status < 200
        if up is None and resp._stream is not None:
            return None  # an addon's Response.stream: _send_chunks
        if resp.body is not None or up is None:
            body = resp.body or b""
            h = self._response_headers(flow, resp)
            h.popall("Transfer-Encoding", None)
            if status not in _NO_BODY_STATUS and not (flow.request.method == "HEAD" and up is not None):
                h["Content-Length"] = str(len(body))
            payload = b"" if no_body else body
            self.write_raw(response_head(status, resp.reason, h) + payload)
            flow.bytes_out = len(payload)
            return status
        conn = up.conn
        if not conn.complete:
            return None
        if self.engine.draining:
            self._must_close = True
        head, chunked = self._stream_head(flow, resp, up, no_body)
        if no_body:
            self.write_raw(head)
        else:  # the whole (small) body is already here: one write
            data = conn.buffered()
            flow.bytes_out = len(data)
            if chunked:
                data = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)) if data else b"0\r\n\r\n"
            self.write_raw(head + data)
        self._finish_upstream(up)
        return status

    def _stream_head(self, flow: Flow, resp: Response, up: "UpstreamResponse",
                     no_body: bool) -> tuple[bytes, bool]:
        """The client's response head for an upstream body passed through, and whether the body
        goes chunked."""
        chunked = False
        read = resp.headers_read
        if no_body:
            pass
        elif up.content_length is not None and (not read or "Content-Length" in resp.headers):
            pass
        elif flow.request.http_version == "1.1":
            chunked = True
        else:
            self._must_close = True  # HTTP/1.0 client: the body ends when the connection does
        if read:
            h = self._response_headers(flow, resp)
            if chunked:
                h.popall("Content-Length", None)
                h["Transfer-Encoding"] = "chunked"
            return response_head(resp.status, resp.reason, h), chunked
        # nobody looked: the upstream's bytes, scrubbed, plus ours
        add = b"X-Request-ID: %s\r\n" % flow.id.encode("latin-1")
        if self._must_close:
            add += b"Connection: close\r\n"
        if chunked:
            add += b"Transfer-Encoding: chunked\r\n"
        scrub = _RESPONSE_SCRUB_CHUNKED if chunked else _RESPONSE_SCRUB
        return scrub.head(status_line(resp.status, resp.reason), up.raw, add, up.connection, None), chunked

    async def _send(self, flow: Flow, resp: Response, up: "UpstreamResponse | None") -> int:
        status = self._send_now(flow, resp, up)
        if status is not None:
            return status
        if up is None:
            return await self._send_chunks(flow, resp)
        status = resp.status
        conn = up.conn
        if self.engine.draining:
            self._must_close = True
        no_body = flow.request.method == "HEAD" or status in _NO_BODY_STATUS or status < 200
        head, chunked = self._stream_head(flow, resp, up, no_body)
        if no_body:
            self.write_raw(head)
            if flow.request.method == "HEAD" or conn.complete:
                await conn.done()
            self._finish_upstream(up)
            return status
        self.write_raw(head)
        transport = self.transport
        counter = [0]

        if chunked:
            def sink(chunk: bytes) -> None:
                counter[0] += len(chunk)
                if transport is not None:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            def sink(chunk: bytes) -> None:
                counter[0] += len(chunk)
                if transport is not None:
                    transport.write(chunk)

        idle = self.engine.config.stalwart.timeout_seconds
        if flow.route == "eventsource" or (resp.header("Content-Type") or "").startswith("text/event-stream"):
            idle = max(idle, self._limits.push_idle_timeout)  # push: silent between events
        conn.stream_to(sink, idle)
        if self._write_paused:
            conn.pause_reading()
        try:
            await conn.done()
        except ProxyError:
            # mid-body failure: the head is out, so the only honest signal is an aborted connection
            flow.bytes_out = counter[0]
            self._must_close = True
            if self.transport is not None:
                self.transport.abort()
            conn.close()
            raise
        flow.bytes_out = counter[0]
        if chunked:
            self.write_raw(b"0\r\n\r\n")
        self._finish_upstream(up)
        return status

    async def _send_chunks(self, flow: Flow, resp: Response) -> int:
        """An addon's streamed body (Response.stream), chunk by chunk, each written once the
        client has taken the last (drain)."""
        status = resp.status
        no_body = flow.request.method == "HEAD" or status in _NO_BODY_STATUS or status < 200
        h = self._response_headers(flow, resp)
        h.popall("Content-Length", None)
        h.popall("Transfer-Encoding", None)
        chunked = not no_body and flow.request.http_version == "1.1"
        if chunked:
            h["Transfer-Encoding"] = "chunked"
        elif not no_body:  # HTTP/1.0: the body ends when the connection does
            self._must_close = True
            h["Connection"] = "close"
        self.write_raw(response_head(status, resp.reason, h))
        chunks = resp.chunks
        sent = 0
        try:
            if not no_body:
                async for chunk in chunks:  # type: ignore[union-attr]
                    if not chunk:
                        continue
                    sent += len(chunk)
                    self.write_raw(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await self.drain()
                    if self.closed:
                        raise asyncio.CancelledError  # the client left: stop producing
        except BaseException:
            flow.bytes_out = sent
            self._must_close = True
            if self.transport is not None:
                self.transport.abort()
            raise
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()  # (an async generator's cleanup runs now, not at garbage collection)
        flow.bytes_out = sent
        if chunked:
            self.write_raw(b"0\r\n\r\n")
        return status

    async def _fail(self, flow: Flow, err: ProxyError, up: "UpstreamResponse | None",
                    mgr: "AddonManager") -> int:
        flow.error = err
        if up is not None:
            up.conn.close()
        elif self._upstream is not None:  # failed after the exchange began (e.g. in responseheaders)
            self._upstream.close()
            self._upstream = None
        if mgr.has("error"):
            try:
                await mgr.run("error", flow)
            except Exception:
                log.exception("error hook failed for %s", flow.id)
        if isinstance(err, UpstreamTimeout) or err.status >= 500:
            log.warning("request %s %s %s -> %d %s", flow.id, flow.request.method, flow.request.path,
                        err.status, err.code)
        status, headers, body = to_response(err, flow.id)
        if flow.request.method == "HEAD":
            body = b""
        h = CIMultiDict(headers)
        h["X-Request-ID"] = flow.id
        h["Content-Length"] = str(len(body))
        if err.status in (400, 413, 431) or self._must_close or self.engine.draining:
            h["Connection"] = "close"
            self._must_close = True
        flow.response = Response(status, h, body)
        self.write_raw(response_head(status, reason_phrase(status), h) + body)
        flow.bytes_out = len(body)
        return status

    def close_if_idle(self) -> None:
        """Draining: close now if no request is in progress (a WebSocket session: end it, 1001)."""
        if self._ws is not None:
            self._ws.shutdown()
        elif not self._busy and self.transport is not None:
            self.transport.close()

