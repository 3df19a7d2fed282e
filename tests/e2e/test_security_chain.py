"""The full default chain in front of Cyrus (through the nginx mTLS front), alice and bob signed in
with ES256 JWTs from a local JWKS: own accounts only, foreign accounts refused before Cyrus, both
Cyrus upstream identity modes on one pooled connection, JWKS rotation, spoofed identity headers,
unauthenticated and scanner requests.

"Never reaches Cyrus" is read from nginx's access log: every client request here carries a unique
User-Agent, which nginx logs (combined format) when a request gets to it. A refused request is
followed by an allowed "fence" request; once the fence's line is in the log, the refused one would
be there too had it been forwarded.
"""
from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port
from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey

pytestmark = pytest.mark.e2e

CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
ALICE, BOB = "alice@example.com", "bob@example.com"
URL_KEYS = ("apiUrl", "downloadUrl", "uploadUrl", "eventSourceUrl")


# ---------------------------------------------------------------------------- helpers
class AccessLog:
    """nginx's access log from the moment this object was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size

    def lines_with(self, marker: str) -> list[str]:
        with self.path.open("rb") as f:
            f.seek(self.start)
            new = f.read().decode("utf-8", "replace")
        return [line for line in new.splitlines() if f'"{marker}"' in line]

    async def wait_for(self, marker: str, count: int = 1, timeout: float = 3.0) -> list[str]:
        """The lines of `marker`, polling until there are `count` (nginx logs at a request's end)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.lines_with(marker)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.02)


def marker() -> str:
    return f"sge-e2e-{uuid.uuid4().hex}"


def mailbox_get(account: str) -> dict:
    return {"using": [CORE, MAIL], "methodCalls": [["Mailbox/get", {"accountId": account}, "0"]]}


class Client:
    """One downstream keep-alive connection; each call names its user's token and a marker."""

    def __init__(self, base: str, tokens: dict[str, str]) -> None:
        self.base, self.tokens = base, tokens
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))

    def headers(self, user: str | None, ua: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"User-Agent": ua}
        if user is not None:
            h["Authorization"] = "Bearer " + self.tokens[user]
        h.update(extra or {})
        return h

    async def session(self, user: str, ua: str | None = None, extra: dict[str, str] | None = None) -> dict:
        async with self.http.get(self.base + "/.well-known/jmap",
                                 headers=self.headers(user, ua or marker(), extra)) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def mailboxes(self, user: str, account: str | None = None, ua: str | None = None,
                        extra: dict[str, str] | None = None) -> tuple[int, dict, str]:
        async with self.http.post(self.base + "/jmap/", json=mailbox_get(account or user),
                                  headers=self.headers(user, ua or marker(), extra)) as r:
            return r.status, await r.json(content_type=None), r.content_type

    async def close(self) -> None:
        await self.http.close()


def own_mailboxes(user: str, status: int, doc: dict) -> set[str]:
    """The mailbox ids of a successful Mailbox/get on the user's own account."""
    assert status == 200, doc
    name, args, _ = doc["methodResponses"][0]
    assert name == "Mailbox/get", doc
    assert args["accountId"] == user
    assert {"inbox", "drafts", "sent", "trash"} <= {m["role"] for m in args["list"]}
    return {m["id"] for m in args["list"]}


def assert_own_session(session: dict, user: str, base: str) -> None:
    assert session["username"] == user
    assert list(session["accounts"]) == [user]
    assert set(session["primaryAccounts"].values()) == {user}
    for key in URL_KEYS:
        assert session[key].startswith(base + "/jmap/"), (key, session[key])


async def raw_status(port: int, target: str, headers: dict[str, str]) -> int:
    """Send a request-target exactly as written (an HTTP client would normalise `..`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode("latin-1"))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(status_line.split()[1])


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
async def idp():
    async with JwksServer() as server:
        server.publish(SigningKey("key-a"))
        yield server


def identity_section(mode: str, stack, tmp_path: Path) -> dict:
    if mode == "authorize-as":
        return {"mode": "authorize-as", "admin_user": stack.admin[0], "secret": stack.admin[1]}
    key_file = tmp_path / "cyrus-jwt.key"
    key_file.write_bytes(stack.jwt_key)
    return {"mode": "jwt", "key_file": str(key_file)}


@pytest.fixture
async def make_proxy(stack, idp, tmp_path):
    """Starts the proxy with the default chain (chain omitted) in a given upstream identity mode."""
    engines = []

    async def make(mode: str = "authorize-as", **over):
        port = free_port()  # the public URL (session rewriting) must be known before the addons load
        eng = await start_proxy(stack.certs, stack.url, chain=None, listen=f"127.0.0.1:{port}", **{
            "stalwart.health_interval": 3600,
            "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url,
                                    "jwks_refetch_interval": 0.2}},
            "addons.upstream_identity": identity_section(mode, stack, tmp_path),
            "addons.header_signer": {"key_id": "e2e", "keys": {"e2e": base64.b64encode(os.urandom(32)).decode()}},
            **over,
        })
        engines.append(eng)
        return eng, f"http://127.0.0.1:{eng.port}"

    yield make
    for eng in engines:
        await eng.stop(drain_timeout=1)


@pytest.fixture
def tokens(idp) -> dict[str, str]:
    key = idp.keys[0]
    return {ALICE: key.token(ALICE, email=ALICE), BOB: key.token(BOB, email=BOB)}


@pytest.fixture
def access_log(stack) -> AccessLog:
    return AccessLog(stack.base / "log" / "nginx-access.log")


# ---------------------------------------------------------------------------- tests
async def test_each_user_sees_only_their_own_account(make_proxy, tokens):
    _, base = await make_proxy()
    c = Client(base, tokens)
    try:
        boxes = {}
        for user in (ALICE, BOB):
            session = await c.session(user)
            assert_own_session(session, user, base)
            async with c.http.post(session["apiUrl"], json=mailbox_get(user),
                                   headers=c.headers(user, marker())) as r:  # the rewritten URL works
                boxes[user] = own_mailboxes(user, r.status, await r.json())
        assert not boxes[ALICE] & boxes[BOB]
    finally:
        await c.close()


async def test_foreign_account_refused_before_cyrus(make_proxy, tokens, access_log):
    _, base = await make_proxy()
    c = Client(base, tokens)
    try:
        allowed = marker()
        own_mailboxes(ALICE, *(await c.mailboxes(ALICE, ua=allowed))[:2])
        assert len(await access_log.wait_for(allowed)) == 1  # an allowed request adds its line

        refused = [marker() for _ in range(3)]
        status, doc, ctype = await c.mailboxes(ALICE, account=BOB, ua=refused[0])
        assert (status, ctype, doc["status"]) == (403, "application/problem+json", 403)
        assert doc["requestId"]
        async with c.http.post(base + f"/jmap/upload/{BOB}/", data=b"not yours",
                               headers=c.headers(ALICE, refused[1], {"Content-Type": "text/plain"})) as r:
            assert (r.status, r.content_type) == (403, "application/problem+json")
        async with c.http.get(base + f"/jmap/download/{BOB}/Gabc/x.txt?accept=text/plain",
                              headers=c.headers(ALICE, refused[2])) as r:
            assert (r.status, r.content_type) == (403, "application/problem+json")

        fence = marker()
        own_mailboxes(ALICE, *(await c.mailboxes(ALICE, ua=fence))[:2])
        assert len(await access_log.wait_for(fence)) == 1
        for m in refused:
            assert access_log.lines_with(m) == []
    finally:
        await c.close()


@pytest.mark.parametrize("mode", ["authorize-as", "jwt"])
async def test_users_alternate_on_one_pooled_upstream_connection(make_proxy, tokens, access_log, mode):
    eng, base = await make_proxy(mode, **{"stalwart.max_connections": 1})
    c = Client(base, tokens)
    try:
        boxes: dict[str, set[str]] = {ALICE: set(), BOB: set()}
        for user in (ALICE, BOB) * 3:
            ua = marker()
            assert_own_session(await c.session(user, ua=ua), user, base)
            boxes[user] |= own_mailboxes(user, *(await c.mailboxes(user))[:2])
            logged = await access_log.wait_for(ua, count=2)  # the redirect, then the session
            assert len(logged) == 2 and '"GET /jmap HTTP/1.1" 200 ' in logged[1], logged
        assert boxes[ALICE] and boxes[BOB] and not boxes[ALICE] & boxes[BOB]
        assert len(boxes[ALICE]) == len(boxes[BOB])  # the same set every round, never the other's
        assert sum(v["open"] for v in eng.pool.stats().values()) == 1
    finally:
        await c.close()


async def test_rotated_jwks_key_accepted_without_restart(make_proxy, idp):
    _, base = await make_proxy()
    key_a, key_b = idp.keys[0], SigningKey("key-b", alg="RS256")
    c = Client(base, {})
    try:
        c.tokens[ALICE] = key_a.token(ALICE, email=ALICE)
        assert_own_session(await c.session(ALICE), ALICE, base)
        fetched = idp.fetches
        idp.publish(key_b)  # the provider rotates: key A retired, key B new
        await asyncio.sleep(0.25)  # past jwks_refetch_interval
        c.tokens[ALICE] = key_b.token(ALICE, email=ALICE)
        assert_own_session(await c.session(ALICE), ALICE, base)
        assert idp.fetches == fetched + 1
        async with c.http.get(base + "/.well-known/jmap",
                              headers={"Authorization": "Bearer " + key_a.token(ALICE, email=ALICE)}) as r:
            assert r.status == 401  # a new token from the retired key
    finally:
        await c.close()


@pytest.mark.parametrize("mode", ["authorize-as", "jwt"])
async def test_client_identity_headers_change_nothing(make_proxy, tokens, access_log, mode):
    _, base = await make_proxy(mode)
    spoof = {"X-SGE-User-ID": BOB, "X-SGE-Signature": "v1,kid=e2e,sig=" + "A" * 43,
             "X-SGE-Timestamp": str(int(time.time())), "Authorize-As": BOB,
             "X-Forwarded-For": "203.0.113.7", "X-Forwarded-User": BOB}
    c = Client(base, tokens)
    try:
        assert_own_session(await c.session(ALICE, extra=spoof), ALICE, base)
        own_mailboxes(ALICE, *(await c.mailboxes(ALICE, extra=spoof))[:2])
        refused = marker()
        status, doc, _ = await c.mailboxes(ALICE, account=BOB, ua=refused, extra=spoof)
        assert (status, doc["status"]) == (403, 403)
        fence = marker()
        own_mailboxes(ALICE, *(await c.mailboxes(ALICE, ua=fence))[:2])
        assert await access_log.wait_for(fence)
        assert access_log.lines_with(refused) == []
    finally:
        await c.close()


async def test_unauthenticated_and_scanner_requests_stop_at_the_proxy(make_proxy, tokens, access_log):
    eng, base = await make_proxy()
    c = Client(base, tokens)
    try:
        stopped = []
        for auth in ({}, {"Authorization": "Basic " + base64.b64encode(f"{ALICE}:alicepw".encode()).decode()}):
            m = marker()
            stopped.append(m)
            async with c.http.post(base + "/jmap/", json=mailbox_get(ALICE),
                                   headers={"User-Agent": m, **auth}) as r:
                assert r.status == 401
                assert r.content_type == "application/problem+json"
                assert r.headers["WWW-Authenticate"].startswith('Bearer realm="sge-mail-proxy"')
                assert (await r.json())["status"] == 401
        for path in ("/wp-login.php", f"/jmap/download/{ALICE}/Gabc/x.php"):
            m = marker()
            stopped.append(m)
            async with c.http.get(base + path, headers=c.headers(ALICE, m)) as r:
                assert r.status == 404
        for target in ("/jmap/../admin", "/jmap/%2e%2e/admin"):
            m = marker()
            stopped.append(m)
            assert await raw_status(eng.port, target, c.headers(ALICE, m)) == 404

        fence = marker()
        own_mailboxes(ALICE, *(await c.mailboxes(ALICE, ua=fence))[:2])
        assert await access_log.wait_for(fence)
        for m in stopped:
            assert access_log.lines_with(m) == []
    finally:
        await c.close()
