"""The SMTP submission listener end to end: a real SMTP server (aiosmtpd, in the test's loop) behind
the proxy, the default chain with JWTs from a JWKS server, clients speaking SMTP over STARTTLS or
implicit TLS. What the server received (its logins, its envelopes) is the evidence."""
from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import ssl
from dataclasses import dataclass, field

import pytest
from aiosmtpd.smtp import SMTP, AuthResult

from tests.conftest import free_port
from tests.harness import eventually, start_proxy
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer

IMPERSONATOR, SECRET = "sge-proxy", "impsecret"
ALICE = "alice@example.com"
MESSAGE = "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nthrough the proxy\r\n"


def b64(raw: str | bytes) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


def xoauth2(user: str, bearer: str) -> str:
    return b64(f"user={user}\x01auth=Bearer {bearer}\x01\x01")


# ---------------------------------------------------------------------------- the mail server
@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    authenticated: bool


@dataclass
class MailServer:
    """aiosmtpd's handler and authenticator: takes the logins in `accounts`, records every login
    attempt and every message."""
    accounts: dict[str, str]
    port: int = 0
    connections: int = 0
    logins: list[tuple[str, str, str]] = field(default_factory=list)  # mechanism, user, password
    delivered: list[Delivered] = field(default_factory=list)
    bearers: dict[str, str] = field(default_factory=dict)  # OAUTHBEARER: user -> token taken
    after_error: list[bytes] = field(default_factory=list)  # the answers to its error challenges
    proxied: list = field(default_factory=list)  # PROXY protocol headers received (aiosmtpd's ProxyData)

    def authenticate(self, server, session, envelope, mechanism, data) -> AuthResult:
        user, password = data.login.decode(), data.password.decode()
        self.logins.append((mechanism, user, password))
        return AuthResult(success=self.accounts.get(user) == password, handled=False)  # False: 535

    async def auth_OAUTHBEARER(self, server, args) -> AuthResult:
        """RFC 7628 as a server: a bad token gets the error challenge, then 535."""
        if len(args) > 1:
            raw = base64.b64decode(args[1])
        else:  # no initial response: an empty challenge asks for it (RFC 4954 section 4)
            raw = await server.challenge_auth("", encode_to_b64=False)
            if not isinstance(raw, bytes):
                return AuthResult(success=False, handled=True)  # "*": aiosmtpd answered 501
        head, _, rest = raw.decode().partition("\x01")
        user = head.split(",")[1].removeprefix("a=")
        bearer = rest.split("\x01")[0].removeprefix("auth=Bearer ")
        self.logins.append(("OAUTHBEARER", user, bearer))
        if self.bearers.get(user) == bearer:
            return AuthResult(success=True)
        self.after_error.append(await server.challenge_auth('{"status":"invalid_token"}'))
        return AuthResult(success=False, handled=False)

    async def handle_PROXY(self, server, session, envelope, proxy_data) -> bool:
        self.proxied.append(proxy_data)  # (only with proxy_protocol_timeout: see the PROXY test)
        return True

    async def handle_DATA(self, server, session, envelope) -> str:
        self.delivered.append(Delivered(envelope.mail_from, envelope.rcpt_tos, envelope.content,
                                        bool(session.authenticated)))
        return "250 2.0.0 Queued"


@pytest.fixture
async def mailserver():
    ms = MailServer({f"{ALICE}%{IMPERSONATOR}": SECRET, "carol": "carolpw"})
    loop = asyncio.get_running_loop()

    def connected() -> SMTP:
        ms.connections += 1
        return SMTP(ms, hostname="upstream.test", authenticator=ms.authenticate, auth_require_tls=False,
                    loop=loop)

    server = await loop.create_server(connected, "127.0.0.1", 0)
    ms.port = server.sockets[0].getsockname()[1]
    yield ms
    server.close()
    await server.wait_closed()


# ---------------------------------------------------------------------------- the proxy
@pytest.fixture
async def make_proxy(certs, upstream, idp, mailserver):
    engines = []

    async def make(chain=None, mail_port=None, **over):
        settings = {} if chain == [] else {
            "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
            "addons.upstream_identity": {"mode": "impersonate", "impersonator": IMPERSONATOR, "secret": SECRET},
            "addons.header_signer": {"key_id": "k", "keys": {"k": b64(b"k" * 32)}},
        }
        eng = await start_proxy(certs, upstream, chain=chain, **{
            "stalwart.health_interval": 3600,
            "tls.cert": str(certs / "server.crt"), "tls.key": str(certs / "server.key"),
            "mail.submission.listen": "127.0.0.1:0", "mail.submission.upstream_tls": "none",
            "mail.submission.upstreams": {"official": f"127.0.0.1:{mail_port or mailserver.port}"},
            "mail.submission.failure_delay": 0, **settings, **over})
        engines.append(eng)
        return eng, eng.mail_servers["submission"].port

    yield make
    for eng in engines:
        if not eng.draining:
            await eng.stop(drain_timeout=1)


def token(idp: JwksServer, sub: str = ALICE, **kw) -> str:
    return idp.keys[0].token(sub, **kw)


# ---------------------------------------------------------------------------- a small client
class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> "Client":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                                       server_hostname="localhost" if tls else None)
        c = cls(reader, writer)
        code, lines = await c.reply()
        assert code == 220 and lines[0].endswith("ESMTP sge-mail-proxy"), lines
        return c

    async def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 5)).decode()
            assert line.endswith("\r\n"), (line, lines)
            lines.append(line[4:-2])
            if line[3] != "-":
                return int(line[:3]), lines

    async def cmd(self, line: str) -> tuple[int, list[str]]:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        assert (await self.cmd("STARTTLS"))[0] == 220
        await self.writer.start_tls(ctx, server_hostname="localhost")

    async def rest(self) -> bytes:
        """Everything until the proxy closes the connection."""
        return await asyncio.wait_for(self.reader.read(), 5)

    async def submit(self, rcpt: str = "bob@example.org") -> None:
        assert (await self.cmd(f"MAIL FROM:<{ALICE}>"))[0] == 250
        assert (await self.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
        assert (await self.cmd("DATA"))[0] == 354
        assert (await self.cmd(MESSAGE + "."))[0] == 250
        assert (await self.cmd("QUIT"))[0] == 221

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def tls(certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.crt"))


async def secured(port: int, tls: ssl.SSLContext) -> Client:
    """A client after STARTTLS and EHLO: ready to AUTH."""
    c = await Client.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.starttls(tls)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    return c


def delivered_once(ms: MailServer, rcpt: str = "bob@example.org") -> Delivered:
    assert len(ms.delivered) == 1
    got = ms.delivered[0]
    assert (got.mail_from, got.rcpt_tos, got.authenticated) == (ALICE, [rcpt], True)
    assert b"Subject: hello" in got.content and b"through the proxy" in got.content
    return got


# ---------------------------------------------------------------------------- logins
async def test_jwt_as_password_with_smtplib_submits_as_the_impersonated_user(make_proxy, mailserver, idp, tls):
    _, port = await make_proxy()
    jwt = token(idp)

    def submit() -> dict:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
            s.starttls(context=tls)
            s.login(ALICE, jwt)  # AUTH PLAIN: smtplib's first choice among what is offered
            return s.sendmail(ALICE, ["bob@example.org"], MESSAGE)

    assert await asyncio.to_thread(submit) == {}
    delivered_once(mailserver)
    assert mailserver.logins == [("PLAIN", f"{ALICE}%{IMPERSONATOR}", SECRET)]


@pytest.mark.parametrize("mech, initial", [("XOAUTH2", True), ("OAUTHBEARER", True), ("OAUTHBEARER", False)])
async def test_bearer_mechanisms(make_proxy, mailserver, idp, tls, mech, initial):
    _, port = await make_proxy()
    jwt = token(idp)
    if mech == "XOAUTH2":
        response = xoauth2(ALICE, jwt)
    else:
        response = b64(f"n,a={ALICE},\x01auth=Bearer {jwt}\x01\x01")
    c = await secured(port, tls)
    if initial:
        assert await c.cmd(f"AUTH {mech} {response}") == (235, ["2.7.0 Authentication successful"])
    else:
        assert await c.cmd(f"auth {mech.lower()}") == (334, [""])
        assert (await c.cmd(response))[0] == 235
    await c.submit()
    c.close()
    delivered_once(mailserver)
    assert mailserver.logins == [("PLAIN", f"{ALICE}%{IMPERSONATOR}", SECRET)]


async def test_auth_login(make_proxy, mailserver, idp, tls):
    _, port = await make_proxy()
    c = await secured(port, tls)
    assert await c.cmd("AUTH LOGIN") == (334, [b64("Username:")])
    assert await c.cmd(b64(ALICE)) == (334, [b64("Password:")])
    assert (await c.cmd(b64(token(idp))))[0] == 235
    await c.submit()
    c.close()
    delivered_once(mailserver)


async def test_pipelined_commands_after_auth_reach_the_server(make_proxy, mailserver, idp, tls):
    """What the client sends behind AUTH in the same write is relayed, not lost or answered by
    the proxy."""
    _, port = await make_proxy()
    c = await secured(port, tls)
    c.writer.write(f"AUTH PLAIN {plain(ALICE, token(idp))}\r\nMAIL FROM:<{ALICE}>\r\n"
                   f"RCPT TO:<carol@example.org>\r\n".encode())
    assert [(await c.reply())[0] for _ in range(3)] == [235, 250, 250]
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MESSAGE + "."))[0] == 250
    c.close()
    delivered_once(mailserver, "carol@example.org")


async def test_bad_credentials_never_reach_the_server_and_three_end_the_connection(make_proxy, mailserver, idp, tls):
    eng, port = await make_proxy()
    c = await secured(port, tls)
    expired = token(idp, ttl=-120)
    assert await c.cmd(f"AUTH PLAIN {plain(ALICE, expired)}") == (535, ["5.7.8 Authentication credentials invalid"])
    # a bearer failure: the error challenge (RFC 7628), the client's empty answer, then 535
    code, (challenge,) = await c.cmd(f"AUTH XOAUTH2 {xoauth2(ALICE, 'nope')}")
    assert code == 334 and json.loads(base64.b64decode(challenge)) == {"status": "invalid_token"}
    assert (await c.cmd(""))[0] == 535
    # bob's user name with alice's token
    assert (await c.cmd(f"AUTH PLAIN {plain('bob@example.com', token(idp))}"))[0] == 535
    assert await c.reply() == (421, ["4.7.0 Too many failures"])
    assert await c.rest() == b""
    c.close()
    assert mailserver.connections == 0
    refused = eng.metrics.registry.get_sample_value("sge_proxy_mail_logins_total",
                                                    {"protocol": "submission", "result": "refused"})
    assert refused == 3


async def test_sasl_syntax_and_cancel_are_not_logins(make_proxy, mailserver, tls):
    _, port = await make_proxy()
    c = await secured(port, tls)
    assert await c.cmd("AUTH PLAIN") == (334, [""])
    assert await c.cmd("*") == (501, ["5.7.0 Authentication cancelled"])
    assert await c.cmd("AUTH PLAIN !!notbase64") == (501, ["5.5.2 Cannot decode response"])
    assert await c.cmd("AUTH PLAIN =") == (501, ["5.5.2 Cannot decode response"])
    assert (await c.cmd("AUTH CRAM-MD5"))[0] == 504
    assert (await c.cmd("AUTH"))[0] == 501
    assert (await c.cmd("NOOP"))[0] == 250  # no failure was counted: still open
    c.close()
    assert mailserver.connections == 0


async def test_no_auth_before_starttls(make_proxy, mailserver, idp, tls):
    _, port = await make_proxy()
    c = await Client.connect(port)
    code, caps = await c.cmd("EHLO client.test")
    assert code == 250 and "STARTTLS" in caps and not any(x.startswith("AUTH") for x in caps)
    assert "PIPELINING" not in caps and not any(x.startswith(("SIZE", "CHUNKING")) for x in caps)
    assert await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}") == (
        538, ["5.7.11 Encryption required for requested authentication mechanism"])
    await c.starttls(tls)
    assert await c.cmd("AUTH PLAIN =") == (503, ["5.5.1 EHLO first"])  # the upgrade reset the session
    code, caps = await c.cmd("EHLO client.test")
    assert code == 250 and "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER" in caps and "STARTTLS" not in caps
    assert caps[:3] == ["localhost", "8BITMIME", "ENHANCEDSTATUSCODES"]
    assert await c.cmd("STARTTLS") == (503, ["5.5.1 Already in TLS"])
    c.close()
    assert mailserver.connections == 0


async def test_commands_before_auth(make_proxy, mailserver, tls):
    _, port = await make_proxy()
    c = await secured(port, tls)
    for command in (f"MAIL FROM:<{ALICE}>", "RCPT TO:<bob@example.org>", "DATA", "BDAT 5 LAST", "VRFY bob"):
        assert await c.cmd(command) == (530, ["5.7.0 Authentication required"]), command
    assert await c.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert await c.cmd("RSET") == (250, ["2.0.0 OK"])
    assert await c.cmd("XYZZY") == (500, ["5.5.1 Unrecognized command"])
    assert await c.cmd("") == (500, ["5.5.2 Syntax error"])
    assert (await c.cmd("EHLO"))[0] == 501
    assert await c.cmd("HELO client.test") == (250, ["localhost"])
    assert await c.cmd("AUTH PLAIN =") == (503, ["5.5.1 EHLO first"])
    assert await c.cmd("QUIT") == (221, ["2.0.0 Bye"])
    assert await c.rest() == b""
    c.close()
    assert mailserver.connections == 0


async def test_a_line_too_long_ends_the_connection(make_proxy):
    _, port = await make_proxy(**{"mail.submission.max_line": 600})
    c = await Client.connect(port)
    assert (await c.cmd("NOOP " + "x" * 580))[0] == 250  # 587 bytes with CRLF
    c.writer.write(b"NOOP " + b"x" * 600 + b"\r\n")
    assert await c.reply() == (500, ["5.5.2 Line too long"])
    assert await c.rest() == b""
    c.close()


async def test_bytes_after_starttls_end_the_connection(make_proxy, mailserver, idp):
    """A command injected behind STARTTLS (in clear, in the same packet) is never executed after
    the upgrade: the connection ends without the 220."""
    _, port = await make_proxy()
    c = await Client.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    c.writer.write(f"STARTTLS\r\nAUTH PLAIN {plain(ALICE, token(idp))}\r\n".encode())
    assert await c.rest() == b""
    c.close()
    assert mailserver.connections == 0


async def test_implicit_tls(make_proxy, mailserver, idp, tls):
    _, port = await make_proxy(**{"mail.submission.tls": "implicit"})
    c = await Client.connect(port, tls)
    assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() is None  # none asked for
    code, caps = await c.cmd("EHLO client.test")
    assert "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER" in caps and "STARTTLS" not in caps
    assert (await c.cmd("STARTTLS"))[0] == 503
    assert (await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}"))[0] == 235
    await c.submit()
    c.close()
    delivered_once(mailserver)


async def test_implicit_tls_offers_smtp_alpn(make_proxy, tls, certs):
    _, port = await make_proxy(**{"mail.submission.tls": "implicit"})
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.set_alpn_protocols(["smtp"])
    c = await Client.connect(port, ctx)
    assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "smtp"
    c.close()


# ---------------------------------------------------------------------------- refusals
async def test_mail_server_down(make_proxy, idp, tls):
    _, port = await make_proxy(mail_port=free_port())
    c = await secured(port, tls)
    assert await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}") == (
        454, ["4.7.0 Temporary authentication failure"])
    assert (await c.cmd("NOOP"))[0] == 250  # still there, unauthenticated
    c.close()


async def test_mail_server_refusing_the_proxys_login(make_proxy, mailserver, idp, tls, caplog):
    eng, port = await make_proxy(**{"addons.upstream_identity.secret": "rotated"})
    c = await secured(port, tls)
    assert (await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}"))[0] == 454
    assert mailserver.logins == [("PLAIN", f"{ALICE}%{IMPERSONATOR}", "rotated")]
    assert (await c.cmd(f"MAIL FROM:<{ALICE}>"))[0] == 530  # the session is not logged in
    c.close()
    assert "535" in caplog.text and "rotated" not in caplog.text
    failed = eng.metrics.registry.get_sample_value("sge_proxy_mail_logins_total",
                                                   {"protocol": "submission", "result": "failed"})
    assert failed == 1


async def test_jwt_upstream_identity_logs_in_with_oauthbearer(make_proxy, mailserver, idp, tls, tmp_path):
    """upstream_identity `jwt`: the proxy's own token for the user goes to the server as
    OAUTHBEARER; the server's error challenge (RFC 7628) gets the dummy answer, the client 454."""
    key = tmp_path / "upstream.key"
    key.write_bytes(b"u" * 32)
    _, port = await make_proxy(**{"addons.upstream_identity": {"mode": "jwt", "key_file": str(key)}})
    c = await secured(port, tls)
    assert (await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}"))[0] == 454
    [(mech, user, upstream_token)] = mailserver.logins
    assert (mech, user) == ("OAUTHBEARER", ALICE) and mailserver.after_error == [b"\x01"]
    mailserver.bearers[ALICE] = upstream_token  # reused by the proxy within jwt_reuse
    assert (await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}"))[0] == 235
    await c.submit()
    c.close()
    delivered_once(mailserver)


async def test_bearer_upstream_identity_passes_the_clients_token(make_proxy, mailserver, idp, tls):
    _, port = await make_proxy(**{"addons.upstream_identity": {"mode": "bearer"}})
    jwt = token(idp)
    mailserver.bearers[ALICE] = jwt
    c = await secured(port, tls)
    assert (await c.cmd(f"AUTH XOAUTH2 {xoauth2(ALICE, jwt)}"))[0] == 235
    # the client's token is too long for an initial response on SMTP's 512-octet command line
    # (RFC 4954): the proxy sent it after the server's 334
    assert mailserver.logins == [("OAUTHBEARER", ALICE, jwt)]
    c.close()
    assert mailserver.logins == [("OAUTHBEARER", ALICE, jwt)]


async def test_policy_without_the_submission_rule_refuses_with_550(make_proxy, mailserver, idp, tls, tmp_path):
    policy = tmp_path / "imap-only.yaml"
    policy.write_text("name: imap-only\nversion: 1\nrules:\n  - id: mail-imap\n    effect: allow\n"
                      "    http_methods: [IMAP]\n    paths: [/mail/imap]\n")
    _, port = await make_proxy(**{"addons.policy": {"files": [str(policy)]}})
    c = await secured(port, tls)
    assert await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}") == (550, ["5.7.1 Submission not allowed"])
    c.close()
    assert mailserver.connections == 0


async def test_access_log_lines(make_proxy, mailserver, idp, tls, tmp_path):
    log_file = tmp_path / "access.log"
    eng, port = await make_proxy(access_log=str(log_file))
    c = await secured(port, tls)
    assert (await c.cmd(f"AUTH PLAIN {plain(ALICE, 'bad-token')}"))[0] == 535
    assert (await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}"))[0] == 235
    await c.submit()
    c.close()

    def lines() -> list[dict]:
        eng.access_log.flush()
        return [json.loads(x) for x in log_file.read_text().splitlines()] if log_file.exists() else []

    await eventually(lambda: any(r["status"] == 200 for r in lines()))
    refused, ok = lines()
    for r in (refused, ok):
        assert (r["route"], r["method"], r["path"]) == ("submission", "SMTP", "/mail/submission")
    assert refused["status"] == 401 and refused["bytes_in"] == refused["bytes_out"] == 0
    assert ok["status"] == 200 and ok["user"] == ALICE and ok["upstream"] == "official"
    assert ok["bytes_in"] > len(MESSAGE) and ok["bytes_out"] > 0 and ok["upstream_ms"] is not None


async def test_empty_chain_forwards_the_clients_own_login(make_proxy, mailserver, tls):
    _, port = await make_proxy(chain=[])
    c = await secured(port, tls)
    assert (await c.cmd(f"AUTH PLAIN {plain('carol', 'carolpw')}"))[0] == 235
    await c.submit()
    c.close()
    assert mailserver.logins == [("PLAIN", "carol", "carolpw")]
    assert len(mailserver.delivered) == 1 and mailserver.delivered[0].authenticated


# ---------------------------------------------------------------------------- time and shutdown
async def test_login_timeout(make_proxy):
    _, port = await make_proxy(**{"mail.submission.login_timeout": "200ms"})
    c = await Client.connect(port)
    code, (text,) = await c.reply()
    assert code == 421 and text.startswith("4.4.2")
    assert await c.rest() == b""
    c.close()


async def test_shutdown_answers_421_to_a_session_waiting_for_its_login(make_proxy, tls):
    eng, port = await make_proxy()
    c = await secured(port, tls)
    stopping = asyncio.ensure_future(eng.stop(drain_timeout=2))
    await eventually(lambda: eng.mail_servers["submission"].stopping)
    assert await c.cmd("NOOP") == (421, ["4.3.2 Shutting down"])
    assert await c.rest() == b""
    c.close()
    await stopping


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_tells_the_server_the_clients_address(make_proxy, idp, tls, version):
    """upstream_proxy_protocol: the server (aiosmtpd, which parses both versions) learns the
    client's address and port, not the proxy's."""
    ms = MailServer({f"{ALICE}%{IMPERSONATOR}": SECRET})
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(ms, hostname="upstream.test", authenticator=ms.authenticate, auth_require_tls=False,
                     proxy_protocol_timeout=5, loop=loop), "127.0.0.1", 0)
    try:
        _, port = await make_proxy(mail_port=server.sockets[0].getsockname()[1],
                                   **{"mail.submission.upstream_proxy_protocol": version})
        c = await secured(port, tls)
        client_port = c.writer.get_extra_info("sockname")[1]
        assert (await c.cmd(f"AUTH PLAIN {plain(ALICE, token(idp))}"))[0] == 235
        await c.submit()
        c.close()
        [pd] = ms.proxied
        assert pd.version == int(version[1]) and pd.valid
        assert (str(pd.src_addr), pd.src_port) == ("127.0.0.1", client_port)
        assert pd.dst_port == port
        delivered_once(ms)
    finally:
        server.close()


async def test_max_sessions(make_proxy):
    _, port = await make_proxy(**{"mail.submission.max_sessions": 1})
    first = await Client.connect(port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"421 4.7.0 Too many connections")
    writer.close()
    first.close()
