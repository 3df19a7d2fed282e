"""The admin listener: /metrics, /healthz, /readyz, /upstreams, /config. Never on the hot path."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["AdminServer", "redacted_config"]

ENGINE_KEY: web.AppKey["Engine"] = web.AppKey("engine")
_SECRET_WORDS = ("secret", "password", "token", "key")


def redacted_config(obj: Any) -> Any:
    """The config as JSON-able data with anything that looks secret replaced. Pure."""
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            ks = str(k).lower()
            if any(w in ks for w in _SECRET_WORDS) and not ks.endswith(("_file", "_path", "key_id", "kid")) \
                    and isinstance(v, (str, bytes)):
                out[k] = "***"
            else:
                out[k] = redacted_config(v)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [redacted_config(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


async def _metrics(request: web.Request) -> web.Response:
    eng = request.app[ENGINE_KEY]
    return web.Response(body=generate_latest(eng.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    eng = request.app[ENGINE_KEY]
    ready, checks = eng.readiness()
    degraded = eng.degraded()
    return web.json_response({"status": "ready" if ready else "not ready", "degraded": bool(degraded),
                              "checks": checks}, status=200 if ready else 503)


async def _upstreams(request: web.Request) -> web.Response:
    eng = request.app[ENGINE_KEY]
    return web.json_response({"default": str(eng.default_target), "pool": eng.pool.stats(),
                              "last_probe_ok": eng.upstream_ok, "servers": eng.health.snapshot()})


async def _reload(request: web.Request) -> web.Response:
    """POST /reload: what SIGHUP does, answered with the outcome (422 for a bad configuration,
    500 for an addon that failed to load otherwise; the running configuration stays)."""
    eng = request.app[ENGINE_KEY]
    result = await asyncio.shield(eng.reload())  # a client that hangs up does not stop it half-way
    return web.json_response(result.to_json(), status=result.status)


async def _config(request: web.Request) -> web.Response:
    eng = request.app[ENGINE_KEY]
    return web.Response(text=json.dumps(redacted_config(eng.config), indent=2, default=str),
                        content_type="application/json")


class AdminServer:
    """On admin_listen; or, for a worker under a --workers supervisor, on a private unix socket
    the supervisor asks (its own admin listener aggregates: proxy/workers.py)."""

    def __init__(self, engine: "Engine", *, unix_path: str | None = None) -> None:
        self.engine = engine
        self.unix_path = unix_path
        app = web.Application()
        app[ENGINE_KEY] = engine
        app.router.add_get("/metrics", _metrics)
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/readyz", _readyz)
        app.router.add_get("/upstreams", _upstreams)
        app.router.add_get("/config", _config)
        app.router.add_post("/reload", _reload)
        self.app = app
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        host, port = self.engine.config.admin_addr
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        if self.unix_path is not None:
            await web.UnixSite(self._runner, self.unix_path).start()
            return
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as e:
            from .errors import ConfigError
            raise ConfigError("admin_listen", f"cannot listen on {host}:{port}: {e.strerror}") from None
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
