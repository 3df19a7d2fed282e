"""Response filter: the session resource points clients back at the proxy and shows only the
user's own accounts; redirects to the upstream become relative; fingerprinting headers go.

API responses are never buffered or changed: raw JMAP keeps JMAP semantics (method errors inside
an HTTP 200 pass untouched).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson

from proxy.errors import ConfigError, UpstreamProtocolError
from proxy.session import WEBSOCKET, Session, after_authority, own_accounts, rewrite

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow, Response
    from proxy.target import Target

__all__ = ["ResponseFilter", "ResponseFilterOptions", "is_session_path", "relative_location",
           "DEFAULT_STRIP"]

DEFAULT_STRIP = ("Server", "X-Powered-By", "Via", "X-AspNet-Version", "X-Runtime", "Alt-Svc")
_JSON_TYPES = ("application/json", "application/jmap+json")
_GET_HEAD = frozenset(("GET", "HEAD"))


def is_session_path(method: str, path: str, jmap_path: str) -> bool:
    """GET of a path that answers the session resource: /.well-known/jmap (Stalwart and Cyrus
    redirect it, some servers answer it), <jmap_path>/session (Stalwart), <jmap_path> and
    <jmap_path>/ (Cyrus). Pure."""
    if method not in _GET_HEAD:
        return False
    base = jmap_path.rstrip("/")
    return path in ("/.well-known/jmap", "/.well-known/jmap/", base, base + "/", base + "/session")


def relative_location(location: str, upstream: "Target | None", extra_hosts: tuple[str, ...] = ()) -> str:
    """A Location that points at the upstream (its origin, or any absolute URL whose host is the
    upstream's or one of extra_hosts) as path+query(+fragment); any other Location unchanged. Pure."""
    try:
        parts = urlsplit(location)
        host = (parts.hostname or "").lower()
    except ValueError:
        return location
    if not parts.scheme or not parts.netloc:
        return location
    hosts = {h.lower() for h in extra_hosts}
    if upstream is not None:
        hosts.add(upstream.host.lower())
    if host not in hosts:
        return location
    rest = after_authority(location)
    return rest if rest.startswith("/") else "/" + rest


@dataclass(frozen=True, kw_only=True)
class ResponseFilterOptions:
    """[addons.response_filter]"""
    public_url: str | None = None
    strip_headers: tuple[str, ...] = DEFAULT_STRIP
    allow_shared_accounts: bool = False
    # keep the urn:ietf:params:jmap:websocket capability; only useful with jmap_guard.allow_websocket
    websocket: bool = False
    # more host names that mean "the upstream" in a Location (Stalwart's public host name)
    upstream_hosts: tuple[str, ...] = ()
    max_session_bytes: int = field(default=1 << 20, metadata={"kind": "size"})

    def __post_init__(self) -> None:
        if self.public_url is not None:
            p = urlsplit(self.public_url)
            if p.scheme not in ("http", "https") or not p.netloc or p.query or p.fragment:
                raise ConfigError("public_url", f"expected http(s)://host[:port][/path], got {self.public_url!r}")


class ResponseFilter:
    name = "response_filter"
    Options = ResponseFilterOptions

    def __init__(self) -> None:
        self._opts = ResponseFilterOptions()
        self._jmap_path = "/jmap"
        self._public_base = "http://127.0.0.1:8080"
        self._strip_raw = frozenset(h.lower().encode("latin-1") for h in self._opts.strip_headers)

    def load(self, loader: "Loader") -> None:
        self._opts = loader.options or ResponseFilterOptions()
        self._jmap_path = loader.config.stalwart.jmap_path
        self._public_base = (self._opts.public_url or loader.config.public_base()).rstrip("/")
        self._strip_raw = frozenset(h.lower().encode("latin-1") for h in self._opts.strip_headers)
        self._rewritten = loader.metrics.counter("sge_proxy_session_rewrites_total",
                                                 "Session resources rewritten for clients.", ("result",))

    def responseheaders(self, flow: "Flow") -> None:
        resp = flow.response
        if resp is None:
            return
        if not self._strip_raw_headers(resp):
            headers = resp.headers
            for h in self._opts.strip_headers:
                headers.popall(h, None)
            loc = headers.get("Location")
            if loc is not None:
                headers["Location"] = relative_location(loc, flow.upstream, self._opts.upstream_hosts)
        if self._is_session(flow, resp):
            resp.want_body(self._opts.max_session_bytes)

    def _strip_raw_headers(self, resp: "Response") -> bool:
        """Drop the stripped headers from the parser's bytes when nobody built the header dict
        and there is no Location to rewrite: the same outcome without decoding every header.
        False when the dict has to be used."""
        raw = resp.raw
        if raw is None or resp.headers_read:
            return False
        strip = self._strip_raw
        found: list[int] | None = None  # where the stripped ones are
        for i, t in enumerate(raw):
            ln = t[0]
            if ln == b"location":
                return False
            if ln in strip:
                if found is None:
                    found = [i]
                else:
                    found.append(i)
        if found is not None:
            for i in reversed(found):
                del raw[i]
        return True

    def response(self, flow: "Flow") -> None:
        resp = flow.response
        if resp is None or resp.body is None or not self._is_session(flow, resp):
            return
        if b'"apiUrl"' not in resp.body:
            return
        try:
            doc = orjson.loads(resp.body)
            session = Session.from_doc(doc)
        except (orjson.JSONDecodeError, UpstreamProtocolError):
            self._rewritten.labels("invalid").inc()
            raise UpstreamProtocolError("The mail server sent an invalid JMAP session.") from None
        if flow.identity is not None:
            keep = own_accounts(session, flow.identity.login, allow_shared=self._opts.allow_shared_accounts)
        else:
            keep = frozenset(session.accounts)
        out = rewrite(doc, self._public_base, keep)
        if not self._opts.websocket and isinstance(out.get("capabilities"), dict):
            out["capabilities"].pop(WEBSOCKET, None)
        resp.body = orjson.dumps(out)
        if "Content-Length" in resp.headers:
            resp.headers["Content-Length"] = str(len(resp.body))
        self._rewritten.labels("ok").inc()

    def _is_session(self, flow: "Flow", resp: "Response") -> bool:
        return (flow.request.method in _GET_HEAD  # is_session_path's own first test, without a call
                and is_session_path(flow.request.method, flow.request.path, self._jmap_path)
                and resp.status == 200 and resp.content_type in _JSON_TYPES)
