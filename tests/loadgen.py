"""Continuous load for the reload, SIGTERM and worker tests: an upstream that records which
requests reached it, clients that keep sending until told to stop, and a file addon whose option
shows in every response. Loopback only."""
from __future__ import annotations

import asyncio
import itertools
import signal
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web

if TYPE_CHECKING:
    from tests.harness import ProxyProcess

RECORD: web.AppKey["Record"] = web.AppKey("record")

# a file addon: stamps each response with its `tag` option (X-Stamp); `done` appends to `done_log`
# how many requests it still had in hand when it was retired; tag "boom" fails its load
STAMP = textwrap.dedent('''
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class Options:
        tag: str = "none"
        done_log: str = ""

    class Stamp:
        name = "stamp"
        Options = Options
        suffix = ""

        def load(self, loader):
            if loader.options.tag == "boom":
                raise RuntimeError("boom")
            self.tag, self.log, self.active = loader.options.tag, loader.options.done_log, 0

        def requestheaders(self, flow):
            self.active += 1

        def responseheaders(self, flow):
            flow.response.headers["X-Stamp"] = self.tag + self.suffix

        def response(self, flow):
            self.active -= 1

        def done(self):
            with open(self.log, "a") as f:
                f.write(f"{self.tag} active={self.active}\\n")

    addons = [Stamp()]
''')


@dataclass
class Record:
    started: set[int] = field(default_factory=set)   # reached the upstream
    finished: set[int] = field(default_factory=set)  # answered by the upstream


def work_app() -> web.Application:
    """GET /work/{n}?ms=M: recorded, answered after M ms. Anything else (health checks): 200."""
    app = web.Application()
    rec = app[RECORD] = Record()

    async def work(r: web.Request) -> web.Response:
        n = int(r.match_info["n"])
        rec.started.add(n)
        await asyncio.sleep(int(r.query.get("ms", "0")) / 1000)
        rec.finished.add(n)
        return web.json_response({"n": n})

    async def other(r: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_get("/work/{n}", work)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


@dataclass
class Result:
    n: int
    started: float            # loop time the client began the request
    status: int | None = None
    stamp: str | None = None  # the X-Stamp response header, if any
    error: BaseException | None = None


class Load:
    """`clients` concurrent clients, each sending GET /work/{n}?ms=M one after the other (on
    keep-alive connections unless `fresh_connections`) until stop(); a client stops by itself
    after a failure when `stop_on_error`."""

    def __init__(self, base: str, *, clients: int = 16, ms: int = 20, fresh_connections: bool = False,
                 stop_on_error: bool = False) -> None:
        self.base, self.clients, self.ms = base, clients, ms
        self.fresh, self.stop_on_error = fresh_connections, stop_on_error
        self.results: list[Result] = []
        self.pending: dict[int, Result] = {}
        self._stop = asyncio.Event()
        self._ids = itertools.count(1)
        self.tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=self.clients, force_close=self.fresh))
        self.tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def _client(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._session is not None
        while not self._stop.is_set():
            res = Result(next(self._ids), loop.time())
            self.pending[res.n] = res
            try:
                async with self._session.get(f"{self.base}/work/{res.n}?ms={self.ms}") as r:
                    await r.read()
                    res.status, res.stamp = r.status, r.headers.get("X-Stamp")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                res.error = e
            del self.pending[res.n]
            self.results.append(res)
            if res.error is not None and self.stop_on_error:
                return

    async def stop(self) -> list[Result]:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 30)
        assert self._session is not None
        await self._session.close()
        return self.results


async def sigterm_under_load(p: "ProxyProcess", app: web.Application, *, clients: int = 16, fresh_connections: bool = False) -> None:
    """Continuous load, SIGTERM: every request that reached the upstream is answered 200, new
    connections are refused while the last requests still drain, the process exits 0."""
    rec = app[RECORD]
    load = Load(f"http://127.0.0.1:{p.port}", clients=clients, ms=300, fresh_connections=fresh_connections,
                stop_on_error=True)
    await load.start()
    await asyncio.sleep(0.8)
    in_flight = set(load.pending)
    p.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", p.port)
    assert set(load.pending) & in_flight, "the drain was over before new connections were tested"
    for _ in range(300):  # the clients go on until each has seen the listener gone
        if all(t.done() for t in load.tasks):
            break
        await asyncio.sleep(0.01)
    results = await load.stop()
    assert await asyncio.to_thread(p.proc.wait, 15) == 0
    by_n = {r.n: r for r in results}
    assert len(in_flight) >= clients // 2
    assert all(by_n[n].status == 200 for n in in_flight), [by_n[n] for n in in_flight if by_n[n].status != 200]
    # anything that reached the upstream was answered; what failed never got past the listener
    assert rec.started == rec.finished
    assert all(by_n[n].status == 200 for n in rec.started)
    failed = [r for r in results if r.status != 200]
    assert failed, "no client ever saw the listener closed"
    assert all(r.error is not None and r.n not in rec.started for r in failed), failed[:3]
