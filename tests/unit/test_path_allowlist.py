"""addons.path_allowlist: the table of what may go upstream, and the addon answering 404."""
from __future__ import annotations

import pytest
from multidict import CIMultiDict

from addons.path_allowlist import PathAllowlist, PathRules, compile_glob
from proxy.addonmanager import AddonManager
from proxy.config import Config
from proxy.errors import ConfigError, NotFound
from proxy.flow import Flow, Request
from proxy.metrics import Metrics

RULES = PathRules("/jmap", (compile_glob("/api/v1/mail/**"), compile_glob("/healthz/live"),
                            compile_glob("/files/*/raw")))


@pytest.mark.parametrize("path, reason", [
    # JMAP and configured extras
    ("/.well-known/jmap", None),
    ("/jmap", None),
    ("/jmap/", None),
    ("/jmap/session", None),
    ("/jmap/upload/a/", None),
    ("/jmap/download/a/Gabc/report%20Q1.pdf", None),
    ("/jmap/download/a/Gabc/100%25.txt", None),
    ("/jmap/eventsource/", None),
    ("/%6Amap/", None),                       # decoded once: this is /jmap/
    ("/api/v1/mail", None),
    ("/api/v1/mail/messages/123", None),
    ("/healthz/live", None),
    ("/files/x/raw", None),
    # not allowed
    ("/", "not_allowed"),
    ("/jmapx", "not_allowed"),
    ("/JMAP/", "not_allowed"),
    ("/api/v1/other", "not_allowed"),
    ("/api/v1/mailbox", "not_allowed"),
    ("/healthz/ready", "not_allowed"),
    ("/files/x/y/raw", "not_allowed"),       # * stays within one segment
    ("/.well-known/openid-configuration", "not_allowed"),
    ("*", "not_origin_form"),
    ("http://evil.example/jmap", "not_origin_form"),
    # scanners, even under an allowed prefix
    ("/index.php", "scanner"),
    ("/jmap/download/a/b/shell.php", "scanner"),
    ("/jmap/download/a/b/x.PHP", "scanner"),
    ("/wp-login.php", "scanner"),
    ("/jmap/wp-admin", "scanner"),
    ("/api/v1/mail/cgi-bin/x", "scanner"),
    ("/jmap/download/a/b/phpinfo", "scanner"),
    ("/api/v1/mail/xmlrpc", "scanner"),
    ("/jmap/%77p-admin", "scanner"),          # %77 = w
    ("/jmap/download/a/b/..hidden", "scanner"),
    # traversal and encoding tricks
    ("/jmap/../admin", "dot_segment"),
    ("/jmap/..", "dot_segment"),
    ("/jmap/./session", "dot_segment"),
    ("/jmap/%2e%2e/admin", "dot_segment"),
    ("/jmap/%2E%2E/admin", "dot_segment"),
    ("/jmap/.%2e/admin", "dot_segment"),
    ("/jmap/x../y", "dot_segment"),
    ("/jmap//session", "empty_segment"),
    ("//jmap/", "empty_segment"),
    ("/jmap/upload%2fa/", "encoded_slash"),
    ("/jmap/upload%2Fa/", "encoded_slash"),
    ("/jmap\\..\\admin", "backslash"),
    ("/jmap/%5c", "backslash"),
    ("/jmap/\x00", "nul"),
    ("/jmap/%00", "nul"),
    ("/jmap/%252e%252e/admin", "double_encoding"),
    ("/jmap/%252f", "double_encoding"),
])
def test_path_table(path, reason) -> None:
    assert RULES.refusal(path) == reason


@pytest.mark.parametrize("pattern, path, match", [
    ("/api/v1/mail/**", "/api/v1/mail", True),
    ("/api/v1/mail/**", "/api/v1/mail/", True),
    ("/api/v1/mail/**", "/api/v1/mail/a/b/c", True),
    ("/api/v1/mail/**", "/api/v1/mailx", False),
    ("/a/*", "/a/b", True),
    ("/a/*", "/a/b/c", False),
    ("/a/?", "/a/b", True),
    ("/a/?", "/a/bc", False),
    ("/a/**/z", "/a/b/c/z", True),
    ("/a.b", "/axb", False),                   # regex characters are literal
])
def test_compile_glob(pattern, path, match) -> None:
    assert bool(compile_glob(pattern).match(path)) is match


def test_glob_must_be_absolute() -> None:
    with pytest.raises(ConfigError):
        compile_glob("api/**")


async def _manager(addons_cfg: dict | None = None, jmap_path: str = "/jmap") -> tuple[AddonManager, Metrics]:
    from proxy.config import StalwartOptions
    metrics = Metrics()
    cfg = Config(addons={"path_allowlist": addons_cfg or {}}, stalwart=StalwartOptions(jmap_path=jmap_path))
    mgr = AddonManager(cfg, metrics)
    await mgr.add(PathAllowlist())
    return mgr, metrics


def _flow(target: str) -> Flow:
    return Flow(Request("GET", target, CIMultiDict()), id="r1")


async def test_addon_refuses_with_404_and_counts() -> None:
    mgr, metrics = await _manager({"extra_paths": ["/healthz/live"]})
    for target in ("/wp-login.php?x=1", "/jmap/%2e%2e/x", "/nothing"):
        with pytest.raises(NotFound) as e:
            await mgr.run("requestheaders", _flow(target))
        assert e.value.status == 404
    await mgr.run("requestheaders", _flow("/healthz/live"))
    await mgr.run("requestheaders", _flow("/jmap/session?x=../../etc"))  # the query is not the path
    reg = metrics.registry
    assert reg.get_sample_value("sge_proxy_path_refused_total", {"reason": "scanner"}) == 1
    assert reg.get_sample_value("sge_proxy_path_refused_total", {"reason": "dot_segment"}) == 1
    assert reg.get_sample_value("sge_proxy_path_refused_total", {"reason": "not_allowed"}) == 1
    assert reg.get_sample_value("sge_proxy_path_refused_total", {"reason": "nul"}) == 0


async def test_addon_follows_the_configured_jmap_path() -> None:
    mgr, _ = await _manager(jmap_path="/mail/jmap")
    await mgr.run("requestheaders", _flow("/mail/jmap/session"))
    with pytest.raises(NotFound):
        await mgr.run("requestheaders", _flow("/jmap/session"))


async def test_bad_extra_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        await _manager({"extra_paths": ["no-slash"]})
    assert "addons.path_allowlist" in str(e.value)


async def test_verdicts_are_remembered_and_bounded() -> None:
    mgr, metrics = await _manager()
    addon = mgr.get("path_allowlist")
    for _ in range(3):  # a remembered refusal still refuses and counts
        with pytest.raises(NotFound):
            await mgr.run("requestheaders", _flow("/wp-admin"))
        await mgr.run("requestheaders", _flow("/jmap"))
    assert metrics.registry.get_sample_value("sge_proxy_path_refused_total", {"reason": "scanner"}) == 3
    assert addon._verdicts == {"/wp-admin": "scanner", "/jmap": None}
    with pytest.raises(NotFound):  # long paths are judged every time, never kept
        await mgr.run("requestheaders", _flow("/x" * PathAllowlist.CACHE_MAX_PATH))
    for i in range(PathAllowlist.CACHE_SIZE + 5):
        await mgr.run("requestheaders", _flow(f"/jmap/download/a/{i}"))
    assert len(addon._verdicts) == PathAllowlist.CACHE_SIZE
