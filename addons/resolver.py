"""The resolver: picks the mail server for each flow (proxy.routing holds the rules).

It runs in `requestheaders`, right after policy and before the JMAP guard, which fetches the
user's session from flow.upstream. It sets flow.upstream to the route's primary server and puts
the route's fallbacks (Targets) in flow.metadata["routing.fallbacks"]; the engine fails over to
them when the primary is unhealthy, ejected or unreachable (proxy/health.py, docs/reliability.md).

Answers of its own:
- 403 `no_route`: the user's tenant (or region) has no server configured, or, in tenant mode, the
  user belongs to no tenant. A 403 rather than a 404 or 503: the request is fine and the proxy is
  healthy; this user has nowhere to send it, and retrying will not help.
- 503 `invalid_route`: the configured server URL fails validation (not https, credentials in it,
  host outside stalwart.allowed_hosts, garbage); it is logged and never used.
- 503 `routing_unavailable`: the secret source cannot be read and nothing is cached.
- 403 `residency_refused` (residency: strict): the route would leave the user's region; on the
  audit log (proxy.audit) as `routing.residency_refused`; a fallback left out for residency as
  `routing.fallback_dropped` (once per route, fallback and region until the next reload).

Flows without an identity (public paths, `auth.required: false`) keep the default target,
stalwart.url.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Literal

from proxy.cache import SingleFlight
from proxy.errors import ConfigError, ProxyError
from proxy.routing import (MODES, REGION_PATH, TENANT_PATH, DecisionCache, InvalidRoute, Lookup, Mode,
                           NoRoute, ResidencyRefused, Route, RoutingUnavailable, UrlRules, apply_residency,
                           home_region, lookup_for, route_from_secret, route_from_urls)
from proxy.secrets import FileSecretSource, SecretError, SecretNotFound

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow
    from proxy.identity import Identity
    from proxy.secrets import SecretSource

__all__ = ["Resolver", "ResolverOptions", "load_custom", "FALLBACKS"]

log = logging.getLogger(__name__)

FALLBACKS = "routing.fallbacks"  # flow.metadata key: the route's fallback Targets, in order


def load_custom(spec: str, base_dir: Path) -> Any:
    """A custom resolver object from `module:Class`, `file.py` (its `resolver` attribute) or
    `file.py:Class`; a class is instantiated without arguments. It must have `resolve_server`."""
    ref, attr = spec, "resolver"
    if ".py:" in spec:
        ref, attr = spec.rsplit(":", 1)
    if ref.endswith(".py"):
        path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
        name = f"sge_custom_resolver_{abs(hash(str(path)))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None or not path.exists():
            raise ConfigError("addons.resolver.custom", f"cannot load {path}: no such file")
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = mod
        try:
            mod_spec.loader.exec_module(mod)
        except Exception as e:
            raise ConfigError("addons.resolver.custom", f"{path} failed to load: {type(e).__name__}: {e}") from None
        finally:
            sys.modules.pop(name, None)
    else:
        mod_name, sep, attr = spec.partition(":")
        if not sep:
            raise ConfigError("addons.resolver.custom", f"expected module:Class or a .py file, got {spec!r}")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ConfigError("addons.resolver.custom", f"cannot import {mod_name}: {e}") from None
    obj = getattr(mod, attr, None)
    if obj is None:
        raise ConfigError("addons.resolver.custom", f"{ref} has no {attr!r}")
    if inspect.isclass(obj):
        obj = obj()
    if not callable(getattr(obj, "resolve_server", None)):
        raise ConfigError("addons.resolver.custom", f"{spec}: the resolver has no resolve_server(identity, operation)")
    return obj


@dataclass(frozen=True, kw_only=True)
class ResolverOptions:
    """[addons.resolver]

    mode: overrides stalwart.routing_mode (official, tenant, region, custom).
    tenant_path / region_path: the secret path of a tenant's / a region's route.
    tenant_regions: tenant -> region. Region routing uses it for users without a region claim;
      strict residency refuses a user whose region claim differs from their tenant's region, and
      takes it as a tenant route's region when the route declares none.
    residency: off, or strict (tenant and region modes): never route a user outside their region.
    custom: the custom resolver, `module:Class`, `file.py` (its `resolver`) or `file.py:Class`.
    positive_ttl / negative_ttl / cache_size: the decision cache (per tenant, region, or in custom
      mode per user and operation).
    """
    mode: Mode | None = None
    tenant_path: str = TENANT_PATH
    region_path: str = REGION_PATH
    tenant_regions: dict[str, str] = field(default_factory=dict)
    residency: Literal["off", "strict"] = "off"
    custom: str | None = None
    positive_ttl: float = field(default=600.0, metadata={"kind": "duration"})
    negative_ttl: float = field(default=30.0, metadata={"kind": "duration"})
    cache_size: int = 10_000

    def __post_init__(self) -> None:
        if "{tenant}" not in self.tenant_path:
            raise ConfigError("tenant_path", "must contain {tenant}")
        if "{region}" not in self.region_path:
            raise ConfigError("region_path", "must contain {region}")
        if self.cache_size < 1:
            raise ConfigError("cache_size", "must be at least 1")


class Resolver:
    name = "resolver"
    security = True
    Options = ResolverOptions

    def __init__(self, secrets: "SecretSource | None" = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._secrets = secrets
        self._clock = clock
        self._opts = ResolverOptions()
        self._mode = "official"
        self._strict = False
        self._rules = UrlRules()
        self._default_region = "us-east-1"
        self._custom: Any = None
        self._cache = DecisionCache(clock=clock)
        self._inflight: SingleFlight[Hashable, Route] = SingleFlight("resolver")
        self._audited: set[tuple] = set()

    @property
    def custom(self) -> Any:
        """The loaded custom resolver object (custom mode), else None."""
        return self._custom

    async def load(self, loader: "Loader") -> None:
        self._audit = loader.audit
        opts: ResolverOptions = loader.options or ResolverOptions()
        s = loader.config.stalwart
        mode = opts.mode or s.routing_mode
        assert mode in MODES
        if opts.residency == "strict" and mode not in ("tenant", "region"):
            raise ConfigError("addons.resolver.residency", f"strict residency needs tenant or region routing, "
                              f"not {mode!r}", source=loader.config.source)
        if mode in ("tenant", "region"):
            if self._secrets is None:
                try:
                    self._secrets = loader.secrets
                except RuntimeError:  # no engine attached one (an embedding without secrets)
                    pass
            src = self._secrets
            if src is None or (isinstance(src, FileSecretSource) and src.file is None and src.directory is None):
                raise ConfigError("addons.resolver", f"{mode} routing reads server URLs from the secret source: "
                                  "set secrets.file or secrets.dir, or secrets.backend: vault",
                                  source=loader.config.source)
        if mode == "custom":
            if not opts.custom:
                raise ConfigError("addons.resolver.custom", "custom routing needs the resolver class "
                                  "(module:Class or a .py file)", source=loader.config.source)
            self._custom = load_custom(opts.custom, loader.base_dir)
            setup = getattr(self._custom, "load", None)
            if setup is not None:
                r = setup(loader)
                if inspect.isawaitable(r):
                    await r
        self._opts, self._mode, self._strict = opts, mode, opts.residency == "strict"
        self._rules = UrlRules(s.allow_insecure, s.allowed_hosts)
        self._default_region = s.default_region
        self._cache = DecisionCache(opts.cache_size, opts.positive_ttl, opts.negative_ttl, self._clock)
        m = loader.metrics
        self._decisions = m.counter("sge_proxy_routing_decisions_total", "Routing decisions by result.",
                                    ("mode", "result"))
        self._lookups = m.counter("sge_proxy_routing_cache_total", "Routing decision cache look-ups.",
                                  ("result",))
        self._residency = m.counter("sge_proxy_routing_residency_refused_total",
                                    "Routes refused by strict data residency.", ("mode", "what"))
        self._ok = self._decisions.labels(mode, "ok")
        self._hit = self._lookups.labels("hit")
        if mode == "official":
            self.requestheaders = None  # type: ignore[assignment]  # nothing to decide: no hook at all

    def reload(self) -> None:
        """SIGHUP: forget every decision, so changed routes apply now."""
        self._cache.clear()
        self._audited.clear()

    def done(self) -> None:
        self._inflight.cancel()
        self._cache.clear()

    # ------------------------------------------------------------------ the hook
    def requestheaders(self, flow: "Flow") -> Any:
        """Sets flow.upstream (and the fallbacks) or refuses. Returns a coroutine only when the
        decision is not cached (a secret read, or the custom resolver)."""
        ident = flow.identity
        if ident is None:
            return None
        home: str | None = None
        try:
            if self._mode == "custom":
                key: Hashable = ("custom", ident.subject, flow.route)
                make: Callable[[], Any] = lambda: self._ask_custom(ident, flow.route)
            else:
                home = home_region(ident, self._mode, tenant_regions=self._opts.tenant_regions,
                                   default_region=self._default_region, strict=self._strict)
                lookup = lookup_for(ident, self._mode, home=home, tenant_path=self._opts.tenant_path,
                                    region_path=self._opts.region_path)
                key = lookup.key
                make = lambda: self._read(lookup)
            hit = self._cache.get(key)
            if hit is None:
                return self._deciding(flow, ident, home, key, make)
            self._hit.inc()
            if not isinstance(hit, Route):
                raise hit.again()
            self._apply(flow, ident, home, hit)
        except ProxyError as e:
            self._count_refusal(flow, ident, e)
            raise
        return None

    async def _deciding(self, flow: "Flow", ident: "Identity", home: str | None, key: Hashable,
                        make: Callable[[], Any]) -> None:
        try:
            # shared by concurrent misses; a client that goes away does not cancel the others' decision
            route = await self._inflight.run(key, make, label=str(key[0]),  # type: ignore[index]
                                             on_join=lambda join: self._lookups.labels(join).inc())
            self._apply(flow, ident, home, route)
        except ProxyError as e:
            self._count_refusal(flow, ident, e)
            raise

    def _apply(self, flow: "Flow", ident: "Identity", home: str | None, route: Route) -> None:
        if self._strict:
            route, dropped = apply_residency(route, home)
            if dropped:
                self._audit_dropped(flow, ident, home, dropped)
        flow.upstream = route.primary.target
        flow.metadata[FALLBACKS] = tuple(s.target for s in route.fallbacks)
        self._ok.inc()

    def _count_refusal(self, flow: "Flow", ident: "Identity", e: ProxyError) -> None:
        if isinstance(e, ResidencyRefused):
            self._residency.labels(self._mode, "route").inc()
            self._decisions.labels(self._mode, e.result).inc()
            self._audit("routing.residency_refused", flow, detail=e.reason)
        elif isinstance(e, (NoRoute, InvalidRoute, RoutingUnavailable)):
            self._decisions.labels(self._mode, e.result).inc()
        else:
            self._decisions.labels(self._mode, "refused").inc()

    def _audit_dropped(self, flow: "Flow", ident: "Identity", home: str | None, dropped: tuple) -> None:
        """Counted per request; audited once per (route, fallback, region) until the next reload
        (a route's cross-region fallback is a fact of its configuration, not of one request)."""
        self._residency.labels(self._mode, "fallback").inc(len(dropped))
        for s in dropped:
            key = (s.target.name, s.target.key, s.region, home)
            if key in self._audited:
                continue
            if len(self._audited) >= self._opts.cache_size:
                self._audited.clear()
            self._audited.add(key)
            self._audit("routing.fallback_dropped", flow, region=home, route=s.target.name,
                        fallback=s.target.authority, fallback_region=s.region)

    # ------------------------------------------------------------------ decisions
    async def _read(self, lookup: Lookup) -> Route:
        assert self._secrets is not None
        key = lookup.key
        try:
            data = await self._secrets.read(lookup.path)
        except SecretNotFound:
            refusal = NoRoute(f"No mail server for this {lookup.kind}.")
            self._cache.put(key, refusal)
            raise refusal from None
        except SecretError as e:  # unavailable (or anything else the source could not do)
            stale = self._cache.stale(key)
            if stale is not None:
                self._lookups.labels("stale").inc()
                log.warning("routing %s: secret source unavailable (%s); using the expired decision",
                            lookup.target_name, e)
                return stale
            log.error("routing %s: secret source unavailable and nothing cached: %s", lookup.target_name, e)
            raise RoutingUnavailable() from None
        default_region = lookup.name if lookup.kind == "region" else self._opts.tenant_regions.get(lookup.name)
        return self._remember(key, lambda: route_from_secret(data, lookup, self._rules, default_region=default_region),
                              f"{lookup.target_name}: refusing the configured server")

    async def _ask_custom(self, ident: "Identity", operation: str) -> Route:
        try:
            answer = self._custom.resolve_server(ident, operation)
            if inspect.isawaitable(answer):
                answer = await answer
        except ProxyError:
            raise
        except Exception:
            log.exception("custom resolver failed for operation %s", operation)
            err = RoutingUnavailable("The mail server directory failed; try again later.")
            err.result = "error"  # type: ignore[misc]
            raise err from None
        return self._remember(("custom", ident.subject, operation), lambda: route_from_urls(answer, self._rules),
                              "custom: refusing the resolver's server")

    def _remember(self, key: Hashable, build: Callable[[], Route], refusing: str) -> Route:
        """The route `build` makes, or its refusal (NoRoute, InvalidRoute: logged), cached either way."""
        try:
            route = build()
        except InvalidRoute as e:
            log.error("routing %s: %s", refusing, e.reason)
            self._cache.put(key, e)
            raise
        except NoRoute as e:
            self._cache.put(key, e)
            raise
        self._cache.put(key, route)
        return route
