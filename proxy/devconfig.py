"""The embedded development default (`sge-mail-proxy run --dev`): the full default chain in front
of the local JMAP stack (tests/e2e/stack), with certs-dev's certificates and dev-only secrets made
on first use in certs-dev/ (git-ignored). Never for production."""
from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import jwt

from .config import PACKAGE_ROOT

__all__ = ["dev_base", "dev_token", "print_welcome", "dev_token_main", "DEV_ISSUER", "DEV_AUDIENCE"]

CERTS = PACKAGE_ROOT / "certs-dev"
DEV_ISSUER = "sge-dev-idp"
DEV_AUDIENCE = "sge-mail-proxy"
STACK_URL = os.environ.get("SGE_DEV_UPSTREAM", "https://127.0.0.1:18443")
STACK_IMAP = os.environ.get("SGE_DEV_IMAP_UPSTREAM", "127.0.0.1:18143")  # the stack's imapd, in clear
DEV_IMAP_LISTEN = "127.0.0.1:1143"


def _secret_file(name: str) -> Path:
    """A random 32-byte dev secret, base64, made once (mode 0600)."""
    p = CERTS / name
    if not p.exists():
        CERTS.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    return p


def _jwt_secret() -> bytes:
    """The HS256 secret is the file's text (its bytes, as auth reads `secret`)."""
    return _secret_file("dev-jwt.key").read_text().strip().encode()


def dev_base() -> dict[str, Any]:
    """The embedded default: the config mapping below any --config file, env and flags."""
    _jwt_secret()
    signing = _secret_file("dev-signing.key").read_text().strip()
    return {
        "listen": "127.0.0.1:8080",
        "admin_listen": "127.0.0.1:9901",
        "stalwart": {
            "url": STACK_URL,
            "client_cert": str(CERTS / "client.crt"),
            "client_key": str(CERTS / "client.key"),
            "ca_cert": str(CERTS / "ca.crt"),
            # Cyrus has no /healthz/ready: an unauthenticated /jmap/ answering 401 means it is up
            "health_path": "/jmap/",
            "health_status": 401,
        },
        "addons": {
            "auth": {"jwt": {"issuer": [DEV_ISSUER], "audience": [DEV_AUDIENCE],
                             "keys": [{"kid": "dev", "alg": "HS256",
                                       "secret": _jwt_secret().decode()}]}},
            "upstream_identity": {"mode": "authorize-as",
                                  "admin_user": os.environ.get("CYRUS_ADMIN", "admin"),
                                  "secret": os.environ.get("CYRUS_ADMINPW", "adminpw")},
            "header_signer": {"key_id": "dev", "keys": {"dev": signing}},
        },
        # IMAP with the same token (STARTTLS, certs-dev's server certificate), relayed to the
        # stack's Cyrus imapd on the loopback (docs/mail.md)
        "mail": {"imap": {"listen": DEV_IMAP_LISTEN, "upstream_tls": "none",
                          "upstreams": {"official": STACK_IMAP}}},
    }


def dev_token(email: str, *, ttl: float = 12 * 3600, roles: list[str] | None = None) -> str:
    now = int(time.time())
    claims = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": email, "email": email, "iat": now,
              "nbf": now, "exp": now + int(ttl), "roles": roles or ["user"],
              "sid": secrets.token_hex(8)}
    return jwt.encode(claims, _jwt_secret(), algorithm="HS256", headers={"kid": "dev"})


def print_welcome(engine: Any, admin: Any) -> None:
    token = dev_token("alice@example.com")
    base = engine.config.public_base()
    out = sys.stderr
    imap = ""
    if "imap" in getattr(engine, "mail_servers", {}):
        port = engine.mail_servers["imap"].port
        imap = (f"\nIMAP, the same token as the password (STARTTLS; the chain decides the login):\n\n"
                f"  curl -s --ssl-reqd --cacert {CERTS / 'ca.crt'} -u \"alice@example.com:$TOKEN\" \\\n"
                f"    imap://127.0.0.1:{port}/ -X 'STATUS INBOX (MESSAGES UNSEEN)'\n")
    print(f"""
sge-mail-proxy (development default) is up: {base} -> {engine.default_target}
  admin: http://{engine.config.admin_addr[0]}:{admin.port}/metrics  /readyz  /upstreams

A dev token for alice@example.com (12 h; more with `sge-mail-proxy dev-token bob@example.com`):

  TOKEN={token}

Try (from another terminal):

  curl -sL -H "Authorization: Bearer $TOKEN" {base}/.well-known/jmap
  curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' {base}/jmap/ \\
    -d '{{"using":["urn:ietf:params:jmap:core","urn:ietf:params:jmap:mail"],
         "methodCalls":[["Mailbox/get",{{"accountId":"alice@example.com"}},"0"]]}}'
{imap}""", file=out, flush=True)


def dev_token_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sge-mail-proxy dev-token",
                                description="Print a JWT the --dev proxy accepts (dev key in certs-dev/).")
    p.add_argument("email", nargs="?", default="alice@example.com")
    p.add_argument("--ttl", type=float, default=12 * 3600, help="seconds")
    p.add_argument("--role", action="append", default=None)
    ns = p.parse_args(argv)
    print(dev_token(ns.email, ttl=ns.ttl, roles=ns.role))
    return 0
