"""The ManageSieve listener (RFC 5804 up to authentication): mail rules (Sieve scripts, RFC 5228)
managed by the user's own mail client through the proxy. The proxy greets with its capabilities,
offers STARTTLS, takes AUTHENTICATE (PLAIN, XOAUTH2, OAUTHBEARER), decides the login through the
addon chain (proxy.mail: `SIEVE /mail/sieve`), logs in to the user's server on its own connection
(usually STARTTLS on port 4190) and from then on relays bytes both ways: PUTSCRIPT, CHECKSCRIPT,
SETACTIVE and the rest reach the server untouched.

Before the login the SIEVE capability is the configured `sieve_extensions` (the user's server is
not known yet); after it, CAPABILITY is the server's own. Credentials are refused on a connection
without TLS unless `allow_plaintext_auth`; bytes that follow STARTTLS in the same read end the
connection.
"""
from __future__ import annotations

import asyncio
import logging

from . import mail
from .mail import (CommandSyntax, Credentials, Grant, MailServer, SaslError, literal_of, parse_sasl,
                   read_command, read_line, split_args)

__all__ = ["SieveServer", "SieveSyntax", "parse_sieve_command", "quoted"]

log = logging.getLogger("sge.mail.sieve")

_BYE = {"failures": b'BYE "Too many failed logins."\r\n', "timeout": b'BYE "No login in time."\r\n',
        "long": b'BYE "Line too long."\r\n'}


class SieveSyntax(CommandSyntax):
    """A command the proxy cannot parse: answered NO."""


def quoted(s: str) -> str:
    """A ManageSieve quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_sieve_command(data: bytes) -> tuple[str, list[bytes]]:
    """A command line: its upper-case name and its arguments (proxy.mail.split_args). Pure;
    SieveSyntax if malformed."""
    if data.lstrip(b" ")[:1] == b'"':
        raise SieveSyntax("a command starts with its name")
    try:
        return command_of(split_args(data))
    except CommandSyntax as e:
        raise SieveSyntax(str(e)) from None


def command_of(words: list[bytes]) -> tuple[str, list[bytes]]:
    if not words or not words[0].isalpha():
        raise SieveSyntax("a command starts with its name")
    return words[0].decode("ascii").upper(), words[1:]


class SieveServer(MailServer):
    protocol = "sieve"
    alpn = "managesieve"
    busy = b'BYE (TRYLATER) "Too many connections, try again later."\r\n'

    # ------------------------------------------------------------------ reading
    async def _command(self, reader: asyncio.StreamReader) -> tuple[str, list[bytes]]:
        """One command, literals included (ManageSieve's client literals never wait), at most
        `max_line` bytes in all."""
        try:
            return command_of(await read_command(reader, self.opts.max_line, None))
        except CommandSyntax as e:
            raise SieveSyntax(str(e)) from None

    async def _string(self, reader: asyncio.StreamReader) -> bytes:
        """One string from the client (a SASL response): quoted or a literal."""
        line = await read_line(reader, self.opts.max_line)
        lit = literal_of(line)
        if lit is not None:
            data = await reader.readexactly(lit[0])
            await read_line(reader, 2)  # the CRLF after it
            return data
        try:
            args = split_args(line.rstrip(b"\r\n"))
        except CommandSyntax as e:
            raise SieveSyntax(str(e)) from None
        if len(args) != 1 or args[0] == b"\0":
            raise SieveSyntax("expected one string")
        return args[0]

    # ------------------------------------------------------------------ the session
    def _capabilities(self, writer: asyncio.StreamWriter) -> bytes:
        tls = writer.get_extra_info("sslcontext") is not None
        mechs = " ".join(mail.MECHANISMS) if mail.plaintext_allowed(self.opts, writer) else ""
        lines = ['"IMPLEMENTATION" "sge-mail-proxy"', f'"SASL" "{mechs}"',
                 f'"SIEVE" {quoted(self.opts.sieve_extensions)}', '"VERSION" "1.0"']
        if not tls and self.opts.tls == "starttls":
            lines.append('"STARTTLS"')
        return ("\r\n".join(lines) + "\r\nOK\r\n").encode()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = self.peer_of(writer)
        writer.write(self._capabilities(writer))

        async def step() -> object:
            try:
                name, args = await self._command(reader)
            except SieveSyntax as e:
                writer.write(f"NO {quoted(str(e))}\r\n".encode())
                return None
            if self.stopping:
                writer.write(b'BYE (TRYLATER) "The proxy is shutting down."\r\n')
                return True
            return await self._dispatch(name, args, reader, writer, peer)

        done = await self.until_login(writer, step, _BYE)
        if done is not None:
            await self.relay_session((reader, writer), *done)

    async def _dispatch(self, name: str, args: list[bytes], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, peer: str):
        """None: go on; True: the session ends; False: a failed login; a tuple: logged in."""
        w = writer.write
        if name == "CAPABILITY":
            w(self._capabilities(writer))
        elif name == "NOOP":
            tag = f" (TAG {quoted(args[0].decode('utf-8', 'replace'))})" if args else ""
            w(f'OK{tag} "Done"\r\n'.encode())
        elif name == "LOGOUT":
            w(b'OK "Logout complete"\r\n')
            return True
        elif name == "STARTTLS":
            if writer.get_extra_info("sslcontext") is not None or self.opts.tls != "starttls":
                w(b'NO "STARTTLS is not available here"\r\n')
                return None
            if reader._buffer:  # type: ignore[attr-defined]  # bytes sent in clear behind STARTTLS
                w(b'NO "Nothing may follow STARTTLS before the handshake"\r\n')
                return True
            w(b'OK "Begin TLS negotiation now"\r\n')
            await writer.drain()
            await writer.start_tls(self.tls_ctx)
            w(self._capabilities(writer))  # RFC 5804 2.2: the capabilities again, after the handshake
        elif name == "AUTHENTICATE":
            if not mail.plaintext_allowed(self.opts, writer):
                w(b'NO (ENCRYPT-NEEDED) "Use STARTTLS before logging in"\r\n')
                return None
            if not args or len(args) > 2:
                w(b'NO "AUTHENTICATE takes a mechanism and an optional initial response"\r\n')
                return None
            mech = args[0].decode("ascii", "replace").upper()
            if mech not in mail.MECHANISMS:
                w(b'NO "Unsupported mechanism"\r\n')
                return None
            try:
                if len(args) == 2:
                    response = args[1]
                else:
                    w(b'""\r\n')
                    await writer.drain()
                    response = await self._string(reader)
                    if response == b"*":
                        w(b'NO "Authentication cancelled"\r\n')
                        return None
                creds = parse_sasl(mech, response.decode("ascii", "replace"))
            except (SaslError, SieveSyntax) as e:
                w(f"NO {quoted(str(e))}\r\n".encode())
                return None
            return await self._login(creds, mech, reader, writer, peer)
        else:
            w(b'NO "Authenticate first"\r\n')
        return None

    async def _login(self, creds: Credentials, mech: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, peer: str):
        async def challenge() -> None:  # RFC 7628: the error as a string, the client's dummy answer
            writer.write(f'"{mail.BEARER_ERROR}"\r\n'.encode())
            await writer.drain()
            await self._string(reader)

        async def refuse(status: int) -> None:
            await self._refuse(status, writer)

        done = await self.log_in(creds, mech, writer, peer, upstream=self._upstream_login, challenge=challenge,
                                 refuse=refuse, unavailable=b'NO (TRYLATER) "The mail server did not take the login"\r\n')
        if done is None:
            return False
        writer.write(b'OK "Logged in"\r\n')
        await writer.drain()
        return done[:3]

    async def _refuse(self, status: int, writer: asyncio.StreamWriter) -> None:
        if status == 401:
            await asyncio.sleep(self.opts.failure_delay)
            writer.write(b'NO "Authentication failed"\r\n')
        elif status == 403:
            writer.write(b'NO "Not allowed to manage mail rules here"\r\n')
        else:  # 429, no server, the chain failing
            writer.write(b'NO (TRYLATER) "Try again later"\r\n')

    async def _upstream_login(self, target, grant: Grant, ur: asyncio.StreamReader,
                              uw: asyncio.StreamWriter) -> None:
        """The server's capabilities, STARTTLS when configured (then its capabilities again),
        then AUTHENTICATE with an initial response. ValueError unless it ends with OK."""
        limit = max(self.opts.max_line, 65536)
        async with asyncio.timeout(self.engine.config.stalwart.request_timeout):
            await _until_ok(ur, limit)
            if self.opts.upstream_tls == "starttls":
                uw.write(b"STARTTLS\r\n")
                await uw.drain()
                if not (await read_line(ur, limit)).upper().startswith(b"OK"):
                    raise ValueError("the server refused STARTTLS")
                await uw.start_tls(self.gate.tls_context(), server_hostname=target.host)
                await _until_ok(ur, limit)
            login = grant.login
            uw.write(f'AUTHENTICATE "{login.mechanism}" "{login.initial_response()}"\r\n'.encode("ascii"))
            await uw.drain()
            line = await read_line(ur, limit)
            if line.startswith((b'"', b"{")):  # a challenge: RFC 7628's error; the dummy answer
                if line.startswith(b"{"):
                    await ur.readexactly((literal_of(line) or (0, False))[0])
                    await read_line(ur, limit)
                uw.write(b'"AQ=="\r\n')
                await uw.drain()
                line = await read_line(ur, limit)
            if not line.upper().startswith(b"OK"):
                raise ValueError("the server refused the login")


async def _until_ok(reader: asyncio.StreamReader, cap: int) -> None:
    """Read a capability listing up to its OK (NO or BYE: ValueError)."""
    for _ in range(200):
        line = await read_line(reader, cap)
        head = line[:3].upper()
        if head.startswith(b"OK"):
            return
        if head.startswith(b"NO") or head == b"BYE":
            raise ValueError("the server said no")
    raise ValueError("no end to the server's capabilities")
