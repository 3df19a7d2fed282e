"""Which mail server a flow goes to: the routing decision, its cache, server URL validation and the
data-residency rule. Sans-IO: the resolver addon (addons/resolver.py) does the secret reads.

Modes (stalwart.routing_mode, or the resolver's `mode` option):
  official  every flow goes to stalwart.url (target name `official`)
  tenant    identity.tenant -> secret `stalwart/tenants/{tenant}` (target name `tenant:{tenant}`)
  region    identity.region, else the tenant's region from the `tenant_regions` option, else
            stalwart.default_region -> secret `stalwart/regions/{region}` (`region:{region}`)
  custom    a user class answers `resolve_server(identity, operation)` (`custom:{host}`)

A route's secret holds `server_url` (one URL, a comma-separated list or a list: the first is the
primary, the rest fallbacks), optionally `fallback_urls` (more fallbacks), `region` (where the
servers are) and `fallback_region` (where the fallbacks are, when elsewhere).
"""
from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Literal, Mapping, get_args

from .cache import TTLCache
from .errors import ConfigError, Forbidden, NoUpstream
from .identity import Identity
from .target import Target, parse_target

__all__ = ["Mode", "MODES", "UrlRules", "Server", "Route", "Lookup", "NoRoute", "InvalidRoute",
           "RoutingUnavailable", "ResidencyRefused", "lookup_for", "home_region", "server_urls",
           "validate_server", "route_from_secret", "route_from_urls", "apply_residency",
           "DecisionCache", "Refused", "TENANT_PATH", "REGION_PATH"]

Mode = Literal["official", "tenant", "region", "custom"]
MODES: tuple[str, ...] = get_args(Mode)
_HOST_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as proxy.tokens accepts tenants and regions
TENANT_PATH = "stalwart/tenants/{tenant}"
REGION_PATH = "stalwart/regions/{region}"


# ---------------------------------------------------------------------------- errors
class NoRoute(Forbidden):
    """No mail server is configured for this tenant or region (or the user has no tenant). 403,
    not 404: the request is well-formed, this user may just not send it anywhere."""
    code = "no_route"
    result = "unknown"

    def again(self) -> "NoRoute":
        """A fresh copy to raise from the negative cache."""
        return NoRoute(self.detail)


class InvalidRoute(NoUpstream):
    """The configured server URL failed validation (a poisoned or broken secret). 503; the reason
    is for the log only."""
    code = "invalid_route"
    result = "invalid"

    def __init__(self, reason: str) -> None:
        super().__init__("The mail server for this account is not configured correctly.")
        self.reason = reason

    def again(self) -> "InvalidRoute":
        return InvalidRoute(self.reason)


class RoutingUnavailable(NoUpstream):
    """The secret source cannot be asked and nothing is cached. 503."""
    code = "routing_unavailable"
    result = "unavailable"

    def __init__(self, detail: str = "The mail server directory is unavailable; try again later.") -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class ResidencyRefused(Forbidden):
    """Strict data residency: the route would take the user out of their region. 403."""
    code = "residency_refused"
    result = "residency"

    def __init__(self, reason: str) -> None:
        super().__init__("This request would leave your data region; it was refused.")
        self.reason = reason


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True, slots=True)
class UrlRules:
    """What a server URL must satisfy (stalwart.allow_insecure, stalwart.allowed_hosts)."""
    allow_insecure: bool = False
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Server:
    target: Target
    region: str | None = None  # where it is, when declared


@dataclass(frozen=True, slots=True)
class Route:
    """The servers of one route, primary first."""
    servers: tuple[Server, ...]

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("a route needs at least one server")

    @property
    def primary(self) -> Server:
        return self.servers[0]

    @property
    def fallbacks(self) -> tuple[Server, ...]:
        return self.servers[1:]


@dataclass(frozen=True, slots=True)
class Lookup:
    """What to read for a flow: the cache key, the secret path, and the route's name."""
    kind: str           # "tenant" | "region"
    name: str           # the tenant or region
    path: str           # the secret path

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    @property
    def target_name(self) -> str:
        return f"{self.kind}:{self.name}"


# ---------------------------------------------------------------------------- decisions
def home_region(identity: Identity, mode: str, *, tenant_regions: Mapping[str, str],
                default_region: str, strict: bool) -> str | None:
    """The region the user's data lives in: the region claim, else the tenant's mapped region,
    else (region mode only) default_region. Strict: a claim that disagrees with the tenant's
    mapped region is refused. Pure."""
    claimed = identity.region
    mapped = tenant_regions.get(identity.tenant) if identity.tenant is not None else None
    if strict and claimed is not None and mapped is not None and claimed != mapped:
        raise ResidencyRefused(f"user region {claimed!r} differs from tenant {identity.tenant!r}'s region {mapped!r}")
    home = claimed or mapped
    if home is None and mode == "region":
        home = default_region
    return home


def _plain(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and ".." not in name


def lookup_for(identity: Identity, mode: str, *, home: str | None,
               tenant_path: str = TENANT_PATH, region_path: str = REGION_PATH) -> Lookup:
    """The secret to read for tenant and region routing. A name that is not plain (it would
    become part of a secret path and a metric label) has no route. Pure."""
    if mode == "tenant":
        if identity.tenant is None:
            raise NoRoute("No mail server for this account: it belongs to no tenant.")
        if not _plain(identity.tenant):
            raise NoRoute("No mail server for this tenant.")
        return Lookup("tenant", identity.tenant, tenant_path.format(tenant=identity.tenant))
    if mode == "region":
        assert home is not None  # home_region always has one in region mode
        if not _plain(home):
            raise NoRoute("No mail server for this region.")
        return Lookup("region", home, region_path.format(region=home))
    raise ValueError(f"mode {mode!r} reads no secret")


def server_urls(value: Any, key: str) -> tuple[str, ...]:
    """A secret value -> URLs: one URL, a comma-separated list, or a list of strings. Pure."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise InvalidRoute(f"{key} is neither a URL, a comma-separated list nor a list of URLs")
    return tuple(u.strip() for u in items if u.strip())


def validate_server(url: str, rules: UrlRules, name: str, key: str = "server_url") -> Target:
    """A checked Target, or InvalidRoute: https only (unless allow_insecure), no credentials,
    query or fragment, host in the allow-list. Pure."""
    try:
        t = parse_target(url, key=key, allow_insecure=rules.allow_insecure,
                         allowed_hosts=rules.allowed_hosts, name=name)
    except ConfigError as e:
        raise InvalidRoute(f"{name}: {e.reason}") from None
    if not _HOST_RE.match(t.host):
        try:
            ipaddress.ip_address(t.host)
        except ValueError:
            raise InvalidRoute(f"{name}: {key}: {t.host!r} is not a host name") from None
    return t


def _region_name(value: Any, key: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRoute(f"{key} is not a string")
    return value.strip()


def route_from_secret(data: Mapping[str, Any], lookup: Lookup, rules: UrlRules, *,
                      default_region: str | None = None) -> Route:
    """The route a tenant's or region's secret describes. `default_region` is the servers'
    region when the secret declares none (region routes: the region itself). A missing
    server_url is NoRoute; any bad URL makes the whole route InvalidRoute. Pure."""
    name = lookup.target_name
    primary = server_urls(data.get("server_url"), f"{name} server_url")
    if not primary:
        raise NoRoute(f"No mail server for this {lookup.kind}.")
    extra = server_urls(data.get("fallback_urls"), f"{name} fallback_urls")
    region = _region_name(data.get("region"), f"{name} region") or default_region
    fb_region = _region_name(data.get("fallback_region"), f"{name} fallback_region") or region
    servers = [Server(validate_server(primary[0], rules, name), region)]
    for i, url in enumerate((*primary[1:], *extra)):
        servers.append(Server(validate_server(url, rules, name, key=f"fallback {i + 1}"), fb_region))
    return Route(tuple(servers))


def route_from_urls(value: Any, rules: UrlRules) -> Route:
    """A custom resolver's answer (a URL or a list of URLs) -> Route; each target is named
    `custom:{host}`. Nothing -> NoRoute. Pure."""
    if isinstance(value, str):
        urls: tuple[str, ...] = (value.strip(),) if value.strip() else ()
    else:
        urls = server_urls(value, "custom resolver answer")
    if not urls:
        raise NoRoute("No mail server for this account.")
    servers = []
    for url in urls:
        t = validate_server(url, rules, "custom")
        servers.append(Server(Target(t.scheme, t.host, t.port, t.base_path, f"custom:{t.host}")))
    return Route(tuple(servers))


def apply_residency(route: Route, home: str | None) -> tuple[Route, tuple[Server, ...]]:
    """Strict residency: the primary must be in `home` (a server with no declared region is not
    proven to be, so it is refused too); fallbacks elsewhere are dropped, never failed over to.
    Returns the route to use and the fallbacks dropped. No home region: nothing to hold to. Pure."""
    if home is None:
        return route, ()
    p = route.primary
    if p.region != home:
        where = p.region if p.region is not None else "an undeclared region"
        raise ResidencyRefused(f"{p.target.name} is in {where}, the user's region is {home!r}")
    dropped = tuple(s for s in route.fallbacks if s.region != home)
    if not dropped:
        return route, ()
    return Route(tuple(s for s in route.servers if s is p or s.region == home)), dropped


# ---------------------------------------------------------------------------- the cache
Refused = NoRoute | InvalidRoute


class DecisionCache(TTLCache[Hashable, "Route | Refused"]):
    """Routing decisions by key: a Route for `positive_ttl`, a refusal (NoRoute or InvalidRoute;
    raise its `again()`) for `negative_ttl`, at most `size` entries (least recently used go first).
    An expired Route stays readable through `stale()` until evicted, for when the secret source is
    down; an expired refusal is dropped. `clock` is injected. Sans-IO."""

    def __init__(self, size: int = 10_000, positive_ttl: float = 600.0, negative_ttl: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(size, positive_ttl, clock, keep_expired=True)
        self.positive_ttl, self.negative_ttl = positive_ttl, negative_ttl

    def get(self, key: Hashable) -> Route | Refused | None:
        value = super().get(key)
        if value is None and not isinstance(self.peek(key), Route):
            self.pop(key)  # an expired refusal serves no stale read
        return value

    def stale(self, key: Hashable) -> Route | None:
        value = self.peek(key)
        return value if isinstance(value, Route) else None

    def put(self, key: Hashable, value: Route | Refused, ttl: float | None = None) -> None:
        if ttl is None:
            ttl = self.positive_ttl if isinstance(value, Route) else self.negative_ttl
        super().put(key, value, ttl)
