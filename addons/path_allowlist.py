"""Path allow-list: only JMAP paths and configured extras go upstream; the rest is answered 404
by the proxy.

Stalwart bans the source IP on the first request for a scanner path (its `scanBanPaths`:
*.php*, */wp-*, *../* ...). Behind the proxy that source is the proxy, so one scanner would take
every user offline. Such paths therefore never reach the upstream, not even under an allowed
prefix (a download named `x.php` included). The check runs on the raw path and on the path
percent-decoded once; encoded slashes, backslashes, NUL, dot segments, empty segments and
double-encoded specials are refused outright.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fnmatch import translate
from typing import TYPE_CHECKING
from urllib.parse import unquote

from proxy.errors import ConfigError, NotFound
from proxy.mail import MAIL_ROUTES

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow

__all__ = ["PathAllowlist", "PathAllowlistOptions", "PathRules", "compile_glob", "REASONS",
           "STALWART_SCAN_PATHS"]

# Stalwart's default scanBanPaths (Security object), matched case-insensitively here.
STALWART_SCAN_PATHS = ("*.php*", "*.cgi*", "*.asp*", "*/wp-*", "*/php*", "*/cgi-bin*", "*xmlrpc*",
                       "*../*", "*/..*", "*joomla*", "*wordpress*", "*drupal*")
# the bounded label set of sge_proxy_path_refused_total{reason}
REASONS = ("not_origin_form", "nul", "backslash", "encoded_slash", "double_encoding", "dot_segment",
           "empty_segment", "scanner", "not_allowed")
_DOUBLE = re.compile(r"%(?:2e|2f|5c|00|25)", re.IGNORECASE)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """`**` any characters, `*` and `?` within one segment; a trailing `/**` also matches the
    bare prefix ("/api/v1/mail/**" matches "/api/v1/mail"). Pure."""
    if not pattern.startswith("/"):
        raise ConfigError("extra_paths", f"{pattern!r} must start with /")
    out = []
    i = 0
    if pattern.endswith("/**"):
        body, tail = pattern[:-3], "(?:/.*)?"
    else:
        body, tail = pattern, ""
    while i < len(body):
        c = body[i]
        if body.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out) + tail + r"\Z")


@functools.lru_cache(maxsize=16)
def _scanner_regex(patterns: tuple[str, ...]) -> "re.Pattern[str]":
    """All scanner globs as one compiled alternation (fnmatchcase semantics)."""
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns) or r"(?!)")


@dataclass(frozen=True, slots=True)
class PathRules:
    """What is allowed. Built once from the options; `refusal(path)` is pure."""

    jmap_path: str
    extras: tuple[re.Pattern[str], ...] = ()
    scanner: tuple[str, ...] = STALWART_SCAN_PATHS

    def refusal(self, path: str) -> str | None:
        """None when `path` (the raw request path, no query) may go upstream, else the reason."""
        if not path.startswith("/"):
            return "not_origin_form"
        raw_low = path.lower()
        if "\x00" in path or "%00" in raw_low:
            return "nul"
        if "\\" in path or "%5c" in raw_low:
            return "backslash"
        if "%2f" in raw_low:
            return "encoded_slash"
        decoded = unquote(path)
        if _DOUBLE.search(decoded):
            return "double_encoding"
        if "\x00" in decoded:
            return "nul"
        if "\\" in decoded:
            return "backslash"
        segs = decoded.split("/")[1:]
        if any(s in (".", "..") for s in segs) or "../" in decoded:
            return "dot_segment"
        if "//" in decoded:
            return "empty_segment"
        low = decoded.lower()
        scan = _scanner_regex(self.scanner)
        if scan.match(low) or scan.match(raw_low):
            return "scanner"
        if self.allowed(decoded):
            return None
        return "not_allowed"

    def allowed(self, path: str) -> bool:
        base = self.jmap_path.rstrip("/")
        if path == "/.well-known/jmap" or path == base or path.startswith(base + "/"):
            return True
        return any(p.match(path) for p in self.extras)


@dataclass(frozen=True, kw_only=True)
class PathAllowlistOptions:
    """[addons.path_allowlist]"""
    # the REST facade answers the first two; CalDAV/CardDAV (the dav_guard addon keeps each user
    # to their own collections) the rest
    extra_paths: tuple[str, ...] = ("/api/v1/mail/**", "/api/v1/openapi.json", "/dav", "/dav/**",
                                    "/.well-known/caldav", "/.well-known/carddav")
    scanner_patterns: tuple[str, ...] = STALWART_SCAN_PATHS

    def __post_init__(self) -> None:
        for p in self.extra_paths:
            compile_glob(p)


class PathAllowlist:
    name = "path_allowlist"
    security = True
    Options = PathAllowlistOptions

    CACHE_SIZE = 4096   # paths repeat: their verdicts are remembered (refusal is pure)
    CACHE_MAX_PATH = 512

    def __init__(self) -> None:
        self._rules = PathRules("/jmap")
        self._verdicts: dict[str, str | None] = {}

    def load(self, loader: "Loader") -> None:
        opts: PathAllowlistOptions = loader.options or PathAllowlistOptions()
        self._verdicts = {}
        self._rules = PathRules(loader.config.stalwart.jmap_path,
                                tuple(compile_glob(p) for p in opts.extra_paths),
                                tuple(p.lower() for p in opts.scanner_patterns))
        self._refused = loader.metrics.counter("sge_proxy_path_refused_total",
                                               "Requests answered 404 by the path allow-list.", ("reason",))
        for r in REASONS:  # export every series from the start
            self._refused.labels(r)

    def requestheaders(self, flow: "Flow") -> None:
        if flow.route in MAIL_ROUTES:  # a mail login (proxy.mail): no HTTP path to check
            return
        path = flow.request.path
        verdicts = self._verdicts
        try:
            reason = verdicts[path]
        except KeyError:
            reason = self._rules.refusal(path)
            if len(path) <= self.CACHE_MAX_PATH:
                if len(verdicts) >= self.CACHE_SIZE:
                    del verdicts[next(iter(verdicts))]
                verdicts[path] = reason
        if reason is not None:
            self._refused.labels(reason).inc()
            raise NotFound("No such resource.")
