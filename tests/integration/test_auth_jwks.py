"""The auth addon against a real JWKS served by aiohttp on 127.0.0.1:0: key rotation, the
refetch rate limit, an identity provider that goes away, Cache-Control max-age."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from multidict import CIMultiDict

from addons.auth import Auth
from proxy.addonmanager import AddonManager
from proxy.config import Config
from proxy.errors import Unauthorized
from proxy.flow import Flow, Request
from proxy.metrics import Metrics

ISS = "https://idp.example.test"
AUD = "sge-mail-proxy"

K1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
K2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEC = ec.generate_private_key(ec.SECP256R1())
WEAK = rsa.generate_private_key(public_exponent=65537, key_size=1024)


def jwk(private: Any, kid: str, alg: str | None = "RS256") -> dict:
    if isinstance(private, rsa.RSAPrivateKey):
        d = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        d = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    d.update({"kid": kid, "use": "sig"})
    if alg:
        d["alg"] = alg
    return d


def token(private: Any, kid: str, alg: str = "RS256", **over: Any) -> str:
    now = int(time.time())
    claims = {"sub": "u-1", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex}
    claims.update(over)
    return jwt.encode(claims, private, algorithm=alg, headers={"kid": kid})


class Idp:
    """A JWKS endpoint whose document and Cache-Control the test changes; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.cache_control: str | None = None
        self.fetches = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handler(self, request: web.Request) -> web.Response:
        self.fetches += 1
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return web.json_response({"keys": self.keys}, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/jwks"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def idp():
    server = Idp()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy_auth():
    """Builds the auth addon in a real AddonManager; closes the shared HTTP session after."""
    made: list[AddonManager] = []

    async def make(url: str, **jwt_options: Any) -> tuple[AddonManager, Metrics]:
        metrics = Metrics()
        section = {"jwt": {"issuer": ISS, "audience": AUD, "jwks_url": url, **jwt_options}}
        mgr = AddonManager(Config(addons={"auth": section}), metrics)
        await mgr.add(Auth())
        made.append(mgr)
        return mgr, metrics

    yield make
    for mgr in made:
        await mgr.done()


async def login(mgr: AddonManager, tok: str) -> Flow:
    flow = Flow(Request("POST", "/jmap", CIMultiDict({"Authorization": f"Bearer {tok}"})), id="r1")
    await mgr.run("requestheaders", flow)
    return flow


async def refused(mgr: AddonManager, tok: str) -> None:
    with pytest.raises(Unauthorized) as e:
        await login(mgr, tok)
    assert e.value.status == 401


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_rotated_key_accepted_without_restart(idp, proxy_auth):
    idp.keys = [jwk(K1, "k1")]
    mgr, metrics = await proxy_auth(idp.url, jwks_refetch_interval=0.2)
    assert (await login(mgr, token(K1, "k1"))).identity.subject == "u-1"
    assert idp.fetches == 1
    idp.keys = [jwk(K2, "k2")]  # the provider rotates: k1 retired, k2 new
    await asyncio.sleep(0.25)
    assert (await login(mgr, token(K2, "k2"))).identity.subject == "u-1"
    assert idp.fetches == 2
    await refused(mgr, token(K1, "k1"))  # the retired key no longer verifies new tokens
    assert sample(metrics, "sge_proxy_auth_failures_total", reason="unknown_kid") == 1
    assert sample(metrics, "sge_proxy_jwks_fetches_total", result="ok") == 2


async def test_unknown_kid_refetch_is_rate_limited(idp, proxy_auth):
    idp.keys = [jwk(K1, "k1")]
    mgr, metrics = await proxy_auth(idp.url, jwks_refetch_interval=0.5)
    await login(mgr, token(K1, "k1"))
    assert idp.fetches == 1
    for i in range(5):  # within the interval of the first fetch: no refetch at all
        await refused(mgr, token(K1, f"unknown-{i}"))
    assert idp.fetches == 1
    await asyncio.sleep(0.55)
    results = await asyncio.gather(*(login(mgr, token(K1, f"burst-{i}")) for i in range(10)),
                                   return_exceptions=True)
    assert all(isinstance(r, Unauthorized) for r in results)
    assert idp.fetches == 2  # ten concurrent unknown kids: one refetch
    await refused(mgr, token(K1, "again"))
    assert idp.fetches == 2
    assert sample(metrics, "sge_proxy_auth_failures_total", reason="unknown_kid") == 16


async def test_cached_keys_keep_working_when_the_provider_is_down(idp, proxy_auth):
    idp.keys = [jwk(K1, "k1")]
    idp.cache_control = "max-age=1"
    mgr, metrics = await proxy_auth(idp.url, jwks_refetch_interval=0.2, jwks_timeout=1)
    await login(mgr, token(K1, "k1"))
    await idp.stop()
    await asyncio.sleep(1.1)  # the JWKS is now stale and its server gone
    flow = await login(mgr, token(K1, "k1"))  # a new token (new jti): not served from the token cache
    assert flow.identity.subject == "u-1"
    assert sample(metrics, "sge_proxy_jwks_fetches_total", result="error") == 1
    await refused(mgr, token(K1, "k9"))  # unknown kid while down: refused, not a crash
    assert sample(metrics, "sge_proxy_auth_failures_total", reason="unknown_kid") == 1
    assert (await login(mgr, token(K1, "k1"))).identity.subject == "u-1"
    assert sample(metrics, "sge_proxy_jwks_fetches_total", result="error") == 1  # backed off


async def test_cache_control_max_age_honoured(idp, proxy_auth):
    idp.keys = [jwk(K1, "k1")]
    idp.cache_control = "public, max-age=1"
    mgr, _ = await proxy_auth(idp.url, jwks_refetch_interval=0.1, jwks_ttl="10m")
    await login(mgr, token(K1, "k1"))
    await login(mgr, token(K1, "k1"))
    assert idp.fetches == 1
    await asyncio.sleep(1.1)
    await login(mgr, token(K1, "k1"))
    assert idp.fetches == 2
    idp.cache_control = None  # no header: the configured jwks_ttl (10 min) applies
    await asyncio.sleep(1.1)
    await login(mgr, token(K1, "k1"))
    assert idp.fetches == 3
    await asyncio.sleep(1.1)
    await login(mgr, token(K1, "k1"))
    assert idp.fetches == 3


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_jwks_key_rules(idp, proxy_auth):
    idp.keys = [jwk(K1, "rs", alg="RS256"), jwk(KEC, "ec", alg=None), jwk(WEAK, "weak"),
                {"kty": "oct", "kid": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
                {**jwk(K2, "enc"), "use": "enc"}]
    mgr, metrics = await proxy_auth(idp.url, jwks_refetch_interval=10)
    assert (await login(mgr, token(KEC, "ec", alg="ES256"))).identity.subject == "u-1"
    await refused(mgr, token(K1, "rs", alg="PS256"))  # the JWK names RS256 only
    assert sample(metrics, "sge_proxy_auth_failures_total", reason="alg_not_allowed") == 1
    for kid, key in (("weak", WEAK), ("enc", K2)):
        await refused(mgr, token(key, kid))
    forged = jwt.encode({"sub": "root", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 60},
                        b"secretsecretsecretsecretsecretsecret", algorithm="HS256", headers={"kid": "oct"})
    await refused(mgr, forged)  # a symmetric key in a public JWKS is never used
    assert sample(metrics, "sge_proxy_auth_failures_total", reason="unknown_kid") == 3
    assert idp.fetches == 1


async def test_prefetch_when_running(idp, proxy_auth):
    idp.keys = [jwk(K1, "k1")]
    mgr, _ = await proxy_auth(idp.url)
    assert idp.fetches == 0  # nothing fetched while loading
    await mgr.running()
    for _ in range(100):
        if idp.fetches:
            break
        await asyncio.sleep(0.01)
    assert idp.fetches == 1
    await login(mgr, token(K1, "k1"))
    assert idp.fetches == 1


async def test_provider_never_reached(proxy_auth):
    idp = Idp()
    await idp.start()
    url = idp.url
    await idp.stop()  # the port is closed now
    mgr, metrics = await proxy_auth(url, jwks_timeout=1)
    await refused(mgr, token(K1, "k1"))
    assert sample(metrics, "sge_proxy_auth_failures_total", reason="jwks_unavailable") == 1
