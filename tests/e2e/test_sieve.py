"""The ManageSieve listener in front of Cyrus's timsieved (tests/e2e/stack, 127.0.0.1:18190, in
clear on the loopback): a mail client manages its Sieve rules with its JWT, the proxy logs in to
timsieved as the admin authorized as the user (upstream_identity `authorize-as`)."""
from __future__ import annotations

import asyncio
import base64
import os
import ssl

import pytest

from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.com", "bob@example.com"
SIEVE_PORT = int(os.environ.get("SIEVE_PORT", "18190"))
SCRIPT = b'require ["fileinto"];\r\nif header :contains "subject" "[sge]" { fileinto "Archive"; }\r\n'


class Client:
    """A small ManageSieve client (RFC 5804): quoted strings out, literals for scripts."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, stack) -> "Client":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer)
        caps = b"".join(await c.response())
        assert b'"STARTTLS"' in caps and b'"SASL" ""' in caps  # no credentials in clear
        assert (await c.cmd(b"STARTTLS"))[-1].startswith(b"OK")
        await writer.start_tls(ssl.create_default_context(cafile=str(stack.certs / "ca.crt")),
                               server_hostname="localhost")
        caps = b"".join(await c.response())
        assert b'"SASL" "PLAIN XOAUTH2 OAUTHBEARER"' in caps and b'"STARTTLS"' not in caps
        return c

    async def response(self) -> list[bytes]:
        """Lines up to the final OK/NO/BYE (a literal's content is read whole)."""
        out = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            assert line, out
            if line.rstrip().endswith(b"}") and b"{" in line:
                n = int(line.rstrip()[line.rindex(b"{") + 1:-1].rstrip(b"+"))
                line += await self.reader.readexactly(n)
            out.append(line)
            if line[:2] in (b"OK", b"NO") or line[:3] == b"BYE":
                return out

    async def cmd(self, line: bytes, literal: bytes | None = None) -> list[bytes]:
        if literal is not None:
            line += b" {%d+}\r\n" % len(literal) + literal
        self.writer.write(line + b"\r\n")
        return await self.response()

    async def login(self, user: str, secret: str) -> bytes:
        ir = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
        return (await self.cmd(f'AUTHENTICATE "PLAIN" "{ir}"'.encode()))[-1]


@pytest.fixture
async def make_proxy(stack, idp):
    engines = []

    async def make(*, chain=None, **over):
        settings = {"stalwart.health_interval": 3600, "mail.sieve.listen": "127.0.0.1:0",
                    "mail.sieve.upstream_tls": "none", "mail.sieve.failure_delay": 0,
                    "mail.sieve.upstreams": {"official": f"127.0.0.1:{SIEVE_PORT}"}}
        if chain is None:
            settings.update({
                "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
                "addons.upstream_identity": {"mode": "authorize-as", "admin_user": stack.admin[0],
                                             "secret": stack.admin[1]},
                "addons.header_signer": {"key_id": "e2e", "keys": {"e2e": base64.b64encode(os.urandom(32)).decode()}}})
        settings.update(over)
        eng = await start_proxy(stack.certs, stack.url, chain=chain, **settings)
        engines.append(eng)
        return eng.mail_servers["sieve"].port

    yield make
    for eng in engines:
        await eng.stop(drain_timeout=1)


async def test_rules_round_trip_as_the_user(make_proxy, stack, idp):
    port = await make_proxy()
    name = f"sge-{os.urandom(4).hex()}"
    c = await Client.connect(port, stack)
    assert (await c.login(ALICE, idp.keys[0].token(ALICE, email=ALICE))).startswith(b"OK")
    caps = await c.cmd(b"CAPABILITY")  # after the login: the server's own
    assert b"timsieved" in b"".join(caps)
    assert (await c.cmd(b'CHECKSCRIPT', b'if true { nonsense; }\r\n'))[-1].startswith(b"NO")  # the server checks
    assert (await c.cmd(f'PUTSCRIPT "{name}"'.encode(), SCRIPT))[-1].startswith(b"OK")
    assert (await c.cmd(f'SETACTIVE "{name}"'.encode()))[-1].startswith(b"OK")
    listing = b"".join(await c.cmd(b"LISTSCRIPTS"))
    assert f'"{name}" ACTIVE'.encode() in listing
    got = b"".join(await c.cmd(f'GETSCRIPT "{name}"'.encode()))
    assert SCRIPT in got
    assert (await c.cmd(b'SETACTIVE ""'))[-1].startswith(b"OK")
    assert (await c.cmd(f'DELETESCRIPT "{name}"'.encode()))[-1].startswith(b"OK")
    assert (await c.cmd(b"LOGOUT"))[-1].startswith(b"OK")
    c.writer.close()


async def test_users_see_only_their_own_rules(make_proxy, stack, idp):
    port = await make_proxy()
    name = f"alice-only-{os.urandom(4).hex()}"
    a = await Client.connect(port, stack)
    await a.login(ALICE, idp.keys[0].token(ALICE, email=ALICE))
    assert (await a.cmd(f'PUTSCRIPT "{name}"'.encode(), SCRIPT))[-1].startswith(b"OK")
    b = await Client.connect(port, stack)
    await b.login(BOB, idp.keys[0].token(BOB, email=BOB))
    assert name.encode() not in b"".join(await b.cmd(b"LISTSCRIPTS"))
    assert (await a.cmd(f'DELETESCRIPT "{name}"'.encode()))[-1].startswith(b"OK")
    for c in (a, b):
        c.writer.close()


async def test_refusals(make_proxy, stack, idp, tmp_path):
    port = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    c = Client(reader, writer)
    await c.response()
    ir = base64.b64encode(b"\0alice@example.com\0x").decode()
    assert (await c.cmd(f'AUTHENTICATE "PLAIN" "{ir}"'.encode()))[-1].startswith(b"NO (ENCRYPT-NEEDED)")
    assert (await c.cmd(b'LISTSCRIPTS'))[-1].startswith(b"NO")
    writer.close()
    c = await Client.connect(port, stack)
    token = idp.keys[0].token(ALICE, email=ALICE)
    assert (await c.login(BOB, token)).startswith(b"NO")        # another user's name
    assert (await c.login(ALICE, "not-a-token")).startswith(b"NO")
    last = await c.login(ALICE, "again")
    assert last.startswith(b"NO")
    assert (await asyncio.wait_for(c.reader.read(), 5)).startswith(b"BYE")  # three failures
    c.writer.close()
    policy = tmp_path / "no-sieve.yaml"
    policy.write_text("name: no-sieve\nversion: 1\nrules:\n  - id: imap\n    effect: allow\n"
                      "    http_methods: [IMAP]\n    paths: [/mail/imap]\n")
    port = await make_proxy(**{"addons.policy": {"files": [str(policy)]}})
    c = await Client.connect(port, stack)
    assert b"Not allowed" in await c.login(ALICE, token)
    c.writer.close()


async def test_empty_chain_passes_the_clients_own_login(make_proxy, stack):
    port = await make_proxy(chain=[])
    c = await Client.connect(port, stack)
    assert (await c.login(ALICE, "wrong")).startswith(b"NO")
    assert (await c.login(ALICE, stack.users[ALICE])).startswith(b"OK")
    assert (await c.cmd(b"LISTSCRIPTS"))[-1].startswith(b"OK")
    c.writer.close()
