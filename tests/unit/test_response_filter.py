"""addons.response_filter: session rewriting, Location rewriting, header scrubbing; API responses
are left alone."""
from __future__ import annotations

import orjson
import pytest
from multidict import CIMultiDict

from addons.response_filter import ResponseFilter, is_session_path, relative_location
from proxy.addonmanager import AddonManager
from proxy.config import Config
from proxy.errors import ConfigError, UpstreamProtocolError
from proxy.flow import Flow, Request, Response
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.session import WEBSOCKET
from proxy.target import Target
from tests.stalwart_double import StalwartDouble
from tests.unit.test_session import cyrus_doc

UPSTREAM = Target("https", "stalwart.internal", 443, "", "official")


async def manager(opts: dict | None = None, **cfg) -> AddonManager:
    mgr = AddonManager(Config(addons={"response_filter": opts or {}}, **cfg), Metrics())
    await mgr.add(ResponseFilter())
    return mgr


def flow(method: str, target: str, status: int, body: bytes = b"", headers: dict | None = None,
         user: str | None = "alice") -> Flow:
    f = Flow(Request(method, target, CIMultiDict()), id="r1", upstream=UPSTREAM)
    h = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    h.update(headers or {})
    f.response = Response(status, CIMultiDict(h))
    if user is not None:
        f.identity = Identity(subject=user, email=f"{user}@example.com")
    return f


async def run(mgr: AddonManager, f: Flow, body: bytes) -> Flow:
    """responseheaders, then the body as the engine gives it (buffered only if asked), then response."""
    await mgr.run("responseheaders", f)
    if f.response.body_cap is not None:
        f.response.body = body
    await mgr.run("response", f)
    return f


def stalwart_session(shares: dict | None = None) -> bytes:
    d = StalwartDouble(public_base="https://mail.example.test", shares=shares or {})
    return orjson.dumps(d.session(d.user("alice")))


@pytest.mark.parametrize("method, path, expected", [
    ("GET", "/.well-known/jmap", True),
    ("GET", "/jmap/session", True),
    ("GET", "/jmap", True),
    ("GET", "/jmap/", True),
    ("HEAD", "/jmap/session", True),
    ("POST", "/jmap/", False),
    ("POST", "/jmap/session", False),
    ("GET", "/jmap/download/a/b/c", False),
    ("GET", "/jmap/sessions", False),
])
def test_is_session_path(method, path, expected) -> None:
    assert is_session_path(method, path, "/jmap") is expected


@pytest.mark.parametrize("location, extra, expected", [
    ("https://stalwart.internal/jmap/session", (), "/jmap/session"),
    ("https://stalwart.internal:443/jmap/session?x=1", (), "/jmap/session?x=1"),
    ("http://STALWART.internal:8080/jmap", (), "/jmap"),          # any absolute URL on the upstream's host
    ("https://stalwart.internal", (), "/"),
    ("https://mail.example.test/jmap/session", (), "https://mail.example.test/jmap/session"),
    ("https://mail.example.test/jmap/session", ("mail.example.test",), "/jmap/session"),
    ("/jmap/session", (), "/jmap/session"),
    ("session", (), "session"),
    ("https://elsewhere.example/login", (), "https://elsewhere.example/login"),
])
def test_relative_location(location, extra, expected) -> None:
    assert relative_location(location, UPSTREAM, extra) == expected


async def test_stalwart_session_is_rewritten_for_the_user() -> None:
    mgr = await manager({"public_url": "https://proxy.example"})
    body = stalwart_session(shares={"alice": ["b", "c"]})
    f = await run(mgr, flow("GET", "/jmap/session", 200, body), body)
    doc = orjson.loads(f.response.body)
    assert doc["apiUrl"] == "https://proxy.example/jmap/"
    assert doc["uploadUrl"] == "https://proxy.example/jmap/upload/{accountId}/"
    assert doc["downloadUrl"] == "https://proxy.example/jmap/download/{accountId}/{blobId}/{name}?accept={type}"
    assert doc["eventSourceUrl"].startswith("https://proxy.example/jmap/eventsource/?types={types}")
    assert set(doc["accounts"]) == {"a"}                  # bob's and the group's account are not alice's
    assert WEBSOCKET not in doc["capabilities"]           # frames would bypass the guard
    assert b"mail.example.test" not in f.response.body
    assert f.response.headers["Content-Length"] == str(len(f.response.body))


async def test_shared_accounts_and_websocket_can_be_kept() -> None:
    mgr = await manager({"public_url": "https://proxy.example", "allow_shared_accounts": True, "websocket": True})
    body = stalwart_session(shares={"alice": ["b"]})
    f = await run(mgr, flow("GET", "/jmap/session", 200, body), body)
    doc = orjson.loads(f.response.body)
    assert set(doc["accounts"]) == {"a", "b"}
    assert doc["capabilities"][WEBSOCKET]["url"] == "wss://proxy.example/jmap/ws"


async def test_cyrus_session_gets_absolute_proxy_urls() -> None:
    mgr = await manager(public_url="https://edge.example:8443")  # the global public URL
    body = orjson.dumps(cyrus_doc())
    f = await run(mgr, flow("GET", "/jmap/", 200, body), body)
    doc = orjson.loads(f.response.body)
    assert doc["apiUrl"] == "https://edge.example:8443/jmap/"
    assert doc["uploadUrl"] == "https://edge.example:8443/jmap/upload/{accountId}/"
    assert set(doc["accounts"]) == {"alice@example.com"}


async def test_without_identity_all_accounts_stay_but_urls_are_rewritten() -> None:
    mgr = await manager({"public_url": "https://proxy.example"})
    body = stalwart_session(shares={"alice": ["b"]})
    f = await run(mgr, flow("GET", "/jmap/session", 200, body, user=None), body)
    doc = orjson.loads(f.response.body)
    assert set(doc["accounts"]) == {"a", "b"}
    assert doc["apiUrl"] == "https://proxy.example/jmap/"


async def test_api_responses_are_not_buffered_or_touched() -> None:
    mgr = await manager({"public_url": "https://proxy.example"})
    body = orjson.dumps({"methodResponses": [["error", {"type": "accountNotFound"}, "0"]],
                         "sessionState": "x", "apiUrl": "https://mail.example.test/jmap/"})
    f = flow("POST", "/jmap/", 200, body)
    await mgr.run("responseheaders", f)
    assert f.response.body_cap is None   # streams through
    f.response.body = body               # even if some other addon had buffered it
    await mgr.run("response", f)
    assert f.response.body == body and f.response.status == 200


@pytest.mark.parametrize("status, ctype, body", [
    (401, "application/problem+json", b'{"type":"about:blank","status":401}'),
    (200, "text/html", b"<html>apiUrl</html>"),
])
async def test_only_json_200_sessions_are_buffered(status, ctype, body) -> None:
    mgr = await manager()
    f = flow("GET", "/jmap/session", status, body, {"Content-Type": ctype})
    await mgr.run("responseheaders", f)
    assert f.response.body_cap is None


async def test_json_without_api_url_is_left_alone() -> None:
    mgr = await manager()
    body = b'{"hello": "world"}'
    f = await run(mgr, flow("GET", "/jmap", 200, body), body)
    assert f.response.body == body


async def test_invalid_session_is_a_502() -> None:
    mgr = await manager()
    for body in (b'{"apiUrl": "x"', b'{"apiUrl": "/jmap/"}'):
        with pytest.raises(UpstreamProtocolError) as e:
            await run(mgr, flow("GET", "/jmap/session", 200, body), body)
        assert e.value.status == 502


async def test_redirect_location_to_the_upstream_becomes_relative() -> None:
    mgr = await manager({"upstream_hosts": ["mail.example.test"]})
    for loc in ("https://stalwart.internal/jmap/session", "https://mail.example.test/jmap/session"):
        f = await run(mgr, flow("GET", "/.well-known/jmap", 307, headers={"Location": loc}), b"")
        assert f.response.headers["Location"] == "/jmap/session"
        assert f.response.body_cap is None
    f = await run(mgr, flow("GET", "/.well-known/jmap", 307, headers={"Location": "https://idp.example/x"}), b"")
    assert f.response.headers["Location"] == "https://idp.example/x"


async def test_fingerprinting_headers_are_dropped() -> None:
    mgr = await manager()
    h = {"Server": "Stalwart/0.16", "X-Powered-By": "x", "Via": "1.1 a", "X-AspNet-Version": "4",
         "X-Runtime": "0.1", "Alt-Svc": 'h2c=":18080"', "X-Request-ID": "keep", "Cache-Control": "no-store"}
    f = await run(mgr, flow("POST", "/jmap/", 200, b"{}", h), b"{}")
    left = {k.lower() for k in f.response.headers}
    assert left == {"content-type", "content-length", "x-request-id", "cache-control"}


async def test_strip_list_is_configurable() -> None:
    mgr = await manager({"strip_headers": ["X-Debug"]})
    f = await run(mgr, flow("POST", "/jmap/", 200, b"{}", {"Server": "s", "X-Debug": "1"}), b"{}")
    assert "Server" in f.response.headers and "X-Debug" not in f.response.headers


async def test_public_url_must_be_a_url() -> None:
    with pytest.raises(ConfigError) as e:
        await manager({"public_url": "proxy.example"})
    assert "addons.response_filter.public_url" in str(e.value)


def upstream_flow(method: str, target: str, status: int, headers: list[tuple[str, str]]) -> Flow:
    """A response as the engine hands it over: headers still the parser's bytes."""
    f = Flow(Request(method, target, CIMultiDict()), id="r1", upstream=UPSTREAM)
    f.response = Response(status, raw=[(n.lower().encode(), n.encode(), v.encode()) for n, v in headers])
    f.identity = Identity(subject="alice", email="alice@example.com")
    return f


async def test_fingerprinting_headers_are_dropped_from_the_parser_bytes() -> None:
    mgr = await manager()
    f = upstream_flow("POST", "/jmap", 200, [("Server", "nginx"), ("Content-Type", "application/json"),
                                             ("x-powered-by", "x"), ("Content-Length", "2")])
    await run(mgr, f, b"{}")
    assert not f.response.headers_read  # nothing decoded: the engine forwards the bytes
    assert [n for _, n, _ in f.response.raw] == [b"Content-Type", b"Content-Length"]
    assert f.response.body_cap is None
    kept = upstream_flow("POST", "/jmap", 200, [("Content-Type", "application/json")])
    await run(mgr, kept, b"{}")
    assert [n for _, n, _ in kept.response.raw] == [b"Content-Type"]


@pytest.mark.parametrize("names, kept", [
    (["Server"], []),
    (["A", "B"], ["A", "B"]),
    (["Server", "A", "Via", "via", "B", "X-Runtime"], ["A", "B"]),
    (["A", "Server", "Server", "B", "Alt-Svc", "C"], ["A", "B", "C"]),
    (["A", "B", "Set-Cookie", "Server"], ["A", "B", "Set-Cookie"]),
])
async def test_stripping_the_parser_bytes_keeps_the_rest_in_order(names, kept) -> None:
    mgr = await manager()
    f = upstream_flow("POST", "/jmap", 200, [(n, f"v{i}") for i, n in enumerate(names)])
    await run(mgr, f, b"{}")
    assert not f.response.headers_read
    assert [(n.decode(), v.decode()) for _, n, v in f.response.raw] == \
        [(n, f"v{names.index(n)}") for n in kept]


async def test_parser_bytes_with_a_location_or_a_session_use_the_headers() -> None:
    mgr = await manager()
    f = upstream_flow("GET", "/jmap/x", 302, [("Server", "nginx"),
                                              ("Location", "https://stalwart.internal/jmap/y")])
    await run(mgr, f, b"")
    assert dict(f.response.headers) == {"Location": "/jmap/y"}
    s = upstream_flow("GET", "/jmap/session", 200, [("Server", "nginx"), ("Content-Type", "application/json")])
    await run(mgr, s, stalwart_session())
    assert "Server" not in s.response.headers and s.response.body_cap is not None
