"""addons.dav_guard's rules: each user to their own calendars and address books."""
from __future__ import annotations

import pytest

from addons.dav_guard import DEFAULT_OWNER_PATTERNS, DavGuardOptions, _compile, check_dav, owner_of
from proxy.errors import ConfigError, Forbidden

P = _compile(DEFAULT_OWNER_PATTERNS)
ME = "alice@example.com"


@pytest.mark.parametrize("path, owner", [
    ("/jmap/session", None), ("/davx", None),
    ("/dav", ""), ("/dav/", ""), ("/dav/calendars/", ""), ("/dav/calendars/user/", ""),
    ("/dav/calendars/user/alice@example.com/", ME), ("/dav/calendars/user/alice@example.com/Default/x.ics", ME),
    ("/dav/calendars/user/alice%40example.com/", ME),
    ("/dav/addressbooks/user/bob@example.com/Default/", "bob@example.com"),
    ("/dav/principals/user/alice@example.com", ME),
    ("/dav/cal/alice/default/", "alice"), ("/dav/card/alice", "alice"), ("/dav/pal/bob/", "bob"),
    ("/dav/file/alice/docs/a.txt", "alice"),
])
def test_owner_of(path, owner):
    assert owner_of(path, "/dav", P) == owner


@pytest.mark.parametrize("path", [
    "/dav/calendars/user/alice@example.com/../bob@example.com/", "/dav/calendars/user/x%2F..%2Fbob/",
    "/dav/cal//bob/", "/dav/cal/%2e%2e/bob/",
])
def test_paths_an_upstream_could_read_otherwise(path):
    with pytest.raises(Forbidden):
        owner_of(path, "/dav", P)


@pytest.mark.parametrize("method, path, depth, destination, allowed", [
    ("PROPFIND", "/dav/calendars/user/alice@example.com/", "1", None, True),
    ("PUT", "/dav/calendars/user/ALICE@example.com/Default/e.ics", None, None, True),
    ("REPORT", "/dav/calendars/user/bob@example.com/Default/", "1", None, False),
    ("GET", "/dav/addressbooks/user/bob@example.com/Default/c.vcf", None, None, False),
    ("PROPFIND", "/dav/", "0", None, True),                  # discovery of the home
    ("PROPFIND", "/dav/calendars/user/", "0", None, True),
    ("OPTIONS", "/dav/calendars/", None, None, True),
    ("PROPFIND", "/dav/calendars/user/", "1", None, False),  # a listing of everyone's homes
    ("PROPFIND", "/dav/calendars/user/", None, None, False),  # no Depth: infinity
    ("DELETE", "/dav/calendars/", None, None, False),
    ("MOVE", "/dav/cal/alice@example.com/a/e.ics", None, "https://mail.example.com/dav/cal/alice@example.com/b/e.ics", True),
    ("COPY", "/dav/cal/alice@example.com/a/e.ics", None, "/dav/cal/bob@example.com/a/e.ics", False),
    ("MOVE", "/dav/cal/alice@example.com/a/e.ics", None, "/elsewhere/e.ics", False),
    ("GET", "/jmap/session", None, None, True),               # not DAV: not this guard's
])
def test_check_dav(method, path, depth, destination, allowed):
    if allowed:
        check_dav(method, path, depth, destination, ME, "/dav", P)
    else:
        with pytest.raises(Forbidden):
            check_dav(method, path, depth, destination, ME, "/dav", P)


@pytest.mark.parametrize("kw", [{"prefix": "dav"}, {"prefix": "/dav/"}, {"owner_patterns": ("/dav/{owner}/x",)},
                                {"owner_patterns": ("/other/{owner}",)}])
def test_bad_options(kw):
    with pytest.raises(ConfigError):
        DavGuardOptions(**kw)
