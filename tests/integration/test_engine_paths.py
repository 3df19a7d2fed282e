"""The request cycle's two paths: without a Task while nothing waits, and the Task that takes over
at the first thing that must wait. Same hooks, same order, same answers; and what the path without
a Task must clean up itself (a client that leaves, a pooled connection that dies)."""
from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from tests.harness import start_proxy

HOOKS = ("requestheaders", "request", "responseheaders", "response")


class _Recorder:
    """Records its hooks in a shared list; waits (returns a coroutine) in the hooks it is told to."""

    def __init__(self, name: str, log: list, wait_in: tuple[str, ...] = ()) -> None:
        self.name, self.log, self.wait_in = name, log, wait_in

    def _hook(self, hook: str, flow):
        if hook in ("request", "response"):  # the body is buffered for those (asked in the *headers hooks)
            message = flow.request if hook == "request" else flow.response
            assert message.body is not None, f"{self.name}: no body in {hook}"
        if hook in ("requestheaders", "responseheaders"):
            (flow.request if hook == "requestheaders" else flow.response).want_body(1 << 20)
        if hook not in self.wait_in:
            self.log.append((self.name, hook))
            return None

        async def later():
            await asyncio.sleep(0.001)
            self.log.append((self.name, hook))
        return later()

    def requestheaders(self, flow):
        return self._hook("requestheaders", flow)

    def request(self, flow):
        return self._hook("request", flow)

    def responseheaders(self, flow):
        return self._hook("responseheaders", flow)

    def response(self, flow):
        return self._hook("response", flow)


@pytest.mark.parametrize("waits", [
    {},                                          # every hook synchronous: no Task at all
    {"a": ("requestheaders",)},                  # the first addon waits at the first hook
    {"b": ("request",)},                         # the second waits after the body was buffered
    {"a": ("responseheaders",), "b": ("response",)},
    {"b": HOOKS},
], ids=["sync", "a-requestheaders", "b-request", "response-side", "b-everywhere"])
async def test_a_hook_that_waits_resumes_the_chain_in_order(certs, upstream, client, waits):
    log: list = []
    addons = [_Recorder(n, log, waits.get(n, ())) for n in ("a", "b", "c")]
    eng = await start_proxy(certs, upstream, addon_objects=addons)
    try:
        for i in range(3):  # a pooled connection after the first
            log.clear()
            async with client.post(f"http://127.0.0.1:{eng.port}/jmap/?n={i}", data=b'{"x":1}') as r:
                assert r.status == 200
                got = await r.json()
            assert got["path"] == f"/jmap/?n={i}" and got["length"] == 7
            assert log == [(n, h) for h in HOOKS for n in ("a", "b", "c")]
    finally:
        await eng.stop(drain_timeout=1)
    assert eng.in_flight == 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, await reader.readexactly(int(headers["content-length"]))


async def test_pipelined_requests_are_answered_in_order(certs, upstream):
    eng = await start_proxy(certs, upstream)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        writer.write(b"".join(f"GET /jmap/?n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(3)))
        for i in range(3):
            status, _, body = await asyncio.wait_for(_read_response(reader), 5)
            assert status == 200 and json.loads(body)["path"] == f"/jmap/?n={i}"
        writer.close()
    finally:
        await eng.stop(drain_timeout=1)


async def test_a_client_that_leaves_while_upstream_thinks_frees_its_request(certs, upstream, client):
    eng = await start_proxy(certs, upstream, **{"stalwart.request_timeout": 30.0})
    try:
        base = f"http://127.0.0.1:{eng.port}"
        async with client.get(base + "/jmap/") as r:  # a pooled connection to wait on
            assert r.status == 200
        opened = sum(v["open"] for v in eng.pool.stats().values())  # (the health probe's too)
        assert sum(v["idle"] for v in eng.pool.stats().values()) == opened >= 1
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        for _ in range(100):
            if eng.in_flight == 1:
                break
            await asyncio.sleep(0.01)
        assert eng.in_flight == 1
        writer.close()
        for _ in range(200):
            if eng.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert eng.in_flight == 0
        # the connection that carried the abandoned request was closed, not pooled mid-answer
        assert sum(v["open"] for v in eng.pool.stats().values()) == opened - 1
        async with client.get(base + "/jmap/") as r:
            assert r.status == 200
    finally:
        await eng.stop(drain_timeout=1)


class _HangsUpWhenReused:
    """An upstream that keeps connections alive, but closes one without a word when a request for
    /die comes on it after it has served another: a pooled connection the server dropped."""

    def __init__(self) -> None:
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if head.split(b" ")[1].startswith(b"/die") and served:
                    break
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.mark.parametrize("method, status", [("GET", 200), ("POST", 502)])
async def test_a_pooled_connection_that_dies_unanswered_replays_only_idempotent_requests(
        certs, server_ssl, client, method, status):
    up = _HangsUpWhenReused()
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    eng = await start_proxy(certs, f"https://127.0.0.1:{port}", **{"retry.attempts": 0})
    try:
        base = f"http://127.0.0.1:{eng.port}"
        async with client.request(method, base + "/jmap/", data=b"{}" if method == "POST" else None) as r:
            assert r.status == 200  # (the connection is pooled: every pooled one has served)
        before = up.connections
        async with client.request(method, base + "/die", data=b"{}" if method == "POST" else None) as r:
            assert r.status == status
            if status == 200:
                assert await r.read() == b"ok"
            else:
                assert r.headers["Content-Type"] == "application/problem+json"
        # a GET went again on a fresh connection; a POST that may have reached the server did not
        assert up.connections == before + (1 if method == "GET" else 0)
    finally:
        await eng.stop(drain_timeout=1)
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("size, length", [
    (3 * 1024 * 1024 + 17, True),   # Content-Length: most of it passed on without the parser
    (1, True), (0, True),
    (3 * 1024 * 1024 + 17, False),  # chunked from upstream: every byte through llhttp
])
async def test_streamed_bodies_arrive_whole_and_the_connection_serves_again(certs, upstream, client, size, length):
    from tests.harness import distinct_body_sha256
    eng = await start_proxy(certs, upstream)
    try:
        base = f"http://127.0.0.1:{eng.port}"
        for _ in range(3):  # the same pooled connection again after each body
            digest, n = hashlib.sha256(), 0
            url = f"{base}/download/{size}?distinct=1" + ("&length=1" if length else "")
            async with client.get(url) as r:
                assert r.status == 200
                if length:
                    assert r.headers["Content-Length"] == str(size)
                async for chunk in r.content.iter_chunked(1 << 16):
                    digest.update(chunk)
                    n += len(chunk)
            assert n == size and digest.hexdigest() == distinct_body_sha256(size)
            async with client.get(base + "/jmap/?after") as r:
                assert r.status == 200 and (await r.json())["path"] == "/jmap/?after"
        assert eng.in_flight == 0
    finally:
        await eng.stop(drain_timeout=1)


class _RefusesAfterBuffering:
    """Buffers the answer, then refuses it from a `response` hook that waits first: the refusal
    comes after the upstream connection went back to the pool."""

    security = True

    def responseheaders(self, flow):
        flow.response.want_body(1 << 20)

    def response(self, flow):
        from proxy.errors import Forbidden

        async def later():
            await asyncio.sleep(0.001)
            raise Forbidden("Not this answer.")
        return later()


async def test_a_refusal_after_the_answer_was_buffered_leaves_the_pooled_connection_alone(certs, upstream, client):
    eng = await start_proxy(certs, upstream, addon_objects=[_RefusesAfterBuffering()],
                            **{"stalwart.health_interval": 3600})
    try:
        base = f"http://127.0.0.1:{eng.port}"
        seen = []
        for _ in range(5):
            async with client.get(base + "/jmap/") as r:
                assert r.status == 403
                assert r.headers["Content-Type"] == "application/problem+json"
            # the connection went back to the pool before the refusal, and stays there: no
            # connection is closed, none opened (the start-up health probe's is pooled too)
            [stats] = eng.pool.stats().values()
            assert stats["idle"] == stats["open"]
            seen.append(stats["open"])
        assert seen == [seen[0]] * 5, seen
    finally:
        await eng.stop(drain_timeout=1)


@pytest.mark.parametrize("method, path, status, body", [
    ("HEAD", "/status/200", 200, b""),   # a Content-Length and no body
    ("GET", "/status/204", 204, b""),
    ("GET", "/status/304", 304, b""),
    ("GET", "/status/200", 200, b"hello"),
])
async def test_answers_without_a_body_keep_both_connections_in_step(certs, upstream, method, path, status, body):
    """Each answer is followed on the same client connection (and the same pooled upstream
    connection) by another request: a body-less answer must not leave a byte, or a wait, behind."""
    eng = await start_proxy(certs, upstream)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        for _ in range(3):
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            head = got.decode().lower()
            assert head.startswith(f"http/1.1 {status} ") and "x-status: " + str(status) in head
            if method == "HEAD" or status in (204, 304):
                assert "transfer-encoding" not in head
            else:
                assert await asyncio.wait_for(reader.readexactly(len(body)), 5) == body
            writer.write(b"GET /jmap/?next HTTP/1.1\r\nHost: x\r\n\r\n")
            code, _, answer = await asyncio.wait_for(_read_response(reader), 5)
            assert code == 200 and json.loads(answer)["path"] == "/jmap/?next"
        writer.close()
        assert eng.in_flight == 0
    finally:
        await eng.stop(drain_timeout=1)


async def test_expect_100_continue_is_answered_before_the_body_comes(certs, upstream):
    eng = await start_proxy(certs, upstream)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        head = b"POST /jmap/ HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n"
        # a client that waits for the go-ahead
        writer.write(head)
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b'{"x":1}')
        status, _, body = await asyncio.wait_for(_read_response(reader), 5)
        assert status == 200 and json.loads(body)["length"] == 7
        # a client that sends the body at once: answered, and no stray 100 before the answer
        writer.write(head + b'{"y":2}')
        status, _, body = await asyncio.wait_for(_read_response(reader), 5)
        assert status == 200 and json.loads(body)["length"] == 7
        writer.close()
    finally:
        await eng.stop(drain_timeout=1)


async def test_a_traceparent_goes_on_untouched_and_its_trace_id_into_the_access_log(certs, upstream, client, tmp_path):
    access = tmp_path / "access.log"
    eng = await start_proxy(certs, upstream, access_log=str(access))
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    try:
        for headers in ({"traceparent": tp, "tracestate": "congo=t61rcWkgMzE"}, {"traceparent": "garbage"}, {}):
            async with client.get(f"http://127.0.0.1:{eng.port}/jmap/t", headers=headers) as r:
                got = {k.lower(): v for k, v in (await r.json())["headers"]}
            assert got.get("traceparent") == headers.get("traceparent")  # passed on as it came
            assert got.get("tracestate") == headers.get("tracestate")
    finally:
        await eng.stop(drain_timeout=1)
    lines = [json.loads(line) for line in access.read_text().splitlines() if '"/jmap/t"' in line]
    assert [line.get("trace_id") for line in lines] == ["4bf92f3577b34da6a3ce929d0e0e4736", None, None]
