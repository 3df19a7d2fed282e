"""The JMAP session resource (RFC 8620 §2): parsing, the user's own accounts, limits, and URL
rewriting so that clients always come back through the proxy. Sans-IO.

Two upstream shapes are handled alike:
- Stalwart sends absolute URLs built from its configured public URL
  (`https://mail.example.com/jmap/upload/{accountId}/`) and opaque account ids ("a", "ba").
- Cyrus sends relative URLs (`/jmap/upload/{accountId}/`) and uses the login as account id.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

import orjson

from .errors import UpstreamProtocolError

__all__ = ["Account", "Limits", "Session", "own_accounts", "rewrite", "rewrite_url",
           "CORE", "MAIL", "WEBSOCKET", "URL_KEYS"]

CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
WEBSOCKET = "urn:ietf:params:jmap:websocket"
# top-level session properties holding URLs (RFC 8620 §2)
URL_KEYS = ("apiUrl", "downloadUrl", "uploadUrl", "eventSourceUrl")


@dataclass(frozen=True, slots=True)
class Limits:
    """The core capability's limits. Defaults are Stalwart's, used when a value is missing."""

    max_size_upload: int = 50_000_000
    max_concurrent_upload: int = 4
    max_size_request: int = 10_000_000
    max_concurrent_requests: int = 4
    max_calls_in_request: int = 16
    max_objects_in_get: int = 500
    max_objects_in_set: int = 500

    @classmethod
    def from_capability(cls, core: Any) -> "Limits":
        """Read `urn:ietf:params:jmap:core`; a missing or non-positive-integer value keeps the default."""
        if not isinstance(core, dict):
            return cls()
        kw = {}
        for attr, key in _LIMIT_KEYS:
            v = core.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                kw[attr] = v
        return cls(**kw)


_LIMIT_KEYS = (
    ("max_size_upload", "maxSizeUpload"),
    ("max_concurrent_upload", "maxConcurrentUpload"),
    ("max_size_request", "maxSizeRequest"),
    ("max_concurrent_requests", "maxConcurrentRequests"),
    ("max_calls_in_request", "maxCallsInRequest"),
    ("max_objects_in_get", "maxObjectsInGet"),
    ("max_objects_in_set", "maxObjectsInSet"),
)


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    is_personal: bool
    is_read_only: bool


@dataclass(frozen=True, slots=True)
class Session:
    """A parsed session resource. `raw` is the document as received (do not mutate it)."""

    username: str
    accounts: Mapping[str, Account]
    primary_accounts: Mapping[str, str]
    capabilities: Mapping[str, Any]
    api_url: str
    upload_url: str
    download_url: str
    event_source_url: str
    websocket_url: str | None
    state: str
    limits: Limits
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, body: bytes) -> "Session":
        """Parse a session body. Raises UpstreamProtocolError (502) when it is not one."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("The upstream session resource is not JSON.") from None
        return cls.from_doc(doc)

    @classmethod
    def from_doc(cls, doc: Any) -> "Session":
        if not isinstance(doc, dict):
            raise _bad("it is not a JSON object")
        caps = doc.get("capabilities")
        accounts = doc.get("accounts")
        primary = doc.get("primaryAccounts")
        if not isinstance(caps, dict):
            raise _bad("`capabilities` is missing")
        if not isinstance(accounts, dict):
            raise _bad("`accounts` is missing")
        if primary is None:
            primary = {}
        if not isinstance(primary, dict) or not all(isinstance(v, str) for v in primary.values()):
            raise _bad("`primaryAccounts` is not a map of account ids")
        if not isinstance(doc.get("apiUrl"), str) or not doc["apiUrl"]:
            raise _bad("`apiUrl` is missing")
        parsed: dict[str, Account] = {}
        for acct_id, a in accounts.items():
            if not isinstance(a, dict):
                raise _bad(f"account {acct_id!r} is not an object")
            name = a.get("name")
            parsed[acct_id] = Account(acct_id, name if isinstance(name, str) else "",
                                      a.get("isPersonal") is True, a.get("isReadOnly") is True)
        ws = caps.get(WEBSOCKET)
        ws_url = ws.get("url") if isinstance(ws, dict) and isinstance(ws.get("url"), str) else None
        return cls(
            username=doc["username"] if isinstance(doc.get("username"), str) else "",
            accounts=MappingProxyType(parsed),
            primary_accounts=MappingProxyType(dict(primary)),
            capabilities=MappingProxyType(caps),
            api_url=doc["apiUrl"],
            upload_url=_str(doc.get("uploadUrl")),
            download_url=_str(doc.get("downloadUrl")),
            event_source_url=_str(doc.get("eventSourceUrl")),
            websocket_url=ws_url,
            state=_str(doc.get("state")),
            limits=Limits.from_capability(caps.get(CORE)),
            raw=MappingProxyType(doc),
        )

    @property
    def mail_account(self) -> str | None:
        """The user's own mail account: primaryAccounts["urn:ietf:params:jmap:mail"]."""
        return self.primary_accounts.get(MAIL)


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _bad(why: str) -> UpstreamProtocolError:
    return UpstreamProtocolError(f"The upstream session resource is invalid: {why}.")


def own_accounts(session: Session, login: str, *, allow_shared: bool = False) -> frozenset[str]:
    """The account ids that belong to the user `login`.

    Exactly: every id that is a value of `primaryAccounts` (any capability) and is listed in
    `accounts`, plus every account whose `isPersonal` is true and whose `name` equals `login`
    ignoring case. With allow_shared, every account the session lists.

    `isPersonal` alone is not enough: Stalwart marks an account shared by another *user* as
    personal (it is "not a group"), so bob's shared account shows up in alice's session with
    isPersonal true and name "bob".
    """
    if allow_shared:
        return frozenset(session.accounts)
    own = {a for a in session.primary_accounts.values() if a in session.accounts}
    folded = login.casefold()
    for acct in session.accounts.values():
        if acct.is_personal and acct.name.casefold() == folded:
            own.add(acct.id)
    return frozenset(own)


def after_authority(url: str) -> str:
    """What follows scheme://authority in an absolute URL (path, query, fragment), sliced as a
    string: template placeholders and escapes stay as they are. Pure."""
    start = url.find("//") + 2
    cut = len(url)
    for sep in "/?#":
        i = url.find(sep, start)
        if 0 <= i < cut:
            cut = i
    return url[cut:]


def rewrite_url(url: str, public_base: str, *, websocket: bool = False) -> str:
    """Point a session URL at the proxy.

    Absolute (`https://stalwart:443/jmap/?x`) -> public_base + its path and query.
    Relative with a leading slash (`/jmap/`) -> public_base + it. Anything else relative is taken
    as relative to the root. Template placeholders (`{accountId}`) are kept as they are: the URL
    is sliced as a string, never parsed and re-quoted. With websocket, http(s) becomes ws(s).
    """
    base = public_base.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme and parts.netloc:
        rest = after_authority(url)
        i = rest.find("#")
        if i >= 0:
            rest = rest[:i]
    elif url.startswith("/"):
        rest = url
    else:
        rest = "/" + url
    if not rest.startswith("/"):
        rest = "/" + rest
    out = base + rest
    if websocket:
        if out.startswith("https://"):
            out = "wss://" + out[len("https://"):]
        elif out.startswith("http://"):
            out = "ws://" + out[len("http://"):]
    return out


def rewrite(session_doc: Mapping[str, Any], public_base: str, keep_accounts: set[str] | frozenset[str]) -> dict:
    """A copy of a session document for the client: every URL points at `public_base`, and
    accounts not in `keep_accounts` are gone from `accounts` and `primaryAccounts`. Pure."""
    doc = copy.deepcopy(dict(session_doc))
    for key in URL_KEYS:
        if isinstance(doc.get(key), str):
            doc[key] = rewrite_url(doc[key], public_base)
    caps = doc.get("capabilities")
    if isinstance(caps, dict):
        ws = caps.get(WEBSOCKET)
        if isinstance(ws, dict) and isinstance(ws.get("url"), str):
            ws["url"] = rewrite_url(ws["url"], public_base, websocket=True)
    accounts = doc.get("accounts")
    if isinstance(accounts, dict):
        doc["accounts"] = {k: v for k, v in accounts.items() if k in keep_accounts}
    primary = doc.get("primaryAccounts")
    if isinstance(primary, dict):
        doc["primaryAccounts"] = {k: v for k, v in primary.items() if v in keep_accounts}
    return doc
