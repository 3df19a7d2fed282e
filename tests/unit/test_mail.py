"""Pure logic of the mail listeners: SASL responses, IMAP command syntax, the upstream login the
chain's flow implies, the capability cleaning."""
from __future__ import annotations

import base64

import pytest

from proxy.flow import Flow, Request
from proxy.identity import Identity
from proxy.imap import ImapSyntax, client_capabilities, literal_of, parse_command
from proxy.sieve import SieveSyntax, parse_sieve_command, quoted
from proxy.mail import (Credentials, LoginRefused, SaslError, UpstreamLogin, oauthbearer, parse_proxy_header, parse_sasl,
                        proxy_header,
                        sasl_plain, upstream_login)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("mech, raw, want", [
    ("PLAIN", b"\0alice\0s3cret", Credentials("alice", "s3cret", "password", None)),
    ("plain", b"bob\0alice\0s3cret", Credentials("alice", "s3cret", "password", "bob")),
    ("PLAIN", "\0j\u00fcrgen\0p\u00e4ss".encode(), Credentials("j\u00fcrgen", "p\u00e4ss", "password", None)),
    ("XOAUTH2", b"user=alice@example.com\x01auth=Bearer eyJ.a.b\x01\x01",
     Credentials("alice@example.com", "eyJ.a.b", "bearer")),
    ("XOAUTH2", b"auth=bearer tok\x01\x01", Credentials(None, "tok", "bearer")),
    ("OAUTHBEARER", b"n,a=alice@example.com,\x01host=x\x01port=993\x01auth=Bearer tok\x01\x01",
     Credentials("alice@example.com", "tok", "bearer")),
    ("OAUTHBEARER", b"n,a=a=2Cb=3Dc,\x01auth=Bearer tok\x01\x01", Credentials("a,b=c", "tok", "bearer")),
    ("OAUTHBEARER", b"n,,\x01auth=Bearer tok\x01\x01", Credentials(None, "tok", "bearer")),
])
def test_sasl_responses(mech, raw, want):
    got = parse_sasl(mech, b64(raw))
    assert (got.user, got.secret, got.kind, got.authzid) == (want.user, want.secret, want.kind, want.authzid)


@pytest.mark.parametrize("mech, response", [
    ("PLAIN", "not base64!"),
    ("PLAIN", b64(b"alice\0s3cret")),            # two fields
    ("PLAIN", b64(b"\0\0s3cret")),               # no user
    ("PLAIN", b64(b"\0alice\0")),                # no password
    ("PLAIN", b64(b"\0al\x01ice\0pw")),          # control character
    ("PLAIN", b64(b"\0\xff\0pw")),               # not UTF-8
    ("XOAUTH2", b64(b"user=alice\x01auth=Basic x\x01\x01")),
    ("XOAUTH2", b64(b"user=alice\x01auth=Bearer \x01\x01")),
    ("OAUTHBEARER", b64(b"x,a=alice,\x01auth=Bearer t\x01\x01")),  # no GS2 header
    ("OAUTHBEARER", b64(b"n,a=alice,\x01\x01")),
    ("CRAM-MD5", b64(b"alice 0123")),
])
def test_bad_sasl_responses(mech, response):
    with pytest.raises(SaslError):
        parse_sasl(mech, response)


def test_initial_responses_round_trip():
    assert parse_sasl("PLAIN", sasl_plain("admin", "pw", "alice")) == Credentials("admin", "pw", "password", "alice")
    c = parse_sasl("OAUTHBEARER", oauthbearer("a,b@x", "tok"))
    assert (c.user, c.secret) == ("a,b@x", "tok")
    assert "pw" not in repr(Credentials("u", "pw")) and "pw" not in repr(UpstreamLogin("PLAIN", "u", "pw"))


@pytest.mark.parametrize("data, want", [
    (b"a1 LOGIN alice secret", ("a1", "LOGIN", [b"alice", b"secret"])),
    (b'a1 login "alice@example.com" "pa ss\\"w\\\\d"', ("a1", "LOGIN", [b"alice@example.com", b'pa ss"w\\d'])),
    (b"A001 capability", ("A001", "CAPABILITY", [])),
    (b"t.1 AUTHENTICATE PLAIN AGFsaWNlAHB3", ("t.1", "AUTHENTICATE", [b"PLAIN", b"AGFsaWNlAHB3"])),
    (b"a LOGIN \0 \0", ("a", "LOGIN", [b"\0", b"\0"])),   # two literals, in order
    (b'a LOGIN ""  x', ("a", "LOGIN", [b"", b"x"])),
])
def test_imap_commands(data, want):
    assert parse_command(data) == want


@pytest.mark.parametrize("data", [
    b"", b"a1", b"+ LOGIN a b", b"a(1 LOGIN a b", b'a1 LOGIN "unterminated', b'a1 LOGIN "bad\\escape" x',
    b"a1 LOGIN ab\0 x", b'a1 LOGIN "a\rb" x', b"a{1 NOOP",
])
def test_bad_imap_commands(data):
    with pytest.raises(ImapSyntax):
        parse_command(data)


@pytest.mark.parametrize("line, want", [
    (b"a LOGIN {5}\r\n", (5, True)), (b"a LOGIN {5+}\r\n", (5, False)), (b"a LOGIN alice {12}\n", (12, True)),
    (b"a LOGIN alice secret\r\n", None), (b"a LOGIN {5} x\r\n", None), (b"a LOGIN {x}\r\n", None),
])
def test_literal_announcements(line, want):
    assert literal_of(line) == want


@pytest.mark.parametrize("text, want", [
    ("[CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR LOGINDISABLED IDLE] Success",
     "[CAPABILITY IMAP4rev1 IDLE] Success"),
    ("[capability IMAP4rev2 auth=xoauth2 MOVE] Logged in", "[CAPABILITY IMAP4rev2 MOVE] Logged in"),
    ("Logged in", "Logged in"),
])
def test_capabilities_after_login(text, want):
    assert client_capabilities(text) == want


def flow_with(identity: Identity | None) -> Flow:
    f = Flow(Request("IMAP", "/mail/imap", raw=[(b"authorization", b"Authorization", b"Bearer client-secret")]), id="t")
    f.identity = identity
    return f


ALICE = Identity(subject="u-1", email="alice@example.com")
BASIC = "Basic " + b64(b"admin:adminpw")
IMPERSONATE = "Basic " + b64(b"alice@example.com%sge-proxy:impsecret")


@pytest.mark.parametrize("mode, pairs, identity, creds, want", [
    # authorize-as (Cyrus): PLAIN with the user as the authorization identity
    ("authorize-as", [("Authorization", BASIC), ("Authorize-As", "alice@example.com")], ALICE,
     Credentials("alice@example.com", "client-secret"), UpstreamLogin("PLAIN", "admin", "adminpw", "alice@example.com")),
    # impersonate (Stalwart): the `%` login as the authentication identity
    ("impersonate", [("Authorization", IMPERSONATE)], ALICE, Credentials(None, "client-secret", "bearer"),
     UpstreamLogin("PLAIN", "alice@example.com%sge-proxy", "impsecret", None)),
    # jwt: OAUTHBEARER for the user's login with the token made for the server
    ("jwt", [("Authorization", "Bearer upstream-token")], ALICE, Credentials("alice@example.com", "client-secret"),
     UpstreamLogin("OAUTHBEARER", "alice@example.com", "upstream-token")),
    # bearer: the client's own token, passed on as OAUTHBEARER (the same value the client gave)
    ("bearer", [("authorization", "Bearer client-secret")], ALICE, Credentials(None, "client-secret", "bearer"),
     UpstreamLogin("OAUTHBEARER", "alice@example.com", "client-secret")),
    # passthrough, or an empty chain: the client's own credentials, as they came
    ("passthrough", [], ALICE, Credentials("alice", "client-secret", "password", "z"),
     UpstreamLogin("PLAIN", "alice", "client-secret", "z")),
    (None, [], None, Credentials("alice", "client-secret", "password", "z"),
     UpstreamLogin("PLAIN", "alice", "client-secret", "z")),
    (None, [], None, Credentials("alice", "client-secret", "bearer"),
     UpstreamLogin("OAUTHBEARER", "alice", "client-secret")),
])
def test_upstream_login(mode, pairs, identity, creds, want):
    assert upstream_login(flow_with(identity), creds, mode, pairs) == want


@pytest.mark.parametrize("mode, pairs", [
    (None, []),                         # authenticated, but no upstream_identity in the chain
    ("none", []),                       # upstream_identity says: no credentials
    ("impersonate", [("Authorization", "Basic " + b64(b"no-colon"))]),
    ("impersonate", [("Authorization", "Basic %%%")]),
    ("jwt", [("Authorization", "Negotiate abc")]),
])
def test_upstream_login_refused(mode, pairs):
    with pytest.raises(LoginRefused) as e:
        upstream_login(flow_with(ALICE), Credentials("alice", "client-secret"), mode, pairs)
    assert e.value.status == 502


@pytest.mark.parametrize("version, src, dst, want", [
    ("v1", ("192.0.2.7", 51000), ("127.0.0.1", 1143), b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 1143\r\n"),
    ("v1", ("2001:db8::7", 51000), ("::1", 993), b"PROXY TCP6 2001:db8::7 ::1 51000 993\r\n"),
    ("v1", ("2001:db8::7", 1), ("127.0.0.1", 2), b"PROXY UNKNOWN\r\n"),
    ("v2", ("192.0.2.7", 51000), ("127.0.0.1", 1143),
     b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 127, 0, 0, 1]) + b"\xc7\x38\x04\x77"),
    ("v2", ("::1", 1), ("::1", 2),
     b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" + bytes(15) + b"\x01" + bytes(15) + b"\x01" + b"\x00\x01\x00\x02"),
    ("v2", ("not-an-ip", 1), ("127.0.0.1", 2), b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"),
])
def test_proxy_protocol_headers(version, src, dst, want):
    assert proxy_header(version, src, dst) == want


@pytest.mark.parametrize("data, want", [
    (b'AUTHENTICATE "PLAIN" "AGFsaWNl"', ("AUTHENTICATE", [b"PLAIN", b"AGFsaWNl"])),
    (b"capability", ("CAPABILITY", [])),
    (b'NOOP "a \\"b\\" \\\\c"', ("NOOP", [b'a "b" \\c'])),
    (b'PUTSCRIPT "x" \0', ("PUTSCRIPT", [b"x", b"\0"])),
])
def test_sieve_commands(data, want):
    assert parse_sieve_command(data) == want


@pytest.mark.parametrize("data", [b"", b'"PLAIN"', b"\0", b'NOOP "open', b'NOOP "bad\\q"', b"NOOP ab\0", b"4U"])
def test_bad_sieve_commands(data):
    with pytest.raises(SieveSyntax):
        parse_sieve_command(data)


def test_sieve_quoting_round_trips():
    for s in ('plain', 'with "quotes"', "back\\slash"):
        assert parse_sieve_command(b"X " + quoted(s).encode())[1] == [s.encode()]


@pytest.mark.parametrize("version, src, dst", [
    ("v1", ("192.0.2.7", 51000), ("127.0.0.1", 1143)), ("v1", ("2001:db8::7", 1), ("::1", 993)),
    ("v2", ("192.0.2.7", 51000), ("127.0.0.1", 1143)), ("v2", ("2001:db8::7", 65535), ("::1", 4190)),
])
def test_proxy_headers_parse_back(version, src, dst):
    assert parse_proxy_header(proxy_header(version, src, dst)) == (src, dst)


@pytest.mark.parametrize("head, want", [
    (b"PROXY UNKNOWN\r\n", None), (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00", None),                       # v2 LOCAL
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\x00", None),                       # v2 PROXY over a UNIX socket
])
def test_proxy_headers_naming_no_client(head, want):
    assert parse_proxy_header(head) == want


@pytest.mark.parametrize("head", [
    b"PROXY TCP4 192.0.2.7 127.0.0.1 51000\r\n", b"PROXY TCP4 2001:db8::7 ::1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 1\r\n", b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", b"GET / HTTP/1.1\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(8),                   # shorter than announced
    b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x00",                               # version 1 in a v2 signature
])
def test_bad_proxy_headers(head):
    with pytest.raises(ValueError):
        parse_proxy_header(head)
