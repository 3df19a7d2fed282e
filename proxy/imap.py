"""The IMAP listener (RFC 9051/3501 up to authentication): the proxy greets the client, offers
STARTTLS, takes LOGIN or AUTHENTICATE (PLAIN, XOAUTH2, OAUTHBEARER), decides the login through
the addon chain (proxy.mail), logs in to the user's server on its own connection and from then on
relays bytes both ways. Nothing after the login is parsed: IDLE, COMPRESS and every extension the
server offers work as they would directly.

Before the login only CAPABILITY, NOOP, ID, STARTTLS, LOGIN, AUTHENTICATE and LOGOUT are answered;
credentials are refused on a connection without TLS (LOGINDISABLED) unless
`allow_plaintext_auth`; bytes that follow STARTTLS in the same read are refused (command injection
across the TLS upgrade, CVE-2011-0411's class).
"""
from __future__ import annotations

import asyncio
import logging
import re

from . import mail
from .mail import (CommandSyntax, Credentials, MailServer, SaslError, literal_of, parse_sasl,
                   plaintext_allowed, read_command, read_line, split_args)

__all__ = ["ImapServer", "ImapSyntax", "parse_command", "command_of", "literal_of", "client_capabilities"]

log = logging.getLogger("sge.mail.imap")

_TAG = re.compile(rb"[!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+")
_BYE = {"failures": b"* BYE Too many failed logins.\r\n", "timeout": b"* BYE Autologout: no login in time.\r\n",
        "long": b"* BYE Command line too long.\r\n"}
_CAPABILITY_CODE = re.compile(r"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
# what the server says of the pre-login phase on its own connection with the proxy: nothing the
# client may act on once logged in
_PRE_LOGIN_CAPS = re.compile(r"(?:STARTTLS|LOGINDISABLED|SASL-IR|AUTH=\S+)\Z", re.IGNORECASE)


class ImapSyntax(CommandSyntax):
    """A command the proxy cannot parse: answered BAD."""


def parse_command(data: bytes) -> tuple[str, str, list[bytes]]:
    """Split a command line into tag, upper-case name and arguments (proxy.mail.split_args:
    atoms, quoted strings, a NUL for each literal). Pure; ImapSyntax if malformed."""
    try:
        return command_of(split_args(data))
    except CommandSyntax as e:
        raise ImapSyntax(str(e)) from None


def command_of(words: list[bytes]) -> tuple[str, str, list[bytes]]:
    """Tag, upper-case name and arguments of a command's words. Pure; ImapSyntax if malformed."""
    if len(words) < 2:
        raise ImapSyntax("a command is a tag and a name")
    tag, name = words[0], words[1]
    if not _TAG.fullmatch(tag) or b"\0" in name:
        raise ImapSyntax("invalid tag")
    return tag.decode("ascii"), name.decode("ascii", "replace").upper(), words[2:]


def client_capabilities(text: str) -> str:
    """The server's tagged OK text with its CAPABILITY response code cleaned of the pre-login
    capabilities of the proxy's own connection (STARTTLS, LOGINDISABLED, AUTH=...). Pure."""
    def clean(m: re.Match) -> str:
        caps = [c for c in m.group(1).split() if not _PRE_LOGIN_CAPS.match(c)]
        return f"[CAPABILITY {' '.join(caps)}]"
    return _CAPABILITY_CODE.sub(clean, text, count=1)


class ImapServer(MailServer):
    protocol = "imap"
    alpn = "imap"

    # ------------------------------------------------------------------ reading
    async def _command(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> tuple[str, str, list[bytes]]:
        """One command, literals included (synchronizing ones get a continuation request), at
        most `max_line` bytes in all."""
        async def go_ahead() -> None:
            writer.write(b"+ Ready for literal data\r\n")
            await writer.drain()

        try:
            return command_of(await read_command(reader, self.opts.max_line, go_ahead))
        except CommandSyntax as e:
            raise ImapSyntax(str(e)) from None

    # ------------------------------------------------------------------ the session
    def _capabilities(self, writer: asyncio.StreamWriter) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID"]
        tls = writer.get_extra_info("sslcontext") is not None
        if not tls and self.opts.tls == "starttls":
            caps.append("STARTTLS")
        if plaintext_allowed(self.opts, writer):
            caps += [f"AUTH={m}" for m in mail.MECHANISMS]
        else:
            caps.append("LOGINDISABLED")
        return " ".join(caps)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = self.peer_of(writer)
        writer.write(f"* OK [CAPABILITY {self._capabilities(writer)}] sge-mail-proxy IMAP ready\r\n".encode())

        async def step() -> object:
            try:
                tag, name, args = await self._command(reader, writer)
            except ImapSyntax as e:
                writer.write(f"* BAD {e}\r\n".encode())
                return None
            if self.stopping:
                writer.write(b"* BYE [UNAVAILABLE] The proxy is shutting down.\r\n")
                return True
            return await self._dispatch(tag, name, args, reader, writer, peer)

        done = await self.until_login(writer, step, _BYE)
        if done is not None:
            await self.relay_session((reader, writer), *done)

    async def _dispatch(self, tag: str, name: str, args: list[bytes], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, peer: str):
        """None: go on; True: the session ends; False: a failed login; a tuple: logged in
        (grant, upstream reader, upstream writer)."""
        w = writer.write
        if name == "CAPABILITY":
            w(f"* CAPABILITY {self._capabilities(writer)}\r\n{tag} OK CAPABILITY completed\r\n".encode())
        elif name == "NOOP":
            w(f"{tag} OK NOOP completed\r\n".encode())
        elif name == "ID":  # RFC 2971: allowed before the login
            w(f'* ID ("name" "sge-mail-proxy")\r\n{tag} OK ID completed\r\n'.encode())
        elif name == "LOGOUT":
            w(f"* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n".encode())
            return True
        elif name == "STARTTLS":
            if writer.get_extra_info("sslcontext") is not None or self.opts.tls != "starttls":
                w(f"{tag} BAD STARTTLS is not available here\r\n".encode())
                return None
            if reader._buffer:  # type: ignore[attr-defined]  # bytes sent after STARTTLS, in clear
                w(f"{tag} BAD Nothing may follow STARTTLS before the handshake\r\n".encode())
                return True
            w(f"{tag} OK Begin TLS negotiation now\r\n".encode())
            await writer.drain()
            await writer.start_tls(self.tls_ctx)
        elif name in ("LOGIN", "AUTHENTICATE"):
            if not plaintext_allowed(self.opts, writer):
                w(f"{tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n".encode())
                return None
            try:
                creds, mech = await self._credentials(tag, name, args, reader, writer)
            except SaslError as e:
                w(f"{tag} BAD {e}\r\n".encode())
                return None
            if creds is None:
                return None  # answered (cancelled, unsupported)
            return await self._login(tag, creds, mech, reader, writer, peer)
        elif name in ("SELECT", "EXAMINE", "LIST", "LSUB", "STATUS", "FETCH", "SEARCH", "APPEND", "CREATE",
                      "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "ENABLE", "IDLE", "NAMESPACE"):
            w(f"{tag} BAD Log in first\r\n".encode())
        else:
            w(f"{tag} BAD Unknown command\r\n".encode())
        return None

    async def _credentials(self, tag: str, name: str, args: list[bytes], reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> tuple[Credentials | None, str]:
        if name == "LOGIN":
            if len(args) != 2:
                writer.write(f"{tag} BAD LOGIN takes a user name and a password\r\n".encode())
                return None, "LOGIN"
            user = mail._text(args[0], "user")
            return Credentials(user, mail._text(args[1], "password"), "password"), "LOGIN"
        if not args or len(args) > 2:
            writer.write(f"{tag} BAD AUTHENTICATE takes a mechanism\r\n".encode())
            return None, ""
        mech = args[0].decode("ascii", "replace").upper()
        if mech not in mail.MECHANISMS:
            writer.write(f"{tag} NO [CANNOT] Unsupported mechanism\r\n".encode())
            return None, mech
        if len(args) == 2:
            response = b"" if args[1] == b"=" else args[1]
        else:
            writer.write(b"+ \r\n")
            await writer.drain()
            response = (await read_line(reader, self.opts.max_line)).rstrip(b"\r\n")
            if response == b"*":
                writer.write(f"{tag} BAD AUTHENTICATE cancelled\r\n".encode())
                return None, mech
        return parse_sasl(mech, response), mech

    async def _login(self, tag: str, creds: Credentials, mech: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, peer: str):
        async def challenge() -> None:  # RFC 7628: the error, the client's dummy answer, the failure
            writer.write(f"+ {mail.BEARER_ERROR}\r\n".encode())
            await writer.drain()
            await read_line(reader, self.opts.max_line)

        async def refuse(status: int) -> None:
            await self._refuse(tag, status, writer)

        done = await self.log_in(creds, mech, writer, peer, upstream=self._upstream_login, challenge=challenge,
                                 refuse=refuse,
                                 unavailable=f"{tag} NO [UNAVAILABLE] The mail server did not take the login\r\n".encode())
        if done is None:
            return False
        grant, ur, uw, text = done
        writer.write(f"{tag} OK {text}\r\n".encode("utf-8", "replace"))
        await writer.drain()
        return grant, ur, uw

    async def _refuse(self, tag: str, status: int, writer: asyncio.StreamWriter) -> None:
        if status == 401:
            await asyncio.sleep(self.opts.failure_delay)  # (a guess costs time, as on the server)
            writer.write(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n".encode())
        elif status == 403:
            writer.write(f"{tag} NO [AUTHORIZATIONFAILED] Not allowed to use IMAP here\r\n".encode())
        elif status == 429:
            writer.write(f"{tag} NO [LIMIT] Too many logins; try again later\r\n".encode())
        else:
            writer.write(f"{tag} NO [UNAVAILABLE] The mail server is not available\r\n".encode())

    async def _upstream_login(self, target: object, grant: mail.Grant, ur: asyncio.StreamReader,
                              uw: asyncio.StreamWriter) -> str:
        """Log in on the proxy's connection: the greeting, then AUTHENTICATE with an initial
        response (SASL-IR; a bare continuation request is answered too). Returns the text of
        the server's tagged OK (its CAPABILITY response code included) for the client."""
        limit = max(self.opts.max_line, 65536)
        async with asyncio.timeout(self.engine.config.stalwart.request_timeout):
            greeting = await read_line(ur, limit)
            if not greeting.startswith(b"* OK"):
                raise ValueError(f"unexpected greeting {greeting[:80]!r}")
            login = grant.login
            ir = login.initial_response()
            uw.write(f"A1 AUTHENTICATE {login.mechanism} {ir}\r\n".encode("ascii"))
            while True:
                line = await read_line(ur, limit)
                if line.startswith(b"+"):
                    # SASL-IR ignored (the response again) or an error challenge (an empty answer)
                    error = login.mechanism == "OAUTHBEARER" and len(line.strip()) > 1
                    uw.write(b"AQ==\r\n" if error else ir.encode("ascii") + b"\r\n")  # RFC 7628 3.2.3
                    continue
                if line.startswith(b"A1 "):
                    status, _, text = line[3:].rstrip(b"\r\n").partition(b" ")
                    if status.upper() != b"OK":
                        raise ValueError(f"the server answered {status.decode('ascii', 'replace')}")
                    return client_capabilities(text.decode("utf-8", "replace")) or "Logged in"
