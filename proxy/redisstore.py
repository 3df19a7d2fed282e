"""Token buckets shared across replicas, in Redis (the `redis` package's asyncio client).

One request is one EVALSHA of a Lua script that refills and takes from every bucket that applies
(user, tenant...) atomically, on Redis's own clock (TIME), so replicas with skewed clocks still
agree. Each bucket is a hash {tokens, ts} that expires once it would be full again: idle users
cost nothing. The script is sent once (SCRIPT LOAD) and again only if Redis forgot it (restart).

Every call has a short deadline (50 ms by default) and no retries: a slow or absent Redis never
stalls a request for longer than that. After a failure the store reports itself unavailable
without trying for `retry_interval`, then tries again (reconnecting through the pool).
Imported only when `addons.rate_limit.backend` is `redis`.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Callable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from .ratelimit import Decision, Limit, verdict

__all__ = ["RedisBuckets", "StoreUnavailable", "TAKE_SCRIPT"]

# KEYS: the buckets. ARGV[1]: the cost; then rate (tokens/s) and burst for each key in turn.
# Returns {allowed (0|1), tokens after for each key (strings: Lua numbers would be truncated)}.
TAKE_SCRIPT = """
local cost = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tokens = {}
local allowed = 1
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local s = redis.call('HMGET', key, 'tokens', 'ts')
  local tk, ts = tonumber(s[1]), tonumber(s[2])
  if tk == nil or ts == nil then
    tk = burst
  else
    tk = math.min(burst, tk + math.max(0, now - ts) * rate)
  end
  tokens[i] = tk
  if tk < cost then allowed = 0 end
end
local out = {allowed}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local tk = tokens[i]
  if allowed == 1 then
    tk = tk - cost
    redis.call('HSET', key, 'tokens', string.format('%.6f', tk), 'ts', string.format('%.6f', now))
    redis.call('PEXPIRE', key, math.ceil((burst - tk) / rate * 1000) + 1000)
  end
  out[#out + 1] = string.format('%.6f', tk)
end
return out
"""
_SHA = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()


class StoreUnavailable(Exception):
    """Redis did not answer in time (or at all). `kind` is a bounded label: timeout, connection,
    error, down (not tried: a recent failure)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class RedisBuckets:
    """The shared bucket store. `client` may be given (tests); otherwise one is made from `url`."""

    def __init__(self, url: str, *, timeout: float = 0.05, prefix: str = "sge:rl:",
                 retry_interval: float = 1.0, max_connections: int = 32,
                 clock: Callable[[], float] = time.monotonic) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
        self.client = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self.timeout = timeout
        self.prefix = prefix
        self.retry_interval = retry_interval
        self._clock = clock
        self._down_until = -1.0
        self._loaded = False

    @property
    def down(self) -> bool:
        return self._clock() < self._down_until

    async def take(self, keys: Sequence[str], limits: Sequence[Limit], cost: float = 1.0) -> Decision:
        """Take `cost` from every bucket or from none. Raises StoreUnavailable."""
        if self._clock() < self._down_until:
            raise StoreUnavailable("down")
        args: list[float] = [cost]
        for lim in limits:
            args += (lim.rate, lim.burst)
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._eval(keys, args)
        except (TimeoutError, RedisTimeout) as e:
            self._fail()
            raise StoreUnavailable("timeout", str(e)) from None
        except (ConnectionError, OSError, RedisError) as e:
            self._fail()
            kind = "connection" if isinstance(e, (ConnectionError, OSError, RedisConnectionError)) else "error"
            raise StoreUnavailable(kind, f"{type(e).__name__}: {e}") from None
        allowed = int(reply[0]) == 1
        after = [float(x) for x in reply[1:]]
        return verdict(limits, after, allowed, cost)

    async def _eval(self, keys: Sequence[str], args: list[float]) -> list:
        if not self._loaded:
            await self.client.script_load(TAKE_SCRIPT)
            self._loaded = True
        try:
            return await self.client.evalsha(_SHA, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted or flushed its scripts
            await self.client.script_load(TAKE_SCRIPT)
            return await self.client.evalsha(_SHA, len(keys), *keys, *args)

    def _fail(self) -> None:
        self._down_until = self._clock() + self.retry_interval

    async def close(self) -> None:
        await self.client.aclose()
