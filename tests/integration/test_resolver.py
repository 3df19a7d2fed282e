"""The resolver in the engine, reading routes from the file secret source: tenant routing to two
real mTLS upstreams, region routing and the strict residency switch, a custom resolver loaded
from a file, and the stand-in Stalwart behind the JMAP guard (which must see the routed server).
Identities come from the real auth addon's API keys."""
from __future__ import annotations

import json

import logging
from pathlib import Path

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict

from addons.jmap_guard import JmapGuard
from addons.resolver import FALLBACKS, Resolver
from addons.upstream_identity import UpstreamIdentity
from proxy.addonmanager import AddonManager
from proxy.config import load_config
from proxy.errors import ConfigError, ProxyError
from proxy.flow import Flow, Request
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.secrets import FileSecretSource, SecretUnavailable, SourceStatus
from proxy.tokens import hash_api_key
from tests.harness import SEEN, start_app, start_proxy, upstream_app
from tests.stalwart_double import CORE, MAIL, StalwartDouble, User, serve

KEYS = {  # API key -> (subject, roles, region)
    "sgek_alice": ("alice", ["tenant:acme"], None),
    "sgek_gina": ("gina", ["tenant:globex"], None),
    "sgek_ivan": ("ivan", ["tenant:initech"], None),   # no route configured
    "sgek_nora": ("nora", [], None),                    # no tenant at all
    "sgek_eve": ("eve", [], "eu-west-1"),
    "sgek_uma": ("uma", [], None),                      # no region: stalwart.default_region
    "sgek_ada": ("ada", ["tenant:acme"], "us-east-1"),  # claim differs from acme's mapped region
    "sgek_wes": ("wes", [], "eu-west-2"),
    "sgek_zed": ("zed", [], "ap-south-1"),
}


def auth_section() -> dict:
    keys = []
    for key, (sub, roles, region) in KEYS.items():
        rec = {"sha256": hash_api_key(key), "subject": sub, "email": f"{sub}@example.com", "roles": roles}
        if region:
            rec["region"] = region
        keys.append(rec)
    return {"api_keys": {"keys": keys}}


@pytest.fixture
async def upstreams(server_ssl):
    """Three mTLS upstreams: a, b, c."""
    out, runners = {}, []
    for name in ("a", "b", "c"):
        app = upstream_app()
        runner, port = await start_app(app, server_ssl)
        runners.append(runner)
        out[name] = (app, f"https://127.0.0.1:{port}")
    yield out
    for r in runners:
        await r.cleanup()


@pytest.fixture
def secrets_file(tmp_path) -> Path:
    return tmp_path / "secrets.yaml"


def write(path: Path, doc: dict) -> None:
    path.write_text(yaml.safe_dump(doc))


@pytest.fixture
async def make_proxy(certs, upstreams):
    engines = []

    async def make(resolver: Resolver, section: dict, **over):
        eng = await start_proxy(certs, upstreams["a"][1], chain=["auth"], addon_objects=[resolver], **{
            "stalwart.health_interval": 3600, "stalwart.allowed_hosts": ["127.0.0.1"],
            "addons.auth": auth_section(), "addons.resolver": section, **over})
        engines.append(eng)
        return eng, f"http://127.0.0.1:{eng.port}"

    yield make
    for eng in engines:
        await eng.stop(drain_timeout=1)


async def call(base: str, key: str, path: str = "/jmap/") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(base + path, data=b"{}", headers={"X-API-Key": key}) as r:
            return r.status, await r.json(content_type=None)


def reached(upstream) -> list[str]:
    return [rec["path"] for rec in upstream[0][SEEN]]


# ---------------------------------------------------------------------------- tenant routing
async def test_tenant_routing_to_two_upstreams(make_proxy, upstreams, secrets_file):
    a, b = upstreams["a"], upstreams["b"]
    write(secrets_file, {"stalwart/tenants/acme": {"server_url": b[1]},
                         "stalwart/tenants/globex": {"server_url": [upstreams["c"][1], a[1]]}})
    eng, base = await make_proxy(Resolver(FileSecretSource(file=secrets_file)), {"mode": "tenant"})
    status, got = await call(base, "sgek_alice", "/jmap/?who=alice")
    assert status == 200 and got["path"] == "/jmap/?who=alice"
    status, got = await call(base, "sgek_gina", "/jmap/?who=gina")
    assert status == 200
    assert reached(b) == ["/jmap/?who=alice"]
    assert reached(upstreams["c"]) == ["/jmap/?who=gina"]  # the primary of globex's list
    assert "/jmap/?who=gina" not in reached(a) and "/jmap/?who=alice" not in reached(a)
    for _ in range(3):
        assert (await call(base, "sgek_alice"))[0] == 200
    reg = eng.metrics.registry
    assert reg.get_sample_value("sge_proxy_routing_decisions_total", {"mode": "tenant", "result": "ok"}) == 5
    assert reg.get_sample_value("sge_proxy_routing_cache_total", {"result": "miss"}) == 2
    assert reg.get_sample_value("sge_proxy_routing_cache_total", {"result": "hit"}) == 3
    # the target names are the bounded upstream labels
    assert reg.get_sample_value("sge_proxy_upstream_requests_total", {"upstream": "tenant:acme", "code": "200"}) == 4
    assert reg.get_sample_value("sge_proxy_upstream_requests_total", {"upstream": "tenant:globex", "code": "200"}) == 1


async def test_unknown_tenant_and_no_tenant_are_403_and_reach_nothing(make_proxy, upstreams, secrets_file):
    write(secrets_file, {"stalwart/tenants/acme": {"server_url": upstreams["b"][1]}})
    eng, base = await make_proxy(Resolver(FileSecretSource(file=secrets_file)), {"mode": "tenant"})
    for key in ("sgek_ivan", "sgek_nora", "sgek_ivan"):
        status, doc = await call(base, key, "/jmap/?refused")
        assert status == 403 and doc["type"].endswith("/no_route"), doc
        assert doc["detail"].startswith("No mail server for this")
    assert all("/jmap/?refused" not in reached(u) for u in upstreams.values())
    reg = eng.metrics.registry
    assert reg.get_sample_value("sge_proxy_routing_decisions_total", {"mode": "tenant", "result": "unknown"}) == 3
    assert reg.get_sample_value("sge_proxy_routing_cache_total", {"result": "hit"}) == 1  # ivan's 2nd: negative


async def test_new_tenant_waits_for_the_negative_cache_or_a_reload(make_proxy, upstreams, secrets_file):
    write(secrets_file, {})
    resolver = Resolver(FileSecretSource(file=secrets_file, ttl=0, negative_ttl=0))
    _, base = await make_proxy(resolver, {"mode": "tenant", "negative_ttl": "30s"})
    assert (await call(base, "sgek_ivan"))[0] == 403
    write(secrets_file, {"stalwart/tenants/initech": {"server_url": upstreams["c"][1]}})
    assert (await call(base, "sgek_ivan"))[0] == 403  # remembered for 30 s
    resolver.reload()  # SIGHUP
    assert (await call(base, "sgek_ivan", "/jmap/?now"))[0] == 200
    assert reached(upstreams["c"]) == ["/jmap/?now"]


@pytest.mark.parametrize("poison", [
    "http://127.0.0.1:1",                   # plain http
    "https://user:pw@127.0.0.1:1",          # credentials
    "https://evil.example",                 # not in stalwart.allowed_hosts
    "::garbage::",
])
async def test_poisoned_secret_is_refused_with_503_and_never_used(make_proxy, upstreams, secrets_file, poison,
                                                                  caplog):
    write(secrets_file, {"stalwart/tenants/acme": {"server_url": poison}})
    eng, base = await make_proxy(Resolver(FileSecretSource(file=secrets_file)), {"mode": "tenant"})
    with caplog.at_level(logging.ERROR, logger="addons.resolver"):
        status, doc = await call(base, "sgek_alice", "/jmap/?poisoned")
    assert status == 503 and doc["type"].endswith("/invalid_route")
    assert poison not in str(doc) and "127.0.0.1" not in doc["detail"]
    assert any("tenant:acme" in r.getMessage() for r in caplog.records)
    assert all("/jmap/?poisoned" not in reached(u) for u in upstreams.values())
    assert eng.metrics.registry.get_sample_value(
        "sge_proxy_routing_decisions_total", {"mode": "tenant", "result": "invalid"}) == 1


async def test_secret_source_down_with_nothing_cached_is_503(make_proxy, upstreams, tmp_path):
    missing = tmp_path / "not-there.yaml"
    eng, base = await make_proxy(Resolver(FileSecretSource(file=missing)), {"mode": "tenant"})
    status, doc = await call(base, "sgek_alice")
    assert status == 503 and doc["type"].endswith("/routing_unavailable")
    assert all(not reached(u) or set(reached(u)) <= {"/healthz/ready"} for u in upstreams.values())


class FlakySource:
    """A SecretSource (the Protocol) whose backend can be switched off."""
    name = "flaky"

    def __init__(self, data: dict) -> None:
        self.data, self.up, self.reads = data, True, 0

    async def read(self, path: str) -> dict:
        self.reads += 1
        if not self.up:
            raise SecretUnavailable("backend down")
        return dict(self.data[path])

    async def get(self, path: str, key: str) -> str:
        return (await self.read(path))[key]

    def status(self) -> SourceStatus:
        return SourceStatus(self.name, self.up)

    async def close(self) -> None:
        pass


async def test_expired_decision_is_used_while_the_source_is_down(make_proxy, upstreams):
    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    source = FlakySource({"stalwart/tenants/acme": {"server_url": upstreams["b"][1]}})
    eng, base = await make_proxy(Resolver(source, clock=clock), {"mode": "tenant"})
    assert (await call(base, "sgek_alice"))[0] == 200
    clock.now += 601  # past the 10 minutes
    source.up = False
    assert (await call(base, "sgek_alice", "/jmap/?stale"))[0] == 200
    assert reached(upstreams["b"])[-1] == "/jmap/?stale"
    assert eng.metrics.registry.get_sample_value("sge_proxy_routing_cache_total", {"result": "stale"}) == 1
    assert (await call(base, "sgek_gina"))[0] == 503  # nothing cached for globex


# ---------------------------------------------------------------------------- region routing
def regions(upstreams) -> dict:
    a, b, c = (upstreams[n][1] for n in "abc")
    return {
        "stalwart/regions/eu-west-1": {"server_url": b, "fallback_urls": c, "fallback_region": "eu-central-1"},
        "stalwart/regions/us-east-1": {"server_url": [c, a]},
        "stalwart/regions/eu-west-2": {"server_url": b, "region": "eu-central-1"},  # served from elsewhere
    }


@pytest.mark.parametrize("strict", [False, True])
async def test_region_routing(make_proxy, upstreams, secrets_file, strict):
    write(secrets_file, regions(upstreams))
    section = {"mode": "region", "tenant_regions": {"acme": "eu-west-1"}}
    if strict:
        section["residency"] = "strict"
    eng, base = await make_proxy(Resolver(FileSecretSource(file=secrets_file)), section)
    assert (await call(base, "sgek_eve", "/jmap/?eve"))[0] == 200     # region claim eu-west-1
    assert (await call(base, "sgek_uma", "/jmap/?uma"))[0] == 200     # default region us-east-1
    assert (await call(base, "sgek_alice", "/jmap/?alice"))[0] == 200  # acme -> eu-west-1
    assert "/jmap/?eve" in reached(upstreams["b"]) and "/jmap/?alice" in reached(upstreams["b"])
    assert "/jmap/?uma" in reached(upstreams["c"])
    status, doc = await call(base, "sgek_zed")  # ap-south-1: no route
    assert status == 403 and doc["detail"] == "No mail server for this region."
    ada = await call(base, "sgek_ada", "/jmap/?ada")  # claims us-east-1, acme maps to eu-west-1
    wes = await call(base, "sgek_wes", "/jmap/?wes")  # eu-west-2 is served from eu-central-1
    reg = eng.metrics.registry
    if not strict:
        assert ada[0] == 200 and "/jmap/?ada" in reached(upstreams["c"])  # the claim wins
        assert wes[0] == 200 and "/jmap/?wes" in reached(upstreams["b"])
    else:
        for status, doc in (ada, wes):
            assert status == 403 and doc["type"].endswith("/residency_refused")
        assert all("/jmap/?ada" not in reached(u) and "/jmap/?wes" not in reached(u) for u in upstreams.values())
        assert reg.get_sample_value("sge_proxy_routing_residency_refused_total",
                                    {"mode": "region", "what": "route"}) == 2
        assert reg.get_sample_value("sge_proxy_routing_decisions_total",
                                    {"mode": "region", "result": "residency"}) == 2


async def test_residency_audit_lines_and_dropped_fallbacks(certs, secrets_file, upstreams, tmp_path):
    """Through a real AddonManager: the route's fallbacks as flow metadata, strict or not."""
    from proxy.audit import AuditLog
    write(secrets_file, regions(upstreams))
    audit_file = tmp_path / "audit.log"
    audit_log = AuditLog(str(audit_file))
    results = {}
    for residency in ("off", "strict"):
        config = load_config(None, env={}, overrides={
            "stalwart.url": upstreams["a"][1], "stalwart.allowed_hosts": ["127.0.0.1"],
            "addons.resolver": {"mode": "region", "residency": residency, "tenant_regions": {"acme": "eu-west-1"}}})
        mgr = AddonManager(config, Metrics())
        mgr.audit = audit_log
        await mgr.add(Resolver(FileSecretSource(file=secrets_file)))
        flow = Flow(Request("POST", "/jmap/", CIMultiDict()), id=f"r-{residency}")
        flow.identity = Identity(subject="eve", region="eu-west-1")
        await mgr.run("requestheaders", flow)
        results[residency] = flow
        assert str(flow.upstream) == upstreams["b"][1] and flow.upstream.name == "region:eu-west-1"
    assert [str(t) for t in results["off"].metadata[FALLBACKS]] == [upstreams["c"][1]]
    assert results["strict"].metadata[FALLBACKS] == ()  # eu-central-1: never failed over to
    again = Flow(Request("POST", "/jmap/", CIMultiDict()), id="r-again")
    again.identity = Identity(subject="eve", region="eu-west-1")
    await mgr.run("requestheaders", again)
    assert again.metadata[FALLBACKS] == ()
    cached = Flow(Request("POST", "/jmap/", CIMultiDict()), id="r-cached")
    cached.identity = Identity(subject="eve", region="eu-west-1")
    assert mgr.get("resolver").requestheaders(cached) is None  # a cached decision: no waiting
    assert cached.upstream == again.upstream and cached.metadata[FALLBACKS] == ()
    audit_log.flush()
    audit = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert len(audit) == 1  # once per route, fallback and region, not per request
    assert audit[0]["event"] == "routing.fallback_dropped" and audit[0]["request_id"] == "r-strict"
    assert audit[0]["fallback_region"] == "eu-central-1" and audit[0]["region"] == "eu-west-1"
    assert mgr.metrics.registry.get_sample_value("sge_proxy_routing_residency_refused_total",
                                                 {"mode": "region", "what": "fallback"}) == 3  # per request

    flow = Flow(Request("POST", "/jmap/", CIMultiDict()), id="r-ada")
    flow.identity = Identity(subject="ada", tenant="acme", roles=frozenset({"tenant:acme"}), region="us-east-1")
    with pytest.raises(ProxyError) as e:
        await mgr.run("requestheaders", flow)
    assert e.value.status == 403
    audit_log.flush()
    line = json.loads(audit_file.read_text().splitlines()[-1])
    assert (line["event"], line["request_id"], line["user"], line["tenant"]) == (
        "routing.residency_refused", "r-ada", "ada", "acme")


async def test_configuration_errors(certs, tmp_path):
    async def load(section: dict, **over) -> None:
        config = load_config(None, env={}, overrides={"addons.resolver": section, **over})
        await AddonManager(config, Metrics()).add(Resolver())

    with pytest.raises(ConfigError, match="secret source"):
        await load({"mode": "tenant"})
    with pytest.raises(ConfigError, match="strict residency"):
        await load({"residency": "strict"})
    with pytest.raises(ConfigError, match="custom routing needs"):
        await load({"mode": "custom"})
    with pytest.raises(ConfigError, match="no such file"):
        await load({"mode": "custom", "custom": str(tmp_path / "nope.py")})
    with pytest.raises(ConfigError, match="tenant_path"):
        await load({"tenant_path": "stalwart/tenants"})
    with pytest.raises(ConfigError, match="must be one of"):
        await load({"mode": "random"})
    bad = tmp_path / "bad.py"
    bad.write_text("class resolver:\n    pass\n")
    with pytest.raises(ConfigError, match="resolve_server"):
        await load({"mode": "custom", "custom": str(bad)})


def test_non_official_mode_needs_the_resolver_in_the_chain(certs):
    from proxy.engine import Engine
    from tests.harness import proxy_config
    with pytest.raises(ConfigError, match="needs the resolver"):
        Engine(proxy_config(certs, "https://127.0.0.1:1", chain=["auth", "jmap_guard"],
                            **{"stalwart.routing_mode": "tenant"}))
    Engine(proxy_config(certs, "https://127.0.0.1:1", chain=["auth", "resolver"], **{"stalwart.routing_mode": "tenant"}))


# ---------------------------------------------------------------------------- custom resolver
CUSTOM = '''
class ByDomain:
    """Sends each user by the domain of their e-mail address; records what it was asked."""
    servers = {}
    asked = []

    async def resolve_server(self, identity, operation):
        self.asked.append((identity.subject, operation))
        return self.servers.get(identity.email.split("@", 1)[1])

resolver = ByDomain
'''


async def test_custom_resolver_from_a_file(make_proxy, upstreams, tmp_path):
    path = tmp_path / "by_domain.py"
    path.write_text(CUSTOM)
    resolver = Resolver()
    eng, base = await make_proxy(resolver, {"mode": "custom", "custom": str(path)})
    custom = resolver.custom
    custom.servers.update({"example.com": [upstreams["c"][1], upstreams["a"][1]]})
    assert (await call(base, "sgek_alice", "/jmap/?custom"))[0] == 200
    assert (await call(base, "sgek_alice", "/jmap/?again"))[0] == 200  # cached per user and operation
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/.well-known/jmap", headers={"X-API-Key": "sgek_gina"}) as r:
            assert r.status == 200
    assert reached(upstreams["c"])[-3:] == ["/jmap/?custom", "/jmap/?again", "/.well-known/jmap"]
    assert custom.asked == [("alice", "api"), ("gina", "session")]
    reg = eng.metrics.registry
    assert reg.get_sample_value("sge_proxy_upstream_requests_total",
                                {"upstream": "custom:127.0.0.1", "code": "200"}) == 3
    custom.servers["example.com"] = "https://evil.example"  # not in the allow-list
    status, doc = await call(base, "sgek_nora", "/jmap/?evil")
    assert status == 503 and doc["type"].endswith("/invalid_route")
    custom.servers.clear()
    status, doc = await call(base, "sgek_uma")
    assert status == 403 and doc["type"].endswith("/no_route")


async def test_custom_resolver_by_module_and_class(make_proxy, upstreams, tmp_path, monkeypatch):
    (tmp_path / "sge_test_routes.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    resolver = Resolver()
    _, base = await make_proxy(resolver, {"mode": "custom", "custom": "sge_test_routes:ByDomain"})
    resolver.custom.servers["example.com"] = upstreams["b"][1]
    assert (await call(base, "sgek_eve", "/jmap/?mod"))[0] == 200
    assert reached(upstreams["b"]) == ["/jmap/?mod"]


# ---------------------------------------------------------------------------- JMAP guard on the routed server
async def test_jmap_guard_fetches_the_session_from_the_routed_server(certs, server_ssl, secrets_file):
    """Two Stalwart stand-ins with different users: the guard must ask the tenant's own server,
    so routing happens before it."""
    one = StalwartDouble()
    two = StalwartDouble(users=[User("gina", "ginapw", "g", "Gina", "gina@example.com"),
                                User("proxy", "proxypw", "d", "Edge proxy", can_impersonate=True)])
    async with serve(one, ssl_context=server_ssl) as url_one, serve(two, ssl_context=server_ssl) as url_two:
        write(secrets_file, {"stalwart/tenants/acme": {"server_url": url_one},
                             "stalwart/tenants/globex": {"server_url": url_two}})
        eng = await start_proxy(certs, url_one, chain=["auth"], addon_objects=[
            Resolver(FileSecretSource(file=secrets_file)), JmapGuard(), UpstreamIdentity()], **{
            "stalwart.health_interval": 3600, "addons.auth": auth_section(), "addons.resolver": {"mode": "tenant"},
            "addons.upstream_identity": {"mode": "impersonate", "impersonator": "proxy", "secret": "proxypw"}})
        base = f"http://127.0.0.1:{eng.port}"
        try:
            async with aiohttp.ClientSession() as s:
                body = {"using": [CORE, MAIL], "methodCalls": [["Mailbox/get", {"accountId": "g"}, "0"]]}
                async with s.post(base + "/jmap/", json=body, headers={"X-API-Key": "sgek_gina"}) as r:
                    assert r.status == 200, await r.text()
                    name, args, _ = (await r.json())["methodResponses"][0]
                assert (name, args["accountId"]) == ("Mailbox/get", "g")
                body["methodCalls"][0][1]["accountId"] = "a"  # alice's account on the other server
                async with s.post(base + "/jmap/", json=body, headers={"X-API-Key": "sgek_gina"}) as r:
                    assert r.status == 403
        finally:
            await eng.stop(drain_timeout=1)
        assert [r.path for r in two.requests] == ["/.well-known/jmap", "/jmap/session", "/jmap/"]
        assert not [r for r in one.requests if r.path.startswith("/jmap")]


# ---------------------------------------------------------------------------- the example configurations
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "routing"


@pytest.mark.parametrize("example, login, roles, region, port, name, fallbacks", [
    ("official.yaml", "carol@globex.example", ["tenant:globex"], None, 18443, "official", None),
    ("tenant.yaml", "alice@example.com", ["tenant:acme"], None, 18443, "tenant:acme", ()),
    ("tenant.yaml", "carol@globex.example", ["tenant:globex"], None, 28443, "tenant:globex", ()),
    ("region.yaml", "alice@example.com", [], None, 18443, "region:us-east-1", ()),  # strict: eu fallback dropped
    ("region.yaml", "carol@globex.example", ["tenant:globex"], None, 28443, "region:eu-west-1", ()),
    ("custom.yaml", "carol@globex.example", [], None, 28443, "custom:127.0.0.1", ()),
    ("custom.yaml", "alice@example.com", [], None, 18443, "custom:127.0.0.1", ()),
])
async def test_example_configurations(example, login, roles, region, port, name, fallbacks):
    from proxy.engine import build_secret_source
    config = load_config(EXAMPLES / example, env={})
    mgr = AddonManager(config, Metrics())
    mgr.secrets = build_secret_source(config, mgr.metrics)
    await mgr.add(Resolver())
    flow = Flow(Request("GET", "/.well-known/jmap", CIMultiDict()), id="r1", upstream=config.default_target())
    flow.identity = Identity(subject=login, email=login, roles=frozenset(roles), region=region,
                             tenant=roles[0].split(":", 1)[1] if roles else None)
    await mgr.run("requestheaders", flow)
    assert (flow.upstream.port, flow.upstream.name) == (port, name)
    assert flow.metadata.get(FALLBACKS) == fallbacks
