"""The mail listeners' connection to the user's server (proxy.mail.MailGate.connect): TLS with
the client certificate, and the PROXY protocol header sent in clear before the TLS handshake."""
from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.flow import Flow, Request
from proxy.mail import Grant, MailGate, UpstreamLogin
from tests.harness import start_proxy


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
