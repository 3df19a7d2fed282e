"""The secret cache (TTL, negative cache, stale reads, single flight, recovery) and the file source."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from proxy.metrics import Metrics
from proxy.secrets import (CachedSource, FileSecretSource, SecretNotFound, SecretSource, SecretUnavailable,
                           file_signature, split_ref)
from proxy.vault import renew_delay


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class DictBackend(CachedSource):
    """A backend held in a dict, with a switch that makes it unreachable, counting reads."""
    name = "dict"

    def __init__(self, data: dict, **kw) -> None:
        super().__init__(**kw)
        self.data, self.down, self.calls, self.delay = data, False, 0, 0.0

    async def _fetch(self, path: str) -> dict:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise SecretUnavailable("backend down")
        if path not in self.data:
            raise SecretNotFound(path)
        return self.data[path]


def stale_reads(m: Metrics, source: str) -> float:
    return m.registry.get_sample_value("sge_proxy_secret_stale_reads_total", {"source": source}) or 0.0


@pytest.mark.parametrize("ref,expected", [
    ("stalwart/tenants/acme/server_url", ("stalwart/tenants/acme", "server_url")),
    ("/stalwart/client_cert/", ("stalwart", "client_cert")),
])
def test_split_ref(ref, expected):
    assert split_ref(ref) == expected


@pytest.mark.parametrize("ref", ["server_url", "", "/"])
def test_split_ref_needs_path_and_key(ref):
    with pytest.raises(ValueError):
        split_ref(ref)


@pytest.mark.parametrize("ttl,delay", [(3600, 2400), (30, 20), (0, 0), (-5, 0)])
def test_token_renewed_at_two_thirds(ttl, delay):
    assert renew_delay(ttl) == pytest.approx(delay)


async def test_values_cached_for_ttl_then_reread():
    clock = Clock()
    src = DictBackend({"a": {"k": "1"}}, ttl=10, clock=clock)
    assert await src.get("a", "k") == "1"
    src.data["a"] = {"k": "2"}
    clock.t += 9.9
    assert await src.get("a", "k") == "1"
    clock.t += 0.2
    assert await src.get("a", "k") == "2"
    assert src.calls == 2


async def test_missing_paths_cached_briefly():
    clock = Clock()
    src = DictBackend({}, ttl=60, negative_ttl=2, clock=clock)
    for _ in range(3):
        with pytest.raises(SecretNotFound):
            await src.read("b")
    assert src.calls == 1
    src.data["b"] = {"k": "v"}
    clock.t += 1.9
    with pytest.raises(SecretNotFound):
        await src.read("b")
    clock.t += 0.2
    assert await src.read("b") == {"k": "v"}
    with pytest.raises(SecretNotFound, match="no key 'x'"):
        await src.get("b", "x")


async def test_stale_values_served_while_backend_down_and_recovery():
    clock, m = Clock(), Metrics()
    src = DictBackend({"a": {"k": "1"}}, ttl=5, retry_interval=3, metrics=m, clock=clock)
    assert await src.get("a", "k") == "1"
    src.down = True
    clock.t += 6
    assert await src.get("a", "k") == "1"  # stale
    st = src.status()
    assert (st.healthy, st.stale_paths, st.detail) == (False, 1, "backend down")
    assert stale_reads(m, "dict") == 1
    assert m.registry.get_sample_value("sge_proxy_secret_source_up", {"source": "dict"}) == 0
    calls = src.calls
    clock.t += 1  # within retry_interval: answered from the cache without asking the backend
    assert await src.get("a", "k") == "1"
    assert src.calls == calls and stale_reads(m, "dict") == 2
    with pytest.raises(SecretUnavailable):  # nothing cached for this one
        await src.get("never-read", "k")
    src.down = False
    src.data["a"] = {"k": "2"}
    clock.t += 3
    assert await src.get("a", "k") == "2"
    assert src.status().healthy and src.status().stale_paths == 0
    assert m.registry.get_sample_value("sge_proxy_secret_source_up", {"source": "dict"}) == 1


async def test_refresh_rereads_expired_paths_and_notices_recovery():
    clock = Clock()
    src = DictBackend({"a": {"k": "1"}}, ttl=5, retry_interval=1, clock=clock)
    await src.read("a")
    src.down = True
    clock.t += 6
    await src.refresh()
    assert not src.status().healthy
    src.down = False
    clock.t += 2
    await src.refresh()
    assert src.status().healthy


async def test_one_backend_read_per_path_at_a_time():
    src = DictBackend({"a": {"k": "1"}})
    src.delay = 0.05
    results = await asyncio.gather(*(src.get("a", "k") for _ in range(20)))
    assert results == ["1"] * 20 and src.calls == 1


async def test_returned_dicts_do_not_alter_the_cache():
    src = DictBackend({"a": {"k": "1"}})
    (await src.read("a"))["k"] = "changed"
    assert await src.get("a", "k") == "1"


# ---------------------------------------------------------------------------------------------- files
def write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


async def test_file_source_yaml_and_tree(tmp_path):
    write(tmp_path / "secrets.yaml", "stalwart/tenants/acme:\n  server_url: https://acme.mail.example\n  port: 443\n")
    write(tmp_path / "tree/stalwart/tenants/acme/server_url", "https://tree.example\n")
    write(tmp_path / "tree/stalwart/tenants/acme/region", "eu-west-1")
    write(tmp_path / "tree/stalwart/tenants/acme/.hidden", "x")
    src = FileSecretSource(file=tmp_path / "secrets.yaml", directory=tmp_path / "tree")
    assert isinstance(src, SecretSource)
    assert await src.read("stalwart/tenants/acme") == {"server_url": "https://tree.example", "port": 443,
                                                        "region": "eu-west-1"}
    assert await src.get("/stalwart/tenants/acme/", "port") == "443"
    for bad in ("stalwart/tenants/other", "../etc", "stalwart/../../x"):
        with pytest.raises(SecretNotFound):
            await src.read(bad)


async def test_file_source_sees_changes_after_ttl(tmp_path):
    clock = Clock()
    f = tmp_path / "s.yaml"
    write(f, "a: {k: one}\n")
    src = FileSecretSource(file=f, ttl=1, clock=clock)
    assert await src.get("a", "k") == "one"
    write(f, "a: {k: two-two}\n")
    assert await src.get("a", "k") == "one"
    clock.t += 1.1
    assert await src.get("a", "k") == "two-two"


async def test_malformed_yaml_keeps_last_values_stale(tmp_path):
    clock, m = Clock(), Metrics()
    f = tmp_path / "s.yaml"
    write(f, "a: {k: one}\nb: {k: bee}\n")
    src = FileSecretSource(file=f, ttl=1, retry_interval=1, metrics=m, clock=clock)
    assert await src.get("a", "k") == "one"
    write(f, "a: {k: [unclosed\n")
    clock.t += 1.5
    assert await src.get("a", "k") == "one"
    st = src.status()
    assert not st.healthy and "invalid YAML" in st.detail and "one" not in st.detail
    assert stale_reads(m, "file") == 1
    with pytest.raises(SecretUnavailable):
        await src.get("b", "k")  # never read before the file broke
    write(f, "a: {k: fixed}\n")
    clock.t += 1.5
    assert await src.get("a", "k") == "fixed"
    assert src.status().healthy


@pytest.mark.parametrize("doc", ["- a\n- b\n", "a: just-a-string\n"])
async def test_yaml_must_map_paths_to_mappings(tmp_path, doc):
    write(tmp_path / "s.yaml", doc)
    with pytest.raises(SecretUnavailable, match="mapping of paths"):
        await FileSecretSource(file=tmp_path / "s.yaml").read("a")


def kube_volume(root: Path, version: str, files: dict[str, str]) -> None:
    """Kubernetes' atomic writer: files in a timestamped dir, `..data` -> it, names -> ..data/name.
    A new version is a new dir and a rename of a fresh symlink over `..data`."""
    d = root / f"..{version}"
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text)
        os.utime(d / name, (1_700_000_000, 1_700_000_000))  # same mtime every version
    tmp = root / "..data_tmp"
    tmp.symlink_to(d.name)
    os.replace(tmp, root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


async def test_kubernetes_data_swap_is_seen(tmp_path):
    clock = Clock()
    vol = tmp_path / "tree/stalwart/tenants/acme"
    kube_volume(vol, "v1", {"server_url": "https://one.example"})
    yaml_vol = tmp_path / "yaml"
    kube_volume(yaml_vol, "v1", {"secrets.yaml": "x: {k: aaa}\n"})
    before = file_signature(yaml_vol / "secrets.yaml")
    src = FileSecretSource(file=yaml_vol / "secrets.yaml", directory=tmp_path / "tree", ttl=1, clock=clock)
    assert await src.read("stalwart/tenants/acme") == {"server_url": "https://one.example"}
    assert await src.get("x", "k") == "aaa"
    kube_volume(vol, "v2", {"server_url": "https://two.example"})
    kube_volume(yaml_vol, "v2", {"secrets.yaml": "x: {k: bbb}\n"})  # same size, same mtime
    after = file_signature(yaml_vol / "secrets.yaml")
    assert before[2:] == after[2:] and before[0] != after[0]
    clock.t += 1.5
    assert await src.read("stalwart/tenants/acme") == {"server_url": "https://two.example"}
    assert await src.get("x", "k") == "bbb"


def test_file_signature_missing(tmp_path):
    assert file_signature(tmp_path / "nope") is None
