"""A local identity provider for tests: signing keys that mint JWTs, and a real aiohttp JWKS
endpoint on 127.0.0.1 (OS-chosen port) whose published keys a test can switch at any time."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

__all__ = ["SigningKey", "JwksServer", "ISSUER", "AUDIENCE"]

ISSUER = "https://idp.example.test/realms/mail"
AUDIENCE = "sge-mail-proxy"


@dataclass
class SigningKey:
    """A private key with its kid: `jwk()` is the public half for the JWKS, `token()` a JWT."""
    kid: str
    alg: str = "ES256"  # ES256 or RS256
    private: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.private is None:
            if self.alg == "ES256":
                self.private = ec.generate_private_key(ec.SECP256R1())
            elif self.alg == "RS256":
                self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            else:
                raise ValueError(f"unsupported alg {self.alg!r}")

    def jwk(self) -> dict[str, Any]:
        algo = ECAlgorithm if self.alg.startswith("ES") else RSAAlgorithm
        d = algo.to_jwk(self.private.public_key(), as_dict=True)
        d.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return d

    def token(self, sub: str, *, email: str | None = None, ttl: int = 600, issuer: str = ISSUER,
              audience: str = AUDIENCE, **claims: Any) -> str:
        """A fresh token (new jti, so never served from the proxy's verified-token cache)."""
        now = int(time.time())
        body: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": sub, "iat": now, "nbf": now,
                                "exp": now + ttl, "jti": uuid.uuid4().hex, "roles": ["user"]}
        if email is not None:
            body["email"] = email
        body.update(claims)
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


class JwksServer:
    """Serves {"keys": [...]} at /jwks; `publish(*keys)` replaces the set; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = []
        self.fetches = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    def publish(self, *keys: SigningKey) -> None:
        self.keys = list(keys)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": [k.jwk() for k in self.keys]})

    async def start(self) -> "JwksServer":
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/jwks"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "JwksServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
