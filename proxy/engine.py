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
from .rotation import CertificateRotator, FileCertSource, PkiCertSource, SecretCertSource
from .secrets import CachedSource, FileSecretSource
from .server import HttpProtocol
from .tls import ClientTLS, server_context
from .upstream import UpstreamPool

if TYPE_CHECKING:
    from .config import Config
    from .flow import Flow

__all__ = ["Engine", "builtin_addons", "build_secret_source", "build_rotator"]

log = logging.getLogger(__name__)


def builtin_addons() -> dict[str, str]:
    from addons import BUILTIN
    return BUILTIN


def build_secret_source(config: "Config", metrics: Metrics) -> CachedSource:
    """The configured SecretSource (no I/O yet: Vault is logged in to by start())."""
    o = config.secrets
    if o.backend == "vault":
        from .vault import VaultSecretSource
        return VaultSecretSource(o.vault, ttl=60.0 if o.cache_ttl is None else o.cache_ttl,
                                 negative_ttl=o.negative_ttl, retry_interval=o.retry_interval, metrics=metrics,
                                 resolve=config.resolve)
    return FileSecretSource(file=config.resolve(o.file), directory=config.resolve(o.dir),
                            ttl=1.0 if o.cache_ttl is None else o.cache_ttl,
                            negative_ttl=min(o.negative_ttl, 1.0), retry_interval=min(o.retry_interval, 1.0),
                            metrics=metrics)


def build_rotator(config: "Config", tls: ClientTLS, secrets: CachedSource,
                  metrics: Metrics) -> CertificateRotator | None:
    """The client-certificate rotator for certificates.source; None when there is no client
    certificate to keep (files source without stalwart.client_cert)."""
    c, s = config.certificates, config.stalwart
    server_ca = config.resolve(s.ca_cert)
    source: Any
    if c.source == "files":
        cert, key = config.resolve(s.client_cert), config.resolve(s.client_key)
        if cert is None or key is None:
            return None
        source = FileCertSource(cert, key, server_ca)
    elif c.source == "vault-kv":
        source = SecretCertSource(secrets, c.path, c.kv_keys)
    else:
        from .vault import VaultSecretSource
        if not isinstance(secrets, VaultSecretSource):
            raise ConfigError("certificates.source", "vault-pki needs secrets.backend: vault", source=config.source)
        source = PkiCertSource(secrets, role=c.pki_role or "", common_name=c.common_name, ttl=c.ttl,
                               mount=c.pki_mount)
    # the CA a new certificate must chain to: certificates.client_ca, else stalwart.ca_cert, else
    # (Vault sources without either) the CA that came with the first certificate
    anchor_file = config.resolve(c.client_ca) or server_ca
    return CertificateRotator(tls, source, anchor_file=anchor_file, server_ca=server_ca, min_version=s.tls_min_version,
                              verify_hostname=s.verify_hostname, interval=c.refresh_interval, metrics=metrics)


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
        if s.routing_mode != "official" and config.chain is not None and not any(
                e.strip() in ("resolver", builtin_addons()["resolver"]) for e in config.chain):
            # without the resolver every flow would silently go to stalwart.url
            raise ConfigError("stalwart.routing_mode", f"{s.routing_mode!r} routing needs the resolver addon "
                              "in the chain", source=config.source)
        self.default_target = config.default_target()
        self.jmap_path = s.jmap_path
        self.secrets = build_secret_source(config, self.metrics)
        self.addons.secrets = self.secrets
        if config.certificates.source == "files":
            self.tls = ClientTLS.from_files(cert=config.resolve(s.client_cert), key=config.resolve(s.client_key),
                                            ca=config.resolve(s.ca_cert), min_version=s.tls_min_version,
                                            verify_hostname=s.verify_hostname)
        else:  # loaded from Vault in start()
            self.tls = ClientTLS(None, None)
        if self.tls.info is not None:
            self.metrics.cert_expiry.set(self.tls.info.not_after)
        self.rotator = build_rotator(config, self.tls, self.secrets, self.metrics)
        self._secrets_task: asyncio.Task | None = None
        self.metrics.gauge("sge_proxy_degraded", "1 while the proxy runs on fallbacks: cached secrets, or a "
                           "client certificate that failed to rotate.").set_function(
            lambda: 1.0 if self.degraded() else 0.0)
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

    async def start_secrets(self) -> None:
        """Log in to the secret backend and load a Vault-held client certificate before anything
        can need them; start the refresh loops."""
        start = getattr(self.secrets, "start", None)
        if start is not None:
            await start()
        if self.rotator is not None:
            if self.tls.info is None:  # vault-kv / vault-pki: no certificate until the first good one
                result = await self.rotator.check(force=True)
                if result != "rotated":
                    await self.stop_secrets()
                    raise ConfigError("certificates.source", f"no usable client certificate from "
                                      f"{self.config.certificates.source}: {self.rotator.last_error}",
                                      source=self.config.source)
            self.rotator.start()
        self._secrets_task = asyncio.get_running_loop().create_task(self._secrets_loop(), name="secrets-refresh")

    async def _secrets_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.secrets.refresh_interval)
            refresh = getattr(self.secrets, "refresh", None)
            if refresh is not None:
                try:
                    await refresh()
                except Exception:
                    log.exception("secret refresh failed")

    async def stop_secrets(self) -> None:
        if self._secrets_task is not None:
            self._secrets_task.cancel()
            await asyncio.gather(self._secrets_task, return_exceptions=True)
            self._secrets_task = None
        if self.rotator is not None:
            await self.rotator.stop()
        await self.secrets.close()

    async def start(self) -> None:
        """Bind the proxy listener, then load the chain (admin is separate: see admin.py)."""
        await self.start_secrets()
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
            await self.stop_secrets()
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
            await self.stop_secrets()
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
        st = self.secrets.status()
        checks["secrets"] = "ok" if st.healthy else f"degraded: {st.detail}"
        if st.stale_paths:
            checks["secrets_stale_paths"] = st.stale_paths
        if self.rotator is not None:
            err = self.rotator.last_error
            checks["client_cert_rotation"] = "ok" if err is None else f"failed: {err}"
        return fresh and cert_ok and not self.draining, checks

    def degraded(self) -> list[str]:
        """What is running on fallbacks: a secret source serving cached values, a client
        certificate that could not be rotated. Ready but degraded."""
        out = []
        if not self.secrets.status().healthy:
            out.append("secrets")
        if self.rotator is not None and self.rotator.last_error is not None:
            out.append("client_cert_rotation")
        return out

    # ------------------------------------------------------------------ per request
    def log_access(self, flow: "Flow", status: int, elapsed: float) -> None:
        if not self.access_log.enabled:
            return
        req = flow.request
        up = flow.upstream_ms
        ident = flow.identity
        err = flow.error
        self.access_log.write({
            "ts": int(time.time() * 1000) / 1000,
            "request_id": flow.id,
            "client": flow.client_addr,
            "method": req.method,
            "path": req.path,
            "route": flow.route,
            "status": status,
            "upstream": flow.upstream.name if up is not None and flow.upstream is not None else None,
            "duration_ms": int(elapsed * 1e6) / 1000,  # (round() is slow: dtoa)
            "upstream_ms": int(up * 1000) / 1000 if up is not None else None,
            "bytes_in": flow.bytes_in,
            "bytes_out": flow.bytes_out,
            "user": ident.subject if ident is not None else None,
            "error": getattr(err, "code", None) if err is not None else None,
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
        await self.stop_secrets()
        await self.pool.close()
        await self.access_log.close()
        for s in self.servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        return clean
