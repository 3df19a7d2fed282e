"""Plain forwarding (empty chain) to Cyrus through nginx mTLS, the client's own Basic login passed
through: the session, a Mailbox/get, and a blob upload then download as alice."""
from __future__ import annotations

import base64
import os

import aiohttp
import pytest

from tests.harness import start_proxy

pytestmark = pytest.mark.e2e


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

MAIL = "urn:ietf:params:jmap:mail"
CORE = "urn:ietf:params:jmap:core"


@pytest.fixture
async def proxy(stack):
    eng = await start_proxy(stack.certs, stack.url, chain=[])
    yield f"http://127.0.0.1:{eng.port}"
    await eng.stop(drain_timeout=1)


async def test_session_mailbox_get_and_blob_roundtrip_as_alice(stack, proxy):
    auth = basic("alice@example.com", stack.users["alice@example.com"])
    async with aiohttp.ClientSession(headers={"Authorization": auth}) as s:
        async with s.get(proxy + "/.well-known/jmap", allow_redirects=False) as r:
            assert r.status in (301, 302, 307, 308)
            location = r.headers["Location"]
            assert location.startswith("/")  # relative: the client stays on the proxy
        async with s.get(proxy + location) as r:
            assert r.status == 200
            session = await r.json()
        account = session["primaryAccounts"][MAIL]
        assert account == "alice@example.com"
        api = session["apiUrl"]

        body = {"using": [CORE, MAIL], "methodCalls": [["Mailbox/get", {"accountId": account}, "0"]]}
        async with s.post(proxy + api, json=body) as r:
            assert r.status == 200
            result = await r.json()
        name, args, _ = result["methodResponses"][0]
        assert name == "Mailbox/get"
        assert {"inbox", "drafts", "sent", "trash"} <= {m["role"] for m in args["list"]}

        blob = os.urandom(200_000)
        upload = session["uploadUrl"].replace("{accountId}", account)
        async with s.post(proxy + upload, data=blob, headers={"Content-Type": "application/octet-stream"}) as r:
            assert r.status == 201, await r.text()
            blob_id = (await r.json())["blobId"]
        download = (session["downloadUrl"].replace("{accountId}", account).replace("{blobId}", blob_id)
                    .replace("{name}", "x.bin").replace("{type}", "application/octet-stream"))
        async with s.get(proxy + download) as r:
            assert r.status == 200
            assert await r.read() == blob


async def test_wrong_password_is_cyrus_401_passed_through(stack, proxy):
    async with aiohttp.ClientSession(headers={"Authorization": basic("alice@example.com", "wrong")}) as s:
        async with s.get(proxy + "/jmap/") as r:
            assert r.status == 401
            assert "upgrade" not in {k.lower() for k in r.headers}


async def test_the_same_over_http2(stack):
    """An HTTP/2 client (TLS, ALPN h2) against Cyrus: session, Mailbox/get, blob round trip."""
    import ssl

    import httpx
    certs = stack.certs
    eng = await start_proxy(certs, stack.url, chain=[], **{
        "tls.enabled": True, "tls.cert": str(certs / "server.crt"), "tls.key": str(certs / "server.key"),
        "tls.http2": True})
    base = f"https://127.0.0.1:{eng.port}"
    auth = basic("alice@example.com", stack.users["alice@example.com"])
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        async with httpx.AsyncClient(http2=True, verify=ctx, headers={"Authorization": auth}, timeout=20) as c:
            r = await c.get(base + "/.well-known/jmap", follow_redirects=True)
            assert r.status_code == 200 and r.http_version == "HTTP/2"
            session = r.json()
            account = session["primaryAccounts"][MAIL]
            body = {"using": [CORE, MAIL], "methodCalls": [["Mailbox/get", {"accountId": account}, "0"]]}
            r = await c.post(base + session["apiUrl"], json=body)
            assert r.status_code == 200
            assert {"inbox", "sent"} <= {m["role"] for m in r.json()["methodResponses"][0][1]["list"]}
            blob = os.urandom(300_000)
            r = await c.post(base + session["uploadUrl"].replace("{accountId}", account), content=blob,
                             headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            download = (session["downloadUrl"].replace("{accountId}", account)
                        .replace("{blobId}", r.json()["blobId"]).replace("{name}", "x.bin")
                        .replace("{type}", "application/octet-stream"))
            r = await c.get(base + download)
            assert r.status_code == 200 and r.content == blob
    finally:
        await eng.stop(drain_timeout=1)
