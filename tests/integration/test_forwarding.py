"""The engine against a real mTLS upstream on 127.0.0.1: forwarding, scrubbing, errors, streaming."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time

import aiohttp
import pytest

from tests.conftest import proxy_env
from tests.harness import SEEN, ProxyProcess, start_app, start_proxy, upstream_app


@pytest.fixture
async def upstream(server_ssl):
    app = upstream_app()
    runner, port = await start_app(app, server_ssl)
    yield app, f"https://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def proxy(certs, upstream):
    eng = await start_proxy(certs, upstream[1], **{"stalwart.request_timeout": 1.0})
    yield eng, f"http://127.0.0.1:{eng.port}"
    await eng.stop(drain_timeout=1)


async def test_forwards_over_mtls_with_client_certificate(proxy, upstream, client):
    _, base = proxy
    async with client.post(base + "/jmap/?a=1", data=b'{"x":1}') as r:
        assert r.status == 200
        got = await r.json()
        assert r.headers["X-Request-ID"]
    assert got["method"] == "POST" and got["path"] == "/jmap/?a=1" and got["length"] == 7
    assert got["client_cert"]["commonName"] == "sge-mail-proxy-client"
    assert upstream[0][SEEN][-1]["sha256"] == hashlib.sha256(b'{"x":1}').hexdigest()


async def test_keepalive_reuses_upstream_connections(proxy, client):
    eng, base = proxy
    for _ in range(100):  # the start-up readiness probe uses the pool too: let it finish
        if eng.upstream_ok:
            break
        await asyncio.sleep(0.02)
    for _ in range(20):
        async with client.get(base + "/jmap/") as r:
            assert r.status == 200
    stats = eng.pool.stats()
    assert sum(v["open"] for v in stats.values()) == 1


@pytest.mark.parametrize("name,value", [
    ("X-SGE-User-ID", "bob"), ("X-SGE-Signature", "forged"), ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Host", "evil.example"), ("Forwarded", "for=6.6.6.6"), ("X-Real-IP", "6.6.6.6"),
    ("Proxy-Authorization", "Basic eA=="), ("TE", "trailers"), ("X-Hop", "1"),
])
async def test_spoofed_and_hop_by_hop_headers_never_reach_upstream(proxy, upstream, client, name, value):
    _, base = proxy
    headers = {name: value, "Connection": "keep-alive, X-Hop"}
    async with client.get(base + "/jmap/", headers=headers) as r:
        got = await r.json()
    sent = {k.lower(): v for k, v in got["headers"]}
    xff = [v for k, v in got["headers"] if k.lower() == "x-forwarded-for"]
    assert xff == ["127.0.0.1"]  # exactly one, the peer
    assert value not in [v for k, v in got["headers"] if k.lower() == name.lower()]
    assert "x-sge-user-id" not in sent and "forwarded" not in sent and "x-hop" not in sent
    assert "proxy-authorization" not in sent and "te" not in sent


async def test_upgrade_alt_svc_and_hop_by_hop_never_reach_client(proxy, client):
    _, base = proxy
    async with client.get(base + "/hop") as r:
        assert await r.text() == "hop"
        h = {k.lower() for k in r.headers}
    for bad in ("upgrade", "alt-svc", "keep-alive", "proxy-foo", "trailer", "x-private"):
        assert bad not in h
    assert "x-kept" in h


async def test_redirect_passed_through_not_followed(proxy, client):
    _, base = proxy
    async with client.get(base + "/redirect", allow_redirects=False) as r:
        assert r.status == 307 and r.headers["Location"] == "/jmap/session"


async def test_request_id_kept_when_well_formed_else_replaced(proxy, upstream, client):
    _, base = proxy
    async with client.get(base + "/jmap/", headers={"X-Request-ID": "abc-123-def-456"}) as r:
        assert r.headers["X-Request-ID"] == "abc-123-def-456"
    async with client.get(base + "/jmap/", headers={"X-Request-ID": "bad id\twith junk"}) as r:
        rid = r.headers["X-Request-ID"]
        assert rid != "bad id\twith junk" and len(rid) == 24
    assert ("X-Request-ID", rid) in [tuple(x) for x in upstream[0][SEEN][-1]["headers"]]


async def test_hung_upstream_gives_504_within_timeout(proxy, client):
    _, base = proxy
    t0 = time.monotonic()
    async with client.get(base + "/hang") as r:
        assert r.status == 504
        assert r.headers["Content-Type"] == "application/problem+json"
        body = await r.json()
    assert 0.9 < time.monotonic() - t0 < 3
    assert body["status"] == 504 and body["requestId"] == r.headers["X-Request-ID"]


async def test_upstream_down_gives_502(certs, client):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    eng = await start_proxy(certs, f"https://127.0.0.1:{dead}")
    try:
        async with client.get(f"http://127.0.0.1:{eng.port}/jmap/") as r:
            assert r.status == 502
            body = await r.json()
            assert body["type"].endswith("upstream_connect_failed")
            assert body["requestId"] == r.headers["X-Request-ID"]
    finally:
        await eng.stop(drain_timeout=0)


async def test_rogue_client_certificate_refused_gives_502(certs, upstream, client):
    eng = await start_proxy(certs, upstream[1], client="rogue-client")
    try:
        async with client.get(f"http://127.0.0.1:{eng.port}/jmap/") as r:
            assert r.status == 502
            assert r.headers["Content-Type"] == "application/problem+json"
            assert (await r.json())["status"] == 502
    finally:
        await eng.stop(drain_timeout=0)
    assert upstream[0][SEEN] == []


async def test_chunked_request_and_response_stream(proxy, upstream, client):
    _, base = proxy

    async def gen():
        for i in range(50):
            yield bytes([i]) * 10000

    async with client.post(base + "/upload", data=gen()) as r:
        got = await r.json()
    expected = b"".join(bytes([i]) * 10000 for i in range(50))
    assert got == {"length": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}
    async with client.get(base + "/download/300000") as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert len(await r.read()) == 300000


async def test_bad_http_gets_400_problem(proxy):
    _, base = proxy
    host, port = base[7:].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GARBAGE / HTTP/9.9\r\n\r\n")
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 400")
    assert b"application/problem+json" in data


async def test_oversized_headers_get_431(proxy):
    _, base = proxy
    host, port = base[7:].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /jmap/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 431")


async def test_admin_metrics_and_readiness(certs, upstream, client):
    from proxy.admin import AdminServer
    eng = await start_proxy(certs, upstream[1])
    admin = AdminServer(eng)
    await admin.start()
    try:
        for _ in range(50):
            if eng.upstream_ok:
                break
            await asyncio.sleep(0.05)
        async with client.get(f"http://127.0.0.1:{admin.port}/readyz") as r:
            assert r.status == 200, await r.text()
        async with client.get(f"http://127.0.0.1:{eng.port}/jmap/") as r:
            assert r.status == 200
        async with client.get(f"http://127.0.0.1:{admin.port}/metrics") as r:
            text = await r.text()
        assert 'sge_proxy_requests_total{method="GET",route="api",status="200"} 1.0' in text
        assert "sge_proxy_client_cert_expiry_timestamp_seconds" in text
        assert "sge_proxy_upstream_duration_seconds_bucket" in text
    finally:
        await admin.stop()
        await eng.stop(drain_timeout=0)


# ---------------------------------------------------------------- as a real process

@pytest.fixture
def upstream_thread(server_ssl):
    """The upstream in its own thread and loop, so a blocking test can drive the proxy process."""
    import threading
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    def run():
        asyncio.set_event_loop(loop)
        box["runner"], box["port"] = loop.run_until_complete(start_app(upstream_app(), server_ssl))
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    yield f"https://127.0.0.1:{box['port']}"
    asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


def test_50mb_upload_and_download_stream_with_flat_rss(certs, upstream_thread):
    p = ProxyProcess(proxy_env(certs, upstream_thread, SGE_CHAIN="", SGE_ACCESS_LOG="off"))
    try:
        base = f"http://127.0.0.1:{p.port}"

        async def run():
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/jmap/") as r:  # warm up
                    await r.read()
                before = p.rss_kib()
                size = 50 * 1024 * 1024
                digest = hashlib.sha256()

                async def gen():
                    block = os.urandom(1 << 16)
                    for _ in range(size // len(block)):
                        digest.update(block)
                        yield block

                async with s.post(base + "/upload", data=gen()) as r:
                    got = await r.json()
                assert got["length"] == size and got["sha256"] == digest.hexdigest()
                n = 0
                async with s.get(base + f"/download/{size}?length=1") as r:
                    assert r.headers["Content-Length"] == str(size)
                    async for chunk in r.content.iter_chunked(1 << 16):
                        n += len(chunk)
                assert n == size
                return before, p.rss_kib()

        before, after = asyncio.run(run())
        assert (after - before) < 30 * 1024, f"RSS grew {after - before} KiB"
    finally:
        p.stop()


def test_sigterm_lets_20_slow_requests_finish(certs, upstream_thread):
    p = ProxyProcess(proxy_env(certs, upstream_thread, SGE_CHAIN="", SGE_ACCESS_LOG="off"))
    try:
        base = f"http://127.0.0.1:{p.port}"

        async def run():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
                async def one():
                    async with s.get(base + "/slow/1500") as r:
                        return r.status, await r.json()
                tasks = [asyncio.create_task(one()) for _ in range(20)]
                await asyncio.sleep(0.5)
                p.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        assert [s for s, _ in results] == [200] * 20
        assert p.proc.wait(10) == 0
    finally:
        p.stop()


class _SlowHeaders:
    """Awaits in requestheaders, so a large body has fully arrived (and paused the client
    connection) before the engine forwards it."""
    name = "slow_headers"

    async def requestheaders(self, flow):
        await asyncio.sleep(0.2)


async def test_large_body_that_arrived_whole_does_not_stall_the_next_request(certs, upstream):
    eng = await start_proxy(certs, upstream[1], addon_objects=[_SlowHeaders()])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        body = b"x" * 300_000
        writer.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        seen = b""
        while b'"length": 300000' not in seen:  # the first answer, then the next request
            chunk = await asyncio.wait_for(reader.read(65536), 3)
            assert chunk, f"connection closed early: {seen[-300:]!r}"
            seen += chunk
        writer.write(b"GET /jmap/second HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        while seen.count(b"HTTP/1.1 200") < 2:
            chunk = await asyncio.wait_for(reader.read(65536), 3)
            assert chunk, f"connection closed early: {seen[-300:]!r}"
            seen += chunk
        assert b'"length": 300000' in seen and b"/jmap/second" in seen
        writer.close()
    finally:
        await eng.stop(drain_timeout=0)


class _RefuseInResponseHeaders:
    name = "refuse_late"
    security = True

    def responseheaders(self, flow):
        from proxy.errors import Forbidden
        raise Forbidden("not this answer")


class _BufferSmall:
    name = "buffer_small"

    def responseheaders(self, flow):
        flow.response.want_body(1000)


async def test_refusal_in_responseheaders_answers_and_does_not_leak_the_connection(certs, upstream, client):
    eng = await start_proxy(certs, upstream[1], addon_objects=[_RefuseInResponseHeaders()])
    try:
        for _ in range(3):
            async with client.get(f"http://127.0.0.1:{eng.port}/download/200000") as r:
                assert r.status == 403
        await asyncio.sleep(0.1)
        assert all(v["open"] <= 1 for v in eng.pool.stats().values())
    finally:
        await eng.stop(drain_timeout=0)


async def test_upstream_answer_over_a_buffering_cap_is_502(certs, upstream, client):
    eng = await start_proxy(certs, upstream[1], addon_objects=[_BufferSmall()])
    try:
        async with client.get(f"http://127.0.0.1:{eng.port}/download/5000") as r:
            assert r.status == 502
            assert (await r.json())["type"].endswith("upstream_response_too_large")
    finally:
        await eng.stop(drain_timeout=0)


async def test_server_sent_events_stream_through_unbuffered(proxy, client):
    """Each event reaches the client as the upstream sends it, not when the stream ends."""
    _, base = proxy
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    arrivals = []
    async with client.get(base + "/jmap/eventsource/?types=*&closeafter=no&ping=0") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: "):
                arrivals.append((int(line[6:]), loop.time() - t0))
    assert [n for n, _ in arrivals] == [0, 1, 2, 3, 4]
    # sent at ~0, 0.2, 0.4, 0.6, 0.8 s: each must arrive close to its own send time
    for n, at in arrivals:
        assert at < 0.2 * n + 0.15, f"event {n} arrived at {at:.2f}s: buffered"


@pytest.mark.parametrize("push_idle, complete", [(2.0, True), (0.4, False)], ids=["within", "past"])
async def test_an_event_stream_may_be_silent_longer_than_other_bodies(certs, upstream, client, push_idle, complete):
    """Events 0.8 s apart: past stalwart.timeout_seconds (0.3 s), which bounds the silence of
    other bodies, but within limits.push_idle_timeout (2 s) the stream goes on; past it (0.4 s)
    the stream is cut."""
    eng = await start_proxy(certs, upstream[1], **{"stalwart.timeout_seconds": 0.3,
                                                   "limits.push_idle_timeout": push_idle})
    got = []
    try:
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async with client.get(f"http://127.0.0.1:{eng.port}/jmap/eventsource/?gap=800") as r:
                assert r.status == 200
                async for line in r.content:
                    if line.startswith(b"data: "):
                        got.append(int(line[6:]))
    finally:
        await eng.stop(drain_timeout=1)
    assert got == ([0, 1, 2, 3, 4] if complete else [0])


async def test_other_bodies_are_cut_after_stalwart_timeout_seconds_of_silence(certs, upstream, client):
    """The same 0.8 s gaps in a body that is not an event stream: cut after 0.3 s."""
    eng = await start_proxy(certs, upstream[1], **{"stalwart.timeout_seconds": 0.3, "limits.push_idle_timeout": 5})
    try:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(f"http://127.0.0.1:{eng.port}/slowbody?gap=800") as r:
                assert r.status == 200
                await r.read()
    finally:
        await eng.stop(drain_timeout=1)


class _SetHeaders:
    """Sets headers with Request.set_header; `read` first builds .headers (the dict path)."""

    def __init__(self, read: bool) -> None:
        self.read = read

    def requestheaders(self, flow) -> None:
        req = flow.request
        if self.read:
            assert req.headers.get("X-Remove-Me") == "1"
        req.set_header("Authorization", "Basic bmV3OnNlY3JldA==")
        req.set_header("X-SGE-User-ID", "alice")
        req.set_header("X-Remove-Me", None)


@pytest.mark.parametrize("read", [False, True], ids=["raw-bytes", "materialised"])
async def test_set_header_reaches_upstream_once(certs, upstream, client, read):
    eng = await start_proxy(certs, upstream[1], addon_objects=[_SetHeaders(read)])
    try:
        headers = {"Authorization": "Bearer client", "X-SGE-User-ID": "mallory", "X-Remove-Me": "1",
                   "Accept": "application/json"}
        async with client.get(f"http://127.0.0.1:{eng.port}/jmap/", headers=headers) as r:
            assert r.status == 200
            got = await r.json()
    finally:
        await eng.stop(drain_timeout=1)
    sent = [(k.lower(), v) for k, v in got["headers"]]
    assert [v for k, v in sent if k == "authorization"] == ["Basic bmV3OnNlY3JldA=="]
    assert [v for k, v in sent if k == "x-sge-user-id"] == ["alice"]
    assert [v for k, v in sent if k == "x-forwarded-for"] == ["127.0.0.1"]
    assert "x-remove-me" not in dict(sent) and dict(sent)["accept"] == "application/json"
