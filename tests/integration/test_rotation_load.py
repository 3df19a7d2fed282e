"""Client certificates rotating under continuous load, with zero failed requests: through the file
watcher (Kubernetes `..data` symlink swap) and through the Vault double's PKI; an invalid
certificate is refused while traffic goes on; Vault stopped mid-run keeps requests succeeding on
cached secrets with /readyz degraded, and recovers by itself."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.admin import AdminServer
from proxy.devcerts import Pair, _leaf
from tests.harness import start_proxy
from tests.vault_double import VaultDouble

CONCURRENCY = 16


def dev_ca(certs: Path) -> Pair:
    return Pair(serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None),
                x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes()))


def pem(pair: Pair) -> tuple[str, str]:
    return (pair.cert.public_bytes(serialization.Encoding.PEM).decode(),
            pair.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()).decode())


def kube_volume(root: Path, version: str, files: dict[str, str]) -> None:
    """Kubernetes' atomic writer: a new timestamped dir, a fresh `..data` symlink renamed over the
    old one; the visible names are symlinks through `..data`."""
    d = root / f"..{version}"
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(d.name)
    os.replace(tmp, root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


class Load:
    """CONCURRENCY workers sending requests through the proxy until stopped; every answer's
    upstream-seen client certificate CN is recorded."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.ok = 0
        self.failed: list[str] = []
        self.cns: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _worker(self, session: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                async with session.post(f"{self.base}/jmap/?w={i}&n={n}", data=b'{"using":[]}') as r:
                    body = await r.json() if r.status == 200 else await r.text()
                    if r.status != 200:
                        self.failed.append(f"{r.status} {body[:200]}")
                        continue
                self.ok += 1
                self.cns.append(body["client_cert"]["commonName"])
            except Exception as e:  # a failed request is what this test is about
                self.failed.append(repr(e))

    async def __aenter__(self) -> "Load":
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))
        self._tasks = [asyncio.create_task(self._worker(self._session, i)) for i in range(CONCURRENCY)]
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def until_cn(self, cn: str, timeout: float = 5.0) -> None:
        start = len(self.cns)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cn in self.cns[start:]:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"upstream never saw {cn}; last seen {self.cns[-3:]}")

    async def at_least(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ok < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


def metric(eng, name: str, labels: dict | None = None) -> float | None:
    return eng.metrics.registry.get_sample_value(name, labels or {})


async def test_file_rotation_with_kubernetes_swap_under_load(certs, upstream, tmp_path):
    ca = dev_ca(certs)
    now = dt.datetime.now(dt.timezone.utc)
    vol = tmp_path / "client-tls"
    cert, key = pem(_leaf("rotated-0", ca, now, ExtendedKeyUsageOID.CLIENT_AUTH))
    kube_volume(vol, "v0", {"tls.crt": cert, "tls.key": key})
    eng = await start_proxy(certs, upstream, **{"stalwart.client_cert": str(vol / "tls.crt"),
                                                "stalwart.client_key": str(vol / "tls.key"),
                                                "certificates.refresh_interval": 0.1})
    try:
        async with Load(f"http://127.0.0.1:{eng.port}") as load:
            await load.until_cn("rotated-0")
            for i in (1, 2, 3):
                await load.at_least(600 * i)
                cert, key = pem(_leaf(f"rotated-{i}", ca, now, ExtendedKeyUsageOID.CLIENT_AUTH))
                kube_volume(vol, f"v{i}", {"tls.crt": cert, "tls.key": key})
                await load.until_cn(f"rotated-{i}")
            assert eng.tls.generation == 3
            # a certificate from another CA, and then a key that does not match: both refused
            rogue = (certs / "rogue-client.crt").read_text(), (certs / "rogue-client.key").read_text()
            kube_volume(vol, "v4", {"tls.crt": rogue[0], "tls.key": rogue[1]})
            for _ in range(100):
                if metric(eng, "sge_proxy_client_cert_rotation_failed") == 1:
                    break
                await asyncio.sleep(0.02)
            assert metric(eng, "sge_proxy_client_cert_rotation_failed") == 1
            assert "does not chain" in eng.rotator.last_error
            mismatched = pem(_leaf("mismatch", ca, now, ExtendedKeyUsageOID.CLIENT_AUTH))[0], key
            kube_volume(vol, "v5", {"tls.crt": mismatched[0], "tls.key": mismatched[1]})
            for _ in range(100):
                if metric(eng, "sge_proxy_client_cert_rotations_total", {"result": "rejected"}) == 2:
                    break
                await asyncio.sleep(0.02)
            assert "does not match" in eng.rotator.last_error
            ok = load.ok
            await load.at_least(ok + 300)
            assert set(load.cns[-200:]) == {"rotated-3"}
            assert eng.degraded() == ["client_cert_rotation"]
        assert load.failed == [] and load.ok >= 2000
        assert metric(eng, "sge_proxy_client_cert_rotations_total", {"result": "rotated"}) == 3
        assert metric(eng, "sge_proxy_client_cert_rotations_total", {"result": "rejected"}) == 2
        assert eng.tls.generation == 3
    finally:
        await eng.stop(drain_timeout=1)


async def test_pki_rotation_under_load(certs, upstream):
    ca = dev_ca(certs)
    vault = VaultDouble(ca_cert=ca.cert, ca_key=ca.key)
    vault.add_pki_role("sge-mail-proxy", ttl=2, max_ttl=60, not_before_duration=0)
    await vault.start()
    eng = None
    try:
        eng = await start_proxy(certs, upstream, **{
            "secrets": {"backend": "vault", "vault": {"url": vault.url, "token": "root"}},
            "certificates": {"source": "vault-pki", "pki_role": "sge-mail-proxy", "common_name": "pki-client",
                             "ttl": "2s", "refresh_interval": 0.1}})
        assert eng.tls.generation == 1 and eng.tls.info.subject == "CN=pki-client"
        first_expiry = metric(eng, "sge_proxy_client_cert_expiry_timestamp_seconds")
        async with Load(f"http://127.0.0.1:{eng.port}") as load:
            # renewed when a third of the 2 s lifetime remains: ~1.3 s after each issue
            deadline = time.monotonic() + 10
            while eng.tls.generation < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert eng.tls.generation >= 4  # three rotations after the first issue
            await load.at_least(2000)
            assert metric(eng, "sge_proxy_client_cert_expiry_timestamp_seconds") > first_expiry
        assert load.failed == [] and load.ok >= 2000
        assert set(load.cns) == {"pki-client"}
        # the PKI engine starts issuing from the wrong CA: refused, the current one stays (no load
        # here: a 2 s certificate that cannot be renewed soon expires, which is what the alert is for)
        vault.ca_cert = x509.load_pem_x509_certificate((certs / "rogue-ca.crt").read_bytes())
        vault.ca_key = serialization.load_pem_private_key((certs / "rogue-ca.key").read_bytes(), None)
        gen, info = eng.tls.generation, eng.tls.info
        for _ in range(200):
            if metric(eng, "sge_proxy_client_cert_rotation_failed") == 1:
                break
            await asyncio.sleep(0.02)
        assert metric(eng, "sge_proxy_client_cert_rotation_failed") == 1
        assert eng.tls.generation == gen and eng.tls.info is info and "does not chain" in eng.rotator.last_error
        vault.ca_cert, vault.ca_key = ca.cert, ca.key
        for _ in range(200):
            if metric(eng, "sge_proxy_client_cert_rotation_failed") == 0:
                break
            await asyncio.sleep(0.02)
        assert metric(eng, "sge_proxy_client_cert_rotation_failed") == 0 and eng.tls.generation > gen
        assert ("PUT", "pki/issue/sge-mail-proxy") in vault.requests or \
               ("POST", "pki/issue/sge-mail-proxy") in vault.requests
    finally:
        if eng is not None:
            await eng.stop(drain_timeout=1)
        await vault.stop()


class HeaderFromSecret:
    """A test addon: copies a secret into a request header, read through loader.secrets per request."""
    name = "header_from_secret"

    def load(self, loader) -> None:
        self.secrets = loader.secrets

    async def request(self, flow) -> None:
        flow.request.headers["X-Tenant-Region"] = await self.secrets.get("stalwart/tenants/acme", "region")


async def test_vault_stopped_mid_run(certs, upstream):
    vault = VaultDouble()
    cert, key = (certs / "client.crt").read_text(), (certs / "client.key").read_text()
    vault.put_kv2("secret", "stalwart", {"client_cert": cert, "client_key": key,
                                         "ca_cert": (certs / "ca.crt").read_text()})
    vault.put_kv2("secret", "stalwart/tenants/acme", {"region": "eu-west-1"})
    await vault.start()
    eng = admin = None
    try:
        eng = await start_proxy(certs, upstream, addon_objects=[HeaderFromSecret()], **{
            "secrets": {"backend": "vault", "cache_ttl": 0.2, "retry_interval": 0.1, "refresh_interval": 0.1,
                        "vault": {"url": vault.url, "token": "root"}},
            "certificates": {"source": "vault-kv", "refresh_interval": 0.1}})
        admin = AdminServer(eng)
        await admin.start()
        base = f"http://127.0.0.1:{admin.port}"
        async with aiohttp.ClientSession() as s, Load(f"http://127.0.0.1:{eng.port}") as load:
            async def readyz() -> dict:
                async with s.get(base + "/readyz") as r:
                    return {"http": r.status, **await r.json()}

            async def wait_degraded(want: bool) -> dict:
                for _ in range(150):
                    body = await readyz()
                    if body.get("degraded") is want:
                        return body
                    await asyncio.sleep(0.02)
                raise AssertionError(f"readyz never said degraded={want}: {body}")

            await load.at_least(200)
            assert (await readyz())["degraded"] is False
            port = vault.port
            await vault.stop()
            body = await wait_degraded(True)
            assert body["http"] == 200 and body["checks"]["secrets"].startswith("degraded")
            ok = load.ok
            await load.at_least(ok + 500)
            assert eng.secrets.status().stale_paths >= 1
            assert metric(eng, "sge_proxy_secret_stale_reads_total", {"source": "vault"}) > 0
            assert metric(eng, "sge_proxy_secret_source_up", {"source": "vault"}) == 0
            assert metric(eng, "sge_proxy_degraded") == 1
            await vault.start(port)
            body = await wait_degraded(False)
            assert body["checks"]["secrets"] == "ok"
            ok = load.ok
            await load.at_least(ok + 200)
        assert load.failed == []
        assert metric(eng, "sge_proxy_degraded") == 0
        assert set(load.cns) == {"sge-mail-proxy-client"}
    finally:
        if admin is not None:
            await admin.stop()
        if eng is not None:
            await eng.stop(drain_timeout=1)
        await vault.stop()
