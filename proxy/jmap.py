"""JMAP request bodies (RFC 8620 §3.3): parsed once, shared along the chain. Sans-IO.

`request_of(flow)` returns the parsed form that any addon may read (policy, guard, metrics);
the body is parsed at most once per flow.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .errors import BadRequest, ProxyError

if TYPE_CHECKING:
    from .flow import Flow

__all__ = ["MethodCall", "JmapRequest", "parse_request", "request_of", "is_api_request",
           "ACCOUNT_KEYS", "METADATA_KEY", "WS_PUSH_TYPES", "parse_ws_message", "ws_message_of",
           "ws_request_error", "refuse_ws_message"]

METADATA_KEY = "jmap.request"
# argument names that name an account (RFC 8620 §5.4 Foo/copy uses fromAccountId)
ACCOUNT_KEYS = ("accountId", "fromAccountId")


@dataclass(frozen=True, slots=True)
class MethodCall:
    name: str
    args: dict[str, Any]
    call_id: str

    def account_ids(self) -> list[str]:
        out = []
        for k in ACCOUNT_KEYS:
            v = self.args.get(k)
            if v is not None:
                out.append(v if isinstance(v, str) else repr(v))
        return out


@dataclass(frozen=True, slots=True)
class JmapRequest:
    """`names`: the method names in call order (taken from `calls` when not given)."""
    using: tuple[str, ...]
    calls: tuple[MethodCall, ...]
    raw: dict[str, Any]
    names: tuple[str, ...] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.names is None:
            object.__setattr__(self, "names", tuple([c.name for c in self.calls]))

    @property
    def method_names(self) -> list[str]:
        return list(self.names)

    def account_ids(self) -> set[str]:
        return {a for c in self.calls for a in c.account_ids()}


def parse_request(body: bytes) -> JmapRequest:
    """Parse a JMAP API request. Raises BadRequest with JMAP's own error types
    (urn:ietf:params:jmap:error:notJSON / notRequest) in the problem's `jmapType`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.",
                         extra={"jmapType": "urn:ietf:params:jmap:error:notJSON"}) from None
    if not isinstance(doc, dict):
        raise _not_request("The request must be a JSON object.")
    using = doc.get("using")
    calls = doc.get("methodCalls")
    if not isinstance(using, list):
        raise _not_request("`using` must be an array of capability strings.")
    for u in using:
        if not isinstance(u, str):
            raise _not_request("`using` must be an array of capability strings.")
    if not isinstance(calls, list):
        raise _not_request("`methodCalls` must be an array.")
    parsed = []
    names = []
    for i, c in enumerate(calls):
        if (not isinstance(c, list) or len(c) != 3 or not isinstance(c[0], str)
                or not isinstance(c[1], dict) or not isinstance(c[2], str)):
            raise _not_request(f"methodCalls[{i}] must be [name, arguments, callId].")
        mc = _new(MethodCall)  # MethodCall(*c) minus the generated __init__'s frame
        _mc_name(mc, c[0])
        _mc_args(mc, c[1])
        _mc_call_id(mc, c[2])
        parsed.append(mc)
        names.append(c[0])
    jr = _new(JmapRequest)  # likewise JmapRequest(tuple(using), tuple(parsed), doc, tuple(names))
    _jr_using(jr, tuple(using))
    _jr_calls(jr, tuple(parsed))
    _jr_raw(jr, doc)
    _jr_names(jr, tuple(names))
    return jr


# parse_request builds the frozen dataclasses by storing their slots directly: what the generated
# __init__ does (one object.__setattr__ per field), without a Python frame per object
_new = object.__new__
_mc_name, _mc_args, _mc_call_id = (MethodCall.__dict__[f].__set__ for f in ("name", "args", "call_id"))
_jr_using, _jr_calls, _jr_raw, _jr_names = (JmapRequest.__dict__[f].__set__
                                            for f in ("using", "calls", "raw", "names"))


def _not_request(detail: str) -> BadRequest:
    return BadRequest(detail, extra={"jmapType": "urn:ietf:params:jmap:error:notRequest"})


def is_api_request(flow: "Flow", jmap_path: str = "/jmap") -> bool:
    """A POST to the JMAP API endpoint (jmap_path, with or without a trailing slash)."""
    req = flow.request
    return req.method == "POST" and req.path.rstrip("/") in _api_paths(jmap_path)


@functools.lru_cache(maxsize=16)
def _api_paths(jmap_path: str) -> frozenset[str]:
    base = jmap_path.rstrip("/")
    return frozenset((base, base + "/api"))


def request_of(flow: "Flow") -> JmapRequest | None:
    """The flow's parsed JMAP request (parsed once, cached in flow.metadata), or None when the
    body was not buffered. Raises BadRequest for a body that is not a JMAP request."""
    cached = flow.metadata.get(METADATA_KEY)
    if cached is not None:
        return cached
    body = flow.request.body
    if body is None:
        return None
    req = parse_request(body)
    flow.metadata[METADATA_KEY] = req
    return req


def route_class(path: str, jmap_path: str = "/jmap") -> str:
    """A bounded label for metrics and logs: session, api, upload, download, eventsource,
    websocket, rest, dav (CalDAV/CardDAV), other."""
    if path == "/.well-known/jmap":
        return "session"
    base = jmap_path.rstrip("/")
    if path.startswith(base) and (len(path) == len(base) or path[len(base)] == "/"):
        rest = path[len(base):]
        if rest in ("", "/", "/api", "/api/"):
            return "api"
        if rest in ("/session", "/session/"):
            return "session"
        seg = rest[1:].split("/", 1)[0]
        if seg in ("upload", "download", "eventsource"):
            return seg
        if seg == "ws":
            return "websocket"
        return "jmap_other"
    if path.startswith("/api/v1/mail"):
        return "rest"
    if path.startswith("/dav/") or path == "/dav" or path.startswith("/.well-known/ca"):
        return "dav"
    return "other"


# ---------------------------------------------------------------------------- JMAP over WebSocket
# (RFC 8887): the client sends Request, WebSocketPushEnable and WebSocketPushDisable messages

WS_PUSH_TYPES = frozenset({"WebSocketPushEnable", "WebSocketPushDisable"})
_WS_METADATA_KEY = "jmap.ws_message"


def parse_ws_message(content: bytes) -> tuple[str, str | None, JmapRequest | None]:
    """(@type, id, the parsed request or None) of a client's JMAP-over-WebSocket message. Raises
    BadRequest (notJSON, notRequest) for anything but a Request or a push enable/disable. Pure."""
    try:
        doc = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise BadRequest("The message is not valid JSON.",
                         extra={"jmapType": "urn:ietf:params:jmap:error:notJSON"}) from None
    kind = doc.get("@type") if isinstance(doc, dict) else None
    rid = doc.get("id") if isinstance(doc, dict) else None
    rid = rid if isinstance(rid, str) else None
    if kind in WS_PUSH_TYPES:
        return kind, rid, None
    if kind != "Request":
        raise _not_request("The message is not a JMAP Request, WebSocketPushEnable or WebSocketPushDisable.")
    return kind, rid, parse_request(content)


def ws_message_of(flow: "Flow") -> tuple[str, str | None, JmapRequest | None]:
    """parse_ws_message of the message being handled (flow.websocket.messages[-1]), parsed once
    for the whole chain."""
    msg = flow.websocket.messages[-1]  # type: ignore[union-attr]
    cached = flow.metadata.get(_WS_METADATA_KEY)
    if cached is not None and cached[0] is msg:
        return cached[1]
    parsed = parse_ws_message(msg.content)
    flow.metadata[_WS_METADATA_KEY] = (msg, parsed)
    return parsed


def ws_request_error(exc: ProxyError, request_id: str | None) -> str:
    """The RequestError message (RFC 8887 section 4.3.4) answering a refused message: the problem
    details an HTTP client would get, with "@type" and the message's id as "requestId". Pure."""
    extra = exc.extra or {}
    doc: dict[str, Any] = {"@type": "RequestError", "type": extra.get("jmapType", "about:blank"),
                           "status": exc.status, "title": exc.title, "detail": exc.detail}
    for k, v in extra.items():
        if k != "jmapType":
            doc[k] = v
    if request_id is not None:
        doc["requestId"] = request_id
    return orjson.dumps(doc).decode()


def refuse_ws_message(flow: "Flow", exc: ProxyError) -> None:
    """Drop the message being handled and answer it with a RequestError; the session goes on."""
    msg = flow.websocket.messages[-1]  # type: ignore[union-attr]
    msg.drop()
    try:
        rid = ws_message_of(flow)[1]
    except BadRequest:
        rid = None
    flow.websocket.inject(ws_request_error(exc, rid), to_client=True)  # type: ignore[union-attr]
