"""Response.stream: an addon's answer whose body is produced while it is sent (the REST facade's
export uses it). Chunked to an HTTP/1.1 client, close-delimited to HTTP/1.0, nothing for HEAD;
the next chunk is asked for only once the client has taken the last; a failure midway cuts the
connection (a truncated answer, never a complete-looking one); a client that leaves stops the
producer."""
from __future__ import annotations

import asyncio

from proxy.flow import Response
from tests.harness import start_proxy

CHUNK = b"x" * 65536


class Streamer:
    """Answers /stream/{n} with n chunks of 64 KiB; /fail/{n} raises after n chunks. Records how
    far each producer got and whether it was closed."""

    def __init__(self) -> None:
        self.produced = 0
        self.closed = asyncio.Event()

    def request(self, flow):
        kind, _, n = flow.request.path.strip("/").partition("/")
        if kind not in ("stream", "fail"):
            return

        async def chunks():
            try:
                for _ in range(int(n)):
                    self.produced += 1
                    yield CHUNK
                    await asyncio.sleep(0)
                if kind == "fail":
                    raise RuntimeError("the producer failed midway")
            finally:
                self.closed.set()

        flow.response = Response.stream(200, chunks(), [("Content-Type", "application/octet-stream")])


async def raw(port: int, request: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def dechunk(body: bytes) -> tuple[bytes, bool]:
    out, complete = b"", False
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            complete = rest == b"\r\n"
            break
        out, body = out + rest[:size], rest[size + 2:]
    return out, complete


async def test_chunked_http11_and_close_delimited_http10(certs, upstream):
    s = Streamer()
    eng = await start_proxy(certs, upstream, addon_objects=[s])
    try:
        head, body = await raw(eng.port, b"GET /stream/8 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        assert b"x-request-id:" in head.lower() and b"content-length" not in head.lower()
        assert dechunk(body) == (CHUNK * 8, True)
        head, body = await raw(eng.port, b"GET /stream/3 HTTP/1.0\r\nHost: x\r\n\r\n")
        assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
        assert body == CHUNK * 3
        before = s.produced
        head, body = await raw(eng.port, b"HEAD /stream/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b""
        assert s.produced == before  # HEAD: the producer never runs
    finally:
        await eng.stop(drain_timeout=1)


async def test_failure_midway_cuts_the_connection(certs, upstream):
    eng = await start_proxy(certs, upstream, addon_objects=[Streamer()])
    try:
        head, body = await raw(eng.port, b"GET /fail/4 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        data, complete = dechunk(body)
        assert data == CHUNK * 4 and not complete  # no terminating chunk: the client knows
    finally:
        await eng.stop(drain_timeout=1)


async def test_back_pressure_and_a_client_that_leaves(certs, upstream):
    """A client that reads nothing holds the producer back (it does not run ahead into memory),
    and when it leaves the producer is closed."""
    s = Streamer()
    eng = await start_proxy(certs, upstream, addon_objects=[s])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port, limit=1 << 16)
        writer.transport.pause_reading()
        writer.write(b"GET /stream/4000 HTTP/1.1\r\nHost: x\r\n\r\n")  # 250 MiB if nobody waited
        await asyncio.sleep(1.0)
        held = s.produced
        assert held < 200, held  # socket buffers hold a few MiB; the producer waits for the rest
        await asyncio.sleep(0.5)
        assert s.produced - held < 4  # and stays put while the client does not read
        writer.transport.abort()
        await asyncio.wait_for(s.closed.wait(), 5)
        assert s.produced < 4000
    finally:
        await eng.stop(drain_timeout=1)
