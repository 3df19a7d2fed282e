"""Downstream HTTP/2 (proxy/http2.py): a real HTTP/2 client (httpx + h2) over TLS with ALPN, the
proxy forwarding each stream over mTLS HTTP/1.1 to the test upstream. Same answers as HTTP/1.1,
many streams on one connection, bodies both ways under flow control, resets, errors, draining."""
from __future__ import annotations

import asyncio
import hashlib
import json
import ssl

import httpx
import pytest

from proxy.http2 import request_head
from tests.harness import SEEN, distinct_body_sha256, eventually, start_app, start_proxy, upstream_app


@pytest.fixture
async def upstream_app_url(server_ssl):
    app = upstream_app()
    runner, port = await start_app(app, server_ssl)
    yield app, f"https://127.0.0.1:{port}"
    await runner.cleanup()


async def _start(certs, url, **over):
    return await start_proxy(certs, url, **{"tls.enabled": True, "tls.cert": str(certs / "server.crt"),
                                            "tls.key": str(certs / "server.key"), "tls.http2": True, **over})


@pytest.fixture
async def h2(certs, upstream_app_url):
    """The proxy with a TLS listener offering HTTP/2 in front of the test upstream:
    (upstream app, its URL, engine); stopped after the test."""
    app, url = upstream_app_url
    eng = await _start(certs, url)
    yield app, url, eng
    await eng.stop(drain_timeout=1)


def _client(certs, http2: bool = True) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    return httpx.AsyncClient(http2=http2, http1=not http2, verify=ctx, timeout=20)


async def _raw_h2(certs, eng, **config):
    """A raw HTTP/2 client connection (h2's state machine, ALPN h2): (reader, writer, conn)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", eng.port, ssl=ctx)
    conn = H2Connection(H2Configuration(client_side=True, **config))
    conn.initiate_connection()
    return reader, writer, conn


async def test_a_get_over_http2_is_forwarded_as_http11(certs, h2):
    app, url, eng = h2
    async with _client(certs) as c:
        r = await c.get(f"https://127.0.0.1:{eng.port}/jmap/x?a=1",
                        headers={"X-Forwarded-For": "6.6.6.6", "Cookie": "a=1", "X-Request-ID": "h2-req-1"},
                        cookies=None)
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert r.headers["x-request-id"] == "h2-req-1"
        assert "connection" not in r.headers and "transfer-encoding" not in r.headers
        seen = r.json()
    assert seen["path"] == "/jmap/x?a=1"
    h = {k.lower(): v for k, v in seen["headers"]}
    assert h["x-forwarded-for"] == "127.0.0.1" and h["x-forwarded-proto"] == "https"
    assert h["host"] == url.split("//")[1]  # the upstream's, as for HTTP/1.1
    assert h["cookie"] == "a=1"
    assert seen["client_cert"]["commonName"]  # over mTLS, as always


async def test_many_streams_on_one_connection(certs, h2):
    app, url, eng = h2
    async with _client(certs) as c:
        rs = await asyncio.gather(*(c.post(f"https://127.0.0.1:{eng.port}/jmap/?n={i}",
                                           content=json.dumps({"n": i}).encode()) for i in range(60)))
        assert all(r.http_version == "HTTP/2" for r in rs)
        assert [r.json()["path"] for r in rs] == [f"/jmap/?n={i}" for i in range(60)]
        assert all(r.json()["length"] == len(json.dumps({"n": i})) for i, r in enumerate(rs))
    assert len([p for p in eng.connections if type(p).__name__ == "H2Protocol"]) <= 1


async def test_bodies_stream_both_ways_under_flow_control(certs, h2):
    """A 12 MiB upload without a length (chunked to the upstream) and a 12 MiB download: more
    than every window, byte-exact both ways."""
    app, url, eng = h2
    n = 12 << 20
    async with _client(certs) as c:
        async def body():
            for i in range(n // 65536):
                yield bytes([i % 256]) * 65536
        r = await c.post(f"https://127.0.0.1:{eng.port}/upload", content=body())
        expect = hashlib.sha256(b"".join(bytes([i % 256]) * 65536 for i in range(n // 65536))).hexdigest()
        assert r.json() == {"length": n, "sha256": expect}
        async with c.stream("GET", f"https://127.0.0.1:{eng.port}/download/{n}?distinct=1&length=1") as r:
            assert r.headers["content-length"] == str(n)
            h = hashlib.sha256()
            async for chunk in r.aiter_bytes():
                h.update(chunk)
        assert h.hexdigest() == distinct_body_sha256(n)


async def test_head_errors_and_statuses_over_http2(certs, h2):
    app, url, eng = h2
    async with _client(certs) as c:
        base = f"https://127.0.0.1:{eng.port}"
        r = await c.head(base + "/download/5000?length=1")
        assert r.status_code == 200 and r.headers["content-length"] == "5000" and r.content == b""
        r = await c.get(base + "/status/204")
        assert r.status_code == 204 and r.content == b""
        r = await c.get(base + "/status/304")
        assert r.status_code == 304 and r.headers["etag"] == '"v1"'
        r = await c.get(base + "/hop")  # hop-by-hop and Alt-Svc stripped, as for HTTP/1.1
        assert r.text == "hop" and "alt-svc" not in r.headers and "upgrade" not in r.headers
        assert r.headers["x-kept"] == "yes"
    eng2 = await _start(certs, "https://127.0.0.1:9")  # nothing listens there
    try:
        async with _client(certs) as c:
            r = await c.get(f"https://127.0.0.1:{eng2.port}/jmap/")
            assert r.status_code == 502 and r.headers["content-type"] == "application/problem+json"
            assert r.json()["requestId"] == r.headers["x-request-id"]
    finally:
        await eng2.stop(drain_timeout=1)


async def test_a_stream_reset_by_the_client_leaves_the_connection_usable(certs, h2):
    app, url, eng = h2
    async with _client(certs) as c:
        base = f"https://127.0.0.1:{eng.port}"
        async with c.stream("GET", base + "/download/50000000") as r:  # 50 MB, abandoned early
            async for _ in r.aiter_bytes():
                break
        r = await c.get(base + "/jmap/after")
        assert r.status_code == 200 and r.json()["path"] == "/jmap/after"
    await eventually(lambda: eng.in_flight == 0)


async def test_http11_clients_still_work_on_the_same_listener(certs, h2):
    app, url, eng = h2
    async with _client(certs, http2=False) as c:
        r = await c.get(f"https://127.0.0.1:{eng.port}/jmap/one")
        assert r.http_version == "HTTP/1.1" and r.json()["path"] == "/jmap/one"


async def test_off_by_default_http11_only(certs, upstream_app_url):
    _, url = upstream_app_url
    eng = await _start(certs, url, **{"tls.http2": False})
    try:
        async with httpx.AsyncClient(http2=True, verify=ssl.create_default_context(cafile=str(certs / "ca.crt"))) as c:
            r = await c.get(f"https://127.0.0.1:{eng.port}/jmap/one")
            assert r.http_version == "HTTP/1.1"  # ALPN offered only http/1.1
    finally:
        await eng.stop(drain_timeout=1)


async def test_draining_lets_streams_in_progress_finish(certs, upstream_app_url):
    app, url = upstream_app_url
    eng = await _start(certs, url)
    async with _client(certs) as c:
        slow = asyncio.create_task(c.get(f"https://127.0.0.1:{eng.port}/slow/400"))
        await eventually(lambda: eng.in_flight == 1)
        clean = await eng.stop(drain_timeout=5)
        r = await slow
        assert r.status_code == 200 and r.json() == {"slept": 400}
        assert clean


@pytest.mark.parametrize("headers, end_stream, head, chunked", [
    ([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"mail.example"), (b":path", b"/jmap/?a=1"),
      (b"accept", b"*/*")], True,
     b"GET /jmap/?a=1 HTTP/1.1\r\nhost: mail.example\r\naccept: */*\r\n\r\n", False),
    ([(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"m"), (b":path", b"/jmap/"),
      (b"content-length", b"7")], False,
     b"POST /jmap/ HTTP/1.1\r\nhost: m\r\ncontent-length: 7\r\n\r\n", False),
    ([(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"m"), (b":path", b"/up")], False,
     b"POST /up HTTP/1.1\r\nhost: m\r\ntransfer-encoding: chunked\r\n\r\n", True),
    ([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"m"), (b":path", b"/"),
      (b"cookie", b"a=1"), (b"te", b"trailers"), (b"cookie", b"b=2"), (b"expect", b"100-continue")], True,
     b"GET / HTTP/1.1\r\nhost: m\r\nexpect: 100-continue\r\ncookie: a=1; b=2\r\n\r\n", False),
], ids=["get", "post-with-length", "post-streamed", "cookies-te-expect"])
def test_request_head_table(headers, end_stream, head, chunked):
    assert request_head(headers, end_stream=end_stream) == (head, chunked)


@pytest.mark.parametrize("headers", [
    [(b":authority", b"m")],                                          # no :method, no :path (CONNECT)
    [(b":method", b"GET"), (b":path", b"/a b")],                       # a space would split the request line
    [(b":method", b"GET"), (b":path", b"/a\tb")],
    [(b":method", b"GET / HTTP/1.1"), (b":path", b"/")],
    [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a b")],
], ids=["no-method-path", "space-in-path", "tab-in-path", "space-in-method", "space-in-authority"])
def test_request_head_refuses_what_cannot_be_a_request_line(headers):
    with pytest.raises(ValueError):
        request_head(headers, end_stream=True)





async def test_a_rapid_reset_flood_ends_the_connection(certs, h2):
    """CVE-2023-44487: streams opened and reset at once, over and over: GOAWAY ENHANCE_YOUR_CALM."""
    from h2.errors import ErrorCodes
    from h2.events import ConnectionTerminated
    app, url, eng = h2
    reader, writer, conn = await _raw_h2(certs, eng)
    terminated = None
    for i in range(300):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":authority", "x"),
                                (":path", f"/slow/1000?i={i}")])
        conn.reset_stream(sid)
    writer.write(conn.data_to_send())
    async with asyncio.timeout(10):
        while terminated is None:
            data = await reader.read(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, ConnectionTerminated):
                    terminated = ev
    assert terminated is not None and terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    writer.close()
    await eventually(lambda: eng.in_flight == 0)


async def test_a_malformed_request_is_a_stream_error_and_the_connection_goes_on(certs, h2):
    from h2.errors import ErrorCodes
    from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset
    app, url, eng = h2
    reader, writer, conn = await _raw_h2(certs, eng, validate_outbound_headers=False,
                                         normalize_outbound_headers=False)
    base = [(":method", "GET"), (":scheme", "https"), (":authority", "x")]
    conn.send_headers(1, base + [(":path", "/jmap/a smuggled")], end_stream=True)  # a space: no request line
    conn.send_headers(3, base + [(":path", "/jmap/fine")], end_stream=True)
    writer.write(conn.data_to_send())
    got: dict = {}
    async with asyncio.timeout(10):
        while 3 not in got or not got[3].get("ended"):
            data = await reader.read(65536)
            assert data
            for ev in conn.receive_data(data):
                if isinstance(ev, StreamReset):
                    got.setdefault(ev.stream_id, {})["reset"] = ev.error_code
                elif isinstance(ev, ResponseReceived):
                    got.setdefault(ev.stream_id, {})["status"] = dict(ev.headers)[b":status"]
                elif isinstance(ev, DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, StreamEnded):
                    got.setdefault(ev.stream_id, {})["ended"] = True
            writer.write(conn.data_to_send())
    assert got[1] == {"reset": ErrorCodes.PROTOCOL_ERROR}
    assert got[3] == {"status": b"200", "ended": True}
    assert [r["path"] for r in app[SEEN] if r.get("path", "").startswith("/jmap")] == ["/jmap/fine"]
    writer.close()


async def test_expect_100_continue_gets_an_informational_100_before_the_body(certs, h2):
    from h2.events import DataReceived, InformationalResponseReceived, ResponseReceived, StreamEnded
    app, url, eng = h2
    reader, writer, conn = await _raw_h2(certs, eng)
    body = b"x" * 100_000
    conn.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", "x"), (":path", "/upload"),
                          ("content-length", str(len(body))), ("expect", "100-continue")])
    writer.write(conn.data_to_send())
    seen: list = []
    data = b""
    async with asyncio.timeout(10):
        while not any(isinstance(e, StreamEnded) for e in seen):
            chunk = await reader.read(65536)
            assert chunk
            for ev in conn.receive_data(chunk):
                seen.append(ev)
                if isinstance(ev, InformationalResponseReceived):  # now the body
                    for i in range(0, len(body), 16384):
                        conn.send_data(1, body[i:i + 16384], end_stream=i + 16384 >= len(body))
                elif isinstance(ev, DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
            writer.write(conn.data_to_send())
    kinds = [type(e).__name__ for e in seen if isinstance(e, (InformationalResponseReceived, ResponseReceived))]
    assert kinds == ["InformationalResponseReceived", "ResponseReceived"]
    assert json.loads(data) == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    writer.close()


async def test_connections_and_streams_are_gauged_by_protocol(certs, h2):
    app, url, eng = h2

    def gauge(name: str, **labels: str) -> float | None:
        return eng.metrics.registry.get_sample_value(name, labels)
    async with _client(certs) as c, _client(certs, http2=False) as c1:
        base = f"https://127.0.0.1:{eng.port}"
        slow = [asyncio.create_task(c.get(base + "/slow/500")) for _ in range(3)]
        slow1 = asyncio.create_task(c1.get(base + "/slow/500"))
        await eventually(lambda: gauge("sge_proxy_http2_streams") == 3 and eng.in_flight == 4)
        assert gauge("sge_proxy_client_connections", protocol="h2") == 1
        assert gauge("sge_proxy_client_connections", protocol="http/1.1") == 1
        await asyncio.gather(*slow, slow1)
        await eventually(lambda: gauge("sge_proxy_http2_streams") == 0)


async def test_a_client_that_grants_windows_but_does_not_read_holds_back_the_upstream(certs, h2):
    """Flow control is the client's to grant: one that opens huge windows and then reads nothing
    must not make the proxy buffer the whole answer (here 60 MB) for it."""
    from h2.events import DataReceived, StreamEnded
    from h2.settings import SettingCodes
    app, url, eng = h2
    reader, writer, conn = await _raw_h2(certs, eng)
    conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 2 ** 31 - 1})
    conn.increment_flow_control_window(2 ** 31 - 1 - 65535)
    n = 60_000_000
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "x"),
                          (":path", f"/download/{n}?length=1")], end_stream=True)
    writer.write(conn.data_to_send())
    await asyncio.sleep(0.3)
    proto = next(c for c in eng.connections if hasattr(c, "streams"))
    held = 0
    for _ in range(40):  # 0.8 s of not reading
        await asyncio.sleep(0.02)
        pending = sum(len(s.pending) for s in proto.streams.values())
        held = max(held, pending + (proto.transport.get_write_buffer_size() if proto.transport else 0))
    assert held < 8 << 20
    got = 0
    async with asyncio.timeout(30):
        done = False
        while not done:
            data = await reader.read(1 << 20)
            assert data
            for ev in conn.receive_data(data):
                if isinstance(ev, DataReceived):
                    got += len(ev.data)
                elif isinstance(ev, StreamEnded):
                    done = True
            writer.write(conn.data_to_send())
    assert got == n
    writer.close()
