"""The full default chain in front of the Stalwart stand-in (tests/stalwart_double.py), served over
TLS that requires the proxy's client certificate, in `impersonate` mode: session URLs rewritten to
the proxy, the opaque account "a" is alice's and "b" (bob's) refused before it leaves the proxy,
the Basic credential and the signed X-SGE-* headers the server receives, a 401 passed through."""
from __future__ import annotations

import base64
import json
import os

import aiohttp
import pytest

from proxy.signing import verify
from tests.conftest import free_port
from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey
from tests.stalwart_double import CORE, MAIL, StalwartDouble, serve

IMPERSONATOR, SECRET = "proxy", "proxypw"
SIGNING_KEY = os.urandom(32)


@pytest.fixture
async def double(server_ssl):
    d = StalwartDouble()
    async with serve(d, ssl_context=server_ssl) as url:
        yield d, url


@pytest.fixture
async def idp():
    async with JwksServer() as server:
        server.publish(SigningKey("k1"))
        yield server


async def start_chain(certs, url: str, idp: JwksServer, **extra):
    """The default chain in impersonate mode, signing, JWTs from `idp`; `extra`: more settings."""
    port = free_port()  # the public URL must be known before the addons load
    return await start_proxy(certs, url, chain=None, listen=f"127.0.0.1:{port}", **{
        "stalwart.health_interval": 3600,
        "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
        "addons.upstream_identity": {"mode": "impersonate", "impersonator": IMPERSONATOR, "secret": SECRET},
        "addons.header_signer": {"key_id": "edge1", "keys": {"edge1": base64.b64encode(SIGNING_KEY).decode()}},
        **extra,
    })


@pytest.fixture
async def proxy(certs, double, idp):
    eng = await start_chain(certs, double[1], idp)
    yield f"http://127.0.0.1:{eng.port}"
    await eng.stop(drain_timeout=1)


def bearer(idp: JwksServer, login: str) -> dict[str, str]:
    """A JWT whose subject is the Stalwart login (no email claim: the login is the subject)."""
    return {"Authorization": "Bearer " + idp.keys[0].token(login, sid="s-" + login)}


def mailbox_get(account: str) -> dict:
    return {"using": [CORE, MAIL], "methodCalls": [["Mailbox/get", {"accountId": account}, "0"]]}


async def test_session_urls_point_at_the_proxy_and_list_only_alices_account(proxy, double, idp):
    d, _ = double
    async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
        async with s.get(proxy + "/.well-known/jmap") as r:  # 307 to /jmap/session, followed
            assert r.status == 200
            session = await r.json()
    assert d.public_base not in str(session)
    assert session["apiUrl"] == f"{proxy}/jmap/"
    assert session["uploadUrl"] == f"{proxy}/jmap/upload/{{accountId}}/"
    assert session["downloadUrl"].startswith(f"{proxy}/jmap/download/{{accountId}}/")
    assert session["eventSourceUrl"].startswith(f"{proxy}/jmap/eventsource/")
    assert list(session["accounts"]) == ["a"]
    assert set(session["primaryAccounts"].values()) == {"a"}


async def test_own_account_answers_and_bobs_never_leaves_the_proxy(proxy, double, idp):
    d, _ = double
    async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
        async with s.post(proxy + "/jmap/", json=mailbox_get("a")) as r:
            assert r.status == 200
            name, args, _ = (await r.json())["methodResponses"][0]
        assert name == "Mailbox/get" and args["accountId"] == "a"
        seen = len(d.requests)
        async with s.post(proxy + "/jmap/", json=mailbox_get("b")) as r:
            assert r.status == 403
            assert r.content_type == "application/problem+json"
            assert (await r.json())["status"] == 403
        async with s.post(proxy + "/jmap/upload/b/", data=b"blob",
                          headers={"Content-Type": "application/octet-stream"}) as r:
            assert r.status == 403
            assert r.content_type == "application/problem+json"
        async with s.get(proxy + "/jmap/download/b/Bx/x.bin?accept=text/plain") as r:
            assert r.status == 403
        assert len(d.requests) == seen  # none of the three reached the server
        async with s.post(proxy + "/jmap/upload/a/", data=b"blob",
                          headers={"Content-Type": "application/octet-stream"}) as r:
            assert r.status == 201
            assert (await r.json())["accountId"] == "a"
    assert [r.path for r in d.requests[seen:]] == ["/jmap/upload/a/"]


async def test_impersonation_credential_and_signed_headers_reach_the_server(proxy, double, idp):
    d, _ = double
    spoofed = {"X-SGE-User-ID": "bob", "X-SGE-Signature": "v1,kid=edge1,sig=" + "A" * 43,
               "Authorize-As": "bob", "X-Forwarded-For": "203.0.113.9"}
    async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
        async with s.post(proxy + "/jmap/", json=mailbox_get("a"), headers=spoofed) as r:
            assert r.status == 200
            request_id = r.headers["X-Request-ID"]
    api = [r for r in d.requests if r.path == "/jmap/"]
    assert len(api) == 1
    got = api[0]
    scheme, _, cred = got.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(cred).decode() == f"alice%{IMPERSONATOR}:{SECRET}"
    assert "Authorize-As" not in got.headers
    assert got.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert len(got.headers.getall("X-SGE-User-ID")) == 1
    ident = verify(got.method, got.target, got.headers, got.body, {"edge1": SIGNING_KEY})
    assert (ident.user_id, ident.session_id, ident.request_id) == ("alice", "s-alice", request_id)
    assert ident.content_sha256 != "UNSIGNED-PAYLOAD"  # the API body was buffered, so it is hashed
    # the session the JMAP guard fetched for itself went up as alice too, signed
    fetched = [r for r in d.requests if r.path == "/jmap/session"]
    assert fetched
    assert base64.b64decode(fetched[0].headers["Authorization"][6:]).decode() == f"alice%{IMPERSONATOR}:{SECRET}"


async def test_a_401_from_the_server_passes_through(proxy, double, idp):
    d, _ = double
    async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
        async with s.post(proxy + "/jmap/", json=mailbox_get("a")) as r:  # caches alice's session
            assert r.status == 200
        d.user(IMPERSONATOR).secret = "rotated"  # the server no longer takes the proxy's secret
        async with s.post(proxy + "/jmap/", json=mailbox_get("a")) as r:
            assert r.status == 401
            assert (await r.json())["status"] == 401
        async with s.get(proxy + "/jmap/session") as r:
            assert r.status == 401


async def test_every_request_upstream_is_signed_for_the_user(proxy, double, idp):
    """docs/signing.md: the proxy adds signed X-SGE-* headers to every request it sends upstream.
    The JMAP guard's own session fetch goes upstream as the user too, so a verifying sidecar in
    front of the server (mode `none`) must be able to check it like any other."""
    d, _ = double
    async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
        async with s.post(proxy + "/jmap/", json=mailbox_get("a")) as r:
            assert r.status == 200
    as_user = [r for r in d.requests if r.path != "/healthz/ready"]
    assert {r.path for r in as_user} >= {"/jmap/session", "/jmap/"}
    for got in as_user:
        ident = verify(got.method, got.target, got.headers, got.body, {"edge1": SIGNING_KEY})
        assert ident.user_id == "alice", got.target


# ---------------------------------------------------------------------------- JMAP over WebSocket
@pytest.fixture
async def ws_proxy(certs, double, idp):
    """The same chain with JMAP over WebSocket switched on (the guard and the session rewrite)."""
    eng = await start_chain(certs, double[1], idp, **{"addons.jmap_guard": {"allow_websocket": True},
                                                     "addons.response_filter": {"websocket": True}})
    yield f"http://127.0.0.1:{eng.port}"
    await eng.stop(drain_timeout=1)


def ws_request(account: str, rid: str) -> dict:
    return {"@type": "Request", "id": rid, **mailbox_get(account)}


async def test_jmap_over_websocket_checks_every_request_message(ws_proxy, double, idp):
    d, _ = double
    async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
        async with s.get(ws_proxy + "/jmap/session") as r:
            url = (await r.json())["capabilities"]["urn:ietf:params:jmap:websocket"]["url"]
        assert url == "ws" + ws_proxy[len("http"):] + "/jmap/ws"  # the proxy's, not the server's
        async with s.ws_connect(url, protocols=("jmap",)) as ws:
            await ws.send_json(ws_request("a", "r1"))
            answer = await ws.receive_json(timeout=5)
            assert answer["@type"] == "Response" and answer["requestId"] == "r1"
            assert answer["methodResponses"][0][0] == "Mailbox/get"
            await ws.send_json(ws_request("b", "r2"))  # bob's account: answered by the proxy
            refused = await ws.receive_json(timeout=5)
            assert refused["@type"] == "RequestError" and refused["requestId"] == "r2"
            assert refused["status"] == 403
            await ws.send_str("not json")
            refused = await ws.receive_json(timeout=5)
            assert refused["type"] == "urn:ietf:params:jmap:error:notJSON" and refused["status"] == 400
            too_many = {"@type": "Request", "id": "r3", "using": mailbox_get("a")["using"],
                        "methodCalls": [["Core/echo", {}, str(i)] for i in range(17)]}
            await ws.send_json(too_many)
            refused = await ws.receive_json(timeout=5)
            assert refused["limit"] == "maxCallsInRequest" and refused["requestId"] == "r3"
            await ws.send_json(ws_request("a", "r4"))  # the session goes on
            assert (await ws.receive_json(timeout=5))["requestId"] == "r4"
            await ws.send_bytes(b"\x00")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1003
    sent = [m for m in d.ws_messages]
    assert len(sent) == 2 and all('"a"' in m for m in sent)  # only alice's own two requests got through
    upgrade = d.seen("/jmap/ws")[-1]  # impersonation and the signed identity on the upgrade
    assert base64.b64decode(upgrade.headers["Authorization"][6:]).decode() == f"alice%{IMPERSONATOR}:{SECRET}"
    ident = verify(upgrade.method, upgrade.target, upgrade.headers, upgrade.body, {"edge1": SIGNING_KEY})
    assert ident.user_id == "alice"


async def test_jmap_over_websocket_needs_a_token_and_is_off_by_default(proxy, ws_proxy, double, idp):
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(ws_proxy + "/jmap/ws")
        assert e.value.status == 401
    async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
        async with s.get(proxy + "/jmap/session") as r:
            assert "urn:ietf:params:jmap:websocket" not in (await r.json())["capabilities"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(proxy + "/jmap/ws")
        assert e.value.status == 403


async def test_websocket_messages_meet_the_policy_and_the_rate_limit(certs, double, idp):
    """Principal/set is denied by the default policy for POST /jmap: over the WebSocket too. And
    each message takes a token: the third of a burst of two is answered 429, not forwarded."""
    d, url = double
    eng = await start_chain(certs, url, idp, **{
        "addons.jmap_guard": {"allow_websocket": True},
        # the upgrade takes one token (and the session fetch none): two messages fit, the third not
        "addons.rate_limit": {"user": {"rate": "3/hour", "burst": 3}},
    })
    proxy = f"http://127.0.0.1:{eng.port}"
    try:
        async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
            async with s.ws_connect(proxy + "/jmap/ws") as ws:
                denied = {"@type": "Request", "id": "p1", "using": [CORE],
                          "methodCalls": [["Principal/set", {"accountId": "a", "create": {}}, "0"]]}
                await ws.send_json(denied)
                refused = await ws.receive_json(timeout=5)
                assert (refused["@type"], refused["status"], refused["requestId"]) == ("RequestError", 403, "p1")
                assert "Principal/set" in refused["detail"]
                await ws.send_json(ws_request("a", "r1"))  # the second token
                assert (await ws.receive_json(timeout=5))["@type"] == "Response"
                await ws.send_json(ws_request("a", "r2"))  # none left
                limited = await ws.receive_json(timeout=5)
                assert (limited["status"], limited["requestId"], limited["limit"]) == (429, "r2", "user")
        assert [json.loads(m)["id"] for m in d.ws_messages] == ["r1"]
    finally:
        await eng.stop(drain_timeout=1)


async def test_security_events_reach_the_audit_log_without_credentials(certs, double, idp, tmp_path):
    """docs: proxy/audit.py. Each refusal of the chain is one line with the request id, the user
    and what refused it; the tokens that were refused appear nowhere."""
    _, url = double
    audit = tmp_path / "audit.log"
    eng = await start_chain(certs, url, idp, audit_log=str(audit), **{
        "addons.jmap_guard": {"allow_websocket": True},
        "addons.rate_limit": {"user": {"rate": "6/hour", "burst": 6}}})
    proxy = f"http://127.0.0.1:{eng.port}"
    forged = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJlLW5vdC12YWxpZA"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy + "/jmap/", json=mailbox_get("a")) as r:
                assert r.status == 401
            async with s.post(proxy + "/jmap/", json=mailbox_get("a"), headers={"Authorization": forged}) as r:
                assert r.status == 401
        async with aiohttp.ClientSession(headers=bearer(idp, "alice")) as s:
            denied = {"using": [CORE], "methodCalls": [["Principal/set", {"accountId": "a", "create": {}}, "0"]]}
            async with s.post(proxy + "/jmap/", json=denied) as r:
                assert r.status == 403
                denied_id = r.headers["X-Request-ID"]
            async with s.post(proxy + "/jmap/", json=mailbox_get("b")) as r:
                assert r.status == 403
                guard_id = r.headers["X-Request-ID"]
            async with s.ws_connect(proxy + "/jmap/ws") as ws:
                await ws.send_json(ws_request("a", "w1"))
                assert (await ws.receive_json(timeout=5))["@type"] == "Response"
            statuses = []
            for _ in range(4):
                async with s.post(proxy + "/jmap/", json=mailbox_get("a")) as r:
                    statuses.append(r.status)
            assert statuses[-1] == 429
    finally:
        await eng.stop(drain_timeout=1)
    text = audit.read_text()
    assert forged.split()[1] not in text and "Bearer" not in text
    events = [json.loads(line) for line in text.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("auth.refused") == 2
    assert {e["reason"] for e in events if e["event"] == "auth.refused"} >= {"missing"}
    policy = next(e for e in events if e["event"] == "policy.denied")
    assert (policy["request_id"], policy["user"], policy["denied_method"]) == (denied_id, "alice", "Principal/set")
    assert policy["rule"] and policy["upstream"] == url and policy["path"] == "/jmap/"
    guard = next(e for e in events if e["event"] == "jmap_guard.refused")
    assert (guard["request_id"], guard["reason"], guard["status"]) == (guard_id, "foreign_account", 403)
    opened = next(e for e in events if e["event"] == "websocket.opened")
    closed = next(e for e in events if e["event"] == "websocket.closed")
    assert opened["request_id"] == closed["request_id"] and closed["messages_from_client"] == 1
    limited = next(e for e in events if e["event"] == "rate_limit.limited")
    assert (limited["limit"], limited["user"]) == ("user", "alice")


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
async def test_a_browser_offers_its_token_as_a_websocket_subprotocol(certs, double, idp, enabled):
    """addons.auth.websocket_protocol_credentials: `sge.bearer.<jwt>` among the offered
    subprotocols authenticates the upgrade; the server never sees the token."""
    d, url = double
    eng = await start_chain(certs, url, idp, **{
        "addons.jmap_guard": {"allow_websocket": True},
        "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url},
                        "websocket_protocol_credentials": enabled}})
    token = idp.keys[0].token("alice", sid="s-alice")
    try:
        async with aiohttp.ClientSession() as s:  # no Authorization header, as in a browser
            if not enabled:
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await s.ws_connect(f"http://127.0.0.1:{eng.port}/jmap/ws", protocols=("jmap", "sge.bearer." + token))
                assert e.value.status == 401
                return
            async with s.ws_connect(f"http://127.0.0.1:{eng.port}/jmap/ws",
                                    protocols=("jmap", "sge.bearer." + token)) as ws:
                assert ws.protocol == "jmap"
                await ws.send_json(ws_request("a", "r1"))
                assert (await ws.receive_json(timeout=5))["requestId"] == "r1"
        upgrade = d.seen("/jmap/ws")[-1]
        assert upgrade.headers["Sec-WebSocket-Protocol"] == "jmap"
        assert token not in str(dict(upgrade.headers))
        assert base64.b64decode(upgrade.headers["Authorization"][6:]).decode() == f"alice%{IMPERSONATOR}:{SECRET}"
    finally:
        await eng.stop(drain_timeout=1)
