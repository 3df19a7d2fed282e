"""Failover, retries, health checks, ejection and the circuit breaker against real mTLS upstreams on
127.0.0.1. A route (primary + fallbacks) is set by a tiny addon the way the resolver sets it;
clients come from distinct loopback addresses (127.0.0.2-5) so the proxy sees distinct peers."""
from __future__ import annotations

import asyncio
import json
import collections
import socket
import time

import aiohttp
import pytest
from aiohttp import web

from proxy.admin import AdminServer
from proxy.target import parse_target
from tests.harness import RouteTo, start_app, start_proxy

STATE: web.AppKey[dict] = web.AppKey("state", dict)
FAST = {  # small numbers so that a test sees every transition within a second or two
    "stalwart.health_interval": 3600, "stalwart.request_timeout": 1.0, "breaker.window": "2s",
    "breaker.min_requests": 6, "breaker.min_clients": 3, "breaker.open_time": "400ms",
    "breaker.ejection_time": "400ms", "breaker.consecutive_failures": 4,
}


def server_app(name: str) -> web.Application:
    """An upstream that says who it is. /boom answers 500, /healthz/ready answers state["ready"],
    /drop reads the request and closes the connection without an answer."""
    app = web.Application()
    state = {"ready": 200, "hits": collections.Counter()}
    app[STATE] = state

    async def ready(r: web.Request) -> web.Response:
        return web.Response(status=state["ready"])

    async def boom(r: web.Request) -> web.Response:
        state["hits"][r.path] += 1
        return web.json_response({"boom": True}, status=500)

    async def drop(r: web.Request) -> web.Response:
        await r.read()
        state["hits"][r.path] += 1
        assert r.transport is not None
        r.transport.abort()
        await asyncio.sleep(1)
        return web.Response()

    async def echo(r: web.Request) -> web.Response:
        await r.read()
        state["hits"][r.path] += 1
        return web.json_response({"server": name, "path": r.path})

    app.router.add_get("/healthz/ready", ready)
    app.router.add_route("*", "/boom", boom)
    app.router.add_route("*", "/drop", drop)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def servers(server_ssl):
    """Two mTLS upstreams, a and b: name -> (app state, url)."""
    out, runners = {}, []
    for name in ("a", "b"):
        app = server_app(name)
        runner, port = await start_app(app, server_ssl)
        runners.append(runner)
        out[name] = (app[STATE], f"https://127.0.0.1:{port}")
    yield out
    for r in runners:
        await r.cleanup()


@pytest.fixture
async def proxies():
    engines = []

    async def make(certs, default: str, route: RouteTo | None, **over):
        eng = await start_proxy(certs, default, addon_objects=[route] if route else [], **{**FAST, **over})
        engines.append(eng)
        return eng, f"http://127.0.0.1:{eng.port}"
    yield make
    for e in engines:
        await e.stop(drain_timeout=0)


@pytest.fixture
async def clients():
    """Sessions bound to 127.0.0.2..5: four distinct client addresses."""
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(f"127.0.0.{i}", 0)))
                for i in range(2, 6)]
    yield sessions
    for s in sessions:
        await s.close()


async def call(session: aiohttp.ClientSession, url: str, method: str = "POST") -> tuple[int, dict]:
    async with session.request(method, url, data=b'{"using":[],"methodCalls":[]}' if method == "POST" else None) as r:
        body = await r.json(content_type=None)
        return r.status, body


def server_of(eng, url: str) -> dict:
    origin = parse_target(url).origin
    return next(s for s in eng.health.snapshot() if s["upstream"] == origin)


def sample(eng, name: str, **labels: str) -> float | None:
    return eng.metrics.registry.get_sample_value(name, labels)


# ---------------------------------------------------------------------------- failover and retries
async def test_dead_primary_fails_over_to_the_fallback_and_is_ejected(certs, servers, proxies, clients, tmp_path):
    dead = dead_url()
    audit = tmp_path / "audit.log"
    eng, base = await proxies(certs, servers["a"][1], RouteTo(dead, servers["b"][1]), audit_log=str(audit))
    results = [await call(clients[0], base + "/jmap/") for _ in range(8)]
    assert [s for s, _ in results] == [200] * 8  # POSTs: never sent to the dead server, so retried
    assert {b["server"] for _, b in results} == {"b"}
    st = server_of(eng, dead)
    assert st["ejections"] == 1 and st["ejected_until"] is not None  # 4 connect failures, one client
    # while ejected the dead server is not even tried: retries stopped at the ejection
    assert sample(eng, "sge_proxy_upstream_retries_total", upstream=parse_target(dead).origin,
                  reason="upstream_connect_failed") == 4
    assert sample(eng, "sge_proxy_circuit_state", upstream=parse_target(dead).origin) == 2.0
    assert sample(eng, "sge_proxy_upstream_ejections_total", upstream=parse_target(dead).origin) == 1
    # the audit log tells which requests went elsewhere, and why
    eng.audit._out.flush()
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    failovers = [e for e in events if e["event"] == "routing.failover"]
    assert len(failovers) == 8
    assert {(e["primary"], e["upstream"]) for e in failovers} == {(dead, servers["b"][1])}
    assert [e["reason"] for e in failovers[:4]] == ["upstream_connect_failed"] * 4  # tried, never reached
    assert {e["reason"] for e in failovers[4:]} == {"unhealthy_or_open"}  # ejected: not even tried
    assert {"event": "upstream.circuit", "upstream": parse_target(dead).origin, "state": "open"}.items() <= \
        next(e for e in events if e["event"] == "upstream.circuit").items()


async def test_dead_server_without_fallback_is_retried_then_refused_fast(certs, proxies, clients):
    dead = dead_url()
    eng, base = await proxies(certs, dead, None, **{"breaker.ejection_time": "5s"})
    t0 = time.monotonic()
    status, body = await call(clients[0], base + "/jmap/")
    assert status == 502 and body["type"].endswith("upstream_connect_failed")
    assert time.monotonic() - t0 < 1.0  # 2 retries with 25/50 ms full-jitter backoff
    status, _ = await call(clients[0], base + "/jmap/")  # its first try is the fourth failure: ejected,
    assert status == 502                                  # so no retry of this one
    assert sample(eng, "sge_proxy_upstream_retries_total", upstream=parse_target(dead).origin,
                  reason="upstream_connect_failed") == 2
    t0 = time.monotonic()
    status, body = await call(clients[0], base + "/jmap/")
    assert status == 503 and body["type"].endswith("circuit_open")
    assert time.monotonic() - t0 < 0.2


async def test_a_post_that_reached_the_server_is_never_retried(certs, servers, proxies, clients):
    eng, base = await proxies(certs, servers["a"][1], RouteTo(servers["a"][1], servers["b"][1]))
    status, body = await call(clients[0], base + "/drop")
    assert status == 502 and body["type"].endswith("upstream_protocol_error")
    assert servers["a"][0]["hits"]["/drop"] == 1 and servers["b"][0]["hits"]["/drop"] == 0


# ---------------------------------------------------------------------------- the circuit breaker
async def test_one_bad_client_cannot_open_the_breaker(certs, servers, proxies, clients):
    a, b = servers["a"][1], servers["b"][1]
    eng, base = await proxies(certs, a, RouteTo(a, b))
    bad = clients[0]
    for _ in range(30):  # 30 failures in a row, all from 127.0.0.2
        assert (await call(bad, base + "/boom"))[0] == 500
    st = server_of(eng, a)
    assert st["circuit"] == "closed" and st["ejected_until"] is None and st["failures"] == 30
    assert st["window"]["failing_clients"] == 1
    for c in clients[1:]:  # everyone else is still served by the primary
        status, body = await call(c, base + "/jmap/")
        assert status == 200 and body["server"] == "a"


async def test_failures_from_three_clients_open_the_breaker_then_a_trial_closes_it(certs, servers, proxies,
                                                                                 clients):
    a, b = servers["a"][1], servers["b"][1]
    eng, base = await proxies(certs, a, RouteTo(a, b), **{"breaker.consecutive_failures": 1000})
    admin = AdminServer(eng)
    await admin.start()
    try:
        for i in range(6):  # 6 failures from 3 clients: ratio 1, min_requests 6
            assert (await call(clients[i % 3], base + "/boom"))[0] == 500
        origin = parse_target(a).origin
        assert sample(eng, "sge_proxy_circuit_state", upstream=origin) == 2.0
        async with clients[3].get(f"http://127.0.0.1:{admin.port}/upstreams") as r:
            listed = {s["upstream"]: s for s in (await r.json())["servers"]}
        assert listed[origin]["circuit"] == "open" and listed[origin]["open_until"] > time.time()
        assert listed[origin]["window"]["failing_clients"] == 3
        # open: the route's fallback serves, even what the primary failed
        status, body = await call(clients[3], base + "/jmap/")
        assert status == 200 and body["server"] == "b"
        hits_a = servers["a"][0]["hits"]["/jmap/"]
        await asyncio.sleep(0.45)  # open_time: the next request is the trial, to the primary
        status, body = await call(clients[3], base + "/jmap/")
        assert status == 200 and body["server"] == "a"
        assert servers["a"][0]["hits"]["/jmap/"] == hits_a + 1
        assert sample(eng, "sge_proxy_circuit_state", upstream=origin) == 0.0
        for frm, to in (("closed", "open"), ("open", "half-open"), ("half-open", "closed")):
            assert sample(eng, "sge_proxy_circuit_transitions_total", upstream=origin, **{"from": frm, "to": to}) == 1
    finally:
        await admin.stop()


# ---------------------------------------------------------------------------- health checks
async def test_health_checks_steer_traffic_and_readiness_follows_the_default(certs, servers, proxies, clients):
    (sa, a), (_, b) = servers["a"], servers["b"]
    eng, base = await proxies(certs, a, RouteTo(a, b), **{"stalwart.health_interval": "100ms"})
    origin = parse_target(a).origin
    assert (await call(clients[0], base + "/jmap/"))[1]["server"] == "a"
    sa["ready"] = 503

    async def until(cond, what):
        for _ in range(60):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(what)

    await until(lambda: server_of(eng, a)["health"] == "unhealthy", "a never became unhealthy")
    assert server_of(eng, a)["last_check"]["status"] == 503
    assert sample(eng, "sge_proxy_upstream_healthy", upstream=origin) == 0.0
    assert (await call(clients[0], base + "/jmap/"))[1]["server"] == "b"
    ready, checks = eng.readiness()
    assert ready and checks["upstream"].startswith("failing") and "upstream" in eng.degraded()
    sa["ready"] = 200
    await until(lambda: server_of(eng, a)["health"] == "healthy", "a never recovered")
    assert (await call(clients[0], base + "/jmap/"))[1]["server"] == "a"
    assert eng.readiness()[1]["upstream"] == "ok" and eng.degraded() == []


async def test_unhealthy_everywhere_still_tries_the_primary(certs, servers, proxies, clients):
    (sa, a), (sb, b) = servers["a"], servers["b"]
    sa["ready"] = sb["ready"] = 404  # a health endpoint that is wrong while the API works
    eng, base = await proxies(certs, a, RouteTo(a, b), **{"stalwart.health_interval": "100ms"})
    assert (await call(clients[0], base + "/jmap/"))[0] == 200  # the route is in use: b is checked too
    for _ in range(60):
        if server_of(eng, a)["health"] == "unhealthy" and server_of(eng, b)["health"] == "unhealthy":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the checks never failed")
    status, body = await call(clients[0], base + "/jmap/")
    assert status == 200 and body["server"] == "a"
