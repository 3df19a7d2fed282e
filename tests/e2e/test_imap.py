"""The IMAP listener in front of Cyrus (tests/e2e/stack: its imapd on 127.0.0.1:18143, on the
loopback in clear): a client logs in to the proxy with its JWT, the proxy logs in to Cyrus as the
admin authorized as the user (SASL PLAIN authzid: upstream_identity's `authorize-as`), and the
session is the user's own mailbox. With an empty chain the client's own Cyrus password goes
through as it came."""
from __future__ import annotations

import asyncio
import base64
import imaplib
import os
import ssl
import time
import uuid

import pytest

from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.com", "bob@example.com"
IMAP_PORT = int(os.environ.get("IMAP_PORT", "18143"))


@pytest.fixture
async def make_proxy(stack, idp, tmp_path):
    engines = []

    async def make(*, chain=None, **over):
        settings = {
            "stalwart.health_interval": 3600,
            "mail.imap.listen": "127.0.0.1:0",
            "mail.imap.upstream_tls": "none",  # Cyrus's imapd, on this machine's loopback
            "mail.imap.upstreams": {"official": f"127.0.0.1:{IMAP_PORT}"},
            "mail.imap.failure_delay": 0.05,
            "access_log": str(tmp_path / "access.log"),
            "audit_log": str(tmp_path / "audit.log"),
        }
        if chain is None:
            settings.update({
                "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
                "addons.upstream_identity": {"mode": "authorize-as", "admin_user": stack.admin[0],
                                             "secret": stack.admin[1]},
                "addons.header_signer": {"key_id": "e2e", "keys": {"e2e": base64.b64encode(os.urandom(32)).decode()}},
            })
        settings.update(over)
        eng = await start_proxy(stack.certs, stack.url, chain=chain, **settings)
        engines.append(eng)
        return eng, eng.mail_servers["imap"].port

    yield make
    for eng in engines:
        await eng.stop(drain_timeout=1)


def tls_context(stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.certs / "ca.crt"))


def connect(port: int, stack) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    m.starttls(tls_context(stack))
    return m


def message(subject: str) -> bytes:
    return (f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@e2e>\r\n"
            f"Date: Fri, 27 Nov 2026 03:00:00 +0000\r\n\r\nSent through the IMAP listener.\r\n").encode()


async def test_jwt_login_reaches_the_users_own_mailbox(make_proxy, stack, idp, tmp_path):
    _, port = await make_proxy()
    token = idp.keys[0].token(ALICE, email=ALICE)
    subject = f"imap-e2e-{uuid.uuid4().hex[:8]}"

    def session() -> tuple:
        m = connect(port, stack)
        assert "AUTH=PLAIN" in m.capabilities and "LOGINDISABLED" not in m.capabilities
        typ, data = m.login(ALICE, token)
        assert typ == "OK"
        # the server's capabilities, without what belonged to the proxy's own login
        caps = data[0].split(b"]")[0].split()
        assert b"IDLE" in caps and b"LOGINDISABLED" not in caps, caps
        assert not [c for c in caps if c.startswith(b"AUTH=")], caps
        assert m.append("INBOX", None, None, message(subject))[0] == "OK"
        m.select("INBOX")
        typ, found = m.search(None, "SUBJECT", f'"{subject}"')
        assert typ == "OK" and found[0], found
        typ, fetched = m.fetch(found[0].split()[-1], "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        m.logout()
        return fetched

    fetched = await asyncio.to_thread(session)
    assert subject.encode() in fetched[0][1]
    # bob, logged in through the proxy, does not see alice's message
    token_b = idp.keys[0].token(BOB, email=BOB)

    def bob() -> list:
        m = connect(port, stack)
        m.login(BOB, token_b)
        m.select("INBOX")
        found = m.search(None, "SUBJECT", f'"{subject}"')[1]
        m.logout()
        return found

    assert (await asyncio.to_thread(bob)) == [b""]
    await asyncio.sleep(0.4)  # the logs are flushed every 0.2 s
    access = (tmp_path / "access.log").read_text()
    line = next(x for x in access.splitlines() if '"user":"alice@example.com"' in x)
    assert '"method":"IMAP"' in line and '"route":"imap"' in line and '"status":200' in line
    assert '"upstream":"official"' in line
    audit = (tmp_path / "audit.log").read_text()
    assert '"event":"mail.login"' in audit and token not in audit and token not in access


@pytest.mark.parametrize("mech", ["PLAIN", "XOAUTH2", "OAUTHBEARER"])
async def test_authenticate_mechanisms(make_proxy, stack, idp, mech):
    _, port = await make_proxy()
    token = idp.keys[0].token(ALICE, email=ALICE)
    raw = {"PLAIN": f"\0{ALICE}\0{token}".encode(),
           "XOAUTH2": f"user={ALICE}\x01auth=Bearer {token}\x01\x01".encode(),
           "OAUTHBEARER": f"n,a={ALICE},\x01auth=Bearer {token}\x01\x01".encode()}[mech]

    def session() -> tuple:
        m = connect(port, stack)
        typ, _ = m.authenticate(mech, lambda _challenge: raw)
        status = m.select("INBOX")[0]
        m.logout()
        return typ, status

    assert await asyncio.to_thread(session) == ("OK", "OK")


async def test_bad_token_refused_before_cyrus(make_proxy, stack, idp):
    eng, port = await make_proxy()
    good = idp.keys[0].token(ALICE, email=ALICE)

    def session() -> list[str]:
        m = connect(port, stack)
        out = []
        for secret in (good[:-4] + "AAAA", "not-a-token"):
            try:
                m.login(ALICE, secret)
            except imaplib.IMAP4.error as e:
                out.append(str(e))
        try:  # the third failure ends the connection
            m.login(ALICE, "again")
        except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError) as e:
            out.append(type(e).__name__)
        return out

    got = await asyncio.to_thread(session)
    assert all("AUTHENTICATIONFAILED" in x for x in got[:2]), got
    assert len(got) == 3
    fam = eng.metrics.registry.get_sample_value("sge_proxy_mail_logins_total",
                                                {"protocol": "imap", "result": "refused"})
    assert fam == 3


async def test_user_name_must_match_the_token(make_proxy, stack, idp):
    _, port = await make_proxy()
    token = idp.keys[0].token(ALICE, email=ALICE)

    def session() -> str:
        m = connect(port, stack)
        with pytest.raises(imaplib.IMAP4.error) as e:
            m.login(BOB, token)
        m.logout()
        return str(e.value)

    assert "AUTHENTICATIONFAILED" in await asyncio.to_thread(session)


async def test_policy_without_the_imap_rule_refuses(make_proxy, stack, idp, tmp_path):
    policy = tmp_path / "no-imap.yaml"
    policy.write_text("name: no-imap\nversion: 1\nrules:\n  - id: jmap\n    effect: allow\n"
                      "    http_methods: [POST]\n    paths: [/jmap]\n")
    _, port = await make_proxy(**{"addons.policy": {"files": [str(policy)]}})
    token = idp.keys[0].token(ALICE, email=ALICE)

    def session() -> str:
        m = connect(port, stack)
        with pytest.raises(imaplib.IMAP4.error) as e:
            m.login(ALICE, token)
        m.logout()
        return str(e.value)

    assert "AUTHORIZATIONFAILED" in await asyncio.to_thread(session)


async def test_empty_chain_passes_the_clients_own_login(make_proxy, stack):
    _, port = await make_proxy(chain=[])

    def session() -> tuple:
        m = connect(port, stack)
        with pytest.raises(imaplib.IMAP4.error):
            m.login(ALICE, "wrong-password")
        typ, _ = m.login(ALICE, stack.users[ALICE])
        status = m.select("INBOX")[0]
        m.logout()
        return typ, status

    assert await asyncio.to_thread(session) == ("OK", "OK")


async def test_literals_and_idle_relay(make_proxy, stack, idp):
    """LOGIN with synchronizing literals (what clients send for odd characters), then IDLE: the
    relay passes the server's continuation and a DONE."""
    _, port = await make_proxy()
    token = idp.keys[0].token(ALICE, email=ALICE).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"* OK")
    writer.write(b"s STARTTLS\r\n")
    assert (await reader.readline()).startswith(b"s OK")
    await writer.start_tls(tls_context(stack), server_hostname="localhost")
    writer.write(b"a LOGIN {%d}\r\n" % len(ALICE))
    assert (await reader.readline()).startswith(b"+")
    writer.write(ALICE.encode() + b" {%d}\r\n" % len(token))
    assert (await reader.readline()).startswith(b"+")
    writer.write(token + b"\r\n")
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"a OK")
    writer.write(b"b SELECT INBOX\r\n")
    while not (line := await asyncio.wait_for(reader.readline(), 10)).startswith(b"b "):
        pass
    assert line.startswith(b"b OK")
    writer.write(b"c IDLE\r\n")
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"+")
    writer.write(b"DONE\r\n")
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"c OK")
    writer.write(b"d LOGOUT\r\n")
    rest = await asyncio.wait_for(reader.read(), 10)
    assert b"d OK" in rest
    writer.close()


async def test_upstream_down_answers_unavailable(make_proxy, stack, idp):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    _, port = await make_proxy(**{"mail.imap.upstreams": {"official": f"127.0.0.1:{closed}"}})
    token = idp.keys[0].token(ALICE, email=ALICE)

    def session() -> tuple[str, float]:
        m = connect(port, stack)
        t0 = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error) as e:
            m.login(ALICE, token)
        return str(e.value), time.monotonic() - t0

    text, _ = await asyncio.to_thread(session)
    assert "UNAVAILABLE" in text
