"""The SMTP submission listener (RFC 6409; RFC 5321 and RFC 4954 up to AUTH): the proxy greets the
client, offers STARTTLS, takes AUTH (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER), decides the login through
the addon chain (proxy.mail), logs in to the user's server on its own connection and from then on
relays bytes both ways. Nothing after AUTH is parsed: MAIL, RCPT, DATA, BDAT and pipelining reach
the server as the client sent them.

Before AUTH only EHLO/HELO, STARTTLS, AUTH, NOOP, RSET and QUIT are answered; the envelope
commands get 530. The EHLO answer is conservative (8BITMIME, ENHANCEDSTATUSCODES, STARTTLS, AUTH):
the client keeps it once the relay starts, so it must not promise what the server behind may not
do (a client that wants the server's own list sends EHLO again after AUTH). Credentials are
refused on a connection without TLS (538) unless `allow_plaintext_auth`; bytes that follow
STARTTLS in the same read end the connection (command injection across the TLS upgrade,
CVE-2011-0411's class).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from . import mail
from .mail import Credentials, Grant, MailServer, SaslError, parse_sasl, plaintext_allowed

__all__ = ["SubmissionServer", "MECHANISMS", "UpstreamRefused", "multiline", "ehlo_reply",
           "parse_reply_line", "read_reply"]

log = logging.getLogger("sge.mail.smtp")

MECHANISMS = ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER")
_MAX_FAILURES = 3
_NEEDS_AUTH = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN"})
_USERNAME, _PASSWORD = "VXNlcm5hbWU6", "UGFzc3dvcmQ6"  # LOGIN's challenges: "Username:", "Password:"


# ---------------------------------------------------------------------------- replies (pure)
def multiline(code: int, lines: list[str]) -> bytes:
    """One reply of several lines: `250-a`, `250-b`, `250 c` (RFC 5321 4.2.1)."""
    last = len(lines) - 1
    return b"".join(f"{code}{' ' if i == last else '-'}{text}\r\n".encode() for i, text in enumerate(lines))


def ehlo_reply(hostname: str, *, starttls: bool, auth: bool) -> bytes:
    """The proxy's EHLO answer: what it can promise whatever server the login lands on."""
    lines = [hostname, "8BITMIME", "ENHANCEDSTATUSCODES"]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH " + " ".join(MECHANISMS))
    return multiline(250, lines)


def parse_reply_line(line: bytes) -> tuple[int, bool]:
    """(code, more) of one reply line: `250-...` is followed by more lines, `250 ...` (or a bare
    `250`) ends the reply. ValueError for anything else (never quoting the line: a server that
    echoes a command would put the proxy's credentials in the log)."""
    body = line.rstrip(b"\r\n")
    code, sep = body[:3], body[3:4]
    if len(code) != 3 or not code.isdigit() or code[0] not in b"2345" or sep not in (b"", b" ", b"-"):
        raise ValueError("malformed SMTP reply")
    return int(code), sep == b"-"


async def read_reply(reader: asyncio.StreamReader) -> int:
    """The code of the server's next (possibly multi-line) reply."""
    first = None
    while True:
        code, more = parse_reply_line(await reader.readuntil(b"\n"))
        if first is not None and code != first:
            raise ValueError("reply lines with different codes")
        first = code
        if not more:
            return code


# ---------------------------------------------------------------------------- the session
class UpstreamRefused(mail.UpstreamLoginError):
    """The mail server did not take the proxy's login: its reply code (for the log)."""

    def __init__(self, code: int, step: str) -> None:
        super().__init__(f"the server answered {code} ({step})")
        self.code = code


class _End(Exception):
    """End the session, after `reply` when there is one."""

    def __init__(self, reply: str | None) -> None:
        super().__init__(reply)
        self.reply = reply


class _Cancelled(Exception):
    """The client answered a SASL challenge with `*` (RFC 4954 4)."""


@dataclass
class _Conn:
    """One client connection before its login."""
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    ehlo: bool = False  # AUTH wants an EHLO since the connection (or the TLS upgrade) began
    failures: int = 0

    def say(self, text: str) -> None:
        self.writer.write(text.encode("utf-8", "replace") + b"\r\n")

    @property
    def tls(self) -> bool:
        return self.writer.get_extra_info("sslcontext") is not None


_Login = tuple[Grant, asyncio.StreamReader, asyncio.StreamWriter]


class SubmissionServer(MailServer):
    """The submission listener: each connection's dialogue up to AUTH, then the relay."""

    protocol = "submission"
    alpn = "smtp"
    busy = b"421 4.7.0 Too many connections, try again later\r\n"

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer, self.peer_of(writer))
        host = self.opts.hostname
        conn.say(f"220 {host} ESMTP sge-mail-proxy")
        try:
            async with asyncio.timeout(self.opts.login_timeout):
                while (login := await self._command(conn)) is None:
                    pass
        except _End as e:
            if e.reply is not None:
                conn.say(e.reply)
            return
        except TimeoutError:
            conn.say(f"421 4.4.2 {host} Authentication timeout, closing connection")
            return
        await self.relay_session((reader, writer), *login)

    async def _line(self, conn: _Conn) -> str:
        """One command line or SASL response, at most `max_line` bytes (LF ends it, a CR before
        it is dropped); EOF: IncompleteReadError, which ends the session quietly."""
        try:
            raw = await conn.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _End("500 5.5.2 Line too long") from None
        if len(raw) > self.opts.max_line:
            raise _End("500 5.5.2 Line too long")
        return raw[:-1].removesuffix(b"\r").decode("utf-8", "replace")

    async def _command(self, conn: _Conn) -> _Login | None:
        """Read and answer one command: None to go on, the login once AUTH succeeded; _End to
        close."""
        await conn.writer.drain()
        line = await self._line(conn)
        if self.stopping:
            raise _End("421 4.3.2 Shutting down")
        verb, _, arg = line.strip().partition(" ")
        verb = verb.upper()
        if verb == "EHLO":
            if not arg.strip():
                conn.say("501 5.5.4 Syntax: EHLO hostname")
                return None
            conn.ehlo = True
            starttls = not conn.tls and self.opts.tls == "starttls"
            conn.writer.write(ehlo_reply(self.opts.hostname, starttls=starttls,
                                         auth=plaintext_allowed(self.opts, conn.writer)))
        elif verb == "HELO":
            conn.ehlo = False  # no extensions, so no AUTH either
            conn.say(f"250 {self.opts.hostname}")
        elif verb == "STARTTLS":
            await self._starttls(conn, arg)
        elif verb == "AUTH":
            return await self._auth(conn, arg.strip())
        elif verb in ("NOOP", "RSET"):
            conn.say("250 2.0.0 OK")
        elif verb == "QUIT":
            raise _End("221 2.0.0 Bye")
        elif verb in _NEEDS_AUTH:
            conn.say("530 5.7.0 Authentication required")
        elif not verb:
            conn.say("500 5.5.2 Syntax error")
        else:
            conn.say("500 5.5.1 Unrecognized command")
        return None

    async def _starttls(self, conn: _Conn, arg: str) -> None:
        if conn.tls:
            conn.say("503 5.5.1 Already in TLS")
            return
        if arg.strip():
            conn.say("501 5.5.4 Syntax: STARTTLS takes no parameters")
            return
        if conn.reader._buffer:  # type: ignore[attr-defined]  # sent in clear behind STARTTLS
            raise _End(None)
        conn.say("220 2.0.0 Ready to start TLS")
        await conn.writer.drain()
        await conn.writer.start_tls(self.tls_ctx)
        conn.ehlo = False  # RFC 3207 4.2: nothing learnt before the upgrade counts

    # ------------------------------------------------------------------ AUTH
    async def _auth(self, conn: _Conn, arg: str) -> _Login | None:
        if not conn.ehlo:
            conn.say("503 5.5.1 EHLO first")
            return None
        if not plaintext_allowed(self.opts, conn.writer):
            conn.say("538 5.7.11 Encryption required for requested authentication mechanism")
            return None
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech not in MECHANISMS:
            conn.say("504 5.5.4 Unrecognized authentication type" if mech else "501 5.5.4 Syntax: AUTH mechanism")
            return None
        try:
            creds = await self._credentials(conn, mech, initial.strip())
        except _Cancelled:
            conn.say("501 5.7.0 Authentication cancelled")
            return None
        except SaslError:
            conn.say("501 5.5.2 Cannot decode response")
            return None
        login = await self._login(conn, mech, creds)
        if login is None:
            conn.failures += 1
            if conn.failures >= _MAX_FAILURES:
                raise _End("421 4.7.0 Too many failures")
        return login

    async def _challenge(self, conn: _Conn, text: str) -> str:
        conn.say(f"334 {text}")
        await conn.writer.drain()
        answer = (await self._line(conn)).strip()
        if answer == "*":
            raise _Cancelled()
        return answer

    async def _credentials(self, conn: _Conn, mech: str, initial: str) -> Credentials:
        """The client's credentials: from the initial response (`=` is an empty one) or asked
        for with a challenge. SaslError if they cannot be decoded."""
        if mech == "LOGIN":
            user = _decoded(initial or await self._challenge(conn, _USERNAME), "user")
            password = _decoded(await self._challenge(conn, _PASSWORD), "password")
            if not user or not password:
                raise SaslError("LOGIN wants a user name and a password")
            return Credentials(user, password)
        response = initial or await self._challenge(conn, "")
        return parse_sasl(mech, "" if response == "=" else response)

    async def _login(self, conn: _Conn, mech: str, creds: Credentials) -> _Login | None:
        """The chain's decision, then the proxy's own login at the user's server. None (the
        client answered) when either says no."""
        async def challenge() -> None:  # RFC 7628: the error challenge, the client's dummy answer
            conn.say(f"334 {mail.BEARER_ERROR}")
            await conn.writer.drain()
            await self._line(conn)

        async def refuse(status: int) -> None:
            await self._refuse(conn, status)

        done = await self.log_in(creds, mech, conn.writer, conn.peer, upstream=self._upstream_login,
                                 challenge=challenge, refuse=refuse,
                                 unavailable=b"454 4.7.0 Temporary authentication failure\r\n")
        if done is None:
            return None
        conn.say("235 2.7.0 Authentication successful")
        await conn.writer.drain()
        return done[:3]  # type: ignore[return-value]

    async def _refuse(self, conn: _Conn, status: int) -> None:
        if status == 401:
            await asyncio.sleep(self.opts.failure_delay)  # a guess costs time, as on the server
            conn.say("535 5.7.8 Authentication credentials invalid")
        elif status == 403:
            conn.say("550 5.7.1 Submission not allowed")
        else:  # 429, no server, the chain failing
            conn.say("454 4.7.0 Temporary authentication failure")

    async def _upstream_login(self, target: object, grant: Grant, ur: asyncio.StreamReader,
                              uw: asyncio.StreamWriter) -> None:
        """Log in on the proxy's connection: the greeting, EHLO, AUTH with an initial response.
        UpstreamRefused unless the server ends with 235."""
        login = grant.login
        async with asyncio.timeout(self.engine.config.stalwart.request_timeout):
            if (code := await read_reply(ur)) != 220:
                raise UpstreamRefused(code, "greeting")
            uw.write(f"EHLO {self.opts.hostname}\r\n".encode())
            await uw.drain()
            if (code := await read_reply(ur)) != 250:
                raise UpstreamRefused(code, "EHLO")
            ir = login.initial_response()
            line = f"AUTH {login.mechanism} {ir}\r\n"
            if len(line) <= 512:
                uw.write(line.encode())
            else:  # RFC 4954 section 4: no initial response past SMTP's 512-octet command line
                uw.write(f"AUTH {login.mechanism}\r\n".encode())
                await uw.drain()
                if (code := await read_reply(ur)) != 334:
                    raise UpstreamRefused(code, "AUTH")
                uw.write(ir.encode() + b"\r\n")
            await uw.drain()
            code = await read_reply(ur)
            if code == 334:  # OAUTHBEARER's error challenge gets the dummy answer (RFC 7628
                # 3.2.3), any other challenge a cancel: either way the final reply follows
                uw.write(b"AQ==\r\n" if login.mechanism == "OAUTHBEARER" else b"*\r\n")
                await uw.drain()
                code = await read_reply(ur)
            if code != 235:
                raise UpstreamRefused(code, "AUTH")


def _decoded(response: str, what: str) -> str:
    """One base64 LOGIN response as text (`=`: empty)."""
    return "" if response == "=" else mail._text(mail._b64(response), what)
