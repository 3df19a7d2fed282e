"""WebSocket bridging (proxy/websocket.py) against a real mTLS WebSocket upstream (tests/harness.py,
/jmap/ws): the handshake, messages both ways through the websocket_message hook, closing
handshakes in both directions, limits, idle and drain, failures before and after the 101."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.errors import Forbidden
from tests.harness import eventually, start_proxy


def _ws_url(eng, query: str = "") -> str:
    return f"http://127.0.0.1:{eng.port}/jmap/ws{query}"


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:  # offers permessage-deflate, as browsers do
        yield s


async def test_messages_cross_both_ways_and_the_upgrade_is_forwarded_clean(certs, upstream, session):
    eng = await start_proxy(certs, upstream)
    try:
        async with session.ws_connect(_ws_url(eng), protocols=("jmap",),
                                      headers={"X-Forwarded-For": "6.6.6.6", "X-SGE-User": "mallory"}) as ws:
            assert ws.protocol == "jmap"
            assert ws.compress == 0  # no extension negotiated through the proxy
            first = await ws.receive_json(timeout=5)
            seen = {k.lower(): v for k, v in first["headers"]}
            assert seen["upgrade"] == "websocket" and seen["connection"] == "Upgrade"
            assert seen["sec-websocket-version"] == "13" and seen["sec-websocket-protocol"] == "jmap"
            assert "sec-websocket-extensions" not in seen
            assert seen["x-forwarded-for"] == "127.0.0.1" and "x-sge-user" not in seen
            assert len(seen["x-request-id"]) == 24
            await ws.send_str('{"@type":"Request"}')
            assert await ws.receive_json(timeout=5) == {"echo": '{"@type":"Request"}'}
            await ws.send_bytes(b"\x00\xff" * 1000)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == b"\x00\xff" * 1000
            await ws.send_str("flood:200")  # many server messages in few reads: order kept
            got = [(await ws.receive(timeout=5)).data for _ in range(200)]
            assert got == [f"m{i}" for i in range(200)]
            await ws.ping()
            await ws.send_str("after-ping")
            assert await ws.receive_json(timeout=5) == {"echo": "after-ping"}
    finally:
        await eng.stop(drain_timeout=1)
    assert eng.in_flight == 0


async def test_the_101_carries_the_request_id_and_is_counted(certs, upstream, session):
    eng = await start_proxy(certs, upstream)
    try:
        async with session.ws_connect(_ws_url(eng), headers={"X-Request-ID": "ws-req-42"}) as ws:
            await ws.receive_json(timeout=5)
            assert ws._response.headers["X-Request-ID"] == "ws-req-42"
            for i in range(3):
                await ws.send_str(f"n{i}")
                await ws.receive_json(timeout=5)
            await ws.close()
        await eventually(lambda: eng.metrics.requests.values.get(("websocket", "GET", "101")))
        assert eng.metrics.requests.values[("websocket", "GET", "101")] == 1
        assert eng.metrics.websocket_messages.values[("client",)] == 3
        assert eng.metrics.websocket_messages.values[("server",)] == 4  # the headers, three echoes
        assert eng.metrics.websockets_open == 0
    finally:
        await eng.stop(drain_timeout=1)


async def test_a_close_from_the_server_reaches_the_client_with_its_code(certs, upstream, session):
    eng = await start_proxy(certs, upstream)
    try:
        async with session.ws_connect(_ws_url(eng)) as ws:
            await ws.receive_json(timeout=5)
            await ws.send_str("close")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4000, "bye")
    finally:
        await eng.stop(drain_timeout=1)


async def test_a_close_from_the_client_reaches_the_server(certs, server_ssl, session):
    from tests.harness import SEEN, start_app, upstream_app
    app = upstream_app()
    runner, port = await start_app(app, server_ssl)
    eng = await start_proxy(certs, f"https://127.0.0.1:{port}")
    try:
        async with session.ws_connect(_ws_url(eng)) as ws:
            await ws.receive_json(timeout=5)
            await ws.close(code=4100, message=b"done")
            assert ws.close_code == 4100  # the server's answer, relayed
        await eventually(lambda: any("websocket_closed" in r for r in app[SEEN]))
        assert {"websocket_closed": 4100} in app[SEEN]
    finally:
        await eng.stop(drain_timeout=1)
        await runner.cleanup()


async def test_a_refusal_by_the_server_is_relayed_as_http(certs, upstream, session):
    eng = await start_proxy(certs, upstream)
    try:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await session.ws_connect(_ws_url(eng, "?refuse=1"))
        assert e.value.status == 403
        assert e.value.headers["X-Request-ID"]
    finally:
        await eng.stop(drain_timeout=1)
    assert eng.in_flight == 0


async def test_upstream_down_is_a_502_problem_before_the_handshake(certs, session):
    from tests.conftest import free_port
    eng = await start_proxy(certs, f"https://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await session.ws_connect(_ws_url(eng))
        assert e.value.status == 502
        assert e.value.headers["Content-Type"] == "application/problem+json"
    finally:
        await eng.stop(drain_timeout=1)


class _Rewriter:
    """Drops "secret" (answering it itself), rewrites "a" into "b", closes on "bye-now"."""
    name = "ws_rewriter"

    def __init__(self) -> None:
        self.started = self.ended = 0
        self.end_code = None

    def websocket_start(self, flow):
        self.started += 1

    async def websocket_message(self, flow):
        await asyncio.sleep(0)  # hooks may wait: order still holds
        msg = flow.websocket.messages[-1]
        if not msg.from_client:
            return
        if msg.text == "secret":
            msg.drop()
            flow.websocket.inject('{"refused":"secret"}')
        elif msg.text == "a":
            msg.text = "b"
        elif msg.text == "bye-now":
            msg.drop()
            flow.websocket.close(4001, "asked")

    def websocket_end(self, flow):
        self.ended += 1
        self.end_code = flow.websocket.close_code


async def test_the_message_hook_drops_rewrites_injects_and_closes(certs, upstream, session):
    addon = _Rewriter()
    eng = await start_proxy(certs, upstream, addon_objects=[addon])
    try:
        async with session.ws_connect(_ws_url(eng)) as ws:
            await ws.receive_json(timeout=5)
            for text in ("a", "secret", "c"):
                await ws.send_str(text)
            got = [await ws.receive_json(timeout=5) for _ in range(3)]
            # the injected answer comes straight from the proxy; the echoes keep their order
            assert [g for g in got if "echo" in g] == [{"echo": "b"}, {"echo": "c"}]
            assert {"refused": "secret"} in got
            await ws.send_str("bye-now")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "asked")
        await eventually(lambda: addon.ended)
        assert (addon.started, addon.ended, addon.end_code) == (1, 1, 4001)
    finally:
        await eng.stop(drain_timeout=1)


class _Broken:
    name = "broken_guard"
    security = True

    def websocket_message(self, flow):
        if flow.websocket.messages[-1].from_client:
            raise RuntimeError("boom")


class _Refuser:
    name = "refuser"

    def websocket_start(self, flow):
        raise Forbidden("No WebSocket for you.")


@pytest.mark.parametrize("addon, code", [(_Broken(), 1011), (_Refuser(), 1008)], ids=["security-bug", "refusal"])
async def test_a_failing_security_addon_or_a_refusal_closes_the_session(certs, upstream, session, addon, code):
    eng = await start_proxy(certs, upstream, addon_objects=[addon])
    try:
        async with session.ws_connect(_ws_url(eng)) as ws:
            if code == 1011:
                await ws.receive_json(timeout=5)
                await ws.send_str("anything")
            while True:  # nothing of the client's is echoed: the next frame is the close
                msg = await ws.receive(timeout=5)
                if msg.type != aiohttp.WSMsgType.TEXT or "headers" not in msg.data:
                    break
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == code
    finally:
        await eng.stop(drain_timeout=1)


@pytest.mark.parametrize("from_client", [True, False], ids=["client-message", "server-message"])
async def test_a_message_over_the_limit_closes_with_1009(certs, upstream, session, from_client):
    eng = await start_proxy(certs, upstream, **{"limits.websocket_max_message": "4KiB"})
    try:
        async with session.ws_connect(_ws_url(eng), max_msg_size=0) as ws:
            await ws.receive_json(timeout=5)
            await ws.send_str("x" * 5000 if from_client else "big:5000")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009
    finally:
        await eng.stop(drain_timeout=1)


async def test_an_idle_session_is_closed_1001(certs, upstream, session):
    eng = await start_proxy(certs, upstream, **{"limits.push_idle_timeout": "0.5s"})
    try:
        async with session.ws_connect(_ws_url(eng), autoping=False) as ws:
            await ws.receive_json(timeout=5)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
    finally:
        await eng.stop(drain_timeout=1)


async def test_draining_ends_sessions_with_1001(certs, upstream, session):
    eng = await start_proxy(certs, upstream)
    stopped = None
    try:
        async with session.ws_connect(_ws_url(eng)) as ws:
            await ws.receive_json(timeout=5)
            stopped = asyncio.create_task(eng.stop(drain_timeout=5))
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
        await asyncio.wait_for(stopped, 5)
    finally:
        if stopped is None:
            await eng.stop(drain_timeout=1)
    assert eng.in_flight == 0


async def test_the_client_leaving_closes_the_upstream_leg(certs, server_ssl):
    from tests.harness import SEEN, start_app, upstream_app
    app = upstream_app()
    runner, port = await start_app(app, server_ssl)
    eng = await start_proxy(certs, f"https://127.0.0.1:{port}")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        writer.write(b"GET /jmap/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's own example
        writer.close()  # gone without a close frame
        await eventually(lambda: any("websocket_closed" in r for r in app[SEEN]))
        assert {"websocket_closed": 1001} in app[SEEN]
        await eventually(lambda: eng.in_flight == 0)
        assert eng.in_flight == 0
    finally:
        await eng.stop(drain_timeout=1)
        await runner.cleanup()


async def test_other_upgrades_are_still_plain_http_without_upgrade(certs, upstream):
    eng = await start_proxy(certs, upstream)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        # a WebSocket upgrade without its key, and an h2c one: neither is bridged
        for upgrade, extra in (("websocket", b""), ("h2c", b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n")):
            reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: " + upgrade.encode()
                         + b"\r\n" + extra + b"\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            body = await reader.read()
            assert b'"Upgrade"' not in body and b"Sec-WebSocket" not in body
            writer.close()
    finally:
        await eng.stop(drain_timeout=1)


# ---------------------------------------------------------------------------- frames on the wire
_UPGRADE = (b"GET /jmap/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = b"\x01\x02\x03\x04") -> bytes:
    """One client frame (RFC 6455 section 5.2), masked unless mask is None; short payloads only."""
    assert len(payload) < 126
    head = bytes([(0x80 if fin else 0) | opcode, (0x80 if mask else 0) | len(payload)])
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _raw_session(eng):
    """A client speaking raw frames: (reader, writer, wsproto client connection for reading)."""
    from wsproto.connection import Connection, ConnectionType
    reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
    writer.write(_UPGRADE)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    return reader, writer, Connection(ConnectionType.CLIENT)


async def _next_events(reader, conn, want: int, timeout: float = 5) -> list:
    events: list = []
    async with asyncio.timeout(timeout):
        while len(events) < want:
            data = await reader.read(65536)
            if not data:
                break
            conn.receive_data(data)
            events.extend(conn.events())
    return events


async def test_a_fragmented_message_is_relayed_whole(certs, upstream):
    from wsproto.events import TextMessage
    eng = await start_proxy(certs, upstream)
    try:
        reader, writer, conn = await _raw_session(eng)
        await _next_events(reader, conn, 1)  # the server's first message (its view of the headers)
        writer.write(_frame(0x1, b"frag", fin=False) + _frame(0x0, b"men", fin=False) + _frame(0x0, b"ted"))
        (ev,) = await _next_events(reader, conn, 1)
        assert isinstance(ev, TextMessage) and ev.data == '{"echo": "fragmented"}'
        writer.close()
    finally:
        await eng.stop(drain_timeout=1)


@pytest.mark.parametrize("frame, code", [
    (_frame(0x1, b"\xff\xfe invalid utf-8"), 1007),
    (_frame(0x1, b"unmasked", mask=None), 1002),   # a client's frames must be masked
    (_frame(0x3, b"reserved opcode"), 1002),
], ids=["invalid-utf8", "unmasked", "reserved-opcode"])
async def test_a_protocol_error_from_the_client_closes_both_sides(certs, server_ssl, frame, code):
    from wsproto.events import CloseConnection
    from tests.harness import SEEN, start_app, upstream_app
    app = upstream_app()
    runner, port = await start_app(app, server_ssl)
    eng = await start_proxy(certs, f"https://127.0.0.1:{port}")
    try:
        reader, writer, conn = await _raw_session(eng)
        await _next_events(reader, conn, 1)
        writer.write(frame)
        events = await _next_events(reader, conn, 1)
        assert isinstance(events[-1], CloseConnection) and events[-1].code == code
        await eventually(lambda: any("websocket_closed" in r for r in app[SEEN]))
        assert {"websocket_closed": code} in app[SEEN]  # the server was told why
        writer.close()
    finally:
        await eng.stop(drain_timeout=1)
        await runner.cleanup()


async def test_a_client_that_does_not_read_holds_back_the_server_not_the_proxys_memory(certs, upstream):
    """800 binary messages of 64 KiB (50 MiB, more than the kernel's socket buffers absorb)
    towards a client that reads nothing for a while: what the proxy holds for it (parsed messages
    waiting plus its write buffer) stays bounded, and every byte arrives once the client reads."""
    from wsproto.events import BytesMessage
    eng = await start_proxy(certs, upstream)
    try:
        reader, writer, conn = await _raw_session(eng)
        await _next_events(reader, conn, 1)
        writer.write(_frame(0x1, b"bigs:800:65536"))
        proto = next(p for p in eng.connections if p._ws is not None)
        held = 0
        for _ in range(50):  # 1 s without reading
            await asyncio.sleep(0.02)
            if proto._ws is not None and proto.transport is not None:
                held = max(held, proto._ws._queued + proto.transport.get_write_buffer_size())
        assert held < 6 << 20
        messages: list[bytes] = []
        current = bytearray()
        async with asyncio.timeout(20):
            while len(messages) < 800:
                data = await reader.read(1 << 20)
                assert data
                conn.receive_data(data)
                for ev in conn.events():
                    assert isinstance(ev, BytesMessage)
                    current += ev.data
                    if ev.message_finished:
                        messages.append(bytes(current))
                        current = bytearray()
        assert [len(m) for m in messages] == [65536] * 800
        assert [m[0] for m in messages] == [i % 256 for i in range(800)]
        writer.close()
    finally:
        await eng.stop(drain_timeout=1)


_ACCEPT = b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"  # right for _UPGRADE's key


@pytest.mark.parametrize("answer, status", [
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Accept: d3JvbmcgYWNjZXB0IHRva2VuIQ==\r\n\r\n", 502),                    # wrong token
    (b"HTTP/1.1 101 Switching Protocols\r\n" + _ACCEPT + b"\r\n", 502),                    # no Upgrade
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + _ACCEPT
     + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n", 502),                       # not offered
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgr", 504),                                        # stuck in the head
    (b"NOT HTTP AT ALL\r\n\r\n", 502),
], ids=["wrong-accept", "no-upgrade", "extension", "stuck", "garbage"])
async def test_a_bad_handshake_from_the_server_is_a_gateway_error(certs, server_ssl, answer, status):
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    eng = await start_proxy(certs, f"https://127.0.0.1:{port}", **{"stalwart.request_timeout": 0.5,
                                                                   "stalwart.health_interval": 3600})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        writer.write(_UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 %d " % status)
        assert b"application/problem+json" in head
        writer.close()
    finally:
        await eng.stop(drain_timeout=1)
        server.close()


async def test_sessions_and_a_failing_security_addon_are_audited(certs, upstream, session, tmp_path):
    import json
    audit = tmp_path / "audit.log"
    eng = await start_proxy(certs, upstream, addon_objects=[_Broken()], audit_log=str(audit))
    try:
        async with session.ws_connect(_ws_url(eng)) as ws:
            await ws.receive_json(timeout=5)
            await ws.send_str("anything")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1011
    finally:
        await eng.stop(drain_timeout=1)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] != "upstream.health"] == [
        "websocket.opened", "addon.failed_closed", "websocket.closed"]
    failed = events[[e["event"] for e in events].index("addon.failed_closed")]
    assert (failed["addon"], failed["hook"], failed["error"]) == ("broken_guard", "websocket_message", "RuntimeError")
    assert events[-1]["close_code"] == 1011 and events[-1]["messages_from_client"] == 1
