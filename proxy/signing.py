"""Signed X-SGE-* identity headers: canonical string, signing, verification, replay cache.

Sans-IO except for `verify_signature_main`, the command-line verifier. docs/signing.md is the
specification; tests/vectors/signing.json holds published test vectors.
"""
from __future__ import annotations

import argparse
import base64
import functools
import binascii
import hashlib
import hmac
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from multidict import CIMultiDict

from .errors import ConfigError, Unauthorized

__all__ = [
    "ALGORITHM", "UNSIGNED_PAYLOAD", "EMPTY_SHA256", "H_USER", "H_TENANT", "H_SESSION", "H_REQUEST",
    "H_TIMESTAMP", "H_CONTENT", "H_SIGNATURE", "SGE_HEADERS", "MIN_SECRET_BYTES", "KID_RE",
    "encode_value", "decode_value", "content_sha256", "canonical_string", "hmac_pads", "hmac_digest",
    "KeyRing", "parse_secret",
    "parse_keys", "sign", "SignatureError", "VerifiedIdentity", "ReplayCache", "verify",
    "parse_http_request", "verify_signature_main",
]

ALGORITHM = "SGE-HMAC-SHA256-V1"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MIN_SECRET_BYTES = 32

H_USER = "X-SGE-User-ID"
H_TENANT = "X-SGE-Tenant"
H_SESSION = "X-SGE-Session-ID"
H_REQUEST = "X-SGE-Request-ID"
H_TIMESTAMP = "X-SGE-Timestamp"
H_CONTENT = "X-SGE-Content-SHA256"
H_SIGNATURE = "X-SGE-Signature"
SGE_HEADERS = (H_USER, H_TENANT, H_SESSION, H_REQUEST, H_TIMESTAMP, H_CONTENT, H_SIGNATURE)
_LOWER = {h.lower(): h for h in SGE_HEADERS}

KID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SAFE_RE = re.compile(r"[!-$&-~]*")  # visible ASCII except '%': passes through unencoded
_ENCODED_RE = re.compile(r"(?:[!-$&-~]|%[0-9A-F]{2})*")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_TS_RE = re.compile(r"0|[1-9][0-9]{0,14}")
_SIG_RE = re.compile(r"v1,kid=([A-Za-z0-9._-]{1,64}),sig=([A-Za-z0-9_-]{43})")


# ---------------------------------------------------------------------------- canonical form
def encode_value(value: str | None) -> str:
    """An identity value as it appears in its header (and so in the canonical string).

    None -> "". Visible ASCII other than '%' is kept; every other octet of the UTF-8 encoding
    (space, controls, '%', non-ASCII) becomes %XX with upper-case hex. Raises ValueError for a
    string that is not valid Unicode (a lone surrogate).
    """
    if not value:
        return ""
    if _SAFE_RE.fullmatch(value):
        return value
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
                   for b in value.encode("utf-8"))


@functools.lru_cache(maxsize=4096)  # identities repeat: one look-up for the three values
def _identity_values(user_id: str | None, tenant: str | None, session_id: str | None) -> tuple[str, str, str]:
    return encode_value(user_id), encode_value(tenant), encode_value(session_id)


def decode_value(value: str) -> str:
    """The inverse of encode_value. Raises ValueError unless `value` is in canonical encoded form."""
    if not _ENCODED_RE.fullmatch(value):
        raise ValueError("not a canonically encoded X-SGE value")
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "%":
            b = int(value[i + 1:i + 3], 16)
            if 0x21 <= b <= 0x7E and b != 0x25:
                raise ValueError("needlessly percent-encoded octet")
            out.append(b)
            i += 3
        else:
            out.append(ord(value[i]))
            i += 1
    return out.decode("utf-8")  # UnicodeDecodeError is a ValueError


def content_sha256(body: bytes | None) -> str:
    """Lower-case hex SHA-256 of the body, or UNSIGNED-PAYLOAD when the body is not known (None)."""
    if body is None:
        return UNSIGNED_PAYLOAD
    if not body:
        return EMPTY_SHA256
    return hashlib.sha256(body).hexdigest()


def canonical_string(method: str, target: str, user: str, tenant: str, session: str,
                     request_id: str, timestamp: int | str, content: str) -> str:
    """The string the signature covers (docs/signing.md). Identity values are given encoded, as in
    their headers; `target` is the request-target exactly as written upstream. Nine lines joined by
    LF, no trailing LF."""
    if "\n" in method or "\n" in target or "\r" in target:
        raise ValueError("line break in method or request-target")
    return "\n".join((ALGORITHM, method, target, user, tenant, session, request_id,
                      str(timestamp), content))


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(raw: bytes) -> str:
    # base64 has '=' only as trailing padding: deleting them all is rstrip
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE, b"=").decode("ascii")


def _to_bytes(canonical: str) -> bytes:
    # the request-target may carry octets the server decoded with surrogateescape
    return canonical.encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------- keys
def parse_secret(text: Any, key: str) -> bytes:
    """A base64 (standard or URL-safe alphabet, padding optional) secret of at least 32 bytes."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(key, "expected a base64 secret")
    s = text.strip().replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(key, "not valid base64") from None
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(key, f"secret is {len(raw)} bytes; at least {MIN_SECRET_BYTES} are required")
    return raw


def parse_keys(mapping: Any, key: str) -> dict[str, bytes]:
    """{kid: base64 secret} (a config section or a keys file) -> {kid: raw secret}."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(key, "expected a mapping of key id to base64 secret")
    out: dict[str, bytes] = {}
    for kid, secret in mapping.items():
        kid = str(kid)
        if not KID_RE.fullmatch(kid):
            raise ConfigError(f"{key}.{kid}", "key id must be 1-64 characters of A-Z a-z 0-9 . _ -")
        out[kid] = parse_secret(secret, f"{key}.{kid}")
    return out


_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
_BLOCK = hashlib.sha256().block_size


def hmac_pads(secret: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256's keyed inner and outer hash states (RFC 2104 section 2): SHA-256 objects that
    have absorbed the key XOR ipad and the key XOR opad. `hmac_digest` copies them per message,
    which costs two hash copies instead of hashing the key block twice. Pure."""
    if len(secret) > _BLOCK:
        secret = hashlib.sha256(secret).digest()
    secret = secret.ljust(_BLOCK, b"\0")
    return hashlib.sha256(secret.translate(_IPAD)), hashlib.sha256(secret.translate(_OPAD))


def hmac_digest(pads: tuple[Any, Any], msg: bytes) -> bytes:
    """HMAC-SHA256(key, msg) from the key's `hmac_pads` (which stay unconsumed). Pure."""
    inner, outer = pads
    h = inner.copy()
    h.update(msg)
    o = outer.copy()
    o.update(h.digest())
    return o.digest()


class KeyRing(Mapping[str, bytes]):
    """Immutable {kid: secret} with one active kid for signing.

    The HMAC inner/outer pads are computed once per key (`hmac_pads`); each use copies them.
    Replace a whole ring to rotate (a new instance, swapped in one assignment).
    """

    __slots__ = ("_secrets", "_pads", "active", "_active_pads", "_sig_prefix")

    def __init__(self, secrets: Mapping[str, bytes], active: str | None = None) -> None:
        if not secrets:
            raise ValueError("a key ring needs at least one key")
        if active is None:
            if len(secrets) != 1:
                raise ValueError("several keys: name the active one")
            active = next(iter(secrets))
        if active not in secrets:
            raise ValueError(f"active key id {active!r} is not in the ring")
        self._secrets = dict(secrets)
        self._pads = {kid: hmac_pads(s) for kid, s in self._secrets.items()}
        self.active = active
        self._active_pads = self._pads[active]
        self._sig_prefix = f"v1,kid={active},sig="  # X-SGE-Signature up to the signature

    def __getitem__(self, kid: str) -> bytes:
        return self._secrets[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._secrets)

    def __len__(self) -> int:
        return len(self._secrets)

    def mac(self, kid: str, msg: bytes) -> bytes:
        """HMAC-SHA256 of msg under key `kid` (KeyError if unknown)."""
        return hmac_digest(self._pads[kid], msg)

    def __repr__(self) -> str:  # never the secrets
        return f"<KeyRing active={self.active!r} kids={sorted(self._secrets)!r}>"


def sign(ring: KeyRing, method: str, target: str, *, user_id: str | None, tenant: str | None,
         session_id: str | None, request_id: str, timestamp: int,
         body: bytes | None) -> list[tuple[str, str]]:
    """The seven X-SGE-* headers for a request, signed with the ring's active key.

    body None means the body streams unseen: UNSIGNED-PAYLOAD. Pass b"" for a request without one.
    """
    # every request goes through here: encode_value, content_sha256, canonical_string,
    # hmac_digest and _b64url inlined (same results; tests/unit/test_signing.py compares them)
    user, ten, ses = _identity_values(user_id, tenant, session_id)
    # _SAFE_RE.fullmatch without the regex: visible ASCII (0x21-0x7E) other than '%'
    if (request_id.isascii() and request_id.isprintable() and " " not in request_id
            and "%" not in request_id):
        rid = request_id
    else:
        rid = encode_value(request_id)
    ts = str(timestamp)
    content = UNSIGNED_PAYLOAD if body is None else _sha256(body).hexdigest() if body else EMPTY_SHA256
    if "\n" in method or "\n" in target or "\r" in target:
        raise ValueError("line break in method or request-target")
    msg = "\n".join((ALGORITHM, method, target, user, ten, ses, rid, ts, content)).encode(
        "utf-8", "surrogateescape")
    inner, outer = ring._active_pads
    h = inner.copy()
    h.update(msg)
    o = outer.copy()
    o.update(h.digest())
    sig = _b2a(o.digest(), newline=False).translate(_URLSAFE, b"=").decode("ascii")
    return [(H_USER, user), (H_TENANT, ten), (H_SESSION, ses), (H_REQUEST, rid), (H_TIMESTAMP, ts),
            (H_CONTENT, content), (H_SIGNATURE, ring._sig_prefix + sig)]


_sha256 = hashlib.sha256
_b2a = binascii.b2a_base64


# ---------------------------------------------------------------------------- verification
class SignatureError(Unauthorized):
    """Verification failed. `reason` is one of REASONS; `explanation` says more (may be empty)."""

    REASONS = ("missing_header", "duplicate_header", "malformed_header", "malformed_signature",
               "unknown_key", "timestamp_out_of_window", "bad_signature", "body_required",
               "body_mismatch", "replay")

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown signature failure reason {reason!r}")
        super().__init__(f"signature {reason}" + (f": {detail}" if detail else ""))
        self.reason = reason
        self.explanation = detail
        self.code = f"signature_{reason}"


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """What a verified request says about its user. Empty header values become None."""
    user_id: str | None
    tenant: str | None
    session_id: str | None
    request_id: str
    timestamp: int
    key_id: str
    content_sha256: str  # hex, or UNSIGNED-PAYLOAD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReplayCache:
    """A bounded in-memory set of (key id, request id, signature) seen recently.

    An entry lives until its timestamp leaves the window (timestamp + window); after that the
    window check refuses the request anyway. When full, the entry added first is dropped
    (`evicted` counts them): size it above peak requests per window.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self.evicted = 0
        self._expiry: dict[tuple[str, str, str], float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, key: tuple[str, str, str], expires: float, now: float) -> bool:
        """Record key; False if it was already there and has not expired."""
        old = self._expiry.get(key)
        if old is not None and old >= now:
            return False
        if len(self._expiry) >= self.max_entries:
            self._purge(now)
        while len(self._expiry) >= self.max_entries:
            del self._expiry[next(iter(self._expiry))]
            self.evicted += 1
        self._expiry[key] = expires
        return True

    def _purge(self, now: float) -> None:
        for k in [k for k, exp in self._expiry.items() if exp < now]:
            del self._expiry[k]


def _collect(headers: Mapping[str, str]) -> dict[str, str]:
    """The X-SGE-* headers by canonical name; duplicates refused. Works for dicts (any case) and
    multidicts (whose items() yields repeated names)."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        canon = _LOWER.get(name.lower())
        if canon is None:
            continue
        if canon in found:
            raise SignatureError("duplicate_header", canon)
        found[canon] = value
    return found


def verify(method: str, path_and_query: str | bytes, headers: Mapping[str, str], body: bytes | None,
           keys: Mapping[str, bytes], *, now: float | None = None, window: float = 300,
           seen: ReplayCache | None = None) -> VerifiedIdentity:
    """Check a signed request; return who it is for, or raise SignatureError(reason).

    X-SGE-User-ID, -Tenant and -Session-ID may be absent (an intermediary dropping an empty header):
    they read as empty, which is what the signature then has to cover.
    `path_and_query` is the request-target as received: its octets (bytes), or a str that maps
    to them through UTF-8 (surrogateescape for stray octets).
    `keys` holds every accepted key id (a KeyRing or a plain {kid: secret}). `body` is the request
    body as received; None only when it is not available, which is refused unless the signer sent
    UNSIGNED-PAYLOAD. The timestamp must be within `window` seconds of `now`, either direction.
    With `seen`, a request id + signature accepted once is refused for the rest of its window.
    """
    if isinstance(path_and_query, (bytes, bytearray)):
        path_and_query = bytes(path_and_query).decode("utf-8", "surrogateescape")
    h = _collect(headers)
    for name in (H_REQUEST, H_TIMESTAMP, H_CONTENT, H_SIGNATURE):
        if name not in h:
            raise SignatureError("missing_header", name)
    for name in (H_USER, H_TENANT, H_SESSION):  # an absent value reads as empty, as signed
        h.setdefault(name, "")
    m = _SIG_RE.fullmatch(h[H_SIGNATURE])
    if m is None:
        raise SignatureError("malformed_signature", "expected v1,kid=<key id>,sig=<43 base64url chars>")
    kid, sig = m.group(1), m.group(2)
    ts_text, content = h[H_TIMESTAMP], h[H_CONTENT]
    if not _TS_RE.fullmatch(ts_text):
        raise SignatureError("malformed_header", f"{H_TIMESTAMP} is not a decimal integer")
    if content != UNSIGNED_PAYLOAD and not _HEX64_RE.fullmatch(content):
        raise SignatureError("malformed_header", f"{H_CONTENT} is neither lower-case hex SHA-256 nor {UNSIGNED_PAYLOAD}")
    decoded = {}
    for name in (H_USER, H_TENANT, H_SESSION, H_REQUEST):
        try:
            decoded[name] = decode_value(h[name])
        except ValueError:
            raise SignatureError("malformed_header", f"{name} is not canonically encoded") from None
    if not decoded[H_REQUEST]:
        raise SignatureError("malformed_header", f"{H_REQUEST} is empty")
    secret = keys.get(kid)
    if secret is None:
        raise SignatureError("unknown_key", kid)
    ts = int(ts_text)
    now = time.time() if now is None else now
    if abs(now - ts) > window:
        age = int(now - ts)
        raise SignatureError("timestamp_out_of_window",
                             f"{abs(age)} s {'old' if age > 0 else 'in the future'}; window {window:g} s")
    try:
        canonical = canonical_string(method, path_and_query, h[H_USER], h[H_TENANT], h[H_SESSION],
                                     h[H_REQUEST], ts_text, content)
    except ValueError:
        raise SignatureError("bad_signature", "request-target holds a line break") from None
    msg = _to_bytes(canonical)
    mac = keys.mac(kid, msg) if isinstance(keys, KeyRing) else hmac.new(secret, msg, hashlib.sha256).digest()
    if not hmac.compare_digest(_b64url(mac), sig):
        raise SignatureError("bad_signature")
    if content != UNSIGNED_PAYLOAD:
        if body is None:
            raise SignatureError("body_required", "the signature covers the body; pass it")
        if not hmac.compare_digest(content_sha256(body), content):
            raise SignatureError("body_mismatch")
    if seen is not None and not seen.add((kid, h[H_REQUEST], sig), ts + window, now):
        raise SignatureError("replay", f"request id {h[H_REQUEST]} already seen")
    return VerifiedIdentity(user_id=decoded[H_USER] or None, tenant=decoded[H_TENANT] or None,
                            session_id=decoded[H_SESSION] or None, request_id=decoded[H_REQUEST],
                            timestamp=ts, key_id=kid, content_sha256=content)


# ---------------------------------------------------------------------------- CLI
def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while True:
        j = data.find(b"\n", i)
        if j < 0:
            raise ValueError("truncated chunked body")
        size = int(data[i:j].split(b";", 1)[0].strip() or b"x", 16)
        i = j + 1
        if size == 0:
            return bytes(out)
        if len(data) < i + size:
            raise ValueError("truncated chunk")
        out += data[i:i + size]
        i += size
        if data[i:i + 2] == b"\r\n":
            i += 2
        elif data[i:i + 1] == b"\n":
            i += 1
        else:
            raise ValueError("chunk not followed by a line break")


def parse_http_request(data: bytes) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """Raw HTTP/1.1 request bytes -> (method, target, headers, body). CRLF or bare LF line ends;
    the body is cut to Content-Length or de-chunked. Raises ValueError."""
    sep = re.search(rb"\r?\n\r?\n", data)
    if sep is None:
        head, rest = data, b""
    else:
        head, rest = data[:sep.start()], data[sep.end():]
    lines = head.decode("latin-1").splitlines()
    if not lines:
        raise ValueError("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"bad request line {lines[0]!r}")
    method, raw_target = parts[0], parts[1]
    target = raw_target.encode("latin-1").decode("utf-8", "surrogateescape")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError(f"bad header line {line!r}")
        headers.append((name, value.strip(" \t")))
    lower = {n.lower(): v for n, v in headers}
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body = _dechunk(rest)
    elif "content-length" in lower:
        n = int(lower["content-length"])
        if len(rest) < n:
            raise ValueError(f"body is {len(rest)} bytes, Content-Length says {n}")
        body = rest[:n]
    else:
        body = rest
    return method, target, headers, body


def _cli_keys(args: argparse.Namespace) -> dict[str, bytes]:
    import yaml
    keys: dict[str, bytes] = {}
    for path in args.keys_file:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError("--keys-file", f"cannot read {path}: {e}") from None
        keys.update(parse_keys(data, "--keys-file"))
    for item in args.key:
        kid, eq, secret = item.partition("=")
        if not eq:
            raise ConfigError("--key", "expected KID=BASE64SECRET")
        keys.update(parse_keys({kid: secret}, "--key"))
    if not keys:
        raise ConfigError("--key", "give at least one --key or --keys-file")
    return keys


def verify_signature_main(argv: Iterable[str] | None = None) -> int:
    """`sge-mail-proxy verify-signature`: check the X-SGE-* signature of a raw HTTP request.

    Prints `OK <identity JSON>` and returns 0, or `FAIL <reason>: <detail>` and returns 1.
    """
    import json
    p = argparse.ArgumentParser(prog="sge-mail-proxy verify-signature",
                                description="Verify the X-SGE-* signature of a raw HTTP/1.1 request.")
    p.add_argument("request", nargs="?", default="-", help="file holding the request bytes (- for stdin)")
    p.add_argument("--key", action="append", default=[], metavar="KID=BASE64",
                   help="an accepted key (repeatable)")
    p.add_argument("--keys-file", action="append", default=[], metavar="FILE",
                   help="YAML mapping of key id to base64 secret (repeatable)")
    p.add_argument("--now", type=float, default=None,
                   help="unix time to check the timestamp against (default: the clock)")
    p.add_argument("--window", type=float, default=300.0, help="accepted clock skew in seconds (300)")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        keys = _cli_keys(args)
    except ConfigError as e:
        print(f"FAIL config: {e}")
        return 1
    try:
        data = sys.stdin.buffer.read() if args.request == "-" else Path(args.request).read_bytes()
        method, target, headers, body = parse_http_request(data)
    except (OSError, ValueError) as e:
        print(f"FAIL malformed_request: {e}")
        return 1
    try:
        ident = verify(method, target, CIMultiDict(headers), body, keys, now=args.now, window=args.window)
    except SignatureError as e:
        print(f"FAIL {e.reason}" + (f": {e.explanation}" if e.explanation else ""))
        return 1
    print("OK " + json.dumps(ident.to_dict(), ensure_ascii=False, sort_keys=True))
    return 0

