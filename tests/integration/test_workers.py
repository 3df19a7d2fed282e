"""--workers 2 as real processes: both workers serve on the one port, the supervisor's /metrics
adds them up, a killed worker comes back, SIGTERM drains them all."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest

from proxy.workers import restart_delay
from tests.conftest import proxy_env
from tests.harness import ProxyProcess, start_app
from tests.loadgen import RECORD, sigterm_under_load, work_app


@pytest.fixture
async def upstream(server_ssl):
    app = work_app()
    runner, port = await start_app(app, server_ssl)
    yield app, f"https://127.0.0.1:{port}"
    await runner.cleanup()


async def start_workers(certs, url, n: int = 2, **env) -> ProxyProcess:
    return await asyncio.to_thread(ProxyProcess, proxy_env(certs, url, SGE_CHAIN="", **env), ["--workers", str(n)])


async def get_json(client, url: str) -> tuple[int, dict]:
    async with client.get(url) as r:
        return r.status, await r.json()


async def until_ready(client, admin: str) -> dict:
    for _ in range(200):
        status, body = await get_json(client, admin + "/readyz")
        if status == 200:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"not ready: {body}")


def metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def test_two_workers_share_the_port_and_their_metrics_add_up(certs, upstream, tmp_path):
    app, url = upstream
    access = tmp_path / "access.log"
    p = await start_workers(certs, url, SGE_ACCESS_LOG=str(access))
    try:
        base, admin = f"http://127.0.0.1:{p.port}", f"http://127.0.0.1:{p.admin_port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            ready = await until_ready(client, admin)
            assert [w["worker"] for w in ready["workers"]] == [0, 1]
            _, listing = await get_json(client, admin + "/workers")
            pids = {w["pid"] for w in listing["workers"]}
            assert len(pids) == 2 and p.proc.pid not in pids

            sem = asyncio.Semaphore(8)

            async def one(n: int) -> int:
                async with sem, client.get(f"{base}/work/{n}") as r:  # a new connection each time
                    await r.read()
                    return r.status

            assert await asyncio.gather(*(one(n) for n in range(60))) == [200] * 60
            async with client.get(admin + "/metrics") as r:
                text = await r.text()
            assert metric(text, "sge_proxy_requests_total{") == 60  # summed across the workers
            assert "sge_proxy_workers 2.0" in text
            for _ in range(100):  # the access logs are flushed every 200 ms
                lines = [json.loads(x) for x in access.read_text().splitlines()] if access.exists() else []
                if len(lines) == 60:
                    break
                await asyncio.sleep(0.05)
            per_worker = {w: sum(1 for x in lines if x["worker"] == w) for w in (0, 1)}
            assert sum(per_worker.values()) == 60 and min(per_worker.values()) > 0, per_worker

            # POST /reload reaches every worker
            async with client.post(admin + "/reload") as r:
                body = await r.json()
                assert r.status == 200, body
            assert [w["status"] for w in body["workers"]] == ["reloaded", "reloaded"]
            # so does SIGHUP, forwarded to each worker
            p.proc.send_signal(signal.SIGHUP)
            for _ in range(200):
                async with client.get(admin + "/metrics") as r:
                    reloads = metric(await r.text(), 'sge_proxy_config_reloads_total{result="ok"}')
                if reloads == 4:
                    break
                await asyncio.sleep(0.05)
            assert reloads == 4

            # a worker killed outright is restarted; the port keeps being served meanwhile (once
            # it is gone: connections the kernel had queued for it die with it)
            victim = listing["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            for _ in range(200):
                _, listing = await get_json(client, admin + "/workers")
                if listing["workers"][0]["pid"] != victim or not listing["workers"][0]["running"]:
                    break
                await asyncio.sleep(0.02)
            assert await asyncio.gather(*(one(n) for n in range(100, 110))) == [200] * 10
            for _ in range(200):
                _, listing = await get_json(client, admin + "/workers")
                w0 = listing["workers"][0]
                if w0["running"] and w0["pid"] != victim:
                    break
                await asyncio.sleep(0.05)
            assert w0["restarts"] == 1 and w0["pid"] != victim
            await until_ready(client, admin)
            async with client.get(admin + "/metrics") as r:
                assert "sge_proxy_worker_restarts_total 1.0" in await r.text()
        assert app[RECORD].started == set(range(60)) | set(range(100, 110))
    finally:
        p.stop()


async def test_sigterm_drains_every_worker(certs, upstream):
    app, url = upstream
    p = await start_workers(certs, url, SGE_ACCESS_LOG="off")
    try:
        await sigterm_under_load(p, app, fresh_connections=True)
    finally:
        p.stop()


@pytest.mark.parametrize("deaths,delay", [(0, 0.25), (1, 0.5), (3, 2.0), (7, 30.0), (50, 30.0)])
def test_restart_backoff(deaths, delay):
    assert restart_delay(deaths) == delay
