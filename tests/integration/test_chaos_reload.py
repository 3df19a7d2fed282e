"""Chaos, bounded and on loopback: the proxy as a real process under continuous load from 16
clients while its configuration is reloaded (POST /reload, a refused bad file, SIGHUP), and while
it is told to stop (SIGTERM)."""
from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
import yaml

from tests.conftest import proxy_env
from tests.harness import ProxyProcess, start_app
from tests.loadgen import RECORD, STAMP, Load, sigterm_under_load, work_app


@pytest.fixture
async def upstream(server_ssl):
    app = work_app()
    runner, port = await start_app(app, server_ssl)
    yield app, f"https://127.0.0.1:{port}"
    await runner.cleanup()


async def start(env, args) -> ProxyProcess:
    return await asyncio.to_thread(ProxyProcess, env, args)


async def metric(client, admin: str, name: str) -> float:
    async with client.get(admin + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_reload_under_load_drops_nothing(certs, upstream, tmp_path):
    app, url = upstream
    addon, conf, done_log = tmp_path / "stamp.py", tmp_path / "proxy.yaml", tmp_path / "done.log"
    addon.write_text(STAMP)

    def write(tag):
        conf.write_text(yaml.safe_dump({"chain": [str(addon)],
                                        "addons": {"stamp": {"tag": tag, "done_log": str(done_log)}}}))

    write("one")
    p = await start(proxy_env(certs, url, SGE_ACCESS_LOG="off"), ["--config", str(conf)])
    loop = asyncio.get_running_loop()
    try:
        admin = f"http://127.0.0.1:{p.admin_port}"
        load = Load(f"http://127.0.0.1:{p.port}", clients=16, ms=20)
        await load.start()
        async with aiohttp.ClientSession() as client:
            await asyncio.sleep(0.4)
            write("two")
            async with client.post(admin + "/reload") as r:
                assert r.status == 200, await r.text()
            t_two = loop.time()
            await asyncio.sleep(0.4)
            conf.write_text("chain: [unclosed\n")  # a bad file: refused, traffic goes on on "two"
            async with client.post(admin + "/reload") as r:
                assert r.status == 422 and "invalid YAML" in (await r.json())["error"]
            await asyncio.sleep(0.4)
            write("three")
            t_hup = loop.time()
            p.proc.send_signal(signal.SIGHUP)
            for _ in range(200):
                if load.results and load.results[-1].stamp == "three":
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            results = await load.stop()
            assert await metric(client, admin, 'sge_proxy_config_reloads_total{result="ok"}') == 2
            assert await metric(client, admin, 'sge_proxy_config_reloads_total{result="failed"}') == 1
        failed = [r for r in results if r.status != 200]
        assert not failed, f"{len(failed)} failed, e.g. {failed[0]}"
        assert len(results) >= 300, len(results)
        assert {r.stamp for r in results} == {"one", "two", "three"}
        # a request that began after the reload answered never ran on the old chain
        assert {r.stamp for r in results if r.started > t_two} <= {"two", "three"}
        assert {r.stamp for r in results if t_two < r.started < t_hup} == {"two"}
        assert results[-1].stamp == "three"
        assert app[RECORD].started == app[RECORD].finished == {r.n for r in results}
        # each old chain was retired only once its last request was done
        for _ in range(100):
            if len(done_log.read_text().splitlines() if done_log.exists() else []) == 2:
                break
            await asyncio.sleep(0.02)
        assert done_log.read_text().splitlines() == ["one active=0", "two active=0"]
    finally:
        p.stop()


async def test_sigterm_under_load_completes_in_flight_and_refuses_new(certs, upstream):
    app, url = upstream
    p = await start(proxy_env(certs, url, SGE_CHAIN="", SGE_ACCESS_LOG="off"), [])
    try:
        await sigterm_under_load(p, app)
    finally:
        p.stop()
