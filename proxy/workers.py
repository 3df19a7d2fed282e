"""`--workers N`: a supervisor process and N worker processes sharing the listening port.

Each worker is a whole proxy (`sge-mail-proxy run ... --worker INDEX:SOCKET`) whose listener is
bound with SO_REUSEPORT, so the kernel spreads new connections across them; its admin listener is
on a private unix socket instead of admin_listen. The supervisor:

- binds the port first (SO_REUSEPORT, never listen()ing, so no connection is ever queued on it)
  to learn an OS-chosen port and to hold it while workers come and go, and hands the concrete
  port to every worker;
- restarts a worker that dies, with a backoff that grows while it keeps dying young;
- forwards SIGHUP to every worker (each reloads itself); POST /reload asks each one and answers
  with their outcomes;
- on SIGTERM/SIGINT sends SIGTERM to every worker, waits for them to drain, exits 0;
- runs the admin listener: /metrics sums the workers' samples (proxy.metrics.aggregate),
  /readyz is ready when every worker is, /upstreams and /workers list them per worker.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from .admin import redacted_config
from .errors import ConfigError
from .metrics import aggregate
from .reload import keep_running

if TYPE_CHECKING:
    from .config import Config

__all__ = ["Supervisor", "restart_delay", "reserve_port"]

log = logging.getLogger(__name__)

_STARTUP_TIMEOUT = 60.0
_ASK_TIMEOUT = 10.0
_SETTLED_AFTER = 10.0  # a worker that ran this long had a good life: its backoff starts over


def restart_delay(early_deaths: int) -> float:
    """Seconds before restarting a worker that died after `early_deaths` deaths in a row, each
    within _SETTLED_AFTER of its start. Pure."""
    return min(30.0, 0.25 * 2 ** early_deaths)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT and never listening: it holds the port (and
    tells an OS-chosen one) while the workers bind the same port and do listen."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError("listen", f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError("listen", f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


class Worker:
    def __init__(self, index: int, socket_path: str) -> None:
        self.index = index
        self.socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.early_deaths = 0
        self.restarts = 0
        self.session: aiohttp.ClientSession | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.proc.pid if self.proc else None, "running": self.running,
                "restarts": self.restarts}

    async def ask(self, method: str, path: str) -> tuple[int, bytes] | None:
        """One request to the worker's private admin listener; None when it cannot answer."""
        if not self.running or self.session is None:
            return None
        try:
            async with self.session.request(method, f"http://worker{path}") as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None


SUPERVISOR: web.AppKey["Supervisor"] = web.AppKey("supervisor")


class Supervisor:
    def __init__(self, config: "Config", run_args: Sequence[str], loader: Callable[[], "Config"]) -> None:
        self.config = config
        self.run_args = list(run_args)
        self.loader = loader
        self.workers: list[Worker] = []
        self.stopping = False
        self.admin_port = 0
        self.registry = CollectorRegistry()
        Gauge("sge_proxy_workers", "Worker processes running.", registry=self.registry).set_function(
            lambda: sum(w.running for w in self.workers))
        self._restarts = Counter("sge_proxy_worker_restarts", "Workers restarted after dying.",
                                 registry=self.registry)
        self._monitors: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._listen = ""

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        host, port = self.config.listen_addr
        reserved = reserve_port(host, port)
        port = reserved.getsockname()[1]
        self._listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sockdir = tempfile.mkdtemp(prefix="sge-proxy-")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self.workers = [Worker(i, os.path.join(sockdir, f"w{i}.sock")) for i in range(self.config.workers)]
        try:
            for w in self.workers:
                await self._spawn(w)
            failed = await self._wait_up(stop)
            if failed is not None:
                rc = failed.proc.returncode if failed.proc else None
                log.error("worker %d %s while starting: stopping", failed.index,
                          "did not come up" if rc is None else f"exited with {rc}")
                await self._shutdown()
                return rc if rc is not None and rc > 0 else 1
            if stop.is_set():
                return await self._shutdown()
            await self._start_admin()
            self._monitors = [loop.create_task(self._monitor(w), name=f"worker-{w.index}") for w in self.workers]
            log.info("listening on %s:%d (%s), admin on %s:%d, upstream %s, workers %d",
                     host, port, "https" if self.config.tls.enabled else "http", self.config.admin_addr[0],
                     self.admin_port, self.config.default_target(), len(self.workers))
            await stop.wait()
            log.info("shutting down: SIGTERM to %d workers, each drains (at most %.0fs)",
                     sum(w.running for w in self.workers), self.config.drain_timeout)
            return await self._shutdown()
        finally:
            self.stopping = True
            for w in self.workers:
                if w.running:
                    w.proc.kill()  # type: ignore[union-attr]
                if w.session is not None:
                    await w.session.close()
            if self._runner is not None:
                await self._runner.cleanup()
            reserved.close()
            shutil.rmtree(sockdir, ignore_errors=True)

    async def _spawn(self, w: Worker) -> None:
        try:
            os.unlink(w.socket_path)
        except FileNotFoundError:
            pass
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "run", *self.run_args,
            "--listen", self._listen, "--worker", f"{w.index}:{w.socket_path}", stdin=asyncio.subprocess.DEVNULL)
        w.started = time.monotonic()
        if w.session is None:
            w.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(w.socket_path, force_close=True),
                timeout=aiohttp.ClientTimeout(total=_ASK_TIMEOUT))

    async def _wait_up(self, stop: asyncio.Event) -> Worker | None:
        """Until every worker's admin socket answers (it listens and has its chain loaded).
        Returns a worker that died meanwhile, if one did."""
        pending = list(self.workers)
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while pending and not stop.is_set():
            for w in list(pending):
                if not w.running:
                    return w
                if os.path.exists(w.socket_path) and await w.ask("GET", "/healthz") is not None:
                    pending.remove(w)
            if time.monotonic() > deadline:
                return pending[0] if pending else None
            if pending:
                await asyncio.sleep(0.05)
        return None

    async def _monitor(self, w: Worker) -> None:
        """Restart the worker whenever it dies, backing off while it keeps dying young."""
        while True:
            assert w.proc is not None
            rc = await w.proc.wait()
            if self.stopping:
                return
            w.early_deaths = w.early_deaths + 1 if time.monotonic() - w.started < _SETTLED_AFTER else 0
            delay = restart_delay(w.early_deaths)
            log.error("worker %d (pid %d) exited with %s; restarting it in %.2fs", w.index, w.proc.pid, rc, delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            w.restarts += 1
            self._restarts.inc()
            await self._spawn(w)

    async def _shutdown(self) -> int:
        self.stopping = True
        for t in self._monitors:
            t.cancel()
        await asyncio.gather(*self._monitors, return_exceptions=True)
        for w in self.workers:
            if w.running:
                w.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.config.drain_timeout + 10.0
        clean = True
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                rc = await asyncio.wait_for(w.proc.wait(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                log.error("worker %d (pid %d) did not stop in time: killing it", w.index, w.proc.pid)
                w.proc.kill()
                rc = await w.proc.wait()
            clean = clean and rc == 0
        log.info("stopped%s", "" if clean else " (a worker did not stop cleanly)")
        return 0 if clean else 1

    # ------------------------------------------------------------------ reload
    def _on_hup(self) -> None:
        for w in self.workers:
            if w.running:
                w.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        self._refresh_config()

    def _refresh_config(self) -> None:
        """The supervisor's own copy of the configuration (its /config), as the workers reload it."""
        try:
            self.config = keep_running(self.loader(), self.config, ())
        except ConfigError as e:
            log.error("reload: %s", e)

    async def reload(self) -> tuple[int, dict[str, Any]]:
        """POST /reload: every running worker reloads; their outcomes, and the first failure's
        status when one refused."""
        answers = await asyncio.gather(*(w.ask("POST", "/reload") for w in self.workers))
        status, out, restart = 200, [], set()
        error = None
        for w, answer in zip(self.workers, answers):
            if answer is None:  # a worker being restarted reads the new file as it starts
                item: dict[str, Any] = {"status": "no answer" if w.running else "not running"}
                if w.running and status == 200:
                    status, error = 502, f"worker {w.index} did not answer"
            else:
                code, body = answer
                item = json.loads(body)
                if code != 200 and status == 200:
                    status, error = code, item.get("error")
                restart.update(item.get("restart_needed", ()))
            out.append({"worker": w.index, **item})
        if status == 200:
            self._refresh_config()
        body: dict[str, Any] = {"status": "reloaded" if status == 200 else "refused", "workers": out}
        if error is not None:
            body["error"] = error
        if restart:
            body["restart_needed"] = sorted(restart)
        return status, body

    # ------------------------------------------------------------------ admin listener
    async def _start_admin(self) -> None:
        app = web.Application()
        app[SUPERVISOR] = self
        app.router.add_get("/metrics", _metrics)
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/readyz", _readyz)
        app.router.add_get("/upstreams", _upstreams)
        app.router.add_get("/workers", _workers)
        app.router.add_get("/config", _config)
        app.router.add_post("/reload", _reload)
        host, port = self.config.admin_addr
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError("admin_listen", f"cannot listen on {host}:{port}: {e.strerror}") from None
        self.admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _metrics(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    answers = await asyncio.gather(*(w.ask("GET", "/metrics") for w in sup.workers))
    texts = [a[1].decode() for a in answers if a is not None and a[0] == 200]
    texts.append(generate_latest(sup.registry).decode())
    return web.Response(body=aggregate(texts), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    return web.json_response({"status": "ok", "workers": sum(w.running for w in sup.workers)})


async def _readyz(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    answers = await asyncio.gather(*(w.ask("GET", "/readyz") for w in sup.workers))
    checks = []
    for w, a in zip(sup.workers, answers):
        item: dict[str, Any] = {"worker": w.index, "pid": w.proc.pid if w.proc else None}
        if a is None:
            item["status"] = "not running" if not w.running else "no answer"
        else:
            item.update(json.loads(a[1]))
        checks.append((a is not None and a[0] == 200, item))
    ready = all(ok for ok, _ in checks)
    return web.json_response({"status": "ready" if ready else "not ready", "workers": [i for _, i in checks]},
                             status=200 if ready else 503)


async def _upstreams(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    answers = await asyncio.gather(*(w.ask("GET", "/upstreams") for w in sup.workers))
    return web.json_response({"workers": [
        {"worker": w.index, **(json.loads(a[1]) if a is not None and a[0] == 200 else {"status": "no answer"})}
        for w, a in zip(sup.workers, answers)]})


async def _workers(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    return web.json_response({"listen": sup._listen, "workers": [w.describe() for w in sup.workers]})


async def _config(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    return web.Response(text=json.dumps(redacted_config(sup.config), indent=2, default=str),
                        content_type="application/json")


async def _reload(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    status, body = await asyncio.shield(sup.reload())
    return web.json_response(body, status=status)
