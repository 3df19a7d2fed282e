"""Real servers for integration tests: an mTLS aiohttp upstream and the proxy, in-process or as a
subprocess. Everything binds 127.0.0.1 port 0."""
from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.config import load_config
from proxy.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
SEEN: web.AppKey[list] = web.AppKey("seen", list)


def distinct_block(i: int) -> bytes:
    """64 KiB that differ from every other block's: a body whose bytes show any reordering."""
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * 2048


def distinct_body_sha256(n: int) -> str:
    """The SHA-256 of the first `n` bytes of /download/{n}?distinct=1."""
    h = hashlib.sha256()
    i = 0
    while n > 0:
        block = distinct_block(i)[:n]
        h.update(block)
        n -= len(block)
        i += 1
    return h.hexdigest()


def upstream_app() -> web.Application:
    """The test upstream: records what it received and offers slow, big and hop-by-hop answers."""
    app = web.Application(client_max_size=1 << 31)
    seen: list[dict[str, Any]] = []
    app[SEEN] = seen

    async def echo(r: web.Request) -> web.Response:
        body = await r.read()
        peer = r.transport.get_extra_info("peercert") if r.transport else None
        subject = dict(x[0] for x in peer["subject"]) if peer else None
        rec = {"method": r.method, "path": r.path_qs, "headers": list(r.headers.items()),
               "length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
               "client_cert": subject}
        seen.append(rec)
        return web.json_response(rec)

    async def download(r: web.Request) -> web.StreamResponse:
        n = int(r.match_info["n"])
        resp = web.StreamResponse()
        if r.query.get("length") == "1":
            resp.content_length = n
        resp.content_type = "application/octet-stream"
        await resp.prepare(r)
        distinct = r.query.get("distinct") == "1"
        block = b"x" * 65536
        left, i = n, 0
        while left:
            if distinct:
                block = distinct_block(i)
            k = min(left, len(block))
            await resp.write(block[:k])
            left -= k
            i += 1
        await resp.write_eof()
        return resp

    async def upload(r: web.Request) -> web.Response:
        h = hashlib.sha256()
        total = 0
        async for chunk in r.content.iter_chunked(1 << 16):
            h.update(chunk)
            total += len(chunk)
        return web.json_response({"length": total, "sha256": h.hexdigest()})

    async def hang(r: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()

    async def slow(r: web.Request) -> web.Response:
        await asyncio.sleep(int(r.match_info["ms"]) / 1000)
        return web.json_response({"slept": int(r.match_info["ms"])})

    async def status(r: web.Request) -> web.Response:
        code = int(r.match_info["code"])
        return web.Response(status=code, headers={"ETag": '"v1"', "X-Status": str(code)},
                            body=None if code in (204, 304) else b"hello")

    async def hop(r: web.Request) -> web.Response:
        return web.Response(text="hop", headers={
            "Upgrade": "h2c", "Connection": "Upgrade, X-Private", "X-Private": "1", "Alt-Svc": 'h2c=":1"',
            "Keep-Alive": "timeout=5", "Proxy-Foo": "1", "Trailer": "X-T", "X-Kept": "yes"})

    async def events(r: web.Request) -> web.StreamResponse:
        """Server-Sent Events: one event every 200 ms (every `gap` ms with ?gap=), five in all
        (JMAP's eventSourceUrl)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(r)
        gap = int(r.query.get("gap", "200")) / 1000
        for i in range(5):
            await resp.write(f"event: state\ndata: {i}\n\n".encode())
            await asyncio.sleep(gap)
        await resp.write_eof()
        return resp

    async def slowbody(r: web.Request) -> web.StreamResponse:
        """A plain (not event-stream) body in five chunks, `gap` ms apart."""
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(r)
        for i in range(5):
            await resp.write(b"chunk %d\n" % i)
            await asyncio.sleep(int(r.query.get("gap", "200")) / 1000)
        await resp.write_eof()
        return resp

    async def redirect(r: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "/jmap/session"})

    async def websocket(r: web.Request) -> web.StreamResponse:
        """JMAP over WebSocket's endpoint, for the bridge: 403 with ?refuse=1; else a first text
        message with the upgrade request's headers, then each text message echoed as
        {"echo": text}, binary ones as they came; "close" closes with 4000, "flood:N" sends N
        messages, "big:N" one text message of N bytes, "bigs:COUNT:SIZE" COUNT binary ones."""
        if r.query.get("refuse") == "1":
            return web.json_response({"refused": True}, status=403)
        ws = web.WebSocketResponse(protocols=("jmap",), compress=False)
        await ws.prepare(r)
        await ws.send_json({"headers": list(r.headers.items()), "path": r.path_qs})
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                if msg.data == "close":
                    await ws.close(code=4000, message=b"bye")
                elif msg.data.startswith("flood:"):
                    for i in range(int(msg.data[6:])):
                        await ws.send_str(f"m{i}")
                elif msg.data.startswith("big:"):
                    await ws.send_str("b" * int(msg.data[4:]))
                elif msg.data.startswith("bigs:"):  # bigs:COUNT:SIZE, as fast as the socket takes them
                    count, size = map(int, msg.data[5:].split(":"))
                    for i in range(count):
                        await ws.send_bytes(bytes([i % 256]) * size)
                else:
                    await ws.send_json({"echo": msg.data})
            elif msg.type == web.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        seen.append({"websocket_closed": ws.close_code})
        return ws

    app.router.add_route("*", "/download/{n}", download)
    app.router.add_route("POST", "/upload", upload)
    app.router.add_route("*", "/hang", hang)
    app.router.add_route("*", "/slow/{ms}", slow)
    app.router.add_route("*", "/hop", hop)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("GET", "/redirect", redirect)
    app.router.add_route("GET", "/jmap/eventsource/", events)
    app.router.add_route("GET", "/jmap/ws", websocket)
    app.router.add_route("GET", "/slowbody", slowbody)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_app(app: web.Application, ssl_ctx=None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def proxy_config(certs: Path, upstream: str, *, client: str = "client", **over: Any):
    o = {
        "stalwart.url": upstream, "stalwart.client_cert": str(certs / f"{client}.crt"),
        "stalwart.client_key": str(certs / f"{client}.key"), "stalwart.ca_cert": str(certs / "ca.crt"),
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "access_log": "off", "chain": [],
    }
    o.update(over)
    return load_config(None, env={}, overrides=o)


async def start_proxy(certs: Path, upstream: str, *, addon_objects: list[Any] = (), **over: Any) -> Engine:
    """`over` holds dotted config keys or whole sections (e.g. addons={...}); `addon_objects` are
    ready-made addons appended to the chain."""
    eng = Engine(proxy_config(certs, upstream, **over))
    await eng.start()
    if addon_objects:
        await eng.addons.add(*addon_objects)
    return eng


_LISTEN = re.compile(r"listening on [^:]+:(\d+) .*admin on [^:]+:(\d+)")


class ProxyProcess:
    """The proxy as a real process (RSS, signals)."""

    def __init__(self, env: dict[str, str], args: list[str] = ()) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", *args], env=env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.port = self.admin_port = 0
        self.lines: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                break
            self.lines.append(line)
            m = _LISTEN.search(line)
            if m:
                self.port, self.admin_port = int(m.group(1)), int(m.group(2))
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.proc.kill()
        raise RuntimeError("proxy did not start: " + "".join(self.lines))

    def _drain(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.append(line)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class RouteTo:
    """A test addon that sets the route the way addons/resolver.py does: flow.upstream and the
    fallbacks the engine fails over to."""
    name = "test_route"

    def __init__(self, primary: str, *fallbacks: str) -> None:
        from proxy.target import parse_target
        self.primary = parse_target(primary, name="tenant:acme")
        self.fallbacks = tuple(parse_target(u, name="tenant:acme") for u in fallbacks)

    def requestheaders(self, flow) -> None:
        from proxy.health import FALLBACKS
        flow.upstream = self.primary
        flow.metadata[FALLBACKS] = self.fallbacks


async def eventually(check, timeout: float = 5.0) -> None:
    """Wait until `check()` is true (polling every 20 ms); fail the test after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
