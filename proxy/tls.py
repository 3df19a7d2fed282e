"""TLS contexts for both legs, and what the proxy knows about its client certificate.

The upstream context is built once per certificate generation; connections made with an older
context drain from the pool (see upstream.py). Sans-IO helpers (`next_refresh`, `cert_info`) sit
beside the context builders.
"""
from __future__ import annotations

import datetime as dt
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import ConfigError

__all__ = ["CertInfo", "cert_info", "client_context", "server_context", "ClientTLS", "next_refresh"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class CertInfo:
    subject: str
    issuer: str
    not_before: float
    not_after: float
    client_auth: bool

    def expired(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return not (self.not_before <= now < self.not_after)


def cert_info(pem: bytes) -> CertInfo:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
    except x509.ExtensionNotFound:
        client_auth = True  # no EKU: any usage
    return CertInfo(cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(),
                    cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(),
                    client_auth)


def next_refresh(not_before: float, not_after: float, now: float) -> float:
    """Seconds until a certificate should be renewed: when a third of its lifetime remains."""
    renew_at = not_after - (not_after - not_before) / 3
    return max(0.0, renew_at - now)


def client_context(*, cert: Path | None, key: Path | None, ca: Path | None,
                   min_version: str = "1.3", verify_hostname: bool = True) -> ssl.SSLContext:
    """The upstream (mTLS client) context. Raises ConfigError naming the stalwart.* key."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("stalwart.ca_cert", f"cannot load CA bundle {ca}: {e}") from None
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except FileNotFoundError as e:
            raise ConfigError("stalwart.client_cert", f"file not found: {e.filename}") from None
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("stalwart.client_cert",
                              f"cannot load client certificate {cert} with key {key}: {e}") from None
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.check_hostname = verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def server_context(*, cert: Path, key: Path, min_version: str = "1.2", http2: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as e:
        raise ConfigError("tls.cert", f"file not found: {e.filename}") from None
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("tls.cert", f"cannot load server certificate {cert} with key {key}: {e}") from None
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    return ctx


class ClientTLS:
    """The current upstream client context and its certificate. `generation` increments on each
    swap so the pool can tell old connections from new ones."""

    def __init__(self, ctx: ssl.SSLContext | None, info: CertInfo | None) -> None:
        self.ctx = ctx
        self.info = info
        self.generation = 0

    @classmethod
    def from_files(cls, *, cert: Path | None, key: Path | None, ca: Path | None,
                   min_version: str = "1.3", verify_hostname: bool = True) -> "ClientTLS":
        ctx = client_context(cert=cert, key=key, ca=ca, min_version=min_version,
                             verify_hostname=verify_hostname)
        info = None
        if cert is not None:
            info = cert_info(cert.read_bytes())
            if info.expired():
                when = dt.datetime.fromtimestamp(info.not_after, dt.timezone.utc).isoformat()
                raise ConfigError("stalwart.client_cert", f"certificate {cert} is not valid now (notAfter {when})")
        return cls(ctx, info)

    def swap(self, ctx: ssl.SSLContext, info: CertInfo | None) -> None:
        self.ctx, self.info = ctx, info
        self.generation += 1

    def usable(self, now: float | None = None) -> bool:
        """A client certificate is loaded and valid now (readiness)."""
        return self.info is not None and not self.info.expired(now)
