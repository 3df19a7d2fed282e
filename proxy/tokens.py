"""Client credentials, sans-IO: JWT verification against keys we already hold, claims -> Identity,
the verified-token cache, and the API key store.

Nothing here reads files or sockets: keys arrive as bytes or dicts, time arrives as `now`.
Every refusal is an `AuthFailure` whose `reason` is one of `REASONS` (a bounded metric label);
the auth addon turns it into a 401 whose body never says which check failed.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import api_jws, exceptions as jwt_errors
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import base64url_decode, is_pem_format, is_ssh_key

from .cache import TTLCache
from .errors import ConfigError
from .identity import Identity

__all__ = [
    "REASONS", "SUPPORTED_ALGORITHMS", "AuthFailure", "VerifyKey", "KeySet", "JwtPolicy", "ClaimRules",
    "TokenHeader", "hmac_key", "public_key", "key_from_jwk", "parse_jwks", "parse_header", "select_keys",
    "verify_signature", "check_claims", "identity_from_claims", "tenant_of", "TokenCache", "HeaderMemo",
    "ApiKeyRecord", "ApiKeySource", "InlineKeySource", "ApiKeyStore", "hash_api_key",
]

REASONS = ("missing", "malformed", "oversized", "bad_signature", "expired", "not_yet_valid",
           "bad_issuer", "bad_audience", "unknown_kid", "alg_not_allowed", "bad_claims",
           "bad_api_key", "jwks_unavailable")

_FAMILY = {"HS256": "oct", "HS384": "oct", "HS512": "oct",
           "RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
           "ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP"}
SUPPORTED_ALGORITHMS = frozenset(_FAMILY)
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 3.2: key >= hash size
_CURVE_ALG = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_MIN_BITS = 2048
_PUBLIC_TYPES = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                 ed448.Ed448PublicKey)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # tenant, region: used in paths later
_PRINTABLE_RE = re.compile(r"^[^\x00-\x20\x7f]{1,320}$")     # subject, email: no space or control


class AuthFailure(Exception):
    """A refused credential. `reason` is one of REASONS; str() is for logs, never for clients."""

    def __init__(self, reason: str, note: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {note}" if note else reason)
        self.reason = reason


# --------------------------------------------------------------------------------------- keys
@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A key and the algorithms it may verify (all of one family: an HMAC secret never meets RS*)."""
    kid: str | None
    algorithms: frozenset[str]
    key: Any  # bytes for HS*, a cryptography public key otherwise
    family: str  # "oct" | "RSA" | "EC" | "OKP"


def _check_algs(algs: Iterable[str], family: str, what: str) -> frozenset[str]:
    algs = frozenset(algs)
    if not algs:
        raise ConfigError("algs", "give at least one algorithm")
    for a in sorted(algs):
        if a not in SUPPORTED_ALGORITHMS:
            raise ConfigError("algs", f"unsupported algorithm {a!r} (supported: "
                              f"{', '.join(sorted(SUPPORTED_ALGORITHMS))})")
        if _FAMILY[a] != family:
            raise ConfigError("algs", f"{a} cannot be used with {what}")
    return algs


def hmac_key(secret: bytes, algs: Iterable[str], kid: str | None = None) -> VerifyKey:
    """An HMAC key. A PEM or SSH public key is refused: it must never double as a shared secret."""
    algs = _check_algs(algs, "oct", "a shared secret (only HS256/HS384/HS512)")
    if is_pem_format(secret) or is_ssh_key(secret) or b"-----BEGIN" in secret:
        raise ConfigError("secret", "looks like a PEM/SSH key; a public key is not a shared secret")
    strongest = max(algs, key=_HMAC_MIN_BYTES.__getitem__)
    need = _HMAC_MIN_BYTES[strongest]
    if len(secret) < need:
        raise ConfigError("secret", f"too short: {strongest} needs at least {need} bytes (RFC 7518 3.2)")
    return VerifyKey(kid, algs, bytes(secret), "oct")


def _family_of_key(key: Any) -> tuple[str, frozenset[str] | None]:
    """(family, the algorithms this exact key can serve, None = any of its family)."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _RSA_MIN_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; at least {_RSA_MIN_BITS} required")
        return "RSA", None
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _CURVE_ALG.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported curve {key.curve.name}")
        return "EC", frozenset({alg})
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "OKP", None
    raise ValueError(f"unsupported key type {type(key).__name__}")


def public_key(pem: bytes, algs: Iterable[str], kid: str | None = None) -> VerifyKey:
    """An RSA, EC or Ed25519/Ed448 public key (or certificate) in PEM; private keys are refused."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise ConfigError("public_key", "not a PEM public key or certificate") from None
    try:
        family, only = _family_of_key(key)
    except ValueError as e:
        raise ConfigError("public_key", str(e)) from None
    algs = _check_algs(algs, family, f"an {family} key")
    if only is not None and not algs <= only:
        raise ConfigError("algs", f"this key's curve only serves {', '.join(sorted(only))}")
    return VerifyKey(kid, algs, key, family)


def key_from_jwk(jwk: Mapping[str, Any], allowed: frozenset[str]) -> VerifyKey:
    """A verification key from one JWK of an identity provider's JWKS. Raises ValueError for keys
    to skip: symmetric (a public document cannot hold a shared secret), not for signing, weak,
    or with an algorithm outside `allowed`."""
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("not a signing key")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops does not allow verify")
    try:
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(dict(jwk))
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(dict(jwk))
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(dict(jwk))
        else:
            raise ValueError(f"key type {kty!r} is not accepted from a JWKS")
    except jwt_errors.InvalidKeyError as e:
        raise ValueError(f"invalid {kty} key: {e}") from None
    if not isinstance(key, _PUBLIC_TYPES):
        key = key.public_key()  # a JWKS that leaks "d": keep only the public half
    family, only = _family_of_key(key)
    algs = frozenset(a for a, f in _FAMILY.items() if f == family) & allowed
    if only is not None:
        algs &= only
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in algs:
            raise ValueError(f"alg {alg!r} not allowed for this key")
        algs = frozenset({alg})
    if not algs:
        raise ValueError("no allowed algorithm for this key")
    return VerifyKey(kid, algs, key, family)


@dataclass(frozen=True)
class KeySet:
    """Keys by kid, plus keys without a kid (which only verify tokens that name no kid)."""
    by_kid: Mapping[str, VerifyKey] = field(default_factory=dict)
    anonymous: tuple[VerifyKey, ...] = ()

    @classmethod
    def of(cls, keys: Iterable[VerifyKey]) -> "KeySet":
        by_kid: dict[str, VerifyKey] = {}
        anonymous = []
        for k in keys:
            if k.kid is None:
                anonymous.append(k)
            elif k.kid in by_kid:
                raise ConfigError("kid", f"duplicate kid {k.kid!r}")
            else:
                by_kid[k.kid] = k
        return cls(by_kid, tuple(anonymous))

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.anonymous)


def parse_jwks(doc: Any, allowed: frozenset[str]) -> tuple[KeySet, list[str]]:
    """A JWKS document -> (usable keys, why the others were skipped). Raises ValueError when the
    document itself is not a JWKS. A JWK without a kid, or a repeated kid, is skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, VerifyKey] = {}
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            skipped.append(f"keys[{i}]: not an object")
            continue
        try:
            k = key_from_jwk(jwk, allowed)
        except ValueError as e:
            skipped.append(f"keys[{i}]: {e}")
            continue
        if k.kid is None or k.kid in keys:
            skipped.append(f"keys[{i}]: missing or repeated kid")
            continue
        keys[k.kid] = k
    return KeySet(keys), skipped


# --------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True, slots=True)
class TokenHeader:
    alg: str
    kid: str | None


def parse_header(token: str, max_bytes: int) -> TokenHeader:
    """The unverified JOSE header, after the size check. Refuses `none`, unknown algorithms,
    JWE and critical extensions before any key is touched."""
    if len(token) > max_bytes:
        raise AuthFailure("oversized")
    if token.count(".") != 2:
        raise AuthFailure("malformed", "not a compact JWS")
    head = token.partition(".")[0]
    try:
        header = orjson.loads(base64url_decode(head.encode("ascii")))
    except (ValueError, UnicodeEncodeError, orjson.JSONDecodeError):
        raise AuthFailure("malformed", "header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise AuthFailure("malformed", "header is not an object")
    if "crit" in header or "b64" in header:
        raise AuthFailure("malformed", "critical header extensions are not supported")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
        raise AuthFailure("alg_not_allowed", "alg missing, none or unsupported")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise AuthFailure("malformed", "kid is not a string")
    return TokenHeader(alg, kid)


def select_keys(header: TokenHeader, *keysets: KeySet) -> list[VerifyKey]:
    """The keys that may verify this token. A kid is only ever a dictionary key."""
    if header.kid is not None:
        for ks in keysets:
            key = ks.by_kid.get(header.kid)
            if key is not None:
                if header.alg not in key.algorithms:
                    raise AuthFailure("alg_not_allowed", "alg not allowed for this key")
                return [key]
        raise AuthFailure("unknown_kid")
    anonymous = [k for ks in keysets for k in ks.anonymous]
    if not anonymous:
        raise AuthFailure("unknown_kid", "token names no kid and no key without a kid is configured")
    keys = [k for k in anonymous if header.alg in k.algorithms]
    if not keys:
        raise AuthFailure("alg_not_allowed", "no key allows this alg")
    return keys


_JWS = api_jws.PyJWS(options={"verify_signature": True, "enforce_minimum_key_length": True})


def verify_signature(token: str, header: TokenHeader, keys: Sequence[VerifyKey]) -> dict[str, Any]:
    """The claims, once one of `keys` verifies the signature with the header's algorithm."""
    for key in keys:
        try:
            decoded = _JWS.decode_complete(token, key.key, algorithms=[header.alg])
        except jwt_errors.InvalidSignatureError:
            continue
        except jwt_errors.InvalidAlgorithmError:
            raise AuthFailure("alg_not_allowed") from None
        except jwt_errors.InvalidKeyError:
            raise AuthFailure("bad_signature", "key unusable for this alg") from None
        except jwt_errors.InvalidTokenError:
            raise AuthFailure("malformed") from None
        try:
            claims = orjson.loads(decoded["payload"])
        except orjson.JSONDecodeError:
            raise AuthFailure("malformed", "payload is not JSON") from None
        if not isinstance(claims, dict):
            raise AuthFailure("malformed", "payload is not an object")
        return claims
    raise AuthFailure("bad_signature")


@dataclass(frozen=True, slots=True)
class JwtPolicy:
    """What a verified token must also satisfy. Empty issuers/audiences: not checked."""
    issuers: frozenset[str] = frozenset()
    audiences: frozenset[str] = frozenset()
    leeway: float = 60.0


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AuthFailure("bad_claims", f"{name} is not a number")
    return float(v)


def check_claims(claims: Mapping[str, Any], policy: JwtPolicy, now: float) -> None:
    """exp (required), nbf, iat (not in the future beyond leeway), iss, aud."""
    exp = _number(claims, "exp")
    if exp is None:
        raise AuthFailure("bad_claims", "exp missing")
    if now > exp + policy.leeway:
        raise AuthFailure("expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and nbf > now + policy.leeway:
        raise AuthFailure("not_yet_valid", "nbf in the future")
    iat = _number(claims, "iat")
    if iat is not None and iat > now + policy.leeway:
        raise AuthFailure("not_yet_valid", "iat in the future")
    if policy.issuers:
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss not in policy.issuers:
            raise AuthFailure("bad_issuer")
    if policy.audiences:
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in policy.audiences for a in auds):
            raise AuthFailure("bad_audience")


@dataclass(frozen=True, slots=True)
class ClaimRules:
    """Which claims carry what. roles_claim is read, and Keycloak's realm_access.roles too."""
    email_claim: str = "email"
    roles_claim: str = "roles"
    tenant_claim: str | None = None
    region_claim: str = "region"


def _strings(value: Any, name: str) -> list[str]:
    """A claim that is a list of strings or one space-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise AuthFailure("bad_claims", f"{name} is not a list of strings")


def _name(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise AuthFailure("bad_claims", f"{name} is not a plain name")
    return value


def tenant_of(roles: Iterable[str], claimed: str | None = None) -> str | None:
    """The tenant from exactly one `tenant:{name}` role and/or the tenant claim. Two different
    tenants (two roles, or a role and a claim that disagree) are ambiguous: refused."""
    found = {r[len("tenant:"):] for r in roles if r.startswith("tenant:")}
    if claimed is not None:
        found.add(claimed)
    if len(found) > 1:
        raise AuthFailure("bad_claims", "more than one tenant")
    if not found:
        return None
    return _name(found.pop(), "tenant")


def identity_from_claims(claims: Mapping[str, Any], rules: ClaimRules) -> Identity:
    """A verified token's claims -> Identity. Refuses claims that would be unsafe to pass on."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _PRINTABLE_RE.match(sub):
        raise AuthFailure("bad_claims", "sub missing or not printable")
    email = claims.get(rules.email_claim)
    if email is None:
        pu = claims.get("preferred_username")
        email = pu if isinstance(pu, str) and "@" in pu else None
    if email is not None and (not isinstance(email, str) or not _PRINTABLE_RE.match(email)):
        raise AuthFailure("bad_claims", "email not a printable string")
    roles = _strings(claims.get(rules.roles_claim), rules.roles_claim)
    realm = claims.get("realm_access")
    if isinstance(realm, dict):
        roles = roles + _strings(realm.get("roles"), "realm_access.roles")
    claimed = None
    if rules.tenant_claim is not None:
        claimed = claims.get(rules.tenant_claim)
        if claimed is not None and not isinstance(claimed, str):
            raise AuthFailure("bad_claims", "tenant claim is not a string")
    tenant = tenant_of(roles, claimed)
    region = _name(claims.get(rules.region_claim), "region")
    sid = claims.get("sid")
    if not isinstance(sid, str):
        sid = claims.get("jti")
    session_id = sid if isinstance(sid, str) and _PRINTABLE_RE.match(sid) else None
    scope = claims.get("scope")
    scopes = _strings(scope, "scope") if scope is not None else _strings(claims.get("scp"), "scp")
    return Identity(subject=sub, email=email, tenant=tenant, roles=frozenset(roles), region=region,
                    session_id=session_id, scopes=frozenset(scopes), method="jwt",
                    expires_at=_number(claims, "exp"))


class TokenCache:
    """Verified tokens -> Identity, a bounded LRU keyed by the token's SHA-256 (so 10k entries of
    8 KiB tokens cost 10k digests, not 80 MiB). exp is re-checked on every hit."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._items: TTLCache[bytes, Identity] = TTLCache(size, math.inf)  # expiry is the token's own exp

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, token: str, now: float, leeway: float) -> Identity | None:
        if not self._size:
            return None
        k = hashlib.sha256(token.encode()).digest()
        ident = self._items.get(k)
        if ident is None:
            return None
        if ident.expires_at is not None and now > ident.expires_at + leeway:
            self._items.pop(k)
            return None
        return ident

    def put(self, token: str, ident: Identity) -> None:
        if not self._size:
            return
        self._items.put(self._key(token), ident)

    def __len__(self) -> int:
        return len(self._items)


class HeaderMemo:
    """Authorization header values, as the parser's bytes, that were the request's only
    credential and carried a JWT that was verified -> (token, Identity). A repeat of such a value
    skips decoding, parsing and hashing it: what the header says is a pure function of its bytes.
    At most `size` entries (the oldest put goes first) of at most MAX_VALUE bytes each, so it
    stays small however long the tokens; exp is re-checked on every hit, like TokenCache. Pure."""

    __slots__ = ("size", "_items")

    MAX_VALUE = 4096

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._items: dict[bytes, tuple[str, Identity]] = {}

    def get(self, value: bytes, now: float, leeway: float) -> tuple[str, Identity] | None:
        hit = self._items.get(value)
        if hit is None:
            return None
        exp = hit[1].expires_at
        if exp is not None and now > exp + leeway:
            del self._items[value]
            return None
        return hit

    def put(self, value: bytes, token: str, ident: Identity) -> None:
        if self.size <= 0 or len(value) > self.MAX_VALUE:
            return
        items = self._items
        if value not in items and len(items) >= self.size:
            del items[next(iter(items))]
        items[value] = (token, ident)

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------------------- API keys
def hash_api_key(key: str) -> str:
    """The stored form of an API key: SHA-256 of its UTF-8 bytes, lower-case hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, kw_only=True)
class ApiKeyRecord:
    """One API key as stored: its SHA-256 and the identity it proves. Also the schema of an entry
    in the keys file and in `api_keys.keys` (built with options.build)."""
    sha256: str
    subject: str
    email: str | None = None
    tenant: str | None = None
    roles: tuple[str, ...] = ()
    region: str | None = None
    scopes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", self.sha256.strip().lower())
        if not _HEX64.match(self.sha256):
            raise ConfigError("sha256", "expected 64 hex digits (sge-mail-proxy hash-api-key prints it)")
        if not _PRINTABLE_RE.match(self.subject):
            raise ConfigError("subject", "must be non-empty, without spaces or control characters")
        if self.email is not None and not _PRINTABLE_RE.match(self.email):
            raise ConfigError("email", "must be without spaces or control characters")
        try:
            tenant_of(self.roles, self.tenant)
        except AuthFailure:
            raise ConfigError("tenant", "one tenant at most (tenant, or one tenant:{name} role), "
                              "a plain name") from None
        try:
            _name(self.region, "region")
        except AuthFailure:
            raise ConfigError("region", "must be a plain name") from None

    def identity(self) -> Identity:
        return Identity(subject=self.subject, email=self.email, tenant=tenant_of(self.roles, self.tenant),
                        roles=frozenset(self.roles), region=self.region, scopes=frozenset(self.scopes),
                        method="api_key")


class ApiKeySource(Protocol):
    """Where API key records come from: the keys file, the options, later Vault. The addon loads
    every source into one ApiKeyStore; a source that refreshes calls `store.replace()`."""
    name: str

    async def records(self) -> Sequence[ApiKeyRecord]: ...


@dataclass(frozen=True)
class InlineKeySource:
    """Records given in the options (`api_keys.keys`)."""
    items: tuple[ApiKeyRecord, ...]
    name: str = "options"

    async def records(self) -> Sequence[ApiKeyRecord]:
        return self.items


class ApiKeyStore:
    """Hash -> Identity. The presented key is hashed, looked up, and the stored hash compared with
    hmac.compare_digest. Plain keys are never held."""

    def __init__(self, records: Iterable[ApiKeyRecord] = ()) -> None:
        self._by_hash: dict[str, tuple[str, Identity]] = {}
        self.replace(records)

    def replace(self, records: Iterable[ApiKeyRecord]) -> None:
        """Swap the whole table at once (a source reload)."""
        table: dict[str, tuple[str, Identity]] = {}
        for r in records:
            if r.sha256 in table:
                raise ConfigError("sha256", f"the same key is listed twice ({r.sha256[:12]}...)")
            table[r.sha256] = (r.sha256, r.identity())
        self._by_hash = table

    def lookup(self, key: str) -> Identity | None:
        digest = hash_api_key(key)
        hit = self._by_hash.get(digest)
        if hit is None or not hmac.compare_digest(hit[0], digest):
            return None
        return hit[1]

    def __len__(self) -> int:
        return len(self._by_hash)
