"""API keys kept in the secret source: from Vault (the double, through hvac) and from a file
source, rotated without a restart; the last good table keeps serving when the source is down."""
from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp

from tests.harness import start_proxy
from tests.vault_double import VaultDouble


def record(key: str, subject: str) -> dict:
    return {"sha256": hashlib.sha256(key.encode()).hexdigest(), "subject": subject,
            "email": f"{subject}@example.com", "roles": ["user"]}


def chain_config(secrets: dict) -> dict:
    return {
        "chain": ["auth"],
        "secrets": secrets,
        "addons": {"auth": {"api_keys": {"secret_path": "sge/api_keys", "secret_key": "records",
                                         "refresh_interval": 0.2}}},
    }


async def status_for(base: str, key: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/jmap/", headers={"X-API-Key": key}) as r:
            return r.status


async def wait_for(base: str, key: str, status: int) -> None:
    for _ in range(50):
        if await status_for(base, key) == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{key} never got {status}")


async def test_api_keys_from_vault_rotate_and_survive_vault_down(certs, upstream):
    vault = VaultDouble()
    vault.put_kv2("secret", "sge/api_keys", {"records": json.dumps([record("sgek_alpha", "alpha")])})
    port = await vault.start()
    eng = await start_proxy(certs, upstream, **chain_config(
        {"backend": "vault", "cache_ttl": 0.1, "retry_interval": 0.1, "vault": {"url": vault.url, "token": "root"}}))
    base = f"http://127.0.0.1:{eng.port}"
    try:
        assert await status_for(base, "sgek_alpha") == 200
        assert await status_for(base, "sgek_beta") == 401
        vault.put_kv2("secret", "sge/api_keys", {"records": json.dumps([record("sgek_beta", "beta")])})
        await wait_for(base, "sgek_beta", 200)      # new key accepted without restart
        await wait_for(base, "sgek_alpha", 401)     # removed key refused
        await vault.stop()
        await asyncio.sleep(0.5)                    # several refreshes fail meanwhile
        assert await status_for(base, "sgek_beta") == 200  # the last good table keeps serving
    finally:
        await eng.stop(drain_timeout=0)
        await vault.stop()
    assert port


async def test_api_keys_from_the_file_secret_source(certs, upstream, tmp_path):
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(json.dumps({"sge/api_keys": {"records": [record("sgek_one", "one")]}}))
    eng = await start_proxy(certs, upstream, **chain_config({"backend": "file", "file": str(secrets)}))
    base = f"http://127.0.0.1:{eng.port}"
    try:
        assert await status_for(base, "sgek_one") == 200
        secrets.write_text(json.dumps({"sge/api_keys": {"records": [record("sgek_two", "two")]}}))
        await wait_for(base, "sgek_two", 200)
        await wait_for(base, "sgek_one", 401)
        secrets.write_text("{not yaml: [")         # a broken file keeps the last good keys
        await asyncio.sleep(0.5)
        assert await status_for(base, "sgek_two") == 200
    finally:
        await eng.stop(drain_timeout=0)
