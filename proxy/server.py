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
from typing import TYPE_CHECKING, AsyncIterator

import httptools
from multidict import CIMultiDict

from .errors import (BadRequest, HeadersTooLarge, InternalError, PayloadTooLarge, ProxyError,
                     UpstreamTimeout, to_response)
from .flow import Flow, Request, Response
from .http1 import (raw_request_head, raw_response_head, reason_phrase, request_head, response_head,
                    rewrite_location, valid_request_id)
from .breaker import Circuit
from .health import FALLBACKS
from .jmap import route_class
from .upstream import NotSent

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
                           b"connection"})
# what the engine sets itself on the upstream request (dropped from the client's, then added)
_ENGINE_SETS = frozenset({b"host", b"x-request-id", b"expect", b"content-length", b"transfer-encoding"})
# names whose value the engine decides on the upstream request (an addon's set_header() of one of
# these is resolved on the materialised headers instead of the raw bytes)
_ENGINE_OWNED = _ENGINE_SETS | {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
_RID_PREFIX = os.urandom(6).hex()  # per process, so ids stay unique across workers
_rid_counter = itertools.count(1)


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
        self.closed = False
        self._url = b""
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

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.engine.connections.add(self)
        self._arm(self.engine.config.limits.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine.connections.discard(self)
        self._disarm()
        if self._parsing is not None:
            self._parsing._wake()
        if self._task is not None and not self._task.done():
            self._task.cancel()
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
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # upgrades are not offered: the request was handled as plain HTTP; close after it
            self._must_close = True
        except httptools.HttpParserError as e:
            # llhttp wraps what a callback raised (HeadersTooLarge, BadRequest) as its context
            cause = e.__context__
            self._reject(cause if isinstance(cause, ProxyError)
                         else BadRequest("The request is not valid HTTP/1.1."))

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
        self._arm(self.engine.config.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.engine.config.limits.max_header_bytes:
            raise HeadersTooLarge("The request line and headers are too large.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        limits = self.engine.config.limits
        if self._header_bytes > limits.max_header_bytes or len(self._headers) >= limits.max_headers:
            raise HeadersTooLarge("The request headers are too large.")
        ln = name.lower()
        self._headers.append((ln, name, value))
        if ln in _ENGINE_READS and ln not in self._h:
            self._h[ln] = value

    def on_headers_complete(self) -> None:
        if not self._busy and not self._queue:
            self._disarm()
        parser = self.parser
        h = self._h
        method = parser.get_method().decode("ascii", "replace")
        target = self._url.decode("latin-1")
        host = h.get(b"host")
        req = Request(method, target, raw=self._headers, http_version=parser.get_http_version(),
                      scheme=self.scheme, host=host.decode("latin-1") if host else "", peer=self.peer)
        req.raw_connection = b"connection" in h
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
        flow = Flow(req, id=rid, client_addr=self.peer)  # type: ignore[arg-type]
        flow.route = route_class(req.path, self.engine.jmap_path)
        if self._busy:
            self._queue.append((flow, body, keep_alive))
            self.pause_reading()  # one request ahead at most
        else:
            self._start(flow, body, keep_alive)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.feed_eof()
            self._parsing = None

    # ------------------------------------------------------------------ the request cycle
    def _start(self, flow: Flow, body: RequestBody | None, keep_alive: bool) -> None:
        self._busy = True
        self._task = self.loop.create_task(self._cycle(flow, body, keep_alive))

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
            self._start(flow, body, keep_alive)
        else:
            self._arm(self.engine.config.limits.keepalive_timeout)

    async def _cycle(self, flow: Flow, body: RequestBody | None, keep_alive: bool) -> None:
        eng = self.engine
        gen = eng.generation  # the chain this request keeps to its end, whatever a reload swaps in
        gen.in_flight += 1
        eng.in_flight += 1
        eng.metrics.in_flight_value = eng.in_flight
        status = 0
        up: UpstreamResponse | None = None
        head_sent = False
        try:
            if not keep_alive:
                self._must_close = True
            flow.upstream = eng.default_target
            try:
                up = await self._run_chain(flow, body, gen.addons)
                resp = flow.response
                assert resp is not None
                if body is not None and not body.complete:
                    self._must_close = True  # unread request body: cannot reuse the connection
                head_sent = True
                status = await self._send(flow, resp, up)
            except ProxyError as e:
                if head_sent:
                    raise
                status = await self._fail(flow, e, up, gen.addons)
        except asyncio.CancelledError:
            status = status or 499  # the client went away
            if up is not None:
                up.conn.abort()
        except Exception as e:  # a bug of ours: never leave the client hanging
            log.exception("request %s failed unexpectedly", flow.id)
            if up is not None:
                up.conn.abort()
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
            gen.in_flight -= 1
            eng.in_flight -= 1
            eng.metrics.in_flight_value = eng.in_flight
            elapsed = time.perf_counter() - flow.started
            eng.metrics.observe_request(flow.route, flow.request.method, status, elapsed)
            eng.log_access(flow, status, elapsed)
            if flow._finalizers is not None:
                flow.finish()
            self._upstream = None
            self._next()

    async def _run_chain(self, flow: Flow, body: RequestBody | None,
                         mgr: "AddonManager") -> "UpstreamResponse | None":
        req = flow.request
        if mgr.has("requestheaders"):
            await mgr.run("requestheaders", flow)
        if flow.response is None:
            if req.body_cap is not None:
                if body is not None:
                    req.body = await body.read_all(req.body_cap)
                    flow.bytes_in = len(req.body)
                else:
                    req.body = b""
            if mgr.has("request"):
                await mgr.run("request", flow)
        up = None
        if flow.response is None:
            up = await self._forward(flow, body)
            flow.response = resp = Response(up.status, None, None, reason=up.reason, raw=up.raw)
            resp.raw_connection = up.connection
            if up.location:
                rh = flow.response.headers
                rh["Location"] = rewrite_location(rh["Location"], flow.upstream.origin)  # type: ignore[union-attr]
        if mgr.has("responseheaders"):
            await mgr.run("responseheaders", flow)
        resp = flow.response
        if up is not None and resp.body_cap is not None and resp.body is None:
            if flow.request.method == "HEAD" or up.status in _NO_BODY_STATUS:
                resp.body = b""
            else:
                resp.body = await up.conn.read_all(resp.body_cap)
            self._finish_upstream(up)
        if mgr.has("response"):
            await mgr.run("response", flow)
        return up

    async def _forward(self, flow: Flow, body: RequestBody | None) -> "UpstreamResponse":
        eng = self.engine
        req = flow.request
        health = eng.health
        primary = flow.upstream or eng.default_target
        now = time.monotonic()
        target, st = health.pick(primary, flow.metadata.get(FALLBACKS), now)
        flow.upstream = target
        stream: AsyncIterator[bytes] | None = None
        data: bytes | None = req.body
        if data is None and body is not None:
            if body.complete:  # the common small body: it arrived with the head
                body._send_continue()
                data = body.take_all()
            else:
                stream = self._body_frames(flow, body, chunked=req.content_length is None)
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
        head = self._request_head(flow, target, framing)
        t0 = time.perf_counter()
        try:
            try:
                up = await eng.pool.exchange(target, req.method, head, data, stream)
            except ProxyError as e:
                health.failed(st, e, flow.client_addr)
                if not isinstance(e, NotSent):
                    raise
                target, st, up = await self._retry(flow, primary, target, st, framing, data, stream, e)
        finally:
            flow.upstream_ms = (time.perf_counter() - t0) * 1000
        if st is not None:
            if up.status < 500:
                st.success(now)  # (counted at the request's start: the window's bucket hardly differs)
            else:
                st.answered(up.status, flow.client_addr, time.monotonic())
        self._upstream = up.conn
        eng.metrics.upstream_requests.inc((target.name, str(up.status)))
        return up

    async def _retry(self, flow: Flow, primary: "Target", target: "Target", st: "ServerState | None",
                     framing: list[tuple[str, str]], data: bytes | None, stream: AsyncIterator[bytes] | None,
                     err: ProxyError) -> "tuple[Target, ServerState | None, UpstreamResponse]":
        """The request provably never reached `target` (`err` is NotSent): send it again, at most
        retry.attempts times, to the route's next server that may take it, else to the same one
        after a jittered backoff. Nothing of the request was written, so even a POST is safe;
        a streamed body has not been read yet. Raises the last error."""
        eng = self.engine
        health = eng.health
        req = flow.request
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
            head = self._request_head(flow, target, framing)
            try:
                up = await eng.pool.exchange(target, req.method, head, data, stream)
            except ProxyError as e:
                health.failed(st, e, flow.client_addr)
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
        add = [("Host", target.authority), ("X-Forwarded-For", self.peer),
               ("X-Forwarded-Proto", self.scheme), ("X-Request-ID", flow.id)]
        if req.host:
            add.append(("X-Forwarded-Host", req.host))
        add.extend(framing)
        drop = _ENGINE_SETS
        if edits:  # set_header() on the bytes: drop the client's, add the addon's
            drop = drop | edits.keys()
            add.extend([(n, v) for n, v in edits.values() if v is not None])
        return raw_request_head(req.method, upath, req.raw, drop, add, req.raw_connection)

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

    async def _send(self, flow: Flow, resp: Response, up: "UpstreamResponse | None") -> int:
        status = resp.status
        no_body = flow.request.method == "HEAD" or status in _NO_BODY_STATUS or status < 200
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
        # streaming from upstream
        conn = up.conn
        if self.engine.draining:
            self._must_close = True
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
            head = response_head(status, resp.reason, h)
        else:  # nobody looked: the upstream's bytes, scrubbed, plus ours
            add = [("X-Request-ID", flow.id)]
            if self._must_close:
                add.append(("Connection", "close"))
            if chunked:
                add.append(("Transfer-Encoding", "chunked"))
            head = raw_response_head(status, resp.reason, up.raw, add,
                                     _RESP_OWN_CHUNKED if chunked else _RESP_OWN, up.connection)
        if no_body:
            self.write_raw(head)
            if flow.request.method == "HEAD" or conn.complete:
                await conn.done()
            self._finish_upstream(up)
            return status
        if conn.complete:
            # the whole (small) body is already here: one write
            data = conn.buffered()
            flow.bytes_out = len(data)
            if chunked:
                data = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)) if data else b"0\r\n\r\n"
            self.write_raw(head + data)
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

        conn.stream_to(sink, self.engine.config.stalwart.timeout_seconds)
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
        """Draining: close now if no request is in progress."""
        if not self._busy and self.transport is not None:
            self.transport.close()

