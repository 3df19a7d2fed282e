"""A local stand-in for Stalwart Mail Server (v0.16), faithful to /work/shared/STALWART.md.

No Stalwart binary can run here, and Cyrus (the e2e server) differs from it. This double keeps
the behaviours the proxy depends on:
- GET /.well-known/jmap -> 307 to /jmap/session; the session's URLs are ABSOLUTE, built from the
  configured public base (never the Host header); account ids are short opaque strings ("a", "b").
- Basic `user:secret` and `target%impersonator:secret` (the impersonator needs the impersonate
  permission); Bearer tokens from a table. A failed login answers 401 with two WWW-Authenticate
  headers (Bearer and Basic).
- Request errors are RFC 7807 problem+json with JMAP's types (notJSON, notRequest,
  unknownCapability, limit); a fifth concurrent API request of one user gets the `limit` problem;
  an over-rate user gets 429 with Retry-After.
- Method errors come inside an HTTP 200: Mailbox/get on an account the user cannot see answers
  ["error", {"type": "accountNotFound"}, id].
- Shared accounts follow Stalwart's session code: an account another *user* shared is listed with
  isPersonal true and that user's name; a group account with isPersonal false.
- /healthz/live (200) and /healthz/ready (200, or 503 when `ready` is False).
- Every request is recorded (method, target, headers, body) so tests can assert that a refused
  request never reached the server.

`make_app(double)` builds the aiohttp application (serve it over TLS by passing an SSLContext to
`serve`); `serve(double)` runs it on 127.0.0.1:0 and yields the base URL.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import orjson
from aiohttp import web
from multidict import CIMultiDict

__all__ = ["User", "Recorded", "StalwartDouble", "make_app", "serve"]

CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
WEBSOCKET = "urn:ietf:params:jmap:websocket"
KNOWN_CAPS = (CORE, MAIL, SUBMISSION, VACATION, WEBSOCKET, "urn:ietf:params:jmap:quota",
              "urn:ietf:params:jmap:blob", "urn:stalwart:jmap")
ROLES = ("inbox", "drafts", "sent", "trash", "junk", "archive")
LIMITS = {"maxSizeUpload": 50_000_000, "maxConcurrentUpload": 4, "maxSizeRequest": 10_000_000,
          "maxConcurrentRequests": 4, "maxCallsInRequest": 16, "maxObjectsInGet": 500,
          "maxObjectsInSet": 500}


@dataclass
class User:
    name: str  # the login name (Stalwart's principal name)
    secret: str
    account_id: str
    description: str = ""
    email: str = ""
    can_impersonate: bool = False
    is_group: bool = False


@dataclass(frozen=True)
class Recorded:
    method: str
    target: str  # path and query as received
    headers: CIMultiDict
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def _default_users() -> list[User]:
    return [
        User("alice", "alicepw", "a", "Alice Liddell", "alice@example.com"),
        User("bob", "bobpw", "b", "Bob Builder", "bob@example.com"),
        User("sales", "", "c", "Sales team", "sales@example.com", is_group=True),
        User("proxy", "proxypw", "d", "Edge proxy", can_impersonate=True),
    ]


@dataclass
class StalwartDouble:
    public_base: str = "https://mail.example.test"
    users: list[User] = field(default_factory=_default_users)
    # user name -> account ids of other users/groups it can see (shared with it, or its groups)
    shares: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> user name
    limits: dict[str, int] = field(default_factory=lambda: dict(LIMITS))
    ready: bool = True
    rate_limit: int | None = None  # authenticated requests per user per minute
    api_delay: float = 0.0  # seconds each API request takes (to provoke concurrency)
    requests: list[Recorded] = field(default_factory=list)
    ws_messages: list[Any] = field(default_factory=list)  # what JMAP-over-WebSocket clients sent
    blobs: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)
    _rate: dict[str, list[float]] = field(default_factory=dict)

    # ------------------------------------------------------------------ lookups
    def user(self, name: str) -> User | None:
        n = name.lower()
        for u in self.users:
            if not u.is_group and (u.name == n or (u.email and u.email == n)):
                return u
        return None

    def by_account(self, account_id: str) -> User | None:
        for u in self.users:
            if u.account_id == account_id:
                return u
        return None

    def visible_accounts(self, u: User) -> list[str]:
        return [u.account_id, *self.shares.get(u.name, [])]

    def seen(self, path_prefix: str) -> list[Recorded]:
        """Requests received whose path starts with path_prefix."""
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    # ------------------------------------------------------------------ documents
    def session(self, u: User) -> dict[str, Any]:
        base = self.public_base.rstrip("/")
        ws = "ws" + base[len("http"):] if base.startswith("http") else base
        caps: dict[str, Any] = {
            CORE: {**self.limits, "collationAlgorithms": ["i;ascii-numeric", "i;ascii-casemap", "i;unicode-casemap"]},
            MAIL: {}, SUBMISSION: {}, VACATION: {},
            WEBSOCKET: {"url": f"{ws}/jmap/ws", "supportsPush": True},
        }
        acct_caps = {MAIL: {"maxMailboxesPerEmail": None, "maxMailboxDepth": 10, "maxSizeMailboxName": 255,
                            "maxSizeAttachmentsPerEmail": 50_000_000, "emailQuerySortOptions": ["receivedAt"],
                            "mayCreateTopLevelMailbox": True},
                     SUBMISSION: {"maxDelayedSend": 2592000, "submissionExtensions": {}},
                     VACATION: {}}
        accounts = {u.account_id: {"name": u.description or u.name, "isPersonal": True, "isReadOnly": False,
                                   "accountCapabilities": acct_caps}}
        for acct in self.shares.get(u.name, []):
            other = self.by_account(acct)
            if other is None:
                continue
            accounts[acct] = {"name": other.name, "isPersonal": not other.is_group, "isReadOnly": False,
                              "accountCapabilities": {MAIL: acct_caps[MAIL]}}
        return {
            "capabilities": caps,
            "accounts": accounts,
            "primaryAccounts": {MAIL: u.account_id, SUBMISSION: u.account_id, VACATION: u.account_id},
            "username": u.name,
            "apiUrl": f"{base}/jmap/",
            "downloadUrl": f"{base}/jmap/download/{{accountId}}/{{blobId}}/{{name}}?accept={{type}}",
            "uploadUrl": f"{base}/jmap/upload/{{accountId}}/",
            "eventSourceUrl": f"{base}/jmap/eventsource/?types={{types}}&closeafter={{closeafter}}&ping={{ping}}",
            "state": "b3f2a1c0",
        }

    # ------------------------------------------------------------------ auth
    def authenticate(self, header: str | None) -> User | None:
        if not header:
            return None
        scheme, _, cred = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            name = self.tokens.get(cred.strip())
            return self.user(name) if name else None
        if scheme != "basic":
            return None
        try:
            login, sep, secret = base64.b64decode(cred.strip(), validate=True).decode().partition(":")
        except ValueError:
            return None
        if not sep:
            return None
        target_name, pct, actor_name = login.partition("%")
        if pct:
            actor = self.user(actor_name)
            if actor is None or actor.secret != secret or not actor.can_impersonate:
                return None
            return self.user(target_name)
        u = self.user(login)
        return u if u is not None and u.secret == secret else None


# ---------------------------------------------------------------------------- HTTP
def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json",
                        headers=headers)


def _problem(status: int, type_: str, title: str, detail: str, **extra: Any) -> web.Response:
    body = {"type": type_, "status": status, "title": title, "detail": detail, **extra}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/problem+json")


def _unauthorized() -> web.Response:
    resp = _problem(401, "about:blank", "Unauthorized", "You have to authenticate first.")
    resp.headers.add("WWW-Authenticate", 'Bearer realm="Stalwart Server"')
    resp.headers.add("WWW-Authenticate", 'Basic realm="Stalwart Server"')
    return resp


def _limit(limit: str, detail: str) -> web.Response:
    return _problem(400, "urn:ietf:params:jmap:error:limit", "Limit exceeded", detail, limit=limit)


def make_app(double: StalwartDouble) -> web.Application:
    """The double as an aiohttp application (one catch-all handler that records everything)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        double.requests.append(Recorded(request.method, request.raw_path, CIMultiDict(request.headers), body))
        path = request.path
        if path == "/healthz/live":
            return web.Response(status=200)
        if path == "/healthz/ready":
            return web.Response(status=200 if double.ready else 503)
        if path == "/.well-known/jmap" and request.method == "GET":
            return web.Response(status=307, headers={"Location": "/jmap/session"})
        if not (path == "/jmap" or path.startswith("/jmap/")):
            return _problem(404, "about:blank", "Not Found", "The requested resource does not exist.")
        user = double.authenticate(request.headers.get("Authorization"))
        if user is None:
            return _unauthorized()
        if double.rate_limit is not None:
            now = time.monotonic()
            window = [t for t in double._rate.get(user.name, []) if t > now - 60]
            if len(window) >= double.rate_limit:
                resp = _problem(429, "about:blank", "Too Many Requests", "Your request rate is too high.")
                resp.headers["Retry-After"] = "60"
                return resp
            window.append(now)
            double._rate[user.name] = window
        if path == "/jmap/session" and request.method == "GET":
            return _json(double.session(user))
        if path == "/jmap/ws" and request.method == "GET":
            return await _websocket(double, user, request)
        if path in ("/jmap", "/jmap/") and request.method == "POST":
            return await _api(double, user, body)
        parts = path.split("/")  # ["", "jmap", kind, acct, ...]
        if len(parts) >= 4 and parts[2] == "upload" and request.method == "POST":
            return _upload(double, user, parts[3], request.headers.get("Content-Type", "application/octet-stream"), body)
        if len(parts) >= 6 and parts[2] == "download" and request.method in ("GET", "HEAD"):
            return _download(double, user, parts[3], parts[4], parts[5])
        return _problem(404, "about:blank", "Not Found", "The requested resource does not exist.")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _websocket(double: StalwartDouble, user: User, request: web.Request) -> web.StreamResponse:
    """JMAP over WebSocket (RFC 8887): each Request message answered with a Response (or a
    RequestError) carrying its id as requestId; every message received is recorded."""
    ws = web.WebSocketResponse(protocols=("jmap",))
    await ws.prepare(request)
    async for msg in ws:
        if msg.type != web.WSMsgType.TEXT:
            double.ws_messages.append(msg.data)
            await ws.close(code=1003)
            break
        double.ws_messages.append(msg.data)
        try:
            doc = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or doc.get("@type") != "Request":
            await ws.send_bytes(orjson.dumps({"@type": "RequestError", "type": "urn:ietf:params:jmap:error:notRequest",
                                              "status": 400}))
            continue
        rid = doc.pop("id", None)
        doc.pop("@type")
        resp = _api_body(double, user, orjson.dumps(doc))
        answer = orjson.loads(resp.body)  # type: ignore[arg-type]
        answer["@type"] = "Response" if resp.status == 200 else "RequestError"
        if rid is not None:
            answer["requestId"] = rid
        await ws.send_str(orjson.dumps(answer).decode())
    return ws


async def _api(double: StalwartDouble, user: User, body: bytes) -> web.Response:
    if len(body) > double.limits["maxSizeRequest"]:
        return _limit("maxSizeRequest", "Request size exceeds the maximum allowed.")
    if double._in_flight.get(user.name, 0) >= double.limits["maxConcurrentRequests"]:
        return _limit("maxConcurrentRequests", "Too many concurrent requests.")
    double._in_flight[user.name] = double._in_flight.get(user.name, 0) + 1
    try:
        if double.api_delay:
            await asyncio.sleep(double.api_delay)
        return _api_body(double, user, body)
    finally:
        double._in_flight[user.name] -= 1


def _api_body(double: StalwartDouble, user: User, body: bytes) -> web.Response:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _problem(400, "urn:ietf:params:jmap:error:notJSON", "Not JSON", "The request is not valid JSON.")
    if (not isinstance(doc, dict) or not isinstance(doc.get("using"), list)
            or not isinstance(doc.get("methodCalls"), list)):
        return _problem(400, "urn:ietf:params:jmap:error:notRequest", "Not a request",
                        "The request is not a valid JMAP request.")
    for cap in doc["using"]:
        if cap not in KNOWN_CAPS:
            return _problem(400, "urn:ietf:params:jmap:error:unknownCapability", "Unknown capability",
                            f"Unknown capability: {cap!r}")
    calls = doc["methodCalls"]
    if len(calls) > double.limits["maxCallsInRequest"]:
        return _limit("maxCallsInRequest", "Too many calls in request.")
    visible = double.visible_accounts(user)
    out = []
    for call in calls:
        if not (isinstance(call, list) and len(call) == 3 and isinstance(call[1], dict)):
            return _problem(400, "urn:ietf:params:jmap:error:notRequest", "Not a request",
                            "A method call is malformed.")
        name, args, call_id = call
        if name == "Core/echo":
            out.append(["Core/echo", args, call_id])
        elif name == "Mailbox/get":
            acct = args.get("accountId")
            if acct not in visible:
                out.append(["error", {"type": "accountNotFound"}, call_id])
                continue
            boxes = [{"id": f"{acct}{i}", "name": role.capitalize(), "role": role, "parentId": None}
                     for i, role in enumerate(ROLES)]
            out.append(["Mailbox/get", {"accountId": acct, "state": "s1", "list": boxes, "notFound": []}, call_id])
        else:
            out.append(["error", {"type": "unknownMethod"}, call_id])
    return _json({"methodResponses": out, "sessionState": "b3f2a1c0"})


def _upload(double: StalwartDouble, user: User, acct: str, ctype: str, body: bytes) -> web.Response:
    if acct not in double.visible_accounts(user):
        return _problem(403, "about:blank", "Forbidden", "You do not have access to this account.")
    if len(body) > double.limits["maxSizeUpload"]:
        return _problem(400, "urn:ietf:params:jmap:error:limit", "Limit exceeded", "Upload too large.",
                        limit="maxSizeUpload")
    blob_id = "B" + hashlib.sha1(body).hexdigest()[:16]
    double.blobs[(acct, blob_id)] = (ctype, body)
    return _json({"accountId": acct, "blobId": blob_id, "type": ctype, "size": len(body)}, status=201)


def _download(double: StalwartDouble, user: User, acct: str, blob_id: str, name: str) -> web.Response:
    blob = double.blobs.get((acct, blob_id)) if acct in double.visible_accounts(user) else None
    if blob is None:
        return _problem(404, "about:blank", "Not Found", "The requested blob does not exist.")
    return web.Response(status=200, body=blob[1], content_type=blob[0],
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


@contextlib.asynccontextmanager
async def serve(double: StalwartDouble, *, ssl_context: Any = None) -> AsyncIterator[str]:
    """Run the double on 127.0.0.1 with an OS-chosen port; yields its base URL."""
    runner = web.AppRunner(make_app(double), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
