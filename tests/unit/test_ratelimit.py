"""Token buckets and concurrency slots (proxy/ratelimit.py) as tables with an injected clock, and
the rate_limit addon through a real AddonManager with real Flows."""
from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from addons.rate_limit import RateLimit
from proxy.addonmanager import AddonManager
from proxy.config import Config
from proxy.errors import ConfigError, InternalError, TooManyRequests, to_response
from proxy.flow import Flow, Request, Response
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.ratelimit import Admission, Decision, Limit, MemoryBuckets, Slots, parse_rate, refill, take, verdict

USER = Limit("user", rate=1.0, burst=3)      # 1 token/s, 3 at most
TENANT = Limit("tenant", rate=0.5, burst=5)


@pytest.mark.parametrize("text, want", [
    ("1000/min", (1000, 60)), ("20/s", (20, 1)), ("5/10s", (5, 10)), ("3/ 2 h", (3, 7200)),
    ("7/minute", (7, 60)), ("1/day", (1, 86400)), ("2.5/s", (2.5, 1)), ("12", (12, 1)), (30, (30, 1)),
    (None, None), ("off", None), ("", None), ("false", None),
])
def test_parse_rate(text, want):
    assert parse_rate(text) == want


@pytest.mark.parametrize("text", ["fast", "10/fortnight", "-1/s", "0/s", "10/0s", "10 per min", "/s"])
def test_parse_rate_refuses(text):
    with pytest.raises(ConfigError):
        parse_rate(text)


@pytest.mark.parametrize("tokens, elapsed, want", [
    (0.0, 0.0, 0.0), (0.0, 1.5, 1.5), (2.5, 10.0, 3.0), (1.0, -5.0, 1.0), (3.0, 1.0, 3.0),
])
def test_refill(tokens, elapsed, want):
    assert refill(tokens, elapsed, USER) == want


@pytest.mark.parametrize("limits, tokens, allowed, after, limit, remaining, retry, reset", [
    # one bucket
    ((USER,), (3.0,), True, [2.0], "user", 2, 0.0, 1.0),
    ((USER,), (1.0,), True, [0.0], "user", 0, 0.0, 3.0),
    ((USER,), (0.25,), False, [0.25], "user", 0, 0.75, 2.75),
    # both must have a token; a refusal takes from neither
    ((USER, TENANT), (3.0, 5.0), True, [2.0, 4.0], "user", 2, 0.0, 1.0),
    ((USER, TENANT), (3.0, 1.5), True, [2.0, 0.5], "tenant", 0, 0.0, 9.0),
    ((USER, TENANT), (3.0, 0.5), False, [3.0, 0.5], "tenant", 0, 1.0, 9.0),
    # both short: the longer wait decides
    ((USER, TENANT), (0.0, 0.25), False, [0.0, 0.25], "tenant", 0, 1.5, 9.5),
    ((USER, TENANT), (0.0, 0.9), False, [0.0, 0.9], "user", 0, 1.0, 3.0),
])
def test_take(limits, tokens, allowed, after, limit, remaining, retry, reset):
    d, got = take(limits, tokens)
    assert (d.allowed, got, d.limit, d.remaining) == (allowed, after, limit, remaining)
    assert d.retry_after == pytest.approx(retry) and d.reset_after == pytest.approx(reset)


@pytest.mark.parametrize("retry, header", [(0.0, "1"), (0.01, "1"), (1.0, "1"), (1.2, "2"), (59.5, "60")])
def test_retry_after_header_is_whole_seconds_at_least_one(retry, header):
    assert Decision(False, "user", 3, 0, retry, 0.0).retry_after_header == header


def test_headers():
    d = verdict((USER,), [1.0], True)
    assert d.headers() == {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "2"}


def test_memory_buckets_burst_refusal_and_refill():
    b = MemoryBuckets()
    got = [b.take(["u:a"], [USER], now=100.0).allowed for _ in range(4)]
    assert got == [True, True, True, False]
    d = b.take(["u:a"], [USER], now=100.0)
    assert (d.allowed, d.retry_after) == (False, 1.0)
    assert b.take(["u:a"], [USER], now=100.5).allowed is False
    assert b.take(["u:a"], [USER], now=101.0).allowed is True      # one token back after 1 s
    assert b.take(["u:a"], [USER], now=101.0).allowed is False
    assert b.take(["u:b"], [USER], now=101.0).allowed is True      # another key has its own bucket


def test_memory_buckets_tenant_shared_by_its_users():
    b = MemoryBuckets()
    tenant = Limit("tenant", rate=0.1, burst=2)
    assert b.take(["u:a", "t:x"], [USER, tenant], now=0.0).allowed
    assert b.take(["u:b", "t:x"], [USER, tenant], now=0.0).allowed
    d = b.take(["u:c", "t:x"], [USER, tenant], now=0.0)
    assert (d.allowed, d.limit) == (False, "tenant")
    # the refusal took nothing from u:c's own bucket
    assert [b.take(["u:c"], [USER], now=0.0).allowed for _ in range(4)] == [True, True, True, False]


def test_memory_buckets_forget_full_buckets():
    b = MemoryBuckets(sweep_interval=10.0)
    b.take(["u:a"], [USER], now=0.0)
    b.take(["u:b"], [USER], now=0.0)
    b.take(["u:b"], [USER], now=0.0)
    assert len(b) == 2
    assert b.sweep(now=1.0) == 1 and len(b) == 1           # a was full again after 1 s, b not yet
    b.take(["u:c"], [USER], now=5.0)                          # before the next sweep time: nothing dropped
    assert len(b) == 2
    b.take(["u:c"], [USER], now=11.0)                         # the sweep runs from take
    assert len(b) == 1
    d = b.take(["u:b"], [USER], now=11.0)                     # forgotten means full
    assert (d.allowed, d.remaining) == (True, 2)


def test_slots_grant_queue_refuse_in_order():
    s = Slots(limit=2, queue=2)
    assert [s.acquire("a", w) for w in ("w1", "w2", "w3", "w4", "w5")] == [
        Admission.GRANTED, Admission.GRANTED, Admission.QUEUED, Admission.QUEUED, Admission.REFUSED]
    assert s.acquire("b", "x") is Admission.GRANTED              # keys are independent
    assert (s.held("a"), s.waiting("a"), s.held_total, s.queued_total) == (2, 2, 3, 2)
    assert s.release("a") == "w3"                                # FIFO, the slot passes on
    assert s.acquire("a", "w6") is Admission.QUEUED             # cannot overtake w4
    assert s.release("a") == "w4"
    assert s.release("a") == "w6"
    assert (s.held("a"), s.waiting("a")) == (2, 0)
    assert s.release("a") is None and s.release("a") is None
    assert (s.held("a"), s.held_total, s.queued_total) == (0, 1, 0)
    with pytest.raises(RuntimeError):
        s.release("a")


def test_slots_abandon():
    s = Slots(limit=1, queue=3)
    s.acquire("a", "held")
    s.acquire("a", "w1")
    s.acquire("a", "w2")
    assert s.abandon("a", "w1") is True                         # gave up while queued
    assert s.abandon("a", "w1") is False
    assert s.release("a") == "w2"
    assert s.abandon("a", "w2") is False                        # it holds the slot now
    assert (s.held("a"), s.queued_total) == (1, 0)


def test_slots_without_queue():
    s = Slots(limit=1, queue=0)
    assert s.acquire("a", 1) is Admission.GRANTED
    assert s.acquire("a", 2) is Admission.REFUSED


@pytest.mark.parametrize("limit, queue", [(0, 1), (1, -1)])
def test_slots_refuse_bad_shapes(limit, queue):
    with pytest.raises(ConfigError):
        Slots(limit, queue)


# ------------------------------------------------------------------ the addon, through the manager
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def manager(section: dict, clock: Clock | None = None) -> tuple[AddonManager, Metrics, RateLimit]:
    metrics = Metrics()
    mgr = AddonManager(Config(addons={"rate_limit": section}), metrics)
    addon = RateLimit(clock or Clock())
    await mgr.add(addon)
    return mgr, metrics, addon


def flow(subject: str | None, tenant: str | None = None, path: str = "/jmap/", route: str = "api",
         peer: str = "192.0.2.1") -> Flow:
    f = Flow(Request("POST", path, CIMultiDict()), id="r1", client_addr=peer)
    f.route = route
    if subject is not None:
        f.identity = Identity(subject=subject, tenant=tenant)
    return f


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_addon_rate_limit_refuses_with_retry_after_then_recovers():
    clock = Clock()
    mgr, metrics, _ = await manager({"concurrency": 0, "user": {"rate": "60/min", "burst": 2}}, clock)
    for _ in range(2):
        await mgr.run("requestheaders", flow("alice"))
    with pytest.raises(TooManyRequests) as e:
        await mgr.run("requestheaders", flow("alice"))
    status, headers, body = to_response(e.value, "r1")
    assert status == 429 and ("Retry-After", "1") in headers and b'"limit":"user"' in body
    await mgr.run("requestheaders", flow("bob"))             # another user is unaffected
    clock.now += 1.0
    await mgr.run("requestheaders", flow("alice"))
    assert sample(metrics, "sge_proxy_ratelimit_decisions_total", limit="user", result="limited") == 1
    assert sample(metrics, "sge_proxy_ratelimit_decisions_total", limit="user", result="allowed") == 4


async def test_addon_tenant_limit_and_anonymous_by_ip():
    mgr, _, _ = await manager({"concurrency": 0, "tenant": {"rate": "1/min", "burst": 1},
                               "anonymous": {"rate": "1/min", "burst": 1}})
    await mgr.run("requestheaders", flow("alice", tenant="acme"))
    with pytest.raises(TooManyRequests) as e:
        await mgr.run("requestheaders", flow("bob", tenant="acme"))
    assert e.value.extra == {"limit": "tenant"} and e.value.headers["Retry-After"] == "60"
    await mgr.run("requestheaders", flow("carol", tenant="globex"))
    await mgr.run("requestheaders", flow(None, peer="192.0.2.7"))
    with pytest.raises(TooManyRequests):
        await mgr.run("requestheaders", flow(None, peer="192.0.2.7"))
    await mgr.run("requestheaders", flow(None, peer="192.0.2.8"))


async def test_addon_ratelimit_headers_when_asked():
    mgr, _, _ = await manager({"concurrency": 0, "headers": True, "user": {"rate": "10/s", "burst": 5}})
    f = flow("alice")
    await mgr.run("requestheaders", f)
    f.response = Response.make(200, b"ok")
    await mgr.run("responseheaders", f)
    h = f.response.headers
    assert (h["X-RateLimit-Limit"], h["X-RateLimit-Remaining"], h["X-RateLimit-Reset"]) == ("5", "4", "1")


async def test_addon_concurrency_queue_then_refusal_and_release_on_done():
    mgr, metrics, addon = await manager({"concurrency": 2, "queue": 1, "queue_timeout": 0.2,
                                         "user": {"rate": "off"}})
    held = [flow("alice") for _ in range(2)]
    for f in held:
        await mgr.run("requestheaders", f)
    await mgr.run("requestheaders", flow("bob"))             # bob has his own slots
    waiter = asyncio.ensure_future(mgr.run("requestheaders", flow("alice")))
    await asyncio.sleep(0)
    assert sample(metrics, "sge_proxy_ratelimit_queue_length") == 1
    with pytest.raises(TooManyRequests) as e:                # the queue is full
        await mgr.run("requestheaders", flow("alice"))
    assert e.value.headers["Retry-After"] == "1" and e.value.extra == {"limit": "concurrency"}
    held[0].finish()                                         # the exchange is over: the slot passes on
    await asyncio.wait_for(waiter, 1)
    assert sample(metrics, "sge_proxy_ratelimit_queue_length") == 0
    assert sample(metrics, "sge_proxy_ratelimit_concurrent_requests") == 3
    # a waiter that times out gets 429 and leaves no trace
    with pytest.raises(TooManyRequests):
        await mgr.run("requestheaders", flow("alice"))
    assert sample(metrics, "sge_proxy_ratelimit_decisions_total", limit="concurrency", result="limited") == 2
    assert sample(metrics, "sge_proxy_ratelimit_decisions_total", limit="concurrency", result="queued") == 1
    assert addon._slots.waiting("u:alice") == 0 and addon._slots.held("u:alice") == 2


async def test_addon_waiter_that_leaves_gives_its_place_up():
    mgr, _, addon = await manager({"concurrency": 1, "queue": 2, "user": {"rate": "off"}})
    first = flow("alice")
    await mgr.run("requestheaders", first)
    gone = asyncio.ensure_future(mgr.run("requestheaders", flow("alice")))
    nxt = asyncio.ensure_future(mgr.run("requestheaders", flow("alice")))
    await asyncio.sleep(0)
    gone.cancel()                                            # the client went away while queued
    first.finish()
    await asyncio.wait_for(nxt, 1)
    assert gone.cancelled()
    assert addon._slots.held("u:alice") == 1 and addon._slots.waiting("u:alice") == 0


async def test_addon_long_lived_routes_take_no_slot():
    mgr, _, addon = await manager({"concurrency": 1, "queue": 0, "user": {"rate": "off"}})
    for _ in range(3):
        await mgr.run("requestheaders", flow("alice", path="/jmap/eventsource/", route="eventsource"))
    await mgr.run("requestheaders", flow("alice"))
    assert addon._slots.held("u:alice") == 1


async def test_addon_is_a_security_addon():
    assert RateLimit.security is True
    mgr, _, _ = await manager({"user": {"rate": "off"}, "anonymous": {"rate": "off"}, "concurrency": 1})
    f = flow("alice")
    f.identity = object()  # type: ignore[assignment]  # a broken identity must fail closed, not pass
    with pytest.raises(InternalError):
        await mgr.run("requestheaders", f)


@pytest.mark.parametrize("section, key", [
    ({"user": {"rate": "lots"}}, "addons.rate_limit.user.rate"),
    ({"user": {"burst": 0}}, "addons.rate_limit.user.burst"),
    ({"tenant": {"rate": "0.5/s"}}, "addons.rate_limit.tenant.burst"),
    ({"backend": "memcached"}, "addons.rate_limit.backend"),
    ({"on_redis_error": "maybe"}, "addons.rate_limit.on_redis_error"),
    ({"concurrency": -1}, "addons.rate_limit.concurrency"),
    ({"redis": {"url": "http://x"}}, "addons.rate_limit.redis.url"),
    ({"backend": "redis", "redis": {"url": "redis://:pw@127.0.0.1:port/0"}}, "addons.rate_limit.redis.url"),
    ({"rate": "1/s"}, "addons.rate_limit.rate"),
])
async def test_bad_options_name_the_key(section, key):
    with pytest.raises(ConfigError) as e:
        await manager(section)
    assert e.value.key == key


def test_try_take_agrees_with_take() -> None:
    from proxy.ratelimit import Limit, MemoryBuckets
    lim = Limit("user", 1.0, 2.0)
    fast, full = MemoryBuckets(), MemoryBuckets()
    for now in (0.0, 0.1, 0.2, 0.3, 1.5, 1.6, 1.7, 10.0):
        assert fast.try_take("u", lim, now) == full.take(["u"], [lim], now).allowed
        assert fast._state == full._state


def test_try_acquire_grants_only_free_slots() -> None:
    from proxy.ratelimit import Admission, Slots
    slots = Slots(1, 1)
    assert slots.try_acquire("u") is True and slots.held("u") == 1
    assert slots.try_acquire("u") is False and slots.held("u") == 1 and slots.waiting("u") == 0
    assert slots.acquire("u", "w") is Admission.QUEUED
    assert slots.release("u") == "w"
