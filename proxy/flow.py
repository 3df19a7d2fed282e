"""The flow model: one client request, its upstream answer, and what addons learnt on the way.

Addons read and change these objects; server.py and upstream.py move the bytes.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from multidict import CIMultiDict

from .http1 import RESPONSE_SCRUBBED as _RESPONSE_SCRUBBED, scrub_request, scrub_response

if TYPE_CHECKING:
    from collections.abc import AsyncIterable

    from .identity import Identity
    from .websocket import WebSocketData
    from .target import Target

__all__ = ["Headers", "Request", "Response", "Flow"]

Headers = CIMultiDict  # case-insensitive, ordered, repeatable: CIMultiDict[str]
RawHeaders = list  # [(lower-cased name, name, value)] as bytes, straight from the parser


_PROBE = "\x00probe"
_KEEP, _DROP, _OTHER = 0, 1, 2
_SCRUB_KIND: dict[str, int] = {}  # lower-cased name -> what scrub_request does to such a header


def _scrub_kind(lname: str) -> int:
    """_KEEP: scrub_request leaves the header as sent (unless a Connection header names it);
    _DROP: always removes it; _OTHER: anything else (it sets the value, say)."""
    kind = _SCRUB_KIND.get(lname)
    if kind is None:
        probe = CIMultiDict([(lname, _PROBE)])
        scrub_request(probe, "", "http")
        got = probe.getall(lname, [])
        kind = _KEEP if got == [_PROBE] else _DROP if not got else _OTHER
        if len(_SCRUB_KIND) < 256:
            _SCRUB_KIND[lname] = kind
    return kind


def _raw_value(raw: "RawHeaders", lname: str) -> str | None:
    """The first value of the header `lname` (lower case) in the parser's bytes."""
    key = lname.encode("latin-1")
    for ln, _, v in raw:
        if ln == key:
            return v.decode("latin-1")
    return None


def _decode(raw: "RawHeaders") -> CIMultiDict:
    return CIMultiDict([(n.decode("latin-1"), v.decode("latin-1")) for _, n, v in raw])


class _Message:
    """What requests and responses share: headers built from the parser's bytes on first use
    (scrubbed: hop-by-hop headers never reach an addon; for requests, no client Forwarded/
    X-Forwarded-*/X-SGE-* either and one X-Forwarded-For), and asking for the body buffered."""

    __slots__ = ()

    def _scrub(self, h: CIMultiDict) -> None:
        raise NotImplementedError

    @property
    def headers(self) -> CIMultiDict:
        h = self._headers
        if h is None:
            h = self._headers = _decode(self.raw)
            self._scrub(h)
        return h

    @headers.setter
    def headers(self, value: CIMultiDict) -> None:
        self._headers = value

    @property
    def headers_read(self) -> bool:
        """Whether anything built .headers (else the engine forwards the parser's bytes)."""
        return self._headers is not None

    def want_body(self, cap: int | None = None) -> None:
        """Ask the engine to buffer the body before the next hooks run (requests: in
        `requestheaders`, for `request`; responses: in `responseheaders`, for `response`), at most
        `cap` bytes (the smallest cap asked wins; past it: 413 for a request, 502 for a response)."""
        if cap is None:
            cap = 1 << 62
        self.body_cap = cap if self.body_cap is None else min(self.body_cap, cap)


class Request(_Message):
    """A client request. `body` is None while the body streams; bytes once buffered.

    An addon that needs the body calls `want_body()` in its `requestheaders` hook: the engine then
    reads it (up to the cap, else 413) before the `request` hooks run.
    """

    __slots__ = ("method", "_target", "_path", "http_version", "_headers", "body", "scheme", "host",
                 "body_cap", "content_length", "chunked", "_stream", "raw", "peer", "raw_connection", "edits",
                 "websocket")

    def __init__(self, method: str, target: str, headers: CIMultiDict | None = None, *,
                 http_version: str = "1.1", body: bytes | None = None, scheme: str = "http",
                 host: str = "", raw: "RawHeaders | None" = None, peer: str = "") -> None:
        self.method = method
        self.target = target  # raw request-target: path and query, as received (sets .path)
        self.http_version = http_version
        self._headers = headers if headers is not None or raw is not None else CIMultiDict()
        self.raw = raw      # the parser's headers until someone reads .headers
        self.peer = peer
        self.raw_connection = True  # False: the parser saw no Connection header
        # set_header() calls made while .headers was not built: {lower name: (name, value or None)}
        self.edits: dict[bytes, tuple[str, str | None]] | None = None
        self.body = body
        self.scheme = scheme
        self.host = host
        self.body_cap: int | None = None  # set by want_body()
        self.content_length: int | None = None
        self.chunked = False
        self._stream: Any = None
        self.websocket = False  # a WebSocket upgrade the engine will bridge (proxy.websocket)

    def _scrub(self, h: CIMultiDict) -> None:
        scrub_request(h, self.peer, self.scheme)
        edits, self.edits = self.edits, None
        if edits:
            for name, value in edits.values():
                if value is None:
                    h.popall(name, None)
                else:
                    h[name] = value

    def set_header(self, name: str, value: str | None) -> None:
        """Replace every `name` header the upstream will get with one of `value` (None: remove
        them all), without building .headers when nobody has: the engine applies the edit to the
        parser's bytes when it writes the head (later edits of a name win)."""
        h = self._headers
        if h is not None:
            if value is None:
                h.popall(name, None)
            else:
                h[name] = value
            return
        if self.edits is None:
            self.edits = {}
        self.edits[name.lower().encode("latin-1")] = (name, value)

    def header(self, name: str) -> str | None:
        """`headers.get(name)` (the first value, or None) without building .headers when it can:
        the parser's bytes are scanned instead unless the scrubbing would change the answer (a
        Connection header, or a name the engine drops or sets)."""
        h = self._headers
        if h is not None:
            return h.get(name)
        lname = name.lower()
        edits = self.edits
        if edits is not None:
            edit = edits.get(lname.encode("latin-1"))
            if edit is not None:
                return edit[1]
        kind = _scrub_kind(lname)
        if kind == _DROP:
            return None
        if kind != _KEEP or self.raw_connection:
            return self.headers.get(name)
        return _raw_value(self.raw, lname)

    @property
    def target(self) -> str:
        return self._target

    @target.setter
    def target(self, value: str) -> None:
        self._target = value
        i = value.find("?")
        self._path = value if i < 0 else value[:i]

    @property
    def path(self) -> str:
        """The path without the query."""
        return self._path

    @property
    def query(self) -> str:
        i = self.target.find("?")
        return "" if i < 0 else self.target[i + 1:]

    @property
    def has_body(self) -> bool:
        return self.body is not None or self.chunked or bool(self.content_length)


    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target}>"


class Response(_Message):
    """A response, from upstream or made by an addon (`Response.make`)."""

    __slots__ = ("status", "reason", "_headers", "body", "body_cap", "http_version", "_stream", "raw",
                 "raw_connection")

    def __init__(self, status: int, headers: CIMultiDict | None = None, body: bytes | None = None,
                 *, reason: str = "", http_version: str = "1.1", raw: "RawHeaders | None" = None) -> None:
        self.status = status
        self.reason = reason
        self._headers = headers if headers is not None or raw is not None else CIMultiDict()
        self.raw = raw
        self.raw_connection = True  # False: the upstream sent no Connection header
        self.body = body
        self.body_cap: int | None = None
        self.http_version = http_version
        self._stream: Any = None

    @classmethod
    def make(cls, status: int = 200, body: bytes | str = b"",
             headers: dict[str, str] | list[tuple[str, str]] | None = None) -> "Response":
        """A complete response made by an addon; nothing goes upstream."""
        if isinstance(body, str):
            body = body.encode()
        h: CIMultiDict = CIMultiDict(headers or ())
        return cls(status, h, body)

    @classmethod
    def stream(cls, status: int, chunks: "AsyncIterable[bytes]",
               headers: dict[str, str] | list[tuple[str, str]] | None = None) -> "Response":
        """A response made by an addon whose body is produced while it is sent (an export, a
        generated archive): the engine iterates `chunks` with back-pressure (the next chunk is
        asked for once the client has taken the last) and sends them chunked (HTTP/1.1) or up to
        the connection's close (HTTP/1.0). Once the head is out, an exception while iterating
        can only abort the connection: the client sees a truncated answer, never a complete one."""
        r = cls(status, CIMultiDict(headers or ()), None)
        r._stream = chunks
        return r

    @property
    def chunks(self) -> "AsyncIterable[bytes] | None":
        """The body's chunks of a `Response.stream` (None for any other response)."""
        return self._stream

    def _scrub(self, h: CIMultiDict) -> None:
        scrub_response(h)

    def header(self, name: str) -> str | None:
        """`headers.get(name)` without building .headers when the parser's bytes give the same
        answer (no Connection header to honour, a name the scrubbing keeps)."""
        h = self._headers
        if h is not None:
            return h.get(name)
        lname = name.lower()
        if lname in _RESPONSE_SCRUBBED or lname.startswith("proxy-"):
            return None
        if self.raw_connection:
            return self.headers.get(name)
        return _raw_value(self.raw, lname)

    @property
    def content_type(self) -> str:
        return (self.header("Content-Type") or "").split(";", 1)[0].strip().lower()

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


class Flow:
    """One request/response exchange.

    id: the request id (the client's well-formed X-Request-ID, else generated).
    upstream: where the request goes; an addon reroutes by setting it.
    identity: set by an auth addon.
    metadata: free-form notes addons share (namespaced by addon name, by convention).
    route: the bounded route class for metrics ("jmap", "api", "session", "other", ...).
    websocket: the WebSocket session (proxy.websocket.WebSocketData) once the upgrade succeeded.
    """

    __slots__ = ("id", "request", "response", "upstream", "identity", "error", "metadata",
                 "client_addr", "started", "route", "upstream_ms", "bytes_in", "bytes_out",
                 "client_token", "_finalizers", "websocket", "trace_id", "__weakref__")

    def __init__(self, request: Request, *, id: str, client_addr: str = "",
                 upstream: "Target | None" = None) -> None:
        self.id = id
        self.request = request
        self.response: Response | None = None
        self.upstream = upstream
        self.identity: Identity | None = None
        self.error: Exception | None = None
        self.metadata: dict[str, Any] = {}
        self.client_addr = client_addr
        self.started = time.perf_counter()
        self.route = "other"
        self.upstream_ms: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.client_token: str | None = None
        self._finalizers: list | None = None
        self.websocket: WebSocketData | None = None  # set once a WebSocket handshake is through
        self.trace_id: str | None = None  # from a well-formed W3C traceparent, for the logs

    def on_done(self, callback: "Callable[[Flow], None]") -> None:
        """Call `callback(flow)` once the exchange is completely over: the last response byte
        written, or the failure answered, or the client gone (release per-request resources
        here, e.g. a concurrency slot). Callbacks run in registration order; errors are logged."""
        if self._finalizers is None:
            self._finalizers = []
        self._finalizers.append(callback)

    def finish(self) -> None:
        """Engine only: run the on_done callbacks (once)."""
        callbacks, self._finalizers = self._finalizers, None
        for cb in callbacks or ():
            try:
                cb(self)
            except Exception:  # a finalizer must never break the connection's next request
                import logging
                logging.getLogger(__name__).exception("on_done callback failed for %s", self.id)

    def __repr__(self) -> str:
        return f"<Flow {self.id} {self.request.method} {self.request.target}>"
