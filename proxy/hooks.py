"""The hooks an addon may implement, mitmproxy's names. Each dataclass's docstring is the hook's
documentation; the manager dispatches by `name`. Every hook may be sync or async."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .addonmanager import Loader
    from .flow import Flow

__all__ = ["Hook", "LoadHook", "ConfigureHook", "RunningHook", "RequestHeadersHook", "RequestHook",
           "ResponseHeadersHook", "ResponseHook", "ErrorHook", "WebSocketStartHook", "WebSocketMessageHook",
           "WebSocketEndHook", "DoneHook", "HOOKS", "FLOW_HOOKS"]


class Hook:
    name: ClassVar[str]


@dataclass
class LoadHook(Hook):
    """The addon was added to the chain. `loader` gives its parsed options (`loader.options`), the
    global config, the metrics registry, `loader.spawn()` for background tasks and
    `loader.fetch()` for side requests upstream."""
    name: ClassVar[str] = "load"
    loader: "Loader"


@dataclass
class ConfigureHook(Hook):
    """Configuration was (re)loaded. `updated` names the sections that changed (all on start)."""
    name: ClassVar[str] = "configure"
    updated: set[str]


@dataclass
class RunningHook(Hook):
    """The proxy is listening."""
    name: ClassVar[str] = "running"


@dataclass
class RequestHeadersHook(Hook):
    """Request head read, body not yet. Call flow.request.want_body(cap) to have it buffered;
    set flow.response or raise a ProxyError to answer without going upstream."""
    name: ClassVar[str] = "requestheaders"
    flow: "Flow"


@dataclass
class RequestHook(Hook):
    """Request complete (body buffered if asked). Set flow.response or raise a ProxyError to stop
    it going upstream; set flow.upstream to reroute; edit headers and body freely."""
    name: ClassVar[str] = "request"
    flow: "Flow"


@dataclass
class ResponseHeadersHook(Hook):
    """Response head received. Call flow.response.want_body(cap) to have the body buffered."""
    name: ClassVar[str] = "responseheaders"
    flow: "Flow"


@dataclass
class ResponseHook(Hook):
    """Response complete (body buffered if asked), not yet sent to the client."""
    name: ClassVar[str] = "response"
    flow: "Flow"


@dataclass
class ErrorHook(Hook):
    """The exchange failed (flow.error is set); an error answer follows."""
    name: ClassVar[str] = "error"
    flow: "Flow"


@dataclass
class WebSocketStartHook(Hook):
    """A WebSocket handshake went through (flow.websocket is set); no message relayed yet."""
    name: ClassVar[str] = "websocket_start"
    flow: "Flow"


@dataclass
class WebSocketMessageHook(Hook):
    """A complete WebSocket message arrived: flow.websocket.messages[-1] (`from_client`,
    `is_text`, `content`/`text`). Change it, `drop()` it, `flow.websocket.inject()` one of your own
    or `flow.websocket.close(code, reason)`. Messages are handled one at a time, in order; raising
    a ProxyError (or failing, in a security addon) closes the session (1008, or 1011)."""
    name: ClassVar[str] = "websocket_message"
    flow: "Flow"


@dataclass
class WebSocketEndHook(Hook):
    """The WebSocket session is over (flow.websocket.close_code tells how, when known)."""
    name: ClassVar[str] = "websocket_end"
    flow: "Flow"


@dataclass
class DoneHook(Hook):
    """The addon is being removed, or the proxy is shutting down."""
    name: ClassVar[str] = "done"


HOOKS: dict[str, type[Hook]] = {h.name: h for h in (
    LoadHook, ConfigureHook, RunningHook, RequestHeadersHook, RequestHook, ResponseHeadersHook,
    ResponseHook, ErrorHook, WebSocketStartHook, WebSocketMessageHook, WebSocketEndHook, DoneHook)}
FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error", "websocket_start",
              "websocket_message", "websocket_end")
