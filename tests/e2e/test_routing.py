"""Tenant routing end to end: two Cyrus instances, each behind its own nginx mTLS front, the full
default chain with `stalwart.routing_mode: tenant` and the routes in a secrets file.

Tenant acme (alice, bob) lives on the first instance, tenant globex (carol) on the second
(`dev.sh` starts both; tests/e2e/stack/README.md, "A second instance"). Each instance's nginx
access log shows which requests reached it: every request carries a unique User-Agent.
"""
from __future__ import annotations

import base64
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.e2e.conftest import STACK
from tests.e2e.test_security_chain import (AccessLog, Client, assert_own_session, mailbox_get, marker,
                                           own_mailboxes)
from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey

pytestmark = pytest.mark.e2e

ALICE, CAROL, DAVE = "alice@example.com", "carol@globex.example", "dave@initech.example"


@dataclass(frozen=True)
class Instance:
    base: Path
    url: str

    @property
    def access_log(self) -> AccessLog:
        return AccessLog(self.base / "log" / "nginx-access.log")


@pytest.fixture(scope="session")
def stack_b() -> Instance:
    base = Path(os.environ.get("CYRUS_BASE_B", "/var/lib/sge-jmap-stack-b"))
    port = os.environ.get("TLS_PORT_B", "28443")
    env = {**os.environ, "CYRUS_BASE": str(base), "TLS_PORT": port}
    r = subprocess.run(["bash", str(STACK / "status.sh")], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        msg = (f"the second e2e stack instance is not up ({r.stdout.strip()} {r.stderr.strip()}); start it "
               f"as tests/e2e/stack/README.md says (dev.sh setup does)")
        if os.environ.get("SGE_E2E_REQUIRED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return Instance(base, f"https://127.0.0.1:{port}")


@pytest.fixture
async def idp():
    async with JwksServer() as server:
        server.publish(SigningKey("key-r"))
        yield server


@pytest.fixture
def tokens(idp) -> dict[str, str]:
    key = idp.keys[0]
    return {user: key.token(user, email=user, roles=["user", f"tenant:{tenant}"])
            for user, tenant in ((ALICE, "acme"), (CAROL, "globex"), (DAVE, "initech"))}


@pytest.fixture
async def routed(stack, stack_b, idp, tmp_path):
    """The proxy, default chain, tenant routing: acme -> the first instance, globex -> the second."""
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(yaml.safe_dump({"stalwart/tenants/acme": {"server_url": stack.url},
                                       "stalwart/tenants/globex": {"server_url": stack_b.url}}))
    port = free_port()
    eng = await start_proxy(stack.certs, stack.url, chain=None, listen=f"127.0.0.1:{port}", **{
        "stalwart.health_interval": 3600, "stalwart.routing_mode": "tenant",
        "stalwart.allowed_hosts": ["127.0.0.1"], "secrets.file": str(secrets),
        "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
        "addons.upstream_identity": {"mode": "authorize-as", "admin_user": stack.admin[0],
                                     "secret": stack.admin[1]},
        "addons.header_signer": {"key_id": "e2e", "keys": {"e2e": base64.b64encode(os.urandom(32)).decode()}},
    })
    yield eng, f"http://127.0.0.1:{eng.port}"
    await eng.stop(drain_timeout=1)


async def test_each_tenant_reaches_only_its_own_server(routed, stack, stack_b, tokens):
    eng, base = routed
    log_a = AccessLog(stack.base / "log" / "nginx-access.log")
    log_b = stack_b.access_log
    c = Client(base, tokens)
    try:
        for user, mine, other in ((ALICE, log_a, log_b), (CAROL, log_b, log_a)):
            ua = marker()
            session = await c.session(user, ua=ua)
            assert_own_session(session, user, base)
            api = marker()
            async with c.http.post(session["apiUrl"], json=mailbox_get(user), headers=c.headers(user, api)) as r:
                own_mailboxes(user, r.status, await r.json())
            assert await mine.wait_for(api)
            assert len(await mine.wait_for(ua, count=2)) == 2  # the redirect, then the session
            assert other.lines_with(ua) == [] and other.lines_with(api) == []
        # alice's account name means nothing on globex's server, and carol's on acme's: refused
        status, doc, _ = await c.mailboxes(CAROL, account=ALICE)
        assert (status, doc["status"]) == (403, 403)
    finally:
        await c.close()
    reg = eng.metrics.registry
    for name in ("tenant:acme", "tenant:globex"):
        assert reg.get_sample_value("sge_proxy_upstream_requests_total", {"upstream": name, "code": "200"}) >= 2


async def test_unknown_tenant_is_refused_before_any_server(routed, stack, stack_b, tokens):
    eng, base = routed
    logs = (AccessLog(stack.base / "log" / "nginx-access.log"), stack_b.access_log)
    c = Client(base, tokens)
    try:
        refused = marker()
        status, doc, ctype = await c.mailboxes(DAVE, ua=refused)
        assert (status, ctype) == (403, "application/problem+json")
        assert doc["detail"] == "No mail server for this tenant." and doc["type"].endswith("/no_route")
        fences = [marker(), marker()]
        own_mailboxes(ALICE, *(await c.mailboxes(ALICE, ua=fences[0]))[:2])
        own_mailboxes(CAROL, *(await c.mailboxes(CAROL, ua=fences[1]))[:2])
        for log, fence in zip(logs, fences):
            assert await log.wait_for(fence)
            assert log.lines_with(refused) == []
    finally:
        await c.close()
    assert eng.metrics.registry.get_sample_value(
        "sge_proxy_routing_decisions_total", {"mode": "tenant", "result": "unknown"}) == 1
