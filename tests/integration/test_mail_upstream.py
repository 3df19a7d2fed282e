"""The mail listeners' connection to the user's server (proxy.mail.MailGate.connect): TLS with
the client certificate, and the PROXY protocol header sent in clear before the TLS handshake."""
from __future__ import annotations

import asyncio
import base64
import socket
import ssl

import pytest

from proxy.flow import Flow, Request
from proxy.mail import Grant, MailGate, UpstreamLogin
from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER


@pytest.mark.parametrize("proxy_protocol", ["off", "v1"])
async def test_tls_with_the_client_certificate_after_the_proxy_header(certs, upstream, server_ssl, proxy_protocol):
    seen: dict = {}
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)

    async def serve_one() -> None:
        conn, _ = await loop.sock_accept(lsock)
        if proxy_protocol == "v1":  # byte by byte: what follows the line is the TLS handshake
            header = b""
            while not header.endswith(b"\n"):
                header += await loop.sock_recv(conn, 1)
            seen["header"] = header
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: proto, conn, ssl=server_ssl)  # client cert required
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        seen["peer_cert"] = writer.get_extra_info("peercert")
        writer.write(b"* OK ready\r\n")
        await writer.drain()
        seen["line"] = await reader.readline()
        writer.close()

    serving = asyncio.ensure_future(serve_one())
    mail_port = lsock.getsockname()[1]
    eng = await start_proxy(certs, upstream, **{
        "mail.imap.listen": "127.0.0.1:0", "mail.imap.upstream_tls": "implicit",
        "mail.imap.upstream_proxy_protocol": proxy_protocol,
        "mail.imap.upstreams": {"official": f"127.0.0.1:{mail_port}"},
        "tls.cert": str(certs / "server.crt"), "tls.key": str(certs / "server.key")})
    try:
        gate = MailGate(eng, "imap")
        flow = Flow(Request("IMAP", "/mail/imap"), id="t")
        grant = Grant(flow, [eng.default_target], UpstreamLogin("PLAIN", "u", "p"))
        client = (("192.0.2.9", 40001), ("127.0.0.1", 1143))
        target, reader, writer = await gate.connect(eng.config.mail.imap, grant, client)
        assert target is eng.default_target and flow.upstream is target
        assert await asyncio.wait_for(reader.readline(), 5) == b"* OK ready\r\n"
        writer.write(b"a1 NOOP\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        await asyncio.wait_for(serving, 5)
        assert seen["line"] == b"a1 NOOP\r\n"
        assert dict(x[0] for x in seen["peer_cert"]["subject"])["commonName"]  # the proxy's client cert
        if proxy_protocol == "v1":
            assert seen["header"] == b"PROXY TCP4 192.0.2.9 127.0.0.1 40001 1143\r\n"
        writer.close()
    finally:
        serving.cancel()
        lsock.close()
        await eng.stop(drain_timeout=1)


async def test_managesieve_upgrades_the_servers_connection_with_starttls(certs, upstream, server_ssl, idp):
    """mail.sieve's default upstream_tls: the server's capabilities, STARTTLS, the handshake with
    the client certificate, the capabilities again, then the proxy's AUTHENTICATE."""
    seen: dict = {}

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'"IMPLEMENTATION" "test"\r\n"SASL" "PLAIN"\r\n"STARTTLS"\r\nOK\r\n')
        seen["starttls"] = await reader.readline()
        writer.write(b'OK "go"\r\n')
        await writer.drain()
        await writer.start_tls(server_ssl)  # requires the dev client certificate
        seen["peer_cert"] = writer.get_extra_info("peercert")
        writer.write(b'"IMPLEMENTATION" "test"\r\n"SASL" "PLAIN"\r\nOK\r\n')
        seen["auth"] = await reader.readline()
        writer.write(b"OK\r\n")
        await writer.drain()
        seen["next"] = await reader.readline()
        writer.close()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    eng = await start_proxy(certs, upstream, chain=None, **{
        "stalwart.health_interval": 3600,
        "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
        "addons.upstream_identity": {"mode": "impersonate", "impersonator": "sge-proxy", "secret": "imp"},
        "addons.header_signer": {"key_id": "k", "keys": {"k": "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleS0xMg=="}},
        "tls.cert": str(certs / "server.crt"), "tls.key": str(certs / "server.key"),
        "mail.sieve.listen": "127.0.0.1:0", "mail.sieve.tls": "implicit",
        "mail.sieve.upstreams": {"official": f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"}})
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.mail_servers["sieve"].port, ssl=ctx,
                                                       server_hostname="localhost")
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() in (None, "managesieve")
        while not (await reader.readline()).startswith(b"OK"):
            pass
        token = idp.keys[0].token("alice@example.com", email="alice@example.com")
        ir = base64.b64encode(f"\0alice@example.com\0{token}".encode()).decode()
        writer.write(f'AUTHENTICATE "PLAIN" "{ir}"\r\n'.encode())
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"OK")
        writer.write(b"LISTSCRIPTS\r\n")  # relayed from here on
        await asyncio.sleep(0.2)
        assert seen["starttls"] == b"STARTTLS\r\n" and seen["peer_cert"]
        mech, _, b64 = seen["auth"].decode().rstrip("\r\n").partition(" ")[2].partition(" ")
        assert mech == '"PLAIN"'
        assert base64.b64decode(b64.strip('"')) == b"\0alice@example.com%sge-proxy\0imp"
        assert seen["next"] == b"LISTSCRIPTS\r\n"
        writer.close()
    finally:
        srv.close()
        await eng.stop(drain_timeout=1)
