"""Rate and concurrency limits as data and arithmetic. Sans-IO: time is passed in, and queued
waiters are opaque objects owned by the caller (the rate_limit addon's futures).

Token buckets: a bucket holds at most `burst` tokens and gains `rate` tokens per second; a request
takes one token from every bucket that applies (user, tenant...) or from none. The Redis store runs
the same arithmetic in a Lua script and hands its numbers to `verdict`, so both backends answer
alike.

Concurrency slots: at most `limit` requests per key at once, then up to `queue` waiters in FIFO
order. A released slot goes straight to the first waiter, so a newcomer cannot overtake the queue.
"""
from __future__ import annotations

import enum
import ipaddress
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .cache import TTLCache
from .errors import ConfigError

__all__ = ["Limit", "Decision", "parse_rate", "refill", "take", "verdict", "MemoryBuckets",
           "Admission", "Slots", "FailureBans"]

_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?)?\s*([a-z]+))?\s*$")
_OFF = frozenset({"", "off", "none", "false", "no", "0"})


def parse_rate(text: str | None, key: str = "rate") -> tuple[float, float] | None:
    """'1000/min' -> (1000, 60); '5/10s' -> (5, 10); a bare number is per second; 'off' or None
    -> None. Returns (count, period in seconds). Pure."""
    if text is None or str(text).strip().lower() in _OFF:
        return None
    m = _RATE.match(str(text).lower())
    if m is None or (m.group(3) is not None and m.group(3) not in _PERIODS):
        raise ConfigError(key, f"expected a rate such as '1000/min', '20/s' or '5/10s', got {text!r}")
    count = float(m.group(1))
    period = float(m.group(2) or 1) * _PERIODS[m.group(3) or "s"]
    if count <= 0 or period <= 0:
        raise ConfigError(key, f"must be positive, got {text!r}")
    return count, period


@dataclass(frozen=True, slots=True)
class Limit:
    """One bucket's shape. `name` is a bounded label (user, tenant, anonymous)."""
    name: str
    rate: float   # tokens per second
    burst: float  # bucket size

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ConfigError(self.name, "a limit needs a positive rate and a burst of at least 1")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the buckets said. `limit` is the bucket that decided: the one refusing (the longest
    wait when several do), else the one with the fewest tokens left."""
    allowed: bool
    limit: str
    burst: int
    remaining: int        # whole tokens left in that bucket
    retry_after: float    # seconds until the request would be allowed; 0 when allowed
    reset_after: float    # seconds until that bucket is full again

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))

    def headers(self) -> dict[str, str]:
        """X-RateLimit-Limit, -Remaining and -Reset (seconds until the bucket is full)."""
        return {"X-RateLimit-Limit": str(self.burst), "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(math.ceil(self.reset_after))}


def refill(tokens: float, elapsed: float, limit: Limit) -> float:
    """Tokens after `elapsed` seconds (a clock going backwards adds nothing). Pure."""
    return min(limit.burst, tokens + max(0.0, elapsed) * limit.rate)


def verdict(limits: Sequence[Limit], after: Sequence[float], allowed: bool, cost: float = 1.0) -> Decision:
    """The Decision for tokens `after` the attempt (unchanged when refused). Pure."""
    if allowed:
        i = min(range(len(limits)), key=lambda j: after[j])
        retry = 0.0
    else:
        waits = [(cost - t) / lim.rate if t < cost else 0.0 for lim, t in zip(limits, after)]
        i = max(range(len(limits)), key=lambda j: waits[j])
        retry = waits[i]
    lim, left = limits[i], after[i]
    return Decision(allowed, lim.name, int(lim.burst), max(0, math.floor(left + 1e-9)), retry,
                    max(0.0, (lim.burst - left) / lim.rate))


def take(limits: Sequence[Limit], tokens: Sequence[float], cost: float = 1.0) -> tuple[Decision, list[float]]:
    """Take `cost` from every bucket (tokens already refilled), or from none if any is short.
    Returns the decision and the tokens after. Pure."""
    allowed = all(t >= cost for t in tokens)
    after = [t - cost for t in tokens] if allowed else list(tokens)
    return verdict(limits, after, allowed, cost), after


class MemoryBuckets:
    """Buckets in a dict: key -> (tokens, updated, full_at). A bucket that has refilled is the same
    as no bucket, so `sweep` drops those (run every `sweep_interval` seconds from `take`)."""

    def __init__(self, sweep_interval: float = 60.0) -> None:
        self._state: dict[str, tuple[float, float, float]] = {}
        self._sweep_interval = sweep_interval
        self._next_sweep = -math.inf

    def __len__(self) -> int:
        return len(self._state)

    def take(self, keys: Sequence[str], limits: Sequence[Limit], now: float, cost: float = 1.0) -> Decision:
        state = self._state
        tokens = []
        for key, lim in zip(keys, limits):
            s = state.get(key)
            tokens.append(lim.burst if s is None else refill(s[0], now - s[1], lim))
        decision, after = take(limits, tokens, cost)
        if decision.allowed:  # a refusal changes nothing: the refilled value is implied by time
            for key, lim, t in zip(keys, limits, after):
                state[key] = (t, now, now + (lim.burst - t) / lim.rate)
        if now >= self._next_sweep:
            self.sweep(now)
        return decision

    def try_take(self, key: str, limit: Limit, now: float, cost: float = 1.0) -> bool:
        """`take` for one bucket when only the yes matters: True (taken) or False (nothing
        changed; `take` gives the refusal's Decision)."""
        s = self._state.get(key)
        t = limit.burst if s is None else min(limit.burst, s[0] + max(0.0, now - s[1]) * limit.rate)
        if t < cost:
            return False
        t -= cost
        self._state[key] = (t, now, now + (limit.burst - t) / limit.rate)
        if now >= self._next_sweep:
            self.sweep(now)
        return True

    def sweep(self, now: float) -> int:
        """Forget full buckets; returns how many."""
        full = [k for k, (_, _, full_at) in self._state.items() if full_at <= now]
        for k in full:
            del self._state[k]
        self._next_sweep = now + self._sweep_interval
        return len(full)


class Admission(enum.Enum):
    GRANTED = "granted"
    QUEUED = "queued"
    REFUSED = "refused"


class Slots:
    """Per-key concurrency slots with a bounded FIFO queue of waiters."""

    def __init__(self, limit: int, queue: int) -> None:
        if limit < 1 or queue < 0:
            raise ConfigError("concurrency", "needs a limit of at least 1 and a queue of 0 or more")
        self.limit, self.queue = limit, queue
        self._held: dict[str, int] = {}
        self._waiting: dict[str, deque[Any]] = {}
        self.held_total = 0
        self.queued_total = 0

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def waiting(self, key: str) -> int:
        q = self._waiting.get(key)
        return len(q) if q else 0

    def try_acquire(self, key: str) -> bool:
        """Take a slot if one is free now (True); else nothing changes (then `acquire`)."""
        n = self._held.get(key, 0)
        if n < self.limit:
            self._held[key] = n + 1
            self.held_total += 1
            return True
        return False

    def acquire(self, key: str, waiter: Any) -> Admission:
        """GRANTED (the caller holds a slot), QUEUED (`waiter` is in line) or REFUSED."""
        n = self._held.get(key, 0)
        if n < self.limit:
            self._held[key] = n + 1
            self.held_total += 1
            return Admission.GRANTED
        q = self._waiting.get(key)
        if q is None:
            if self.queue == 0:
                return Admission.REFUSED
            q = self._waiting[key] = deque()
        if len(q) >= self.queue:
            return Admission.REFUSED
        q.append(waiter)
        self.queued_total += 1
        return Admission.QUEUED

    def release(self, key: str) -> Any | None:
        """Give a slot back. Returns the waiter it passed to (which now holds it), or None."""
        q = self._waiting.get(key)
        if q:
            w = q.popleft()
            self.queued_total -= 1
            if not q:
                del self._waiting[key]
            return w
        n = self._held.get(key, 0)
        if n <= 0:
            raise RuntimeError(f"slot released more often than acquired: {key!r}")
        self.held_total -= 1
        if n == 1:
            del self._held[key]
        else:
            self._held[key] = n - 1
        return None

    def abandon(self, key: str, waiter: Any) -> bool:
        """Take a waiter out of line (it gave up). False: it was no longer queued (a release
        already passed it a slot, which it must release)."""
        q = self._waiting.get(key)
        if not q:
            return False
        try:
            q.remove(waiter)
        except ValueError:
            return False
        self.queued_total -= 1
        if not q:
            del self._waiting[key]
        return True


# ---------------------------------------------------------------------------- failed-login bans
class FailureBans:
    """An address that fails authentication `failures` times within `window` seconds (counted
    from its first failure) is banned for `ban` seconds. Addresses in `exempt` (CIDRs) are never
    banned. At most `size` addresses are remembered in each table, the least recently seen
    forgotten first. Sans-IO: the clock is injected."""

    def __init__(self, failures: int, window: float, ban: float, *, exempt: Sequence[str] = (),
                 size: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.window, self.ban = failures, window, ban
        self._clock = clock
        self._counts: TTLCache[str, list[int]] = TTLCache(size, window, clock)
        self._bans: TTLCache[str, float] = TTLCache(size, ban, clock)
        self._exempt = tuple(ipaddress.ip_network(n, strict=False) for n in exempt)

    @property
    def active(self) -> bool:
        """Whether any ban may be in force (a request costs one attribute test when none is)."""
        return len(self._bans) > 0

    def banned(self, addr: str) -> float | None:
        """Seconds left of `addr`'s ban, or None."""
        until = self._bans.get(addr)
        if until is None:
            return None
        return max(until - self._clock(), 0.001)

    def failed(self, addr: str) -> bool:
        """Count a failure of `addr`; True when it starts a ban."""
        if self._exempt and self._is_exempt(addr):
            return False
        count = self._counts.get(addr)
        if count is None:
            count = [0]
            self._counts.put(addr, count)  # the window starts at the first failure
        count[0] += 1
        if count[0] < self.failures:
            return False
        self._counts.pop(addr)
        self._bans.put(addr, self._clock() + self.ban)
        return True

    def _is_exempt(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self._exempt)

    def __len__(self) -> int:
        """Addresses banned now (expired ones may linger until looked at or evicted)."""
        now = self._clock()
        return sum(1 for until, _ in self._bans._data.values() if until > now)
