"""What the proxy knows about one upstream server: its health-check verdict and its circuit
breaker, which two things open: outlier ejection and a failure ratio. Kept as data. Sans-IO:
every method takes `now` (a monotonic clock reading); proxy/health.py owns the clock, the probes
and the registry of servers.

Outlier ejection: `consecutive_failures` gateway failures in a row (any answer in between resets
the count) open the circuit for `ejection_time`, doubled for each ejection that follows within
`max_ejection_time` of the previous one's end, capped at it. A streak made only of failed
answers (a failure status, no answer in time, a connection closed without an answer) must come
from `min_clients` distinct clients: a request can cause those, so one client cannot eject a
server alone. A connect-level failure (refused, connect timeout, TLS handshake) is the server's
own, whoever asked.

Failure ratio: over a sliding `window` (ten buckets), once there were `min_requests` requests,
at least `failure_ratio` of them failed and the failures came from at least `min_clients`
distinct clients, the circuit opens for `open_time`.

Open, then HALF_OPEN: one trial request at a time (a trial that never reports is given up after
`open_time`); its success or a passed health check CLOSEs the circuit, its failure opens it again
for `open_time` doubled per failed trial in a row, capped at `max_open_time`.

Health: `unhealthy_after` failed checks in a row mark the server unhealthy, `healthy_after`
passed ones healthy again; before the first verdict it is neither (None) and takes traffic.
"""
from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from .errors import NoUpstream

if TYPE_CHECKING:
    from .config import BreakerOptions

__all__ = ["Circuit", "Failure", "CircuitOpen", "ServerState"]

_BUCKETS = 10
_MAX_CLIENTS = 256  # distinct failing clients remembered per server (the rule needs min_clients)


class Circuit(enum.IntEnum):
    """The gauge values of sge_proxy_circuit_state."""
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


_CLOSED, _HALF_OPEN, _OPEN = Circuit.CLOSED, Circuit.HALF_OPEN, Circuit.OPEN  # (module globals: cheaper)


class Failure(enum.Enum):
    CONNECT = "connect"    # never reached the server: refused, connect timeout, TLS handshake
    RESPONSE = "response"  # sent, then a failure status, no answer in time, or no answer at all


class CircuitOpen(NoUpstream):
    """Every server of the route has its circuit open. 503 with Retry-After."""
    code = "circuit_open"

    def __init__(self, retry_after: float) -> None:
        secs = max(1, int(retry_after + 0.999))
        super().__init__("The mail server is failing; the proxy stopped sending it requests for now. "
                         "Try again later.", headers={"Retry-After": str(secs)})


class ServerState:
    """Ejection, circuit and health of one server. `on_transition(old, new)` is told of every
    circuit change, `on_eject(seconds)` of every ejection (metrics, logs)."""

    __slots__ = ("circuit", "open_until", "trial_at", "ejected_until", "ejections", "healthy", "streak",
                 "successes", "failures", "last_used", "_reopens", "_ejection_end", "_streak_clients",
                 "_streak_connect", "_clients", "_ring", "_cur", "_ctot", "_cbad", "_bucket_end", "_width",
                 "_consecutive",
                 "_eject_base", "_eject_max", "_min_requests", "_ratio", "_min_clients", "_open_base",
                 "_open_max", "_statuses", "_unhealthy_after", "_healthy_after", "_passes", "_fails",
                 "on_transition", "on_eject")

    def __init__(self, opts: "BreakerOptions", *, unhealthy_after: int = 2, healthy_after: int = 1,
                 on_transition: Callable[[Circuit, Circuit], None] | None = None,
                 on_eject: Callable[[float], None] | None = None) -> None:
        self.circuit = Circuit.CLOSED
        self.open_until = 0.0
        self.trial_at: float | None = None
        self.ejected_until = 0.0
        self.ejections = 0          # in the current run of ejections (the backoff exponent)
        self.healthy: bool | None = None
        self.streak = 0             # gateway failures in a row
        self.successes = 0
        self.failures = 0
        self.last_used = 0.0
        self._reopens = 0           # failed trials in a row (the open backoff exponent)
        self._ejection_end = float("-inf")
        self._streak_clients: set[str] = set()
        self._streak_connect = False
        self._clients: dict[str, float] = {}  # failing client -> last failure, oldest first
        # the sliding window: the current bucket in attributes, the finished ones in a ring
        self._ring: deque[tuple[int, int, int]] = deque(maxlen=_BUCKETS)  # (bucket, requests, failures)
        self._cur = -1
        self._ctot = self._cbad = 0
        self._bucket_end = float("-inf")
        self._width = opts.window / _BUCKETS
        self._consecutive = opts.consecutive_failures
        self._eject_base, self._eject_max = opts.ejection_time, max(opts.max_ejection_time, opts.ejection_time)
        self._min_requests, self._ratio, self._min_clients = opts.min_requests, opts.failure_ratio, opts.min_clients
        self._open_base, self._open_max = opts.open_time, max(opts.max_open_time, opts.open_time)
        self._statuses = frozenset(opts.failure_statuses)
        self._unhealthy_after, self._healthy_after = unhealthy_after, healthy_after
        self._passes = self._fails = 0
        self.on_transition = on_transition
        self.on_eject = on_eject

    # ------------------------------------------------------------------ admission
    def admit(self, now: float, health: bool = True) -> bool:
        """May a request go to this server now? In HALF_OPEN a True takes the trial slot.
        health=False ignores the health-check verdict (when no server of the route passes)."""
        self.last_used = now
        if self.circuit is _CLOSED:
            return self.healthy is not False or not health
        return self._admit_open(now, health)

    def _admit_open(self, now: float, health: bool) -> bool:
        if health and self.healthy is False:
            return False
        if self.circuit is Circuit.OPEN:
            if now < self.open_until:
                return False
            self._set(Circuit.HALF_OPEN)
        if self.trial_at is not None and now - self.trial_at < self._open_base:
            return False  # a trial is out
        self.trial_at = now
        return True

    def blocked_for(self, now: float) -> float:
        """Seconds until the circuit lets a trial through (0: now)."""
        return max(0.0, self.open_until - now) if self.circuit is Circuit.OPEN else 0.0

    def circuit_at(self, now: float) -> Circuit:
        """The circuit as a request arriving now would find it."""
        if self.circuit is Circuit.OPEN and now >= self.open_until:
            return Circuit.HALF_OPEN
        return self.circuit

    def tick(self, now: float) -> None:
        """OPEN past its time becomes HALF_OPEN without waiting for a request."""
        if self.circuit is Circuit.OPEN and now >= self.open_until:
            self._set(Circuit.HALF_OPEN)

    # ------------------------------------------------------------------ outcomes
    def answered(self, status: int, client: str, now: float) -> None:
        """The server answered with `status` (a failure when it is one of failure_statuses)."""
        if status >= 500 and status in self._statuses:
            self.failure(now, client, Failure.RESPONSE)
        else:
            self.success(now)

    def success(self, now: float) -> None:
        """An answer. On the request path: a few attribute updates."""
        self.successes += 1
        if self.streak:
            self._end_streak()
        if self.circuit is _HALF_OPEN:
            self._close()
        if now >= self._bucket_end:
            self._roll(now)
        self._ctot += 1

    def failure(self, now: float, client: str, kind: Failure) -> None:
        self.failures += 1
        if now >= self._bucket_end:
            self._roll(now)
        self._ctot += 1
        self._cbad += 1
        self.streak += 1
        if kind is Failure.CONNECT:
            self._streak_connect = True
        elif len(self._streak_clients) < self._min_clients:
            self._streak_clients.add(client)
        clients = self._clients
        clients.pop(client, None)
        clients[client] = now
        horizon = now - self._width * _BUCKETS
        for c, t in list(clients.items()):
            if t > horizon and len(clients) <= _MAX_CLIENTS:
                break
            del clients[c]
        if self.circuit is Circuit.HALF_OPEN:  # the trial (or a request from before) failed
            self._reopens += 1
            self._open(now, min(self._open_base * 2.0 ** min(self._reopens, 30), self._open_max))
        elif self.circuit is Circuit.OPEN:
            return  # answers to requests sent before it opened
        elif self.streak >= self._consecutive and (self._streak_connect
                                                   or len(self._streak_clients) >= self._min_clients):
            self._eject(now)
        elif len(clients) >= self._min_clients:
            tot, bad = self.window(now)
            if tot >= self._min_requests and bad >= self._ratio * tot:
                self._open(now, self._open_base)

    def checked(self, ok: bool, now: float) -> bool:
        """A health check passed or failed. A pass closes a circuit that waits for a trial.
        Returns True when the verdict changed."""
        before = self.healthy
        if ok:
            self._passes += 1
            self._fails = 0
            if self._passes >= self._healthy_after:
                self.healthy = True
            self.tick(now)
            if self.circuit is Circuit.HALF_OPEN:
                self._close()
        else:
            self._fails += 1
            self._passes = 0
            if self._fails >= self._unhealthy_after:
                self.healthy = False
        return self.healthy is not before

    # ------------------------------------------------------------------ reading
    def window(self, now: float) -> tuple[int, int]:
        """(requests, failures) in the sliding window."""
        lo = int(now / self._width) - _BUCKETS
        tot, bad = (self._ctot, self._cbad) if self._cur > lo else (0, 0)
        for i, t, b in self._ring:
            if i > lo:
                tot += t
                bad += b
        return tot, bad

    def _roll(self, now: float) -> None:
        if self._ctot:
            self._ring.append((self._cur, self._ctot, self._cbad))
        self._cur = int(now / self._width)
        self._ctot = self._cbad = 0
        self._bucket_end = (self._cur + 1) * self._width

    def failing_clients(self, now: float) -> int:
        horizon = now - self._width * _BUCKETS
        return sum(1 for t in self._clients.values() if t > horizon)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The state as JSON-able data; times are seconds from `now`."""
        tot, bad = self.window(now)
        circuit = self.circuit_at(now)
        return {
            "health": {True: "healthy", False: "unhealthy", None: "unknown"}[self.healthy],
            "circuit": circuit.label,
            "open_for": round(self.open_until - now, 3) if circuit is Circuit.OPEN else None,
            "ejected_for": round(self.ejected_until - now, 3) if self.ejected_until > now else None,
            "ejections": self.ejections,
            "consecutive_failures": self.streak,
            "successes": self.successes,
            "failures": self.failures,
            "window": {"requests": tot, "failures": bad, "failing_clients": self.failing_clients(now)},
        }

    # ------------------------------------------------------------------ transitions
    def _set(self, new: Circuit) -> None:
        old, self.circuit = self.circuit, new
        if old is not new and self.on_transition is not None:
            self.on_transition(old, new)

    def _open(self, now: float, seconds: float) -> None:
        self.open_until = now + seconds
        self.trial_at = None
        self._set(Circuit.OPEN)

    def _close(self) -> None:
        self._reopens = 0
        self.trial_at = None
        self._ring.clear()  # a fresh window: the old failures led to the opening
        self._ctot = self._cbad = 0
        self._clients.clear()
        self._set(Circuit.CLOSED)

    def _eject(self, now: float) -> None:
        if now - self._ejection_end >= self._eject_max:
            self.ejections = 0  # back long enough: the backoff starts over
        self.ejections += 1
        seconds = min(self._eject_base * 2.0 ** min(self.ejections - 1, 30), self._eject_max)
        self.ejected_until = self._ejection_end = now + seconds
        self._end_streak()
        if self.on_eject is not None:
            self.on_eject(seconds)
        self._open(now, seconds)

    def _end_streak(self) -> None:
        self.streak = 0
        self._streak_clients.clear()
        self._streak_connect = False
