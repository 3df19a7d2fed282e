"""Upstream identity modes through a real AddonManager: exact header values per mode, explicit
credentials on every request, fail-closed without identity, per-target overrides, the JWT format
Cyrus accepts, and option validation."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import jwt as pyjwt
import pytest
from multidict import CIMultiDict

from addons.upstream_identity import UpstreamIdentity
from proxy.addonmanager import AddonManager
from proxy.config import Config
from proxy.errors import ConfigError, Forbidden, Unauthorized
from proxy.flow import Flow, Request
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.target import Target

ALICE = Identity(subject="u-1", email="alice@example.com", tenant="acme")
JWT_KEY = bytes(range(1, 33))
NOW = 1_700_000_000.4
OFFICIAL = Target("https", "mail.example", 443, "", "official")
TENANT = Target("https", "acme.mail.example", 443, "", "tenant-acme")


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _addon(section: dict, tmp_path: Path, clock: Clock | None = None) -> tuple[AddonManager, UpstreamIdentity]:
    (tmp_path / "jwt.key").write_bytes(JWT_KEY)
    cfg = Config(addons={"upstream_identity": section}, base_dir=tmp_path)
    mgr = AddonManager(cfg, Metrics())
    addon = UpstreamIdentity(clock=clock or Clock())
    await mgr.add(addon)
    return mgr, addon


def _flow(identity: Identity | None = ALICE, headers=(("Authorization", "Basic Y2xpZW50OnB3"),),
          upstream: Target | None = OFFICIAL, token: str | None = None) -> Flow:
    f = Flow(Request("POST", "/jmap/", CIMultiDict(headers), body=b"{}"), id="r1", upstream=upstream)
    f.identity = identity
    f.client_token = token
    return f


async def _auth_headers(mgr: AddonManager, flow: Flow) -> list[tuple[str, str]]:
    await mgr.run("request", flow)
    return [(k, v) for k, v in flow.request.headers.items() if k.lower() in ("authorization", "authorize-as")]


def _jwt_parts(token: str) -> tuple[bytes, bytes]:
    h, p, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return base64.urlsafe_b64decode(pad(h)), base64.urlsafe_b64decode(pad(p))


# ---------------------------------------------------------------------------- each mode
async def test_impersonate(tmp_path):
    mgr, _ = await _addon({"mode": "impersonate", "impersonator": "sge-proxy", "secret": "s3cret"}, tmp_path)
    assert await _auth_headers(mgr, _flow()) == [
        ("Authorization", "Basic " + _b64("alice@example.com%sge-proxy:s3cret"))]


async def test_authorize_as_with_secret_file(tmp_path):
    (tmp_path / "admin.pw").write_text("adminpw\n")
    mgr, _ = await _addon({"mode": "authorize-as", "admin_user": "admin", "secret_file": "admin.pw"}, tmp_path)
    headers = await _auth_headers(mgr, _flow(headers=[("Authorization", "Bearer x"), ("Authorize-As", "root"),
                                                      ("authorization", "Basic dup")]))
    assert headers == [("Authorization", "Basic " + _b64("admin:adminpw")),
                       ("Authorize-As", "alice@example.com")]


async def test_jwt_exact_format_and_cache(tmp_path):
    clock = Clock()
    mgr, addon = await _addon({"mode": "jwt", "key_file": "jwt.key"}, tmp_path, clock)
    [(name, value)] = await _auth_headers(mgr, _flow())
    assert name == "Authorization" and value.startswith("Bearer ")
    token = value[7:]
    header, payload = _jwt_parts(token)
    assert header == b'{"alg":"HS256","typ":"JWT"}'
    # iat one second before the proxy's clock: Cyrus refuses an iat ahead of its own (cached) clock
    assert payload == b'{"sub":"alice@example.com","iat":1699999999}'
    claims = pyjwt.decode(token, JWT_KEY, algorithms=["HS256"], options={"verify_iat": False})
    assert claims == {"sub": "alice@example.com", "iat": 1699999999}
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(token, b"k" * 32, algorithms=["HS256"])

    clock.t = NOW + 59  # reused within jwt_reuse (60 s of Cyrus's 300 s max age)
    assert addon.credentials(_flow()) == [("Authorization", value)]
    clock.t = NOW + 60
    [(_, fresh)] = addon.credentials(_flow())
    assert fresh != value and json.loads(_jwt_parts(fresh[7:])[1])["iat"] == 1700000059
    bob = Identity(subject="u-2", email="bob@example.com")
    [(_, bobs)] = addon.credentials(_flow(identity=bob))
    assert json.loads(_jwt_parts(bobs[7:])[1]) == {"sub": "bob@example.com", "iat": 1700000059}
    clock.t = NOW - 10  # clock stepped back: never reuse a token from the future
    [(_, back)] = addon.credentials(_flow())
    assert json.loads(_jwt_parts(back[7:])[1])["iat"] == 1699999989


async def test_jwt_sub_falls_back_to_the_subject_without_email(tmp_path):
    mgr, addon = await _addon({"mode": "jwt", "key_file": "jwt.key"}, tmp_path)
    [(_, v)] = addon.credentials(_flow(identity=Identity(subject="only-subject")))
    assert json.loads(_jwt_parts(v[7:])[1])["sub"] == "only-subject"


async def test_bearer_forwards_the_client_token(tmp_path):
    mgr, _ = await _addon({"mode": "bearer"}, tmp_path)
    f = _flow(headers=[("Authorization", "Bearer client.jwt.token")], token="client.jwt.token")
    assert await _auth_headers(mgr, f) == [("Authorization", "Bearer client.jwt.token")]
    with pytest.raises(Unauthorized):
        await mgr.run("request", _flow(token=None))


async def test_none_removes_credentials(tmp_path):
    mgr, addon = await _addon({"mode": "none"}, tmp_path)
    assert await _auth_headers(mgr, _flow(headers=[("Authorization", "Basic x"), ("Authorize-As", "bob")])) == []
    assert await _auth_headers(mgr, _flow(identity=None)) == []  # anonymous is fine: nothing to pass
    assert addon.credentials(_flow()) == []


async def test_passthrough_leaves_the_request_alone(tmp_path):
    mgr, addon = await _addon({"mode": "passthrough"}, tmp_path)
    f = _flow(identity=None, headers=[("Authorization", "Basic Y2xpZW50OnB3"), ("Authorize-As", "bob")])
    assert await _auth_headers(mgr, f) == [("Authorization", "Basic Y2xpZW50OnB3"), ("Authorize-As", "bob")]
    assert addon.credentials(f) == [("Authorization", "Basic Y2xpZW50OnB3")]


async def test_default_mode_is_bearer(tmp_path):
    _, addon = await _addon({}, tmp_path)
    assert addon.credentials(_flow(token="t")) == [("Authorization", "Bearer t")]


# ---------------------------------------------------------------------------- safety
@pytest.mark.parametrize("section", [
    {"mode": "impersonate", "impersonator": "p", "secret": "s"},
    {"mode": "authorize-as", "admin_user": "admin", "secret": "s"},
    {"mode": "jwt", "key_file": "jwt.key"},
    {"mode": "bearer"},
])
async def test_missing_identity_fails_closed(section, tmp_path):
    mgr, addon = await _addon(section, tmp_path)
    f = _flow(identity=None, token="t")
    with pytest.raises(Unauthorized) as ei:
        await mgr.run("request", f)
    assert ei.value.status == 401
    with pytest.raises(Unauthorized):
        addon.credentials(f)


@pytest.mark.parametrize("mode_section", [
    {"mode": "impersonate", "impersonator": "p", "secret": "s"},
    {"mode": "authorize-as", "admin_user": "admin", "secret": "s"},
    {"mode": "jwt", "key_file": "jwt.key"},
    {"mode": "bearer"},
    {"mode": "none"},
])
async def test_every_request_gets_explicit_credentials(mode_section, tmp_path):
    """A pooled upstream connection may still carry an earlier login (Cyrus): each request must
    carry its own credentials, whatever the client sent or did not send."""
    mgr, addon = await _addon(mode_section, tmp_path)
    users = [ALICE, Identity(subject="u-2", email="bob@example.com")]
    for ident in users:
        f = _flow(identity=ident, headers=[("Authorization", "Basic c3RvbGVuOnB3")], token="tok")
        await mgr.run("request", f)
        assert f.request.headers.getall("Authorization", []) == [
            v for k, v in addon.credentials(f) if k == "Authorization"]
        assert "c3RvbGVuOnB3" not in str(f.request.headers)
    bare = _flow(identity=users[1], headers=(), token="tok")  # the client sent no Authorization
    await mgr.run("request", bare)
    if mode_section["mode"] != "none":
        assert len(bare.request.headers.getall("Authorization")) == 1


@pytest.mark.parametrize("mode_section,login", [
    ({"mode": "impersonate", "impersonator": "p", "secret": "s"}, "ali:ce@example.com"),
    ({"mode": "impersonate", "impersonator": "p", "secret": "s"}, "alice%admin@example.com"),
    ({"mode": "authorize-as", "admin_user": "admin", "secret": "s"}, "alice@example.com\r\nX-Evil: 1"),
    ({"mode": "authorize-as", "admin_user": "admin", "secret": "s"}, "jürgen@example.com"),
    ({"mode": "jwt", "key_file": "jwt.key"}, "alice\n@example.com"),
])
async def test_unrepresentable_logins_are_refused(mode_section, login, tmp_path):
    mgr, _ = await _addon(mode_section, tmp_path)
    with pytest.raises(Forbidden):
        await mgr.run("request", _flow(identity=Identity(subject="u", email=login)))


async def test_per_target_override(tmp_path):
    (tmp_path / "tenant.pw").write_text("tenantpw")
    section = {
        "mode": "impersonate", "impersonator": "sge-proxy", "secret": "globalpw",
        "targets": {
            "official": {"mode": "jwt", "key_file": "jwt.key"},
            "tenant-acme": {"secret_file": "tenant.pw"},  # same mode, own secret
        },
    }
    mgr, addon = await _addon(section, tmp_path)
    [(_, official)] = await _auth_headers(mgr, _flow(upstream=OFFICIAL))
    assert official.startswith("Bearer ey")
    assert await _auth_headers(mgr, _flow(upstream=TENANT)) == [
        ("Authorization", "Basic " + _b64("alice@example.com%sge-proxy:tenantpw"))]
    other = Target("https", "eu.mail.example", 443, "", "region-eu")
    assert await _auth_headers(mgr, _flow(upstream=other)) == [
        ("Authorization", "Basic " + _b64("alice@example.com%sge-proxy:globalpw"))]
    assert addon.plan(_flow(upstream=None)).mode == "impersonate"


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("section,key", [
    ({"mode": "impersonate", "secret": "s"}, "addons.upstream_identity.impersonator"),
    ({"mode": "impersonate", "impersonator": "a:b", "secret": "s"}, "addons.upstream_identity.impersonator"),
    ({"mode": "impersonate", "impersonator": "p"}, "addons.upstream_identity.secret"),
    ({"mode": "authorize-as", "secret": "s"}, "addons.upstream_identity.admin_user"),
    ({"mode": "authorize-as", "admin_user": "a", "secret": "s", "secret_file": "f"},
     "addons.upstream_identity.secret"),
    ({"mode": "jwt"}, "addons.upstream_identity.key_file"),
    ({"mode": "sudo"}, "addons.upstream_identity.mode"),
    ({"jwt_reuse": "5m"}, "addons.upstream_identity.jwt_reuse"),
    ({"mode": "none", "targets": {"official": {"mode": "authorize-as"}}},
     "addons.upstream_identity.targets.official.admin_user"),
    ({"targets": {"official": {"mode": "jwt", "key": "x"}}}, "addons.upstream_identity.targets.official.key"),
    ({"mode": "jwt", "key_file": "short.key"}, "addons.upstream_identity.key_file"),
    ({"mode": "jwt", "key_file": "nope.key"}, "addons.upstream_identity.key_file"),
    ({"mode": "authorize-as", "admin_user": "a", "secret_file": "empty.pw"},
     "addons.upstream_identity.secret_file"),
    ({"mode": "none", "targets": {"t": {"mode": "jwt", "key_file": "short.key"}}},
     "addons.upstream_identity.targets.t.key_file"),
])
async def test_config_errors_name_the_key(section, key, tmp_path):
    (tmp_path / "short.key").write_bytes(b"k" * 16)
    (tmp_path / "empty.pw").write_text("\n")
    with pytest.raises(ConfigError) as ei:
        await _addon(section, tmp_path)
    assert ei.value.key == key


async def test_secrets_never_in_repr(tmp_path):
    _, addon = await _addon({"mode": "authorize-as", "admin_user": "admin", "secret": "s3cret"}, tmp_path)
    assert "s3cret" not in repr(addon.plan(_flow()))


def _raw_flow(headers: list[tuple[str, str]], identity: Identity | None = ALICE) -> Flow:
    """A request as the engine builds it: the parser's bytes, no Connection header."""
    req = Request("POST", "/jmap/", raw=[(n.lower().encode(), n.encode(), v.encode()) for n, v in headers],
                  body=b"{}", peer="127.0.0.1")
    req.raw_connection = False
    f = Flow(req, id="r1", upstream=OFFICIAL)
    f.identity = identity
    f.client_token = "client.jwt.token"
    return f


@pytest.mark.parametrize("section, expected", [
    ({"mode": "impersonate", "impersonator": "sge-proxy", "secret": "s3cret"},
     [("Authorization", "Basic " + _b64("alice@example.com%sge-proxy:s3cret"))]),
    ({"mode": "authorize-as", "admin_user": "admin", "secret": "adminpw"},
     [("Authorization", "Basic " + _b64("admin:adminpw")), ("Authorize-As", "alice@example.com")]),
    ({"mode": "bearer"}, [("Authorization", "Bearer client.jwt.token")]),
    ({"mode": "none"}, []),
])
async def test_credentials_on_parser_bytes_leave_the_headers_unbuilt(section, expected, tmp_path):
    mgr, _ = await _addon(section, tmp_path)
    f = _raw_flow([("Authorization", "Basic c3RvbGVuOnB3"), ("Authorize-As", "root"), ("Accept", "*/*")])
    await mgr.run("request", f)
    assert not f.request.headers_read
    want = dict(expected)
    assert (f.request.header("Authorization"), f.request.header("Authorize-As")) == (
        want.get("Authorization"), want.get("Authorize-As"))
    assert await _auth_headers(mgr, f) == expected  # the view the engine forwards
