"""CalDAV and CardDAV through the proxy (calendars and contacts: SEED's "Calendar Integration"),
each user to their own collections only.

Stalwart serves CalDAV (RFC 4791), CardDAV (RFC 6352) and WebDAV files under /dav, Cyrus under
/dav too; both name the owner in the path: `/dav/cal/<account>/...` (Stalwart),
`/dav/calendars/user/<login>/...` (Cyrus), and likewise for contacts and principals. This addon
refuses (403, before anything goes upstream) a DAV request whose path, or whose `Destination`
(COPY, MOVE), names another owner than the user; a DAV path that names no owner (the roots that
clients probe while discovering their home: `/dav/`, `/dav/calendars/`) is allowed only to
OPTIONS and to PROPFIND at `Depth: 0`, so no listing of other users' collections goes through.
The server's own permissions still apply on top (shared calendars stay the server's business,
and hrefs inside a REPORT body are resolved with the user's rights there).

The owner is compared with the user's login (upstream_identity's: the `email` claim, else the
subject), case aside, after one percent-decoding; dot segments, encoded slashes and empty inner
segments are refused outright (an upstream could normalise them into another path).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from proxy.errors import BadRequest, ConfigError, Forbidden

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow

__all__ = ["DavGuard", "DavGuardOptions", "owner_of", "check_dav", "DEFAULT_OWNER_PATTERNS", "NO_OWNER"]

# where each server names the owner of a collection: {owner} is one path segment
DEFAULT_OWNER_PATTERNS = (
    "/dav/cal/{owner}", "/dav/card/{owner}", "/dav/pal/{owner}", "/dav/file/{owner}",   # Stalwart
    "/dav/calendars/user/{owner}", "/dav/addressbooks/user/{owner}",                    # Cyrus
    "/dav/principals/user/{owner}",
)
DISCOVERY = frozenset({"OPTIONS", "PROPFIND"})
NO_OWNER = ""  # owner_of: a DAV path that names nobody (a root that discovery probes)


@dataclass(frozen=True, kw_only=True)
class DavGuardOptions:
    """[addons.dav_guard]
    prefix: where DAV lives on the server; owner_patterns: the path prefixes that name a
    collection's owner ({owner}: one segment), tried in order."""
    prefix: str = "/dav"
    owner_patterns: tuple[str, ...] = DEFAULT_OWNER_PATTERNS

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ConfigError("prefix", "must start with / and not end with one")
        for p in self.owner_patterns:
            if not p.startswith(self.prefix + "/") or p.count("{owner}") != 1 or not p.endswith("{owner}"):
                raise ConfigError("owner_patterns", f"{p!r} must start with the prefix and end with /{{owner}}")


def _compile(patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    return [re.compile(re.escape(p[:-len("{owner}")]) + r"([^/]*)(?:/|$)") for p in patterns]


def _segments_ok(path: str) -> bool:
    segs = [unquote(s) for s in path.split("/")[1:]]
    for i, s in enumerate(segs):
        if s in (".", "..") or "/" in s or "\\" in s or "\x00" in s or (s == "" and i < len(segs) - 1):
            return False
    return True


def owner_of(path: str, prefix: str, patterns: list[re.Pattern[str]]) -> str | None:
    """The owner a DAV path names (percent-decoded), NO_OWNER for a DAV path that names none,
    None for a path outside `prefix`. Forbidden for a path an upstream could read otherwise. Pure."""
    if path != prefix and not path.startswith(prefix + "/"):
        return None
    if not _segments_ok(path):
        raise Forbidden("The path is not allowed.")
    for rx in patterns:
        m = rx.match(path)
        if m is not None:
            return unquote(m.group(1)) or NO_OWNER
    return NO_OWNER


def check_dav(method: str, path: str, depth: str | None, destination: str | None, login: str,
              prefix: str, patterns: list[re.Pattern[str]]) -> None:
    """Raise Forbidden unless the user may send this DAV request. Pure."""
    owner = owner_of(path, prefix, patterns)
    if owner is None:
        return
    if owner == NO_OWNER:
        if method not in DISCOVERY or (method == "PROPFIND" and (depth or "infinity").strip() != "0"):
            raise Forbidden("Only your own calendars and address books are reachable: discover them with "
                            "PROPFIND at Depth 0.")
    elif owner.casefold() != login.casefold():
        raise Forbidden("These calendars or address books are not yours.")
    if destination is not None:
        try:
            dest = urlsplit(destination.strip()).path
        except ValueError:
            raise BadRequest("The Destination header is not a URL.") from None
        dest_owner = owner_of(dest, prefix, patterns)
        if dest_owner is None or dest_owner.casefold() != login.casefold():
            raise Forbidden("The destination is not in your own collections.")


class DavGuard:
    """Refuses DAV requests that name another user's collections (security addon)."""

    name = "dav_guard"
    security = True
    Options = DavGuardOptions

    def __init__(self) -> None:
        self._opts = DavGuardOptions()
        self._patterns = _compile(self._opts.owner_patterns)

    def load(self, loader: "Loader") -> None:
        self._opts = loader.options
        self._patterns = _compile(self._opts.owner_patterns)
        self._audit = loader.audit
        self._refused = loader.metrics.counter("sge_proxy_dav_refused_total",
                                               "DAV requests refused by the DAV guard.")

    def requestheaders(self, flow: "Flow") -> None:
        req = flow.request
        path = req.path
        prefix = self._opts.prefix
        if not path.startswith(prefix) or flow.identity is None:
            return
        try:
            check_dav(req.method, path, req.header("Depth"), req.header("Destination"), flow.identity.login,
                      prefix, self._patterns)
        except Forbidden as e:
            self._refused.inc()
            self._audit("dav_guard.refused", flow, detail=e.detail)
            raise
