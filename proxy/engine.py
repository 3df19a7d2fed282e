"""The engine: builds the pieces from a Config, runs the listeners, drains on shutdown.

It holds the addon chain, the upstream pool and the listeners; nothing else.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .accesslog import AccessLog
from .addonmanager import AddonManager, resolve_spec
from .errors import ConfigError
from .http1 import TrustedProxies
from .metrics import Metrics
from .reload import Generation, ReloadResult, keep_running, plan_reload
from .rotation import CertificateRotator, FileCertSource, PkiCertSource, SecretCertSource
from .secrets import CachedSource, FileSecretSource
from .health import UpstreamHealth
from .server import HttpProtocol
from .audit import AuditLog
from .websocket import RESTART
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


def check_routing(config: "Config") -> None:
    """A routing mode other than official needs the resolver in the chain: without it every flow
    would silently go to stalwart.url."""
    s = config.stalwart
    if s.routing_mode != "official" and config.chain is not None and not any(
            e.strip() in ("resolver", builtin_addons()["resolver"]) for e in config.chain):
        raise ConfigError("stalwart.routing_mode", f"{s.routing_mode!r} routing needs the resolver addon "
                          "in the chain", source=config.source)


class Engine:
    def __init__(self, config: "Config", *, metrics: Metrics | None = None,
                 addon_files: tuple[str, ...] = (),
                 config_loader: Callable[[], "Config"] | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.addons = AddonManager(config, self.metrics)
        s = config.stalwart
        check_routing(config)
        # reload: the configuration as loaded (before an OS-chosen port is filled in) and how to
        # load it again (the CLI re-reads --config, the environment and the flags)
        self.loaded_config = config
        self.config_loader = config_loader or (lambda: self.loaded_config)
        self.worker: int | None = None  # index under a --workers supervisor: shares the port
        self.default_target = config.default_target()
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
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
        # health checks, outlier ejection and circuit breakers per upstream server, through
        # whichever pool is current (docs/reliability.md)
        self.health = UpstreamHealth(lambda *a, **kw: self.pool.fetch(*a, **kw), lambda: self.config,
                                     self.metrics)
        self.generation = Generation(0, self.addons, self.pool)
        self._retiring: dict[Generation, asyncio.Task | None] = {}
        self._reload_lock = asyncio.Lock()
        self._reloads = self.metrics.counter("sge_proxy_config_reloads_total",
                                             "Configuration reloads (SIGHUP, POST /reload) by result.", ("result",))
        self.access_log = AccessLog(config.access_log)
        self.audit = AuditLog(config.audit_log)
        self.addons.audit = self.audit
        self.health.audit = self.audit
        if self.rotator is not None:
            self.rotator.audit = self.audit
        self.connections: set[HttpProtocol] = set()
        conns = self.metrics.gauge("sge_proxy_client_connections", "Open client connections by protocol "
                                   "(HTTP/2: connections; its streams are sge_proxy_http2_streams).", ("protocol",))
        conns.labels("http/1.1").set_function(lambda: self._count_connections(False))
        conns.labels("h2").set_function(lambda: self._count_connections(True))
        self.metrics.gauge("sge_proxy_http2_streams", "HTTP/2 streams in progress.").set_function(
            lambda: sum(len(getattr(c, "streams", ())) for c in list(self.connections)))
        self.in_flight = 0
        self.draining = False
        self.servers: list[asyncio.AbstractServer] = []
        self.mail_servers: dict[str, Any] = {}  # "imap" / "submission" / "sieve" -> proxy.mail.MailServer
        self._addon_files = addon_files
        self._sweep_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ setup
    async def load_addons(self, manager: AddonManager | None = None) -> None:
        """Load the chain its config names into `manager` (the running one by default)."""
        mgr = manager or self.addons
        config = mgr.config
        chain = config.chain if config.chain is not None else tuple(default_chain())
        builtins = builtin_addons()
        for entry in (*chain, *config.addon_files, *self._addon_files):
            await mgr.add_spec(resolve_spec(entry, builtins))

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
            ssl_ctx = server_context(cert=cert, key=key, min_version=self.config.tls.min_version,
                                     http2=self.config.tls.http2)
        scheme = "https" if ssl_ctx else "http"
        loop = asyncio.get_running_loop()
        try:
            # not serving (not even listen()ing) until the chain is loaded: no request may run on
            # half a chain; workers share the port (SO_REUSEPORT)
            server = await loop.create_server(lambda: HttpProtocol(self, scheme), host, port, ssl=ssl_ctx,
                                              backlog=1024, reuse_address=True,
                                              reuse_port=self.worker is not None, start_serving=False)
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
        try:
            await self._start_mail()
        except BaseException:
            server.close()
            await self.stop_secrets()
            raise
        await server.start_serving()
        self.access_log.start()
        self.audit.start()
        self.addons.watch_files(self.config.addon_reload_interval)
        self.health.start(self.default_target)
        self._sweep_task = loop.create_task(self._sweep(), name="connection-sweeper")
        await self.addons.running()

    async def _start_mail(self) -> None:
        """The IMAP, SMTP submission and ManageSieve listeners, when configured (proxy.mail)."""
        import importlib
        for module, cls, opts in (("imap", "ImapServer", self.config.mail.imap),
                                  ("smtp", "SubmissionServer", self.config.mail.submission),
                                  ("sieve", "SieveServer", self.config.mail.sieve)):
            if opts.listen is not None:
                srv = getattr(importlib.import_module(f"proxy.{module}"), cls)(self, opts)
                await srv.start()
                self.mail_servers[srv.protocol] = srv

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
    @property
    def upstream_ok(self) -> float | None:
        """When the default target last answered a health check below 500 (wall clock), if ever."""
        return self.health.answered_at(self.default_target)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        fresh = self.upstream_ok is not None  # answered once: ready (failover and 503s are ours to give)
        checks["upstream"] = ("ok" if self.health.usable(self.default_target) else "failing: see /upstreams") \
            if fresh else "no answer yet"
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
        if self.upstream_ok is not None and not self.health.usable(self.default_target):
            out.append("upstream")
        return out

    # ------------------------------------------------------------------ per request
    def log_access(self, flow: "Flow", status: int, elapsed: float) -> None:
        if not self.access_log.enabled:
            return
        req = flow.request
        up = flow.upstream_ms
        ident = flow.identity
        err = flow.error
        record = {
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
        }
        if flow.trace_id is not None:
            record["trace_id"] = flow.trace_id
        if self.worker is not None:
            record["worker"] = self.worker
        self.access_log.write(record)

    def _count_connections(self, h2: bool) -> int:
        """Client connections of one protocol, at scrape time (an HTTP/2 stream's own HttpProtocol
        is part of its connection, not one of its own)."""
        n = 0
        for c in list(self.connections):
            if hasattr(c, "streams"):
                n += h2
            elif not h2 and not getattr(c.transport, "h2_stream", False):
                n += 1
        return n

    async def reload(self) -> ReloadResult:
        """SIGHUP and POST /reload: re-read the configuration, build and load a whole new chain
        (and upstream pool when stalwart.* changed) next to the running one, swap it in for new
        requests; in-flight ones finish on the old chain, which is then retired. Anything that
        fails leaves the running configuration and chain untouched."""
        async with self._reload_lock:
            try:
                result = await self._reload()
            except Exception as e:  # a bug of ours, or an addon's: refused all the same
                log.exception("reload failed")
                result = ReloadResult.refused(500, f"{type(e).__name__}: {e}")
        self._reloads.labels("ok" if result.ok else "failed").inc()
        if result.ok:
            self.audit.event("config.reloaded", generation=result.generation, changed=list(result.changed),
                             restart_needed=list(result.restart_needed) or None)
        else:
            self.audit.event("config.reload_refused", status=result.status, detail=result.error)
        if result.ok:
            log.info("configuration reloaded (generation %d): changed [%s]", result.generation,
                     ", ".join(result.changed))
            if result.restart_needed:
                log.warning("reload: %s changed but needs a restart; the running value stays",
                            ", ".join(result.restart_needed))
        else:
            log.error("reload refused, the running configuration stays: %s", result.error)
        return result

    async def _reload(self) -> ReloadResult:
        if self.draining:
            return ReloadResult.refused(503, "The proxy is shutting down.")
        try:
            loaded = self.config_loader()
            check_routing(loaded)
            plan = plan_reload(self.loaded_config, loaded, cert_files=self.config.certificates.source == "files")
            config = keep_running(loaded, self.config, plan.restart_needed)
        except ConfigError as e:
            return ReloadResult.refused(422, str(e))
        s = config.stalwart
        tls, rotator, pool = self.tls, self.rotator, self.pool
        if plan.new_tls:
            try:
                tls = ClientTLS.from_files(cert=config.resolve(s.client_cert), key=config.resolve(s.client_key),
                                           ca=config.resolve(s.ca_cert), min_version=s.tls_min_version,
                                           verify_hostname=s.verify_hostname)
                rotator = build_rotator(config, tls, self.secrets, self.metrics)
            except ConfigError as e:
                return ReloadResult.refused(422, str(e))
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                return ReloadResult.refused(422, f"config error: stalwart.client_cert: {e}")
        if plan.new_pool:
            pool = UpstreamPool(tls, s, self.metrics)
        mgr = AddonManager(config, self.metrics)
        mgr.secrets = self.secrets
        mgr.audit = self.audit
        mgr.fetcher = pool.fetch
        try:
            await self.load_addons(mgr)
            await mgr.running()
            if self.draining:
                raise ConfigError("reload", "the proxy began shutting down")
        except BaseException as e:
            await mgr.done()
            if pool is not self.pool:
                await pool.close()
            if isinstance(e, ConfigError):
                return ReloadResult.refused(503 if self.draining else 422, str(e))
            raise
        # the swap: no await from here to the end of it, so a request sees all old or all new
        old = self.generation
        self.generation = Generation(old.number + 1, mgr, pool)
        self.addons, self.pool, self.config = mgr, pool, config
        self.loaded_config = keep_running(loaded, self.loaded_config, plan.restart_needed)
        self.default_target = config.default_target()
        self.jmap_path = s.jmap_path
        self.health.set_default(self.default_target)
        old_rotator = self.rotator
        self.tls, self.rotator = tls, rotator
        if rotator is not None:
            rotator.audit = self.audit
        # end of the swap
        logging.getLogger().setLevel(getattr(logging, config.log_level.upper(), logging.INFO))
        mgr.watch_files(config.addon_reload_interval)
        self._retiring[old] = asyncio.get_running_loop().create_task(self._retire(old), name="chain-retire")
        if plan.new_tls:
            if old_rotator is not None:
                await old_rotator.stop()
            if tls.info is not None:
                self.metrics.cert_expiry.set(tls.info.not_after)
            if rotator is not None:
                rotator.start()
        return ReloadResult(True, 200, changed=plan.changed, restart_needed=plan.restart_needed,
                            generation=self.generation.number)

    async def _retire(self, old: Generation) -> None:
        """Once the requests on an old chain are done (bounded by drain_timeout), run its addons'
        `done` and close its pool if nothing uses it any more."""
        deadline = time.monotonic() + self.config.drain_timeout
        for c in list(self.connections):  # WebSocket sessions would keep the old chain for hours
            if c._ws is not None and c._gen is old:
                c._ws.shutdown(RESTART, "The proxy's configuration changed; reconnect.")
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if old.in_flight:
            log.warning("chain generation %d still has %d requests after drain_timeout; retiring it anyway",
                        old.number, old.in_flight)
        self._retiring[old] = None  # from here on the retirement runs to its end, even in stop()
        await self._finish(old)

    async def _finish(self, old: Generation) -> None:
        await old.addons.done()
        self._retiring.pop(old, None)
        if old.pool is not self.pool and all(g.pool is not old.pool for g in self._retiring):
            await old.pool.close()
        log.info("chain generation %d retired", old.number)

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
        mail = [asyncio.ensure_future(m.stop(drain_timeout)) for m in self.mail_servers.values()]
        deadline = time.monotonic() + drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        clean = self.in_flight == 0
        if not clean:
            log.warning("drain timeout: %d requests still in flight, closing", self.in_flight)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        if mail:
            await asyncio.gather(*mail, return_exceptions=True)
        await self.health.stop()
        for g, t in list(self._retiring.items()):  # chains a reload replaced: their requests are done too
            if t is not None:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
                await self._finish(g)
        await self.addons.done()
        await self.stop_secrets()
        await self.pool.close()
        await self.access_log.close()
        await self.audit.close()
        for s in self.servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        return clean
