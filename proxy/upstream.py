"""The upstream leg: raw HTTP/1.1 over a pool of persistent (m)TLS connections.

An asyncio Protocol per connection with llhttp (httptools) parsing the response. The request head
(and a buffered body) is written as one buffer; the response body is either buffered (capped) or
streamed to a sink with back-pressure both ways. Foreign errors become ProxyErrors here, at the
boundary (httpcore's `map_exceptions` idea).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import httptools
from multidict import CIMultiDict

from .errors import (NoUpstream, ProxyError, UpstreamConnectError,
                     UpstreamProtocolError, UpstreamTimeout, UpstreamTLSError, UpstreamTooLarge)
from .flow import Response
from .http1 import names_headers, request_head

if TYPE_CHECKING:
    from .config import StalwartOptions
    from .metrics import Metrics
    from .target import Target
    from .tls import ClientTLS

__all__ = ["IDEMPOTENT", "UpstreamPool", "UpstreamConnection", "UpstreamResponse", "NotSent", "ConnectRefused",
           "ConnectTimeout", "HandshakeFailed", "ResetBeforeSend", "RequestBodyFailed"]

log = logging.getLogger(__name__)

_NEVER = float("inf")
_NOTED = frozenset({b"content-length", b"transfer-encoding", b"location", b"connection"})
_BUFFER_HIGH = 256 << 10  # body bytes buffered before a sink is attached: pause reading above this
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})  # replayed once on a fresh connection (exchange)


class NotSent:
    """Mixed into the errors raised before a single byte of the request was written: the request
    provably never reached the server, so it may be retried, even a POST (docs/reliability.md)."""


class ConnectRefused(NotSent, UpstreamConnectError):
    """The TCP connection failed (refused, unreachable, reset during the handshake)."""


class ConnectTimeout(NotSent, UpstreamTimeout):
    """TCP connect plus TLS handshake took longer than stalwart.connect_timeout."""


class HandshakeFailed(NotSent, UpstreamTLSError):
    """The TLS handshake failed."""


class ResetBeforeSend(NotSent, UpstreamConnectError):
    """A fresh connection closed by the server before the request could be written."""


class RequestBodyFailed(UpstreamProtocolError):
    """The client's streamed request body failed mid-way: the client's fault, not the server's."""


class UpstreamResponse:
    """A response head from upstream plus a handle on its body."""

    __slots__ = ("status", "reason", "raw", "_headers", "conn", "content_length", "chunked",
                 "http_version", "pump", "location", "connection")

    def __init__(self, status: int, reason: str, raw: list, conn: "UpstreamConnection",
                 content_length: int | None, chunked: bool, http_version: str, location: bool,
                 connection: bool = True) -> None:
        self.status = status
        self.reason = reason
        self.raw = raw  # [(lower name, name, value)] bytes
        self._headers: CIMultiDict | None = None
        self.location = location
        self.connection = connection  # a Connection header names a header (beyond Keep-Alive)
        self.conn = conn
        self.content_length = content_length
        self.chunked = chunked
        self.http_version = http_version
        self.pump: asyncio.Future | None = None  # a streamed request body still being sent

    @property
    def headers(self) -> CIMultiDict:
        """Decoded, unscrubbed (side requests read these; client responses go through Response)."""
        if self._headers is None:
            self._headers = CIMultiDict([(n.decode("latin-1"), v.decode("latin-1")) for _, n, v in self.raw])
        return self._headers


class UpstreamConnection(asyncio.Protocol):
    """One persistent connection. One exchange at a time (no pipelining)."""

    def __init__(self, pool: "UpstreamPool", target: "Target", generation: int) -> None:
        self.pool = pool
        self.target = target
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.last_used = time.monotonic()
        self.requests = 0
        self._loop = asyncio.get_running_loop()
        self._reset()
        self._write_paused = False
        self._drain: asyncio.Future | None = None

    def _reset(self) -> None:
        self._active = False  # an exchange is in progress (a close now fails it)
        # whoever waits: futures made on demand by head()/done(), or a listener (the engine's
        # path without a Task) called back with upstream_done/upstream_head/upstream_failed
        self._head_fut: asyncio.Future | None = None
        self._done_fut: asyncio.Future | None = None
        self._listener: Any = None
        self.started = 0.0
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._clen: bytes | None = None
        self._te: bytes | None = None
        self._location = False
        self._connection = False
        self._status = 0
        self._reason = b""
        self._head_seen = False
        self._complete = False
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._sink: Callable[[bytes], None] | None = None
        self._cap: int | None = None
        self._received = 0
        self._left: int | None = None  # body bytes still due, when Content-Length delimits it
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None  # the mid-body idle check
        self.deadline = _NEVER  # the response head is due by then (UpstreamPool._sweep checks)
        self._last_activity = 0.0
        self._idle_timeout = 0.0
        self._head_method = False
        self._keep_alive = True
        self._got_bytes = False
        self._error: ProxyError | None = None

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._timer is not None:  # the mid-body idle check is armed
            self._last_activity = self._loop.time()
        left = self._left
        if left is not None and self._head_seen and not self._complete:
            # the rest of a Content-Length body goes on as it came: no parser scan, no copy
            n = len(data)
            if n < left:
                self._left = left - n
                self._deliver(data)
                return
            self._left = 0
            self._deliver(data if n == left else data[:left])
            if self.closed:
                return
            if n > left:
                self._keep_alive = False  # bytes after the answer: this connection is not reused
            self.parser = httptools.HttpResponseParser(self)  # llhttp was left mid-body
            self.on_message_complete()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamProtocolError(f"invalid HTTP from upstream: {e}"))
            self.close()
            return
        if self._head_method and self._head_seen and not self._complete:
            self.on_message_complete()
        listener = self._listener
        if listener is not None and self._head_seen:
            # called after this turn of the loop's reads (never from inside the parser): the
            # client writes of a burst of answers go out together (see HttpProtocol.data_received)
            self._listener = None
            if self._complete:
                self._loop.call_soon(listener.upstream_done, self)
            else:
                self._loop.call_soon(listener.upstream_head, self)

    def eof_received(self) -> bool | None:
        self._on_closed(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_closed(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            d.set_result(None)

    # ------------------------------------------------------------------ llhttp callbacks
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        ln = name.lower()
        self._headers.append((ln, name, value))
        if ln not in _NOTED:
            return
        if ln == b"content-length":
            self._clen = value
        elif ln == b"transfer-encoding":
            self._te = value
        elif ln == b"location":
            self._location = True
        elif ln == b"connection":
            if names_headers(value):
                self._connection = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # interim response (100 Continue, 103): not forwarded; wait for the final one
            self._headers = []
            self._clen = self._te = None
            self._location = False
            self._connection = False
            self._reason = b""
            self._status = -1
            return
        self._status = status
        self._head_seen = True
        self._keep_alive = self.parser.should_keep_alive()
        cl = self._clen
        if cl is not None and self._te is None and not self._head_method and status not in (204, 304) \
                and cl.isdigit():
            self._left = int(cl)
        if self.deadline != _NEVER:
            self.deadline = _NEVER
            self.pool._armed.discard(self)
        fut = self._head_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._status == -1:
            return
        if self._left is not None:
            self._left -= len(body)
        self._deliver(body)

    def _deliver(self, body: bytes) -> None:
        self._received += len(body)
        if self._sink is not None:
            self._sink(body)
            return
        if self._cap is not None and self._buf_len + len(body) > self._cap:
            self._fail(UpstreamTooLarge("The upstream response is larger than the proxy may buffer."))
            self.close()
            return
        self._buf.append(body)
        self._buf_len += len(body)
        if self._cap is None and self._buf_len > _BUFFER_HIGH:
            self.pause_reading()

    def on_message_complete(self) -> None:
        if self._status == -1:
            self._status = 0
            return
        if self._complete:
            return
        self._complete = True
        self._cancel_timer()
        if self._head_method:
            # llhttp does not know this answered a HEAD; a fresh parser for the next exchange
            self.parser = httptools.HttpResponseParser(self)
        fut = self._done_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ------------------------------------------------------------------ flow control
    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        if self.closed:
            raise self._error or UpstreamConnectError("The upstream connection closed.")
        if self._write_paused:
            self._drain = self._loop.create_future()
            await self._drain
            if self.closed and self._error:
                raise self._error

    # ------------------------------------------------------------------ exchange
    def _fail(self, err: ProxyError) -> None:
        if self._error is None:
            self._error = err
        listener, self._listener = self._listener, None
        if listener is not None:  # (maybe inside a parser callback: not from here)
            self._loop.call_soon(listener.upstream_failed, self, self._error)
        for fut in (self._head_fut, self._done_fut):
            if fut is not None and not fut.done():
                fut.set_exception(err)
                fut.exception()  # whoever awaits it still gets it; nobody awaiting is fine
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            d.set_result(None)

    def _on_closed(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool._forget(self)
        self._cancel_timer()
        if not self._active:
            return  # idle connection closed by the server
        if self._head_seen and not self._complete and exc is None:
            # close-delimited body (no Content-Length, not chunked) ends at EOF
            if self.parser.get_http_version() and not self._chunked_or_length():
                self._keep_alive = False
                self.on_message_complete()
                return
        if not self._complete:
            if isinstance(exc, ssl.SSLError):
                self._fail(UpstreamTLSError("TLS failure talking to the upstream server."))
            elif not self._head_seen:
                self._fail(UpstreamProtocolError("The upstream closed the connection without answering."))
            else:
                self._fail(UpstreamProtocolError("The upstream closed the connection mid-response."))

    def _chunked_or_length(self) -> bool:
        return self._clen is not None or (self._te is not None and b"chunked" in self._te.lower())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.deadline != _NEVER:
            self.deadline = _NEVER
            self.pool._armed.discard(self)

    def _on_head_timeout(self) -> None:
        self._cancel_timer()
        self.pool.metrics.upstream_errors.labels(self.target.name, "timeout").inc()
        self._fail(UpstreamTimeout("The upstream server did not answer in time."))
        self.close()

    def _on_idle_check(self) -> None:
        idle = self._loop.time() - self._last_activity
        if idle >= self._idle_timeout:
            self._timer = None
            self.pool.metrics.upstream_errors.labels(self.target.name, "timeout").inc()
            self._fail(UpstreamTimeout("The upstream server stalled mid-response."))
            self.close()
        else:
            self._timer = self._loop.call_later(self._idle_timeout - idle, self._on_idle_check)

    def start(self, method: str, head: bytes, body: bytes | None, timeout: float | None,
              listener: Any = None) -> None:
        """Write the request head (and a buffered body) as one buffer and arm the head timeout
        (None: the caller arms it once a streamed body is sent). A `listener` is called back
        instead of anyone awaiting head(): upstream_done(conn) once the whole response is here,
        upstream_head(conn) when only its head is, or upstream_failed(conn, error)."""
        self._reset()
        self._active = True
        self._listener = listener
        self.started = time.perf_counter()
        self.requests += 1
        self._head_method = method == "HEAD"
        if timeout is not None:
            self.arm_head_timeout(timeout)
        assert self.transport is not None
        self.transport.write(head + body if body else head)

    def arm_head_timeout(self, timeout: float) -> None:
        """The response head is due within `timeout` seconds (checked by the pool's sweeper: no
        timer per request)."""
        if not self._head_seen and not self.closed:
            self._cancel_timer()
            self.deadline = self._loop.time() + timeout
            self.pool._arm(self)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def head(self) -> UpstreamResponse:
        if not self._head_seen:
            if self._error is not None:
                raise self._error
            if self._head_fut is None:
                self._head_fut = self._loop.create_future()
            await self._head_fut
        return self.response()

    def response(self) -> UpstreamResponse:
        """The response head (once it has arrived)."""
        cl, te = self._clen, self._te
        return UpstreamResponse(self._status, self._reason.decode("latin-1", "replace").strip(), self._headers,
                                self, int(cl) if cl is not None and cl.isdigit() else None,
                                te is not None and b"chunked" in te.lower(), self.parser.get_http_version(),
                                self._location, self._connection)

    @property
    def complete(self) -> bool:
        return self._complete

    def buffered(self) -> bytes:
        data = b"".join(self._buf)
        self._buf = []
        self._buf_len = 0
        return data

    async def read_all(self, cap: int) -> bytes:
        """Buffer the whole response body (502 UpstreamTooLarge past cap: the client asked for nothing
        too large, the server answered it)."""
        if self._buf_len > cap:
            self.close()
            raise UpstreamTooLarge("The upstream response is larger than the proxy may buffer.")
        self._cap = cap
        self.resume_reading()
        await self._wait_done()
        return self.buffered()

    def stream_to(self, sink: Callable[[bytes], None], idle_timeout: float) -> None:
        """From now on body chunks go straight to `sink` (which applies back-pressure by calling
        pause_reading/resume_reading)."""
        if self._buf:
            for chunk in self._buf:
                sink(chunk)
            self._buf = []
            self._buf_len = 0
        self._sink = sink
        if not self._complete and not self.closed:
            self._idle_timeout = idle_timeout
            self._last_activity = self._loop.time()
            self._timer = self._loop.call_later(idle_timeout, self._on_idle_check)
        self.resume_reading()

    async def _wait_done(self) -> None:
        if self._complete:
            return
        if self._error is not None:
            raise self._error
        if self._done_fut is None:
            self._done_fut = self._loop.create_future()
        if self._timer is None and self._idle_timeout == 0.0:
            self._idle_timeout = self.pool.opts.timeout_seconds
            self._last_activity = self._loop.time()
            self._timer = self._loop.call_later(self._idle_timeout, self._on_idle_check)
        await self._done_fut

    async def done(self) -> None:
        await self._wait_done()

    @property
    def reusable(self) -> bool:
        return (self._complete and self._keep_alive and not self.closed and self._error is None
                and self.transport is not None and not self.transport.is_closing())

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            self._cancel_timer()
            if not self._complete:
                self._fail(UpstreamProtocolError("The upstream connection was closed."))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.close()


class UpstreamPool:
    """Persistent connections per target, at most `max_connections` each."""

    def __init__(self, tls: "ClientTLS", opts: "StalwartOptions", metrics: "Metrics") -> None:
        self.tls = tls
        self.opts = opts
        self.metrics = metrics
        self._idle: dict[tuple, list[UpstreamConnection]] = {}
        self._count: dict[tuple, int] = {}
        self._waiters: dict[tuple, deque[asyncio.Future]] = {}
        self._closed = False
        self._reaper: asyncio.Task | None = None
        self._armed: set[UpstreamConnection] = set()  # exchanges waiting for a response head
        self._sweeper: asyncio.Task | None = None

    def _key(self, target: "Target") -> tuple:
        return target.key

    def take_idle(self, target: "Target") -> UpstreamConnection | None:
        """An idle connection to target, if the pool has one (no waiting, no connecting)."""
        if self._closed:
            return None
        idle = self._idle.get(target.key)
        gen = self.tls.generation
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if conn.generation != gen and target.tls:
                conn.close()  # made with an older client certificate: let it go
                continue
            return conn
        return None

    async def acquire(self, target: "Target") -> tuple[UpstreamConnection, bool]:
        """A connection to target: an idle one (reused=True) or a new one."""
        if self._closed:
            raise NoUpstream("The proxy is shutting down.")
        key = target.key
        conn = self.take_idle(target)
        if conn is not None:
            return conn, True
        if self._count.get(key, 0) >= self.opts.max_connections:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, deque()).append(fut)
            try:
                await asyncio.wait_for(fut, self.opts.connect_timeout)
            except asyncio.TimeoutError:
                self.metrics.upstream_errors.labels(target.name, "pool_exhausted").inc()
                raise NoUpstream("No upstream connection became free in time.") from None
            finally:
                if not fut.done():
                    fut.cancel()
                w = self._waiters.get(key)
                if w and fut in w:
                    w.remove(fut)
            return await self.acquire(target)
        self._count[key] = self._count.get(key, 0) + 1
        try:
            conn = await self._connect(target)
        except BaseException:
            self._count[key] -= 1
            self._wake(key)
            raise
        return conn, False

    async def _connect(self, target: "Target", factory: Callable[[], Any] | None = None) -> Any:
        """A new connection to target (TLS with the current client certificate): an
        UpstreamConnection, or what `factory` makes (a WebSocket leg, not pooled)."""
        loop = asyncio.get_running_loop()
        gen = self.tls.generation
        ssl_ctx = self.tls.ctx if target.tls else None
        server_hostname = (self.opts.server_hostname or target.host) if target.tls else None
        if factory is None:
            def factory() -> UpstreamConnection:
                return UpstreamConnection(self, target, gen)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(factory, target.host, target.port,
                                       ssl=ssl_ctx, server_hostname=server_hostname),
                self.opts.connect_timeout)
        except asyncio.TimeoutError:
            self.metrics.upstream_errors.labels(target.name, "connect_timeout").inc()
            raise ConnectTimeout("Connecting to the upstream server timed out.") from None
        except ssl.SSLError as e:
            self.metrics.upstream_errors.labels(target.name, "tls").inc()
            log.warning("TLS handshake with %s failed: %s", target, e)
            raise HandshakeFailed("TLS handshake with the upstream server failed.") from None
        except OSError as e:
            self.metrics.upstream_errors.labels(target.name, "connect").inc()
            log.warning("connecting to %s failed: %s", target, e)
            raise ConnectRefused("The upstream server could not be reached.") from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool if reusable, else closed."""
        key = conn.target.key
        if conn.reusable and not self._closed and (conn.generation == self.tls.generation or not conn.target.tls):
            conn.last_used = time.monotonic()
            conn._active = False  # idle: a close now is not a failed exchange
            self._idle.setdefault(key, []).append(conn)
            self._wake(key)
            self._ensure_reaper()
        else:
            conn.close()

    def _forget(self, conn: UpstreamConnection) -> None:
        key = conn.target.key
        idle = self._idle.get(key)
        if idle and conn in idle:
            idle.remove(conn)
        if key in self._count:
            self._count[key] = max(0, self._count[key] - 1)
        self._wake(key)

    def _wake(self, key: tuple) -> None:
        w = self._waiters.get(key)
        while w:
            fut = w.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _arm(self, conn: UpstreamConnection) -> None:
        self._armed.add(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="upstream-timeouts")

    async def _sweep(self) -> None:
        """Fail the exchanges whose response head is overdue: ten checks a second (finer for
        short timeouts: at most a tenth of response_timeout late), from the first exchange until
        the pool closes."""
        loop = asyncio.get_running_loop()
        interval = max(0.01, min(0.1, self.opts.response_timeout / 10))
        while True:
            await asyncio.sleep(interval)
            if self._armed:
                now = loop.time()
                for conn in [c for c in self._armed if c.deadline <= now]:
                    conn._on_head_timeout()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="upstream-reaper")

    async def _reap(self) -> None:
        """Close connections idle longer than idle_timeout (before the server does it under us)."""
        while any(self._idle.values()):
            await asyncio.sleep(max(0.5, self.opts.idle_timeout / 4))
            limit = time.monotonic() - self.opts.idle_timeout
            for conns in list(self._idle.values()):
                for c in [c for c in conns if c.last_used < limit]:
                    c.close()

    def stats(self) -> dict[str, dict[str, int]]:
        out = {}
        for key, n in self._count.items():
            out[f"{key[0]}://{key[1]}:{key[2]}"] = {"open": n, "idle": len(self._idle.get(key, ()))}
        return out

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in list(self._idle.values()):
            for c in list(conns):
                c.close()
        self._idle.clear()

    # ------------------------------------------------------------------ one whole exchange
    async def exchange(self, target: "Target", method: str, head: bytes, body: bytes | None,
                       stream: "AsyncIterator[bytes] | None" = None) -> UpstreamResponse:
        """Send a request; return the response head. A request on a reused connection that dies
        before any byte of answer is retried once on a fresh connection when it is replayable
        (idempotent method, body not streamed). Errors raised before a byte was written are
        NotSent (the caller may retry those anywhere: server.py)."""
        replayable = method in IDEMPOTENT and stream is None
        for attempt in (0, 1):
            conn, reused = await self.acquire(target)
            if not reused and (conn.closed or conn.transport is None or conn.transport.is_closing()):
                # closed between the handshake and now (a server refusing our certificate after
                # TLS 1.3's handshake, one shutting down): nothing was written
                conn.close()
                self.metrics.upstream_errors.labels(target.name, "reset").inc()
                raise ResetBeforeSend("The upstream server closed the connection before the request was sent.")
            t0 = time.perf_counter()
            try:
                timeout = self.opts.response_timeout
                conn.start(method, head, body, timeout if stream is None else None)
                pump = None
                if stream is not None:
                    pump = asyncio.ensure_future(self._pump(conn, stream, timeout))
                try:
                    resp = await conn.head()
                except BaseException:
                    if pump is not None:
                        pump.cancel()
                    raise
                resp.pump = pump
            except UpstreamProtocolError:
                if reused and replayable and attempt == 0 and not conn._got_bytes:
                    conn.close()
                    continue
                conn.close()
                self.metrics.upstream_errors.labels(target.name, "protocol").inc()
                raise
            except UpstreamTimeout:
                conn.close()
                raise
            except ProxyError:
                conn.close()
                raise
            except BaseException:
                conn.abort()
                raise
            self.metrics.upstream_seconds.observe((target.name,), time.perf_counter() - t0)
            return resp
        raise AssertionError("unreachable")

    async def _pump(self, conn: UpstreamConnection, stream: "AsyncIterator[bytes]", timeout: float) -> None:
        """Copy a streamed request body upstream (the stream yields ready-to-send frames), then
        arm the response-head timeout. A write stall longer than the idle timeout fails it."""
        try:
            async for frame in stream:
                conn.write(frame)
                if conn._write_paused:
                    try:
                        await asyncio.wait_for(conn.drain(), self.opts.timeout_seconds)
                    except asyncio.TimeoutError:
                        conn._fail(UpstreamTimeout("The upstream server stopped reading the request body."))
                        conn.close()
                        return
                if conn.closed:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client side failed mid-body
            conn._fail(RequestBodyFailed(f"The request body could not be sent: {type(e).__name__}"))
            conn.abort()
            return
        conn.arm_head_timeout(timeout)

    async def fetch(self, target: "Target", method: str, path: str, *,
                    headers: list[tuple[str, str]] | None = None, body: bytes | None = None,
                    cap: int = 10 << 20) -> Response:
        """A buffered side request (session fetches, health probes)."""
        h: CIMultiDict = CIMultiDict(headers or ())
        h["Host"] = target.authority
        if body is not None or method in ("POST", "PUT", "PATCH"):
            h["Content-Length"] = str(len(body or b""))
        h.setdefault("Accept", "application/json")
        resp = await self.exchange(target, method, request_head(method, target.base_path + path, h), body)
        conn = resp.conn
        try:
            data = await conn.read_all(cap) if method != "HEAD" else b""
        except BaseException:
            conn.close()
            raise
        self.release(conn)
        r = Response(resp.status, resp.headers, data, reason=resp.reason)
        return r
