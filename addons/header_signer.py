"""Sign the X-SGE-* identity headers on every request that goes upstream (docs/signing.md).

Runs last among the `request` hooks that change the request (after the REST facade and the
upstream identity addon): anything that edits the path or body after it breaks the signature.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import yaml

from proxy.errors import ConfigError, InternalError
from proxy.signing import KID_RE, KeyRing, parse_keys, sign

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow

__all__ = ["HeaderSigner", "HeaderSignerOptions", "upstream_target", "strip_sge_headers"]

_SECTION = "addons.header_signer"


def upstream_target(flow: "Flow") -> str:
    """The request-target written on the upstream request line: the target's base path (from its
    URL) followed by the client's path and query, unchanged.

    The engine holds targets as latin-1 strings (one character per octet); the signing API takes
    UTF-8 strings (surrogateescape for stray octets). Converting keeps the signed octets equal to
    the octets on the wire, even for a (non-conforming) target with octets above 0x7F.
    """
    base = flow.upstream.base_path if flow.upstream is not None else ""
    t = base + flow.request.target
    if not t.isascii():
        try:
            t = t.encode("latin-1").decode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # not from the wire: an addon wrote text, sent as UTF-8
            pass
    return t


def strip_sge_headers(headers: Any) -> None:
    """Remove every X-SGE-* header (any case, every repetition)."""
    if "x-sge-" not in "\n".join(headers.keys()).lower():  # the usual case: none at all
        return
    for name in [k for k in headers.keys() if k[:6].lower() == "x-sge-"]:
        headers.popall(name, None)


@dataclass(frozen=True, kw_only=True)
class HeaderSignerOptions:
    """[addons.header_signer]. Secrets are base64 (at least 32 bytes once decoded).

    key_id: the active key that signs (may be omitted when exactly one key is configured).
    keys: inline {key id: base64 secret}. keys_file: a YAML file with the same mapping.
    sign_body: auto = hash the body when it is buffered anyway (or known empty), else
      UNSIGNED-PAYLOAD; always = buffer every body (up to body_cap) and hash it; never = always
      UNSIGNED-PAYLOAD.
    """
    key_id: str | None = None
    keys: dict[str, str] = field(default_factory=dict)
    keys_file: Path | None = None
    sign_body: Literal["auto", "always", "never"] = "auto"
    body_cap: int = field(default=10 << 20, metadata={"kind": "size"})

    def __post_init__(self) -> None:
        if self.key_id is not None and not KID_RE.fullmatch(self.key_id):
            raise ConfigError("key_id", "key id must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if not self.keys and self.keys_file is None:
            raise ConfigError("keys", "no signing key configured: set keys or keys_file")
        parse_keys(self.keys, "keys")  # validate now; secrets are kept decoded in the ring only
        if self.body_cap < 1:
            raise ConfigError("body_cap", "must be positive")


def load_ring(opts: HeaderSignerOptions, resolve: Callable[[Path], Path] = lambda p: p) -> KeyRing:
    """Build the key ring from inline keys and the keys file. Raises ConfigError naming the key."""
    keys = parse_keys(opts.keys, f"{_SECTION}.keys")
    if opts.keys_file is not None:
        where = f"{_SECTION}.keys_file"
        path = resolve(opts.keys_file)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(where, f"cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(where, f"{path}: invalid YAML: {e}") from None
        for kid, secret in parse_keys(data, where).items():
            if kid in keys and keys[kid] != secret:
                raise ConfigError(where, f"key id {kid!r} is also set inline with another secret")
            keys[kid] = secret
    if not keys:
        raise ConfigError(f"{_SECTION}.keys", "no signing key configured")
    if opts.key_id is None and len(keys) > 1:
        raise ConfigError(f"{_SECTION}.key_id", f"several keys ({', '.join(sorted(keys))}): name the active one")
    if opts.key_id is not None and opts.key_id not in keys:
        raise ConfigError(f"{_SECTION}.key_id", f"no key with id {opts.key_id!r}")
    return KeyRing(keys, opts.key_id)


class HeaderSigner:
    """Sets X-SGE-User-ID, -Tenant, -Session-ID, -Request-ID, -Timestamp, -Content-SHA256 and
    -Signature on every forwarded request, after removing any the client sent."""

    name = "header_signer"
    security = True
    Options = HeaderSignerOptions

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._opts: HeaderSignerOptions | None = None
        self._ring: KeyRing | None = None
        self._hashed: Any = None  # sge_proxy_signed_requests_total{payload="hashed"}
        self._unsigned: Any = None

    def load(self, loader: "Loader") -> None:
        self._opts = loader.options
        self._ring = load_ring(self._opts, loader.path)
        c = loader.metrics.counter("sge_proxy_signed_requests_total",
                                   "Requests signed with X-SGE-* headers, by payload mode.", ("payload",))
        self._hashed, self._unsigned = c.labels("hashed"), c.labels("unsigned")
        if self._opts.sign_body != "always":
            self.requestheaders = None  # type: ignore[assignment]  # nothing to ask for: no hook

    @property
    def key_ring(self) -> KeyRing | None:
        return self._ring

    def set_key_ring(self, ring: KeyRing) -> None:
        """Swap in a new ring (key rotation from a secret store): one assignment, no lock needed."""
        self._ring = ring

    def side_headers(self, flow: "Flow", method: str, path: str, body: bytes = b"") -> list[tuple[str, str]]:
        """X-SGE-* headers for a side request another addon makes upstream on this flow's behalf
        (the JMAP guard's session fetch): same identity and request id, its own method and path."""
        ring = self._ring
        if ring is None:
            raise RuntimeError("header_signer used before load")
        ident = flow.identity
        base = flow.upstream.base_path if flow.upstream is not None else ""
        return sign(ring, method, base + path,
                    user_id=ident.subject if ident else None, tenant=ident.tenant if ident else None,
                    session_id=ident.session_id if ident else None, request_id=flow.id,
                    timestamp=int(self._clock()), body=body)

    def requestheaders(self, flow: "Flow") -> None:
        """With sign_body `always` only (else `load` leaves this instance without the hook)."""
        if self._opts is not None and self._opts.sign_body == "always":
            flow.request.want_body(self._opts.body_cap)

    def request(self, flow: "Flow") -> None:
        opts, ring = self._opts, self._ring
        if opts is None or ring is None:
            raise RuntimeError("header_signer used before load")
        req = flow.request
        body: bytes | None
        if opts.sign_body == "never":
            body = None
        else:
            body = req.body
            if body is None and not req.has_body:
                body = b""
            if body is None and opts.sign_body == "always":
                raise InternalError("The request body was not buffered for signing.")
        ident = flow.identity
        if ident is None:
            user = tenant = session = None
        else:
            user, tenant, session = ident.subject, ident.tenant, ident.session_id
        upstream = flow.upstream
        target = (upstream.base_path + req.target) if upstream is not None else req.target
        if not target.isascii():
            target = upstream_target(flow)
        signed = sign(ring, req.method, target, user_id=user, tenant=tenant,
                      session_id=session, request_id=flow.id, timestamp=int(self._clock()), body=body)
        if req.headers_read:
            h = req.headers
            strip_sge_headers(h)
            h.extend(signed)
        else:
            # the engine drops the client's X-SGE-* from the parser's bytes; an earlier addon's
            # set_header() of one is an edit: remove it too, then set ours (one value each)
            edits = req.edits
            if edits:
                for key, (name, _) in list(edits.items()):
                    if key[:6] == b"x-sge-":
                        req.set_header(name, None)
            for name, value in signed:
                req.set_header(name, value)
        (self._unsigned if body is None else self._hashed).inc()
