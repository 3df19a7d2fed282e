"""The rate_limit addon in a real proxy (auth with API keys, then rate_limit) in front of a real
mTLS upstream: concurrency slots held until the exchange is over, the queue, and token buckets."""
from __future__ import annotations

import asyncio
import time


from proxy.tokens import hash_api_key
from tests.harness import start_proxy

KEYS = {"alice": "sgek_alice-0123456789", "bob": "sgek_bob-0123456789", "carol": "sgek_carol-0123456789"}
TENANTS = {"alice": "acme", "bob": "acme", "carol": "globex"}
AUTH = {"api_keys": {"keys": [{"sha256": hash_api_key(k), "subject": u, "tenant": TENANTS[u]}
                              for u, k in KEYS.items()]}}


def as_user(user: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[user]}


async def limited_proxy(certs, upstream, limits: dict):
    return await start_proxy(certs, upstream, chain=["auth", "rate_limit"],
                             **{"addons.auth": AUTH, "addons.rate_limit": limits})


def gauge(eng, name: str) -> float:
    return eng.metrics.registry.get_sample_value(name) or 0.0


def decisions(eng, limit: str, result: str) -> float:
    return eng.metrics.registry.get_sample_value(
        "sge_proxy_ratelimit_decisions_total", {"limit": limit, "result": result}) or 0.0


async def until(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def get(client, base: str, path: str, user: str) -> tuple[int, dict, bytes, float]:
    t0 = time.monotonic()
    async with client.get(base + path, headers=as_user(user)) as r:
        return r.status, dict(r.headers), await r.read(), time.monotonic() - t0


async def test_fifth_concurrent_request_queues_then_gets_429_other_user_unaffected(certs, upstream, client):
    eng = await limited_proxy(certs, upstream, {"concurrency": 4, "queue": 8, "queue_timeout": "400ms"})
    base = f"http://127.0.0.1:{eng.port}"
    try:
        running = [asyncio.ensure_future(get(client, base, "/slow/1500", "alice")) for _ in range(4)]
        await until(lambda: gauge(eng, "sge_proxy_ratelimit_concurrent_requests") == 4)
        fifth = asyncio.ensure_future(get(client, base, "/slow/0", "alice"))
        await until(lambda: gauge(eng, "sge_proxy_ratelimit_queue_length") == 1)
        status, _, _, took = await get(client, base, "/slow/0", "bob")   # bob is not held up
        assert status == 200 and took < 0.4
        status, headers, body, took = await fifth
        assert status == 429 and took >= 0.35                              # it waited in the queue first
        assert headers["Retry-After"] == "1" and headers["Content-Type"] == "application/problem+json"
        assert b'"limit":"concurrency"' in body and b'"requestId"' in body
        assert [r[0] for r in await asyncio.gather(*running)] == [200] * 4
        # every slot came back when those exchanges ended
        assert gauge(eng, "sge_proxy_ratelimit_concurrent_requests") == 0
        assert (await get(client, base, "/slow/0", "alice"))[0] == 200
        assert decisions(eng, "concurrency", "limited") == 1
    finally:
        await eng.stop(drain_timeout=1)


async def test_queued_request_is_served_when_a_slot_frees_and_a_full_queue_refuses(certs, upstream, client):
    eng = await limited_proxy(certs, upstream, {"concurrency": 2, "queue": 1, "queue_timeout": "3s"})
    base = f"http://127.0.0.1:{eng.port}"
    try:
        running = [asyncio.ensure_future(get(client, base, "/slow/600", "alice")) for _ in range(2)]
        await until(lambda: gauge(eng, "sge_proxy_ratelimit_concurrent_requests") == 2)
        queued = asyncio.ensure_future(get(client, base, "/slow/0", "alice"))
        await until(lambda: gauge(eng, "sge_proxy_ratelimit_queue_length") == 1)
        status, headers, _, took = await get(client, base, "/slow/0", "alice")
        assert status == 429 and took < 0.3 and headers["Retry-After"] == "1"   # no room in the queue
        status, _, _, took = await queued
        assert status == 200 and took >= 0.4
        await asyncio.gather(*running)
        assert decisions(eng, "concurrency", "queued") == 1
    finally:
        await eng.stop(drain_timeout=1)


async def test_slot_is_released_when_the_client_goes_away(certs, upstream, client):
    eng = await limited_proxy(certs, upstream, {"concurrency": 1, "queue": 0})
    base = f"http://127.0.0.1:{eng.port}"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.port)
        writer.write(b"GET /slow/5000 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEYS["alice"].encode() + b"\r\n\r\n")
        await writer.drain()
        await until(lambda: gauge(eng, "sge_proxy_ratelimit_concurrent_requests") == 1)
        assert (await get(client, base, "/slow/0", "alice"))[0] == 429
        writer.close()                                          # the client leaves mid-exchange
        await until(lambda: gauge(eng, "sge_proxy_ratelimit_concurrent_requests") == 0, timeout=2)
        assert (await get(client, base, "/slow/0", "alice"))[0] == 200
    finally:
        await eng.stop(drain_timeout=1)


async def test_rate_limit_429_with_retry_after_then_recovery(certs, upstream, client):
    eng = await limited_proxy(certs, upstream, {"concurrency": 0, "headers": True,
                                                "user": {"rate": "4/s", "burst": 2},
                                                "tenant": {"rate": "2/s", "burst": 3}})
    base = f"http://127.0.0.1:{eng.port}"
    try:
        status, headers, _, _ = await get(client, base, "/jmap/", "alice")
        assert status == 200
        assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("2", "1")
        assert (await get(client, base, "/jmap/", "alice"))[0] == 200
        status, headers, body, _ = await get(client, base, "/jmap/", "alice")
        assert status == 429 and headers["Retry-After"] == "1" and b'"limit":"user"' in body
        assert headers["X-RateLimit-Remaining"] == "0"
        # alice's tenant has one token left, which bob (same tenant) takes; then the tenant is dry
        assert (await get(client, base, "/jmap/", "bob"))[0] == 200
        status, _, body, _ = await get(client, base, "/jmap/", "bob")
        assert status == 429 and b'"limit":"tenant"' in body
        assert (await get(client, base, "/jmap/", "carol"))[0] == 200   # another tenant
        await asyncio.sleep(0.55)                                       # the buckets refill
        assert (await get(client, base, "/jmap/", "alice"))[0] == 200
        assert decisions(eng, "user", "limited") == 1 and decisions(eng, "tenant", "limited") == 1
    finally:
        await eng.stop(drain_timeout=1)


async def test_default_chain_has_rate_limit_right_after_auth():
    from addons import BUILTIN, DEFAULT_CHAIN
    assert DEFAULT_CHAIN[DEFAULT_CHAIN.index("auth") + 1] == "rate_limit"
    assert BUILTIN["rate_limit"] == "addons.rate_limit:RateLimit"
