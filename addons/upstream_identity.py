"""How the upstream mail server learns who the user is, per target (docs/signing.md, "Upstream
identity").

Every forwarded request gets explicit credentials that replace whatever the client sent, so no
request can ride a login left on a pooled upstream connection (Cyrus keeps one). The exception is
`passthrough`, for plain forwarding only.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, get_args

import orjson

from proxy.errors import ConfigError, Forbidden, Unauthorized

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow

__all__ = ["UpstreamIdentity", "UpstreamIdentityOptions", "TargetIdentityOptions", "Settings",
           "Plan", "build_plans", "basic", "hs256_jwt", "JWT_HEADER", "MODES"]

_SECTION = "addons.upstream_identity"
Mode = Literal["impersonate", "authorize-as", "jwt", "bearer", "none", "passthrough"]
MODES: tuple[str, ...] = get_args(Mode)
MIN_JWT_KEY_BYTES = 32
_IAT_SKEW = 1  # seconds the upstream JWT's iat is set back (see Plan.headers)
JWT_HEADER = b'{"alg":"HS256","typ":"JWT"}'  # exactly these two fields, this order: Cyrus checks


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


_JWT_HEADER_B64 = _b64url(JWT_HEADER)


def basic(user: str, password: str) -> str:
    """An Authorization value for HTTP Basic (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")


def hs256_jwt(mac: "hmac.HMAC", sub: str, iat: int) -> str:
    """A compact HS256 JWT: header {"alg":"HS256","typ":"JWT"}, payload exactly {"sub","iat"}.
    `mac` is a prepared HMAC-SHA256 object for the key (copied, never consumed)."""
    signing_input = f"{_JWT_HEADER_B64}.{_b64url(orjson.dumps({'sub': sub, 'iat': iat}))}"
    h = mac.copy()
    h.update(signing_input.encode("ascii"))
    return f"{signing_input}.{_b64url(h.digest())}"


@functools.lru_cache(maxsize=4096)  # logins repeat; only passing checks are remembered
def _check_login(login: str, mode: str) -> None:
    """Refuse logins that cannot be passed on unambiguously (Forbidden: fail closed)."""
    if not login:
        raise Forbidden("This account has no login the mail server knows.")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in login):
        raise Forbidden("This account's login cannot be passed to the mail server.")
    if mode in ("impersonate", "authorize-as") and ":" in login:
        raise Forbidden("This account's login cannot be passed to the mail server.")
    if mode == "impersonate" and "%" in login:
        raise Forbidden("This account's login cannot be passed to the mail server.")
    if mode == "authorize-as" and not login.isascii():
        raise Forbidden("This account's login cannot be passed to the mail server.")


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True, kw_only=True)
class TargetIdentityOptions:
    """Overrides for one target (keyed by Target.name). Unset fields inherit the section's; setting
    secret or secret_file replaces both inherited ones."""
    mode: Mode | None = None
    impersonator: str | None = None
    secret: str | None = None
    secret_file: Path | None = None
    admin_user: str | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective settings for one target."""
    mode: str
    impersonator: str | None
    secret: str | None
    secret_file: Path | None
    admin_user: str | None
    key_file: Path | None


@dataclass(frozen=True, kw_only=True)
class UpstreamIdentityOptions:
    """[addons.upstream_identity].

    mode: impersonate (Basic `login%impersonator:secret`, Stalwart), authorize-as (Basic
      `admin_user:secret` + `Authorize-As: login`, Cyrus), jwt (HS256 Bearer signed with the raw
      key in key_file, Cyrus), bearer (the client's own bearer token), none (no Authorization;
      the signed X-SGE-* headers only), passthrough (the client's Authorization untouched).
    secret / secret_file: the impersonator's or admin's password (inline, or a file whose
      content minus one trailing newline is the secret).
    jwt_max_age: how old an `iat` the upstream accepts; jwt_reuse: how long a token is reused
      (below jwt_max_age).
    targets: per-target overrides keyed by Target.name (e.g. "official").
    """
    mode: Mode = "bearer"
    impersonator: str | None = None
    secret: str | None = None
    secret_file: Path | None = None
    admin_user: str | None = None
    key_file: Path | None = None
    jwt_max_age: float = field(default=300.0, metadata={"kind": "duration"})
    jwt_reuse: float = field(default=60.0, metadata={"kind": "duration"})
    targets: dict[str, TargetIdentityOptions] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.jwt_reuse < self.jwt_max_age:
            raise ConfigError("jwt_reuse", "must be at least 0 and below jwt_max_age")
        _validate(self.settings(None), "")
        for name in self.targets:
            _validate(self.settings(name), f"targets.{name}.")

    def settings(self, target: str | None) -> Settings:
        """The effective settings for a target name (None or an unlisted name: the section's)."""
        o = self.targets.get(target) if target is not None else None
        if o is None:
            return Settings(self.mode, self.impersonator, self.secret, self.secret_file,
                            self.admin_user, self.key_file)
        own_secret = o.secret is not None or o.secret_file is not None
        return Settings(
            o.mode or self.mode,
            o.impersonator if o.impersonator is not None else self.impersonator,
            o.secret if own_secret else self.secret,
            o.secret_file if own_secret else self.secret_file,
            o.admin_user if o.admin_user is not None else self.admin_user,
            o.key_file if o.key_file is not None else self.key_file)


def _validate(s: Settings, at: str) -> None:
    if s.secret is not None and s.secret_file is not None:
        raise ConfigError(f"{at}secret", "set secret or secret_file, not both")
    has_secret = bool(s.secret) or s.secret_file is not None
    if s.mode == "impersonate":
        if not s.impersonator:
            raise ConfigError(f"{at}impersonator", "mode impersonate needs the impersonator account")
        if ":" in s.impersonator or "%" in s.impersonator:
            raise ConfigError(f"{at}impersonator", "must not contain ':' or '%'")
        if not has_secret:
            raise ConfigError(f"{at}secret", "mode impersonate needs secret or secret_file")
    elif s.mode == "authorize-as":
        if not s.admin_user:
            raise ConfigError(f"{at}admin_user", "mode authorize-as needs admin_user")
        if ":" in s.admin_user:
            raise ConfigError(f"{at}admin_user", "must not contain ':'")
        if not has_secret:
            raise ConfigError(f"{at}secret", "mode authorize-as needs secret or secret_file")
    elif s.mode == "jwt" and s.key_file is None:
        raise ConfigError(f"{at}key_file", "mode jwt needs key_file (the raw HS256 key)")


# ---------------------------------------------------------------------------- plans
class Plan:
    """One target's way of passing the identity, with its secrets loaded. Immutable but for the
    JWT cache. Build a new set (`build_plans`) and `install` it to rotate secrets."""

    __slots__ = ("mode", "_impersonator", "_secret", "_admin_basic", "_jwt_mac", "_reuse", "_tokens",
                 "max_tokens", "_basics")

    def __init__(self, mode: str, *, impersonator: str | None = None, secret: str | None = None,
                 admin_user: str | None = None, jwt_key: bytes | None = None,
                 jwt_reuse: float = 60.0, max_tokens: int = 10_000) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self._impersonator = impersonator
        self._secret = secret
        self._admin_basic = basic(admin_user, secret) if mode == "authorize-as" and admin_user and secret else None
        self._jwt_mac = hmac.new(jwt_key, digestmod=hashlib.sha256) if jwt_key else None
        self._reuse = jwt_reuse
        self._tokens: dict[str, tuple[int, str]] = {}
        self.max_tokens = max_tokens
        self._basics: dict[str, str] = {}  # impersonate: login -> Authorization value

    def headers(self, flow: "Flow", now: float) -> list[tuple[str, str]]:
        """The credential headers for this flow. Raises Unauthorized without the identity the mode
        needs."""
        mode = self.mode
        if mode == "none":
            return []
        if mode == "passthrough":
            return [("Authorization", v) for v in flow.request.headers.getall("Authorization", ())]
        ident = flow.identity
        if ident is None:
            raise Unauthorized("Authentication is required.")
        if mode == "bearer":
            if not flow.client_token:
                raise Unauthorized("A bearer token is required.")
            return [("Authorization", f"Bearer {flow.client_token}")]
        login = ident.login
        _check_login(login, mode)
        if mode == "impersonate":
            value = self._basics.get(login)
            if value is None:
                value = basic(f"{login}%{self._impersonator}", self._secret or "")
                if len(self._basics) >= self.max_tokens:
                    del self._basics[next(iter(self._basics))]
                self._basics[login] = value
            return [("Authorization", value)]
        if mode == "authorize-as":
            return [("Authorization", self._admin_basic or ""), ("Authorize-As", login)]
        # iat a second in the past: the upstream compares it with its own, possibly cached, clock
        # and refuses an iat even a fraction of a second ahead (Cyrus: Out-of-range "iat" claim)
        return [("Authorization", f"Bearer {self._jwt(login, int(now) - _IAT_SKEW)}")]

    def _jwt(self, login: str, now: int) -> str:
        hit = self._tokens.get(login)
        if hit is not None and 0 <= now - hit[0] < self._reuse:
            return hit[1]
        if self._jwt_mac is None:
            raise RuntimeError("jwt plan without a key")
        token = hs256_jwt(self._jwt_mac, login, now)
        if len(self._tokens) >= self.max_tokens:
            for k in [k for k, (iat, _) in self._tokens.items() if not 0 <= now - iat < self._reuse]:
                del self._tokens[k]
            while len(self._tokens) >= self.max_tokens:
                del self._tokens[next(iter(self._tokens))]
        self._tokens[login] = (now, token)
        return token

    def __repr__(self) -> str:  # never the secrets
        return f"<Plan {self.mode}>"


def _read_secret(read: Callable[[Path], bytes], path: Path, key: str) -> str:
    try:
        text = read(path).decode("utf-8")
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text:
        raise ConfigError(key, f"{path} is empty")
    return text


def _read_key(read: Callable[[Path], bytes], path: Path, key: str) -> bytes:
    try:
        raw = read(path)
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    if len(raw) < MIN_JWT_KEY_BYTES:
        raise ConfigError(key, f"{path} holds {len(raw)} bytes; an HS256 key needs at least {MIN_JWT_KEY_BYTES}")
    return raw


def build_plans(opts: UpstreamIdentityOptions, read: Callable[[Path], bytes]) -> dict[str | None, Plan]:
    """A Plan per configured target name, plus the section default under None. `read` fetches a
    secret file's bytes (a secret store can supply its own)."""
    plans: dict[str | None, Plan] = {}
    for name in (None, *opts.targets):
        s = opts.settings(name)
        at = f"{_SECTION}." if name is None else f"{_SECTION}.targets.{name}."
        secret = s.secret
        if s.secret_file is not None and s.mode in ("impersonate", "authorize-as"):
            secret = _read_secret(read, s.secret_file, f"{at}secret_file")
        key = _read_key(read, s.key_file, f"{at}key_file") if s.mode == "jwt" and s.key_file else None
        plans[name] = Plan(s.mode, impersonator=s.impersonator, secret=secret,
                           admin_user=s.admin_user, jwt_key=key, jwt_reuse=opts.jwt_reuse)
    return plans


class UpstreamIdentity:
    """Puts this target's credentials for the flow's user on every forwarded request."""

    name = "upstream_identity"
    security = True
    Options = UpstreamIdentityOptions

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._plans: dict[str | None, Plan] = {}

    def load(self, loader: "Loader") -> None:
        self.install(build_plans(loader.options, lambda p: loader.path(p).read_bytes()))

    def install(self, plans: dict[str | None, Plan]) -> None:
        """Swap in a new set of plans (secret rotation): one assignment."""
        if None not in plans:
            raise ValueError("plans need a default (None) entry")
        self._plans = plans

    def plan(self, flow: "Flow") -> Plan:
        plans = self._plans
        name = flow.upstream.name if flow.upstream is not None else None
        p = plans.get(name)
        return p if p is not None else plans[None]

    def credentials(self, flow: "Flow") -> list[tuple[str, str]]:
        """Header pairs that make a request to flow.upstream act as the flow's user (for side
        requests by other addons). Raises Unauthorized when the mode needs an identity and there
        is none."""
        return self.plan(flow).headers(flow, self._clock())

    def request(self, flow: "Flow") -> None:
        plans = self._plans  # self.plan(flow), inline
        plan = plans.get(flow.upstream.name if flow.upstream is not None else None)
        if plan is None:
            plan = plans[None]
        if plan.mode == "passthrough":
            return
        creds = dict(plan.headers(flow, self._clock()))  # each name at most once
        req = flow.request  # set_header: no header dict built when nobody needs one
        req.set_header("Authorization", creds.pop("Authorization", None))
        req.set_header("Authorize-As", creds.pop("Authorize-As", None))
        for name, value in creds.items():
            req.set_header(name, value)
