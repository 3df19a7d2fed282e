"""Mail protocols at the edge: what the IMAP and SMTP submission listeners share (docs/mail.md).

A mail session is authenticated by the proxy, not by the mail server: the client logs in with its
JWT or API key as the password (LOGIN, SASL PLAIN) or as an OAuth token (SASL XOAUTH2,
OAUTHBEARER), and that login runs through the same addon chain as an HTTP request. The chain sees
a request `IMAP /mail/imap` (or `SMTP /mail/submission`) carrying `Authorization: Bearer
<secret>`: auth proves who it is, rate_limit counts the attempt, the policy decides (rules match
the method and path like any other), the resolver picks the user's server, upstream_identity
says how to log in there. The proxy then opens its own connection to that server (TLS with the
client certificate), logs in with the credentials upstream_identity chose (SASL PLAIN with an
authorization identity for `authorize-as`, Stalwart's `user%impersonator` for `impersonate`,
OAUTHBEARER for a bearer token) and from then on relays bytes both ways untouched.

An empty chain (plain forwarding) has no auth: the client's own user name and password go to the
server as they came, the way HTTP plain forwarding passes the client's Authorization on.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Literal

from .errors import ConfigError, ProxyError
from .flow import Flow, Request
from .health import FALLBACKS
from .http1 import TrustedProxies
from .tls import server_context

if TYPE_CHECKING:
    from .engine import Engine
    from .target import Target

__all__ = ["MailListenerOptions", "ImapOptions", "SubmissionOptions", "SieveOptions", "MailOptions", "SaslError",
           "UpstreamLoginError", "Credentials", "UpstreamLogin", "Grant", "MailGate", "MailServer", "parse_sasl",
           "sasl_plain", "oauthbearer", "relay", "close", "CommandSyntax", "literal_of", "split_args", "read_line",
           "read_command", "proxy_header", "parse_proxy_header", "read_proxy_header", "endpoints",
           "mail_server_context", "ROUTES", "MAIL_ROUTES"]

log = logging.getLogger("sge.mail")

# what the chain sees of a mail login: method and path per protocol (policies match them)
ROUTES = {"imap": ("IMAP", "/mail/imap"), "submission": ("SMTP", "/mail/submission"),
          "sieve": ("SIEVE", "/mail/sieve")}
MAIL_ROUTES = frozenset(ROUTES)  # flow.route of a mail login (an HTTP request never gets these)
MECHANISMS = ("PLAIN", "XOAUTH2", "OAUTHBEARER")


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True, kw_only=True)
class MailListenerOptions:
    """One mail listener. Off unless `listen` is set.

    tls: starttls (plain first, STARTTLS offered, credentials refused before it) or implicit
      (TLS from the first byte, ports 993/465). The certificate is `tls.cert`/`tls.key` (certs-dev's
      when unset).
    upstream_port / upstream_tls: where the user's server takes this protocol: the host of its
      JMAP URL and this port, over TLS with the client certificate (implicit; starttls for
      ManageSieve) or, for a server on this machine's loopback only, in clear (none). `upstreams` names another HOST:PORT per target
      name (the routes' server names: official, tenant:acme, ...).
    upstream_proxy_protocol: v1 or v2 sends HAProxy's PROXY protocol header first, so that the
      server sees the client's address (Stalwart's per-address limits, bans and logs) instead of
      the proxy's; the server must be told to expect it from the proxy.
    proxy_protocol_from: CIDRs of load balancers in front that open each connection with a PROXY
      protocol header (v1 or v2): from them, the client is the address the header names (bans,
      logs, the header sent upstream). Not with tls: implicit (the header would precede TLS).
    allow_plaintext_auth: accept credentials on a connection without TLS (loopback testing).
    login_timeout: the whole pre-login dialogue; idle_timeout: no byte either way after it.
    max_sessions: open sessions at most; the next connection is told so and closed.
    """
    listen: str | None = None
    tls: Literal["starttls", "implicit"] = "starttls"
    upstream_port: int = 993
    upstream_tls: Literal["implicit", "none", "starttls"] = "implicit"
    upstreams: dict[str, str] = field(default_factory=dict)
    upstream_proxy_protocol: Literal["off", "v1", "v2"] = "off"
    proxy_protocol_from: tuple[str, ...] = ()
    allow_plaintext_auth: bool = False
    login_timeout: float = field(default=60.0, metadata={"kind": "duration"})
    idle_timeout: float = field(default=1860.0, metadata={"kind": "duration"})
    max_line: int = field(default=8192, metadata={"kind": "size"})
    max_sessions: int = 10_000
    failure_delay: float = field(default=1.0, metadata={"kind": "duration"})
    starttls_upstream = False  # (not a field: whether the protocol upgrades the server's connection itself)

    def __post_init__(self) -> None:
        if not 1 <= self.upstream_port <= 65535:
            raise ConfigError("upstream_port", f"must be a port number, got {self.upstream_port}")
        if self.max_line < 512:
            raise ConfigError("max_line", "must be at least 512 bytes")
        if self.max_sessions < 1:
            raise ConfigError("max_sessions", "must be at least 1")
        if self.proxy_protocol_from and self.tls == "implicit":
            raise ConfigError("proxy_protocol_from", "needs tls: starttls (a PROXY header cannot precede "
                              "the TLS handshake here)")
        for i, cidr in enumerate(self.proxy_protocol_from):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"proxy_protocol_from[{i}]", f"{cidr!r} is not an address or CIDR") from None
        if self.upstream_tls == "starttls" and not self.starttls_upstream:
            raise ConfigError("upstream_tls", "starttls is for ManageSieve (mail.sieve); use implicit or none")
        for name, addr in self.upstreams.items():
            if not isinstance(addr, str) or not addr.rpartition(":")[2].isdigit():
                raise ConfigError(f"upstreams.{name}", f"expected HOST:PORT, got {addr!r}")


@dataclass(frozen=True, kw_only=True)
class ImapOptions(MailListenerOptions):
    upstream_port: int = 993
    idle_timeout: float = field(default=1860.0, metadata={"kind": "duration"})  # RFC 9051: >= 30 min


@dataclass(frozen=True, kw_only=True)
class SubmissionOptions(MailListenerOptions):
    upstream_port: int = 465
    idle_timeout: float = field(default=300.0, metadata={"kind": "duration"})  # RFC 5321: 5 min
    hostname: str = "localhost"  # in the greeting and the EHLO the proxy sends upstream


# what both Stalwart and Cyrus implement: the SIEVE capability shown before the login (proxy.sieve)
DEFAULT_SIEVE_EXTENSIONS = ("fileinto reject envelope encoded-character vacation subaddress "
                            "comparator-i;ascii-numeric relational regex imap4flags copy include variables "
                            "body date index mailbox")


@dataclass(frozen=True, kw_only=True)
class SieveOptions(MailListenerOptions):
    """mail.sieve (ManageSieve, RFC 5804): as the other listeners, plus `sieve_extensions`, the
    SIEVE capability shown before the login (the user's server is not known yet)."""
    upstream_port: int = 4190
    upstream_tls: Literal["implicit", "none", "starttls"] = "starttls"  # ManageSieve's usual
    idle_timeout: float = field(default=1800.0, metadata={"kind": "duration"})
    sieve_extensions: str = DEFAULT_SIEVE_EXTENSIONS
    starttls_upstream = True


@dataclass(frozen=True, kw_only=True)
class MailOptions:
    imap: ImapOptions = field(default_factory=ImapOptions)
    submission: SubmissionOptions = field(default_factory=SubmissionOptions)
    sieve: SieveOptions = field(default_factory=SieveOptions)


def mail_server_context(engine: "Engine", alpn: str) -> ssl.SSLContext:
    """The listener's TLS context: the proxy's certificate, this protocol's ALPN name only (an
    HTTP client that lands here is not told it may speak HTTP)."""
    cfg = engine.config
    cert = cfg.resolve(cfg.tls.cert or Path("certs-dev/server.crt"))
    key = cfg.resolve(cfg.tls.key or Path("certs-dev/server.key"))
    assert cert is not None and key is not None
    ctx = server_context(cert=cert, key=key, min_version=cfg.tls.min_version)
    ctx.set_alpn_protocols([alpn])
    return ctx


# ---------------------------------------------------------------------------- SASL
class SaslError(ValueError):
    """A SASL response that cannot be decoded (the client gets a syntax error, not a login)."""


@dataclass(frozen=True)
class Credentials:
    """What the client logged in with. kind: "password" (LOGIN, PLAIN: the secret may be a JWT or
    an API key) or "bearer" (XOAUTH2, OAUTHBEARER)."""
    user: str | None
    secret: str
    kind: str = "password"
    authzid: str | None = None

    def __repr__(self) -> str:  # never print a secret
        return f"Credentials(user={self.user!r}, kind={self.kind!r})"


def _b64(data: bytes | str) -> bytes:
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    try:
        return base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("not base64") from None


def _text(b: bytes, what: str) -> str:
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        raise SaslError(f"{what} has control characters")
    return s


def parse_sasl(mechanism: str, response: bytes | str) -> Credentials:
    """Decode one client response of PLAIN (RFC 4616), XOAUTH2 (Google's) or OAUTHBEARER
    (RFC 7628). Pure; SaslError for anything malformed."""
    mech = mechanism.upper()
    data = _b64(response)
    if mech == "PLAIN":
        parts = data.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SaslError("PLAIN wants authzid NUL authcid NUL password")
        authzid = _text(parts[0], "authzid") or None
        return Credentials(_text(parts[1], "user"), _text(parts[2], "password"), "password", authzid)
    if mech == "XOAUTH2":  # user=...^Aauth=Bearer ...^A^A
        fields = dict(p.split(b"=", 1) for p in data.split(b"\x01") if b"=" in p)
        user, auth = fields.get(b"user"), fields.get(b"auth", b"")
        if not auth.lower().startswith(b"bearer ") or not auth[7:].strip():
            raise SaslError("XOAUTH2 wants auth=Bearer <token>")
        return Credentials(_text(user, "user") if user else None, _text(auth[7:].strip(), "token"), "bearer")
    if mech == "OAUTHBEARER":  # gs2-header ^A key=value ^A ... ^A^A
        head, sep, rest = data.partition(b"\x01")
        if not sep or not head.startswith((b"n,", b"y,")):
            raise SaslError("OAUTHBEARER wants a GS2 header (n,a=user,)")
        user = None
        for attr in head.split(b",")[1:]:
            if attr.startswith(b"a="):
                user = _text(attr[2:].replace(b"=2C", b",").replace(b"=3D", b"="), "user")
        fields = dict(p.split(b"=", 1) for p in rest.split(b"\x01") if b"=" in p)
        auth = fields.get(b"auth", b"")
        if not auth.lower().startswith(b"bearer ") or not auth[7:].strip():
            raise SaslError("OAUTHBEARER wants auth=Bearer <token>")
        return Credentials(user, _text(auth[7:].strip(), "token"), "bearer")
    raise SaslError(f"mechanism {mech} is not offered")


def sasl_plain(authcid: str, password: str, authzid: str | None = None) -> str:
    """A PLAIN initial response, base64."""
    raw = f"{authzid or ''}\0{authcid}\0{password}".encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


def oauthbearer(user: str, token: str) -> str:
    """An OAUTHBEARER initial response (RFC 7628), base64."""
    a = user.replace("=", "=3D").replace(",", "=2C")
    return base64.b64encode(f"n,a={a},\x01auth=Bearer {token}\x01\x01".encode("utf-8")).decode("ascii")


# ---------------------------------------------------------------------------- command syntax
class CommandSyntax(ValueError):
    """A command line the proxy cannot parse (IMAP answers BAD, ManageSieve NO)."""


_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}\r?\n\Z")


def literal_of(line: bytes) -> tuple[int, bool] | None:
    """(size, synchronizing) when `line` ends with a literal's announcement: {5} or {5+}
    (IMAP and ManageSieve write them alike). Pure."""
    m = _LITERAL.search(line)
    if m is None:
        return None
    return int(m.group(1)), m.group(2) != b"+"


def split_args(data: bytes) -> list[bytes]:
    """The words of a command line: atoms, and quoted strings unescaped (\\ and \"); each NUL
    byte stands for a literal, which `read_command` put there in place of its announcement and
    hands over separately. Pure; CommandSyntax if malformed."""
    args: list[bytes] = []
    i, n = 0, len(data)
    while i < n:
        c = data[i:i + 1]
        if c == b" ":
            i += 1
            continue
        if c == b'"':
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise CommandSyntax("unterminated quoted string")
                ch = data[i:i + 1]
                if ch == b"\\":
                    nxt = data[i + 1:i + 2]
                    if nxt not in (b"\\", b'"'):
                        raise CommandSyntax("bad escape in quoted string")
                    out += nxt
                    i += 2
                    continue
                if ch == b'"':
                    i += 1
                    break
                if ch in (b"\r", b"\n", b"\0"):
                    raise CommandSyntax("control character in quoted string")
                out += ch
                i += 1
            args.append(bytes(out))
            continue
        j = data.find(b" ", i)
        j = n if j < 0 else j
        word = data[i:j]
        if b"\0" in word and word != b"\0":
            raise CommandSyntax("a literal must be an argument of its own")
        args.append(word)
        i = j
    return args


async def read_line(reader: asyncio.StreamReader, cap: int) -> bytes:
    """One line (LF-terminated, CR optional), at most `cap` bytes (LimitOverrunError beyond);
    EOF: IncompleteReadError."""
    line = await reader.readuntil(b"\n")
    if len(line) > max(cap, 2):
        raise asyncio.LimitOverrunError("line too long", len(line))
    return line


async def read_command(reader: asyncio.StreamReader, cap: int,
                       go_ahead: "Callable[[], Awaitable[None]] | None") -> list[bytes]:
    """One command's words, literals included, at most `cap` bytes in all. A synchronizing
    literal waits for `go_ahead()` (IMAP's continuation request); without one (ManageSieve)
    every literal is taken as it comes."""
    parts: list[bytes] = []
    literals: list[bytes] = []
    total = 0
    while True:
        line = await read_line(reader, cap - total)
        total += len(line)
        if b"\0" in line:
            raise CommandSyntax("NUL in a command")
        lit = literal_of(line)
        if lit is None:
            parts.append(line.rstrip(b"\r\n"))
            break
        size, sync = lit
        parts.append(line[:_LITERAL.search(line).start()] + b"\0")  # type: ignore[union-attr]
        if total + size > cap:
            if sync and go_ahead is not None:  # nothing sent yet: refuse it, read on
                raise CommandSyntax("literal too large")
            raise ConnectionError("a literal too large is on its way")
        if sync and go_ahead is not None:
            await go_ahead()
        literals.append(await reader.readexactly(size))
        total += size
    it = iter(literals)
    return [next(it) if a == b"\0" else a for a in split_args(b"".join(parts))]


# ---------------------------------------------------------------------------- the login decision
@dataclass(frozen=True)
class UpstreamLogin:
    """How the proxy logs in to the mail server: SASL PLAIN (authcid, password, optional
    authzid) or OAUTHBEARER (user, token)."""
    mechanism: str  # "PLAIN" | "OAUTHBEARER"
    user: str
    secret: str
    authzid: str | None = None

    def initial_response(self) -> str:
        if self.mechanism == "OAUTHBEARER":
            return oauthbearer(self.user, self.secret)
        return sasl_plain(self.user, self.secret, self.authzid)

    def __repr__(self) -> str:
        return f"UpstreamLogin({self.mechanism}, user={self.user!r}, authzid={self.authzid!r})"


@dataclass
class Grant:
    """A login the chain allowed: the flow (for the logs), where to go and how to log in."""
    flow: Flow
    targets: list["Target"]
    login: UpstreamLogin


class UpstreamLoginError(Exception):
    """The mail server did not take the proxy's own login (its message names no credential)."""


BEARER_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
BEARER_ERROR = base64.b64encode(b'{"status":"invalid_token"}').decode("ascii")  # RFC 7628 3.2.2's challenge
_UPSTREAM_ERRORS = (UpstreamLoginError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError, ValueError)


class LoginRefused(Exception):
    """The chain (or the proxy) refused the login. `status` is the HTTP status the chain gave
    (401: bad credentials, 403: policy, 429: rate limit, 503: no server); `reason` is safe to
    show."""

    def __init__(self, status: int, reason: str, flow: Flow | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.flow = flow


def _same_user(given: str, flow: Flow) -> bool:
    ident = flow.identity
    if ident is None:
        return True
    g = given.casefold()
    return g in {ident.subject.casefold(), ident.login.casefold()}


def upstream_login(flow: Flow, creds: Credentials, mode: str | None,
                   pairs: "list[tuple[str, str]]") -> UpstreamLogin:
    """The credentials to log in upstream with: what upstream_identity (`mode`, None when the
    chain has none) gives for this flow's user and server (`pairs`, its header pairs: Basic is
    SASL PLAIN with Authorize-As as the authorization identity, Bearer is OAUTHBEARER), or the
    client's own in passthrough and with an empty chain. Pure."""
    if mode is None or mode == "passthrough":
        if mode is None and flow.identity is not None:
            raise LoginRefused(502, "No upstream identity is configured for mail logins "
                                    "(addons.upstream_identity).", flow)
        if creds.kind == "bearer":
            return UpstreamLogin("OAUTHBEARER", creds.user or "", creds.secret)
        return UpstreamLogin("PLAIN", creds.user or "", creds.secret, creds.authzid)
    headers = {k.lower(): v for k, v in pairs}
    scheme, _, value = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "basic":
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            raise LoginRefused(502, "The upstream identity is not usable for mail.", flow) from None
        if not sep:
            raise LoginRefused(502, "The upstream identity is not usable for mail.", flow)
        return UpstreamLogin("PLAIN", user, password, headers.get("authorize-as"))
    if scheme.lower() == "bearer" and value:
        ident = flow.identity
        return UpstreamLogin("OAUTHBEARER", ident.login if ident is not None else (creds.user or ""), value)
    raise LoginRefused(502, "The upstream identity is not usable for mail.", flow)


class MailGate:
    """Runs a mail login through the engine's current chain."""

    def __init__(self, engine: "Engine", protocol: str) -> None:
        self.engine = engine
        self.protocol = protocol
        self.method, self.path = ROUTES[protocol]
        m = engine.metrics
        self.logins = m.counter("sge_proxy_mail_logins_total", "Mail logins by protocol and result "
                                "(ok, refused: the chain said no, failed: the server or the network).",
                                ("protocol", "result"))

    async def login(self, creds: Credentials, peer: str) -> Grant:
        from .server import new_request_id
        eng = self.engine
        value = f"Bearer {creds.secret}".encode("latin-1", "replace")
        raw = [(b"authorization", b"Authorization", value)]
        req = Request(self.method, self.path, raw=raw, http_version="1.1", scheme=self.protocol,
                      host="", peer=peer)
        req.raw_connection = False
        flow = Flow(req, id=new_request_id(), client_addr=peer)
        flow.route = self.protocol
        flow.upstream = eng.default_target
        mgr = eng.generation.addons
        try:
            try:
                await mgr.run("requestheaders", flow)
                if flow.response is None:
                    await mgr.run("request", flow)
            finally:
                if flow._finalizers is not None:
                    flow.finish()  # a rate-limit slot is the login's, not the session's
            if flow.response is not None:
                status = flow.response.status_code
                if status < 400:
                    raise LoginRefused(403, "Mail logins cannot be answered by an addon.", flow)
                raise LoginRefused(status, "Login refused.", flow)
            if creds.user is not None and not _same_user(creds.user, flow):
                raise LoginRefused(401, "The user name does not match the credential.", flow)
            if creds.authzid is not None and not _same_user(creds.authzid, flow):
                # (acting as someone else is the upstream identity's business, never the client's)
                raise LoginRefused(401, "The authorization identity does not match the credential.", flow)
            ui = mgr.get("upstream_identity")
            mode = ui.plan(flow).mode if ui is not None else None
            pairs = ui.credentials(flow) if ui is not None and mode != "passthrough" else []
            login = upstream_login(flow, creds, mode, pairs)
            primary = flow.upstream or eng.default_target
            fallbacks = list(flow.metadata.get(FALLBACKS) or ())
            first, _ = eng.health.pick(primary, fallbacks, time.monotonic())
            targets = [first] + [t for t in (primary, *fallbacks) if t is not first]
        except ProxyError as e:
            flow.error = e
            self.logins.labels(self.protocol, "refused").inc()
            raise LoginRefused(e.status, e.detail if e.status != 401 else "Authentication failed.", flow) from None
        except LoginRefused as e:
            self.logins.labels(self.protocol, "refused").inc()
            e.flow = flow
            raise
        return Grant(flow, targets, login)

    def address(self, opts: MailListenerOptions, target: "Target") -> tuple[str, int]:
        named = opts.upstreams.get(target.name)
        if named is not None:
            host, _, port = named.rpartition(":")
            return host.strip("[]"), int(port)
        return target.host, opts.upstream_port

    def tls_context(self, grant: Grant | None = None) -> ssl.SSLContext:
        """The client-certificate TLS context for the server (it rotates: asked for each login)."""
        ctx = self.engine.tls.ctx
        if ctx is None:
            raise LoginRefused(503, "No client certificate is loaded.", grant.flow if grant else None)
        return ctx

    async def connect(self, opts: MailListenerOptions, grant: Grant, client: "Endpoints | None" = None
                      ) -> tuple["Target", asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the first of the route's servers that takes one (TLS with the client
        certificate unless upstream_tls is none), the PROXY protocol header first when asked for
        (`client`: the client connection's peer and local addresses)."""
        eng = self.engine
        last: Exception | None = None
        for target in grant.targets:
            host, port = self.address(opts, target)
            ctx = None
            if opts.upstream_tls == "starttls":  # the protocol upgrades the connection itself
                self.tls_context(grant)
            elif opts.upstream_tls == "none" and not _loopback(host):
                log.error("mail.%s.upstream_tls is none but %s is not a loopback address: refused",
                          self.protocol, host)
                last = ConnectionRefusedError(f"{host} is not loopback")
                continue
            if opts.upstream_tls == "implicit":
                ctx = self.tls_context(grant)
            limit = max(opts.max_line, 65536)
            try:
                async with asyncio.timeout(eng.config.stalwart.connect_timeout):
                    if opts.upstream_proxy_protocol == "off" or client is None:
                        reader, writer = await asyncio.open_connection(
                            host, port, ssl=ctx, server_hostname=target.host if ctx else None, limit=limit)
                    else:  # the header goes before the TLS handshake, on the bare TCP connection
                        reader, writer = await asyncio.open_connection(host, port, limit=limit)
                        writer.write(proxy_header(opts.upstream_proxy_protocol, *client))
                        if ctx is not None:
                            await writer.start_tls(ctx, server_hostname=target.host)
            except (OSError, TimeoutError) as e:
                last = e
                eng.audit.event("mail.upstream_failed", grant.flow, server=f"{host}:{port}",
                                reason=type(e).__name__)
                continue
            grant.flow.upstream = target
            return target, reader, writer
        self.logins.labels(self.protocol, "failed").inc()
        raise LoginRefused(503, "The mail server is unavailable.", grant.flow) from last


Endpoints = tuple[tuple[str, int], tuple[str, int]]  # (client's address, port), (ours it reached)
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """HAProxy's PROXY protocol header (v1 text, v2 binary) for a TCP connection from `src` to
    `dst`. Addresses of different families (or not IP at all) give the header for an unknown
    source (v1 UNKNOWN, v2 LOCAL): the server then uses the connection's own. Pure."""
    try:
        s_ip, d_ip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    except ValueError:
        s_ip = d_ip = None  # type: ignore[assignment]
    same = s_ip is not None and s_ip.version == d_ip.version
    if version == "v1":
        if not same:
            return b"PROXY UNKNOWN\r\n"
        fam = "TCP4" if s_ip.version == 4 else "TCP6"
        return f"PROXY {fam} {s_ip} {d_ip} {src[1]} {dst[1]}\r\n".encode("ascii")
    if not same:
        return _PROXY_V2 + b"\x20\x00" + struct.pack("!H", 0)  # LOCAL, UNSPEC
    fam = 0x11 if s_ip.version == 4 else 0x21  # TCP over IPv4 / IPv6
    body = s_ip.packed + d_ip.packed + struct.pack("!HH", src[1], dst[1])
    return _PROXY_V2 + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


_V1 = re.compile(rb"PROXY (?:(TCP4|TCP6) (\S+) (\S+) (\d{1,5}) (\d{1,5})|UNKNOWN[^\r\n]*)\r\n\Z")


def parse_proxy_header(head: bytes) -> Endpoints | None:
    """The (source, destination) a PROXY protocol header names, or None for one that names none
    (v1 UNKNOWN, v2 LOCAL or another family: the connection's own addresses stand). ValueError
    if malformed. `head`: the whole header (v1: its line; v2: the 16 bytes and what they announce).
    Pure."""
    if head.startswith(_PROXY_V2):
        if len(head) < 16 or head[12] >> 4 != 2:
            raise ValueError("not a PROXY v2 header")
        command, family = head[12] & 0x0F, head[13]
        (length,) = struct.unpack("!H", head[14:16])
        body = head[16:]
        if len(body) != length or command not in (0, 1):
            raise ValueError("a PROXY v2 header of the wrong length")
        if command == 0 or family not in (0x11, 0x21):
            return None  # LOCAL, or not TCP over IP
        n = 4 if family == 0x11 else 16
        if length < 2 * n + 4:
            raise ValueError("a PROXY v2 header too short for its addresses")
        src, dst = ipaddress.ip_address(body[:n]), ipaddress.ip_address(body[n:2 * n])
        sport, dport = struct.unpack("!HH", body[2 * n:2 * n + 4])
        return (str(src), sport), (str(dst), dport)
    m = _V1.fullmatch(head)
    if m is None:
        raise ValueError("not a PROXY header")
    if m.group(1) is None:
        return None
    src, dst = ipaddress.ip_address(m.group(2).decode()), ipaddress.ip_address(m.group(3).decode())
    if (src.version == 4) != (m.group(1) == b"TCP4") or src.version != dst.version:
        raise ValueError("PROXY v1 addresses of the wrong family")
    sport, dport = int(m.group(4)), int(m.group(5))
    if sport > 65535 or dport > 65535:
        raise ValueError("PROXY v1 port out of range")
    return (str(src), sport), (str(dst), dport)


async def read_proxy_header(reader: asyncio.StreamReader) -> Endpoints | None:
    """Read one PROXY header (v1: at most 107 bytes; v2: 16 and the announced length, at most
    216 for IP) and parse it."""
    first = await reader.readexactly(12)
    if first == _PROXY_V2:
        rest = await reader.readexactly(4)
        (length,) = struct.unpack("!H", rest[2:4])
        if length > 216:
            raise ValueError("a PROXY v2 header too long")
        return parse_proxy_header(first + rest + await reader.readexactly(length))
    line = first if first.endswith(b"\r\n") else first + await reader.readuntil(b"\n")
    if len(line) > 107:
        raise ValueError("a PROXY v1 line too long")
    return parse_proxy_header(line)


def endpoints(writer: asyncio.StreamWriter) -> Endpoints | None:
    """The client connection's (peer, local) addresses, for the PROXY protocol header."""
    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    if not peer or not local:
        return None
    return (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plaintext_allowed(opts: MailListenerOptions, writer: asyncio.StreamWriter) -> bool:
    return opts.allow_plaintext_auth or writer.get_extra_info("sslcontext") is not None


# ---------------------------------------------------------------------------- after the login
async def relay(client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                idle_timeout: float, counts: dict[str, int]) -> str:
    """Copy bytes both ways until either side closes or neither sends for `idle_timeout`.
    Back-pressure: each direction waits for its writer to drain before reading more. Returns
    who ended it: "client", "server" or "idle"."""
    last = [time.monotonic()]
    ended: list[str] = []

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, key: str, side: str) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                last[0] = time.monotonic()
                counts[key] += len(data)
                dst.write(data)
                await dst.drain()
        except (OSError, ssl.SSLError):
            pass
        ended.append(side)

    up = asyncio.ensure_future(pump(client[0], server[1], "in", "client"))
    down = asyncio.ensure_future(pump(server[0], client[1], "out", "server"))
    try:
        while True:
            remaining = last[0] + idle_timeout - time.monotonic()
            if remaining <= 0:
                ended.append("idle")
                break
            done, _ = await asyncio.wait((up, down), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
    finally:
        for t in (up, down):
            t.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    return ended[0] if ended else "idle"


async def close(writer: asyncio.StreamWriter) -> None:
    """Close a stream whatever state its peer left it in (an SSL shutdown race included)."""
    try:
        writer.close()
        async with asyncio.timeout(1):
            await writer.wait_closed()
    except (Exception, asyncio.CancelledError):  # (the last thing a session does: nothing to cancel)
        pass


def session_log(engine: "Engine", flow: Flow, status: int, counts: dict[str, int]) -> None:
    """The session's access-log line (written when it ends): bytes both ways, its duration."""
    flow.bytes_in = counts.get("in", 0)
    flow.bytes_out = counts.get("out", 0)
    elapsed = time.perf_counter() - flow.started
    engine.metrics.observe_request(flow.route, flow.request.method, status, elapsed)
    engine.log_access(flow, status, elapsed)


# ---------------------------------------------------------------------------- the listener
class MailServer:
    """One mail listener: accepts connections, runs `session(reader, writer)` for each in a
    Task, and on stop refuses new ones, gives the sessions `drain_timeout` to end, then closes
    them. A protocol subclasses it and writes `session` (proxy.imap, proxy.smtp, proxy.sieve)."""

    protocol = "imap"
    alpn = "imap"
    busy = b"* BYE [UNAVAILABLE] Too many connections; try again later.\r\n"  # past max_sessions

    def __init__(self, engine: "Engine", opts: MailListenerOptions) -> None:
        self.engine = engine
        self.opts = opts
        self.gate = MailGate(engine, self.protocol)
        self.tls_ctx = mail_server_context(engine, self.alpn)
        self.server: asyncio.AbstractServer | None = None
        self.sessions: set[asyncio.Task] = set()
        self.relaying: set[asyncio.Task] = set()  # logged in: bytes relayed (no login to finish)
        self._clients: dict[asyncio.StreamWriter, Endpoints] = {}  # from a balancer's PROXY header
        self._proxied_from = TrustedProxies(opts.proxy_protocol_from)
        self.stopping = False
        g = engine.metrics.gauge("sge_proxy_mail_sessions", "Open mail sessions by protocol (logged in or not).",
                                 ("protocol",))
        g.labels(self.protocol).set_function(lambda: len(self.sessions))
        self.refused = engine.metrics.counter(
            "sge_proxy_mail_sessions_refused_total", "Mail connections refused at max_sessions.",
            ("protocol",)).labels(self.protocol)

    async def start(self) -> None:
        assert self.opts.listen is not None
        from .config import parse_listen
        host, port = parse_listen(self.opts.listen, f"mail.{self.protocol}.listen")
        ssl_ctx = self.tls_ctx if self.opts.tls == "implicit" else None
        try:
            self.server = await asyncio.start_server(self._accepted, host, port, ssl=ssl_ctx, backlog=256,
                                                     limit=max(self.opts.max_line, 65536), reuse_address=True,
                                                     reuse_port=self.engine.worker is not None)
        except OSError as e:
            raise ConfigError(f"mail.{self.protocol}.listen", f"cannot listen on {host}:{port}: {e.strerror}") from None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self.sessions) >= self.opts.max_sessions:
            self.refused.inc()
            writer.write(self.busy)
            await close(writer)
            return
        self.sessions.add(task)
        try:
            if self._proxied_from and (writer.get_extra_info("peername") or ("",))[0] in self._proxied_from:
                try:
                    async with asyncio.timeout(5):
                        client = await read_proxy_header(reader)
                except (ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    log.info("%s: a connection from a balancer without a valid PROXY header: closed", self.protocol)
                    return
                if client is not None:
                    self._clients[writer] = client
            await self.session(reader, writer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s session failed", self.protocol)
        finally:
            self.sessions.discard(task)
            self.relaying.discard(task)
            self._clients.pop(writer, None)
            await close(writer)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def client_of(self, writer: asyncio.StreamWriter) -> Endpoints | None:
        """The client's (address, port) and ours: what a balancer's PROXY header said, else the
        connection's own."""
        return self._clients.get(writer) or endpoints(writer)

    def peer_of(self, writer: asyncio.StreamWriter) -> str:
        client = self.client_of(writer)
        return client[0][0] if client is not None else ""

    MAX_FAILURES = 3  # failed logins on one connection before it is closed

    async def until_login(self, writer: asyncio.StreamWriter, step: "Callable[[], Awaitable[object]]",
                          bye: dict[str, bytes]) -> "tuple[Grant, asyncio.StreamReader, asyncio.StreamWriter] | None":
        """The dialogue before the login: `step()` answers one command and says None (go on),
        True (the session ends), False (a failed login) or (grant, reader, writer) (logged in).
        Ends with `bye[...]` after MAX_FAILURES failures ("failures"), past login_timeout
        ("timeout") or on a line too long ("long"); None then."""
        failures = 0
        try:
            async with asyncio.timeout(self.opts.login_timeout):
                while True:
                    await writer.drain()
                    done = await step()
                    if done is True:
                        return None
                    if done is False:
                        failures += 1
                        if failures >= self.MAX_FAILURES:
                            writer.write(bye["failures"])
                            return None
                    elif isinstance(done, tuple):
                        return done  # type: ignore[return-value]
        except TimeoutError:
            writer.write(bye["timeout"])
        except asyncio.LimitOverrunError:
            writer.write(bye["long"])
        return None

    async def log_in(self, creds: Credentials, mech: str, writer: asyncio.StreamWriter, peer: str, *,
                     upstream: "Callable[..., Awaitable[object]]", challenge: "Callable[[], Awaitable[None]]",
                     refuse: "Callable[[int], Awaitable[None]]", unavailable: bytes
                     ) -> "tuple[Grant, asyncio.StreamReader, asyncio.StreamWriter, object] | None":
        """A login, whatever the protocol: the chain's decision (a refusal: `challenge()` first for
        a refused bearer token, RFC 7628 3.2.2, then `refuse(status)`), a connection to the user's
        server and `upstream(target, grant, reader, writer)`, the protocol's own login there (its
        failure: `unavailable` to the client). Audit, metrics and the access log either way. None
        when the client was refused; else the grant, the server connection and what `upstream`
        returned."""
        audit, proto = self.engine.audit, self.protocol
        try:
            grant = await self.gate.login(creds, peer)
            target, ur, uw = await self.gate.connect(self.opts, grant, self.client_of(writer))
        except LoginRefused as e:
            audit.event("mail.login_refused", e.flow, protocol=proto, status=e.status, mechanism=mech)
            if e.flow is not None:
                session_log(self.engine, e.flow, e.status, {"in": 0, "out": 0})
            if e.status == 401 and mech in BEARER_MECHANISMS:
                await challenge()
            await refuse(e.status)
            return None
        started = time.perf_counter()
        try:
            result = await upstream(target, grant, ur, uw)
        except asyncio.CancelledError:  # the login timeout, a shutdown
            uw.close()
            raise
        except _UPSTREAM_ERRORS as e:
            await close(uw)
            self.gate.logins.labels(proto, "failed").inc()
            audit.event("mail.login_refused", grant.flow, protocol=proto, status=502, mechanism=mech,
                        reason=type(e).__name__)
            log.warning("%s login at %s failed: %s", proto, target.name, e)
            session_log(self.engine, grant.flow, 502, {"in": 0, "out": 0})
            writer.write(unavailable)
            return None
        grant.flow.upstream_ms = (time.perf_counter() - started) * 1000
        self.gate.logins.labels(proto, "ok").inc()
        audit.event("mail.login", grant.flow, protocol=proto, mechanism=mech, server=target.name)
        return grant, ur, uw, result

    async def relay_session(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter], grant: Grant,
                            ur: asyncio.StreamReader, uw: asyncio.StreamWriter) -> None:
        """After the login: bytes both ways until either side leaves or both are idle, then the
        session's access-log line."""
        task = asyncio.current_task()
        if task is not None:
            self.relaying.add(task)  # (stop() closes these at once: see there)
        counts = {"in": 0, "out": 0}
        try:
            how = await relay(client, (ur, uw), self.opts.idle_timeout, counts)
            log.debug("%s session %s ended (%s)", self.protocol, grant.flow.id, how)
        finally:
            await close(uw)
            session_log(self.engine, grant.flow, 200, counts)

    async def stop(self, drain_timeout: float) -> None:
        """Logins under way may finish (bounded by drain_timeout); relayed sessions are closed at
        once (a mail client reconnects; waiting for it to log out could take days)."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for t in list(self.relaying):
            t.cancel()
        deadline = time.monotonic() + drain_timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in list(self.sessions):
            t.cancel()
        if self.sessions:
            await asyncio.gather(*self.sessions, return_exceptions=True)
        if self.server is not None:
            try:
                async with asyncio.timeout(1):
                    await self.server.wait_closed()
            except TimeoutError:
                pass
