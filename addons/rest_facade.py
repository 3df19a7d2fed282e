"""The REST facade: /api/v1/mail/... answered by the proxy itself from JMAP calls it makes on the
user's behalf (docs/rest-api.md).

Each endpoint validates its input (proxy.rest), then sends one JMAP API request (two for a send
whose identity is not cached) upstream through the engine's mTLS pool with upstream_identity's
credentials for the user and header_signer's side headers. The account is always the session's
primaryAccounts["urn:ietf:params:jmap:mail"], read from the JMAP guard's cached session.

The two attachment endpoints stream instead: in the `request` hook (after the policy saw the
facade path) the flow is rewritten to the session's upload or download URL for that account and
the engine forwards it, the body streaming both ways. upstream_identity and header_signer run
after this addon, so they credential and sign the rewritten target; the JMAP guard's own
upload/download check is run again on it. The upload's small JSON answer is buffered and
reshaped; the download's body passes untouched, under the facade's headers.

Caches, per (user, target): mailboxes and sending identities (5 min), quotas (1 h). A write
through the facade (move, flag, delete, send, upload) or a raw JMAP write through the proxy
(Mailbox/set, Email/set, EmailSubmission/set, ...) drops them; `Cache-Control: no-cache` on a
request skips the cached copy. sge_proxy_cache_requests_total{cache,result} counts hits.

It also watches raw JMAP API requests (it runs after the guard) for those writes.
"""
from __future__ import annotations

import inspect
import logging
import os.path
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Hashable

import orjson
from multidict import CIMultiDict

from addons.jmap_guard import check_request
from proxy import rest
from proxy.errors import (BadGateway, BadRequest, ConfigError, InternalError,
                          PayloadTooLarge, ProxyError, Unauthorized)
from proxy.flow import Response
from proxy.jmap import JmapRequest, MethodCall, is_api_request, request_of
from proxy.openapi import document as openapi_document

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow
    from proxy.session import Session
    from proxy.target import Target

__all__ = ["RestFacade", "RestFacadeOptions", "CACHES"]

log = logging.getLogger(__name__)

CACHES = ("mailbox", "identity", "quota")
_RESULTS = ("hit", "miss", "bypass")
_WRITE = "rest_facade.write"
_STREAM = "rest_facade.stream"
_JSON = "application/json"
_ANSWER_CAP = 1 << 20  # an upload's JSON answer or a failed download's error body, buffered
# Uploads up to this size are buffered anyway: header_signer then covers the body with its hash,
# and the engine's forward of a body that arrived whole while reading was paused is avoided
# (RequestBody.take_all does not resume reading: the keep-alive connection then stalls).
_SMALL_UPLOAD = 1 << 20
# every facade path starts with this ("/api/v1/"): one startswith() keeps other paths off
# rest.is_facade_path, which only the facade's own paths need
FACADE_ROOT = os.path.commonprefix((rest.PREFIX + "/", rest.OPENAPI_PATH))


@dataclass(frozen=True, kw_only=True)
class RestFacadeOptions:
    """[addons.rest_facade]

    mailbox_ttl, identity_ttl, quota_ttl: how long mailboxes, sending identities and quotas are
      cached per user and target.
    cache_size: entries per cache (least recently used dropped first).
    max_json_body: the largest JSON request body (send, PATCH).
    max_upload: the largest attachment upload (streamed above 1 MiB; a chunked one, with no
      length to check up front, is buffered up to it); the session's maxSizeUpload applies too.
    max_response: the largest JMAP answer read.
    max_body_value_bytes: truncate message bodies in GET /messages/{id} (0: whole bodies).
    """
    mailbox_ttl: float = field(default=300.0, metadata={"kind": "duration"})
    identity_ttl: float = field(default=300.0, metadata={"kind": "duration"})
    quota_ttl: float = field(default=3600.0, metadata={"kind": "duration"})
    cache_size: int = 10_000
    max_json_body: int = field(default=10 << 20, metadata={"kind": "size"})
    max_upload: int = field(default=50_000_000, metadata={"kind": "size"})
    max_response: int = field(default=20 << 20, metadata={"kind": "size"})
    max_body_value_bytes: int = field(default=0, metadata={"kind": "size"})

    def __post_init__(self) -> None:
        if self.cache_size < 1:
            raise ConfigError("cache_size", "must be at least 1")
        for name in ("max_json_body", "max_upload", "max_response"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1 byte")
        for name in ("mailbox_ttl", "identity_ttl", "quota_ttl"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must not be negative")


@dataclass(frozen=True, slots=True)
class _Ctx:
    """What every endpoint needs about the user."""
    session: "Session"
    account: str
    own: frozenset[str]
    target: "Target"
    key: Hashable
    bypass: bool


@dataclass(slots=True)
class _Stream:
    """A flow rewritten to the upload or download URL (flow.metadata[_STREAM])."""
    kind: str              # "upload" | "download"
    ctype: str             # the blob's media type
    name: str | None       # the attachment's name (download)
    key: Hashable          # the user's cache key (an upload drops the cached quota)
    size: int | None = None


def _json(status: int, doc: Any, headers: list[tuple[str, str]] = ()) -> Response:
    return Response.make(status, orjson.dumps(doc),
                         [("Content-Type", _JSON), ("Cache-Control", "no-store"), *headers])


class RestFacade:
    name = "rest_facade"
    security = True
    Options = RestFacadeOptions

    def __init__(self) -> None:
        self._loader: Loader | None = None
        self._opts = RestFacadeOptions()
        self._jmap_path = "/jmap"
        self._caches: dict[str, rest.FacadeCache] = {}
        self._counts: dict[tuple[str, str], Any] = {}
        self._openapi: bytes | None = None

    def load(self, loader: "Loader") -> None:
        self._loader = loader
        o = self._opts = loader.options or RestFacadeOptions()
        self._jmap_path = loader.config.stalwart.jmap_path.rstrip("/") or "/"
        self._caches = {"mailbox": rest.FacadeCache(o.cache_size, o.mailbox_ttl),
                        "identity": rest.FacadeCache(o.cache_size, o.identity_ttl),
                        "quota": rest.FacadeCache(o.cache_size, o.quota_ttl)}
        counter = loader.metrics.counter("sge_proxy_cache_requests_total",
                                         "Look-ups in the proxy's caches.", ("cache", "result"))
        self._counts = {(c, r): counter.labels(c, r) for c in CACHES for r in _RESULTS}
        self._openapi = orjson.dumps(openapi_document(loader.config.public_base()))

    def done(self) -> None:
        for c in self._caches.values():
            c.clear()

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: "Flow") -> None:
        req = flow.request
        path = req.path
        if not path.startswith(FACADE_ROOT) or not rest.is_facade_path(path) \
                or req.method not in ("POST", "PATCH", "PUT"):
            return
        upload = path == rest.UPLOAD_PATH
        cap = self._opts.max_upload if upload else self._opts.max_json_body
        if req.content_length is not None and req.content_length > cap:
            raise PayloadTooLarge(f"The request body is larger than {cap} bytes.")
        if not upload or req.chunked or (req.content_length or 0) <= _SMALL_UPLOAD:
            req.want_body(cap)  # a large upload with a length streams: never read here

    def request(self, flow: "Flow") -> Any:
        """Answers a facade path (a coroutine); notes a JMAP request that may write (sync)."""
        path = flow.request.path
        if path.startswith(FACADE_ROOT) and rest.is_facade_path(path):
            return self._answer_flow(flow)
        if flow.identity is not None and is_api_request(flow, self._jmap_path):
            try:
                req = request_of(flow)
            except ProxyError:
                req = None
            if req is None or not rest.WRITE_METHODS.isdisjoint(req.names):
                flow.metadata[_WRITE] = True
        return None

    async def _answer_flow(self, flow: "Flow") -> None:
        flow.response = await self._answer(flow)

    def responseheaders(self, flow: "Flow") -> None:
        s, resp = flow.metadata.get(_STREAM), flow.response
        if s is None or resp is None:
            return
        if s.kind == "download" and resp.status == 200:
            resp.headers = CIMultiDict(rest.download_headers(s.ctype, s.name, resp.headers))
            flow.metadata.pop(_STREAM)
        else:
            resp.want_body(_ANSWER_CAP)

    def response(self, flow: "Flow") -> None:
        s = flow.metadata.pop(_STREAM, None)
        if s is not None and flow.response is not None:
            resp = flow.response
            if s.kind == "download":
                raise rest.download_error(resp.status, resp.headers, resp.body)
            doc = rest.upload_result(resp.status, resp.headers, resp.body, s.ctype, s.size)
            self.invalidate(s.key, ("quota",))
            flow.response = _json(201, doc)
        if flow.metadata.pop(_WRITE, None) and flow.identity is not None and flow.response is not None \
                and flow.response.status < 300:
            self.invalidate(self._key(flow, self._target(flow)))

    # ------------------------------------------------------------------ for other addons and tests
    def invalidate(self, key: Hashable, caches: tuple[str, ...] = CACHES) -> None:
        """Drop the cached data of one (user subject, target key)."""
        for name in caches:
            self._caches[name].invalidate(key)

    # ------------------------------------------------------------------ dispatch
    async def _answer(self, flow: "Flow") -> Any:
        r = rest.route(flow.request.method, flow.request.path)
        if r.endpoint == "openapi":
            return Response.make(200, self._openapi or b"", [("Content-Type", _JSON),
                                                             ("Cache-Control", "public, max-age=300")])
        if flow.identity is None:
            raise Unauthorized("Authentication is required.")
        ctx = await self._ctx(flow)
        handler: Callable[..., Awaitable[Any]] = getattr(self, "_" + r.endpoint)
        return await handler(flow, ctx, *r.params)  # None: the flow was rewritten to go upstream

    async def _ctx(self, flow: "Flow") -> _Ctx:
        assert self._loader is not None
        guard = self._loader.addon("jmap_guard")
        if guard is None:
            log.error("the rest_facade addon needs the jmap_guard addon in the chain")
            raise InternalError("The REST facade is not configured correctly.")
        session = await guard.session_for(flow)
        own = await guard.accounts_for(flow)
        account = session.mail_account
        if account is None or account not in own:
            raise rest.jmap_error("accountNotFound")
        target = self._target(flow)
        cc = flow.request.headers.get("Cache-Control", "") + "," + flow.request.headers.get("Pragma", "")
        return _Ctx(session, account, own, target, self._key(flow, target), "no-cache" in cc.lower())

    def _target(self, flow: "Flow") -> "Target":
        if flow.upstream is not None:
            return flow.upstream
        assert self._loader is not None
        return self._loader.config.default_target()

    @staticmethod
    def _key(flow: "Flow", target: "Target") -> Hashable:
        assert flow.identity is not None
        return (flow.identity.subject, target.key)

    # ------------------------------------------------------------------ upstream I/O
    async def _headers(self, flow: "Flow", method: str, path: str, body: bytes) -> list[tuple[str, str]]:
        """upstream_identity's credentials for this user (else the client's Authorization), and
        header_signer's X-SGE-* side headers."""
        assert self._loader is not None
        out: list[tuple[str, str]] = []
        ui = self._loader.addon("upstream_identity")
        fn = getattr(ui, "credentials", None) if ui is not None else None
        creds = fn(flow) if fn is not None else None
        if inspect.isawaitable(creds):
            creds = await creds
        if creds is not None:
            out.extend((str(k), str(v)) for k, v in (creds.items() if hasattr(creds, "items") else creds))
        elif flow.request.headers.get("Authorization"):
            out.append(("Authorization", flow.request.headers["Authorization"]))
        signer = self._loader.addon("header_signer")
        side = getattr(signer, "side_headers", None)
        if side is not None:
            out.extend(side(flow, method, path, body))
        return out

    async def _fetch(self, flow: "Flow", ctx: _Ctx, method: str, path: str, *, body: bytes | None = None,
                     headers: list[tuple[str, str]] = (), cap: int) -> Any:
        assert self._loader is not None
        h = [*headers, *(await self._headers(flow, method, path, body or b""))]
        try:
            return await self._loader.fetch(ctx.target, method, path, headers=h, body=body, cap=cap)
        except ProxyError:
            raise
        except Exception as e:
            log.warning("REST facade call to %s failed: %s: %s", ctx.target.name, type(e).__name__, e)
            raise BadGateway("The mail server could not be reached.") from e

    async def _call(self, flow: "Flow", ctx: _Ctx, doc: dict[str, Any]) -> rest.Responses:
        """One JMAP API request for the user. The guard's rules are applied to it as well."""
        body = orjson.dumps(doc)
        limits = ctx.session.limits
        if len(body) > limits.max_size_request:
            raise PayloadTooLarge(f"The request would be larger than the mail server's {limits.max_size_request} "
                                  "bytes.", extra={"jmapType": "urn:ietf:params:jmap:error:limit",
                                                   "limit": "maxSizeRequest"})
        check_request(JmapRequest(tuple(doc["using"]), tuple(MethodCall(n, a, c) for n, a, c in doc["methodCalls"]),
                                  doc), ctx.own, limits)
        path = rest.url_path(ctx.session.api_url)
        resp = await self._fetch(flow, ctx, "POST", path, body=body, cap=self._opts.max_response,
                                 headers=[("Content-Type", _JSON), ("Accept", _JSON)])
        return rest.api_responses(resp.status, resp.headers, resp.body)

    # ------------------------------------------------------------------ caches
    async def _cached(self, name: str, ctx: _Ctx, load: Callable[[], Awaitable[Any]], *,
                      fresh: bool = False) -> Any:
        cache = self._caches[name]
        if ctx.bypass or fresh:
            self._counts[(name, "bypass")].inc()
        else:
            value = cache.get(ctx.key)
            if value is not None:
                self._counts[(name, "hit")].inc()
                return value
            self._counts[(name, "miss")].inc()
        begun = cache.begin()
        value = await load()
        cache.put(ctx.key, value, begun)
        return value

    async def _mailboxes(self, flow: "Flow", ctx: _Ctx, *, fresh: bool = False) -> tuple[rest.Mailbox, ...]:
        async def load() -> tuple[rest.Mailbox, ...]:
            return rest.parse_mailboxes(await self._call(flow, ctx, rest.mailboxes_request(ctx.account)))
        return await self._cached("mailbox", ctx, load, fresh=fresh)

    async def _mailbox(self, flow: "Flow", ctx: _Ctx, ref: str) -> rest.Mailbox:
        """Resolve a mailbox reference; a miss in cached data is retried on fresh data once (the
        mailbox may be new)."""
        try:
            return rest.resolve_mailbox(await self._mailboxes(flow, ctx), ref)
        except BadRequest:
            if ctx.bypass:
                raise
        return rest.resolve_mailbox(await self._mailboxes(flow, ctx, fresh=True), ref)

    async def _role(self, flow: "Flow", ctx: _Ctx, role: str) -> rest.Mailbox | None:
        boxes = await self._mailboxes(flow, ctx)
        found = next((m for m in boxes if m.role == role), None)
        if found is None and not ctx.bypass:
            found = next((m for m in await self._mailboxes(flow, ctx, fresh=True) if m.role == role), None)
        return found

    async def _identities(self, flow: "Flow", ctx: _Ctx, *, fresh: bool = False) -> tuple[dict[str, Any], ...]:
        async def load() -> tuple[dict[str, Any], ...]:
            r = await self._call(flow, ctx, rest.identities_request(ctx.account))
            return tuple(i for i in r.get("i", "Identity/get").get("list") or () if isinstance(i, dict))
        return await self._cached("identity", ctx, load, fresh=fresh)

    # ------------------------------------------------------------------ endpoints
    async def _list_mailboxes(self, flow: "Flow", ctx: _Ctx) -> Any:
        return _json(200, {"mailboxes": [m.to_json() for m in await self._mailboxes(flow, ctx)]})

    async def _list_messages(self, flow: "Flow", ctx: _Ctx) -> Any:
        q = rest.parse_list_query(flow.request.query, ctx.session.limits.max_objects_in_get)
        box = await self._mailbox(flow, ctx, q.mailbox)
        r = await self._call(flow, ctx, rest.messages_request(ctx.account, box.id, q))
        out = rest.list_result(r)
        out.update({"limit": q.limit, "mailbox": box.to_json()})
        return _json(200, out)

    async def _get_message(self, flow: "Flow", ctx: _Ctx, email_id: str) -> Any:
        r = await self._call(flow, ctx, rest.message_request(ctx.account, email_id,
                                                             max_body_bytes=self._opts.max_body_value_bytes))
        return _json(200, rest.message_result(r, email_id))

    async def _update_message(self, flow: "Flow", ctx: _Ctx, email_id: str) -> Any:
        patch = rest.parse_patch(self._body(flow))
        target = (await self._mailbox(flow, ctx, patch.mailbox)).id if patch.mailbox is not None else None
        r = await self._call(flow, ctx, rest.update_request(ctx.account, email_id, patch, target))
        self.invalidate(ctx.key, ("mailbox",))
        return _json(200, rest.update_result(r, email_id))

    async def _delete_message(self, flow: "Flow", ctx: _Ctx, email_id: str) -> Any:
        permanent = rest.parse_delete_query(flow.request.query)
        trash = None
        if not permanent:
            box = await self._role(flow, ctx, "trash")
            if box is None:
                raise rest.Conflict("There is no Trash mailbox; delete with ?permanent=true.")
            trash = box.id
        r = await self._call(flow, ctx, rest.delete_request(ctx.account, email_id, trash))
        self.invalidate(ctx.key, ("mailbox", "quota"))
        rest.delete_result(r, email_id, permanent)
        return Response.make(204, b"", [("Cache-Control", "no-store")])

    async def _send_message(self, flow: "Flow", ctx: _Ctx) -> Any:
        draft = rest.parse_draft(self._body(flow), max_body=self._opts.max_json_body)
        drafts = await self._role(flow, ctx, "drafts")
        if drafts is None:
            raise rest.Conflict("There is no Drafts mailbox (role drafts) to create the message in.")
        sent = await self._role(flow, ctx, "sent")
        assert flow.identity is not None
        wanted = draft.sender or flow.identity.login
        try:
            ident = rest.choose_identity(list(await self._identities(flow, ctx)), wanted)
        except ProxyError:
            if ctx.bypass:
                raise
            ident = rest.choose_identity(list(await self._identities(flow, ctx, fresh=True)), wanted)
        sent_id = sent.id if sent is not None else None
        if draft.encrypted is not None:
            blob = await self._upload_message(flow, ctx, rest.encrypted_message(
                draft, ident, now=time.time(), message_id=f"<{uuid.uuid4().hex}@{ident['email'].rpartition('@')[2]}>"))
            r = await self._call(flow, ctx, rest.send_encrypted_request(ctx.account, ident, draft, blob, drafts.id,
                                                                       sent_id))
        else:
            r = await self._call(flow, ctx, rest.send_request(ctx.account, ident, draft, drafts.id, sent_id))
        self.invalidate(ctx.key, ("mailbox", "quota"))
        out = rest.send_result(r, draft)
        return _json(201, out, [("Location", f"{rest.PREFIX}/messages/{out['id']}")])

    async def _upload_message(self, flow: "Flow", ctx: _Ctx, raw: bytes) -> str:
        """Upload a whole message the proxy built (an encrypted one) as a blob: its id."""
        limit = ctx.session.limits.max_size_upload
        if len(raw) > limit:
            raise PayloadTooLarge(f"The message is larger than the mail server's {limit} bytes.",
                                  extra={"jmapType": "urn:ietf:params:jmap:error:limit", "limit": "maxSizeUpload"})
        path = rest.url_path(rest.expand(ctx.session.upload_url, accountId=ctx.account))
        resp = await self._fetch(flow, ctx, "POST", path, body=raw, cap=self._opts.max_response,
                                 headers=[("Content-Type", "message/rfc822"), ("Accept", _JSON)])
        return rest.upload_result(resp.status, resp.headers, resp.body, "message/rfc822", len(raw))["blobId"]

    async def _upload_attachment(self, flow: "Flow", ctx: _Ctx) -> None:
        req = flow.request
        limit = ctx.session.limits.max_size_upload
        size = req.content_length if not req.chunked else (len(req.body) if req.body is not None else None)
        if size is not None and size > limit:
            raise PayloadTooLarge(f"The attachment is larger than the mail server's {limit} bytes.",
                                  extra={"jmapType": "urn:ietf:params:jmap:error:limit", "limit": "maxSizeUpload"})
        if not size:
            raise BadRequest("The attachment is empty.")
        ctype = rest.upload_type(req.headers.get("Content-Type", ""))
        path = rest.url_path(rest.expand(ctx.session.upload_url, accountId=ctx.account))
        await self._rewrite(flow, path, [("Content-Type", ctype), ("Accept", _JSON)],
                            _Stream("upload", ctype, None, ctx.key, size))

    async def _download_attachment(self, flow: "Flow", ctx: _Ctx, email_id: str, blob_id: str) -> None:
        req = flow.request
        if req.chunked or req.content_length or req.body:
            raise BadRequest("A download takes no request body.")
        r = await self._call(flow, ctx, rest.attachments_request(ctx.account, email_id))
        att = rest.attachment_of(r, email_id, blob_id)
        ctype = rest.safe_media_type(att["type"])
        path = rest.url_path(rest.expand(ctx.session.download_url, accountId=ctx.account, blobId=blob_id,
                                         name=rest.download_name(att["name"]), type=ctype))
        await self._rewrite(flow, path, [("Accept", ctype), ("Accept-Encoding", "identity")],
                            _Stream("download", ctype, att["name"], ctx.key))

    async def _rewrite(self, flow: "Flow", path: str, headers: list[tuple[str, str]], stream: _Stream) -> None:
        """Point the flow at the mail server's upload or download URL: the engine forwards it
        (upstream_identity and header_signer, later in the chain, credential and sign it).

        The path is built for ctx.account only, which _ctx checked is the user's own; the JMAP
        guard's upload/download check, which ran on the facade path, is run again on this one."""
        assert self._loader is not None
        req = flow.request
        req.headers = CIMultiDict(rest.rewritten_headers(req.headers, headers))
        req.target = path
        flow.metadata[_STREAM] = stream
        guard = self._loader.addon("jmap_guard")
        checked = guard.requestheaders(flow)
        if inspect.isawaitable(checked):
            await checked

    async def _get_quota(self, flow: "Flow", ctx: _Ctx) -> Any:
        if rest.QUOTA not in ctx.session.capabilities:
            raise rest.NotImplementedHere("The mail server does not offer quotas (no urn:ietf:params:jmap:quota "
                                          "capability in its session).", extra={"jmapType": "unknownCapability"})

        async def load() -> dict[str, Any]:
            return rest.quota_result(await self._call(flow, ctx, rest.quota_request(ctx.account)))
        return _json(200, await self._cached("quota", ctx, load))

    async def _export(self, flow: "Flow", ctx: _Ctx) -> Response:
        """Every message of the user's mail account (or of one mailbox) as one mboxrd file, oldest
        first (data portability: SEED's GDPR item). Streamed: a page of ids at a time, then each
        message's raw bytes from the mail server, so neither the proxy nor the client holds the
        whole mailbox. The audit log records the export and, at its end, how many messages went out."""
        req = flow.request
        if req.chunked or req.content_length or req.body:
            raise BadRequest("An export takes no request body.")
        ref = rest.parse_export_query(req.query)
        box = await self._mailbox(flow, ctx, ref) if ref is not None else None
        limits = ctx.session.limits
        page = max(1, min(rest.EXPORT_PAGE, limits.max_objects_in_get))
        cap = max(self._opts.max_response, limits.max_size_upload)
        assert self._loader is not None
        loader = self._loader
        loader.audit("rest_facade.export_started", flow, mailbox=box.id if box is not None else None)

        async def chunks() -> AsyncIterator[bytes]:
            after: str | None = None
            count = 0
            try:
                while True:
                    r = await self._call(flow, ctx, rest.export_request(ctx.account, box.id if box else None,
                                                                        after, page))
                    items = rest.export_page(r)
                    for email_id, blob_id, received in items:
                        path = rest.url_path(rest.expand(ctx.session.download_url, accountId=ctx.account,
                                                         blobId=blob_id, name="message.eml",
                                                         type="message/rfc822"))
                        resp = await self._fetch(flow, ctx, "GET", path, cap=cap,
                                                 headers=[("Accept", "message/rfc822"),
                                                          ("Accept-Encoding", "identity")])
                        if resp.status != 200:
                            raise rest.upstream_error(resp.status, resp.headers, resp.body)
                        count += 1
                        yield rest.mbox_entry(resp.body or b"", received)
                    if len(items) < page:
                        break
                    after = items[-1][0]
            finally:
                loader.audit("rest_facade.export_finished", flow, messages=count)

        name = f"mail-export-{time.strftime('%Y%m%d', time.gmtime())}.mbox"
        return Response.stream(200, chunks(), [("Content-Type", "application/mbox"), ("Cache-Control", "no-store"),
                                               ("Content-Disposition", f'attachment; filename="{name}"'),
                                               ("X-Content-Type-Options", "nosniff")])

    async def _erase(self, flow: "Flow", ctx: _Ctx) -> Response:
        """Destroy every message of the account (or of one mailbox): the deletion half of SEED's
        GDPR item. Guarded three ways: the policy (the shipped one allows it only to the
        `mail-erasure` role), the body's `confirm` (the user's own login), and the audit log.
        Rounds of Email/query + Email/set destroy until nothing is left or a round destroys
        nothing (what the server refuses to destroy is reported, not retried forever)."""
        assert flow.identity is not None and self._loader is not None
        ref = rest.parse_erasure(self._body(flow), flow.identity.login)
        box = await self._mailbox(flow, ctx, ref) if ref is not None else None
        page = max(1, min(rest.ERASE_PAGE, ctx.session.limits.max_objects_in_set))
        loader = self._loader
        loader.audit("rest_facade.erasure_started", flow, mailbox=box.id if box is not None else None)
        destroyed = refused = 0
        try:
            for _ in range(rest.ERASE_MAX_ROUNDS):  # (a server that keeps finding what it destroyed)
                r = await self._call(flow, ctx, rest.erase_request(ctx.account, box.id if box else None, page))
                found, done, failed = rest.erase_round(r)
                destroyed += done
                if found == 0 or done == 0:
                    refused = failed
                    break
        finally:
            self.invalidate(ctx.key)
            loader.audit("rest_facade.erasure_finished", flow, destroyed=destroyed, not_destroyed=refused)
        return _json(200, {"destroyed": destroyed, "notDestroyed": refused,
                           "mailbox": box.to_json() if box is not None else None})

    # ------------------------------------------------------------------ input
    def _body(self, flow: "Flow") -> dict[str, Any]:
        return rest.parse_json_object(flow.request.body, flow.request.headers.get("Content-Type", ""))
