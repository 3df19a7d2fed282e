"""The engine's client limits (limits.*) against slow and greedy clients, over raw sockets: a head
sent too slowly, an idle keep-alive connection, too many headers (431), a body over a buffering
addon's cap (413)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import pytest

from tests.harness import start_app, start_proxy, upstream_app

LIMITS = {"limits.header_timeout": "300ms", "limits.keepalive_timeout": "600ms", "limits.max_headers": 10}


@pytest.fixture
async def proxy(certs, server_ssl):
    runner, port = await start_app(upstream_app(), server_ssl)
    # header_signer with sign_body: always buffers every request body, capped at body_cap
    eng = await start_proxy(certs, f"https://127.0.0.1:{port}", chain=["header_signer"], **LIMITS,
                            **{"addons.header_signer": {"keys": {"k1": base64.b64encode(os.urandom(32)).decode()},
                                                        "sign_body": "always", "body_cap": "1KiB"}})
    yield eng.port
    await eng.stop(drain_timeout=1)
    await runner.cleanup()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def request(method: str, path: str, headers: list[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: proxy.test", *(f"{k}: {v}" for k, v in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_head_sent_too_slowly_is_disconnected(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    t0 = time.monotonic()
    writer.write(b"GET /jmap/ HTTP/1.1\r\nHost: proxy.test\r\n")

    async def drip() -> None:  # one byte every 50 ms: the connection never looks idle, the head never ends
        try:
            for b in b"X-Slow: " + b"a" * 100:
                await asyncio.sleep(0.05)
                writer.write(bytes([b]))
                await writer.drain()
        except ConnectionError:
            pass

    dripping = asyncio.ensure_future(drip())
    data = await asyncio.wait_for(reader.read(), 5)
    took = time.monotonic() - t0
    dripping.cancel()
    writer.close()
    assert data == b""                      # closed without an answer
    assert 0.25 <= took < 1.5               # at limits.header_timeout, long before the drip ends


async def test_idle_keepalive_connection_is_closed(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    writer.write(request("GET", "/jmap/"))
    head, _ = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0.3)                # idle, but within limits.keepalive_timeout: still open
    writer.write(request("GET", "/jmap/"))
    head, _ = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 5)
    took = time.monotonic() - t0
    writer.close()
    assert data == b"" and 0.5 <= took < 1.5


@pytest.mark.parametrize("extra, status", [(9, b"200"), (10, b"431")])
async def test_more_than_max_headers_gets_431(proxy, extra, status):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    writer.write(request("GET", "/jmap/", [(f"X-H{i}", "v") for i in range(extra)]))  # plus Host
    head, body = await read_response(reader)
    writer.close()
    assert head.split(b" ")[1] == status
    if status == b"431":
        assert b"application/problem+json" in head and b"connection: close" in head.lower()
        assert b'"status":431' in body


@pytest.mark.parametrize("size, chunked, status", [
    (1024, False, b"200"), (1025, False, b"413"), (4096, True, b"413"), (512, True, b"200"),
])
async def test_body_over_a_buffering_addons_cap_gets_413(proxy, size, chunked, status):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    body = b"x" * size
    if chunked:
        data = request("POST", "/jmap/", [("Transfer-Encoding", "chunked")])
        data += b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 256]), body[i:i + 256]) for i in range(0, size, 256))
        writer.write(data + b"0\r\n\r\n")
    else:
        writer.write(request("POST", "/jmap/", body=body))
    head, answer = await read_response(reader)
    writer.close()
    assert head.split(b" ")[1] == status
    if status == b"413":
        assert b"application/problem+json" in head and b'"status":413' in answer
    else:
        assert json.loads(answer)["length"] == size
