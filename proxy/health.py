"""Active health checks and the per-server failure state (proxy/breaker.py) of every upstream the
proxy knows: the default target from the start, any other on first use (a route's primary or
fallback), at most breaker.max_targets at once; a server unused for breaker.forget_after is
forgotten (the default target never is).

One task per known server GETs stalwart.health_path (Stalwart's /healthz/ready) through the
upstream pool every stalwart.health_interval (every 2 s at most until it is healthy): the expected
status (stalwart.health_status) within stalwart.health_timeout passes, anything else fails. The
default target is checked at once; another server first 0.5-1 interval after its first use.

`pick()` is on the request path: which server of a route takes the request (docs/reliability.md).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from .breaker import Circuit, CircuitOpen, Failure, ServerState
from .errors import BadGateway, ProxyError, UpstreamTimeout
from .upstream import NotSent, RequestBodyFailed

if TYPE_CHECKING:
    from .config import Config
    from .flow import Response
    from .metrics import Metrics
    from .target import Target

__all__ = ["UpstreamHealth", "FALLBACKS", "failure_kind"]

log = logging.getLogger(__name__)

FALLBACKS = "routing.fallbacks"  # flow.metadata: the route's fallback Targets, in order (the resolver's)
_UNHEALTHY_INTERVAL = 2.0  # an unhealthy server is checked at least this often
_CHECK_CAP = 64 << 10


def failure_kind(err: ProxyError) -> Failure | None:
    """How an exchange error counts against the server: CONNECT when the request never left,
    RESPONSE when it was sent, None when the server is not to blame (the pool's own limit, a
    client's failed request body, a response too large to buffer). Pure."""
    if isinstance(err, NotSent):
        return Failure.CONNECT
    if isinstance(err, RequestBodyFailed):
        return None
    if isinstance(err, (BadGateway, UpstreamTimeout)):
        return Failure.RESPONSE
    return None


class _Probe:
    """What the health check of one server last saw."""

    __slots__ = ("target", "task", "at", "status", "error", "answered_at")

    def __init__(self, target: "Target") -> None:
        self.target = target
        self.task: asyncio.Task | None = None
        self.at: float | None = None           # wall clock of the last check
        self.status: int | None = None
        self.error: str | None = None
        self.answered_at: float | None = None  # wall clock of the last answer below 500


class UpstreamHealth:
    """`fetch` is the pool's buffered side request; `settings()` the running Config (read anew,
    so a reload applies to servers registered afterwards)."""

    def __init__(self, fetch: Callable[..., Awaitable["Response"]], settings: Callable[[], "Config"],
                 metrics: "Metrics", *, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._settings = settings
        self._clock = clock
        self.audit: Any = None  # the engine's AuditLog (proxy.audit)
        self._states: dict[tuple, ServerState] = {}
        self._probes: dict[tuple, _Probe] = {}
        self._default: "Target | None" = None
        self._default_state: ServerState | None = None
        self._running = False
        self._full_logged = False
        self.healthy = metrics.gauge("sge_proxy_upstream_healthy", "1 while the server passes its health "
                                     "checks (or has had none yet), 0 once it fails them.", ("upstream",))
        self.circuit = metrics.gauge("sge_proxy_circuit_state", "Circuit breaker: 0 closed, 1 half-open, "
                                     "2 open.", ("upstream",))
        self.transitions = metrics.counter("sge_proxy_circuit_transitions_total", "Circuit breaker state "
                                           "changes.", ("upstream", "from", "to"))
        self.ejections = metrics.counter("sge_proxy_upstream_ejections_total", "Outlier ejections (each "
                                         "opens the circuit).", ("upstream",))
        self.retries = metrics.counter("sge_proxy_upstream_retries_total", "Requests sent again because "
                                       "the first try provably never reached the server.", ("upstream", "reason"))

    # ------------------------------------------------------------------ lifecycle
    def start(self, default: "Target") -> None:
        """Track the default target and start the checks (of every server known so far)."""
        self._running = True
        self.set_default(default)
        for key in self._probes:
            self._spawn(key)

    def set_default(self, default: "Target") -> None:
        """The default target (stalwart.url), tracked and never forgotten."""
        self._default = default
        self._default_state = self.state(default)

    async def stop(self) -> None:
        self._running = False
        tasks = [p.task for p in self._probes.values() if p.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in self._probes.values():
            p.task = None

    # ------------------------------------------------------------------ the request path
    def state(self, target: "Target") -> ServerState | None:
        """The server's state, tracking it on first use (None past breaker.max_targets)."""
        key = target.key
        st = self._states.get(key)
        if st is None:
            st = self._register(target, key)
        return st

    def pick(self, primary: "Target", fallbacks: Sequence["Target"] | None,
             now: float) -> tuple["Target", ServerState | None]:
        """The server to send a request to: the primary when it may take one, else the first
        fallback that may; when none passes its health checks, the first whose circuit lets the
        request through (a health endpoint can be wrong while the API works); none at all:
        CircuitOpen (503)."""
        if fallbacks:  # tracked (and health checked) while their route is in use: known before needed
            for t in fallbacks:
                fst = self._states.get(t.key) or self._register(t, t.key)
                if fst is not None:
                    fst.last_used = now
        st = self._default_state if primary is self._default else self.state(primary)
        if st is None or st.admit(now):
            return primary, st
        found = self.failover((primary, *(fallbacks or ())), (), now)
        if found is None:
            raise CircuitOpen(self._blocked_for((primary, *(fallbacks or ())), now))
        return found

    def failover(self, candidates: Sequence["Target"], avoid: Sequence[tuple],
                 now: float) -> tuple["Target", ServerState | None] | None:
        """The first candidate not in `avoid` (keys) that may take a request: healthy first,
        then ignoring health checks. None when every one is open or avoided."""
        for health in (True, False):
            for t in candidates:
                if t.key in avoid:
                    continue
                st = self.state(t)
                if st is None or st.admit(now, health):
                    return t, st
        return None

    def _blocked_for(self, candidates: Sequence["Target"], now: float) -> float:
        waits = [st.blocked_for(now) for st in (self.state(t) for t in candidates) if st is not None]
        return min(waits, default=1.0)

    def failed(self, st: ServerState | None, err: ProxyError, client: str) -> None:
        """An exchange with the server failed with `err`."""
        if st is None:
            return
        kind = failure_kind(err)
        if kind is not None:
            st.failure(self._clock(), client, kind)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (1, 2, ...) on the same server: full jitter
        over retry.backoff * 2^(attempt-1), capped at retry.max_backoff."""
        r = self._settings().retry
        return random.uniform(0.0, min(r.max_backoff, r.backoff * 2.0 ** (attempt - 1)))

    # ------------------------------------------------------------------ registry
    def _register(self, target: "Target", key: tuple) -> ServerState | None:
        config = self._settings()
        if len(self._states) >= config.breaker.max_targets:
            if not self._full_logged:
                self._full_logged = True
                log.warning("breaker.max_targets (%d) servers are tracked; %s is served without health "
                            "checks, ejection or circuit breaking", config.breaker.max_targets, target)
            return None
        label = target.origin
        s = config.stalwart

        def on_transition(old: Circuit, new: Circuit) -> None:
            self.transitions.labels(label, old.label, new.label).inc()
            if self.audit is not None:
                self.audit.event("upstream.circuit", upstream=label, state=new.label, previous=old.label)
            (log.warning if new is Circuit.OPEN else log.info)("circuit of %s: %s -> %s", label, old.label,
                                                                 new.label)

        def on_eject(seconds: float) -> None:
            self.ejections.labels(label).inc()
            log.warning("%s ejected for %.1f s after consecutive failures", label, seconds)

        st = ServerState(config.breaker, unhealthy_after=s.health_unhealthy_after,
                         healthy_after=s.health_healthy_after, on_transition=on_transition, on_eject=on_eject)
        st.last_used = self._clock()
        self._states[key] = st
        self._probes[key] = _Probe(target)
        clock = self._clock
        self.healthy.labels(label).set_function(lambda: 0.0 if st.healthy is False else 1.0)
        self.circuit.labels(label).set_function(lambda: float(st.circuit_at(clock())))
        if self._running:
            self._spawn(key)
        return st

    def _spawn(self, key: tuple) -> None:
        p = self._probes[key]
        if p.task is None or p.task.done():
            p.task = asyncio.get_running_loop().create_task(self._check_loop(key), name=f"health:{p.target.origin}")

    def _forget(self, key: tuple) -> None:
        p = self._probes.pop(key, None)
        self._states.pop(key, None)
        if p is not None:
            for g in (self.healthy, self.circuit):
                try:
                    g.remove(p.target.origin)
                except KeyError:
                    pass
            log.info("%s unused for breaker.forget_after: no longer tracked", p.target.origin)

    # ------------------------------------------------------------------ checks
    async def _check_loop(self, key: tuple) -> None:
        if self._default is None or self._default.key != key:
            # a server just put to use: the request that brought it is the first evidence; its
            # first check comes an interval later (spread out, and not at every tenant's first request)
            await asyncio.sleep(self._settings().stalwart.health_interval * random.uniform(0.5, 1.0))
        while True:
            st, p = self._states.get(key), self._probes.get(key)
            if st is None or p is None:
                return
            config = self._settings()
            now = self._clock()
            default = config.default_target()
            if self._default is None or default.key != self._default.key:
                self.set_default(default)  # stalwart.url changed by a reload
            if default.key != key and now - st.last_used > config.breaker.forget_after:
                self._forget(key)
                return
            ok = await self.check(p)
            if not self._running:
                # stopped while checking (a cancellation the check's I/O swallowed, as Python
                # 3.11's wait_for does when its inner task finishes in the same turn): no loop on
                return
            if st.checked(ok, self._clock()):
                if self.audit is not None:
                    self.audit.event("upstream.health", upstream=p.target.origin, healthy=st.healthy,
                                     check=p.status if p.error is None else p.error)
                (log.info if st.healthy else log.warning)(
                    "%s is %s (health check: %s)", p.target.origin, "healthy" if st.healthy else "unhealthy",
                    p.status if p.error is None else p.error)
            interval = config.stalwart.health_interval
            if st.healthy is not True:
                interval = min(interval, _UNHEALTHY_INTERVAL)
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    async def check(self, p: _Probe) -> bool:
        """One health check; records what it saw on `p`."""
        s = self._settings().stalwart
        p.at = time.time()
        try:
            async with asyncio.timeout(s.health_timeout):  # (not wait_for: see _check_loop)
                resp = await self._fetch(p.target, "GET", s.health_path, cap=_CHECK_CAP)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            p.status, p.error = None, f"no answer within {s.health_timeout:g} s"
            return False
        except Exception as e:
            p.status, p.error = None, getattr(e, "code", None) or type(e).__name__
            log.debug("health check of %s failed: %s", p.target.origin, e)
            return False
        p.status, p.error = resp.status, None
        if resp.status < 500:
            p.answered_at = p.at
        return resp.status == s.health_status

    # ------------------------------------------------------------------ reading
    def answered_at(self, target: "Target") -> float | None:
        """When the server last answered a health check below 500 (wall clock), if ever."""
        p = self._probes.get(target.key)
        return p.answered_at if p is not None else None

    def usable(self, target: "Target") -> bool:
        """Passes its checks (or has had none yet) and its circuit is not open."""
        st = self._states.get(target.key)
        if st is None:
            return True
        return st.healthy is not False and st.circuit_at(self._clock()) is not Circuit.OPEN

    def snapshot(self) -> list[dict[str, Any]]:
        """Every tracked server for /upstreams."""
        now, wall = self._clock(), time.time()
        out = []
        for key, st in list(self._states.items()):
            p = self._probes[key]
            d = st.snapshot(now)
            for k in ("open", "ejected"):  # wall-clock times too
                d[f"{k}_until"] = round(wall + d[f"{k}_for"], 3) if d[f"{k}_for"] is not None else None
            d = {"upstream": p.target.origin, "name": p.target.name,
                 "default": self._default is not None and self._default.key == key, **d,
                 "last_check": {"at": p.at, "status": p.status, "error": p.error}}
            out.append(d)
        return out
