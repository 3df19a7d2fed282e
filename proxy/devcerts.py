"""Development PKI: a dev CA, a server certificate for localhost, a client certificate, and a client
certificate from a second, untrusted CA for negative tests. Never for production.

`issue(now)` is pure (keys and certificates in memory); `generate(directory)` writes them, keeping an
existing set while it is complete, consistent and not about to expire.

    python -m proxy.devcerts [--dir DIR] [--force]
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["NAMES", "FILES", "CLIENT_CN", "Pair", "issue", "generate", "main"]

NAMES = ("ca", "server", "client", "rogue-ca", "rogue-client")
FILES = tuple(f"{n}.{ext}" for n in NAMES for ext in ("crt", "key"))
CLIENT_CN = "sge-mail-proxy-client"

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "certs-dev"
BACKDATE = dt.timedelta(minutes=5)
CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=730)
RENEW_BEFORE = dt.timedelta(days=30)
_ISSUER = {"server": "ca", "client": "ca", "rogue-client": "rogue-ca"}


@dataclass(frozen=True)
class Pair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sge-mail-proxy development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, now: dt.datetime) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    ku = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                       crl_sign=True, encipher_only=False, decipher_only=False)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ku, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Pair(key, cert)


def _leaf(cn: str, ca: Pair, now: dt.datetime, eku: x509.ObjectIdentifier,
          san: list[x509.GeneralName] | None = None) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=False,
                       crl_sign=False, encipher_only=False, decipher_only=False)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(now + LEAF_LIFETIME)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(ku, critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                              critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return Pair(key, builder.sign(ca.key, hashes.SHA256()))


def issue(now: dt.datetime) -> dict[str, Pair]:
    """Pure: a fresh set of keys and certificates, keyed by NAMES.

    The rogue client carries the same CN as the trusted one, so a peer that accepts it checks names
    instead of the chain."""
    ca = _ca("sge-mail-proxy dev CA", now)
    rogue_ca = _ca("sge-mail-proxy untrusted dev CA", now)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
           x509.IPAddress(ipaddress.ip_address("::1"))]
    return {
        "ca": ca,
        "server": _leaf("localhost", ca, now, ExtendedKeyUsageOID.SERVER_AUTH, san),
        "client": _leaf(CLIENT_CN, ca, now, ExtendedKeyUsageOID.CLIENT_AUTH),
        "rogue-ca": rogue_ca,
        "rogue-client": _leaf(CLIENT_CN, rogue_ca, now, ExtendedKeyUsageOID.CLIENT_AUTH),
    }


def _not_after(cert: x509.Certificate) -> dt.datetime:
    # cryptography >= 42 has the aware property; Debian 12's python3-cryptography (38) only the naive one
    aware = getattr(cert, "not_valid_after_utc", None)
    return aware if aware is not None else cert.not_valid_after.replace(tzinfo=dt.timezone.utc)


def _usable(pairs: dict[str, Pair], now: dt.datetime) -> bool:
    """Pure: every key matches its certificate, leaves are signed by their CA, nothing expires soon."""
    for pair in pairs.values():
        if pair.key.public_key().public_numbers() != pair.cert.public_key().public_numbers():
            return False
        if _not_after(pair.cert) - now < RENEW_BEFORE:
            return False
    for leaf, ca in _ISSUER.items():
        cert, issuer = pairs[leaf].cert, pairs[ca].cert
        if cert.issuer != issuer.subject:
            return False
        try:
            issuer.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                       ec.ECDSA(cert.signature_hash_algorithm))
        except InvalidSignature:
            return False
    return True


def _load(directory: Path) -> dict[str, Pair] | None:
    pairs = {}
    for name in NAMES:
        try:
            key = serialization.load_pem_private_key((directory / f"{name}.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((directory / f"{name}.crt").read_bytes())
        except (OSError, ValueError, TypeError):
            return None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return None
        pairs[name] = Pair(key, cert)
    return pairs


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace `path`; the mode is set before any byte is written (keys never 0644)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)   # the umask may have narrowed it
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _current(directory: Path, now: dt.datetime) -> dict[str, Pair] | None:
    pairs = _load(directory)
    return pairs if pairs is not None and _usable(pairs, now) else None


def generate(directory: Path, *, force: bool = False) -> dict[str, Path]:
    """Make (or keep) the development PKI in `directory`; returns {file name: path} for FILES."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    if force or _current(directory, now) is None:
        for name, pair in issue(now).items():
            _write(directory / f"{name}.key",
                   pair.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)
            _write(directory / f"{name}.crt", pair.cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return {f: directory / f for f in FILES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sge-mail-proxy dev-certs",
        description="Make a development CA, server, client and untrusted-client certificate. Never for production.")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"output directory (default {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="regenerate even when the current set is still good")
    args = parser.parse_args(argv)
    kept = not args.force and _current(args.dir, dt.datetime.now(dt.timezone.utc)) is not None
    paths = generate(args.dir, force=args.force)
    print(f"{'kept existing' if kept else 'made new'} development certificates in {args.dir}:")
    for name in NAMES:
        cert = x509.load_pem_x509_certificate(paths[f"{name}.crt"].read_bytes())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        print(f"  {name}.crt / {name}.key  CN={cn}  until {_not_after(cert):%Y-%m-%d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
