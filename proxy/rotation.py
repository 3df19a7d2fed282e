"""Upstream client certificates that rotate without a restart.

A *certificate source* answers `poll(due)` with new material (PEM certificate chain, key, CA
bundle) or None when nothing changed:

  FileCertSource    the stalwart.client_cert/client_key/ca_cert files, watched by resolved real
                    path, inode, mtime and size, so Kubernetes' `..data` symlink swap is seen
  SecretCertSource  a KV path (`stalwart` keys client_cert, client_key, ca_cert) read through the
                    secret source
  PkiCertSource     a fresh certificate from Vault's PKI engine (`pki/issue/<role>`), asked for
                    when a third of the current certificate's lifetime remains

The `CertificateRotator` polls its source on a timer (sooner when renewal is due), validates what
it gets (`validate`: key matches, valid now, clientAuth usage, chains to the trusted CA), and only
then builds a new SSLContext and swaps it into ClientTLS: new upstream connections use it while
pooled connections made with the old one drain. A refused certificate leaves the old one in use,
counts `sge_proxy_client_cert_rotations_total{result="rejected"}` and raises
`sge_proxy_client_cert_rotation_failed` to 1 until the next good rotation.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from .errors import ConfigError
from .secrets import SecretError, SecretSource, file_signature
from .tls import CertInfo, ClientTLS, cert_info, client_context, next_refresh

if TYPE_CHECKING:
    from .metrics import Metrics
    from .vault import VaultSecretSource

__all__ = ["CertMaterial", "CertificateRejected", "validate", "build_context", "CertSource", "FileCertSource",
           "SecretCertSource", "PkiCertSource", "CertificateRotator"]

log = logging.getLogger(__name__)

_MAX_CHAIN = 6


@dataclass(frozen=True)
class CertMaterial:
    cert_pem: bytes          # the leaf first, then any intermediates
    key_pem: bytes
    ca_pem: bytes | None     # the bundle that verifies the upstream server; None keeps the configured one
    origin: str = ""
    issuer_pem: bytes | None = None  # the CA the source says issued it (trusted only on first use)

    def __repr__(self) -> str:  # never the key
        return f"CertMaterial(origin={self.origin!r})"


class CertificateRejected(Exception):
    """A candidate certificate that must not be used. str() is the reason."""


# ---------------------------------------------------------------------------------------------- pure
def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _valid_at(cert: x509.Certificate, now: float) -> bool:
    return cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp()


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def validate(material: CertMaterial, anchors: list[x509.Certificate], now: float) -> CertInfo:
    """Decide whether a certificate/key pair may be used as the upstream client certificate. Pure.

    The key must match the leaf, the leaf must be valid at `now` and allowed for clientAuth (an
    ExtendedKeyUsage naming clientAuth, or none at all, per RFC 5280), and it must chain, through
    the intermediates that came with it, to one of `anchors` with every signature checked.
    Raises CertificateRejected with the reason."""
    try:
        chain = x509.load_pem_x509_certificates(material.cert_pem)
    except ValueError:
        raise CertificateRejected("the certificate is not PEM") from None
    leaf, intermediates = chain[0], chain[1:]
    try:
        key = serialization.load_pem_private_key(material.key_pem, password=None)
    except (ValueError, TypeError):
        raise CertificateRejected("the private key is not an unencrypted PEM key") from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise CertificateRejected("the private key does not match the certificate")
    if now < leaf.not_valid_before_utc.timestamp():
        raise CertificateRejected(f"the certificate is not valid yet (notBefore {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ})")
    if now >= leaf.not_valid_after_utc.timestamp():
        raise CertificateRejected(f"the certificate has expired (notAfter {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    info = cert_info(leaf.public_bytes(serialization.Encoding.PEM))
    if not info.client_auth:
        raise CertificateRejected("the certificate's extended key usage does not allow clientAuth")
    if not anchors:
        raise CertificateRejected("no trusted CA to check the certificate against")
    current = leaf
    for _ in range(_MAX_CHAIN):
        if any(current.issuer == a.subject and _issued_by(current, a) and _valid_at(a, now) for a in anchors):
            return info
        nxt = next((c for c in intermediates if c.subject == current.issuer and _issued_by(current, c)), None)
        if nxt is None or not _valid_at(nxt, now):
            break
        current = nxt
    raise CertificateRejected(f"the certificate (issuer {leaf.issuer.rfc4514_string()}) does not chain to the trusted CA")


def parse_anchors(pem: bytes | None) -> list[x509.Certificate]:
    if not pem:
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


# ---------------------------------------------------------------------------------------------- context
def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def build_context(material: CertMaterial, *, server_ca: Path | None, min_version: str,
                  verify_hostname: bool) -> Any:
    """An upstream SSLContext for `material`. client_context() loads files, so the PEMs go to a
    private temporary directory (0700, files 0600) that is removed as soon as they are loaded."""
    d = Path(tempfile.mkdtemp(prefix="sge-cert-"))
    try:
        os.chmod(d, 0o700)
        cert, key = d / "client.crt", d / "client.key"
        _write_private(cert, material.cert_pem)
        _write_private(key, material.key_pem)
        ca = server_ca
        if material.ca_pem:
            ca = d / "ca.crt"
            _write_private(ca, material.ca_pem)
        return client_context(cert=cert, key=key, ca=ca, min_version=min_version, verify_hostname=verify_hostname)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- sources
class CertSource(Protocol):
    name: str

    async def poll(self, due: bool) -> CertMaterial | None:
        """New material, or None when nothing changed (or nothing is due)."""
        ...


class FileCertSource:
    """The three PEM files. A change of any of them (real path, inode, mtime or size) yields the
    new material once; writers should replace the files atomically (rename, or Kubernetes'
    `..data` swap) so that the certificate and key are never seen half-updated."""

    name = "files"

    def __init__(self, cert: Path, key: Path, ca: Path | None) -> None:
        self.cert, self.key, self.ca = cert, key, ca
        self._seen = self._signature()

    def _signature(self) -> tuple:
        return tuple(file_signature(p) if p is not None else None for p in (self.cert, self.key, self.ca))

    async def poll(self, due: bool) -> CertMaterial | None:
        sig = self._signature()
        if sig == self._seen:
            return None
        self._seen = sig
        try:
            # read through the resolved paths of this signature: one consistent generation
            cert = Path(sig[0][0]).read_bytes() if sig[0] else self.cert.read_bytes()
            key = Path(sig[1][0]).read_bytes() if sig[1] else self.key.read_bytes()
            ca = (Path(sig[2][0]).read_bytes() if sig[2] else self.ca.read_bytes()) if self.ca is not None else None
        except OSError as e:
            raise SecretError(f"cannot read the client certificate files: {e.strerror}: {e.filename}") from None
        return CertMaterial(cert, key, ca, origin=str(self.cert))


class SecretCertSource:
    """A KV path holding the PEMs under three keys (the seed's `secret/stalwart/client_cert`,
    `client_key`, `ca_cert`), read through the secret source (and so its cache)."""

    name = "vault-kv"

    def __init__(self, secrets: SecretSource, path: str, keys: tuple[str, ...] = ("client_cert", "client_key", "ca_cert")) -> None:
        self.secrets, self.path, self.keys = secrets, path.strip("/"), keys
        self._seen: tuple | None = None

    async def poll(self, due: bool) -> CertMaterial | None:
        data = await self.secrets.read(self.path)
        ck, kk, ak = self.keys
        try:
            cert, key = str(data[ck]).encode(), str(data[kk]).encode()
        except KeyError as e:
            raise SecretError(f"{self.path} has no key {e.args[0]!r}") from None
        ca = str(data[ak]).encode() if data.get(ak) else None
        if (cert, key, ca) == self._seen:
            return None
        self._seen = (cert, key, ca)
        return CertMaterial(cert, key, ca, origin=f"{self.secrets.name}:{self.path}", issuer_pem=ca)


class PkiCertSource:
    """A certificate issued by Vault's PKI engine, asked for at start and whenever renewal is due."""

    name = "vault-pki"

    def __init__(self, vault: "VaultSecretSource", *, role: str, common_name: str, ttl: float,
                 mount: str = "pki") -> None:
        self.vault, self.role, self.common_name, self.ttl, self.mount = vault, role, common_name, ttl, mount

    async def poll(self, due: bool) -> CertMaterial | None:
        if not due:
            return None
        data = await self.vault.issue_certificate(role=self.role, common_name=self.common_name, ttl=self.ttl,
                                                  mount=self.mount)
        chain = [data["certificate"].strip()]
        for pem in data.get("ca_chain") or []:  # intermediates travel with the leaf; roots stay out
            c = x509.load_pem_x509_certificate(pem.encode())
            if c.subject != c.issuer:
                chain.append(pem.strip())
        return CertMaterial(("\n".join(chain) + "\n").encode(), (data["private_key"].strip() + "\n").encode(), None,
                            origin=f"{self.mount}/issue/{self.role} serial {data.get('serial_number', '?')}",
                            issuer_pem=(data.get("issuing_ca") or "").encode() or None)


# ---------------------------------------------------------------------------------------------- rotator
class CertificateRotator:
    """Keeps ClientTLS current. A new certificate must chain to the CA bundle in `anchor_file`
    (re-read at each rotation, so the bundle can itself be rotated); without one, to the CA the
    source named with the first certificate it gave (pinned: a later certificate cannot bring its
    own CA along)."""

    def __init__(self, tls: ClientTLS, source: CertSource, *, anchor_file: Path | None,
                 server_ca: Path | None, min_version: str = "1.3", verify_hostname: bool = True,
                 interval: float = 30.0, metrics: "Metrics | None" = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.tls, self.source = tls, source
        self.audit: Any = None  # the engine's AuditLog (proxy.audit)
        self.anchor_file = anchor_file
        self._pinned: bytes | None = None
        self.server_ca = server_ca
        self.min_version, self.verify_hostname = min_version, verify_hostname
        self.interval = interval
        self._clock = clock
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._rotations = self._failed = self._expiry = None
        if metrics is not None:
            self._rotations = metrics.counter("sge_proxy_client_cert_rotations_total",
                                              "Client certificate rotation attempts by result.", ("result",))
            self._failed = metrics.gauge("sge_proxy_client_cert_rotation_failed",
                                         "1 while the last client certificate rotation failed (the previous "
                                         "certificate stays in use).")
            self._failed.set(0)
            self._expiry = metrics.cert_expiry

    def due(self, now: float | None = None) -> bool:
        info = self.tls.info
        if info is None:
            return True
        now = self._clock() if now is None else now
        return next_refresh(info.not_before, info.not_after, now) == 0.0

    def delay(self, now: float | None = None) -> float:
        """Seconds to the next poll: the interval, or sooner when renewal falls due before. Pure."""
        info = self.tls.info
        floor = min(self.interval, 1.0)
        if info is None:
            return floor
        now = self._clock() if now is None else now
        return max(min(self.interval, next_refresh(info.not_before, info.not_after, now)), floor)

    def _anchors(self, material: CertMaterial) -> bytes | None:
        if self.anchor_file is not None:
            try:
                return self.anchor_file.read_bytes()
            except OSError as e:
                raise CertificateRejected(f"cannot read the trusted CA bundle {self.anchor_file}: {e.strerror}") from None
        return self._pinned if self._pinned is not None else material.issuer_pem

    def _count(self, result: str) -> None:
        if self._rotations is not None:
            self._rotations.labels(result).inc()

    def _fail(self, result: str, reason: str) -> str:
        self.last_error = reason
        self._count(result)
        if self._failed is not None:
            self._failed.set(1)
        return result

    async def check(self, *, force: bool = False) -> str:
        """One poll. Returns "unchanged", "rotated", "rejected" or "error"."""
        async with self._lock:
            due = force or self.due()
            try:
                material = await self.source.poll(due)
            except (SecretError, OSError, KeyError, ValueError) as e:
                log.warning("client certificate source %s failed: %s", self.source.name, e)
                if due:  # the certificate needs renewing and cannot be: alert
                    return self._fail("error", f"{self.source.name}: {e}")
                self._count("error")
                return "error"
            if material is None:
                return "unchanged"
            now = self._clock()
            try:
                anchors = self._anchors(material)
                info = validate(material, parse_anchors(anchors), now)
                ctx = build_context(material, server_ca=self.server_ca, min_version=self.min_version,
                                    verify_hostname=self.verify_hostname)
            except (CertificateRejected, ConfigError, OSError) as e:
                reason = e.reason if isinstance(e, ConfigError) else str(e)
                log.error("refused the new client certificate from %s, keeping the current one: %s",
                          material.origin or self.source.name, reason)
                return self._fail("rejected", reason)
            self.tls.swap(ctx, info)
            if self.anchor_file is None:
                self._pinned = anchors
            self.last_error = None
            self._count("rotated")
            if self._failed is not None:
                self._failed.set(0)
            if self._expiry is not None:
                self._expiry.set(info.not_after)
            if self.audit is not None:
                self.audit.event("tls.client_certificate", source=material.origin or self.source.name,
                                 subject=info.subject, not_after=info.not_after, generation=self.tls.generation)
            log.info("client certificate rotated from %s: %s, valid until %s (generation %d)",
                     material.origin or self.source.name, info.subject,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.not_after)), self.tls.generation)
            return "rotated"

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.delay())
            try:
                await self.check()
            except Exception:  # never let the loop die: the current certificate stays in use
                log.exception("client certificate check failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="client-cert-rotation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
