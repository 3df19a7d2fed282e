"""Per-user concurrency and per-user/per-tenant rate limits, right after auth.

Concurrency: at most `concurrency` requests of one user at once (Stalwart's own
maxConcurrentRequests is 4, and it refuses the fifth with a `limit` problem), then up to `queue`
waiting for at most `queue_timeout`, then 429. The slot is released by `flow.on_done`: when the
response is fully sent, the failure answered, or the client gone. Long-lived routes (event
source, websocket) do not take a slot. Slots are counted in this process.

Rate: token buckets per user (and per tenant when `tenant.rate` is set; per client IP for
requests without an identity), in this process (`backend: memory`) or shared by every replica
through Redis (`backend: redis`). A refusal is 429 with Retry-After computed from the bucket.
Redis down: `on_redis_error: open` lets requests through (counted), `closed` answers 503.

Keys: the identity's subject (anonymous requests: the client IP), and the tenant. Metrics never
carry either.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from proxy.errors import ConfigError, ProxyError, TooManyRequests
from proxy.jmap import refuse_ws_message
from proxy.ratelimit import Admission, Decision, Limit, MemoryBuckets, Slots, parse_rate

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow
    from proxy.redisstore import RedisBuckets

__all__ = ["RateLimit", "RateLimitOptions", "BucketOptions", "RedisOptions", "LimitsUnavailable"]

log = logging.getLogger(__name__)


class LimitsUnavailable(ProxyError):
    """The shared limit store cannot be reached and the configuration says fail closed."""
    status, code, title = 503, "limits_unavailable", "Service Unavailable"


@dataclass(frozen=True, kw_only=True)
class BucketOptions:
    """A token bucket: `rate` like '1000/min', '20/s' or '5/10s' (off when unset); at most `burst`
    requests at once (default: the rate's count)."""
    rate: str | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        parsed = parse_rate(self.rate)
        if self.burst is not None and self.burst < 1:
            raise ConfigError("burst", "must be at least 1")
        if parsed is not None and self.burst is None and parsed[0] < 1:
            raise ConfigError("burst", "give a burst of at least 1 (the rate's count is below 1)")

    def limit(self, name: str) -> Limit | None:
        parsed = parse_rate(self.rate)
        if parsed is None:
            return None
        count, period = parsed
        return Limit(name, count / period, float(self.burst if self.burst is not None else count))


@dataclass(frozen=True, kw_only=True)
class UserBucketOptions(BucketOptions):
    """Stalwart's authenticated limit: 1000 requests a minute per account."""
    rate: str | None = "1000/min"
    burst: int | None = 100


@dataclass(frozen=True, kw_only=True)
class AnonymousBucketOptions(BucketOptions):
    """Stalwart's anonymous limit: 100 requests a minute per IP."""
    rate: str | None = "100/min"
    burst: int | None = 20


@dataclass(frozen=True, kw_only=True)
class RedisOptions:
    url: str = "redis://127.0.0.1:6379/0"
    timeout: float = field(default=0.05, metadata={"kind": "duration"})
    key_prefix: str = "sge:rl:"
    retry_interval: float = field(default=1.0, metadata={"kind": "duration"})
    max_connections: int = 32

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("url", "expected a redis://, rediss:// or unix:// URL")
        if self.timeout <= 0:
            raise ConfigError("timeout", "must be positive")
        if self.max_connections < 1:
            raise ConfigError("max_connections", "must be at least 1")

    def __repr__(self) -> str:  # the URL may hold a password
        return f"RedisOptions(timeout={self.timeout}, key_prefix={self.key_prefix!r})"


@dataclass(frozen=True, kw_only=True)
class RateLimitOptions:
    """addons.rate_limit."""
    backend: Literal["memory", "redis"] = "memory"
    on_redis_error: Literal["open", "closed"] = "open"
    concurrency: int = 4                      # per user; 0: off
    queue: int = 8                            # waiting per user once `concurrency` are running
    queue_timeout: float = field(default=2.0, metadata={"kind": "duration"})
    unlimited_routes: tuple[str, ...] = ("eventsource", "websocket")  # take no concurrency slot
    user: UserBucketOptions = field(default_factory=UserBucketOptions)
    tenant: BucketOptions = field(default_factory=BucketOptions)
    anonymous: AnonymousBucketOptions = field(default_factory=AnonymousBucketOptions)
    headers: bool = False                     # X-RateLimit-Limit/-Remaining/-Reset on answers
    redis: RedisOptions = field(default_factory=RedisOptions)

    def __post_init__(self) -> None:
        if self.concurrency < 0 or self.queue < 0:
            raise ConfigError("concurrency", "concurrency and queue must not be negative")


_RESULTS = ("allowed", "limited", "queued", "failed_open", "failed_closed")
_LIMITS = ("user", "tenant", "anonymous", "concurrency")


class RateLimit:
    """The limits addon (security: an unexpected error fails closed)."""

    name = "rate_limit"
    security = True
    Options = RateLimitOptions

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._opts = RateLimitOptions()
        self._user: Limit | None = None
        self._tenant: Limit | None = None
        self._anon: Limit | None = None
        self._memory = MemoryBuckets()
        self._redis: RedisBuckets | None = None
        self._slots: Slots | None = None
        self._unlimited: frozenset[str] = frozenset()
        self._decisions: dict[tuple[str, str], Any] = {}
        self._allowed_user: Any = None
        self._backend_errors: Any = None

    # ------------------------------------------------------------------ lifecycle
    def load(self, loader: "Loader") -> None:
        self._audit = loader.audit
        opts: RateLimitOptions = loader.options
        self._opts = opts
        self._user = opts.user.limit("user")
        self._tenant = opts.tenant.limit("tenant")
        self._anon = opts.anonymous.limit("anonymous")
        self._slots = Slots(opts.concurrency, opts.queue) if opts.concurrency else None
        self._unlimited = frozenset(opts.unlimited_routes)
        if not opts.headers:
            self.responseheaders = None  # type: ignore[assignment]  # nothing to add: no hook
        if opts.backend == "redis":
            try:
                from proxy.redisstore import RedisBuckets
            except ImportError as e:
                raise ConfigError("addons.rate_limit.backend", f"the redis backend needs the redis package ({e})",
                                  source=loader.config.source) from None
            r = opts.redis
            try:
                self._redis = RedisBuckets(r.url, timeout=r.timeout, prefix=r.key_prefix,
                                           retry_interval=r.retry_interval, max_connections=r.max_connections)
            except ValueError as e:  # the URL's message never includes its password
                raise ConfigError("addons.rate_limit.redis.url", str(e), source=loader.config.source) from None
        m = loader.metrics
        decisions = m.counter("sge_proxy_ratelimit_decisions_total",
                              "Limit decisions by limit and result.", ("limit", "result"))
        self._decisions = {(lim, res): decisions.labels(lim, res) for lim in _LIMITS for res in _RESULTS}
        self._allowed_user = self._decisions[("user", "allowed")]
        self._backend_errors = m.counter("sge_proxy_ratelimit_backend_errors_total",
                                         "Rate-limit store failures by kind.", ("kind",))
        slots = self._slots
        m.gauge("sge_proxy_ratelimit_queue_length",
                "Requests waiting for a concurrency slot.").set_function(
            lambda: slots.queued_total if slots is not None else 0)
        m.gauge("sge_proxy_ratelimit_concurrent_requests",
                "Concurrency slots held.").set_function(lambda: slots.held_total if slots is not None else 0)

    async def done(self) -> None:
        if self._redis is not None:
            await self._redis.close()

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: "Flow") -> Any:
        """Checks the buckets, then takes a concurrency slot. Returns a coroutine only when it has
        to wait (Redis, or the queue): the in-process path costs no task switch."""
        ident = flow.identity
        if ident is not None:
            who = "u:" + ident.subject
            user = self._user
            if (user is not None and self._redis is None and not self._opts.headers
                    and (self._tenant is None or not ident.tenant)):
                # one in-process bucket and no headers to report: only the yes matters
                if self._memory.try_take(who, user, self._clock()):
                    self._allowed_user.inc()
                    return self._admit(flow, who)
        else:
            who = "ip:" + flow.client_addr
        return self._charge(flow, who, admit=True)

    def websocket_message(self, flow: "Flow") -> Any:
        """Each message a WebSocket client sends takes a token from the same buckets as a
        request; over the limit it is answered with a RequestError (429, `limit`) and not
        forwarded (JMAP over WebSocket, RFC 8887). No concurrency slot: the session holds none."""
        msg = flow.websocket.messages[-1]  # type: ignore[union-attr]
        if not msg.from_client or msg.dropped:
            return None
        who = "u:" + flow.identity.subject if flow.identity is not None else "ip:" + flow.client_addr
        try:
            waiting = self._charge(flow, who, admit=False)
        except ProxyError as e:
            refuse_ws_message(flow, e)
            return None
        return None if waiting is None else self._ws_waiting(flow, waiting)

    async def _ws_waiting(self, flow: "Flow", waiting: Any) -> None:
        try:
            await waiting
        except ProxyError as e:
            refuse_ws_message(flow, e)

    def _charge(self, flow: "Flow", who: str, *, admit: bool) -> Any:
        """Take from the flow's buckets (raises the 429), then, with `admit`, a concurrency slot.
        A coroutine when it has to wait (Redis, or the queue)."""
        ident = flow.identity
        if ident is not None:
            keys, limits = [], []
            if self._user is not None:
                keys.append(who)
                limits.append(self._user)
            if self._tenant is not None and ident.tenant:
                keys.append("t:" + ident.tenant)
                limits.append(self._tenant)
        else:
            keys, limits = ([who], [self._anon]) if self._anon is not None else ([], [])
        if limits:
            if self._redis is not None:
                return self._checked_redis(flow, who, keys, limits, admit)
            self._judge(flow, self._memory.take(keys, limits, self._clock()), limits)
        return self._admit(flow, who) if admit else None

    def responseheaders(self, flow: "Flow") -> None:
        """With `headers` on only (else `load` leaves this instance without the hook)."""
        if self._opts.headers and flow.response is not None:
            d = flow.metadata.get("rate_limit")
            if d is not None:
                flow.response.headers.update(d.headers())

    # ------------------------------------------------------------------ buckets
    async def _checked_redis(self, flow: "Flow", who: str, keys: list[str], limits: list[Limit],
                             admit: bool = True) -> None:
        from proxy.redisstore import StoreUnavailable
        assert self._redis is not None
        try:
            d = await self._redis.take([self._redis.prefix + k for k in keys], limits)
        except StoreUnavailable as e:
            self._backend_errors.labels(e.kind).inc()
            if e.kind != "down":
                log.warning("rate-limit store unavailable (%s); failing %s for %s", e,
                            self._opts.on_redis_error, flow.id)
            if self._opts.on_redis_error == "closed":
                for lim in limits:
                    self._decisions[(lim.name, "failed_closed")].inc()
                self._audit("rate_limit.unavailable", flow, kind=e.kind)
                retry = str(max(1, math.ceil(self._redis.retry_interval)))
                raise LimitsUnavailable("Request limits cannot be checked right now.",
                                        headers={"Retry-After": retry}) from None
            for lim in limits:
                self._decisions[(lim.name, "failed_open")].inc()
        else:
            self._judge(flow, d, limits)
        waiting = self._admit(flow, who) if admit else None
        if waiting is not None:
            await waiting

    def _judge(self, flow: "Flow", d: Decision, limits: list[Limit]) -> None:
        if d.allowed:
            for lim in limits:
                self._decisions[(lim.name, "allowed")].inc()
            if self._opts.headers:
                flow.metadata["rate_limit"] = d
            return
        self._decisions[(d.limit, "limited")].inc()
        self._audit("rate_limit.limited", flow, limit=d.limit)
        headers = {"Retry-After": d.retry_after_header}
        if self._opts.headers:
            headers.update(d.headers())
        raise TooManyRequests(_DETAIL[d.limit], headers=headers, extra={"limit": d.limit})

    # ------------------------------------------------------------------ concurrency
    def _admit(self, flow: "Flow", key: str) -> Any:
        slots = self._slots
        if slots is None or flow.route in self._unlimited:
            return None
        if slots.try_acquire(key):
            self._decisions[("concurrency", "allowed")].inc()
            flow.on_done(functools.partial(self._release, key))
            return None
        fut = asyncio.get_running_loop().create_future()
        adm = slots.acquire(key, fut)
        if adm is Admission.GRANTED:
            self._decisions[("concurrency", "allowed")].inc()
            flow.on_done(functools.partial(self._release, key))
            return None
        if adm is Admission.REFUSED:
            self._refuse_concurrency(flow)
        return self._queued(flow, key, fut)

    async def _queued(self, flow: "Flow", key: str, fut: asyncio.Future) -> None:
        slots = self._slots
        assert slots is not None
        granted = False
        try:
            async with asyncio.timeout(self._opts.queue_timeout):
                await fut
            granted = True
        except TimeoutError:
            pass
        finally:
            if not granted and not slots.abandon(key, fut) and fut.done() and not fut.cancelled():
                self._release(key)  # a slot was passed to us as we gave up: pass it on
        if not granted:
            self._refuse_concurrency(flow)
        self._decisions[("concurrency", "queued")].inc()
        flow.on_done(functools.partial(self._release, key))

    def _release(self, key: str, _flow: Any = None) -> None:
        """Give `key`'s slot back (to the next waiter, if any). Also an on_done callback (the flow)."""
        slots = self._slots
        assert slots is not None
        while True:
            w = slots.release(key)
            if w is None:
                return
            if not w.done():  # else that waiter already gave up: the slot goes to the next
                w.set_result(None)
                return

    def _refuse_concurrency(self, flow: "Flow") -> None:
        self._decisions[("concurrency", "limited")].inc()
        self._audit("rate_limit.limited", flow, limit="concurrency")
        raise TooManyRequests("Too many concurrent requests for this user.", headers={"Retry-After": "1"},
                              extra={"limit": "concurrency"})


_DETAIL = {
    "user": "Too many requests for this user.",
    "tenant": "Too many requests for this tenant.",
    "anonymous": "Too many requests from this address.",
}
