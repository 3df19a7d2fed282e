"""proxy.cache: the TTL + LRU map against an injected clock (tables, no event loop), and
SingleFlight's sharing, shielding and forgetting (real tasks on the test's loop)."""
from __future__ import annotations

import asyncio
import gc

import pytest

from proxy.cache import SingleFlight, TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- TTLCache
# Each step: ("put", key, value[, ttl]) | ("get"|"peek"|"pop", key, expected) | ("tick", seconds)
# | ("len", expected) | ("clear",). The cache holds at most 2 entries with a 10 s TTL.
TTL_CASES = {
    "fresh until the ttl, then gone": [
        ("put", "a", 1), ("tick", 9.9), ("get", "a", 1), ("tick", 0.1), ("get", "a", None), ("len", 0),
    ],
    "the ttl counts from the put, not the last get": [
        ("put", "a", 1), ("tick", 6), ("get", "a", 1), ("tick", 4), ("get", "a", None),
    ],
    "a put replaces and restarts the ttl": [
        ("put", "a", 1), ("tick", 6), ("put", "a", 2), ("tick", 6), ("get", "a", 2), ("len", 1),
    ],
    "the least recently put goes first": [
        ("put", "a", 1), ("put", "b", 2), ("put", "c", 3),
        ("get", "a", None), ("get", "b", 2), ("get", "c", 3), ("len", 2),
    ],
    "a get makes an entry the most recent": [
        ("put", "a", 1), ("put", "b", 2), ("get", "a", 1), ("put", "c", 3),
        ("get", "b", None), ("get", "a", 1), ("get", "c", 3),
    ],
    "a peek does not make an entry the most recent": [
        ("put", "a", 1), ("put", "b", 2), ("peek", "a", 1), ("put", "c", 3),
        ("peek", "a", None), ("get", "b", 2),
    ],
    "a re-put makes an entry the most recent": [
        ("put", "a", 1), ("put", "b", 2), ("put", "a", 10), ("put", "c", 3),
        ("get", "b", None), ("get", "a", 10),
    ],
    "a per-entry ttl overrides the default": [
        ("put", "short", 1, 2), ("put", "long", 2, 60), ("tick", 2), ("get", "short", None),
        ("tick", 50), ("get", "long", 2),
    ],
    "a zero ttl is never fresh": [("put", "a", 1, 0), ("get", "a", None), ("len", 0)],
    "peek reads an expired entry get has not dropped": [
        ("put", "a", 1), ("tick", 30), ("peek", "a", 1), ("get", "a", None), ("peek", "a", None),
    ],
    "peek and get of a missing key": [("peek", "x", None), ("get", "x", None), ("pop", "x", None)],
    "pop removes and returns": [("put", "a", 1), ("pop", "a", 1), ("get", "a", None), ("len", 0)],
    "clear empties": [("put", "a", 1), ("put", "b", 2), ("clear",), ("len", 0), ("peek", "a", None)],
}


def play(cache: TTLCache, clock: Clock, steps: list[tuple]) -> None:
    for i, (op, *args) in enumerate(steps):
        where = f"step {i}: {(op, *args)}"
        if op == "put":
            cache.put(*args)
        elif op == "tick":
            clock.now += args[0]
        elif op == "len":
            assert len(cache) == args[0], where
        elif op == "clear":
            cache.clear()
        else:
            key, expected = args
            assert getattr(cache, op)(key) == expected, where


@pytest.mark.parametrize("steps", TTL_CASES.values(), ids=TTL_CASES.keys())
def test_ttl_cache(steps: list[tuple]) -> None:
    clock = Clock()
    play(TTLCache(2, 10, clock), clock, steps)


KEEP_EXPIRED_CASES = {
    "an expired entry stays for peek": [
        ("put", "a", 1), ("tick", 10), ("get", "a", None), ("len", 1), ("peek", "a", 1),
    ],
    "until evicted": [
        ("put", "a", 1), ("tick", 10), ("get", "a", None), ("put", "b", 2), ("put", "c", 3),
        ("peek", "a", None),
    ],
    "an expired get does not make it the most recent": [
        ("put", "a", 1), ("put", "b", 2, 60), ("tick", 10), ("get", "a", None), ("put", "c", 3),
        ("peek", "a", None), ("get", "b", 2),
    ],
    "or popped": [("put", "a", 1), ("tick", 10), ("pop", "a", 1), ("len", 0)],
}


@pytest.mark.parametrize("steps", KEEP_EXPIRED_CASES.values(), ids=KEEP_EXPIRED_CASES.keys())
def test_ttl_cache_keep_expired(steps: list[tuple]) -> None:
    clock = Clock()
    play(TTLCache(2, 10, clock, keep_expired=True), clock, steps)


def test_size_zero_holds_nothing_and_negative_is_refused() -> None:
    c: TTLCache[str, int] = TTLCache(0, 10)
    c.put("a", 1)
    assert (c.get("a"), len(c)) == (None, 0)
    with pytest.raises(ValueError):
        TTLCache(-1, 10)


# ---------------------------------------------------------------------------- SingleFlight
class Source:
    """Counts calls; each call waits for `gate`, then answers or raises `fail`."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self) -> str:
        self.calls += 1
        n = self.calls
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return f"answer {n}"


async def test_concurrent_callers_share_one_call() -> None:
    flight: SingleFlight[str, str] = SingleFlight("test")
    src, joins = Source(), []
    waiters = [asyncio.create_task(flight.run("k", src, on_join=joins.append)) for _ in range(3)]
    other = asyncio.create_task(flight.run("other", src, on_join=joins.append))
    await asyncio.sleep(0)
    assert "k" in flight and len(flight) == 2
    src.gate.set()
    assert await asyncio.gather(*waiters) == ["answer 1"] * 3
    assert await other == "answer 2"
    assert src.calls == 2 and joins == ["miss", "shared", "shared", "miss"]
    assert "k" not in flight and len(flight) == 0


async def test_the_task_is_named() -> None:
    flight: SingleFlight[str, str] = SingleFlight("jmap_guard:session")
    names = []

    async def make() -> str:
        names.append(asyncio.current_task().get_name())  # type: ignore[union-attr]
        return "x"

    await flight.run("a", make, label="tenant:acme")
    await flight.run("b", make)
    assert names == ["jmap_guard:session:tenant:acme", "jmap_guard:session"]


async def test_a_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    flight: SingleFlight[str, str] = SingleFlight("test")
    src = Source()
    leaving = asyncio.create_task(flight.run("k", src))
    staying = asyncio.create_task(flight.run("k", src))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    src.gate.set()
    assert await staying == "answer 1" and src.calls == 1


async def test_the_call_finishes_when_its_only_waiter_leaves() -> None:
    flight: SingleFlight[str, str] = SingleFlight("test")
    done = asyncio.Event()

    async def make() -> str:
        await asyncio.sleep(0.01)
        done.set()
        return "x"

    leaving = asyncio.create_task(flight.run("k", make))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.wait_for(done.wait(), 1)


async def test_an_exception_reaches_every_waiter_and_is_not_kept() -> None:
    flight: SingleFlight[str, str] = SingleFlight("test")
    src = Source()
    src.fail = LookupError("down")
    waiters = [asyncio.create_task(flight.run("k", src)) for _ in range(2)]
    await asyncio.sleep(0)
    src.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(r) for r in results] == [LookupError, LookupError] and src.calls == 1
    src.fail = None
    assert await flight.run("k", src) == "answer 2"  # the failure was not cached


async def test_a_failure_no_one_waits_for_is_not_reported_as_unretrieved() -> None:
    flight: SingleFlight[str, str] = SingleFlight("test")
    reported: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx["message"]))
    src = Source()
    src.fail = LookupError("down")
    leaving = asyncio.create_task(flight.run("k", src))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)  # the only waiter has gone before the call fails
    src.gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(flight) == 0 and leaving.cancelled()
    del leaving  # its frame held the last reference to the failed task
    gc.collect()
    assert reported == []


async def test_after_completion_the_next_call_runs_anew() -> None:
    flight: SingleFlight[str, str] = SingleFlight("test")
    src = Source()
    src.gate.set()
    joins: list[str] = []
    assert await flight.run("k", src, on_join=joins.append) == "answer 1"
    assert await flight.run("k", src, on_join=joins.append) == "answer 2"
    assert joins == ["miss", "miss"]


async def test_cancel_stops_running_calls() -> None:
    flight: SingleFlight[str, str] = SingleFlight("test")
    src = Source()
    waiter = asyncio.create_task(flight.run("k", src))
    await asyncio.sleep(0)
    flight.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(flight) == 0
