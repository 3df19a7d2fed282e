"""deploy/prometheus/alerts.yaml names only metrics (and labels) the proxy exports: a renamed
metric would otherwise leave an alert that can never fire."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp

import yaml
from prometheus_client import generate_latest

from tests.harness import start_proxy

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
_SUFFIXES = ("_bucket", "_count", "_sum")


async def test_every_metric_and_label_in_the_alert_rules_is_exported(certs, upstream):
    eng = await start_proxy(certs, upstream, chain=None, **{
        "stalwart.health_interval": 3600,
        "addons.auth": {"jwt": {"issuer": ["i"], "audience": ["a"],
                                "keys": [{"kid": "k", "alg": "HS256", "secret": "s" * 32}]}},
        "addons.upstream_identity": {"mode": "impersonate", "impersonator": "p", "secret": "s"},
        "addons.header_signer": {"key_id": "k", "keys": {"k": "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleS0xMg=="}},
        "tls.cert": str(certs / "server.crt"), "tls.key": str(certs / "server.key"),
        "mail.imap.listen": "127.0.0.1:0", "mail.submission.listen": "127.0.0.1:0"})
    try:
        # some traffic, so that labelled families have samples (and show their labels)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{eng.port}/jmap/session") as r:
                assert r.status == 401
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.mail_servers["imap"].port)
        await reader.readline()
        writer.write(b"a LOGOUT\r\n")
        await reader.read()
        writer.close()
        text = generate_latest(eng.metrics.registry).decode()
    finally:
        await eng.stop(drain_timeout=0.1)
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    labels: dict[str, set[str]] = {}
    for m in re.finditer(r"^(sge_proxy_\w+?)(?:_bucket|_count|_sum)?\{([^}]*)\}", text, re.M):
        labels.setdefault(m.group(1), set()).update(k for k in re.findall(r"(\w+)=", m.group(2)))
    for metric in eng.metrics._made.values():  # the declared label names, samples or not
        names = getattr(metric, "label_names", None) or getattr(metric, "_labelnames", None)
        if names:
            name = metric.name if hasattr(metric, "label_names") else metric._name
            if name not in families and name + "_total" in families:  # (a counter's name without _total)
                name += "_total"
            labels.setdefault(name, set()).update(names)

    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 10
    checked = 0
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        for ref in re.finditer(r"(sge_proxy_\w+)(\{[^}]*\})?", rule["expr"]):
            name = ref.group(1)
            for suffix in _SUFFIXES:
                if name.endswith(suffix) and name[:-len(suffix)] in families:
                    name = name[:-len(suffix)]
            assert name in families, f"{rule['alert']}: {name} is not exported"
            for label in re.findall(r"(\w+)\s*[=!]~?", ref.group(2) or ""):
                if label == "le":
                    continue
                if name in labels:  # (a family with no sample yet shows no labels)
                    assert label in labels[name], f"{rule['alert']}: {name} has no label {label!r}"
                    checked += 1
    assert checked >= 5  # the label check is not vacuous
