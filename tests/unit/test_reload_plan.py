"""Reload planning (proxy/reload.py): what changed, what needs a restart, what gets rebuilt."""
from __future__ import annotations

import dataclasses

import pytest

from proxy.config import load_config
from proxy.reload import ReloadResult, changed_keys, keep_running, plan_reload

BASE = {"listen": "127.0.0.1:0", "stalwart.url": "https://a.example", "chain": ["path_allowlist"]}


def cfg(**over):
    o = dict(BASE)
    o.update({k.replace("__", "."): v for k, v in over.items()})
    return load_config(None, env={}, overrides=o)


@pytest.mark.parametrize("over,changed,restart,new_pool,new_tls", [
    ({}, (), (), False, False),
    ({"addons": {"path_allowlist": {"extra_paths": ["/x"]}}}, ("addons.path_allowlist",), (), False, False),
    ({"chain": ["auth"]}, ("chain",), (), False, False),
    ({"limits__max_headers": 10, "drain_timeout": 3}, ("limits.max_headers", "drain_timeout"), (), False, False),
    ({"stalwart__url": "https://b.example"}, ("stalwart.url",), (), True, False),
    ({"stalwart__max_connections": 3}, ("stalwart.max_connections",), (), True, False),
    ({"stalwart__tls_min_version": "1.2"}, ("stalwart.tls_min_version",), (), True, True),
    ({"listen": "127.0.0.1:9"}, ("listen",), ("listen",), False, False),
    ({"admin_listen": "127.0.0.1:9"}, ("admin_listen",), ("admin_listen",), False, False),
    ({"workers": 4}, ("workers",), ("workers",), False, False),
    ({"tls__min_version": "1.3"}, ("tls.min_version",), ("tls.min_version",), False, False),
    ({"secrets__vault__url": "http://v:1"}, ("secrets.vault.url",), ("secrets.vault.url",), False, False),
    ({"access_log": "off"}, ("access_log",), ("access_log",), False, False),
    ({"listen": "127.0.0.1:9", "stalwart__url": "https://b.example"},
     ("listen", "stalwart.url"), ("listen",), True, False),
])
def test_plan(over, changed, restart, new_pool, new_tls):
    plan = plan_reload(cfg(), cfg(**over), cert_files=True)
    assert set(plan.changed) == set(changed)
    assert plan.restart_needed == restart
    assert (plan.new_pool, plan.new_tls) == (new_pool, new_tls)


def test_upstream_tls_change_needs_restart_when_the_certificate_comes_from_vault():
    plan = plan_reload(cfg(), cfg(stalwart__verify_hostname=False), cert_files=False)
    assert plan.restart_needed == ("stalwart.verify_hostname",)
    assert not plan.new_tls and not plan.new_pool


def test_where_the_file_was_is_not_a_change(tmp_path):
    a = cfg()
    b = dataclasses.replace(a, source=str(tmp_path / "x.yaml"), base_dir=tmp_path)
    assert changed_keys(a, b) == []


def test_keep_running_keeps_restart_keys_and_the_bound_port():
    running = dataclasses.replace(cfg(), listen="127.0.0.1:41234")  # the port the OS chose
    new = cfg(listen="127.0.0.1:9", workers=3, stalwart__url="https://b.example", stalwart__verify_hostname=False)
    kept = keep_running(new, running, ("listen", "workers", "stalwart.verify_hostname"))
    assert kept.listen == "127.0.0.1:41234" and kept.workers == 1
    assert kept.public_base() == "http://127.0.0.1:41234"
    assert kept.stalwart.url == "https://b.example" and kept.stalwart.verify_hostname is True


def test_keep_running_keeps_whole_sections_that_are_built_once():
    running = cfg()
    new = cfg(secrets__backend="vault", certificates__source="vault-pki", certificates__pki_role="r")
    kept = keep_running(new, running, ("secrets.backend", "certificates.source", "certificates.pki_role"))
    assert kept.secrets.backend == "file" and kept.certificates.source == "files"


@pytest.mark.parametrize("result,body", [
    (ReloadResult.refused(422, "config error: x: bad"), {"status": "refused", "error": "config error: x: bad"}),
    (ReloadResult(True, 200, changed=("chain",), restart_needed=("listen",), generation=2),
     {"status": "reloaded", "generation": 2, "changed": ["chain"], "restart_needed": ["listen"]}),
])
def test_result_json(result, body):
    assert result.to_json() == body
