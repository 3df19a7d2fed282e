"""Hot reload in process (Engine.reload through the admin POST /reload) against real mTLS
upstreams: the new chain for new requests, the old one finishing its requests, refusals."""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.admin import AdminServer
from proxy.config import load_config
from proxy.engine import Engine
from proxy.errors import NoUpstream
from tests.harness import SEEN, eventually, start_app, upstream_app
from tests.loadgen import STAMP

@pytest.fixture
async def upstreams(server_ssl):
    out = []
    for _ in range(2):
        app = upstream_app()
        runner, port = await start_app(app, server_ssl)
        out.append((app, f"https://127.0.0.1:{port}", runner))
    yield [(app, url) for app, url, _ in out]
    for _, _, runner in out:
        await runner.cleanup()


class Setup:
    def __init__(self, tmp_path: Path, certs: Path, upstream: str) -> None:
        self.dir = tmp_path
        self.config_file = tmp_path / "proxy.yaml"
        self.addon_file = tmp_path / "stamp.py"
        self.addon_file.write_text(STAMP)
        self.done_log = tmp_path / "done.log"
        self.certs = certs
        self.write(tag="one", url=upstream)

    def write(self, *, tag: str, url: str, **extra) -> None:
        doc = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "access_log": "off",
               "audit_log": str(self.dir / "audit.log"),
               "addon_reload_interval": "100ms", "chain": [str(self.addon_file)],
               "stalwart": {"url": url, "request_timeout": 5},
               "addons": {"stamp": {"tag": tag, "done_log": str(self.done_log)}}}
        doc.update(extra)
        self.config_file.write_text(yaml.safe_dump(doc))

    def load(self):
        c = self.certs
        return load_config(self.config_file, env={}, overrides={
            "stalwart.client_cert": str(c / "client.crt"), "stalwart.client_key": str(c / "client.key"),
            "stalwart.ca_cert": str(c / "ca.crt")})

    def done(self) -> list[str]:
        return self.done_log.read_text().splitlines() if self.done_log.exists() else []

    def audit(self, eng) -> list[dict]:
        eng.audit._out.flush()
        path = self.dir / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
async def proxy(tmp_path, certs, upstreams):
    setup = Setup(tmp_path, certs, upstreams[0][1])
    eng = Engine(setup.load(), config_loader=setup.load)
    await eng.start()
    admin = AdminServer(eng)
    await admin.start()
    async with aiohttp.ClientSession() as client:
        yield setup, eng, f"http://127.0.0.1:{eng.port}", f"http://127.0.0.1:{admin.port}", client
    await admin.stop()
    await eng.stop(drain_timeout=1)


async def stamp(client, base, path="/jmap/") -> str:
    async with client.get(base + path) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-Stamp"]


async def reload(client, admin) -> tuple[int, dict]:
    async with client.post(admin + "/reload") as r:
        return r.status, await r.json()


async def reload_count(client, admin, result: str) -> float:
    async with client.get(admin + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(f'sge_proxy_config_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_reload_applies_new_options_and_retires_the_old_chain(proxy):
    setup, eng, base, admin, client = proxy
    assert await stamp(client, base) == "one"
    setup.write(tag="two", url=eng.config.stalwart.url)
    status, body = await reload(client, admin)
    assert status == 200, body
    assert body["status"] == "reloaded" and body["changed"] == ["addons.stamp"] and body["restart_needed"] == []
    assert await stamp(client, base) == "two"
    await eventually(lambda: setup.done() == ["one active=0"])
    assert await reload_count(client, admin, "ok") == 1
    (event,) = [e for e in setup.audit(eng) if e["event"].startswith("config.")]
    assert (event["event"], event["generation"], event["changed"]) == ("config.reloaded", 1, ["addons.stamp"])
    # the file addon watcher runs on the new chain: an edit of the file is picked up
    setup.addon_file.write_text(STAMP.replace('suffix = ""', 'suffix = "+"'))
    for _ in range(250):
        if await stamp(client, base) == "two+":
            break
        await asyncio.sleep(0.02)
    assert await stamp(client, base) == "two+"


async def test_in_flight_request_finishes_on_the_old_chain_and_pool(proxy, upstreams):
    setup, eng, base, admin, client = proxy
    (app_a, url_a), (app_b, url_b) = upstreams
    old_pool, old_target = eng.pool, eng.default_target

    async def slow():
        async with client.get(base + "/slow/600") as r:
            return r.status, r.headers["X-Stamp"], await r.json()

    in_flight = asyncio.create_task(slow())
    await eventually(lambda: eng.in_flight == 1)
    setup.write(tag="two", url=url_b)
    status, body = await reload(client, admin)
    assert status == 200 and set(body["changed"]) == {"addons.stamp", "stalwart.url"}
    assert eng.pool is not old_pool
    assert await stamp(client, base, "/jmap/after") == "two"
    assert [r["path"] for r in app_b[SEEN] if r["path"].startswith("/jmap")] == ["/jmap/after"]  # new upstream
    assert setup.done() == []  # the old chain is still serving the slow request
    assert await in_flight == (200, "one", {"slept": 600})
    await eventually(lambda: setup.done() == ["one active=0"])
    with pytest.raises(NoUpstream):  # the old pool is closed once its last request is done
        await old_pool.acquire(old_target)


@pytest.mark.parametrize("change,status,message", [
    (lambda s: s.config_file.write_text("listen: [unclosed\n"), 422, "invalid YAML"),
    (lambda s: s.write(tag="one", url="https://a.invalid", stalwart={"url": "https://x", "max_connections": 0}),
     422, "max_connections"),
    (lambda s: s.write(tag=["not", "a", "string"], url="https://127.0.0.1:1"), 422, "addons.stamp.tag"),
    (lambda s: s.write(tag="one", url="https://127.0.0.1:1", chain=["no_such_addon"]), 422, "no_such_addon"),
    (lambda s: s.write(tag="boom", url="https://127.0.0.1:1"), 500, "RuntimeError: boom"),
    (lambda s: s.write(tag="one", url="ftp://127.0.0.1:1"), 422, "stalwart.url"),
])
async def test_bad_configuration_is_refused_and_traffic_is_unaffected(proxy, change, status, message, caplog):
    setup, eng, base, admin, client = proxy
    url, generation = eng.config.stalwart.url, eng.generation
    change(setup)
    with caplog.at_level(logging.ERROR, logger="proxy.engine"):
        got, body = await reload(client, admin)
    assert got == status and body["status"] == "refused" and message in body["error"], body
    assert any(message in r.getMessage() for r in caplog.records)
    assert eng.generation is generation and eng.config.stalwart.url == url
    assert await stamp(client, base) == "one"
    assert await reload_count(client, admin, "failed") == 1
    assert setup.done() == []  # nothing half-built was left behind: the refused chain was never in use
    (event,) = [e for e in setup.audit(eng) if e["event"].startswith("config.")]
    assert event["event"] == "config.reload_refused" and event["status"] == status and message in event["detail"]


async def test_what_needs_a_restart_is_reported_and_the_rest_applies(proxy, caplog):
    setup, eng, base, admin, client = proxy
    port = eng.port
    setup.write(tag="two", url=eng.config.stalwart.url, listen="127.0.0.1:1", workers=3,
                tls={"min_version": "1.3"})
    with caplog.at_level(logging.WARNING, logger="proxy.engine"):
        status, body = await reload(client, admin)
    assert status == 200
    assert body["restart_needed"] == ["listen", "tls.min_version", "workers"]
    assert any("needs a restart" in r.getMessage() for r in caplog.records)
    assert await stamp(client, base) == "two"
    assert eng.config.listen == f"127.0.0.1:{port}" and eng.config.workers == 1
    assert eng.config.tls.min_version == "1.2"
    # asked again, it is still reported: the running listener is still the old one
    status, body = await reload(client, admin)
    assert body["restart_needed"] == ["listen", "tls.min_version", "workers"] and body["changed"] == body[
        "restart_needed"]


async def test_a_reload_ends_websocket_sessions_on_the_old_chain_with_1012(proxy, upstreams):
    """A WebSocket session runs its messages through the chain it started on: a reload (a new
    policy, say) ends it with 1012 (Service Restart) so that the client reconnects to the new one."""
    setup, eng, base, admin, client = proxy
    async with client.ws_connect(base + "/jmap/ws") as ws:
        await ws.receive_json(timeout=5)
        assert ws._response.headers["X-Stamp"] == "one"
        setup.write(tag="two", url=eng.config.stalwart.url)
        status, body = await reload(client, admin)
        assert status == 200, body
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1012
    await eventually(lambda: setup.done() == ["one active=0"])
    async with client.ws_connect(base + "/jmap/ws") as ws:  # the new session: the new chain
        await ws.receive_json(timeout=5)
        assert ws._response.headers["X-Stamp"] == "two"
