"""The auth addon: proves who the client is (JWT or API key) and sets flow.identity.

Credentials: `Authorization: Bearer <JWT>`, `Authorization: Bearer <prefix><rest>` (an API key,
prefix "sgek_" by default) or `X-API-Key: <key>`; with `websocket_protocol_credentials`, a
WebSocket upgrade may instead offer the subprotocol `sge.bearer.<token>` (browsers cannot set
headers on a WebSocket), which is taken out of the offered subprotocols before going upstream. A refusal is a 401 problem+json with a
WWW-Authenticate challenge and one generic detail; the real reason goes to the
`sge_proxy_auth_failures_total{reason}` counter and the log (with the request id, never the token).
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import ipaddress
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlsplit

import yaml
from multidict import CIMultiDict

from proxy.errors import ConfigError, TooManyRequests, Unauthorized
from proxy.http1 import scrub_request
from proxy.identity import Identity
from proxy.jwks import JwksCache, JwksUnavailable
from proxy.options import build
from proxy.ratelimit import FailureBans
from proxy.secrets import SecretError
from proxy.tokens import (REASONS, SUPPORTED_ALGORITHMS, ApiKeyRecord, ApiKeySource, ApiKeyStore, AuthFailure,
                          ClaimRules, HeaderMemo, InlineKeySource, JwtPolicy, KeySet, TokenCache, VerifyKey,
                          check_claims, hash_api_key, hmac_key, identity_from_claims, parse_header, public_key,
                          select_keys, verify_signature)

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow

__all__ = ["Auth", "AuthOptions", "JwtOptions", "JwtKeyOptions", "ApiKeyOptions", "FileKeySource",
           "credential", "credential_of", "hash_api_key_main", "CHALLENGE"]

log = logging.getLogger(__name__)

CHALLENGE = 'Bearer realm="sge-mail-proxy"'
_DETAIL_MISSING = "Authentication is required."
_DETAIL_INVALID = "The credentials are not valid."
_TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")  # RFC 6750 2.1 b64token
_ASYMMETRIC = tuple(sorted(a for a in SUPPORTED_ALGORITHMS if not a.startswith("HS")))


def credential(headers: CIMultiDict, api_header: str | None, bearer_prefix: str,
               max_bytes: int) -> tuple[str, str] | None:
    """("jwt" | "api_key", value) from the request headers, or None when none is presented.
    Pure. A non-Bearer Authorization (Basic, ...) is not ours: it counts as no credential."""
    return credential_of(headers.getall("Authorization", []),
                         headers.getall(api_header, []) if api_header else [], bearer_prefix, max_bytes)


WS_BEARER = "sge.bearer."


def protocol_credential(headers: CIMultiDict) -> None:
    """A WebSocket upgrade's bearer token offered as the subprotocol `sge.bearer.<token>` becomes
    its Authorization header, and leaves the offered subprotocols (so it never goes upstream).
    Two credentials (that and an Authorization header, or two such entries) are malformed. Pure."""
    offered = [p.strip() for v in headers.getall("Sec-WebSocket-Protocol", []) for p in v.split(",") if p.strip()]
    tokens = [p[len(WS_BEARER):] for p in offered if p.startswith(WS_BEARER)]
    if not tokens:
        return
    if len(tokens) > 1 or "Authorization" in headers:
        raise AuthFailure("malformed", "more than one credential on a WebSocket upgrade")
    rest = [p for p in offered if not p.startswith(WS_BEARER)]
    headers.popall("Sec-WebSocket-Protocol", None)
    if rest:
        headers["Sec-WebSocket-Protocol"] = ", ".join(rest)
    headers["Authorization"] = "Bearer " + tokens[0]


def credential_of(authz: list[str], keys: list[str], bearer_prefix: str,
                  max_bytes: int) -> tuple[str, str] | None:
    """`credential` on the values of every Authorization and API key header, in order. Pure."""
    if len(authz) > 1 or len(keys) > 1:
        raise AuthFailure("malformed", "repeated credential header")
    bearer = None
    if authz:
        scheme, _, rest = authz[0].strip().partition(" ")
        if scheme.lower() == "bearer":
            bearer = rest.strip()
            if len(bearer) > max_bytes:
                raise AuthFailure("oversized")
            if not _TOKEN68.match(bearer):
                raise AuthFailure("malformed", "bearer token is not a b64token")
    if keys:
        if bearer is not None:
            raise AuthFailure("malformed", "both a bearer token and an API key header")
        key = keys[0].strip()
        if len(key) > max_bytes:
            raise AuthFailure("oversized")
        if not key:
            raise AuthFailure("malformed", "empty API key")
        return "api_key", key
    if bearer is None:
        return None
    if bearer_prefix and bearer.startswith(bearer_prefix):
        return "api_key", bearer
    return "jwt", bearer


# refusals that are not a guess at a credential: no credential at all, or our own JWKS trouble
_NOT_GUESSES = frozenset({"missing", "jwks_unavailable"})


def _scrub_keeps(name: str) -> bool:
    """Whether the engine's header scrubbing leaves a header of this name as the client sent it
    (absent a Connection header): then it can be read from the parser's bytes."""
    probe = CIMultiDict([(name, "\x00probe"), ("Authorization", "\x00probe")])
    scrub_request(probe, "", "http")
    return probe.get(name) == "\x00probe" and probe.get("Authorization") == "\x00probe"


# --------------------------------------------------------------------------------------- options
@dataclass(frozen=True, kw_only=True)
class JwtKeyOptions:
    """One static verification key: exactly one of secret, secret_file (HS*), public_key,
    public_key_file (PEM public key or certificate: RS*, PS*, ES*, EdDSA)."""
    kid: str | None = None
    alg: str | None = None
    algs: tuple[str, ...] = ()
    secret: str | None = None
    secret_file: Path | None = None
    public_key: str | None = None
    public_key_file: Path | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("secret", "secret_file", "public_key", "public_key_file") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError("secret", "give exactly one of secret, secret_file, public_key, public_key_file")
        if not self.algorithms:
            raise ConfigError("alg", "give alg or algs (the algorithms this key may verify)")
        if self.kid is not None and not self.kid:
            raise ConfigError("kid", "must not be empty")

    @property
    def algorithms(self) -> tuple[str, ...]:
        return ((self.alg,) if self.alg else ()) + self.algs

    def __repr__(self) -> str:  # never print a secret
        return f"JwtKeyOptions(kid={self.kid!r}, algorithms={self.algorithms!r})"


@dataclass(frozen=True, kw_only=True)
class JwtOptions:
    issuer: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()
    leeway: float = field(default=60.0, metadata={"kind": "duration"})
    keys: tuple[JwtKeyOptions, ...] = ()
    jwks_url: str | None = None
    jwks_ttl: float = field(default=600.0, metadata={"kind": "duration"})
    jwks_refetch_interval: float = field(default=30.0, metadata={"kind": "duration"})
    jwks_timeout: float = field(default=5.0, metadata={"kind": "duration"})
    jwks_algorithms: tuple[str, ...] = _ASYMMETRIC
    tenant_claim: str | None = None
    roles_claim: str = "roles"
    email_claim: str = "email"
    region_claim: str = "region"
    max_token_bytes: int = field(default=8 << 10, metadata={"kind": "size"})
    cache_size: int = 10_000

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.jwks_url)

    def __post_init__(self) -> None:
        if self.enabled:
            if not self.issuer:
                raise ConfigError("issuer", "required when JWT keys or jwks_url are set")
            if not self.audience:
                raise ConfigError("audience", "required when JWT keys or jwks_url are set (else a token "
                                  "minted for another service of the same provider would be accepted)")
        if self.jwks_url is not None:
            u = urlsplit(self.jwks_url)
            if u.scheme not in ("https", "http") or not u.hostname:
                raise ConfigError("jwks_url", "expected an https:// URL")
            if u.scheme == "http" and not _loopback(u.hostname):
                raise ConfigError("jwks_url", "must be https:// (plain http only to a loopback address)")
        bad = [a for a in self.jwks_algorithms if a not in _ASYMMETRIC]
        if bad:
            raise ConfigError("jwks_algorithms", f"not an asymmetric algorithm we support: {', '.join(bad)}")
        if self.jwks_refetch_interval <= 0 or self.jwks_timeout <= 0:
            raise ConfigError("jwks_refetch_interval", "jwks_refetch_interval and jwks_timeout must be positive")
        if self.max_token_bytes < 256:
            raise ConfigError("max_token_bytes", "must be at least 256")
        if self.cache_size < 0:
            raise ConfigError("cache_size", "must not be negative")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ApiKeyOptions:
    """`secret_path`: read the records from the secret source (file or Vault, see `secrets:`) at
    this path, key `secret_key` (a YAML/JSON list, or the list itself), re-read every
    `refresh_interval`; the last good table keeps serving when the source is down."""
    header: str = "X-API-Key"
    bearer_prefix: str = "sgek_"
    file: Path | None = None
    keys: tuple[ApiKeyRecord, ...] = ()
    secret_path: str | None = None
    secret_key: str = "records"
    refresh_interval: float = field(default=60.0, metadata={"kind": "duration"})

    @property
    def enabled(self) -> bool:
        return self.file is not None or bool(self.keys) or self.secret_path is not None

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9-]+$", self.header) or self.header.lower() == "authorization":
            raise ConfigError("header", "must be a plain header name other than Authorization")
        if self.bearer_prefix and not _TOKEN68.match(self.bearer_prefix):
            raise ConfigError("bearer_prefix", "must use bearer-token characters (A-Z a-z 0-9 - . _ ~ + /)")


@dataclass(frozen=True, kw_only=True)
class BanOptions:
    """addons.auth.bans: an address that presents bad credentials `failures` times within
    `window` is refused (429) for `ban`, whatever it presents: Stalwart's own authentication ban,
    which the proxy would otherwise hide (a bad token never reaches the server). A request
    without credentials is not a failure. `exempt`: CIDRs never banned (a load balancer in front,
    monitoring). `failures: 0` turns bans off."""
    failures: int = 20
    window: float = field(default=300.0, metadata={"kind": "duration"})
    ban: float = field(default=900.0, metadata={"kind": "duration"})
    exempt: tuple[str, ...] = ()
    max_addresses: int = 100_000

    def __post_init__(self) -> None:
        if self.failures < 0:
            raise ConfigError("failures", "must not be negative")
        if self.window <= 0 or self.ban <= 0:
            raise ConfigError("window", "window and ban must be positive durations")
        for n in self.exempt:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ConfigError("exempt", f"{n!r} is not an address or CIDR") from None


@dataclass(frozen=True, kw_only=True)
class AuthOptions:
    """addons.auth. `required: false` lets a request without credentials through without an
    identity; `public_paths` does the same for exactly these paths. A credential that is presented
    is always checked: a bad one is refused even where none is required."""
    jwt: JwtOptions = field(default_factory=JwtOptions)
    api_keys: ApiKeyOptions = field(default_factory=ApiKeyOptions)
    required: bool = True
    public_paths: tuple[str, ...] = ()
    # browsers cannot set Authorization on a WebSocket: accept a bearer token offered as the
    # subprotocol "sge.bearer.<token>" on upgrades (removed before the request goes upstream)
    websocket_protocol_credentials: bool = False
    bans: BanOptions = field(default_factory=BanOptions)

    def __post_init__(self) -> None:
        if self.required and not (self.jwt.enabled or self.api_keys.enabled):
            raise ConfigError("required", "no way to authenticate: set jwt.keys, jwt.jwks_url, api_keys.file "
                              "or api_keys.keys (or required: false)")
        for p in self.public_paths:
            if not p.startswith("/"):
                raise ConfigError("public_paths", f"{p!r} must start with /")


# --------------------------------------------------------------------------------------- key sources
def _parse_records(data: Any, source: str, key: str) -> tuple[ApiKeyRecord, ...]:
    """`keys: [...]`, or the list alone, of {sha256, subject, email, tenant, roles, region, scopes}."""
    if isinstance(data, dict) and set(data) <= {"keys"}:
        data = data.get("keys")
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(key, "expected a list of keys", source=source)
    return tuple(build(ApiKeyRecord, entry, prefix=f"keys[{i}]", source=source)
                 for i, entry in enumerate(data))


@dataclass(frozen=True)
class FileKeySource:
    """API key records from a YAML file: `keys: [{sha256, subject, email, tenant, roles, region,
    scopes}, ...]` (or the list alone)."""
    path: Path
    name: str = "file"

    async def records(self) -> Sequence[ApiKeyRecord]:
        try:
            text = await asyncio.to_thread(self.path.read_text)
            data = yaml.safe_load(text)
        except OSError as e:
            raise ConfigError("addons.auth.api_keys.file", f"cannot read {self.path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError("addons.auth.api_keys.file",
                              f"{self.path}: invalid YAML: {getattr(e, 'problem', e)}") from None
        return _parse_records(data, str(self.path), "keys")


@dataclass(frozen=True)
class SecretKeySource:
    """API key records kept in the secret source (a file or Vault): one value holding the list."""
    secrets: Any
    path: str
    key: str
    name: str = "secrets"

    async def records(self) -> Sequence[ApiKeyRecord]:
        where = f"secret {self.path}/{self.key}"
        try:
            value = await self.secrets.get(self.path, self.key)
        except SecretError as e:
            raise ConfigError("addons.auth.api_keys.secret_path", str(e)) from None
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError("addons.auth.api_keys.secret_path",
                                  f"{where}: invalid YAML/JSON: {getattr(e, 'problem', e)}") from None
        return _parse_records(value, where, "keys")


def _read(loader: "Loader", p: Path, key: str) -> bytes:
    try:
        return loader.path(p).read_bytes()
    except OSError as e:
        raise ConfigError(key, f"cannot read {loader.path(p)}: {e.strerror}",
                          source=loader.config.source) from None


def _static_keys(loader: "Loader", opts: JwtOptions) -> KeySet:
    keys: list[VerifyKey] = []
    for i, k in enumerate(opts.keys):
        where = f"addons.auth.jwt.keys[{i}]"
        try:
            if k.secret is not None or k.secret_file is not None:
                secret = (k.secret.encode() if k.secret is not None
                          else _read(loader, k.secret_file, f"{where}.secret_file").rstrip(b"\r\n"))
                keys.append(hmac_key(secret, k.algorithms, k.kid))
            else:
                pem = (k.public_key.encode() if k.public_key is not None
                       else _read(loader, k.public_key_file, f"{where}.public_key_file"))
                keys.append(public_key(pem, k.algorithms, k.kid))
        except ConfigError as e:
            if e.key.startswith("addons."):
                raise
            raise ConfigError(f"{where}.{e.key}", e.reason, source=loader.config.source) from None
    try:
        return KeySet.of(keys)
    except ConfigError as e:
        raise ConfigError("addons.auth.jwt.keys", e.reason, source=loader.config.source) from None


# --------------------------------------------------------------------------------------- the addon
class Auth:
    """JWT and API key authentication (security addon: an unexpected error fails closed)."""

    name = "auth"
    security = True
    Options = AuthOptions

    MEMO_SIZE = 1024  # Authorization header values remembered as bytes (HeaderMemo)

    def __init__(self) -> None:
        self._opts: AuthOptions | None = None
        self._static = KeySet()
        self._jwks: JwksCache | None = None
        self._store: ApiKeyStore | None = None
        self._cache = TokenCache(0)
        self._memo = HeaderMemo(0)
        self._policy = JwtPolicy()
        self._rules = ClaimRules()
        self._public: frozenset[str] = frozenset()
        self._spawn: Any = None
        self._failures: dict[str, Any] = {}
        self._success: dict[str, Any] = {}
        self._api_raw: bytes | None = None  # the API key header's lower-cased name, when raw-readable
        self._bans: FailureBans | None = None

    async def load(self, loader: "Loader") -> None:
        self._audit = loader.audit
        opts: AuthOptions = loader.options
        jwt_o, api_o = opts.jwt, opts.api_keys
        self._static = _static_keys(loader, jwt_o)
        self._policy = JwtPolicy(frozenset(jwt_o.issuer), frozenset(jwt_o.audience), jwt_o.leeway)
        self._rules = ClaimRules(email_claim=jwt_o.email_claim, roles_claim=jwt_o.roles_claim,
                                 tenant_claim=jwt_o.tenant_claim, region_claim=jwt_o.region_claim)
        self._cache = TokenCache(jwt_o.cache_size)
        self._memo = HeaderMemo(min(jwt_o.cache_size, self.MEMO_SIZE))
        m = loader.metrics
        failures = m.counter("sge_proxy_auth_failures_total", "Refused credentials by reason.", ("reason",))
        self._failures = {r: failures.labels(r) for r in (*REASONS, "banned")}
        success = m.counter("sge_proxy_auth_success_total", "Accepted credentials by method.", ("method",))
        self._success = {k: success.labels(k) for k in ("jwt", "api_key")}
        if jwt_o.jwks_url:
            fetches = m.counter("sge_proxy_jwks_fetches_total", "JWKS fetch attempts by result.", ("result",))
            self._jwks = JwksCache(jwt_o.jwks_url, session=lambda: loader.http,
                                   allowed=frozenset(jwt_o.jwks_algorithms), default_ttl=jwt_o.jwks_ttl,
                                   refetch_interval=jwt_o.jwks_refetch_interval, timeout=jwt_o.jwks_timeout,
                                   on_fetch=lambda result: fetches.labels(result).inc())
        if api_o.enabled:
            sources: list[ApiKeySource] = []
            if api_o.file is not None:
                sources.append(FileKeySource(loader.path(api_o.file)))
            if api_o.keys:
                sources.append(InlineKeySource(api_o.keys))
            if api_o.secret_path is not None:
                sources.append(SecretKeySource(loader.secrets, api_o.secret_path, api_o.secret_key))
            records = [r for s in sources for r in await s.records()]
            try:
                self._store = ApiKeyStore(records)
            except ConfigError as e:
                raise ConfigError("addons.auth.api_keys", e.reason, source=loader.config.source) from None
            if opts.required and not records and not jwt_o.enabled:
                raise ConfigError("addons.auth.api_keys", "no API key is configured and JWT is off",
                                  source=loader.config.source)
        self._public = frozenset(opts.public_paths)
        self._api_raw = api_o.header.lower().encode("latin-1") if _scrub_keeps(api_o.header) else None
        self._spawn = loader.spawn
        b = opts.bans
        if b.failures:
            bans = self._bans = FailureBans(b.failures, b.window, b.ban, exempt=b.exempt, size=b.max_addresses)
            self._banned = m.counter("sge_proxy_auth_bans_total", "Addresses banned for failed authentication.")
            m.gauge("sge_proxy_auth_banned_addresses", "Addresses banned now (addons.auth.bans).").set_function(
                lambda: float(len(bans)))
        self._opts = opts
        if api_o.secret_path is not None and self._store is not None:
            loader.spawn(self._refresh_keys(sources, api_o.refresh_interval), "api-key-refresh")

    async def _refresh_keys(self, sources: list, interval: float) -> None:
        """Re-read every API key source; a failed read keeps the table that is serving."""
        while True:
            await asyncio.sleep(interval)
            try:
                records = [r for s in sources for r in await s.records()]
                assert self._store is not None
                self._store.replace(records)
            except (ConfigError, OSError) as e:
                log.warning("API keys not refreshed, keeping the %d loaded: %s", len(self._store or ()), e)

    def running(self) -> None:
        """Fetch the JWKS in the background once the proxy listens, so the first user does not wait."""
        if self._jwks is not None and self._jwks.keys is None:
            self._spawn(self._jwks.refresh(), "jwks-prefetch")

    def requestheaders(self, flow: "Flow") -> Any:
        """Sets flow.identity or refuses. Returns a coroutine only when a token has to be verified
        (a cache miss): a cached token or an API key costs no task switch."""
        opts = self._opts
        assert opts is not None, "auth addon used before load"
        bans = self._bans
        if bans is not None and bans.active:
            left = bans.banned(flow.client_addr)
            if left is not None:
                self._failures["banned"].inc()
                raise TooManyRequests("Too many failed authentications from this address.",
                                      headers={"Retry-After": str(math.ceil(left))})
        req = flow.request
        if req.websocket and opts.websocket_protocol_credentials:
            try:
                protocol_credential(req.headers)
            except AuthFailure as e:
                self._refuse(flow, e)
        api_header = opts.api_keys.header
        prefix = opts.api_keys.bearer_prefix if self._store else ""
        api_raw = self._api_raw
        sole: bytes | None = None  # the only Authorization value's bytes, when no API key header came
        try:
            if req.headers_read or req.raw_connection or api_raw is None:
                headers = req.headers
                try:
                    found = credential(headers, api_header, prefix, opts.jwt.max_token_bytes)
                finally:
                    headers.popall(api_header, None)  # an API key never goes upstream
            else:  # the parser's bytes hold the same values: no header dict built for this
                authz_b: list[bytes] = []
                keys: list[str] = []
                for ln, _, v in req.raw:
                    if ln == b"authorization":
                        authz_b.append(v)
                    elif ln == api_raw:
                        keys.append(v.decode("latin-1"))
                if keys:
                    req.set_header(api_header, None)  # an API key never goes upstream
                elif len(authz_b) == 1:
                    sole = authz_b[0]
                    hit = self._memo.get(sole, time.time(), self._policy.leeway)
                    if hit is not None:  # this very header was a verified JWT
                        self._accept(flow, "jwt", hit[0], hit[1])
                        return None
                found = credential_of([v.decode("latin-1") for v in authz_b], keys, prefix,
                                      opts.jwt.max_token_bytes)
        except AuthFailure as e:
            self._refuse(flow, e)
        if found is None:
            if opts.required and req.path not in self._public:
                self._refuse(flow, AuthFailure("missing"))
            return None
        kind, value = found
        try:
            if kind == "api_key":
                ident = self._api_key(value)
            else:
                ident = self._cache.get(value, time.time(), self._policy.leeway) if opts.jwt.enabled else None
                if ident is None:
                    return self._verified(flow, value, sole)
        except AuthFailure as e:
            self._refuse(flow, e)
        self._accept(flow, kind, value, ident)
        if sole is not None and kind == "jwt":
            self._memo.put(sole, value, ident)
        return None

    async def _verified(self, flow: "Flow", token: str, sole: bytes | None) -> None:
        try:
            ident = await self._jwt(token)
        except AuthFailure as e:
            self._refuse(flow, e)
        self._accept(flow, "jwt", token, ident)
        if sole is not None:
            self._memo.put(sole, token, ident)

    def _accept(self, flow: "Flow", kind: str, value: str, ident: Identity) -> None:
        flow.identity = ident
        if kind == "jwt":
            flow.client_token = value
        self._success[ident.method].inc()

    def _api_key(self, key: str) -> Identity:
        ident = self._store.lookup(key) if self._store is not None else None
        if ident is None:
            raise AuthFailure("bad_api_key")
        return ident

    async def _jwt(self, token: str) -> Identity:
        assert self._opts is not None
        if not self._opts.jwt.enabled:
            raise AuthFailure("malformed", "a bearer token that is not an API key, and JWT is off")
        now = time.time()
        ident = self._cache.get(token, now, self._policy.leeway)
        if ident is not None:
            return ident
        header = parse_header(token, self._opts.jwt.max_token_bytes)
        try:
            keys = select_keys(header, self._static)
        except AuthFailure as e:
            if e.reason != "unknown_kid" or self._jwks is None or header.kid is None:
                raise
            try:
                keys = select_keys(header, await self._jwks.keys_for(header.kid))
            except JwksUnavailable:
                raise AuthFailure("jwks_unavailable") from None
        claims = verify_signature(token, header, keys)
        check_claims(claims, self._policy, now)
        ident = identity_from_claims(claims, self._rules)
        self._cache.put(token, ident)
        return ident

    def _refuse(self, flow: "Flow", e: AuthFailure) -> None:
        self._failures[e.reason].inc()
        self._audit("auth.refused", flow, reason=e.reason)
        bans = self._bans
        if bans is not None and e.reason not in _NOT_GUESSES and bans.failed(flow.client_addr):
            self._banned.inc()
            self._audit("auth.banned", flow, address=flow.client_addr, failures=bans.failures,
                        window_s=bans.window, ban_s=bans.ban)
            log.warning("address %s banned for %ss after %d failed authentications in %ss",
                        flow.client_addr, bans.ban, bans.failures, bans.window)
        level = logging.WARNING if e.reason == "jwks_unavailable" else logging.INFO
        log.log(level, "authentication refused: reason=%s request_id=%s (%s)", e.reason, flow.id, e)
        if e.reason == "missing":
            raise Unauthorized(_DETAIL_MISSING, headers={"WWW-Authenticate": CHALLENGE})
        raise Unauthorized(_DETAIL_INVALID, headers={"WWW-Authenticate": CHALLENGE + ', error="invalid_token"'})


# --------------------------------------------------------------------------------------- CLI
def hash_api_key_main(argv: Sequence[str] | None = None) -> int:
    """`sge-mail-proxy hash-api-key`: print the SHA-256 of an API key read from standard input
    (one line; prompted without echo on a terminal). Exit 0, or 2 on an unusable key."""
    parser = argparse.ArgumentParser(
        prog="sge-mail-proxy hash-api-key",
        description="Print the SHA-256 (hex) of an API key read from standard input, for the sha256 field "
                    "of an entry in addons.auth.api_keys.keys or the api_keys.file.")
    parser.parse_args(argv)
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not key or key != key.strip():
        print("hash-api-key: the key is empty or has leading/trailing spaces", file=sys.stderr)
        return 2
    if not _TOKEN68.match(key):
        print("note: this key has characters outside A-Z a-z 0-9 - . _ ~ + / and cannot be sent as a "
              "Bearer token (X-API-Key still works)", file=sys.stderr)
    print(hash_api_key(key))
    return 0
