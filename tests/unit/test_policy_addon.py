"""addons.policy through a real AddonManager: enforcement, shadow mode, metrics, reload."""
from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from multidict import CIMultiDict

from addons.policy import DEFAULT_POLICY, Policy
from proxy.addonmanager import AddonManager
from proxy.config import Config
from proxy.errors import BadRequest, ConfigError, Forbidden, to_response
from proxy.flow import Flow, Request
from proxy.identity import Identity
from proxy.metrics import Metrics

POLICY = """\
name: test
rules:
  - id: api
    effect: allow
    http_methods: [POST]
    paths: [/jmap, /jmap/]
  - id: session
    effect: allow
    http_methods: [GET]
    paths: [/jmap/session]
  - id: mail
    effect: allow
    jmap_methods: ["Email/*", Mailbox/get]
  - id: no-principal-set
    effect: deny
    jmap_methods: [Principal/set]
    reason: administration is done in Stalwart
"""

SESSION_ONLY = """\
name: test
rules:
  - id: session
    effect: allow
    http_methods: [GET]
    paths: [/jmap/session]
"""

BROKEN = """\
name: test
rules:
  - id: session
    effect: allow
    cidrs: [10.0.0.0/33]
"""


def api_flow(*calls: str, who: Identity | None = Identity(subject="alice")) -> Flow:
    body = orjson.dumps({"using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
                         "methodCalls": [[c, {"accountId": "a"}, str(i)] for i, c in enumerate(calls)]})
    f = Flow(Request("POST", "/jmap/", CIMultiDict({"Content-Type": "application/json"})), id="r1",
             client_addr="127.0.0.1")
    f.request.content_length = len(body)
    f.identity = who
    f.metadata["body"] = body
    return f


def get_flow(path: str, who: Identity | None = Identity(subject="alice")) -> Flow:
    f = Flow(Request("GET", path, CIMultiDict()), id="r2", client_addr="127.0.0.1")
    f.identity = who
    return f


async def run(mgr: AddonManager, flow: Flow) -> None:
    """What the engine does: requestheaders, buffer the body if asked, request."""
    await mgr.run("requestheaders", flow)
    if flow.request.body_cap is not None:
        flow.request.body = flow.metadata.pop("body")
    await mgr.run("request", flow)


def decisions(metrics: Metrics, effect: str, mode: str = "enforce", policy: str = "test") -> float:
    v = metrics.registry.get_sample_value("sge_proxy_policy_decisions_total",
                                          {"policy": policy, "effect": effect, "mode": mode})
    return v or 0.0


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return p


@pytest.fixture
async def make(tmp_path: Path):
    managers: list[AddonManager] = []

    async def _make(**section) -> tuple[AddonManager, Policy, Metrics]:
        section.setdefault("reload_interval", 0)
        cfg = Config(addons={"policy": section}, source=str(tmp_path / "proxy.yaml"), base_dir=tmp_path)
        metrics = Metrics()
        mgr = AddonManager(cfg, metrics)
        managers.append(mgr)
        addon = Policy()
        await mgr.add(addon)
        return mgr, addon, metrics

    yield _make
    for m in managers:
        await m.done()


async def test_allowed_jmap_request_passes_and_is_counted(make, policy_file):
    mgr, _, metrics = await make(files=[str(policy_file)])
    flow = api_flow("Mailbox/get", "Email/query", "Email/get")
    await run(mgr, flow)
    assert flow.response is None
    assert flow.request.body_cap == 10 << 20
    assert decisions(metrics, "allow") == 1


async def test_one_forbidden_call_refuses_the_request_naming_it(make, policy_file):
    mgr, _, metrics = await make(files=[str(policy_file)])
    flow = api_flow("Email/get", "Principal/set")
    with pytest.raises(Forbidden) as e:
        await run(mgr, flow)
    status, headers, body = to_response(e.value, flow.id)
    problem = orjson.loads(body)
    assert status == 403
    assert "Principal/set" in problem["detail"]
    assert "administration is done in Stalwart" in problem["detail"]
    assert problem["policyRule"] == "no-principal-set"
    assert problem["requestId"] == "r1"
    assert decisions(metrics, "deny") == 1


async def test_default_deny_names_the_unlisted_method(make, policy_file):
    mgr, _, _ = await make(files=[str(policy_file)])
    with pytest.raises(Forbidden) as e:
        await run(mgr, api_flow("Email/get", "Thread/get"))
    assert "JMAP method Thread/get" in e.value.detail
    assert "policyRule" not in e.value.extra


async def test_route_denied_names_the_route(make, policy_file):
    mgr, _, _ = await make(files=[str(policy_file)])
    with pytest.raises(Forbidden) as e:
        await run(mgr, get_flow("/api/principal"))
    assert e.value.detail.startswith("GET /api/principal is not allowed")


async def test_anonymous_is_refused(make, policy_file):
    mgr, _, _ = await make(files=[str(policy_file)])
    with pytest.raises(Forbidden):
        await run(mgr, get_flow("/jmap/session", who=None))


async def test_non_api_requests_are_not_buffered(make, policy_file):
    mgr, _, _ = await make(files=[str(policy_file)], max_body="64KiB")
    flow = get_flow("/jmap/session")
    await mgr.run("requestheaders", flow)
    assert flow.request.body_cap is None
    api = api_flow("Email/get")
    await mgr.run("requestheaders", api)
    assert api.request.body_cap == 64 << 10


async def test_body_that_is_not_jmap_is_a_bad_request(make, policy_file):
    mgr, _, _ = await make(files=[str(policy_file)])
    flow = api_flow("Email/get")
    flow.metadata["body"] = b"not json"
    with pytest.raises(BadRequest):
        await run(mgr, flow)


async def test_shadow_mode_lets_denied_requests_through_and_counts_them(make, policy_file, caplog):
    mgr, _, metrics = await make(files=[str(policy_file)], mode="shadow")
    flow = api_flow("Email/get", "Principal/set")
    with caplog.at_level(logging.INFO, logger="addons.policy"):
        await run(mgr, flow)
    assert flow.response is None
    assert decisions(metrics, "deny", mode="shadow") == 1
    assert decisions(metrics, "deny", mode="enforce") == 0
    assert any("would deny" in r.getMessage() and "Principal/set" in r.getMessage() for r in caplog.records)


async def test_denial_is_logged_with_request_rule_subject_and_method(make, policy_file, caplog):
    mgr, _, _ = await make(files=[str(policy_file)])
    with caplog.at_level(logging.INFO, logger="addons.policy"), pytest.raises(Forbidden):
        await run(mgr, api_flow("Principal/set"))
    msg = next(r.getMessage() for r in caplog.records if "denied" in r.getMessage())
    for part in ("r1", "no-principal-set", "alice", "Principal/set"):
        assert part in msg


async def test_default_files_are_the_packaged_policy(make):
    mgr, addon, metrics = await make()
    assert addon.policy_set.names == ("default",)
    assert addon.policy_set.files[0].source == str(DEFAULT_POLICY)
    flow = api_flow("Email/get")
    await run(mgr, flow)
    assert decisions(metrics, "allow", policy="default") == 1


async def test_relative_files_resolve_against_the_config(make, policy_file):
    _, addon, _ = await make(files=[policy_file.name])
    assert addon.policy_set.files[0].source == str(policy_file)


async def test_broken_file_at_start_fails_with_file_and_line(make, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(BROKEN)
    with pytest.raises(ConfigError) as e:
        await make(files=[str(p)])
    assert f"{p}, line 5" in str(e.value)


async def test_bad_options_are_refused(make, policy_file):
    with pytest.raises(ConfigError, match="addons.policy.mode"):
        await make(files=[str(policy_file)], mode="audit")
    with pytest.raises(ConfigError, match="timezone"):
        await make(files=[str(policy_file)], timezone="Nowhere/City")


async def test_reload_of_a_broken_file_keeps_the_previous_policy(make, policy_file, caplog):
    mgr, addon, _ = await make(files=[str(policy_file)])
    policy_file.write_text(BROKEN)
    with caplog.at_level(logging.ERROR, logger="addons.policy"):
        assert addon.reload() is False
    assert any(f"{policy_file}, line 5" in r.getMessage() for r in caplog.records)
    flow = api_flow("Email/get")
    await run(mgr, flow)  # still the old policy: allowed
    assert flow.response is None

    policy_file.write_text(SESSION_ONLY)
    assert addon.reload() is True
    with pytest.raises(Forbidden):
        await run(mgr, api_flow("Email/get"))


async def test_watcher_picks_up_changes_and_survives_a_broken_edit(make, policy_file):
    mgr, addon, _ = await make(files=[str(policy_file)], reload_interval=0.02)
    first = addon.policy_set

    async def wait_for(predicate) -> None:
        for _ in range(200):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the watcher did not react")

    def touch(text: str, bump: int) -> None:
        policy_file.write_text(text)
        st = policy_file.stat()
        os.utime(policy_file, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))

    touch(BROKEN, 1)
    await asyncio.sleep(0.15)
    assert addon.policy_set is first

    touch(SESSION_ONLY, 2)
    await wait_for(lambda: addon.policy_set is not first)
    assert [r.id for r in addon.policy_set.rules] == ["session"]
    with pytest.raises(Forbidden):
        await run(mgr, api_flow("Email/get"))


# ------------------------------------------------------------------ the decision cache
TIMED = """\
name: test
rules:
  - id: api-office-hours
    effect: allow
    http_methods: [POST]
    paths: [/jmap, /jmap/]
    time: {days: mon-fri, hours: "09:00-17:00"}
  - id: mail
    effect: allow
    jmap_methods: ["Email/*"]
"""

FROM_LAN = """\
name: test
rules:
  - id: api-lan
    effect: allow
    http_methods: [POST]
    paths: [/jmap, /jmap/]
    cidrs: [10.0.0.0/8]
  - id: mail
    effect: allow
    jmap_methods: ["Email/*"]
"""


def from_ip(flow: Flow, ip: str) -> Flow:
    flow.client_addr = ip
    return flow


async def test_repeated_requests_reuse_the_decision_and_still_count(make, policy_file):
    mgr, addon, metrics = await make(files=[str(policy_file)])
    for _ in range(3):
        flow = api_flow("Email/get")
        await run(mgr, flow)
        assert flow.response is None
    assert len(addon._cache) == 1
    assert decisions(metrics, "allow") == 3
    for _ in range(2):  # a cached refusal is still a refusal, counted each time
        with pytest.raises(Forbidden, match="Principal/set"):
            await run(mgr, api_flow("Email/get", "Principal/set"))
    assert len(addon._cache) == 2
    assert decisions(metrics, "deny") == 2


async def test_cached_decision_is_per_identity_shape_and_calls(make, tmp_path):
    p = tmp_path / "roles.yaml"
    p.write_text("name: test\nrules:\n"
                 "  - {id: api, effect: allow, http_methods: [POST], paths: [/jmap/], roles: [mail]}\n"
                 "  - {id: mail, effect: allow, jmap_methods: [\"Email/*\"]}\n")
    mgr, addon, _ = await make(files=[str(p)])
    await run(mgr, api_flow("Email/get", who=Identity(subject="a", roles=frozenset({"mail"}))))
    with pytest.raises(Forbidden):  # same request, an identity without the role
        await run(mgr, api_flow("Email/get", who=Identity(subject="a")))
    with pytest.raises(Forbidden):  # anonymous
        await run(mgr, api_flow("Email/get", who=None))
    with pytest.raises(Forbidden):  # the role, another method call
        await run(mgr, api_flow("Mailbox/get", who=Identity(subject="b", roles=frozenset({"mail"}))))
    # another subject with the same roles shares the entry
    await run(mgr, api_flow("Email/get", who=Identity(subject="c", roles=frozenset({"mail"}))))
    assert len(addon._cache) == 4


async def test_reload_starts_a_new_cache(make, policy_file):
    mgr, addon, _ = await make(files=[str(policy_file)])
    await run(mgr, api_flow("Email/get"))
    assert len(addon._cache) == 1
    policy_file.write_text(SESSION_ONLY)
    assert addon.reload() is True
    with pytest.raises(Forbidden):
        await run(mgr, api_flow("Email/get"))
    assert addon._cache.policy_set is addon.policy_set and len(addon._cache) == 1


async def test_time_windows_key_the_cache_by_which_windows_hold(make, tmp_path):
    p = tmp_path / "timed.yaml"
    p.write_text(TIMED)
    mgr, addon, _ = await make(files=[str(p)])
    now = [datetime(2025, 1, 6, 10, 0, tzinfo=timezone.utc)]  # a Monday, in the window
    addon._clock = lambda: now[0]
    flow = api_flow("Email/get")
    await run(mgr, flow)
    assert flow.response is None
    now[0] = datetime(2025, 1, 6, 18, 0, tzinfo=timezone.utc)  # the same request after hours
    with pytest.raises(Forbidden):
        await run(mgr, api_flow("Email/get"))
    assert len(addon._cache) == 2
    now[0] = datetime(2025, 1, 7, 11, 30, tzinfo=timezone.utc)  # in the window again: the first entry
    flow = api_flow("Email/get")
    await run(mgr, flow)
    assert flow.response is None and len(addon._cache) == 2
    now[0] = datetime(2025, 1, 11, 11, 30, tzinfo=timezone.utc)  # a Saturday: the refusal's entry
    with pytest.raises(Forbidden):
        await run(mgr, api_flow("Email/get"))
    assert len(addon._cache) == 2


async def test_cidr_rules_key_the_cache_by_client_address(make, tmp_path):
    p = tmp_path / "lan.yaml"
    p.write_text(FROM_LAN)
    mgr, addon, _ = await make(files=[str(p)])
    flow = from_ip(api_flow("Email/get"), "10.1.2.3")
    await run(mgr, flow)
    assert flow.response is None
    with pytest.raises(Forbidden):
        await run(mgr, from_ip(api_flow("Email/get"), "192.0.2.1"))
    await run(mgr, from_ip(api_flow("Email/get"), "10.1.2.3"))
    assert len(addon._cache) == 2
