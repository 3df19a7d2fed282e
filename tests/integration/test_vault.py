"""hvac against the Vault double (every endpoint it offers), then VaultSecretSource: KV v2/v1,
token/AppRole/Kubernetes auth, renewal and re-login, and serving cached values while Vault is
really stopped, recovering when it is started again on the same port."""
from __future__ import annotations

import asyncio
import time

import hvac
import hvac.exceptions as hx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config import VaultOptions
from proxy.metrics import Metrics
from proxy.secrets import SecretNotFound, SecretUnavailable
from proxy.vault import VaultSecretSource
from tests.vault_double import VaultDouble


def dev_ca(certs):
    cert = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    return cert, key


@pytest.fixture
async def vault(certs):
    cert, key = dev_ca(certs)
    v = VaultDouble(ca_cert=cert, ca_key=key)
    v.add_pki_role("proxy", ttl=600, max_ttl=3600)
    await v.start()
    yield v
    await v.stop()


def client(v: VaultDouble, token: str | None = "root") -> hvac.Client:
    # strict_http: LIST as GET ?list=true (Vault accepts both; aiohttp's parser refuses the LIST verb)
    return hvac.Client(url=v.url, token=token, timeout=2, strict_http=True)


async def call(fn, *a, **kw):
    return await asyncio.to_thread(fn, *a, **kw)


# ---------------------------------------------------------------------------------------------- hvac
async def test_hvac_kv_v2(vault):
    c = client(vault)
    kv = c.secrets.kv.v2
    w = await call(kv.create_or_update_secret, path="stalwart/tenants/acme", secret={"server_url": "https://a"})
    assert w["data"]["version"] == 1
    await call(kv.create_or_update_secret, path="stalwart/tenants/acme", secret={"server_url": "https://b"})
    r = await call(kv.read_secret_version, path="stalwart/tenants/acme", raise_on_deleted_version=True)
    assert r["data"]["data"] == {"server_url": "https://b"} and r["data"]["metadata"]["version"] == 2
    r1 = await call(kv.read_secret_version, path="stalwart/tenants/acme", version=1, raise_on_deleted_version=True)
    assert r1["data"]["data"] == {"server_url": "https://a"}
    meta = await call(kv.read_secret_metadata, path="stalwart/tenants/acme")
    assert meta["data"]["current_version"] == 2 and set(meta["data"]["versions"]) == {"1", "2"}
    assert (await call(kv.list_secrets, path="stalwart"))["data"]["keys"] == ["tenants/"]
    assert (await call(kv.list_secrets, path="stalwart/tenants"))["data"]["keys"] == ["acme"]
    with pytest.raises(hx.InvalidPath) as e:
        await call(kv.read_secret_version, path="stalwart/nope", raise_on_deleted_version=True)
    assert e.value.errors == []
    await call(kv.delete_latest_version_of_secret, path="stalwart/tenants/acme")
    with pytest.raises(hx.InvalidPath):
        await call(kv.read_secret_version, path="stalwart/tenants/acme", raise_on_deleted_version=True)
    deleted = await call(kv.read_secret_version, path="stalwart/tenants/acme", raise_on_deleted_version=False)
    assert deleted["data"]["data"] is None and deleted["data"]["metadata"]["deletion_time"]
    await call(kv.delete_metadata_and_all_versions, path="stalwart/tenants/acme")
    with pytest.raises(hx.InvalidPath):
        await call(kv.read_secret_metadata, path="stalwart/tenants/acme")


async def test_hvac_kv_v1(vault):
    kv = client(vault).secrets.kv.v1
    await call(kv.create_or_update_secret, path="stalwart/x", secret={"k": "v"}, mount_point="kv")
    r = await call(kv.read_secret, path="stalwart/x", mount_point="kv")
    assert r["data"] == {"k": "v"} and r["lease_duration"] > 0
    assert (await call(kv.list_secrets, path="stalwart", mount_point="kv"))["data"]["keys"] == ["x"]
    await call(kv.delete_secret, path="stalwart/x", mount_point="kv")
    with pytest.raises(hx.InvalidPath):
        await call(kv.read_secret, path="stalwart/x", mount_point="kv")


async def test_hvac_pki_issue(vault, certs):
    pki = client(vault).secrets.pki
    r = await call(pki.generate_certificate, name="proxy", common_name="proxy-1", extra_params={"ttl": "120s"})
    d = r["data"]
    cert = x509.load_pem_x509_certificate(d["certificate"].encode())
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "proxy-1"
    assert int(cert.not_valid_after_utc.timestamp()) == d["expiration"]
    assert 115 <= d["expiration"] - time.time() <= 121
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    key = serialization.load_pem_private_key(d["private_key"].encode(), None)
    assert key.public_key() == cert.public_key()
    assert d["issuing_ca"] == d["ca_chain"][0] and d["private_key_type"] == "ec"
    assert d["serial_number"].replace(":", "") == f"{cert.serial_number:x}".rjust(len(d["serial_number"].replace(":", "")), "0")
    capped = await call(pki.generate_certificate, name="proxy", common_name="x", extra_params={"ttl": "100h"})
    assert capped["warnings"] and capped["data"]["expiration"] - time.time() <= 3601
    with pytest.raises(hx.InvalidRequest, match="unknown role"):
        await call(pki.generate_certificate, name="nope", common_name="x")


async def test_hvac_tokens_and_logins(vault, tmp_path):
    tok = vault.add_token(60, max_ttl=600)
    c = client(vault, tok)
    look = await call(c.auth.token.lookup_self)
    assert look["data"]["renewable"] and 58 <= look["data"]["ttl"] <= 60 and look["data"]["id"] == tok
    renewed = await call(c.auth.token.renew_self, increment=300)
    assert renewed["auth"]["client_token"] == tok and 298 <= renewed["auth"]["lease_duration"] <= 300
    assert await call(c.is_authenticated)

    vault.add_approle("role-1", "secret-1", ttl=30)
    a = client(vault, None)
    login = await call(a.auth.approle.login, role_id="role-1", secret_id="secret-1")
    assert login["auth"]["lease_duration"] == 30 and a.token == login["auth"]["client_token"]
    assert login["auth"]["metadata"] == {"role_name": "sge-mail-proxy"}
    assert await call(a.is_authenticated)
    with pytest.raises(hx.InvalidRequest, match="invalid secret id"):
        await call(client(vault, None).auth.approle.login, role_id="role-1", secret_id="wrong")
    with pytest.raises(hx.InvalidRequest, match="invalid role ID"):
        await call(client(vault, None).auth.approle.login, role_id="nope", secret_id="secret-1")

    vault.add_kubernetes_role("sge", "header.payload.sig")
    k = client(vault, None)
    kl = await call(k.auth.kubernetes.login, role="sge", jwt="header.payload.sig")
    assert kl["auth"]["renewable"] and await call(k.is_authenticated)
    with pytest.raises(hx.Forbidden):
        await call(client(vault, None).auth.kubernetes.login, role="sge", jwt="forged")


async def test_hvac_errors_403_503(vault):
    with pytest.raises(hx.Forbidden, match="permission denied"):
        await call(client(vault, "hvs.wrong").secrets.kv.v2.read_secret_version, path="x",
                   raise_on_deleted_version=True)
    with pytest.raises(hx.Forbidden):
        await call(client(vault, None).auth.token.lookup_self)
    vault.sealed = True
    with pytest.raises(hx.VaultDown, match="sealed"):
        await call(client(vault).secrets.kv.v2.read_secret_version, path="x", raise_on_deleted_version=True)
    status = await call(client(vault).sys.read_health_status, method="GET")
    assert status.status_code == 503 and status.json()["sealed"] is True
    vault.sealed = False
    assert (await call(client(vault).sys.read_health_status, method="GET"))["sealed"] is False


# ---------------------------------------------------------------------------------------------- the source
def source(vault: VaultDouble, metrics: Metrics | None = None, **opts) -> VaultSecretSource:
    o = {"url": vault.url, "token": "root", **opts}
    return VaultSecretSource(VaultOptions(**o), ttl=0.2, negative_ttl=0.2, retry_interval=0.1, metrics=metrics)


async def test_source_reads_kv_v2_and_v1(vault):
    vault.put_kv2("secret", "stalwart/tenants/acme", {"server_url": "https://acme.example"})
    vault.put_kv1("kv", "stalwart/tenants/acme", {"server_url": "https://v1.example"})
    v2, v1 = source(vault), source(vault, mount="kv", kv_version=1)
    for s in (v2, v1):
        await s.start()
    try:
        assert await v2.get("stalwart/tenants/acme", "server_url") == "https://acme.example"
        assert await v1.get("stalwart/tenants/acme", "server_url") == "https://v1.example"
        with pytest.raises(SecretNotFound):
            await v2.get("stalwart/tenants/nope", "server_url")
        with pytest.raises(SecretNotFound):
            await v2.get("stalwart/tenants/acme", "nope")
    finally:
        await v2.close()
        await v1.close()


async def test_bad_token_is_unavailable_not_missing(vault):
    s = source(vault, token="hvs.bad")
    await s.start()
    try:
        assert not s.status().healthy
        with pytest.raises(SecretUnavailable, match="permission denied"):
            await s.read("anything")
    finally:
        await s.close()


async def test_token_renewed_and_approle_relogin(vault):
    vault.add_approle("r", "s", ttl=1)
    s = source(vault, auth="approle", role_id="r", secret_id="s", token=None)
    vault.put_kv2("secret", "a", {"k": "v"})
    await s.start()
    try:
        assert s.logins == 1
        await asyncio.sleep(0.9)  # renewed at 2/3 of 1 s
        assert s.renewals >= 1
        assert await s.get("a", "k") == "v"
        del vault.tokens[s.client.token]  # revoked behind our back: the next read logs in again
        s.invalidate()
        assert await s.get("a", "k") == "v" and s.logins == 2
    finally:
        await s.close()


async def test_kubernetes_login_from_jwt_file(vault, tmp_path):
    (tmp_path / "token").write_text("k8s.jwt.value\n")
    vault.add_kubernetes_role("sge-mail-proxy", "k8s.jwt.value", ttl=300)
    vault.put_kv2("secret", "a", {"k": "v"})
    s = source(vault, auth="kubernetes", kubernetes_role="sge-mail-proxy",
               kubernetes_jwt_file=tmp_path / "token", token=None)
    await s.start()
    try:
        assert s.logins == 1 and await s.get("a", "k") == "v"
    finally:
        await s.close()


async def test_serves_cached_values_while_vault_is_stopped_then_recovers(vault):
    m = Metrics()
    vault.put_kv2("secret", "stalwart/tenants/acme", {"server_url": "https://acme.example"})
    s = source(vault, m)
    await s.start()
    try:
        assert await s.get("stalwart/tenants/acme", "server_url") == "https://acme.example"
        port = vault.port
        await vault.stop()
        await asyncio.sleep(0.25)  # past the cache TTL
        for _ in range(5):
            assert await s.get("stalwart/tenants/acme", "server_url") == "https://acme.example"
            await asyncio.sleep(0.05)
        st = s.status()
        assert not st.healthy and st.stale_paths == 1 and "cannot connect" in st.detail
        assert m.registry.get_sample_value("sge_proxy_secret_stale_reads_total", {"source": "vault"}) >= 5
        with pytest.raises(SecretUnavailable):
            await s.get("stalwart/tenants/other", "server_url")
        vault.put_kv2("secret", "stalwart/tenants/acme", {"server_url": "https://moved.example"})
        await vault.start(port)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not s.status().healthy:
            await s.refresh()
            await asyncio.sleep(0.05)
        assert s.status().healthy and s.status().stale_paths == 0
        assert await s.get("stalwart/tenants/acme", "server_url") == "https://moved.example"
    finally:
        await s.close()


async def test_sealed_vault_is_degraded_with_cached_values(vault):
    vault.put_kv2("secret", "a", {"k": "v"})
    s = source(vault)
    await s.start()
    try:
        assert await s.get("a", "k") == "v"
        vault.sealed = True
        await asyncio.sleep(0.25)
        assert await s.get("a", "k") == "v"
        assert "sealed" in s.status().detail
        vault.sealed = False
        await asyncio.sleep(0.15)
        assert await s.get("a", "k") == "v" and s.status().healthy
    finally:
        await s.close()
