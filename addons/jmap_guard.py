"""JMAP guard: a user only ever reaches their own accounts, and doomed requests stop at the edge.

- Every method call's `accountId` and `fromAccountId` must be one of the user's accounts (read
  from the user's own session resource, see proxy.session.own_accounts); `#accountId` and
  `#fromAccountId` result references are refused outright. Refusal: 403, nothing forwarded.
- Upload and download paths (`<jmap_path>/upload/<acct>/...`, `<jmap_path>/download/<acct>/...`,
  the same on Stalwart and Cyrus) must name one of the user's accounts.
- The core capability's limits are mirrored: more calls than maxCallsInRequest -> 400 with JMAP
  type urn:ietf:params:jmap:error:limit (Stalwart answers the same); a body over maxSizeRequest,
  or an upload over maxSizeUpload -> 413 with the same type.
- WebSocket upgrades under jmap_path (JMAP over WebSocket, RFC 8887) are refused unless
  `allow_websocket`. When allowed, the engine bridges messages (proxy.websocket) and every JMAP
  Request message from the client is checked as POST /jmap is; a refused one is not forwarded
  and the client gets a RequestError message instead (RFC 8887 section 4.3.4). Messages that are
  not JSON, not one of the subprotocol's types, or binary are refused the same way (binary: the
  session is closed, 1003).
- Flows without an identity are left alone: the auth addon decides about them.

The session is fetched once per (identity.subject, target) and cached (TTL, bounded LRU);
concurrent misses share one fetch. A fetch that fails fails the request (502/503): an unchecked
request is never forwarded.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable
from urllib.parse import unquote, urljoin, urlsplit

from proxy.cache import SingleFlight, TTLCache
from proxy.errors import (BadGateway, BadRequest, ConfigError, Forbidden, InternalError, NoUpstream,
                          PayloadTooLarge, ProxyError, Unauthorized)
from proxy.jmap import (ACCOUNT_KEYS, JmapRequest, is_api_request, parse_ws_message, refuse_ws_message,
                        request_of, ws_message_of)
from proxy.session import Limits, Session, own_accounts

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow
    from proxy.target import Target

__all__ = ["JmapGuard", "JmapGuardOptions", "SessionCache", "SessionEntry", "check_request", "check_ws_message",
           "account_path", "LIMIT_TYPE"]

log = logging.getLogger(__name__)

LIMIT_TYPE = "urn:ietf:params:jmap:error:limit"
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 3
_REF_KEYS = frozenset("#" + k for k in ACCOUNT_KEYS)


# ---------------------------------------------------------------------------- pure logic
def _refused(exc: ProxyError, reason: str) -> ProxyError:
    exc.reason = reason  # type: ignore[attr-defined]  # the bounded metric label
    return exc


def limit_error(cls: type[ProxyError], limit: str, detail: str) -> ProxyError:
    return cls(detail, extra={"jmapType": LIMIT_TYPE, "limit": limit})


def check_request(req: JmapRequest, own: frozenset[str], limits: Limits) -> None:
    """Raise the refusal for a JMAP request the user may not send; return when it may go. Pure."""
    if len(req.calls) > limits.max_calls_in_request:
        raise _refused(limit_error(
            BadRequest, "maxCallsInRequest",
            f"The request has {len(req.calls)} method calls; the limit is {limits.max_calls_in_request}."),
            "too_many_calls")
    for call in req.calls:
        for key in call.args:
            if key in _REF_KEYS:
                raise _refused(Forbidden(
                    f"Method call {call.call_id!r} ({call.name}) uses a result reference for {key[1:]}."),
                    "result_reference")
        for key in ACCOUNT_KEYS:
            if key not in call.args or call.args[key] is None:
                continue
            acct = call.args[key]
            if not isinstance(acct, str) or acct not in own:
                raise _refused(Forbidden(
                    f"Method call {call.call_id!r} ({call.name}) names an account that is not yours."),
                    "foreign_account")


def check_ws_message(content: bytes, own: frozenset[str], limits: Limits,
                     parsed: "tuple[str, str | None, JmapRequest | None] | None" = None) -> None:
    """Raise the refusal for a JMAP-over-WebSocket message from the client (RFC 8887): a
    Request is checked as POST /jmap is (size, calls, accounts); push enable/disable pass;
    anything else is refused (notJSON, notRequest). `parsed`: parse_ws_message's answer, if
    someone already has it. Pure."""
    if len(content) > limits.max_size_request:
        raise _refused(limit_error(PayloadTooLarge, "maxSizeRequest",
                                   f"The request is larger than {limits.max_size_request} bytes."), "too_large")
    if parsed is None:
        try:
            parsed = parse_ws_message(content)
        except BadRequest as e:
            raise _refused(e, "websocket_message") from None
    req = parsed[2]
    if req is not None:
        check_request(req, own, limits)


def account_path(path: str, jmap_path: str) -> tuple[str, str | None] | None:
    """For a path under jmap_path: (kind, accountId or None) where kind is the first segment
    after jmap_path ("upload", "download", "eventsource", "" ...), percent-decoded once.
    None for a path outside jmap_path. Raises Forbidden for dot segments, empty inner segments
    or an encoded slash, which an upstream might normalise into another path. Pure."""
    base = jmap_path.rstrip("/")
    if path == base:
        return "", None
    if not path.startswith(base + "/"):
        return None
    segs = path[len(base) + 1:].split("/")
    decoded = [unquote(s) for s in segs]
    for i, s in enumerate(decoded):
        if s in (".", "..") or "/" in s or "\\" in s or "\x00" in s or (s == "" and i < len(decoded) - 1):
            raise _refused(Forbidden("The path is not allowed."), "path")
    if not decoded:
        return "", None
    kind = decoded[0]
    if kind in ("upload", "download"):
        return kind, (decoded[1] if len(decoded) > 1 and decoded[1] else None)
    return kind, None


def redirect_path(current: str, location: str) -> str:
    """The path and query a redirect points at (relative or absolute Location). Pure."""
    parts = urlsplit(urljoin(current, location.strip()))
    path = parts.path or "/"
    return path + ("?" + parts.query if parts.query else "")


@dataclass(frozen=True, slots=True)
class SessionEntry:
    session: Session
    own: frozenset[str]


SessionCache = TTLCache  # sessions by (subject, target key): TTL + bounded LRU, see proxy.cache


def _session_known(flow: "Flow", entry: SessionEntry) -> None:
    """A check that only needs the session to be fetched (and cached)."""


# ---------------------------------------------------------------------------- the addon
@dataclass(frozen=True, kw_only=True)
class JmapGuardOptions:
    """[addons.jmap_guard]"""
    session_ttl: float = field(default=300.0, metadata={"kind": "duration"})
    session_cache_size: int = 10_000
    session_path: str = "/.well-known/jmap"
    max_session_bytes: int = field(default=1 << 20, metadata={"kind": "size"})
    allow_shared_accounts: bool = False
    allow_websocket: bool = False

    def __post_init__(self) -> None:
        if self.session_cache_size < 1:
            raise ConfigError("session_cache_size", "must be at least 1")
        if not self.session_path.startswith("/"):
            raise ConfigError("session_path", "must start with /")


class JmapGuard:
    name = "jmap_guard"
    security = True
    Options = JmapGuardOptions

    def __init__(self) -> None:
        self._loader: Loader | None = None
        self._opts = JmapGuardOptions()
        self._jmap_path = "/jmap"
        self._cache: TTLCache[Hashable, SessionEntry] = TTLCache(self._opts.session_cache_size,
                                                                  self._opts.session_ttl)
        self._inflight: SingleFlight[Hashable, SessionEntry] = SingleFlight("jmap_guard:session")

    def load(self, loader: "Loader") -> None:
        self._loader = loader
        self._opts = loader.options or JmapGuardOptions()
        self._jmap_path = loader.config.stalwart.jmap_path.rstrip("/") or "/"
        self._cache = TTLCache(self._opts.session_cache_size, self._opts.session_ttl)
        m = loader.metrics
        self._refusals = m.counter("sge_proxy_jmap_guard_refused_total",
                                   "JMAP requests the guard refused.", ("reason",))
        self._lookups = m.counter("sge_proxy_jmap_session_cache_total",
                                  "Session look-ups by the JMAP guard.", ("result",))
        self._fetches = m.counter("sge_proxy_jmap_session_fetch_total",
                                  "Session resources fetched upstream.", ("result",))
        self._hits = self._lookups.labels("hit")

    def done(self) -> None:
        self._inflight.cancel()
        self._cache.clear()

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: "Flow") -> Any:
        """Checks the path (and, for API requests and blob paths, the user's session). Returns a
        coroutine only when the session is not cached yet."""
        if flow.identity is None:
            return None
        try:
            return self._check_head(flow)
        except ProxyError as e:
            self._count(e, flow)
            raise

    def request(self, flow: "Flow") -> Any:
        """Checks a JMAP API request against the user's session. Returns a coroutine only when
        the session is not cached yet."""
        if flow.identity is None or not is_api_request(flow, self._jmap_path):
            return None
        try:
            entry = self._cached(flow)
            if entry is None:
                return self._fetching(flow, self._check_api)
            self._check_api(flow, entry)
            return None
        except ProxyError as e:
            self._count(e, flow)
            raise

    def websocket_message(self, flow: "Flow") -> Any:
        """Checks each message from the client of a JMAP WebSocket (see the module's docstring).
        Returns a coroutine only when the session is not cached (any more)."""
        msg = flow.websocket.messages[-1]  # type: ignore[union-attr]
        if not msg.from_client or msg.dropped or flow.identity is None:
            return None
        if not msg.is_text:
            msg.drop()
            self._refusals.labels("websocket_message").inc()
            flow.websocket.close(1003, "JMAP over WebSocket uses text messages only.")  # type: ignore[union-attr]
            return None
        return self._with_entry(flow, self._check_message)

    def _check_message(self, flow: "Flow", entry: SessionEntry) -> None:
        content = flow.websocket.messages[-1].content  # type: ignore[union-attr]
        try:
            parsed = None if len(content) > entry.session.limits.max_size_request else ws_message_of(flow)
        except BadRequest as e:
            self._count(_refused(e, "websocket_message"), flow)
            refuse_ws_message(flow, e)
            return
        try:
            check_ws_message(content, entry.own, entry.session.limits, parsed)
        except ProxyError as e:
            self._count(e, flow)
            refuse_ws_message(flow, e)

    def _with_entry(self, flow: "Flow", check: Callable[["Flow", SessionEntry], None]) -> Any:
        """`check(flow, entry)` with the user's session entry: now when it is cached (None), else
        a coroutine that fetches it first."""
        entry = self._cached(flow)
        if entry is None:
            return self._fetching(flow, check)
        check(flow, entry)
        return None

    async def _fetching(self, flow: "Flow", check: Callable[["Flow", SessionEntry], None]) -> None:
        try:
            check(flow, await self._entry(flow))
        except ProxyError as e:
            self._count(e, flow)
            raise

    def _check_api(self, flow: "Flow", entry: SessionEntry) -> None:
        body = flow.request.body
        if body is None:
            raise InternalError("The JMAP request body was not buffered; refusing to forward it unchecked.")
        if len(body) > entry.session.limits.max_size_request:
            self._check_size(len(body), entry.session.limits)  # raises
        req = request_of(flow)
        if req is None:
            raise InternalError("The JMAP request could not be read.")
        check_request(req, entry.own, entry.session.limits)

    # ------------------------------------------------------------------ for other addons
    async def session_for(self, flow: "Flow") -> Session:
        """The user's session on flow.upstream (cached). Raises Unauthorized without identity."""
        return (await self._entry(flow)).session

    async def accounts_for(self, flow: "Flow") -> frozenset[str]:
        """The user's own account ids on flow.upstream (cached)."""
        return (await self._entry(flow)).own

    # ------------------------------------------------------------------ internals
    def _check_head(self, flow: "Flow") -> Any:
        """None when the head may go on, a coroutine when the session must be fetched first;
        raises the refusal."""
        parsed = account_path(flow.request.path, self._jmap_path)
        if parsed is None:
            return None
        if flow.request.websocket:  # (the engine bridges it: see proxy.websocket)
            if not self._opts.allow_websocket:
                raise _refused(Forbidden("JMAP over WebSocket is not available through this proxy."), "websocket")
            return self._with_entry(flow, _session_known)  # (its messages are checked against it)
        kind, acct = parsed
        if kind in ("upload", "download"):
            if acct is None:
                raise _refused(Forbidden(f"The {kind} path names no account."), "foreign_account")
            return self._with_entry(flow, functools.partial(self._check_blob, kind, acct))
        if is_api_request(flow, self._jmap_path):
            entry = self._cached(flow)
            if entry is None:
                return self._fetching(flow, self._check_api_head)
            self._check_api_head(flow, entry)
        return None

    @staticmethod
    def _check_blob(kind: str, acct: str, flow: "Flow", entry: SessionEntry) -> None:
        if acct not in entry.own:
            raise _refused(Forbidden(f"The {kind} path names an account that is not yours."), "foreign_account")
        if kind == "upload":
            n = _content_length(flow)
            if n is not None and n > entry.session.limits.max_size_upload:
                raise _refused(limit_error(
                    PayloadTooLarge, "maxSizeUpload",
                    f"The upload is larger than {entry.session.limits.max_size_upload} bytes."), "too_large")

    def _check_api_head(self, flow: "Flow", entry: SessionEntry) -> None:
        limits = entry.session.limits
        n = flow.request.content_length
        if n is None:
            n = _content_length(flow)
        if n is not None and n > limits.max_size_request:
            self._check_size(n, limits)  # raises
        flow.request.want_body(limits.max_size_request)

    @staticmethod
    def _check_size(n: int, limits: Limits) -> None:
        if n > limits.max_size_request:
            raise _refused(limit_error(
                PayloadTooLarge, "maxSizeRequest",
                f"The request is larger than {limits.max_size_request} bytes."), "too_large")

    def _count(self, e: ProxyError, flow: "Flow | None" = None) -> None:
        reason = getattr(e, "reason", None)
        if reason is not None:
            self._refusals.labels(reason).inc()
            if flow is not None and self._loader is not None:
                self._loader.audit("jmap_guard.refused", flow, reason=reason, status=e.status)

    def _target(self, flow: "Flow") -> "Target":
        if flow.upstream is not None:
            return flow.upstream
        assert self._loader is not None
        return self._loader.config.default_target()

    def _cached(self, flow: "Flow") -> SessionEntry | None:
        """The cached entry of the flow's user on its target (counted as a hit), else None."""
        ident = flow.identity
        if ident is None:
            raise Unauthorized("Authentication is required.")
        target = flow.upstream or self._target(flow)
        entry = self._cache.get((ident.subject, target.key))
        if entry is not None:
            self._hits.inc()
        return entry

    async def _entry(self, flow: "Flow") -> SessionEntry:
        entry = self._cached(flow)
        if entry is not None:
            return entry
        target = self._target(flow)
        key = (flow.identity.subject, target.key)  # type: ignore[union-attr]  # _cached checked it
        # shared by concurrent misses; a client that goes away does not cancel the others' fetch
        return await self._inflight.run(key, lambda: self._load(flow, target, key), label=target.name,
                                        on_join=lambda join: self._lookups.labels(join).inc())

    async def _load(self, flow: "Flow", target: "Target", key: Hashable) -> SessionEntry:
        try:
            session = await self._fetch(flow, target)
        except ProxyError:
            self._fetches.labels("error").inc()
            raise
        self._fetches.labels("ok").inc()
        assert flow.identity is not None
        entry = SessionEntry(session, own_accounts(session, flow.identity.login,
                                                   allow_shared=self._opts.allow_shared_accounts))
        self._cache.put(key, entry)
        return entry

    async def _fetch(self, flow: "Flow", target: "Target") -> Session:
        assert self._loader is not None
        headers = [("Accept", "application/json"), *(await self._credentials(flow))]
        signer = self._loader.addon("header_signer")
        side_headers = getattr(signer, "side_headers", None)
        path = self._opts.session_path
        redirects = 0
        while True:
            hop = headers + side_headers(flow, "GET", path) if side_headers is not None else headers
            try:
                resp = await self._loader.fetch(target, "GET", path, headers=hop,
                                                cap=self._opts.max_session_bytes)
            except ProxyError:
                raise
            except Exception as e:
                log.warning("JMAP session fetch from %s failed: %s: %s", target.name, type(e).__name__, e)
                raise BadGateway("The JMAP session could not be fetched from the mail server.") from e
            if resp.status not in _REDIRECTS:
                break
            location = resp.headers.get("Location")
            redirects += 1
            if not location or redirects > _MAX_REDIRECTS:
                raise BadGateway("The mail server's JMAP session redirects too often or nowhere.")
            path = redirect_path(path, location)
        if resp.status in (429, 503):
            retry = resp.headers.get("Retry-After")
            raise NoUpstream("The mail server is not available.",
                             headers={"Retry-After": retry} if retry else None)
        if resp.status != 200:
            log.warning("JMAP session fetch from %s answered %s", target.name, resp.status)
            raise BadGateway(f"The mail server answered the session request with {resp.status}.")
        return Session.parse(resp.body or b"")

    async def _credentials(self, flow: "Flow") -> list[tuple[str, str]]:
        """What authenticates the session request upstream: upstream_identity's credentials for
        this flow when that addon is present, else the client's own Authorization header."""
        assert self._loader is not None
        ui = self._loader.addon("upstream_identity")
        fn = getattr(ui, "credentials", None) if ui is not None else None
        if fn is not None:
            creds = fn(flow)
            if inspect.isawaitable(creds):
                creds = await creds
            if creds is not None:
                items = creds.items() if hasattr(creds, "items") else creds
                return [(str(k), str(v)) for k, v in items]
        auth = flow.request.header("Authorization")
        return [("Authorization", auth)] if auth else []


def _content_length(flow: "Flow") -> int | None:
    if flow.request.content_length is not None:
        return flow.request.content_length
    raw = flow.request.header("Content-Length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest("Content-Length is not a number.") from None
