"""The IMAP listener before any login: what it offers, what it refuses, and how it ends (no mail
server is needed for any of this; tests/e2e/test_imap.py logs in to Cyrus)."""
from __future__ import annotations

import asyncio
import base64
import ssl

import aiohttp
import pytest

from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER


@pytest.fixture
async def make_proxy(certs, upstream, idp):
    engines = []

    async def make(**over):
        eng = await start_proxy(certs, upstream, chain=None, **{
            "stalwart.health_interval": 3600,
            "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
            "addons.upstream_identity": {"mode": "impersonate", "impersonator": "sge-proxy", "secret": "s"},
            "addons.header_signer": {"key_id": "k", "keys": {"k": base64.b64encode(b"k" * 32).decode()}},
            "tls.cert": str(certs / "server.crt"), "tls.key": str(certs / "server.key"),
            "mail.imap.listen": "127.0.0.1:0", "mail.imap.failure_delay": 0, **over})
        engines.append(eng)
        return eng, eng.mail_servers["imap"].port

    yield make
    for eng in engines:
        await eng.stop(drain_timeout=1)


def client_tls(certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.crt"))


async def until_tagged(reader: asyncio.StreamReader, tag: bytes) -> list[bytes]:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line, lines
        lines.append(line)
        if line.startswith(tag + b" "):
            return lines


async def test_no_credentials_before_starttls(make_proxy):
    _, port = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    greeting = await reader.readline()
    assert b"STARTTLS" in greeting and b"LOGINDISABLED" in greeting and b"AUTH=" not in greeting
    writer.write(b"a LOGIN alice secret\r\nb AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert (await until_tagged(reader, b"a"))[-1].startswith(b"a NO [PRIVACYREQUIRED]")
    assert (await until_tagged(reader, b"b"))[-1].startswith(b"b NO [PRIVACYREQUIRED]")
    writer.write(b"c SELECT INBOX\r\nd XYZZY\r\ne NOOP\r\n")
    assert (await until_tagged(reader, b"c"))[-1].startswith(b"c BAD")
    assert (await until_tagged(reader, b"d"))[-1].startswith(b"d BAD")
    assert (await until_tagged(reader, b"e"))[-1].startswith(b"e OK")
    writer.write(b"f LOGOUT\r\n")
    assert b"f OK" in await asyncio.wait_for(reader.read(), 5)
    writer.close()


async def test_starttls_then_capabilities(make_proxy, certs):
    _, port = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"a STARTTLS\r\n")
    assert (await reader.readline()).startswith(b"a OK")
    await writer.start_tls(client_tls(certs), server_hostname="localhost")
    writer.write(b"b CAPABILITY\r\n")
    caps = (await until_tagged(reader, b"b"))[0]
    assert b"AUTH=PLAIN" in caps and b"AUTH=OAUTHBEARER" in caps
    assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    writer.write(b"c STARTTLS\r\n")
    assert (await until_tagged(reader, b"c"))[-1].startswith(b"c BAD")
    writer.close()


async def test_bytes_after_starttls_end_the_connection(make_proxy):
    """A command injected behind STARTTLS (in clear, in the same packet) is never executed after
    the upgrade: the connection ends instead."""
    _, port = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"a STARTTLS\r\nb LOGIN alice secret\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.startswith(b"a BAD") and b"b " not in rest
    writer.close()


async def test_implicit_tls(make_proxy, certs):
    _, port = await make_proxy(**{"mail.imap.tls": "implicit"})
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls(certs),
                                                   server_hostname="localhost")
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() in (None, "imap")
    greeting = await reader.readline()
    assert b"AUTH=PLAIN" in greeting and b"STARTTLS" not in greeting
    writer.write(b"a STARTTLS\r\n")
    assert (await reader.readline()).startswith(b"a BAD")
    writer.close()


async def test_bad_login_through_the_chain(make_proxy, certs, idp):
    eng, port = await make_proxy(**{"mail.imap.tls": "implicit"})
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls(certs),
                                                   server_hostname="localhost")
    await reader.readline()
    expired = idp.keys[0].token("alice@example.com", ttl=-120)
    writer.write(b'a LOGIN alice@example.com "%s"\r\n' % expired.encode())
    assert (await until_tagged(reader, b"a"))[-1].startswith(b"a NO [AUTHENTICATIONFAILED]")
    # an OAUTHBEARER failure: the error challenge (RFC 7628), the client's dummy answer, then NO
    ir = base64.b64encode(b"n,a=alice@example.com,\x01auth=Bearer nope\x01\x01")
    writer.write(b"b AUTHENTICATE OAUTHBEARER " + ir + b"\r\n")
    challenge = await reader.readline()
    assert challenge.startswith(b"+ ") and b"invalid_token" in base64.b64decode(challenge[2:].strip())
    writer.write(b"AQ==\r\n")
    assert (await until_tagged(reader, b"b"))[-1].startswith(b"b NO [AUTHENTICATIONFAILED]")
    writer.write(b"c AUTHENTICATE PLAIN\r\n")
    assert (await reader.readline()).startswith(b"+")
    writer.write(b"*\r\n")
    assert (await until_tagged(reader, b"c"))[-1].startswith(b"c BAD")
    writer.write(b"d AUTHENTICATE CRAM-MD5\r\n")
    assert (await until_tagged(reader, b"d"))[-1].startswith(b"d NO [CANNOT]")
    writer.write(b"e LOGIN x y\r\n")  # the third failure
    rest = await asyncio.wait_for(reader.read(), 5)
    assert b"e NO" in rest and b"* BYE" in rest
    writer.close()
    refused = eng.metrics.registry.get_sample_value("sge_proxy_mail_logins_total",
                                                    {"protocol": "imap", "result": "refused"})
    assert refused == 3  # (a cancelled AUTHENTICATE and an unknown mechanism are not logins)


async def test_limits_and_timeouts(make_proxy):
    _, port = await make_proxy(**{"mail.imap.max_line": 1024, "mail.imap.login_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"a LOGIN {5000}\r\n")  # a synchronizing literal over the cap: refused, not read
    assert (await reader.readline()).startswith(b"* BAD")
    writer.write(b"b NOOP\r\n")
    assert (await reader.readline()).startswith(b"b OK")
    writer.write(b"c NOOP " + b"x" * 2000 + b"\r\n")
    assert b"* BYE" in await asyncio.wait_for(reader.read(), 5)
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    assert b"* BYE Autologout" in await asyncio.wait_for(reader.read(), 5)  # no login in 0.5 s
    writer.close()


async def test_stop_ends_sessions_waiting_for_a_login(make_proxy):
    eng, port = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    stopping = asyncio.ensure_future(eng.stop(drain_timeout=5))
    await asyncio.sleep(0.1)
    writer.write(b"a NOOP\r\n")
    assert b"* BYE [UNAVAILABLE]" in await asyncio.wait_for(reader.read(), 5)
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()


async def test_http_cannot_reach_the_mail_rules(make_proxy, idp):
    eng, _ = await make_proxy()
    token = idp.keys[0].token("alice@example.com")
    async with aiohttp.ClientSession() as s:
        # HTTP has no method IMAP (the parser refuses it), and the path is not an HTTP one
        for method, status in (("IMAP", 400), ("GET", 404), ("POST", 404)):
            async with s.request(method, f"http://127.0.0.1:{eng.port}/mail/imap",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == status, method


async def test_max_sessions(make_proxy):
    eng, port = await make_proxy(**{"mail.imap.max_sessions": 1})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"* OK")
    r2, w2 = await asyncio.open_connection("127.0.0.1", port)
    assert (await asyncio.wait_for(r2.read(), 5)).startswith(b"* BYE [UNAVAILABLE] Too many connections")
    w2.close()
    writer.write(b"a LOGOUT\r\n")
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await asyncio.sleep(0.1)
    r3, w3 = await asyncio.open_connection("127.0.0.1", port)  # a place again
    assert (await r3.readline()).startswith(b"* OK")
    w3.close()
    refused = eng.metrics.registry.get_sample_value("sge_proxy_mail_sessions_refused_total", {"protocol": "imap"})
    assert refused == 1


async def test_an_authorization_identity_for_someone_else_is_refused(make_proxy, certs, idp):
    """SASL PLAIN's authzid asks to act as another user: with the chain deciding, that is never
    the client's call (the upstream identity says how the proxy logs in)."""
    _, port = await make_proxy(**{"mail.imap.tls": "implicit"})
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls(certs),
                                                   server_hostname="localhost")
    await reader.readline()
    token = idp.keys[0].token("alice@example.com", email="alice@example.com")
    ir = base64.b64encode(f"bob@example.com\0alice@example.com\0{token}".encode())
    writer.write(b"a AUTHENTICATE PLAIN " + ir + b"\r\n")
    assert (await until_tagged(reader, b"a"))[-1].startswith(b"a NO [AUTHENTICATIONFAILED]")
    writer.close()
