"""The engine: builds the pieces from a Config, runs the listeners, drains on shutdown.

It holds the addon chain, the upstream pool and the listeners; nothing else.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .accesslog import AccessLog
from .addonmanager import AddonManager, resolve_spec
from .errors import ConfigError
from .metrics import Metrics
from .server import HttpProtocol
from .tls import ClientTLS, server_context
from .upstream import UpstreamPool

if TYPE_CHECKING:
    from .config import Config
    from .flow import Flow

__all__ = ["Engine", "builtin_addons"]

log = logging.getLogger(__name__)


def builtin_addons() -> dict[str, str]:
    from addons import BUILTIN
    return BUILTIN


def default_chain() -> list[str]:
    from addons import DEFAULT_CHAIN
    return list(DEFAULT_CHAIN)


class Engine:
    def __init__(self, config: "Config", *, metrics: Metrics | None = None,
                 addon_files: tuple[str, ...] = ()) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.addons = AddonManager(config, self.metrics)
        s = config.stalwart
        if s.routing_mode != "official":
            raise ConfigError("stalwart.routing_mode",
                              f"{s.routing_mode!r} routing is not available in this version; use 'official'",
                              source=config.source)
        self.default_target = config.default_target()
        self.jmap_path = s.jmap_path
        self.tls = ClientTLS.from_files(cert=config.resolve(s.client_cert), key=config.resolve(s.client_key),
                                        ca=config.resolve(s.ca_cert), min_version=s.tls_min_version,
                                        verify_hostname=s.verify_hostname)
        if self.tls.info is not None:
            self.metrics.cert_expiry.set(self.tls.info.not_after)
        self.pool = UpstreamPool(self.tls, s, self.metrics)
        self.addons.fetcher = self.pool.fetch
        self.access_log = AccessLog(config.access_log)
        self.connections: set[HttpProtocol] = set()
        self.in_flight = 0
        self.draining = False
        self.servers: list[asyncio.AbstractServer] = []
        self.upstream_ok: float | None = None  # when an upstream last answered a probe
        self._addon_files = addon_files
        self._probe_task: asyncio.Task | None = None
        self._sweep_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ setup
    async def load_addons(self) -> None:
        chain = self.config.chain if self.config.chain is not None else tuple(default_chain())
        builtins = builtin_addons()
        for entry in (*chain, *self.config.addon_files, *self._addon_files):
            await self.addons.add_spec(resolve_spec(entry, builtins))

    async def start(self) -> None:
        """Bind the proxy listener, then load the chain (admin is separate: see admin.py)."""
        host, port = self.config.listen_addr
        ssl_ctx = None
        if self.config.tls.enabled:
            cert = self.config.resolve(self.config.tls.cert or Path("certs-dev/server.crt"))
            key = self.config.resolve(self.config.tls.key or Path("certs-dev/server.key"))
            assert cert is not None and key is not None
            ssl_ctx = server_context(cert=cert, key=key, min_version=self.config.tls.min_version)
        scheme = "https" if ssl_ctx else "http"
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: HttpProtocol(self, scheme), host, port, ssl=ssl_ctx,
                                              backlog=1024, reuse_address=True)
        except OSError as e:
            raise ConfigError("listen", f"cannot listen on {host}:{port}: {e.strerror}") from None
        self.servers.append(server)
        if port == 0:  # an OS-chosen port: make the config (public_base) say which
            import dataclasses
            actual = server.sockets[0].getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            self.config = dataclasses.replace(self.config, listen=f"{shown}:{actual}")
            self.addons.config = self.config
        try:
            await self.load_addons()
        except BaseException:
            server.close()
            raise
        self.access_log.start()
        self.addons.watch_files(self.config.addon_reload_interval)
        self._probe_task = loop.create_task(self._probe_loop(), name="upstream-probe")
        self._sweep_task = loop.create_task(self._sweep(), name="connection-sweeper")
        await self.addons.running()

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        """Close client connections idle past limits.keepalive_timeout, or slower than
        limits.header_timeout to send a request head (checked a few times a second)."""
        limits = self.config.limits
        interval = max(0.05, min(0.5, limits.header_timeout / 4, limits.keepalive_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for c in list(self.connections):
                c.expire(now)

    # ------------------------------------------------------------------ readiness
    async def probe(self) -> bool:
        """One readiness probe of the default target: any HTTP answer below 500 counts."""
        s = self.config.stalwart
        try:
            resp = await self.pool.fetch(self.default_target, "GET", s.health_path, cap=64 << 10)
        except Exception as e:
            log.info("upstream probe of %s failed: %s", self.default_target, e)
            return False
        if resp.status < 500:
            self.upstream_ok = time.time()
            return True
        log.info("upstream probe of %s answered %d", self.default_target, resp.status)
        return False

    async def _probe_loop(self) -> None:
        interval = self.config.stalwart.health_interval
        while True:
            ok = await self.probe()
            await asyncio.sleep(interval if ok else min(interval, 2.0))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        fresh = self.upstream_ok is not None
        checks["upstream"] = "ok" if fresh else "no answer yet"
        if self.default_target.tls:
            checks["client_cert"] = "ok" if self.tls.usable() else (
                "expired" if self.tls.info is not None else "not loaded")
            cert_ok = self.tls.usable()
        else:
            checks["client_cert"] = "not used (plain http upstream)"
            cert_ok = True
        if self.draining:
            checks["draining"] = True
        return fresh and cert_ok and not self.draining, checks

    # ------------------------------------------------------------------ per request
    def log_access(self, flow: "Flow", status: int, elapsed: float) -> None:
        if not self.access_log.enabled:
            return
        req = flow.request
        self.access_log.write({
            "ts": round(time.time(), 3),
            "request_id": flow.id,
            "client": flow.client_addr,
            "method": req.method,
            "path": req.path,
            "route": flow.route,
            "status": status,
            "upstream": flow.upstream.name if flow.upstream is not None and flow.upstream_ms is not None else None,
            "duration_ms": round(elapsed * 1000, 3),
            "upstream_ms": round(flow.upstream_ms, 3) if flow.upstream_ms is not None else None,
            "bytes_in": flow.bytes_in,
            "bytes_out": flow.bytes_out,
            "user": flow.identity.subject if flow.identity is not None else None,
            "error": getattr(flow.error, "code", None) if flow.error is not None else None,
        })

    async def reload(self) -> None:
        """SIGHUP: reload file addons and every addon that has a `reload()` (policies, keys)."""
        import inspect
        await self.addons.check_files()
        for a in self.addons.addons:
            fn = getattr(a, "reload", None)
            if fn is None:
                continue
            try:
                r = fn()
                if inspect.isawaitable(r):
                    await r
            except Exception:
                log.exception("reload of %s failed; it keeps its previous state", type(a).__name__)

    # ------------------------------------------------------------------ shutdown
    async def stop(self, drain_timeout: float | None = None) -> bool:
        """Stop accepting, let in-flight requests finish (bounded), close everything.
        Returns True when every in-flight request finished in time."""
        drain_timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        self.draining = True
        for s in self.servers:
            s.close()
        for c in list(self.connections):
            c.close_if_idle()
        deadline = time.monotonic() + drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        clean = self.in_flight == 0
        if not clean:
            log.warning("drain timeout: %d requests still in flight, closing", self.in_flight)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        for t in (self._probe_task, self._sweep_task):
            if t is not None:
                t.cancel()
        await self.addons.done()
        await self.pool.close()
        await self.access_log.close()
        for s in self.servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        return clean
