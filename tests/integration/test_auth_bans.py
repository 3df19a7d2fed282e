"""addons.auth.bans through the running proxy: an address that keeps presenting bad credentials
is refused for a while, whatever it presents next; no credential at all is not a guess; exempt
networks are never banned; the IMAP listener's logins count and are refused the same way."""
from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
import pytest

from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER


@pytest.fixture
async def make_proxy(certs, upstream, idp, tmp_path):
    engines = []

    async def make(**bans):
        eng = await start_proxy(certs, upstream, chain=["auth"], audit_log=str(tmp_path / "audit.log"), **{
            "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url},
                            "bans": {"failures": 3, "window": "60s", "ban": "1500ms", **bans}}})
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        await eng.stop(drain_timeout=1)


async def get(base: str, token: str | None) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/anything", headers=headers) as r:
            await r.read()
            return r


async def test_bad_credentials_ban_the_address_for_a_while(make_proxy, idp, tmp_path):
    eng = await make_proxy()
    base = f"http://127.0.0.1:{eng.port}"
    good = idp.keys[0].token("alice@example.com")
    for _ in range(5):  # no credential is not a guess
        assert (await get(base, None)).status == 401
    assert (await get(base, good)).status == 200
    for bad in ("x.y.z", good[:-6] + "AAAAAA", "nope"):
        assert (await get(base, bad)).status == 401
    r = await get(base, good)  # banned: even a good token is refused
    assert r.status == 429 and r.content_type == "application/problem+json"
    assert 1 <= int(r.headers["Retry-After"]) <= 2
    banned = eng.metrics.registry.get_sample_value("sge_proxy_auth_banned_addresses")
    assert banned == 1
    await asyncio.sleep(1.6)
    assert (await get(base, good)).status == 200  # the ban is over
    await asyncio.sleep(0.3)
    events = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    bans = [e for e in events if e["event"] == "auth.banned"]
    assert len(bans) == 1 and bans[0]["address"] == "127.0.0.1" and bans[0]["failures"] == 3
    assert good not in (tmp_path / "audit.log").read_text()


async def test_exempt_networks_and_off(make_proxy, idp):
    for bans in ({"exempt": ["127.0.0.0/8"]}, {"failures": 0}):
        eng = await make_proxy(**bans)
        base = f"http://127.0.0.1:{eng.port}"
        for _ in range(6):
            assert (await get(base, "nope")).status == 401
        assert (await get(base, idp.keys[0].token("alice@example.com"))).status == 200


async def test_imap_logins_count_and_are_refused(certs, upstream, idp):
    eng = await start_proxy(certs, upstream, chain=None, **{
        "stalwart.health_interval": 3600,
        "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url},
                        "bans": {"failures": 3}},
        "addons.upstream_identity": {"mode": "impersonate", "impersonator": "p", "secret": "s"},
        "addons.header_signer": {"key_id": "k", "keys": {"k": "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleS0xMg=="}},
        "tls.cert": str(certs / "server.crt"), "tls.key": str(certs / "server.key"),
        "mail.imap.listen": "127.0.0.1:0", "mail.imap.tls": "implicit", "mail.imap.failure_delay": 0})
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        port = eng.mail_servers["imap"].port
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        await reader.readline()
        for i in range(3):
            writer.write(b"a%d LOGIN alice@example.com wrong\r\n" % i)
            assert b"NO [AUTHENTICATIONFAILED]" in await reader.readline()
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        await reader.readline()
        token = idp.keys[0].token("alice@example.com")
        writer.write(b'b LOGIN alice@example.com "%s"\r\n' % token.encode())
        assert (await reader.readline()).startswith(b"b NO [LIMIT]")
        writer.close()
        async with aiohttp.ClientSession() as s:  # and the same address over HTTP
            async with s.get(f"http://127.0.0.1:{eng.port}/jmap/session",
                             headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 429
    finally:
        await eng.stop(drain_timeout=1)


async def test_behind_a_balancer_speaking_proxy_protocol_the_client_is_banned_not_the_balancer(certs, upstream, idp,
                                                                                            tmp_path):
    """mail.imap.proxy_protocol_from: the balancer's PROXY header names the client; bans, the
    audit log and the access log use that address; a balancer connection without a header is
    closed."""
    eng = await start_proxy(certs, upstream, chain=None, audit_log=str(tmp_path / "audit.log"), **{
        "stalwart.health_interval": 3600,
        "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url},
                        "bans": {"failures": 2}},
        "addons.upstream_identity": {"mode": "impersonate", "impersonator": "p", "secret": "s"},
        "addons.header_signer": {"key_id": "k", "keys": {"k": "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleS0xMg=="}},
        "mail.imap.listen": "127.0.0.1:0", "mail.imap.allow_plaintext_auth": True, "mail.imap.failure_delay": 0,
        "mail.imap.proxy_protocol_from": ["127.0.0.0/8"]})
    port = eng.mail_servers["imap"].port

    async def via_balancer(client: str, login: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n".encode())
        assert (await reader.readline()).startswith(b"* OK")
        writer.write(b"a LOGIN " + login + b"\r\n")
        answer = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return answer

    try:
        for _ in range(2):
            assert b"AUTHENTICATIONFAILED" in await via_balancer("203.0.113.9", b"alice@example.com wrong")
        assert b"NO [LIMIT]" in await via_balancer("203.0.113.9", b"alice@example.com wrong")   # banned
        assert b"AUTHENTICATIONFAILED" in await via_balancer("203.0.113.10", b"alice@example.com wrong")  # not
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # no header from the balancer
        writer.write(b"a CAPABILITY\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await asyncio.sleep(0.3)
        banned = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()
                  if '"auth.banned"' in x]
        assert [b["address"] for b in banned] == ["203.0.113.9"]
    finally:
        await eng.stop(drain_timeout=1)
