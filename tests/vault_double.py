"""A Vault double for tests: a small aiohttp server speaking the parts of Vault's HTTP API the
proxy uses, with Vault's envelopes (https://developer.hashicorp.com/vault/api-docs):

  KV v2   GET/POST/PUT /v1/<mount>/data/<path>, GET/LIST /v1/<mount>/metadata/<path>,
          DELETE /v1/<mount>/metadata/<path>
  KV v1   GET/POST/PUT/DELETE/LIST /v1/<mount>/<path>
  PKI     POST/PUT /v1/<mount>/issue/<role>  (really issued with `cryptography` from the CA given)
  tokens  GET /v1/auth/token/lookup-self, POST /v1/auth/token/renew-self
  login   POST /v1/auth/approle/login, POST /v1/auth/kubernetes/login
  health  GET/HEAD /v1/sys/health

LIST is spelled `GET ?list=true` (Vault accepts both; aiohttp's HTTP parser refuses the LIST verb,
so hvac clients talk to the double with `strict_http=True`). Every request but logins and health needs a live `X-Vault-Token` (403 permission denied otherwise);
`sealed = True` makes every endpoint answer 503; a missing path is 404 `{"errors": []}`. State
(secrets, tokens, counters) lives on the object, so `stop()` then `start()` on the same port
resumes where it was. Binds 127.0.0.1.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["VaultDouble", "Token"]

_DURATION = re.compile(r"^(\d+)(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _seconds(v: Any) -> int:
    if isinstance(v, (int, float)):
        return int(v)
    m = _DURATION.match(str(v).strip())
    if not m:
        raise ValueError(v)
    return int(m.group(1)) * _UNITS[m.group(2)]


def _json(obj: Any, status: int = 200) -> web.Response:
    """Vault's Content-Type is exactly `application/json` (hvac only parses errors when it is)."""
    return web.Response(body=json.dumps(obj).encode(), status=status, content_type="application/json")


def _rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Token:
    id: str
    ttl: int                 # seconds; 0 = never expires (root)
    renewable: bool
    policies: list[str]
    max_ttl: int = 0         # 0 = no ceiling
    path: str = "auth/token/create"
    meta: dict[str, str] | None = None
    created: float = field(default_factory=time.time)
    expires: float = 0.0
    accessor: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        self.expires = self.created + self.ttl if self.ttl else 0.0

    def alive(self, now: float) -> bool:
        return not self.expires or now < self.expires

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires - now)) if self.expires else 0


@dataclass
class _Version:
    data: dict[str, Any]
    created: float
    deleted: float = 0.0


@dataclass
class _Role:
    ttl: int = 3600
    max_ttl: int = 86400
    client_flag: bool = True
    server_flag: bool = False
    not_before_duration: int = 30  # Vault backdates notBefore by this much (role default 30s)


class VaultDouble:
    """`mounts` maps a mount to its engine: "kv-v2", "kv-v1" or "pki"."""

    def __init__(self, *, mounts: dict[str, str] | None = None, root_token: str = "root",
                 ca_cert: x509.Certificate | None = None, ca_key: Any = None) -> None:
        self.mounts = mounts or {"secret": "kv-v2", "kv": "kv-v1", "pki": "pki"}
        self.sealed = False
        self.tokens: dict[str, Token] = {root_token: Token(root_token, 0, False, ["root"], path="auth/token/root")}
        self.kv2: dict[str, dict[str, list[_Version]]] = {m: {} for m, e in self.mounts.items() if e == "kv-v2"}
        self.kv1: dict[str, dict[str, dict[str, Any]]] = {m: {} for m, e in self.mounts.items() if e == "kv-v1"}
        self.approles: dict[str, tuple[str, str, int]] = {}  # role_id -> (secret_id, role name, token ttl)
        self.k8s_roles: dict[str, tuple[str, int]] = {}     # role -> (accepted jwt, token ttl)
        self.pki_roles: dict[str, _Role] = {}
        self.ca_cert, self.ca_key = ca_cert, ca_key
        self.requests: list[tuple[str, str]] = []           # (method, path) seen, for assertions
        self.port = 0
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ set-up helpers (not HTTP)
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def put_kv2(self, mount: str, path: str, data: dict[str, Any]) -> int:
        versions = self.kv2[mount].setdefault(path.strip("/"), [])
        versions.append(_Version(dict(data), time.time()))
        return len(versions)

    def put_kv1(self, mount: str, path: str, data: dict[str, Any]) -> None:
        self.kv1[mount][path.strip("/")] = dict(data)

    def add_token(self, ttl: int, *, renewable: bool = True, max_ttl: int = 0,
                  policies: list[str] | None = None) -> str:
        tid = "hvs." + secrets.token_urlsafe(18)
        self.tokens[tid] = Token(tid, ttl, renewable, policies or ["default"], max_ttl)
        return tid

    def add_approle(self, role_id: str, secret_id: str, *, name: str = "sge-mail-proxy", ttl: int = 3600) -> None:
        self.approles[role_id] = (secret_id, name, ttl)

    def add_kubernetes_role(self, role: str, jwt: str, *, ttl: int = 3600) -> None:
        self.k8s_roles[role] = (jwt, ttl)

    def add_pki_role(self, name: str, *, ttl: int = 3600, max_ttl: int = 86400, client_flag: bool = True,
                     server_flag: bool = False, not_before_duration: int = 30) -> None:
        self.pki_roles[name] = _Role(ttl, max_ttl, client_flag, server_flag, not_before_duration)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, port: int | None = None) -> int:
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port if port is None else port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ envelopes
    @staticmethod
    def _errors(status: int, *errors: str) -> web.Response:
        return _json({"errors": list(errors)}, status=status)

    @staticmethod
    def _ok(data: Any = None, *, auth: Any = None, lease_duration: int = 0, renewable: bool = False,
            warnings: list[str] | None = None) -> web.Response:
        return _json({"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": renewable,
                                  "lease_duration": lease_duration, "data": data, "wrap_info": None,
                                  "warnings": warnings, "auth": auth, "mount_type": ""})

    def _auth(self, tok: Token, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        return {"client_token": tok.id, "accessor": tok.accessor, "policies": tok.policies,
                "token_policies": tok.policies, "metadata": metadata or tok.meta, "lease_duration": tok.ttl,
                "renewable": tok.renewable, "entity_id": "", "token_type": "service", "orphan": True,
                "mfa_requirement": None, "num_uses": 0}

    # ------------------------------------------------------------------ dispatch
    async def _dispatch(self, r: web.Request) -> web.StreamResponse:
        path = r.match_info["tail"].strip("/")
        method = r.method.upper()
        if method == "GET" and r.query.get("list") == "true":
            method = "LIST"
        self.requests.append((method, path))
        if path == "sys/health":
            return self._health()
        if self.sealed:
            return self._errors(503, "Vault is sealed")
        body: dict[str, Any] = {}
        if method in ("POST", "PUT"):
            raw = await r.read()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self._errors(400, "failed to parse JSON input")
                if not isinstance(body, dict):
                    return self._errors(400, "failed to parse JSON input")
        if path == "auth/approle/login" and method in ("POST", "PUT"):
            return self._approle_login(body)
        if path == "auth/kubernetes/login" and method in ("POST", "PUT"):
            return self._k8s_login(body)
        now = time.time()
        tok = self.tokens.get(r.headers.get("X-Vault-Token", ""))
        if tok is None or not tok.alive(now):
            return self._errors(403, "permission denied")
        if path == "auth/token/lookup-self" and method == "GET":
            return self._lookup_self(tok, now)
        if path == "auth/token/renew-self" and method in ("POST", "PUT"):
            return self._renew_self(tok, body, now)
        mount, _, rest = path.partition("/")
        engine = self.mounts.get(mount)
        if engine == "kv-v2":
            return self._kv2(mount, method, rest, body, r)
        if engine == "kv-v1":
            return self._kv1(mount, method, rest, body)
        if engine == "pki":
            kind, _, role = rest.partition("/")
            if kind == "issue" and role and method in ("POST", "PUT"):
                return self._pki_issue(role, body)
        return self._errors(404, "1 error occurred:\n\t* unsupported path\n\n")

    def _health(self) -> web.Response:
        now = int(time.time())
        return _json({"initialized": True, "sealed": self.sealed, "standby": False,
                                  "performance_standby": False, "replication_performance_mode": "disabled",
                                  "replication_dr_mode": "disabled", "server_time_utc": now,
                                  "version": "1.15.0", "cluster_name": "vault-double",
                                  "cluster_id": "00000000-0000-0000-0000-000000000000"},
                                 status=503 if self.sealed else 200)

    # ------------------------------------------------------------------ auth
    def _login(self, ttl: int, path: str, meta: dict[str, str]) -> web.Response:
        tid = "hvs." + secrets.token_urlsafe(18)
        tok = Token(tid, ttl, True, ["default", "sge-mail-proxy"], path=path, meta=meta)
        self.tokens[tid] = tok
        return self._ok(None, auth=self._auth(tok, meta))

    def _approle_login(self, body: dict[str, Any]) -> web.Response:
        role = self.approles.get(str(body.get("role_id", "")))
        if role is None:
            return self._errors(400, "invalid role ID")
        secret_id, name, ttl = role
        if body.get("secret_id") != secret_id:
            return self._errors(400, "invalid secret id")
        return self._login(ttl, "auth/approle/login", {"role_name": name})

    def _k8s_login(self, body: dict[str, Any]) -> web.Response:
        if not body.get("role"):
            return self._errors(400, "missing role")
        if not body.get("jwt"):
            return self._errors(400, "missing jwt")
        role = self.k8s_roles.get(body["role"])
        if role is None:
            return self._errors(400, f"invalid role name \"{body['role']}\"")
        jwt, ttl = role
        if body["jwt"] != jwt:
            return self._errors(403, "permission denied")
        return self._login(ttl, "auth/kubernetes/login", {"role": body["role"]})

    def _lookup_self(self, tok: Token, now: float) -> web.Response:
        return self._ok({"accessor": tok.accessor, "creation_time": int(tok.created),
                         "creation_ttl": tok.ttl, "display_name": "token", "entity_id": "",
                         "expire_time": _rfc3339(tok.expires) if tok.expires else None,
                         "explicit_max_ttl": tok.max_ttl, "id": tok.id,
                         "issue_time": _rfc3339(tok.created), "meta": tok.meta, "num_uses": 0,
                         "orphan": True, "path": tok.path, "policies": tok.policies,
                         "renewable": tok.renewable, "ttl": tok.remaining(now), "type": "service"})

    def _renew_self(self, tok: Token, body: dict[str, Any], now: float) -> web.Response:
        if not tok.renewable or not tok.expires:
            return self._errors(400, "lease is not renewable")
        try:
            inc = _seconds(body["increment"]) if body.get("increment") else tok.ttl
        except ValueError:
            return self._errors(400, "invalid increment")
        new_exp = now + inc
        warnings = None
        if tok.max_ttl and new_exp > tok.created + tok.max_ttl:
            new_exp = tok.created + tok.max_ttl
            warnings = ["TTL of \"%ds\" exceeded the effective max_ttl; TTL value is capped accordingly" % inc]
        tok.expires = new_exp
        auth = self._auth(tok)
        auth["lease_duration"] = int(new_exp - now)
        return self._ok(None, auth=auth, warnings=warnings)

    # ------------------------------------------------------------------ KV v2
    def _kv2(self, mount: str, method: str, rest: str, body: dict[str, Any], r: web.Request) -> web.Response:
        kind, _, path = rest.partition("/")
        store = self.kv2[mount]
        if kind == "data" and path:
            if method == "GET":
                versions = store.get(path)
                if not versions:
                    return self._errors(404)
                want = r.query.get("version")
                n = int(want) if want and want != "0" else len(versions)
                if not 1 <= n <= len(versions):
                    return self._errors(404)
                v = versions[n - 1]
                meta = {"created_time": _rfc3339(v.created), "custom_metadata": None,
                        "deletion_time": _rfc3339(v.deleted) if v.deleted else "", "destroyed": False,
                        "version": n}
                if v.deleted:  # Vault answers 404 with the metadata and null data
                    return _json({"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False,
                                              "lease_duration": 0, "data": {"data": None, "metadata": meta},
                                              "wrap_info": None, "warnings": None, "auth": None}, status=404)
                return self._ok({"data": dict(v.data), "metadata": meta})
            if method in ("POST", "PUT"):
                data = body.get("data")
                if not isinstance(data, dict):
                    return self._errors(400, "no data provided")
                cas = (body.get("options") or {}).get("cas")
                current = len(store.get(path, []))
                if cas is not None and int(cas) != current:
                    return self._errors(400, "check-and-set parameter did not match the current version")
                n = self.put_kv2(mount, path, data)
                v = store[path][n - 1]
                return self._ok({"created_time": _rfc3339(v.created), "custom_metadata": None,
                                 "deletion_time": "", "destroyed": False, "version": n})
            if method == "DELETE":
                versions = store.get(path)
                if versions:
                    versions[-1].deleted = time.time()
                return web.Response(status=204)
        if kind == "metadata":
            if method == "LIST":
                prefix = f"{path}/" if path else ""
                keys = sorted({k[len(prefix):].split("/")[0] + ("/" if "/" in k[len(prefix):] else "")
                               for k in store if k.startswith(prefix)})
                return self._ok({"keys": keys}) if keys else self._errors(404)
            if method == "GET" and path:
                versions = store.get(path)
                if not versions:
                    return self._errors(404)
                return self._ok({
                    "cas_required": False, "created_time": _rfc3339(versions[0].created),
                    "current_version": len(versions), "custom_metadata": None, "delete_version_after": "0s",
                    "max_versions": 0, "oldest_version": 1 if versions else 0,
                    "updated_time": _rfc3339(versions[-1].created),
                    "versions": {str(i + 1): {"created_time": _rfc3339(v.created),
                                              "deletion_time": _rfc3339(v.deleted) if v.deleted else "",
                                              "destroyed": False} for i, v in enumerate(versions)}})
            if method == "DELETE" and path:
                store.pop(path, None)
                return web.Response(status=204)
        return self._errors(405, "1 error occurred:\n\t* unsupported operation\n\n")

    # ------------------------------------------------------------------ KV v1
    def _kv1(self, mount: str, method: str, path: str, body: dict[str, Any]) -> web.Response:
        store = self.kv1[mount]
        if method == "LIST":
            prefix = f"{path}/" if path else ""
            keys = sorted({k[len(prefix):].split("/")[0] + ("/" if "/" in k[len(prefix):] else "")
                           for k in store if k.startswith(prefix)})
            return self._ok({"keys": keys}) if keys else self._errors(404)
        if not path:
            return self._errors(405, "1 error occurred:\n\t* unsupported operation\n\n")
        if method == "GET":
            if path not in store:
                return self._errors(404)
            return self._ok(dict(store[path]), lease_duration=2764800)
        if method in ("POST", "PUT"):
            store[path] = dict(body)
            return web.Response(status=204)
        if method == "DELETE":
            store.pop(path, None)
            return web.Response(status=204)
        return self._errors(405, "1 error occurred:\n\t* unsupported operation\n\n")

    # ------------------------------------------------------------------ PKI
    def _pki_issue(self, role_name: str, body: dict[str, Any]) -> web.Response:
        role = self.pki_roles.get(role_name)
        if role is None:
            return self._errors(400, f"unknown role: {role_name}")
        if self.ca_cert is None or self.ca_key is None:
            return self._errors(400, "no default issuer currently configured")
        cn = body.get("common_name")
        if not cn:
            return self._errors(400, "the common_name field is required, or must be provided in a CSR with "
                                     "\"use_csr_common_name\" set to true, unless \"require_cn\" is set to false")
        try:
            ttl = _seconds(body["ttl"]) if body.get("ttl") else role.ttl
        except ValueError:
            return self._errors(400, "invalid ttl")
        warnings = None
        if ttl > role.max_ttl:
            ttl = role.max_ttl
            warnings = ["TTL is greater than the role's max_ttl value; capping to max_ttl"]
        now = dt.datetime.now(dt.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        ekus = ([ExtendedKeyUsageOID.CLIENT_AUTH] if role.client_flag else []) + \
               ([ExtendedKeyUsageOID.SERVER_AUTH] if role.server_flag else [])
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(cn))]))
                   .issuer_name(self.ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(seconds=role.not_before_duration)).not_valid_after(now + dt.timedelta(seconds=ttl))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=True, data_encipherment=False,
                                                key_agreement=True, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True))
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode().strip()  # noqa: E731
        ca_pem = pem(self.ca_cert)
        serial = f"{cert.serial_number:x}"
        serial = ":".join(serial.rjust(len(serial) + len(serial) % 2, "0")[i:i + 2]
                          for i in range(0, len(serial) + len(serial) % 2, 2))
        return self._ok({
            "certificate": pem(cert), "issuing_ca": ca_pem, "ca_chain": [ca_pem],
            "private_key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption()).decode().strip(),
            "private_key_type": "ec", "serial_number": serial,
            "expiration": int(cert.not_valid_after_utc.timestamp())}, warnings=warnings)
