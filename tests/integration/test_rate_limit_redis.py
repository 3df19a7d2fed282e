"""The redis backend against a real redis-server started by the test on a free port: replicas share
one budget, a dead or hung Redis fails open (or closed, as configured) without stalling the
proxy, and the limits come back with Redis. Skipped without redis-server unless
SGE_E2E_REQUIRED=1, where its absence fails."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

from tests.conftest import free_port
from tests.harness import start_proxy
from tests.integration.test_rate_limit import AUTH, KEYS

REDIS_SERVER = shutil.which("redis-server")


def _require(what: str, present: bool) -> None:
    if not present:
        if os.environ.get("SGE_E2E_REQUIRED") == "1":
            pytest.fail(f"{what} is required (SGE_E2E_REQUIRED=1) but missing")
        pytest.skip(f"{what} is not available")


class RedisServer:
    """A private redis-server process: no persistence, loopback only."""

    def __init__(self, workdir) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis_server(tmp_path):
    _require("redis-server", REDIS_SERVER is not None)
    try:
        import redis  # noqa: F401
    except ImportError:
        _require("the redis package", False)
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # in case a test left it stopped
    server.kill()


async def redis_proxy(certs, upstream, redis_url: str, prefix: str, timeout: str = "1s", **limits):
    """A proxy sharing its buckets through Redis. The Redis deadline is generous by default, so
    that a loaded test machine cannot turn a budget test into a fail-open one; the hung-Redis
    test sets the real 50 ms default."""
    section = {"backend": "redis", "concurrency": 0, "user": {"rate": "1/min", "burst": 2},
               "redis": {"url": redis_url, "key_prefix": prefix, "timeout": timeout, "retry_interval": "200ms"},
               **limits}
    eng = await start_proxy(certs, upstream, chain=["auth", "rate_limit"],
                            **{"addons.auth": AUTH, "addons.rate_limit": section})
    return eng, f"http://127.0.0.1:{eng.port}"


async def status(client, base: str, user: str = "alice") -> tuple[int, dict, bytes, float]:
    t0 = time.monotonic()
    async with client.get(base + "/jmap/", headers={"X-API-Key": KEYS[user]}) as r:
        return r.status, dict(r.headers), await r.read(), time.monotonic() - t0


def metric(eng, name: str, **labels: str) -> float:
    return eng.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_two_proxies_share_one_budget_and_idle_keys_expire(certs, upstream, redis_server, client):
    import redis.asyncio as aioredis
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    a, base_a = await redis_proxy(certs, upstream, redis_server.url, prefix, user={"rate": "1/min", "burst": 4})
    b, base_b = await redis_proxy(certs, upstream, redis_server.url, prefix, user={"rate": "1/min", "burst": 4})
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        got = [(await status(client, base))[0] for base in (base_a, base_b, base_a, base_b)]
        assert got == [200] * 4
        sa, ha, body, _ = await status(client, base_a)
        sb, _, _, _ = await status(client, base_b)
        assert (sa, sb) == (429, 429)
        assert 59 <= int(ha["Retry-After"]) <= 60 and b'"limit":"user"' in body
        assert (await status(client, base_b, "carol"))[0] == 200      # her own bucket
        key = f"{prefix}u:alice"
        assert await r.exists(key)
        assert 200_000 < await r.pttl(key) <= 241_000                 # until full again, plus a second
        assert metric(a, "sge_proxy_ratelimit_decisions_total", limit="user", result="limited") == 1
    finally:
        await r.aclose()
        await a.stop(drain_timeout=1)
        await b.stop(drain_timeout=1)


async def test_redis_down_fails_open_or_closed_then_recovers(certs, upstream, redis_server, client):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    opened, base_open = await redis_proxy(certs, upstream, redis_server.url, prefix + "o:")
    closed, base_closed = await redis_proxy(certs, upstream, redis_server.url, prefix + "c:",
                                            on_redis_error="closed")
    try:
        for base in (base_open, base_closed):
            assert [(await status(client, base))[0] for _ in range(3)] == [200, 200, 429]

        redis_server.kill()
        for _ in range(4):                                             # the open proxy keeps serving
            code, _, _, took = await status(client, base_open)
            assert code == 200 and took < 0.5
        code, headers, body, _ = await status(client, base_closed)     # the closed one refuses
        assert code == 503 and headers["Content-Type"] == "application/problem+json"
        assert headers["Retry-After"] == "1" and b"limits_unavailable" in body
        assert metric(opened, "sge_proxy_ratelimit_backend_errors_total", kind="connection") >= 1
        assert metric(opened, "sge_proxy_ratelimit_decisions_total", limit="user", result="failed_open") == 4
        assert metric(closed, "sge_proxy_ratelimit_decisions_total", limit="user", result="failed_closed") == 1

        redis_server.start()                                           # empty: the script is gone too
        await asyncio.sleep(0.3)                                       # past retry_interval
        for base in (base_open, base_closed):
            assert [(await status(client, base))[0] for _ in range(3)] == [200, 200, 429]
    finally:
        await opened.stop(drain_timeout=1)
        await closed.stop(drain_timeout=1)


async def test_hung_redis_does_not_stall_requests(certs, upstream, redis_server, client):
    eng, base = await redis_proxy(certs, upstream, redis_server.url, f"t{uuid.uuid4().hex[:8]}:",
                                  timeout="50ms", user={"rate": "100/s", "burst": 100})
    try:
        assert (await status(client, base))[0] == 200
        os.kill(redis_server.proc.pid, signal.SIGSTOP)                 # accepts nothing, answers nothing
        try:
            code, _, _, took = await status(client, base)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert code == 200 and took < 0.5                              # the 50 ms deadline, then fail open
        assert metric(eng, "sge_proxy_ratelimit_backend_errors_total", kind="timeout") == 1
        await asyncio.sleep(0.3)
        assert (await status(client, base))[0] == 200
        assert metric(eng, "sge_proxy_ratelimit_decisions_total", limit="user", result="allowed") == 2
    finally:
        await eng.stop(drain_timeout=1)
