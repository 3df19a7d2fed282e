"""Downstream HTTP/2 (RFC 9113) over TLS, offered by ALPN when `tls.http2` is on.

Each HTTP/2 stream is handed to the HTTP/1.1 engine as a request of its own: the stream's
headers become an HTTP/1.1 request head fed to a fresh `HttpProtocol` through an in-process
transport, and what that protocol writes back (an HTTP/1.1 response, which the engine built) is
turned into HEADERS and DATA frames. Everything the engine does per request (the addon chain,
routing, retries, limits, errors, metrics, the access log) is therefore exactly the same for
both protocols; the price is one extra parse of each head, off the HTTP/1.1 hot path.

Flow control both ways: request DATA is acknowledged only while the stream's protocol reads
(its pause_reading stops the window updates), and a response that the client's window cannot
take yet is buffered up to a bound, past which the stream's protocol is paused (pause_writing:
the engine then stops reading from the upstream). h2 (python-hyper) is the HTTP/2 state machine.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

import httptools
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset,
                       WindowUpdated)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hpack import Encoder, NeverIndexedHeaderTuple

from .server import HttpProtocol

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["H2Protocol", "request_head"]

log = logging.getLogger(__name__)

_HIGH = 256 << 10  # response bytes buffered for a stream before its protocol is paused
_LOW = 64 << 10
_WINDOW = 1 << 20  # our receive window per stream (and for the connection)
_RESETS, _RESET_WINDOW = 200, 10.0  # client stream resets tolerated per window (seconds)
# connection-specific headers (RFC 9113 section 8.2.2): never sent in HTTP/2
_NOT_INDEXED = frozenset({b"x-request-id", b"date", b"content-length", b"etag", b"last-modified", b"set-cookie",
                          b"location", b"expires", b"age"})
_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade"})


def request_head(headers: list[tuple[bytes, bytes]], *, end_stream: bool) -> tuple[bytes, bool]:
    """The HTTP/1.1 request head for an HTTP/2 request's header list (pseudo-headers first, as h2
    validated them), and whether its body goes chunked (no content-length and more DATA to come).
    Cookie crumbs are joined (RFC 9113 section 8.2.3); TE is left out. Pure."""
    method = path = authority = b""
    lines: list[bytes] = []
    cookies: list[bytes] = []
    has_length = False
    for name, value in headers:
        if name.startswith(b":"):
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name in (b"te", b"host") or name in _CONNECTION_SPECIFIC:
            continue
        if name == b"content-length":
            has_length = True
        lines.append(name + b": " + value + b"\r\n")
    if not method or not path:
        raise ValueError("an HTTP/2 request without :method or :path")
    for part in (method, path, authority):  # (h2 checks values for CR, LF and NUL; a request
        if _UNSAFE.search(part):              # line must not have spaces or controls either)
            raise ValueError("whitespace or a control character in :method, :path or :authority")
    head = [method, b" ", path, b" HTTP/1.1\r\n"]
    if authority:
        head.append(b"host: " + authority + b"\r\n")
    head += lines
    if cookies:
        head.append(b"cookie: " + b"; ".join(cookies) + b"\r\n")
    chunked = not end_stream and not has_length
    if chunked:
        head.append(b"transfer-encoding: chunked\r\n")
    head.append(b"\r\n")
    return b"".join(head), chunked


class _PlainEncoder(Encoder):
    """HPACK without Huffman coding of literals: the pure-Python Huffman coder was the largest
    single cost of an HTTP/2 answer here; literals are ~25% larger on the wire instead."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _Stream:
    """One HTTP/2 stream: the transport its HttpProtocol writes to, and the parser of what it
    writes (the engine's HTTP/1.1 response), turned into frames on the connection."""

    h2_stream = True  # (how the engine's connection gauge tells a stream from a connection)

    def __init__(self, conn: "H2Protocol", stream_id: int, head_only: bool) -> None:
        self.conn = conn
        self.id = stream_id
        self.head_only = head_only  # a HEAD request: the response has no body whatever it says
        self.proto: Any = None
        self.chunked = False
        self.closing = False
        self.done = False  # the response's last frame is queued
        self.pending = bytearray()  # response DATA the client's window cannot take yet
        self.end_pending = False
        self.unacked = 0  # request DATA received while the protocol was not reading
        self.reading = True
        self.write_paused = False
        self._parser = httptools.HttpResponseParser(self)
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._buf = b""  # a HEAD response's head, until it is whole

    # the transport of the stream's HttpProtocol
    def write(self, data: bytes) -> None:
        if self.done or self.conn.closed:
            return
        if self.head_only:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                self._head_only(self._buf[:end])
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            log.error("http2 stream %d: the engine wrote an answer that does not parse", self.id)
            self.abort()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if not self.done:
                self.abort()  # closed before the whole answer was written
            self.conn.detach_soon(self)

    def abort(self) -> None:
        self.closing = True
        if not self.done:
            self.done = True
            self.conn.reset(self.id, ErrorCodes.INTERNAL_ERROR)
        self.conn.detach_soon(self)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname", "peercert", "cipher"):  # (not ssl_object: see server.py)
            return self.conn.transport.get_extra_info(name, default) if self.conn.transport else default
        return default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            if self.unacked:
                n, self.unacked = self.unacked, 0
                self.conn.ack(self.id, n)

    # httptools callbacks (the engine's response)
    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue (the engine's answer to Expect): an informational HEADERS
            if status == 100:
                self.conn.send_headers(self, [(b":status", b"100")], False)
            return
        self._send_headers(status, self._headers, end_stream=False)

    def on_body(self, body: bytes) -> None:
        self.conn.send_data(self, body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() >= 200:
            self.done = True
            self.conn.send_data(self, b"", end=True)

    def _head_only(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        self.done = True
        self._send_headers(status, headers, end_stream=True)

    def _send_headers(self, status: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool) -> None:
        out: list[Any] = [(b":status", str(status).encode())]
        for n, v in headers:
            if n in _CONNECTION_SPECIFIC:
                continue
            # values that differ on every answer would only crowd HPACK's dynamic table (and its
            # linear search); cookies are never indexed (RFC 7541 section 7.1.3)
            out.append(NeverIndexedHeaderTuple(n, v) if n in _NOT_INDEXED else (n, v))
        self.conn.send_headers(self, out, end_stream)


class H2Protocol(asyncio.Protocol):
    """An HTTP/2 connection (the engine's connection set holds it, for draining and idling)."""

    def __init__(self, engine: "Engine", scheme: str = "https") -> None:
        self.engine = engine
        self.scheme = scheme
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.streams: dict[int, _Stream] = {}
        self._ws = None  # (the engine's reload looks for WebSocket sessions on every connection)
        self.deadline = float("inf")
        # inbound headers validated by h2 (no CR, LF, NUL, uppercase, connection-specific...);
        # outbound ones are the engine's own answer heads, already lower-cased and scrubbed here
        self.h2 = H2Connection(config=H2Configuration(client_side=False, header_encoding=None,
                                                      validate_outbound_headers=False,
                                                      normalize_outbound_headers=False))
        self.h2.encoder = _PlainEncoder()
        self._goaway = False
        self._resets: list[float] = []
        self._flush_scheduled = False
        self._write_blocked = False  # the transport asked us to stop writing (pause_writing)
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.engine.connections.add(self)
        limits = self.engine.config.limits
        self.h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: 128, SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes})
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_WINDOW)
        self._flush()
        self._arm(limits.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine.connections.discard(self)
        for st in list(self.streams.values()):
            self._detach(st)  # a request in progress: the client went away

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            log.info("http2: protocol error from %s: %s", self._peer(), e)
            self._write_now()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, RequestReceived):
                self._request(ev)
            elif isinstance(ev, DataReceived):
                st = self.streams.get(ev.stream_id)
                if st is None or st.proto is None:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    continue
                if ev.data:  # (an empty DATA frame, END_STREAM's carrier, is no chunk: "0" would end the body)
                    st.proto.data_received(b"%x\r\n%b\r\n" % (len(ev.data), ev.data) if st.chunked else ev.data)
                if st.reading:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                else:
                    st.unacked += ev.flow_controlled_length
            elif isinstance(ev, StreamEnded):
                st = self.streams.get(ev.stream_id)
                if st is not None and st.chunked and st.proto is not None:
                    st.proto.data_received(b"0\r\n\r\n")
            elif isinstance(ev, StreamReset):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.done = True
                    self._detach(st)
                if self._reset_flood():
                    return
            elif isinstance(ev, WindowUpdated):
                targets = list(self.streams.values()) if ev.stream_id == 0 else \
                    [s for s in (self.streams.get(ev.stream_id),) if s is not None]
                for st in targets:
                    self._drain(st)
            elif isinstance(ev, ConnectionTerminated):
                self._goaway = True
                if not self.streams and self.transport is not None:
                    self.transport.close()
        self._flush()

    def _reset_flood(self) -> bool:
        """"Rapid reset" (CVE-2023-44487): each stream a client opens and resets at once still
        costs a request upstream. More than _RESETS resets within _RESET_WINDOW seconds ends the
        connection with ENHANCE_YOUR_CALM."""
        now = self._loop.time()
        self._resets = [t for t in self._resets if t > now - _RESET_WINDOW]
        self._resets.append(now)
        if len(self._resets) <= _RESETS:
            return False
        log.warning("http2: %s reset %d streams within %g s; closing the connection", self._peer(),
                    len(self._resets), _RESET_WINDOW)
        self._goaway = True
        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._write_now()
        if self.transport is not None:
            self.transport.close()
        return True

    # ------------------------------------------------------------------ streams
    def _request(self, ev: RequestReceived) -> None:
        if self.engine.draining or self._goaway:
            self.reset(ev.stream_id, ErrorCodes.REFUSED_STREAM)  # (never processed: safe to retry)
            return
        self._disarm()
        headers = ev.headers
        end_stream = ev.stream_ended is not None
        head_only = any(n == b":method" and v == b"HEAD" for n, v in headers)
        st = _Stream(self, ev.stream_id, head_only)
        try:
            head, st.chunked = request_head(headers, end_stream=end_stream)
        except ValueError:
            self.reset(ev.stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        self.streams[ev.stream_id] = st
        proto = st.proto = HttpProtocol(self.engine, self.scheme)
        proto.connection_made(st)
        proto.data_received(head)
        if end_stream and st.chunked:
            proto.data_received(b"0\r\n\r\n")

    def send_headers(self, st: _Stream, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        try:
            self.h2.send_headers(st.id, headers, end_stream=end_stream)
        except (StreamClosedError, ProtocolError):
            st.done = True
        if end_stream:
            self.detach_soon(st)
        self._flush()

    def send_data(self, st: _Stream, data: bytes, end: bool = False) -> None:
        if data:
            st.pending += data
        if end:
            st.end_pending = True
        self._drain(st)
        self._flush()

    def _sync(self, st: _Stream) -> None:
        """Pause the stream's protocol (the engine then stops reading its upstream) while its
        pending answer is past _HIGH or the connection's transport is full; resume it below _LOW."""
        if st.proto is None:
            return
        if not st.write_paused and (self._write_blocked or len(st.pending) > _HIGH):
            st.write_paused = True
            st.proto.pause_writing()
        elif st.write_paused and not self._write_blocked and len(st.pending) < _LOW:
            st.write_paused = False
            st.proto.resume_writing()

    def _drain(self, st: _Stream) -> None:
        """Send what the windows allow of a stream's pending answer (nothing while the
        transport is full: a client may grant large windows and still not read)."""
        try:
            while st.pending and not self._write_blocked:
                n = min(len(st.pending), self.h2.local_flow_control_window(st.id), self.h2.max_outbound_frame_size)
                if n <= 0:
                    break
                self.h2.send_data(st.id, bytes(st.pending[:n]))
                del st.pending[:n]
            if st.end_pending and not st.pending:
                st.end_pending = False
                self.h2.end_stream(st.id)
                self.detach_soon(st)
        except (StreamClosedError, ProtocolError):
            st.pending.clear()
            st.done = True
            self.detach_soon(st)
        self._sync(st)

    def ack(self, stream_id: int, n: int) -> None:
        try:
            self.h2.acknowledge_received_data(n, stream_id)
        except (StreamClosedError, ProtocolError):
            return
        self._flush()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except (StreamClosedError, ProtocolError):
            pass
        self._flush()

    def detach_soon(self, st: _Stream) -> None:
        # after the engine's current step: it books the request (_end) right after its last write
        self._loop.call_soon(self._detach, st)

    def _detach(self, st: _Stream) -> None:
        if self.streams.get(st.id) is not st:
            return
        del self.streams[st.id]
        st.closing = True
        if st.proto is not None:
            proto, st.proto = st.proto, None
            proto.connection_lost(None)  # (a request still in progress: the client is gone, 499)
        if not self.streams:
            if self._goaway or self.engine.draining:
                self._close_gracefully()
            else:
                self._arm(self.engine.config.limits.keepalive_timeout)

    # ------------------------------------------------------------------ the engine's connection API
    def _arm(self, seconds: float) -> None:
        self.deadline = self._loop.time() + seconds

    def _disarm(self) -> None:
        self.deadline = float("inf")

    def expire(self, now: float) -> None:
        if not self.streams and now >= self.deadline and self.transport is not None:
            self._close_gracefully()

    def close_if_idle(self) -> None:
        """Draining: close now if no stream is in progress, else once the last one is done (new
        streams meanwhile are refused with REFUSED_STREAM, which clients retry elsewhere). The
        GOAWAY is sent when closing: some clients fail the streams in progress on any GOAWAY."""
        if not self.streams:
            self._close_gracefully()

    def _close_gracefully(self) -> None:
        if not self._goaway:
            self._goaway = True
            self.h2.close_connection()
        self._write_now()  # (what the streams' last turn queued, too)
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        """The transport's buffer is full: hold every stream's answer (see _drain, _sync)."""
        self._write_blocked = True
        for st in list(self.streams.values()):
            self._sync(st)

    def resume_writing(self) -> None:
        self._write_blocked = False
        for st in list(self.streams.values()):
            self._drain(st)
        self._flush()

    def _flush(self) -> None:
        """Write what h2 has queued at the end of this turn of the loop: the frames of every
        stream that answered in it (HEADERS, DATA, END_STREAM) go out as one TLS write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._write_now)

    def _write_now(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return peer[0] if peer else "?"
