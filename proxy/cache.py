"""The two caching shapes the addons share.

- TTLCache: a bounded LRU map whose entries expire, each with its own TTL, against an injected
  clock. Sans-IO: routing decisions, JMAP sessions, REST facade data and verified tokens sit in one.
- SingleFlight: concurrent misses for one key share one task, so N clients asking at once cost
  one upstream call. The one piece here that needs an event loop.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Generic, Hashable, Literal, TypeVar

__all__ = ["TTLCache", "SingleFlight", "Join"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

Join = Literal["miss", "shared"]  # how a SingleFlight caller got its result (the metric label)


class TTLCache(Generic[K, V]):
    """At most `size` entries, the least recently used dropped first. An entry lives `ttl` seconds
    from its put (or the put's own `ttl`). `get` answers fresh entries only and drops an expired one,
    unless `keep_expired`: then it stays, readable through `peek`, until evicted, replaced or
    popped. `peek` ignores expiry and leaves the recency order alone. None is not a storable value:
    it is what a miss returns."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic, *,
                 keep_expired: bool = False) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self.size, self.ttl, self._clock, self._keep_expired = size, ttl, clock, keep_expired
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            if not self._keep_expired:
                del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        item = self._data.get(key)
        return item[1] if item is not None else None

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        self._data[key] = (self._clock() + (self.ttl if ttl is None else ttl), value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return item[1] if item is not None else None

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class SingleFlight(Generic[K, T]):
    """One task per key while it runs. `run(key, make)` starts `make()` as a task named after
    `name` when none runs for `key`, else joins the running one; every caller gets its result or
    its exception. A caller that is cancelled leaves the task running for the others (shielded).
    Nothing is remembered once the task ends: a failure is not cached, the next call runs anew."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: dict[K, asyncio.Task[T]] = {}

    async def run(self, key: K, make: Callable[[], Awaitable[T]], *, label: str | None = None,
                  on_join: Callable[[Join], object] | None = None) -> T:
        """`label` is appended to the task's name; `on_join("miss" | "shared")` is called before
        waiting, so a caller can count how it got its answer even when that answer is an error."""
        task = self._tasks.get(key)
        if on_join is not None:
            on_join("miss" if task is None else "shared")
        if task is None:
            task = asyncio.get_running_loop().create_task(
                make(), name=f"{self.name}:{label}" if label else self.name)  # type: ignore[arg-type]
            self._tasks[key] = task
            task.add_done_callback(lambda t, k=key: self._settled(k, t))
        return await asyncio.shield(task)

    def _settled(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so that a failure no one waits for any more is not logged

    def cancel(self) -> None:
        """Cancel every running task (shutdown); their waiters get CancelledError."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)
