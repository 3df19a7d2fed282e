"""Validation of client certificate pairs, the context builder, next_refresh, and the rotator with
the file source (a real ClientTLS, real files, real certificates made here)."""
from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.metrics import Metrics
from proxy.rotation import (CertificateRejected, CertificateRotator, CertMaterial, FileCertSource, build_context,
                            parse_anchors, validate)
from proxy.tls import ClientTLS, next_refresh

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
HOUR = dt.timedelta(hours=1)


def make_ca(cn: str, issuer=None):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_key, issuer_name = (key, name) if issuer is None else (issuer[0], issuer[1].subject)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - HOUR).not_valid_after(NOW + 100 * HOUR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer_key, hashes.SHA256()))
    return key, cert


def make_leaf(ca, cn="client-a", *, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), before=NOW - HOUR, after=NOW + 24 * HOUR):
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca[1].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(before).not_valid_after(after))
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return key, b.sign(ca[0], hashes.SHA256())


def pem_cert(*certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


CA = make_ca("test CA")
OTHER_CA = make_ca("other CA")
INTERMEDIATE = make_ca("intermediate", issuer=CA)


def material(leaf, key=None, extra=()) -> CertMaterial:
    return CertMaterial(pem_cert(leaf[1], *extra), pem_key(key or leaf[0]), pem_cert(CA[1]))


def test_good_pair_accepted():
    leaf = make_leaf(CA, "good")
    info = validate(material(leaf), [CA[1]], time.time())
    assert info.subject == "CN=good" and info.client_auth


def test_chain_through_intermediate_accepted():
    leaf = make_leaf(INTERMEDIATE, "via-intermediate")
    assert validate(material(leaf, extra=[INTERMEDIATE[1]]), [CA[1]], time.time()).subject == "CN=via-intermediate"


def test_no_eku_means_any_usage():
    assert validate(material(make_leaf(CA, eku=None)), [CA[1]], time.time()).client_auth


@pytest.mark.parametrize("case,reason", [
    ("key mismatch", "does not match"),
    ("expired", "expired"),
    ("not yet valid", "not valid yet"),
    ("wrong CA", "does not chain"),
    ("no clientAuth", "clientAuth"),
    ("intermediate missing", "does not chain"),
    ("garbage cert", "not PEM"),
    ("garbage key", "private key"),
    ("no anchors", "no trusted CA"),
])
def test_bad_pairs_refused(case, reason):
    anchors = [CA[1]]
    leaf = make_leaf(CA)
    m = material(leaf)
    if case == "key mismatch":
        m = material(leaf, key=ec.generate_private_key(ec.SECP256R1()))
    elif case == "expired":
        m = material(make_leaf(CA, before=NOW - 48 * HOUR, after=NOW - HOUR))
    elif case == "not yet valid":
        m = material(make_leaf(CA, before=NOW + HOUR, after=NOW + 48 * HOUR))
    elif case == "wrong CA":
        m = material(make_leaf(OTHER_CA))
    elif case == "no clientAuth":
        m = material(make_leaf(CA, eku=(ExtendedKeyUsageOID.SERVER_AUTH,)))
    elif case == "intermediate missing":
        m = material(make_leaf(INTERMEDIATE))
    elif case == "garbage cert":
        m = CertMaterial(b"not a certificate", m.key_pem, None)
    elif case == "garbage key":
        m = CertMaterial(m.cert_pem, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", None)
    elif case == "no anchors":
        anchors = []
    with pytest.raises(CertificateRejected, match=reason):
        validate(m, anchors, time.time())


def test_a_forged_issuer_name_is_not_enough():
    """Same subject name as the trusted CA, different key: the signature check refuses it."""
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    impostor = (impostor_key, CA[1])  # signs with its own key under the trusted CA's name
    with pytest.raises(CertificateRejected, match="does not chain"):
        validate(material(make_leaf(impostor)), [CA[1]], time.time())


@pytest.mark.parametrize("nb,na,now,expected", [
    (0, 300, 0, 200), (0, 300, 150, 50), (0, 300, 200, 0), (0, 300, 299, 0), (100, 400, 100, 200),
])
def test_next_refresh_at_a_third_remaining(nb, na, now, expected):
    assert next_refresh(nb, na, now) == pytest.approx(expected)


def test_build_context_leaves_no_key_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    ctx = build_context(material(make_leaf(CA)), server_ca=None, min_version="1.3", verify_hostname=True)
    assert ctx.verify_mode.name == "CERT_REQUIRED"
    assert list(tmp_path.iterdir()) == []


def test_parse_anchors_tolerates_garbage():
    assert parse_anchors(b"junk") == [] and parse_anchors(None) == []
    assert len(parse_anchors(pem_cert(CA[1], OTHER_CA[1]))) == 2


# ---------------------------------------------------------------------------------------------- rotator
def write_pair(d: Path, leaf) -> None:
    for name, data in (("client.crt", pem_cert(leaf[1])), ("client.key", pem_key(leaf[0]))):
        tmp = d / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / name)


def sample(m: Metrics, name: str, labels: dict | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


async def test_rotator_swaps_good_and_refuses_bad(tmp_path):
    (tmp_path / "ca.crt").write_bytes(pem_cert(CA[1]))
    write_pair(tmp_path, make_leaf(CA, "first"))
    tls = ClientTLS.from_files(cert=tmp_path / "client.crt", key=tmp_path / "client.key", ca=tmp_path / "ca.crt")
    m = Metrics()
    rot = CertificateRotator(tls, FileCertSource(tmp_path / "client.crt", tmp_path / "client.key", tmp_path / "ca.crt"),
                             anchor_file=tmp_path / "ca.crt", server_ca=tmp_path / "ca.crt", interval=5, metrics=m)
    assert await rot.check() == "unchanged"
    second = make_leaf(CA, "second", after=NOW + 48 * HOUR)
    write_pair(tmp_path, second)
    assert await rot.check() == "rotated"
    assert tls.info.subject == "CN=second" and tls.generation == 1
    assert sample(m, "sge_proxy_client_cert_expiry_timestamp_seconds") == second[1].not_valid_after_utc.timestamp()
    old_ctx = tls.ctx
    write_pair(tmp_path, make_leaf(OTHER_CA, "rogue"))
    assert await rot.check() == "rejected"
    assert tls.ctx is old_ctx and tls.info.subject == "CN=second" and tls.generation == 1
    assert sample(m, "sge_proxy_client_cert_rotation_failed") == 1
    assert "does not chain" in rot.last_error
    assert await rot.check() == "unchanged"  # the same bad files are not re-counted
    assert sample(m, "sge_proxy_client_cert_rotations_total", {"result": "rejected"}) == 1
    write_pair(tmp_path, make_leaf(CA, "third"))
    assert await rot.check() == "rotated"
    assert sample(m, "sge_proxy_client_cert_rotation_failed") == 0 and rot.last_error is None
    assert sample(m, "sge_proxy_client_cert_rotations_total", {"result": "rotated"}) == 2


async def test_rotator_polls_sooner_when_renewal_is_due(tmp_path):
    (tmp_path / "ca.crt").write_bytes(pem_cert(CA[1]))
    write_pair(tmp_path, make_leaf(CA, before=NOW - HOUR, after=NOW + 2 * HOUR))
    tls = ClientTLS.from_files(cert=tmp_path / "client.crt", key=tmp_path / "client.key", ca=tmp_path / "ca.crt")
    src = FileCertSource(tmp_path / "client.crt", tmp_path / "client.key", tmp_path / "ca.crt")
    rot = CertificateRotator(tls, src, anchor_file=None, server_ca=None, interval=3600)
    nb, na = tls.info.not_before, tls.info.not_after
    assert not rot.due(nb) and rot.delay(nb) == 3600  # renewal 2h away: the interval
    assert rot.delay(na - 3600 - 1800) == pytest.approx(1800)  # renewal in 30 min
    assert rot.due(na - 3600) and rot.delay(na - 3600) == 1.0  # due: poll at the floor


async def test_missing_files_are_an_error_not_a_swap(tmp_path):
    (tmp_path / "ca.crt").write_bytes(pem_cert(CA[1]))
    write_pair(tmp_path, make_leaf(CA))
    tls = ClientTLS.from_files(cert=tmp_path / "client.crt", key=tmp_path / "client.key", ca=tmp_path / "ca.crt")
    rot = CertificateRotator(tls, FileCertSource(tmp_path / "client.crt", tmp_path / "client.key", None),
                             anchor_file=tmp_path / "ca.crt", server_ca=None)
    (tmp_path / "client.key").unlink()
    assert await rot.check() == "error" and tls.generation == 0
