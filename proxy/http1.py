"""HTTP/1.1 message rules the proxy applies on both legs. Sans-IO: headers in, headers/bytes out."""
from __future__ import annotations

import ipaddress
import re
from http import HTTPStatus
from typing import Sequence

from multidict import CIMultiDict

__all__ = ["HOP_BY_HOP", "RESPONSE_SCRUBBED", "names_headers", "request_scrubber", "response_scrubber",
           "status_line", "scrub_request", "scrub_response", "request_head", "response_head",
           "valid_request_id", "reason_phrase", "connection_tokens", "rewrite_location",
           "raw_request_head", "raw_response_head", "trace_id_of", "TrustedProxies", "forwarded_client"]

# RFC 9110 §7.6.1 plus the classic hop-by-hop list; Proxy-* are all dropped by prefix.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
                        "proxy-connection", "proxy-authenticate", "proxy-authorization"})
# what a client may not tell the upstream about where it came from or who it is
_CLIENT_SPOOFABLE_PREFIXES = ("x-forwarded-", "x-sge-", "proxy-")
_CLIENT_SPOOFABLE = frozenset({"forwarded", "x-real-ip", "x-client-ip"})
_RESPONSE_DROP = frozenset({"alt-svc"})

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{8,128}")
_REASONS = {s.value: s.phrase for s in HTTPStatus}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def valid_request_id(value: str | None) -> bool:
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


_TRACEPARENT = re.compile(rb"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-[^ \t]*)?[ \t]*")


def trace_id_of(traceparent: bytes) -> str | None:
    """The trace id of a W3C `traceparent` header (Trace Context, level 1), for the logs; None
    for a malformed one (version ff, an all-zero trace or parent id, a version 00 with extra
    fields). The header itself is passed on untouched either way. Pure."""
    m = _TRACEPARENT.fullmatch(traceparent)
    if m is None:
        return None
    version, trace, parent, _ = m.groups()
    if version == b"ff" or trace == b"0" * 32 or parent == b"0" * 16:
        return None
    if version == b"00" and len(traceparent.strip()) != 55:
        return None
    return trace.decode("ascii")


def connection_tokens(headers: CIMultiDict) -> set[str]:
    """Header names listed in Connection (they are hop-by-hop too)."""
    out: set[str] = set()
    for v in headers.getall("Connection", ()):
        for tok in v.split(","):
            tok = tok.strip().lower()
            if tok:
                out.add(tok)
    return out


_REQUEST_DROP = HOP_BY_HOP | _CLIENT_SPOOFABLE
_RESPONSE_DROP_ALL = HOP_BY_HOP | _RESPONSE_DROP
RESPONSE_SCRUBBED = _RESPONSE_DROP_ALL  # what scrub_response always drops (and every Proxy-*)


def _drop(headers: CIMultiDict, names: frozenset[str] | set[str], prefixes: tuple[str, ...]) -> None:
    doomed = [k for k in headers.keys() if (lk := k.lower()) in names or lk.startswith(prefixes)]
    for k in doomed:
        headers.popall(k, None)


def scrub_request(headers: CIMultiDict, peer: str, scheme: str) -> None:
    """In place: drop hop-by-hop headers (and those Connection names), every client-sent Forwarded,
    X-Forwarded-*, X-Real-IP and X-SGE-*; then set exactly one X-Forwarded-For (the peer) and
    X-Forwarded-Proto."""
    names: frozenset[str] | set[str] = _REQUEST_DROP
    if "Connection" in headers:
        names = names | (connection_tokens(headers) - {"host", "content-length", "authorization"})
    _drop(headers, names, _CLIENT_SPOOFABLE_PREFIXES)
    headers["X-Forwarded-For"] = peer
    headers["X-Forwarded-Proto"] = scheme


def scrub_response(headers: CIMultiDict) -> None:
    """In place: drop hop-by-hop headers (and those Connection names) and Alt-Svc."""
    names: frozenset[str] | set[str] = _RESPONSE_DROP_ALL
    if "Connection" in headers:
        names = names | (connection_tokens(headers) - {"content-length"})
    _drop(headers, names, ("proxy-",))


def rewrite_location(location: str, upstream_origin: str) -> str:
    """A redirect to the upstream's own origin becomes relative, so the client stays on the proxy
    (nginx's `proxy_redirect default`). Anything else is passed through unchanged."""
    if location.startswith(upstream_origin):
        rest = location[len(upstream_origin):]
        if rest == "" or rest[0] in "/?#":
            return rest or "/"
    return location


def request_head(method: str, target: str, headers: CIMultiDict) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def response_head(status: int, reason: str, headers: CIMultiDict | list[tuple[str, str]],
                  version: str = "1.1") -> bytes:
    items = headers.items() if isinstance(headers, CIMultiDict) else headers
    lines = [f"HTTP/{version} {status} {reason or reason_phrase(status)}"]
    lines.extend(f"{k}: {v}" for k, v in items)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


# ---------------------------------------------------------------- the same rules on raw bytes
# (the engine's fast path when no addon read the headers: no decoding, no dict)
_REQUEST_DROP_B = frozenset(n.encode() for n in _REQUEST_DROP)
_RESPONSE_DROP_B = frozenset(n.encode() for n in _RESPONSE_DROP_ALL)
_REQUEST_PREFIXES_B = tuple(p.encode() for p in _CLIENT_SPOOFABLE_PREFIXES)


def _raw_connection_tokens(raw: list, keep: frozenset[bytes]) -> frozenset[bytes]:
    out = set()
    for ln, _, v in raw:
        if ln == b"connection":
            for tok in v.split(b","):
                tok = tok.strip().lower()
                if tok and tok not in keep:
                    out.add(tok)
    return frozenset(out)


def names_headers(connection: bytes) -> bool:
    """Whether a Connection header value names a header other than Keep-Alive (hop-by-hop and
    dropped anyway): only then must a head built from parser bytes look for what it names."""
    v = connection.lower()
    if v == b"keep-alive":
        return False
    return any(t.strip() not in (b"keep-alive", b"") for t in v.split(b","))


_KEEP_REQUEST = frozenset({b"host", b"content-length", b"authorization"})
_KEEP_RESPONSE = frozenset({b"content-length"})
_MEMO_MAX = 512  # header names whose verdict a scrubber remembers (the rest are judged each time)


class _RawScrubber:
    """Which parser-byte headers a head keeps: not in `drop`, not starting with `prefixes`, not
    named by the message's Connection header (unless in `keep`). Verdicts are memoised per
    lower-cased name (bounded: header names are the client's to choose)."""

    __slots__ = ("drop", "prefixes", "keep", "_memo")

    def __init__(self, drop: frozenset[bytes], prefixes: tuple[bytes, ...], keep: frozenset[bytes]) -> None:
        self.drop = drop
        self.prefixes = prefixes
        self.keep = keep
        self._memo: dict[bytes, bool] = {}

    def _judge(self, ln: bytes) -> bool:
        kept = ln not in self.drop and not ln.startswith(self.prefixes)
        if len(self._memo) < _MEMO_MAX:
            self._memo[ln] = kept
        return kept

    def head(self, first_line: bytes, raw: list, add: bytes, has_connection: bool,
             extra: "frozenset[bytes] | set[bytes] | None") -> bytes:
        if has_connection:
            named = _raw_connection_tokens(raw, self.keep)
            if named:
                extra = named if extra is None else named | extra
        memo = self._memo
        parts = [first_line]
        for ln, n, v in raw:
            kept = memo.get(ln)
            if kept is None:
                kept = self._judge(ln)
            if kept and (extra is None or ln not in extra):
                parts += (n, b": ", v, b"\r\n")
        parts += (add, b"\r\n")
        return b"".join(parts)


_SCRUBBERS: dict[tuple[bool, frozenset[bytes]], _RawScrubber] = {}


def _scrubber(response: bool, own: frozenset[bytes]) -> _RawScrubber:
    key = (response, own)
    sc = _SCRUBBERS.get(key)
    if sc is None:
        sc = (_RawScrubber(_RESPONSE_DROP_B | own, (b"proxy-",), _KEEP_RESPONSE) if response
              else _RawScrubber(_REQUEST_DROP_B | own, _REQUEST_PREFIXES_B, _KEEP_REQUEST))
        if len(_SCRUBBERS) < 16:  # (callers pass a few constant sets)
            _SCRUBBERS[key] = sc
    return sc


def _lines(add: "bytes | list[tuple[str, str]]") -> bytes:
    if isinstance(add, bytes):
        return add
    return "".join(f"{k}: {v}\r\n" for k, v in add).encode("latin-1")


def request_scrubber(own: frozenset[bytes]) -> _RawScrubber:
    """The scrubber raw_request_head uses for `own`: callers on the hot path keep it and call its
    head(request_line, raw, add, has_connection, extra) themselves."""
    return _scrubber(False, own)


def response_scrubber(drop_extra: frozenset[bytes]) -> _RawScrubber:
    """The scrubber raw_response_head uses for `drop_extra` (see request_scrubber)."""
    return _scrubber(True, drop_extra)


def raw_request_head(method: str, target: str, raw: list, own: frozenset[bytes],
                     add: "bytes | list[tuple[str, str]]", has_connection: bool = True,
                     extra: "frozenset[bytes] | set[bytes] | None" = None) -> bytes:
    """scrub_request + the engine's own headers, on parser bytes: drops hop-by-hop, what
    Connection names, client Forwarded/X-Forwarded-*/X-Real-IP/X-SGE-*/Proxy-*, the names in
    `own` (a constant set: its scrubber is kept) and in `extra`; then `add` (header lines as
    bytes, or (name, value) pairs). has_connection=False: no Connection header names anything."""
    return _scrubber(False, own).head(f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), raw, _lines(add),
                                      has_connection, extra)


_STATUS_LINES: dict[tuple[int, str], bytes] = {}


def raw_response_head(status: int, reason: str, raw: list, add: "bytes | list[tuple[str, str]]",
                      drop_extra: frozenset[bytes] = frozenset(), has_connection: bool = True) -> bytes:
    """scrub_response on parser bytes, plus `add` (names in drop_extra, a constant set, are
    dropped first). has_connection=False promises no Connection header names anything."""
    return _scrubber(True, drop_extra).head(status_line(status, reason), raw, _lines(add), has_connection, None)


def status_line(status: int, reason: str) -> bytes:
    """b"HTTP/1.1 200 OK\\r\\n" (the reason phrase of the status when `reason` is empty), cached."""
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = f"HTTP/1.1 {status} {reason or reason_phrase(status)}\r\n".encode("latin-1")
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[(status, reason)] = line
    return line


# ---------------------------------------------------------------------------- trusted proxies
class TrustedProxies:
    """The networks whose X-Forwarded-For the proxy believes (config `trusted_proxies`): a load
    balancer in front. Empty: nobody's (the TCP peer is the client)."""

    def __init__(self, cidrs: "Sequence[str]") -> None:
        self._nets = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def __bool__(self) -> bool:
        return bool(self._nets)

    def __contains__(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self._nets)


def forwarded_client(peer: str, values: "Sequence[bytes]", trusted: TrustedProxies) -> str:
    """The client's address when `peer` is a trusted proxy: X-Forwarded-For (every header's
    values, in order) read from the right, trusted hops skipped; the first address that is not
    trusted is the client (nginx's real_ip_recursive). A malformed entry ends the walk: what lies
    left of it was written by no one the proxy trusts, so the last good hop stands. Pure."""
    client = peer
    hops = [h.strip() for v in values for h in v.decode("latin-1").split(",")]
    for hop in reversed(hops):
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            break
        client = str(ip)
        if client not in trusted:
            break
    return client
