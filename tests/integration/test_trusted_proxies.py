"""trusted_proxies: behind a load balancer, the client is the one its X-Forwarded-For names,
for the upstream's X-Forwarded-For, the logs and the address bans; from anyone else the header
is dropped as before."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.harness import SEEN, start_app, start_proxy, upstream_app
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey


@pytest.fixture
async def upstream(server_ssl):
    app = upstream_app()
    runner, port = await start_app(app, server_ssl)
    yield app, f"https://127.0.0.1:{port}"
    await runner.cleanup()


def forwarded_for(app) -> list[str]:
    return [v for k, v in app[SEEN][-1]["headers"] if k.lower() == "x-forwarded-for"]


async def send(port: int, headers: list[tuple[str, str]]) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/echo", headers=headers) as r:
            await r.read()
            return r.status


@pytest.mark.parametrize("trusted, sent, seen", [
    (["127.0.0.0/8"], [("X-Forwarded-For", "198.51.100.7, 192.0.2.1")], ["192.0.2.1"]),
    (["127.0.0.0/8"], [("X-Forwarded-For", "192.0.2.1"), ("X-Forwarded-For", "127.0.0.5")], ["192.0.2.1"]),
    (["127.0.0.0/8"], [], ["127.0.0.1"]),                                  # no header: the peer
    ([], [("X-Forwarded-For", "192.0.2.1")], ["127.0.0.1"]),               # not trusted: dropped
    (["10.0.0.0/8"], [("X-Forwarded-For", "192.0.2.1")], ["127.0.0.1"]),   # another network's
])
async def test_the_upstream_gets_exactly_one_address(certs, upstream, trusted, sent, seen, tmp_path):
    app, url = upstream
    eng = await start_proxy(certs, url, trusted_proxies=trusted, access_log=str(tmp_path / "access.log"))
    try:
        assert await send(eng.port, sent) == 200
        assert forwarded_for(app) == seen
        await asyncio.sleep(0.4)
        line = json.loads((tmp_path / "access.log").read_text().splitlines()[-1])
        assert line["client"] == seen[0]
    finally:
        await eng.stop(drain_timeout=1)


async def test_bans_hit_the_client_behind_the_balancer_not_the_balancer(certs, upstream):
    _, url = upstream
    async with JwksServer() as idp:
        idp.publish(SigningKey("k1"))
        eng = await start_proxy(certs, url, chain=["auth"], trusted_proxies=["127.0.0.0/8"], **{
            "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url},
                            "bans": {"failures": 3}}})
        try:
            good = idp.keys[0].token("alice@example.com")
            attacker = [("X-Forwarded-For", "203.0.113.66")]
            for _ in range(3):
                assert await send(eng.port, attacker + [("Authorization", "Bearer nope")]) == 401
            assert await send(eng.port, attacker + [("Authorization", f"Bearer {good}")]) == 429
            other = [("X-Forwarded-For", "203.0.113.77"), ("Authorization", f"Bearer {good}")]
            assert await send(eng.port, other) == 200  # another client through the same balancer
        finally:
            await eng.stop(drain_timeout=1)
