"""The facade's attachment endpoints stream: a 40 MB attachment goes up through
POST /api/v1/mail/attachments and comes back through GET .../attachments/{blobId} with the proxy
running as a real process (full default chain) in front of Cyrus (tests/e2e/stack). The proxy's
peak resident memory (VmHWM) grows by less than 30 MB, and the bytes come back identical.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from addons.policy import DEFAULT_POLICY
from tests.conftest import proxy_env
from tests.harness import ProxyProcess
from tests.jwks_server import AUDIENCE, ISSUER, SigningKey

pytestmark = pytest.mark.e2e

USER = "alice@example.com"
API = "/api/v1/mail"
SIZE = 40 * 1024 * 1024
GROWTH_LIMIT_KIB = 30 * 1024


def _peak_kib(pid: int) -> int:
    """VmHWM: the process's peak resident set, so a buffer freed again still shows."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc")


def _config(tmp: Path, stack, key: SigningKey) -> Path:
    pem = key.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    doc = {
        "stalwart": {"health_interval": 3600},
        "addons": {
            "auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE,
                             "keys": [{"kid": key.kid, "alg": key.alg, "public_key": pem}]}},
            "policy": {"files": [str(DEFAULT_POLICY)]},
            "upstream_identity": {"mode": "authorize-as", "admin_user": stack.admin[0], "secret": stack.admin[1]},
            "header_signer": {"key_id": "e2e", "keys": {"e2e": base64.b64encode(os.urandom(32)).decode()}},
        },
    }
    path = tmp / "proxy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def _exercise(base: str, token: str, pid: int) -> tuple[int, int, str, str]:
    h = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(headers=h, timeout=timeout) as http:
        async def upload(data: bytes) -> dict:
            async with http.post(base + f"{API}/attachments", data=data,
                                 headers={"Content-Type": "application/x-sge-big"}) as r:
                body = await r.read()
                assert r.status == 201, body[:500]
                return orjson.loads(body)

        async def attach(blob: str, subject: str) -> tuple[str, str]:
            async with http.post(base + f"{API}/messages", json={
                    "to": [USER], "subject": subject, "send": False,
                    "attachments": [{"blobId": blob, "type": "application/x-sge-big", "name": "big.bin"}]}) as r:
                body = await r.read()
                assert r.status == 201, body[:500]
                mid = orjson.loads(body)["id"]
            async with http.get(base + f"{API}/messages/{mid}") as r:
                (att,) = (await r.json())["attachments"]
            return mid, att["url"]

        async def download(url: str) -> tuple[int, str, aiohttp.ClientResponse]:
            digest, n = hashlib.sha256(), 0
            async with http.get(base + url) as r:
                assert r.status == 200, await r.read()
                async for chunk in r.content.iter_chunked(1 << 16):
                    digest.update(chunk)
                    n += len(chunk)
            return n, digest.hexdigest(), r

        created = []
        try:
            # warm up every code path (session, caches, TLS pool) with a small attachment
            small = os.urandom(4096)
            mid, url = await attach((await upload(small))["blobId"], f"stream warm-up {uuid.uuid4().hex}")
            created.append(mid)
            assert (await download(url))[:2] == (len(small), hashlib.sha256(small).hexdigest())
            payload = os.urandom(SIZE)
            before = _peak_kib(pid)

            up = await upload(payload)
            assert up["size"] == SIZE and up["type"] == "application/x-sge-big"
            mid, url = await attach(up["blobId"], f"stream {uuid.uuid4().hex}")
            created.append(mid)
            n, digest, r = await download(url)
            after = _peak_kib(pid)
            assert r.headers["Content-Type"] == "application/x-sge-big"
            assert r.headers["Content-Disposition"] == "attachment; filename=\"big.bin\"; filename*=UTF-8''big.bin"
            assert "Server" not in r.headers and "ETag" not in r.headers
            return n, after - before, digest, hashlib.sha256(payload).hexdigest()
        finally:
            for mid in created:
                async with http.delete(base + f"{API}/messages/{mid}?permanent=true"):
                    pass


def test_40mb_attachment_streams_through_the_facade(stack, tmp_path):
    key = SigningKey("stream")
    config = _config(tmp_path, stack, key)
    p = ProxyProcess(proxy_env(stack.certs, stack.url, SGE_ACCESS_LOG="off"), ["--config", str(config)])
    try:
        n, growth, got, sent = asyncio.run(_exercise(f"http://127.0.0.1:{p.port}",
                                                     key.token(USER, email=USER, ttl=900), p.proc.pid))
        assert n == SIZE and got == sent
        assert growth < GROWTH_LIMIT_KIB, f"the proxy's peak RSS grew {growth} KiB"
    finally:
        p.stop()
