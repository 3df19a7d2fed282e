"""proxy.devcerts: the development PKI verifies the way nginx and the proxy will use it."""
from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import devcerts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return devcerts.generate(tmp_path_factory.mktemp("pki"))


def _cert(pki: dict[str, Path], name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki[f"{name}.crt"].read_bytes())


def _serials(paths: dict[str, Path]) -> dict[str, int]:
    return {n: x509.load_pem_x509_certificate(paths[f"{n}.crt"].read_bytes()).serial_number
            for n in devcerts.NAMES}


def _handshake(pki: dict[str, Path], *, trust: str, server: str, client: str, hostname: str) -> str:
    """A real TLS 1.3 handshake over memory BIOs; returns 'ok' or the side that refused."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(pki[f"{server}.crt"], pki[f"{server}.key"])
    sctx.load_verify_locations(pki[f"{trust}.crt"])
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(pki[f"{trust}.crt"])
    cctx.load_cert_chain(pki[f"{client}.crt"], pki[f"{client}.key"])
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    sides = {"client": cctx.wrap_bio(c_in, c_out, server_hostname=hostname),
             "server": sctx.wrap_bio(s_in, s_out, server_side=True)}
    done: set[str] = set()
    for _ in range(20):
        for side, obj in sides.items():
            if side in done:
                continue
            try:
                obj.do_handshake()
                done.add(side)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return f"{side} refused"
        if done == set(sides):
            return "ok"
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("trust, server, client, hostname, outcome", [
    ("ca", "server", "client", "localhost", "ok"),
    ("ca", "server", "client", "127.0.0.1", "ok"),
    ("ca", "server", "client", "::1", "ok"),
    ("ca", "server", "client", "mail.example.com", "client refused"),   # not in the SAN
    ("ca", "server", "rogue-client", "localhost", "server refused"),    # untrusted CA
    ("ca", "server", "server", "localhost", "server refused"),          # serverAuth only, no clientAuth
    ("ca", "client", "client", "localhost", "client refused"),          # clientAuth only, no serverAuth
    ("rogue-ca", "server", "rogue-client", "localhost", "client refused"),
])
def test_handshake(pki, trust, server, client, hostname, outcome):
    assert _handshake(pki, trust=trust, server=server, client=client, hostname=hostname) == outcome


@pytest.mark.parametrize("name, eku", [
    ("server", [ExtendedKeyUsageOID.SERVER_AUTH]),
    ("client", [ExtendedKeyUsageOID.CLIENT_AUTH]),
    ("rogue-client", [ExtendedKeyUsageOID.CLIENT_AUTH]),
])
def test_leaf_extended_key_usage(pki, name, eku):
    cert = _cert(pki, name)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == eku
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_server_subject_alt_names(pki):
    san = _cert(pki, "server").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                      ipaddress.ip_address("::1")]


@pytest.mark.parametrize("name, cn", [
    ("client", "sge-mail-proxy-client"),
    ("rogue-client", "sge-mail-proxy-client"),   # same name, other CA: only the chain tells them apart
    ("server", "localhost"),
])
def test_common_names(pki, name, cn):
    assert _cert(pki, name).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn


@pytest.mark.parametrize("name, years", [("ca", 10), ("rogue-ca", 10), ("server", 2), ("client", 2)])
def test_validity(pki, name, years):
    cert = _cert(pki, name)
    now = dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(minutes=4) < now - cert.not_valid_before_utc < dt.timedelta(minutes=6)
    assert abs((cert.not_valid_after_utc - now) - dt.timedelta(days=365 * years)) < dt.timedelta(days=5)


@pytest.mark.parametrize("name", ["ca", "rogue-ca"])
def test_ca_constraints(pki, name):
    cert = _cert(pki, name)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    assert cert.issuer == cert.subject


@pytest.mark.parametrize("name", devcerts.NAMES)
def test_key_matches_cert_and_modes(pki, name):
    key = serialization.load_pem_private_key(pki[f"{name}.key"].read_bytes(), None)
    assert key.public_key().public_numbers() == _cert(pki, name).public_key().public_numbers()
    assert pki[f"{name}.key"].read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(pki[f"{name}.key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(pki[f"{name}.crt"].stat().st_mode) == 0o644


def test_second_call_keeps_the_set(tmp_path):
    first = _serials(devcerts.generate(tmp_path))
    assert _serials(devcerts.generate(tmp_path)) == first


def test_force_regenerates_everything(tmp_path):
    first = _serials(devcerts.generate(tmp_path))
    again = _serials(devcerts.generate(tmp_path, force=True))
    assert all(again[n] != first[n] for n in devcerts.NAMES)


def _swap_client_key(d: Path) -> None:
    (d / "client.key").write_bytes((d / "server.key").read_bytes())


def _drop_rogue(d: Path) -> None:
    (d / "rogue-client.crt").unlink()


def _garble_ca(d: Path) -> None:
    (d / "ca.crt").write_text("not a certificate")


def _reissue_ca(d: Path) -> None:   # leaves no longer signed by the CA on disk
    _write_set(d, {"ca": devcerts.issue(dt.datetime.now(dt.timezone.utc))["ca"]})


def _write_set(d: Path, pairs: dict[str, devcerts.Pair]) -> None:
    for name, pair in pairs.items():
        (d / f"{name}.crt").write_bytes(pair.cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(pair.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _expiring(d: Path) -> None:     # issued 701 days ago: leaves end in 29 days
    _write_set(d, devcerts.issue(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=701)))


@pytest.mark.parametrize("damage", [_swap_client_key, _drop_rogue, _garble_ca, _reissue_ca, _expiring])
def test_unusable_set_is_replaced(tmp_path, damage):
    devcerts.generate(tmp_path)
    damage(tmp_path)
    paths = devcerts.generate(tmp_path)
    assert _handshake(paths, trust="ca", server="server", client="client", hostname="localhost") == "ok"
    now = dt.datetime.now(dt.timezone.utc)
    assert all(_cert(paths, n).not_valid_after_utc - now > dt.timedelta(days=700) for n in devcerts.NAMES)


def test_set_expiring_in_31_days_is_kept(tmp_path):
    old = devcerts.issue(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=699))
    _write_set(tmp_path, old)
    assert _serials(devcerts.generate(tmp_path)) == {n: p.cert.serial_number for n, p in old.items()}


def test_main_reports_made_then_kept(tmp_path, capsys):
    assert devcerts.main(["--dir", str(tmp_path / "certs")]) == 0
    assert capsys.readouterr().out.startswith("made new development certificates")
    assert devcerts.main(["--dir", str(tmp_path / "certs")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kept existing development certificates")
    assert "rogue-client.crt" in out


def test_runs_as_module(tmp_path):
    run = subprocess.run([sys.executable, "-m", "proxy.devcerts", "--dir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(devcerts.FILES)
