"""addons.jmap_guard: pure checks as tables, then the addon against the Stalwart double over real
HTTP (the engine's own UpstreamPool.fetch is the loader's fetch)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
from typing import AsyncIterator

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from addons.jmap_guard import (LIMIT_TYPE, JmapGuard, SessionCache, account_path, check_request,
                               redirect_path)
from addons.upstream_identity import UpstreamIdentity
from proxy.addonmanager import AddonManager
from proxy.config import Config, StalwartOptions
from proxy.errors import BadGateway, BadRequest, Forbidden, PayloadTooLarge, ProxyError
from proxy.flow import Flow, Request, Response
from proxy.identity import Identity
from proxy.jmap import parse_request
from proxy.metrics import Metrics
from proxy.session import Limits
from proxy.target import Target
from proxy.tls import ClientTLS
from proxy.upstream import UpstreamPool
from tests.stalwart_double import StalwartDouble, serve

USING = ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"]


def jmap(*calls: list) -> bytes:
    return orjson.dumps({"using": USING, "methodCalls": list(calls)})


# ---------------------------------------------------------------------------- pure: check_request
OWN = frozenset({"a"})


@pytest.mark.parametrize("calls, limits, refusal", [
    ([["Mailbox/get", {"accountId": "a"}, "0"]], Limits(), None),
    ([["Core/echo", {"hello": 1}, "0"]], Limits(), None),
    ([["Mailbox/get", {"accountId": None}, "0"]], Limits(), None),
    ([["Email/copy", {"fromAccountId": "a", "accountId": "a"}, "0"]], Limits(), None),
    ([["Mailbox/get", {"accountId": "b"}, "0"]], Limits(), (Forbidden, "foreign_account")),
    ([["Mailbox/get", {"accountId": "a"}, "0"], ["Email/get", {"accountId": "b"}, "1"]], Limits(),
     (Forbidden, "foreign_account")),
    ([["Email/copy", {"fromAccountId": "b", "accountId": "a"}, "0"]], Limits(), (Forbidden, "foreign_account")),
    ([["Mailbox/get", {"accountId": 1}, "0"]], Limits(), (Forbidden, "foreign_account")),
    ([["Mailbox/get", {"accountId": ["a"]}, "0"]], Limits(), (Forbidden, "foreign_account")),
    ([["Mailbox/get", {"accountId": "A"}, "0"]], Limits(), (Forbidden, "foreign_account")),  # ids are exact
    ([["Mailbox/get", {"#accountId": {"resultOf": "x", "name": "Foo/get", "path": "/a"}}, "0"]], Limits(),
     (Forbidden, "result_reference")),
    ([["Email/copy", {"#fromAccountId": {"resultOf": "x", "name": "F", "path": "/a"}, "accountId": "a"}, "0"]],
     Limits(), (Forbidden, "result_reference")),
    ([["Core/echo", {}, str(i)] for i in range(3)], Limits(max_calls_in_request=3), None),
    ([["Core/echo", {}, str(i)] for i in range(4)], Limits(max_calls_in_request=3), (BadRequest, "too_many_calls")),
])
def test_check_request(calls, limits, refusal) -> None:
    req = parse_request(jmap(*calls))
    if refusal is None:
        check_request(req, OWN, limits)
        return
    cls, reason = refusal
    with pytest.raises(cls) as e:
        check_request(req, OWN, limits)
    assert e.value.reason == reason


def test_too_many_calls_mirrors_the_jmap_limit_problem() -> None:
    with pytest.raises(BadRequest) as e:
        check_request(parse_request(jmap(*[["Core/echo", {}, str(i)] for i in range(17)])), OWN, Limits())
    assert e.value.status == 400
    assert e.value.extra == {"jmapType": LIMIT_TYPE, "limit": "maxCallsInRequest"}


@pytest.mark.parametrize("path, expected", [
    ("/jmap", ("", None)),
    ("/jmap/", ("", None)),
    ("/jmap/session", ("session", None)),
    ("/jmap/eventsource/", ("eventsource", None)),
    ("/jmap/upload/a/", ("upload", "a")),
    ("/jmap/upload/a", ("upload", "a")),
    ("/jmap/upload/", ("upload", None)),
    ("/jmap/upload", ("upload", None)),
    ("/jmap/download/b/Gblob/name.txt", ("download", "b")),
    ("/jmap/download/%62/Gblob/n", ("download", "b")),          # decoded once, like the upstream
    ("/jmap/download/alice%40example.com/G/n", ("download", "alice@example.com")),
    ("/jmap/%75pload/b/", ("upload", "b")),
    ("/jmapx/upload/b/", None),
    ("/other/upload/b/", None),
])
def test_account_path(path, expected) -> None:
    assert account_path(path, "/jmap") == expected


@pytest.mark.parametrize("path", [
    "/jmap/x/../upload/b/", "/jmap/./upload/b/", "/jmap//upload/b/", "/jmap/upload%2fb/",
    "/jmap/%2e%2e/upload/b/", "/jmap/upload/b%5c/",
])
def test_account_path_refuses_paths_an_upstream_could_normalise(path) -> None:
    with pytest.raises(Forbidden):
        account_path(path, "/jmap")


@pytest.mark.parametrize("current, location, expected", [
    ("/.well-known/jmap", "/jmap/session", "/jmap/session"),
    ("/.well-known/jmap", "https://mail.example.test/jmap/session", "/jmap/session"),
    ("/.well-known/jmap", "http://127.0.0.1:18080/jmap", "/jmap"),
    ("/.well-known/jmap", "session?x=1", "/.well-known/session?x=1"),
    ("/a/b", "../c", "/c"),
    ("/x", "https://h", "/"),
])
def test_redirect_path(current, location, expected) -> None:
    assert redirect_path(current, location) == expected


def test_session_cache_ttl_and_lru() -> None:
    now = [0.0]
    c = SessionCache(size=2, ttl=10, clock=lambda: now[0])
    c.put("k1", 1)
    c.put("k2", 2)
    assert c.get("k1") == 1         # k1 is now the most recent
    c.put("k3", 3)                  # evicts k2, the least recent
    assert c.get("k2") is None
    assert (c.get("k1"), c.get("k3")) == (1, 3)
    now[0] = 10.0
    assert c.get("k1") is None      # expired
    assert len(c) == 1


# ---------------------------------------------------------------------------- against the double
def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


class Stack:
    """The guard (and optionally upstream_identity) in a real AddonManager, the engine's
    UpstreamPool as the loader's fetch, the Stalwart double behind it."""

    def __init__(self, double: StalwartDouble, mgr: AddonManager, pool: UpstreamPool, target: Target,
                 metrics: Metrics) -> None:
        self.double, self.mgr, self.pool, self.target, self.metrics = double, mgr, pool, target, metrics

    def flow(self, method: str, target: str, body: bytes | None = None, *, user: str | None = "alice",
             headers: dict[str, str] | None = None) -> Flow:
        h = CIMultiDict(headers or {})
        if body is not None and "Content-Length" not in h:
            h["Content-Length"] = str(len(body))
        f = Flow(Request(method, target, h), id="r1", upstream=self.target)
        f.request.body = body  # as the engine leaves it once buffered
        if user is not None:
            f.identity = Identity(subject=user, email=f"{user}@example.com")
        return f

    async def through(self, flow: Flow) -> Response:
        """requestheaders and request hooks, then forward what they let through."""
        await self.mgr.run("requestheaders", flow)
        await self.mgr.run("request", flow)
        h = [(k, v) for k, v in flow.request.headers.items() if k.lower() not in ("host", "content-length")]
        return await self.pool.fetch(self.target, flow.request.method, flow.request.target, headers=h,
                                     body=flow.request.body)

    def session_fetches(self) -> int:
        return len(self.double.seen("/jmap/session"))

    def sample(self, name: str, labels: dict[str, str]) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@contextlib.asynccontextmanager
async def stack(double: StalwartDouble | None = None, *, guard: dict | None = None,
                identity: dict | None = None, url: str | None = None) -> AsyncIterator[Stack]:
    double = double or StalwartDouble()
    async with serve(double) as base:
        addons = {"jmap_guard": guard or {}}
        if identity is not None:
            addons["upstream_identity"] = identity
        cfg = Config(stalwart=StalwartOptions(url=url or base, allow_insecure=True), addons=addons)
        metrics = Metrics()
        mgr = AddonManager(cfg, metrics)
        pool = UpstreamPool(ClientTLS.from_files(cert=None, key=None, ca=None), cfg.stalwart, metrics)
        mgr.fetcher = pool.fetch
        await mgr.add(JmapGuard())
        if identity is not None:
            await mgr.add(UpstreamIdentity())
        try:
            yield Stack(double, mgr, pool, cfg.default_target(), metrics)
        finally:
            await mgr.done()
            await pool.close()


IMPERSONATE = {"mode": "impersonate", "impersonator": "proxy", "secret": "proxypw"}


async def test_own_account_passes_and_is_answered() -> None:
    async with stack(identity=IMPERSONATE) as s:
        resp = await s.through(s.flow("POST", "/jmap/", jmap(["Mailbox/get", {"accountId": "a"}, "0"])))
        assert resp.status == 200
        name, args, _ = orjson.loads(resp.body)["methodResponses"][0]
        assert name == "Mailbox/get" and {m["role"] for m in args["list"]} >= {"inbox", "sent"}
        # the session came via /.well-known/jmap -> 307 -> /jmap/session, as the impersonated user
        sess = s.double.seen("/jmap/session")
        assert len(sess) == 1 and len(s.double.seen("/.well-known/jmap")) == 1
        assert sess[0].headers["Authorization"] == basic("alice@example.com%proxy", "proxypw")


@pytest.mark.parametrize("target, body, reason", [
    ("/jmap/", jmap(["Mailbox/get", {"accountId": "b"}, "0"]), "foreign_account"),
    ("/jmap", jmap(["Mailbox/get", {"accountId": "a"}, "0"], ["Mailbox/get", {"accountId": "b"}, "1"]),
     "foreign_account"),
    ("/jmap/", jmap(["Email/copy", {"fromAccountId": "b", "accountId": "a", "create": {}}, "0"]),
     "foreign_account"),
    ("/jmap/", jmap(["Mailbox/get", {"#accountId": {"resultOf": "x", "name": "A/get", "path": "/b"}}, "0"]),
     "result_reference"),
])
async def test_foreign_account_in_a_method_call_is_refused_and_never_sent(target, body, reason) -> None:
    async with stack(identity=IMPERSONATE) as s:
        with pytest.raises(Forbidden) as e:
            await s.through(s.flow("POST", target, body))
        assert e.value.status == 403
        assert s.double.seen("/jmap/session")  # the guard did look the user up
        assert [r for r in s.double.requests if r.method == "POST"] == []
        assert s.sample("sge_proxy_jmap_guard_refused_total", {"reason": reason}) == 1


@pytest.mark.parametrize("method, target", [
    ("POST", "/jmap/upload/b/"),
    ("POST", "/jmap/upload/"),
    ("GET", "/jmap/download/b/Bdeadbeef/secret.pdf?accept=application/pdf"),
    ("GET", "/jmap/download/%62/Bdeadbeef/secret.pdf"),
])
async def test_foreign_upload_and_download_paths_are_refused(method, target) -> None:
    async with stack(identity=IMPERSONATE) as s:
        body = b"hello" if method == "POST" else None
        with pytest.raises(Forbidden):
            await s.through(s.flow(method, target, body))
        assert s.double.seen("/jmap/upload") == [] and s.double.seen("/jmap/download") == []


async def test_own_upload_and_download_pass() -> None:
    async with stack(identity=IMPERSONATE) as s:
        up = await s.through(s.flow("POST", "/jmap/upload/a/", b"hello", headers={"Content-Type": "text/plain"}))
        assert up.status == 201
        blob = orjson.loads(up.body)["blobId"]
        down = await s.through(s.flow("GET", f"/jmap/download/a/{blob}/h.txt?accept=text/plain"))
        assert down.status == 200 and down.body == b"hello"
        assert s.session_fetches() == 1  # cached across requests


async def test_too_many_calls_is_refused_like_stalwart() -> None:
    async with stack(identity=IMPERSONATE) as s:
        calls = [["Core/echo", {}, str(i)] for i in range(17)]
        with pytest.raises(BadRequest) as e:
            await s.through(s.flow("POST", "/jmap/", jmap(*calls)))
        assert e.value.extra["jmapType"] == LIMIT_TYPE and e.value.extra["limit"] == "maxCallsInRequest"
        assert [r for r in s.double.requests if r.method == "POST"] == []
        # and the double itself answers the same way when asked directly
        direct = await s.pool.fetch(s.target, "POST", "/jmap/", body=jmap(*calls),
                                    headers=[("Authorization", basic("alice", "alicepw"))])
        problem = orjson.loads(direct.body)
        assert (direct.status, problem["type"], problem["limit"]) == (400, LIMIT_TYPE, "maxCallsInRequest")


async def test_limits_come_from_the_users_session() -> None:
    double = StalwartDouble()
    double.limits["maxCallsInRequest"] = 2
    async with stack(double, identity=IMPERSONATE) as s:
        ok = await s.through(s.flow("POST", "/jmap/", jmap(["Core/echo", {}, "0"], ["Core/echo", {}, "1"])))
        assert ok.status == 200
        with pytest.raises(BadRequest):
            await s.through(s.flow("POST", "/jmap/", jmap(*[["Core/echo", {}, str(i)] for i in range(3)])))


async def test_body_over_max_size_request_is_413() -> None:
    double = StalwartDouble()
    double.limits["maxSizeRequest"] = 200
    async with stack(double, identity=IMPERSONATE) as s:
        big = jmap(["Core/echo", {"pad": "x" * 300}, "0"])
        # declared too large: refused on the head, the body is never read
        f = s.flow("POST", "/jmap/", big)
        with pytest.raises(PayloadTooLarge) as e:
            await s.mgr.run("requestheaders", f)
        assert e.value.status == 413
        assert e.value.extra == {"jmapType": LIMIT_TYPE, "limit": "maxSizeRequest"}
        # chunked (no Content-Length): the buffered body is measured
        f = s.flow("POST", "/jmap/", big, headers={"Content-Length": "0"})
        f.request.headers.popall("Content-Length")
        await s.mgr.run("requestheaders", f)
        assert f.request.body_cap == 200
        with pytest.raises(PayloadTooLarge):
            await s.mgr.run("request", f)
        assert [r for r in s.double.requests if r.method == "POST"] == []


async def test_upload_over_max_size_upload_is_413() -> None:
    double = StalwartDouble()
    double.limits["maxSizeUpload"] = 4
    async with stack(double, identity=IMPERSONATE) as s:
        with pytest.raises(PayloadTooLarge) as e:
            await s.through(s.flow("POST", "/jmap/upload/a/", b"hello"))
        assert e.value.extra["limit"] == "maxSizeUpload"
        assert s.double.seen("/jmap/upload") == []


async def test_concurrent_misses_share_one_session_fetch() -> None:
    async with stack(identity=IMPERSONATE) as s:
        flows = [s.flow("POST", "/jmap/", jmap(["Mailbox/get", {"accountId": "a"}, "0"])) for _ in range(20)]
        await asyncio.gather(*(s.mgr.run("requestheaders", f) for f in flows))
        assert s.session_fetches() == 1
        assert s.sample("sge_proxy_jmap_session_fetch_total", {"result": "ok"}) == 1
        assert s.sample("sge_proxy_jmap_session_cache_total", {"result": "shared"}) == 19
        # a second user is a second fetch
        await s.mgr.run("requestheaders", s.flow("POST", "/jmap/", jmap(), user="bob"))
        assert s.session_fetches() == 2


async def test_cache_entries_expire() -> None:
    async with stack(identity=IMPERSONATE, guard={"session_ttl": "20ms"}) as s:
        await s.mgr.run("requestheaders", s.flow("POST", "/jmap/", jmap()))
        await s.mgr.run("requestheaders", s.flow("POST", "/jmap/", jmap()))
        assert s.session_fetches() == 1
        await asyncio.sleep(0.05)
        await s.mgr.run("requestheaders", s.flow("POST", "/jmap/", jmap()))
        assert s.session_fetches() == 2


async def test_shared_account_is_refused_unless_allowed() -> None:
    double = StalwartDouble(shares={"alice": ["b"]})  # bob shared his mail with alice
    async with stack(double, identity=IMPERSONATE) as s:
        with pytest.raises(Forbidden):
            await s.through(s.flow("POST", "/jmap/", jmap(["Mailbox/get", {"accountId": "b"}, "0"])))
    double = StalwartDouble(shares={"alice": ["b"]})
    async with stack(double, identity=IMPERSONATE, guard={"allow_shared_accounts": True}) as s:
        resp = await s.through(s.flow("POST", "/jmap/", jmap(["Mailbox/get", {"accountId": "b"}, "0"])))
        assert orjson.loads(resp.body)["methodResponses"][0][1]["accountId"] == "b"


async def test_double_answers_foreign_account_with_a_method_error_in_a_200() -> None:
    """What would happen without the guard: Stalwart's own answer (the guard refuses earlier)."""
    async with stack() as s:
        resp = await s.pool.fetch(s.target, "POST", "/jmap/", body=jmap(["Mailbox/get", {"accountId": "b"}, "0"]),
                                  headers=[("Authorization", basic("alice", "alicepw"))])
        assert resp.status == 200
        assert orjson.loads(resp.body)["methodResponses"][0] == ["error", {"type": "accountNotFound"}, "0"]


async def test_client_authorization_is_passed_through_without_upstream_identity() -> None:
    async with stack() as s:
        f = s.flow("POST", "/jmap/", jmap(["Mailbox/get", {"accountId": "a"}, "0"]),
                   headers={"Authorization": basic("alice", "alicepw")})
        assert (await s.through(f)).status == 200
        assert s.double.seen("/jmap/session")[0].headers["Authorization"] == basic("alice", "alicepw")


async def test_flows_without_identity_are_left_to_auth() -> None:
    async with stack() as s:
        f = s.flow("POST", "/jmap/", jmap(["Mailbox/get", {"accountId": "b"}, "0"]), user=None)
        await s.mgr.run("requestheaders", f)
        await s.mgr.run("request", f)
        assert f.response is None and s.double.requests == []


async def test_session_fetch_failure_fails_closed() -> None:
    async with stack(identity=IMPERSONATE) as s:
        # mallory is unknown to the mail server: its 401 becomes a 502, nothing is forwarded
        for _ in range(2):
            with pytest.raises(BadGateway) as e:
                await s.through(s.flow("POST", "/jmap/", jmap(["Mailbox/get", {"accountId": "a"}, "0"]),
                                       user="mallory"))
            assert e.value.status == 502
        assert s.session_fetches() == 2  # failures are not cached
        assert [r for r in s.double.requests if r.method == "POST"] == []
        assert s.sample("sge_proxy_jmap_session_fetch_total", {"result": "error"}) == 2


async def test_unreachable_upstream_fails_closed() -> None:
    async with serve(StalwartDouble()) as base:
        pass  # the port is closed again
    async with stack(identity=IMPERSONATE, url=base) as s:
        with pytest.raises(ProxyError) as e:
            await s.mgr.run("requestheaders", s.flow("POST", "/jmap/", jmap()))
        assert e.value.status in (502, 503)


async def test_redirect_loops_are_cut() -> None:
    async def loop(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "http://elsewhere.example/.well-known/jmap"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", loop)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with stack(identity=IMPERSONATE, url=url) as s:
            with pytest.raises(BadGateway):
                await s.mgr.run("requestheaders", s.flow("POST", "/jmap/", jmap()))
    finally:
        await runner.cleanup()


async def test_upstream_503_is_503() -> None:
    double = StalwartDouble()
    async with stack(double, identity=IMPERSONATE) as s:
        double.rate_limit = 0  # every authenticated request gets 429 + Retry-After
        with pytest.raises(ProxyError) as e:
            await s.mgr.run("requestheaders", s.flow("POST", "/jmap/", jmap()))
        assert e.value.status == 503 and e.value.headers["Retry-After"] == "60"


async def test_websocket_upgrade_is_refused() -> None:
    async with stack(identity=IMPERSONATE) as s:
        flow = s.flow("GET", "/jmap/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        flow.request.websocket = True  # the engine's verdict: an upgrade it would bridge
        with pytest.raises(Forbidden):
            await s.mgr.run("requestheaders", flow)
        assert s.double.requests == []


async def test_session_for_serves_other_addons() -> None:
    async with stack(identity=IMPERSONATE) as s:
        guard = s.mgr.get("jmap_guard")
        sess = await guard.session_for(s.flow("GET", "/api/v1/mail/messages"))
        assert sess.username == "alice" and sess.mail_account == "a"
        assert sess.api_url == "https://mail.example.test/jmap/"
        assert await guard.accounts_for(s.flow("GET", "/x")) == {"a"}
        assert s.session_fetches() == 1


# ---------------------------------------------------------------------------- the double itself
async def test_double_is_faithful_where_the_proxy_depends_on_it() -> None:
    double = StalwartDouble(api_delay=0.2)
    async with stack(double) as s:
        async def get(path: str, auth: str | None = None) -> Response:
            return await s.pool.fetch(s.target, "GET", path, headers=[("Authorization", auth)] if auth else [])

        r = await get("/.well-known/jmap")
        assert (r.status, r.headers["Location"]) == (307, "/jmap/session")
        r = await get("/jmap/session", basic("alice", "wrong"))
        assert r.status == 401 and r.content_type == "application/problem+json"
        assert sorted(v.split()[0] for v in r.headers.getall("WWW-Authenticate")) == ["Basic", "Bearer"]
        r = await get("/jmap/session", basic("bob%proxy", "proxypw"))  # impersonation
        assert orjson.loads(r.body)["username"] == "bob"
        assert (await get("/jmap/session", basic("bob%alice", "alicepw"))).status == 401  # no permission
        assert (await get("/healthz/live")).status == 200
        double.ready = False
        assert (await get("/healthz/ready")).status == 503

        async def post() -> Response:
            return await s.pool.fetch(s.target, "POST", "/jmap/", body=jmap(["Core/echo", {}, "0"]),
                                      headers=[("Authorization", basic("alice", "alicepw"))])
        answers = await asyncio.gather(*(post() for _ in range(5)))
        statuses = sorted(r.status for r in answers)
        assert statuses == [200, 200, 200, 200, 400]  # the fifth concurrent request hits the limit
        refused = next(r for r in answers if r.status == 400)
        assert orjson.loads(refused.body)["limit"] == "maxConcurrentRequests"


async def test_a_cached_session_is_checked_without_waiting() -> None:
    async with stack(identity=IMPERSONATE) as s:
        guard = s.mgr.get("jmap_guard")
        first = s.flow("POST", "/jmap/", jmap(["Mailbox/get", {"accountId": "a"}, "0"]))
        waiting = guard.requestheaders(first)
        assert inspect.isawaitable(waiting)  # the session is fetched first
        await waiting
        for path, call, refused in [("/jmap/", ["Mailbox/get", {"accountId": "a"}, "0"], False),
                                    ("/jmap/", ["Mailbox/get", {"accountId": "zz"}, "0"], True),
                                    ("/jmap/download/a/blob/x", None, False),
                                    ("/jmap/download/zz/blob/x", None, True)]:
            f = s.flow("POST" if call else "GET", path, jmap(call) if call else None)
            if refused:
                with pytest.raises(Forbidden):
                    assert guard.requestheaders(f) is None
                    assert guard.request(f) is None
            else:
                assert guard.requestheaders(f) is None and guard.request(f) is None
        assert s.session_fetches() == 1
        assert s.sample("sge_proxy_jmap_guard_refused_total", {"reason": "foreign_account"}) == 2
