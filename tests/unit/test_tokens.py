"""proxy.tokens and addons.auth: claims mapping, the JWT attack table, every algorithm, API keys.

The attack table runs the real Auth addon through a real AddonManager with static keys (no I/O)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import time
from pathlib import Path

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from multidict import CIMultiDict

from addons.auth import CHALLENGE, Auth, credential, hash_api_key_main
from proxy.addonmanager import AddonManager
from proxy.config import Config
from proxy.errors import ConfigError, Unauthorized, to_response
from proxy.flow import Flow, Request
from proxy.identity import Identity
from proxy.jwks import cache_ttl
from proxy.metrics import Metrics
from proxy.tokens import (AuthFailure, ClaimRules, JwtPolicy, TokenCache, TokenHeader, check_claims,
                          hash_api_key, identity_from_claims, parse_header)

NOW = 1_700_000_000.0
ISS = "https://idp.example.test/realms/mail"
AUD = "sge-mail-proxy"
HS_SECRET = "s" * 64


def _pem(private) -> str:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()


RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC256 = ec.generate_private_key(ec.SECP256R1())
EC384 = ec.generate_private_key(ec.SECP384R1())
EC521 = ec.generate_private_key(ec.SECP521R1())
ED = ed25519.Ed25519PrivateKey.generate()

# alg -> (signing key, key options entry)
SIGNERS = {
    "HS256": (HS_SECRET, {"kid": "HS256", "alg": "HS256", "secret": HS_SECRET}),
    "HS384": (HS_SECRET, {"kid": "HS384", "alg": "HS384", "secret": HS_SECRET}),
    "HS512": (HS_SECRET, {"kid": "HS512", "alg": "HS512", "secret": HS_SECRET}),
    **{a: (RSA, {"kid": a, "alg": a, "public_key": _pem(RSA)})
       for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": (EC256, {"kid": "ES256", "alg": "ES256", "public_key": _pem(EC256)}),
    "ES384": (EC384, {"kid": "ES384", "alg": "ES384", "public_key": _pem(EC384)}),
    "ES512": (EC521, {"kid": "ES512", "alg": "ES512", "public_key": _pem(EC521)}),
    "EdDSA": (ED, {"kid": "EdDSA", "alg": "EdDSA", "public_key": _pem(ED)}),
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over) -> dict:
    now = time.time()
    c = {"sub": "u-1", "email": "alice@example.test", "iss": ISS, "aud": AUD, "iat": int(now),
         "exp": int(now) + 600, "roles": ["user", "tenant:acme"], "sid": "s-1"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def sign(alg: str = "RS256", kid: str | None = "RS256", key=None, **over) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**over), key if key is not None else SIGNERS[alg][0], algorithm=alg, headers=headers)


def raw_token(header: dict, payload: dict, secret: bytes | None = None, signature: bytes = b"") -> str:
    """A hand-built compact JWS, for tokens PyJWT refuses to make (alg none, HS with a PEM key)."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# ----------------------------------------------------------------------------- claims -> Identity
RULES = ClaimRules()

CLAIMS_TABLE = [
    ("minimal", {"sub": "u1", "exp": 5}, RULES, Identity(subject="u1", expires_at=5.0)),
    ("email claim", {"sub": "u1", "exp": 5, "email": "a@x.test"}, RULES,
     Identity(subject="u1", email="a@x.test", expires_at=5.0)),
    ("preferred_username with @", {"sub": "u1", "exp": 5, "preferred_username": "a@x.test"}, RULES,
     Identity(subject="u1", email="a@x.test", expires_at=5.0)),
    ("preferred_username without @ ignored", {"sub": "u1", "exp": 5, "preferred_username": "alice"}, RULES,
     Identity(subject="u1", expires_at=5.0)),
    ("configured email claim", {"sub": "u1", "exp": 5, "mail": "m@x.test", "email": "e@x.test"},
     ClaimRules(email_claim="mail"), Identity(subject="u1", email="m@x.test", expires_at=5.0)),
    ("tenant role", {"sub": "u1", "exp": 5, "roles": ["user", "tenant:acme"]}, RULES,
     Identity(subject="u1", tenant="acme", roles=frozenset({"user", "tenant:acme"}), expires_at=5.0)),
    ("realm_access roles", {"sub": "u1", "exp": 5, "realm_access": {"roles": ["tenant:globex"]}}, RULES,
     Identity(subject="u1", tenant="globex", roles=frozenset({"tenant:globex"}), expires_at=5.0)),
    ("configured roles claim", {"sub": "u1", "exp": 5, "groups": ["tenant:acme"], "roles": ["tenant:x"]},
     ClaimRules(roles_claim="groups"),
     Identity(subject="u1", tenant="acme", roles=frozenset({"tenant:acme"}), expires_at=5.0)),
    ("tenant claim", {"sub": "u1", "exp": 5, "org": "acme"}, ClaimRules(tenant_claim="org"),
     Identity(subject="u1", tenant="acme", expires_at=5.0)),
    ("tenant claim agrees with role", {"sub": "u1", "exp": 5, "org": "acme", "roles": ["tenant:acme"]},
     ClaimRules(tenant_claim="org"),
     Identity(subject="u1", tenant="acme", roles=frozenset({"tenant:acme"}), expires_at=5.0)),
    ("region", {"sub": "u1", "exp": 5, "region": "eu-west-1"}, RULES,
     Identity(subject="u1", region="eu-west-1", expires_at=5.0)),
    ("configured region claim", {"sub": "u1", "exp": 5, "geo": "us-east-1", "region": "eu"},
     ClaimRules(region_claim="geo"), Identity(subject="u1", region="us-east-1", expires_at=5.0)),
    ("sid wins over jti", {"sub": "u1", "exp": 5, "sid": "s", "jti": "j"}, RULES,
     Identity(subject="u1", session_id="s", expires_at=5.0)),
    ("jti when no sid", {"sub": "u1", "exp": 5, "jti": "j"}, RULES,
     Identity(subject="u1", session_id="j", expires_at=5.0)),
    ("scope string", {"sub": "u1", "exp": 5, "scope": "mail:read  mail:send"}, RULES,
     Identity(subject="u1", scopes=frozenset({"mail:read", "mail:send"}), expires_at=5.0)),
    ("scp list", {"sub": "u1", "exp": 5, "scp": ["mail:read"]}, RULES,
     Identity(subject="u1", scopes=frozenset({"mail:read"}), expires_at=5.0)),
]


@pytest.mark.parametrize("name,payload,rules,expected", CLAIMS_TABLE, ids=[c[0] for c in CLAIMS_TABLE])
def test_claims_to_identity(name, payload, rules, expected):
    assert identity_from_claims(payload, rules) == expected


CLAIMS_REFUSED = [
    ("no sub", {"exp": 5}, RULES),
    ("sub not a string", {"sub": 7, "exp": 5}, RULES),
    ("sub with a space", {"sub": "a b", "exp": 5}, RULES),
    ("two tenant roles", {"sub": "u1", "roles": ["tenant:a", "tenant:b"]}, RULES),
    ("tenant role and realm role differ", {"sub": "u1", "roles": ["tenant:a"],
                                           "realm_access": {"roles": ["tenant:b"]}}, RULES),
    ("tenant role and claim differ", {"sub": "u1", "roles": ["tenant:a"], "org": "b"}, ClaimRules(tenant_claim="org")),
    ("empty tenant", {"sub": "u1", "roles": ["tenant:"]}, RULES),
    ("tenant with a path", {"sub": "u1", "roles": ["tenant:../admin"]}, RULES),
    ("region with a slash", {"sub": "u1", "region": "eu/../x"}, RULES),
    ("roles not a list of strings", {"sub": "u1", "roles": [1, 2]}, RULES),
    ("email with a newline", {"sub": "u1", "email": "a@x\r\nX-SGE-User-ID: root"}, RULES),
    ("tenant claim not a string", {"sub": "u1", "org": ["a"]}, ClaimRules(tenant_claim="org")),
]


@pytest.mark.parametrize("name,payload,rules", CLAIMS_REFUSED, ids=[c[0] for c in CLAIMS_REFUSED])
def test_claims_refused(name, payload, rules):
    with pytest.raises(AuthFailure) as e:
        identity_from_claims(payload, rules)
    assert e.value.reason == "bad_claims"


POLICY = JwtPolicy(frozenset({ISS}), frozenset({AUD}), 60.0)
TIME_TABLE = [
    ("valid", {"exp": NOW + 10, "iss": ISS, "aud": AUD}, None),
    ("aud in a list", {"exp": NOW + 10, "iss": ISS, "aud": ["other", AUD]}, None),
    ("expired within leeway", {"exp": NOW - 59, "iss": ISS, "aud": AUD}, None),
    ("expired beyond leeway", {"exp": NOW - 61, "iss": ISS, "aud": AUD}, "expired"),
    ("no exp", {"iss": ISS, "aud": AUD}, "bad_claims"),
    ("exp a string", {"exp": str(NOW + 10), "iss": ISS, "aud": AUD}, "bad_claims"),
    ("exp a bool", {"exp": True, "iss": ISS, "aud": AUD}, "bad_claims"),
    ("nbf within leeway", {"exp": NOW + 10, "nbf": NOW + 59, "iss": ISS, "aud": AUD}, None),
    ("nbf in the future", {"exp": NOW + 900, "nbf": NOW + 61, "iss": ISS, "aud": AUD}, "not_yet_valid"),
    ("iat in the future", {"exp": NOW + 900, "iat": NOW + 61, "iss": ISS, "aud": AUD}, "not_yet_valid"),
    ("wrong iss", {"exp": NOW + 10, "iss": ISS + "x", "aud": AUD}, "bad_issuer"),
    ("no iss", {"exp": NOW + 10, "aud": AUD}, "bad_issuer"),
    ("wrong aud", {"exp": NOW + 10, "iss": ISS, "aud": "other"}, "bad_audience"),
    ("no aud", {"exp": NOW + 10, "iss": ISS}, "bad_audience"),
]


@pytest.mark.parametrize("name,payload,reason", TIME_TABLE, ids=[c[0] for c in TIME_TABLE])
def test_check_claims(name, payload, reason):
    if reason is None:
        check_claims(payload, POLICY, NOW)
    else:
        with pytest.raises(AuthFailure) as e:
            check_claims(payload, POLICY, NOW)
        assert e.value.reason == reason


HEADER_TABLE = [
    ("rs256 with kid", b64(b'{"alg":"RS256","kid":"k1"}') + ".e30.c2ln", TokenHeader("RS256", "k1")),
    ("no kid", b64(b'{"alg":"ES256"}') + ".e30.c2ln", TokenHeader("ES256", None)),
    ("alg none", b64(b'{"alg":"none"}') + ".e30.", "alg_not_allowed"),
    ("alg NONE", b64(b'{"alg":"NONE"}') + ".e30.", "alg_not_allowed"),
    ("no alg", b64(b'{"kid":"k1"}') + ".e30.c2ln", "alg_not_allowed"),
    ("ES256K not supported", b64(b'{"alg":"ES256K"}') + ".e30.c2ln", "alg_not_allowed"),
    ("kid a number", b64(b'{"alg":"RS256","kid":5}') + ".e30.c2ln", "malformed"),
    ("crit extension", b64(b'{"alg":"RS256","crit":["exp"],"exp":1}') + ".e30.c2ln", "malformed"),
    ("b64 false", b64(b'{"alg":"HS256","b64":false,"crit":["b64"]}') + "..c2ln", "malformed"),
    ("JWE (five parts)", b64(b'{"alg":"RSA-OAEP","enc":"A256GCM"}') + ".a.b.c.d", "malformed"),
    ("header not JSON", "Zm9v.YmFy.YmF6", "malformed"),
    ("header a list", b64(b"[1]") + ".e30.c2ln", "malformed"),
    ("oversized", "a" * 9000, "oversized"),
]


@pytest.mark.parametrize("name,token,expected", HEADER_TABLE, ids=[c[0] for c in HEADER_TABLE])
def test_parse_header(name, token, expected):
    if isinstance(expected, TokenHeader):
        assert parse_header(token, 8192) == expected
    else:
        with pytest.raises(AuthFailure) as e:
            parse_header(token, 8192)
        assert e.value.reason == expected


CREDENTIAL_TABLE = [
    ("nothing", [], None),
    ("basic is not ours", [("Authorization", "Basic YTpi")], None),
    ("bearer jwt", [("Authorization", "Bearer a.b.c")], ("jwt", "a.b.c")),
    ("scheme is case-insensitive", [("authorization", "bearer a.b.c")], ("jwt", "a.b.c")),
    ("bearer api key", [("Authorization", "Bearer sgek_abc")], ("api_key", "sgek_abc")),
    ("x-api-key", [("X-API-Key", "anything")], ("api_key", "anything")),
    ("x-api-key beside basic", [("X-API-Key", "k"), ("Authorization", "Basic YTpi")], ("api_key", "k")),
    ("bearer without token", [("Authorization", "Bearer")], "malformed"),
    ("bearer with spaces inside", [("Authorization", "Bearer a b")], "malformed"),
    ("two authorization headers", [("Authorization", "Bearer a"), ("Authorization", "Bearer b")], "malformed"),
    ("bearer and api key", [("Authorization", "Bearer a.b.c"), ("X-API-Key", "k")], "malformed"),
    ("empty api key", [("X-API-Key", " ")], "malformed"),
    ("oversized bearer", [("Authorization", "Bearer " + "a" * 9000)], "oversized"),
    ("oversized api key", [("X-API-Key", "a" * 9000)], "oversized"),
]


@pytest.mark.parametrize("name,headers,expected", CREDENTIAL_TABLE, ids=[c[0] for c in CREDENTIAL_TABLE])
def test_credential(name, headers, expected):
    h = CIMultiDict(headers)
    if isinstance(expected, str):
        with pytest.raises(AuthFailure) as e:
            credential(h, "X-API-Key", "sgek_", 8192)
        assert e.value.reason == expected
    else:
        assert credential(h, "X-API-Key", "sgek_", 8192) == expected


def test_token_cache_rechecks_exp_and_is_bounded():
    cache = TokenCache(2)
    a = Identity(subject="a", expires_at=NOW + 10)
    cache.put("ta", a)
    assert cache.get("ta", NOW, 60) is a
    assert cache.get("ta", NOW + 69, 60) is a
    assert cache.get("ta", NOW + 71, 60) is None  # expired beyond leeway: evicted
    assert len(cache) == 0
    for t in ("t1", "t2", "t3"):
        cache.put(t, Identity(subject=t, expires_at=NOW + 10))
    assert len(cache) == 2 and cache.get("t1", NOW, 60) is None


CACHE_TTL_TABLE = [
    (None, 600.0),
    ("public, max-age=120", 120.0),
    ("max-age=\"90\", must-revalidate", 90.0),
    ("max-age=1", 30.0),        # never below the refetch interval
    ("no-store", 30.0),
    ("max-age=9999999", 86400.0),
    ("s-maxage=5", 600.0),
]


@pytest.mark.parametrize("header,ttl", CACHE_TTL_TABLE)
def test_cache_ttl(header, ttl):
    assert cache_ttl(header, 600.0, floor=30.0) == ttl


# ----------------------------------------------------------------------------- the addon
def jwt_section(**over) -> dict:
    keys = [entry for _, entry in SIGNERS.values()]
    keys.append({"alg": "RS256", "public_key": _pem(RSA)})  # a key without kid
    section = {"jwt": {"issuer": ISS, "audience": AUD, "keys": keys}}
    section["jwt"].update(over)
    return section


async def manager(section: dict, base_dir: Path | None = None) -> tuple[AddonManager, Metrics]:
    metrics = Metrics()
    cfg = Config(addons={"auth": section}, **({"base_dir": base_dir} if base_dir else {}))
    mgr = AddonManager(cfg, metrics)
    await mgr.add(Auth())
    return mgr, metrics


async def attempt(mgr: AddonManager, headers: list[tuple[str, str]], path: str = "/jmap") -> Flow:
    flow = Flow(Request("POST", path, CIMultiDict(headers)), id="req-1")
    await mgr.run("requestheaders", flow)
    return flow


def failures(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("sge_proxy_auth_failures_total", {"reason": reason})


def successes(metrics: Metrics, method: str) -> float:
    return metrics.registry.get_sample_value("sge_proxy_auth_success_total", {"method": method})


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


RSA_PUBLIC_PEM = _pem(RSA).encode()

ATTACKS = [
    ("no credential", lambda: [], "missing"),
    ("token without Bearer scheme", lambda: [("Authorization", sign())], "missing"),
    ("alg none", lambda: bearer(raw_token({"alg": "none", "kid": "RS256"}, claims())), "alg_not_allowed"),
    ("alg none, no kid", lambda: bearer(raw_token({"alg": "none"}, claims())), "alg_not_allowed"),
    ("HS256 signed with the RSA public key PEM, RSA kid",
     lambda: bearer(raw_token({"alg": "HS256", "kid": "RS256"}, claims(), secret=RSA_PUBLIC_PEM)), "alg_not_allowed"),
    ("HS256 signed with the RSA public key PEM, no kid",
     lambda: bearer(raw_token({"alg": "HS256"}, claims(), secret=RSA_PUBLIC_PEM)), "alg_not_allowed"),
    ("RS512 on a key allowed RS256 only", lambda: bearer(sign("RS512", kid="RS256")), "alg_not_allowed"),
    ("expired", lambda: bearer(sign(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)), "expired"),
    ("not yet valid", lambda: bearer(sign(nbf=int(time.time()) + 3600)), "not_yet_valid"),
    ("iat in the future", lambda: bearer(sign(iat=int(time.time()) + 3600)), "not_yet_valid"),
    ("wrong aud", lambda: bearer(sign(aud="another-service")), "bad_audience"),
    ("wrong iss", lambda: bearer(sign(iss="https://evil.test")), "bad_issuer"),
    ("unknown kid", lambda: bearer(sign(kid="nope")), "unknown_kid"),
    ("kid path traversal", lambda: bearer(sign(kid="../../etc/passwd")), "unknown_kid"),
    ("kid SQL injection", lambda: bearer(sign(kid="' OR 1=1 --")), "unknown_kid"),
    ("oversized token", lambda: bearer(sign(pad="x" * 9000)), "oversized"),
    ("garbage base64", lambda: bearer("Zm9v.YmFy.YmF6"), "malformed"),
    ("not three parts", lambda: bearer("abc"), "malformed"),
    ("wrong HMAC signature", lambda: bearer(sign("HS256", kid="HS256", key="t" * 64)), "bad_signature"),
    ("signed by another RSA key", lambda: bearer(sign("RS256", key=RSA_OTHER)), "bad_signature"),
    ("signed by another RSA key, no kid", lambda: bearer(sign("RS256", kid=None, key=RSA_OTHER)), "bad_signature"),
    ("payload swapped", lambda: bearer(sign().rsplit(".", 2)[0] + "." + sign(sub="root").split(".")[1] + "."
                                       + sign().rsplit(".", 1)[1]), "bad_signature"),
    ("signature stripped", lambda: bearer(sign().rsplit(".", 1)[0] + "."), "bad_signature"),
    ("no exp", lambda: bearer(sign(exp=None)), "bad_claims"),
    ("two tenants", lambda: bearer(sign(roles=["tenant:a", "tenant:b"])), "bad_claims"),
    ("payload not an object", lambda: bearer(raw_token({"alg": "HS256", "kid": "HS256"}, [1],  # type: ignore
                                                       secret=HS_SECRET.encode())), "malformed"),
    ("unknown API key", lambda: [("X-API-Key", "sgek_wrong")], "bad_api_key"),
    ("unknown API key as bearer", lambda: bearer("sgek_wrong"), "bad_api_key"),
]


@pytest.mark.parametrize("name,make,reason", ATTACKS, ids=[a[0] for a in ATTACKS])
async def test_attack_refused(name, make, reason):
    section = jwt_section()
    section["api_keys"] = {"keys": [{"sha256": hash_api_key("sgek_right"), "subject": "svc"}]}
    mgr, metrics = await manager(section)
    before = {r: failures(metrics, r) for r in ("missing", reason)}
    with pytest.raises(Unauthorized) as e:
        await attempt(mgr, make())
    assert e.value.status == 401
    assert failures(metrics, reason) == before[reason] + 1
    status, headers, body = to_response(e.value, "req-1")
    assert status == 401
    challenge = dict(headers)["WWW-Authenticate"]
    assert challenge == (CHALLENGE if reason == "missing" else CHALLENGE + ', error="invalid_token"')
    assert reason.encode() not in body and b"signature" not in body and b"expired" not in body
    assert successes(metrics, "jwt") == 0


@pytest.mark.parametrize("alg", sorted(SIGNERS))
async def test_every_algorithm_accepted(alg):
    mgr, metrics = await manager(jwt_section())
    exp = int(time.time()) + 600
    token = sign(alg, kid=alg, exp=exp)
    flow = await attempt(mgr, bearer(token))
    assert flow.identity == Identity(subject="u-1", email="alice@example.test", tenant="acme",
                                     roles=frozenset({"user", "tenant:acme"}), session_id="s-1",
                                     method="jwt", expires_at=float(exp))
    assert flow.client_token == token
    assert flow.request.headers["Authorization"] == f"Bearer {token}"  # left for the upstream addon
    assert successes(metrics, "jwt") == 1


async def test_token_without_kid_uses_keys_without_kid():
    mgr, _ = await manager(jwt_section())
    flow = await attempt(mgr, bearer(sign("RS256", kid=None)))
    assert flow.identity.subject == "u-1"


async def test_verified_token_is_cached_until_it_expires():
    mgr, metrics = await manager(jwt_section(leeway=0))
    token = sign("HS256", kid="HS256", exp=time.time() + 1.0)
    for _ in range(3):
        assert (await attempt(mgr, bearer(token))).identity.subject == "u-1"
    assert successes(metrics, "jwt") == 3
    auth = mgr.get("auth")
    assert len(auth._cache) == 1
    await asyncio.sleep(1.1)
    with pytest.raises(Unauthorized):
        await attempt(mgr, bearer(token))
    assert failures(metrics, "expired") == 1


async def test_not_required_and_public_paths():
    mgr, metrics = await manager({**jwt_section(), "required": False})
    flow = await attempt(mgr, [])
    assert flow.identity is None and flow.response is None
    with pytest.raises(Unauthorized):  # a bad credential is refused even where none is required
        await attempt(mgr, bearer(sign(aud="x")))
    mgr, metrics = await manager({**jwt_section(), "public_paths": ["/.well-known/jmap"]})
    assert (await attempt(mgr, [], path="/.well-known/jmap")).identity is None
    for path in ("/.well-known/jmap/x", "/jmap", "/.well-known/jmap%2F"):
        with pytest.raises(Unauthorized):
            await attempt(mgr, [], path=path)
    assert failures(metrics, "missing") == 3


# ----------------------------------------------------------------------------- API keys
API_KEYS_FILE = """\
keys:
  - sha256: {h1}
    subject: svc-reports
    email: reports@example.test
    tenant: acme
    roles: [reader]
    region: eu-west-1
    scopes: [mail:read]
  - sha256: {h2}
    subject: svc-ops
"""

API_TABLE = [
    ("file key in X-API-Key", [("X-API-Key", "sgek_file_one")],
     Identity(subject="svc-reports", email="reports@example.test", tenant="acme", roles=frozenset({"reader"}),
              region="eu-west-1", scopes=frozenset({"mail:read"}), method="api_key")),
    ("file key as bearer", [("Authorization", "Bearer sgek_file_one")],
     Identity(subject="svc-reports", email="reports@example.test", tenant="acme", roles=frozenset({"reader"}),
              region="eu-west-1", scopes=frozenset({"mail:read"}), method="api_key")),
    ("second file key", [("X-API-Key", "sgek_file_two")], Identity(subject="svc-ops", method="api_key")),
    ("inline key, tenant from a role", [("x-api-key", "inline-key")],
     Identity(subject="svc-inline", tenant="globex", roles=frozenset({"tenant:globex"}), method="api_key")),
    ("wrong key", [("X-API-Key", "sgek_file_onE")], "bad_api_key"),
    ("prefix alone", [("Authorization", "Bearer sgek_")], "bad_api_key"),
    ("hash given as the key", [("X-API-Key", hash_api_key("sgek_file_one"))], "bad_api_key"),
]


@pytest.mark.parametrize("name,headers,expected", API_TABLE, ids=[c[0] for c in API_TABLE])
async def test_api_keys(name, headers, expected, tmp_path):
    (tmp_path / "keys.yaml").write_text(API_KEYS_FILE.format(h1=hash_api_key("sgek_file_one"),
                                                             h2=hash_api_key("sgek_file_two").upper()))
    section = {"api_keys": {"file": "keys.yaml", "keys": [
        {"sha256": hash_api_key("inline-key"), "subject": "svc-inline", "roles": ["tenant:globex"]}]}}
    mgr, metrics = await manager(section, base_dir=tmp_path)
    flow = Flow(Request("GET", "/jmap/session", CIMultiDict(headers)), id="req-2")
    if isinstance(expected, str):
        with pytest.raises(Unauthorized) as e:
            await mgr.run("requestheaders", flow)
        assert e.value.status == 401
        assert failures(metrics, expected) == 1
    else:
        await mgr.run("requestheaders", flow)
        assert flow.identity == expected
        assert flow.client_token is None  # an API key is never forwarded as a bearer token
        assert successes(metrics, "api_key") == 1
    assert "X-API-Key" not in flow.request.headers


async def test_api_key_header_stripped_and_custom_prefix(tmp_path):
    section = {"api_keys": {"header": "X-Service-Key", "bearer_prefix": "svc_",
                            "keys": [{"sha256": hash_api_key("svc_123"), "subject": "svc"}]}}
    mgr, _ = await manager(section)
    flow = await attempt(mgr, [("X-Service-Key", "svc_123"), ("X-API-Key", "passes-through")])
    assert flow.identity.subject == "svc" and "X-Service-Key" not in flow.request.headers
    assert (await attempt(mgr, bearer("svc_123"))).identity.subject == "svc"


@pytest.mark.parametrize("text,key", [
    ("keys: {a: 1}", "keys"),
    ("- sha256: xyz\n  subject: s\n", "keys[0].sha256"),
    ("- sha256: " + "a" * 64 + "\n", "keys[0]"),
    ("keys: [", "addons.auth.api_keys.file"),
])
async def test_bad_api_key_file(tmp_path, text, key):
    (tmp_path / "keys.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        await manager({"api_keys": {"file": "keys.yaml"}}, base_dir=tmp_path)
    assert e.value.key == key and e.value.source in (None, str(tmp_path / "keys.yaml")), str(e.value)


def test_hash_api_key_main(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("sgek_abc\n"))
    assert hash_api_key_main([]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"sgek_abc").hexdigest()
    monkeypatch.setattr("sys.stdin", io.StringIO(" padded \n"))
    assert hash_api_key_main([]) == 2
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- configuration errors
RSA_PEM = _pem(RSA)
CONFIG_ERRORS = [
    ("nothing configured", {}, "addons.auth.required"),
    ("no audience", {"jwt": {"issuer": ISS, "keys": [{"alg": "HS256", "secret": HS_SECRET}]}}, "addons.auth.jwt.audience"),
    ("no issuer", {"jwt": {"audience": AUD, "jwks_url": "https://idp.test/jwks"}}, "addons.auth.jwt.issuer"),
    ("public key PEM as HMAC secret", {"jwt": {"issuer": ISS, "audience": AUD,
                                               "keys": [{"alg": "HS256", "secret": RSA_PEM}]}},
     "addons.auth.jwt.keys[0].secret"),
    ("short HMAC secret", {"jwt": {"issuer": ISS, "audience": AUD, "keys": [{"alg": "HS512", "secret": "x" * 32}]}},
     "addons.auth.jwt.keys[0].secret"),
    ("HS alg on a public key", {"jwt": {"issuer": ISS, "audience": AUD,
                                        "keys": [{"algs": ["RS256", "HS256"], "public_key": RSA_PEM}]}},
     "addons.auth.jwt.keys[0].algs"),
    ("ES256 on an RSA key", {"jwt": {"issuer": ISS, "audience": AUD, "keys": [{"alg": "ES256", "public_key": RSA_PEM}]}},
     "addons.auth.jwt.keys[0].algs"),
    ("ES384 on a P-256 key", {"jwt": {"issuer": ISS, "audience": AUD,
                                      "keys": [{"alg": "ES384", "public_key": _pem(EC256)}]}},
     "addons.auth.jwt.keys[0].algs"),
    ("alg none", {"jwt": {"issuer": ISS, "audience": AUD, "keys": [{"alg": "none", "secret": HS_SECRET}]}},
     "addons.auth.jwt.keys[0].algs"),
    ("secret and public key", {"jwt": {"issuer": ISS, "audience": AUD,
                                       "keys": [{"alg": "RS256", "secret": HS_SECRET, "public_key": RSA_PEM}]}},
     "addons.auth.jwt.keys[0].secret"),
    ("no alg", {"jwt": {"issuer": ISS, "audience": AUD, "keys": [{"secret": HS_SECRET}]}}, "addons.auth.jwt.keys[0].alg"),
    ("private key as public key", {"jwt": {"issuer": ISS, "audience": AUD, "keys": [{"alg": "RS256", "public_key":
        RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()).decode()}]}}, "addons.auth.jwt.keys[0].public_key"),
    ("duplicate kid", {"jwt": {"issuer": ISS, "audience": AUD, "keys": [
        {"kid": "a", "alg": "HS256", "secret": HS_SECRET}, {"kid": "a", "alg": "HS256", "secret": HS_SECRET}]}},
     "addons.auth.jwt.keys"),
    ("missing secret file", {"jwt": {"issuer": ISS, "audience": AUD,
                                     "keys": [{"alg": "HS256", "secret_file": "/nonexistent/secret"}]}},
     "addons.auth.jwt.keys[0].secret_file"),
    ("plain http JWKS", {"jwt": {"issuer": ISS, "audience": AUD, "jwks_url": "http://idp.test/jwks"}},
     "addons.auth.jwt.jwks_url"),
    ("HS in jwks_algorithms", {"jwt": {"issuer": ISS, "audience": AUD, "jwks_url": "https://idp.test/jwks",
                                       "jwks_algorithms": ["HS256"]}}, "addons.auth.jwt.jwks_algorithms"),
    ("bad API key hash", {"api_keys": {"keys": [{"sha256": "abc", "subject": "s"}]}}, "addons.auth.api_keys.keys[0].sha256"),
    ("API key with two tenants", {"api_keys": {"keys": [{"sha256": "a" * 64, "subject": "s", "tenant": "x",
                                                         "roles": ["tenant:y"]}]}}, "addons.auth.api_keys.keys[0].tenant"),
    ("same API key twice", {"api_keys": {"keys": [{"sha256": "a" * 64, "subject": "s"},
                                                  {"sha256": "A" * 64, "subject": "t"}]}}, "addons.auth.api_keys"),
    ("unknown option", {"jwt": {"issuer": ISS, "audience": AUD, "jwks": "x"}}, "addons.auth.jwt.jwks"),
    ("relative public path", {"required": False, "public_paths": ["jmap"]}, "addons.auth.public_paths"),
]


@pytest.mark.parametrize("name,section,key", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
async def test_config_errors(name, section, key):
    with pytest.raises(ConfigError) as e:
        await manager(section)
    assert e.value.key == key, str(e.value)


async def test_keys_from_files(tmp_path):
    (tmp_path / "hs.secret").write_text(HS_SECRET + "\n")
    (tmp_path / "rsa.pem").write_text(_pem(RSA))
    mgr, _ = await manager({"jwt": {"issuer": ISS, "audience": AUD, "keys": [
        {"kid": "h", "alg": "HS256", "secret_file": "hs.secret"},
        {"kid": "r", "algs": ["RS256", "PS256"], "public_key_file": str(tmp_path / "rsa.pem")}]}}, base_dir=tmp_path)
    assert (await attempt(mgr, bearer(sign("HS256", kid="h")))).identity.subject == "u-1"
    assert (await attempt(mgr, bearer(sign("PS256", kid="r")))).identity.subject == "u-1"


# ----------------------------------------------------------------------------- from the parser's bytes
def parsed_flow(headers: list[tuple[str, str]], path: str = "/jmap/session") -> Flow:
    """A request as the engine builds it: headers still the parser's bytes, no Connection header."""
    req = Request("GET", path, raw=[(n.lower().encode(), n.encode(), v.encode("latin-1")) for n, v in headers],
                  peer="127.0.0.1")
    req.raw_connection = False
    return Flow(req, id="req-raw")


RAW_TABLE = API_TABLE + [
    ("repeated API key header", [("X-API-Key", "sgek_file_one"), ("x-api-key", "sgek_file_one")], "malformed"),
    ("bearer and API key", [("Authorization", "Bearer sgek_file_one"), ("X-API-Key", "inline-key")], "malformed"),
    ("no credential", [("Accept", "*/*")], "missing"),
]


@pytest.mark.parametrize("name,headers,expected", RAW_TABLE, ids=[c[0] for c in RAW_TABLE])
async def test_api_keys_from_parser_bytes(name, headers, expected, tmp_path):
    (tmp_path / "keys.yaml").write_text(API_KEYS_FILE.format(h1=hash_api_key("sgek_file_one"),
                                                             h2=hash_api_key("sgek_file_two").upper()))
    section = {"api_keys": {"file": "keys.yaml", "keys": [
        {"sha256": hash_api_key("inline-key"), "subject": "svc-inline", "roles": ["tenant:globex"]}]}}
    mgr, metrics = await manager(section, base_dir=tmp_path)
    flow = parsed_flow(headers)
    if isinstance(expected, str):
        with pytest.raises(Unauthorized):
            await mgr.run("requestheaders", flow)
        assert failures(metrics, expected) == 1
    else:
        await mgr.run("requestheaders", flow)
        assert flow.identity == expected
    assert "X-API-Key" not in flow.request.headers  # an API key never goes upstream


async def test_bearer_token_from_parser_bytes_leaves_the_headers_unbuilt():
    mgr, metrics = await manager(jwt_section())
    token = sign()
    for _ in range(2):  # verified, then from the cache
        flow = parsed_flow(bearer(token), path="/jmap")
        await mgr.run("requestheaders", flow)
        assert flow.identity is not None and flow.client_token == token
        assert not flow.request.headers_read
    assert successes(metrics, "jwt") == 2
    with pytest.raises(Unauthorized):
        await mgr.run("requestheaders", parsed_flow(bearer(token) + bearer(token), path="/jmap"))
    assert failures(metrics, "malformed") == 1


async def test_api_key_from_parser_bytes_is_removed_without_building_the_headers(tmp_path):
    section = {"api_keys": {"keys": [{"sha256": hash_api_key("inline-key"), "subject": "svc-inline"}]}}
    mgr, _ = await manager(section, base_dir=tmp_path)
    flow = parsed_flow([("X-API-Key", "inline-key"), ("Accept", "*/*")])
    await mgr.run("requestheaders", flow)
    assert flow.identity.subject == "svc-inline" and not flow.request.headers_read
    assert flow.request.header("X-API-Key") is None  # an API key never goes upstream
    assert "X-API-Key" not in flow.request.headers and flow.request.headers["Accept"] == "*/*"


async def test_a_remembered_authorization_header_gives_the_same_identity():
    mgr, metrics = await manager(jwt_section())
    token = sign()
    idents = []
    for _ in range(3):  # verified (and remembered), then twice from the memo
        flow = parsed_flow(bearer(token), path="/jmap")
        await mgr.run("requestheaders", flow)
        idents.append((flow.identity, flow.client_token))
        assert not flow.request.headers_read
    assert idents[0] == idents[1] == idents[2] and idents[0][1] == token
    assert successes(metrics, "jwt") == 3
    # the same value next to another credential is not the request's only one: refused as before
    with pytest.raises(Unauthorized):
        await mgr.run("requestheaders", parsed_flow(bearer(token) + [("X-API-Key", "k")], path="/jmap"))
    assert failures(metrics, "malformed") == 1


MEMO_ALICE = Identity(subject="alice", expires_at=1000.0)
MEMO_FOREVER = Identity(subject="svc")


@pytest.mark.parametrize("name, ident, now, leeway, found", [
    ("fresh", MEMO_ALICE, 999.0, 0.0, True),
    ("at exp", MEMO_ALICE, 1000.0, 0.0, True),
    ("past exp", MEMO_ALICE, 1000.5, 0.0, False),
    ("past exp, within leeway", MEMO_ALICE, 1050.0, 60.0, True),
    ("past exp and leeway", MEMO_ALICE, 1061.0, 60.0, False),
    ("no exp", MEMO_FOREVER, 1e12, 0.0, True),
])
def test_header_memo_rechecks_exp(name, ident, now, leeway, found):
    from proxy.tokens import HeaderMemo
    memo = HeaderMemo(4)
    memo.put(b"Bearer t", "t", ident)
    assert (memo.get(b"Bearer t", now, leeway) == ("t", ident)) == found
    assert len(memo) == (1 if found else 0)  # an expired entry is dropped


@pytest.mark.parametrize("name, size, values, kept", [
    ("bounded, oldest out", 2, [b"a", b"b", b"c"], [b"b", b"c"]),
    ("a repeat does not evict", 2, [b"a", b"b", b"a"], [b"a", b"b"]),
    ("off", 0, [b"a"], []),
    ("long values are not kept", 4, [b"x" * 4096, b"y" * 4097], [b"x" * 4096]),
])
def test_header_memo_bounds(name, size, values, kept):
    from proxy.tokens import HeaderMemo
    memo = HeaderMemo(size)
    for v in values:
        memo.put(v, "t", MEMO_FOREVER)
    assert sorted(v for v in set(values) if memo.get(v, 0.0, 0.0) is not None) == sorted(kept)
