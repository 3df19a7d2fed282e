"""Shared fixtures: dev certificates in a temp dir, a real mTLS upstream, a real proxy."""
from __future__ import annotations

import os
import socket
import ssl
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy import devcerts  # noqa: E402


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """A fresh dev PKI (CA, server, client, rogue client) for this test session."""
    d = tmp_path_factory.mktemp("pki")
    devcerts.generate(d)
    return d


@pytest.fixture(scope="session")
def server_ssl(certs) -> ssl.SSLContext:
    """An upstream's TLS context: requires a client certificate from the dev CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(str(certs / "server.crt"), str(certs / "server.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_env(certs: Path, upstream: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "STALWART_URL": upstream,
        "STALWART_CLIENT_CERT": str(certs / "client.crt"),
        "STALWART_CLIENT_KEY": str(certs / "client.key"),
        "STALWART_CA_CERT": str(certs / "ca.crt"),
        "SGE_LISTEN": "127.0.0.1:0",
        "SGE_ADMIN_LISTEN": "127.0.0.1:0",
        "PYTHONPATH": str(ROOT),
    })
    env.update(extra)
    return env


@pytest.fixture
async def upstream(server_ssl):
    """The test upstream (tests/harness.upstream_app) over TLS requiring a dev client
    certificate: its base URL. Modules that need the app too define their own."""
    from tests.harness import start_app, upstream_app
    runner, port = await start_app(upstream_app(), server_ssl)
    yield f"https://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def idp():
    """A JWKS identity provider on 127.0.0.1 with one ES256 key ("k1"): mint with idp.keys[0].token()."""
    from tests.jwks_server import JwksServer, SigningKey
    async with JwksServer() as server:
        server.publish(SigningKey("k1"))
        yield server


@pytest.fixture
async def client():
    import aiohttp
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s
