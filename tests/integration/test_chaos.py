"""Chaos on loopback, bounded in count and time; the figures they print are in docs/reliability.md.

- An upstream killed (SIGKILL) under load from four client addresses: the route's fallback takes
  over, the primary's circuit opens, and it takes the traffic back once it returns. The only
  errors allowed are 502s for requests that were on the killed server at the moment of the kill.
- A hung upstream under a burst: 504 after request_timeout for the requests that got one of the
  max_connections connections, 503 after connect_timeout for those that waited; never more
  connections than the limit.

Reproduce: `/tmp/venv/bin/pytest -q -s -p no:cacheprovider tests/integration/test_chaos.py`.
"""
from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web


from proxy.target import parse_target
from tests.harness import ROOT, RouteTo, start_app, start_proxy

CLIENTS = [f"127.0.0.{i}" for i in range(2, 6)]
WORKERS_PER_CLIENT = 4


# ---------------------------------------------------------------------------- the killable upstream
def serve(name: str, port: int, certs: str) -> None:
    """Run in a subprocess: an mTLS upstream answering after 5 ms, printing its port."""
    async def main() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=f"{certs}/ca.crt")
        ctx.load_cert_chain(f"{certs}/server.crt", f"{certs}/server.key")
        ctx.verify_mode = ssl.CERT_REQUIRED

        async def ready(r: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def echo(r: web.Request) -> web.Response:
            await r.read()
            await asyncio.sleep(0.005)
            return web.json_response({"server": name})

        app = web.Application()
        app.router.add_get("/healthz/ready", ready)
        app.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx, reuse_address=True)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


class Upstream:
    def __init__(self, name: str, certs: Path) -> None:
        self.name, self.certs, self.port, self.proc = name, certs, 0, None

    async def start(self) -> None:
        code = f"from tests.integration.test_chaos import serve; serve({self.name!r}, {self.port}, {str(self.certs)!r})"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     text=True)
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 20)  # type: ignore[union-attr]
        self.port = int(line)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


async def load(base: str, stop: asyncio.Event, log: list) -> None:
    """Clients from four addresses, four workers each, POSTing until `stop`: (start, end, status,
    server) per request."""
    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                async with session.post(base + "/jmap/", data=b'{"using":[],"methodCalls":[]}') as r:
                    body = await r.json(content_type=None)
                    log.append((t0, time.monotonic(), r.status, body.get("server")))
            except aiohttp.ClientError as e:  # the proxy dropped a connection: never expected
                log.append((t0, time.monotonic(), type(e).__name__, None))

    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0), limit=WORKERS_PER_CLIENT))
                for ip in CLIENTS]
    try:
        await asyncio.gather(*(worker(s) for s in sessions for _ in range(WORKERS_PER_CLIENT)))
    finally:
        for s in sessions:
            await s.close()


async def test_upstream_killed_under_load_fails_over_and_recovers(certs):
    a, b = Upstream("a", certs), Upstream("b", certs)
    await asyncio.gather(a.start(), b.start())
    eng = await start_proxy(certs, a.url, addon_objects=[RouteTo(a.url, b.url)], **{
        "stalwart.health_interval": "200ms", "stalwart.connect_timeout": "1s", "stalwart.request_timeout": "2s",
        "breaker.ejection_time": "500ms", "breaker.max_ejection_time": "2s", "breaker.open_time": "500ms",
        "breaker.max_open_time": "1s"})
    origin = parse_target(a.url).origin
    log: list = []
    stop = asyncio.Event()
    runner = asyncio.ensure_future(load(f"http://127.0.0.1:{eng.port}", stop, log))
    try:
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        a.kill()
        await asyncio.sleep(2.0)
        returned = time.monotonic()
        await a.start()  # the same port
        await asyncio.sleep(2.5)
        stop.set()
        await asyncio.wait_for(runner, 10)
    finally:
        stop.set()
        a.kill()
        b.kill()
        await eng.stop(drain_timeout=0)

    before = [r for r in log if r[1] < killed]
    errors = [r for r in log if r[2] != 200]
    first_b = min(r[1] for r in log if r[3] == "b" and r[0] >= killed)
    back_on_a = min(r[1] for r in log if r[3] == "a" and r[0] >= returned)
    after_recovery = [r for r in log if r[0] >= back_on_a + 0.5]
    print(f"\nkill: {len(log)} requests, {len(before)} before the kill, errors {len(errors)} "
          f"{sorted({r[2] for r in errors})}, first answer from the fallback {first_b - killed:.3f} s after "
          f"the kill, latest error started {max((r[0] for r in errors), default=killed) - killed:+.3f} s "
          f"from it; back on the primary {back_on_a - returned:.3f} s after it returned; "
          f"{sum(r[3] == 'a' for r in after_recovery)}/{len(after_recovery)} on a after that")
    assert len(before) > 100 and {r[3] for r in before} == {"a"}
    # only what was on the killed server at the moment of the kill fails, with 502
    assert all(r[2] == 502 and r[0] < killed + 0.2 for r in errors), errors  # (0.2: a loaded machine)
    assert len(errors) <= len(CLIENTS) * WORKERS_PER_CLIENT
    assert first_b - killed < 1.0
    value = eng.metrics.registry.get_sample_value
    opened = value("sge_proxy_circuit_transitions_total", {"upstream": origin, "from": "closed", "to": "open"})
    retries = value("sge_proxy_upstream_retries_total", {"upstream": origin, "reason": "upstream_connect_failed"})
    print(f"kill: circuit opened {opened:.0f}x ({value('sge_proxy_upstream_ejections_total', {'upstream': origin}):.0f}"
          f" by ejection), {retries or 0:.0f} requests refused by the dead server and sent to the fallback")
    assert opened and opened >= 1
    assert back_on_a - returned < 3.0
    assert after_recovery and all(r[3] == "a" for r in after_recovery)


# ---------------------------------------------------------------------------- the hung upstream
async def test_hung_upstream_gives_504s_and_503s_without_pile_up(certs, server_ssl):
    state = {"active": 0, "peak": 0, "conns": set()}

    async def hang(r: web.Request) -> web.Response:
        state["active"] += 1
        state["peak"] = max(state["peak"], state["active"])
        state["conns"].add(r.transport)
        try:
            await asyncio.sleep(3600)
        finally:
            state["active"] -= 1
        return web.Response()

    async def ok(r: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/hang", hang)
    app.router.add_route("*", "/{tail:.*}", ok)
    runner, port = await start_app(app, server_ssl)
    limit, request_timeout, connect_timeout, burst = 4, 0.5, 0.3, 24
    eng = await start_proxy(certs, f"https://127.0.0.1:{port}", **{
        "stalwart.max_connections": limit, "stalwart.request_timeout": request_timeout,
        "stalwart.connect_timeout": connect_timeout, "stalwart.health_interval": 3600})
    base = f"http://127.0.0.1:{eng.port}"
    try:
        for _ in range(100):  # the start-up health check holds a connection: let it finish
            if eng.upstream_ok:
                break
            await asyncio.sleep(0.02)
        peak_open = 0

        async def watch() -> None:
            nonlocal peak_open
            while True:
                peak_open = max(peak_open, sum(v["open"] for v in eng.pool.stats().values()))
                await asyncio.sleep(0.01)

        async def one(session: aiohttp.ClientSession) -> tuple[int, float]:
            t0 = time.monotonic()
            async with session.post(base + "/hang", data=b"{}") as r:
                await r.read()
                return r.status, time.monotonic() - t0

        watcher = asyncio.ensure_future(watch())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            t0 = time.monotonic()
            results = await asyncio.gather(*(one(s) for _ in range(burst)))
            wall = time.monotonic() - t0
            async with s.get(base + "/after") as r:  # nothing leaked: the next request is served
                assert r.status == 200
        watcher.cancel()
        by = {code: sorted(t for c, t in results if c == code) for code in {c for c, _ in results}}
        print(f"\nhung: {burst} requests, {limit} connections: " + ", ".join(
            f"{len(ts)}x{code} in {ts[0]:.3f}-{ts[-1]:.3f} s" for code, ts in sorted(by.items()))
            + f"; all answered in {wall:.3f} s; upstream peak {state['peak']} handlers, pool peak {peak_open}")
        assert set(by) == {503, 504}
        assert len(by[504]) == limit and len(by[503]) == burst - limit
        assert all(request_timeout <= t < request_timeout + 0.3 for t in by[504])
        assert all(connect_timeout <= t < connect_timeout + 0.3 for t in by[503])
        assert state["peak"] <= limit and peak_open <= limit
        assert wall < request_timeout + 0.5
    finally:
        await eng.stop(drain_timeout=0)
        for t in list(state["conns"]):
            t.abort()
        await runner.cleanup()
