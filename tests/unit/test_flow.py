"""Request.header: the same answer as headers.get, from the parser's bytes when it can."""
from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.flow import Request, Response


def raw(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes, bytes]]:
    return [(n.lower().encode(), n.encode(), v.encode("latin-1")) for n, v in pairs]


def parsed(*pairs: tuple[str, str], connection: bool = False) -> Request:
    req = Request("GET", "/jmap", raw=raw(*pairs), peer="192.0.2.7")
    req.raw_connection = connection
    return req


@pytest.mark.parametrize("pairs, name, connection, materialised", [
    ((("Authorization", "Bearer a"), ("Authorization", "Bearer b")), "authorization", False, False),
    ((("Accept", "x"),), "Authorization", False, False),
    ((("X-Forwarded-For", "6.6.6.6"),), "X-Forwarded-For", False, True),   # the engine sets it
    ((("X-SGE-User-ID", "mallory"),), "X-SGE-User-ID", True, False),        # always dropped: None
    ((("Upgrade", "websocket"),), "Upgrade", False, False),                # hop-by-hop: None
    ((("Connection", "X-Api-Key"), ("X-Api-Key", "k")), "X-Api-Key", True, True),
    ((("Connection", "keep-alive"), ("Accept", "é")), "accept", True, True),
])
def test_header_answers_like_the_scrubbed_headers(pairs, name, connection, materialised):
    req = parsed(*pairs, connection=connection)
    expected = parsed(*pairs, connection=connection).headers.get(name)
    assert req.header(name) == expected
    assert req.headers_read is materialised


def test_header_reads_the_built_headers_once_they_exist():
    req = parsed(("Accept", "a"))
    req.headers["Accept"] = "b"
    assert req.header("accept") == "b"
    assert Request("GET", "/", CIMultiDict({"X-A": "1"})).header("x-a") == "1"


# set_header on the parser's bytes must give the upstream what the same edit on .headers gives
@pytest.mark.parametrize("pairs, edits", [
    ((("Accept", "a"),), [("X-SGE-User-ID", "alice")]),                           # new name
    ((("Authorization", "Bearer a"), ("Authorization", "Bearer b")),
     [("Authorization", "Basic eA==")]),                                          # replaces both
    ((("X-Api-Key", "k"), ("Accept", "a")), [("x-api-key", None)]),               # removal
    ((("Accept", "a"),), [("X-SGE-A", "1"), ("x-sge-a", "2")]),                   # later edit wins
    ((("Accept", "a"),), [("X-Gone", None)]),                                     # removing nothing
])
def test_set_header_on_raw_bytes_matches_the_dict(pairs, edits):
    lazy, eager = parsed(*pairs), parsed(*pairs)
    eager.headers  # built first: edits go to the dict
    for name, value in edits:
        lazy.set_header(name, value)
        eager.set_header(name, value)
    assert not lazy.headers_read
    for name, _ in edits:  # header() sees the edit without building anything
        assert lazy.header(name) == eager.headers.get(name)
    assert not lazy.headers_read
    built = lazy.headers  # building later applies the recorded edits
    assert list(built.items()) == list(eager.headers.items())
    assert lazy.edits is None


@pytest.mark.parametrize("pairs, name, connection, materialised", [
    ((("Content-Type", "application/json"),), "content-type", False, False),
    ((("Content-Type", "a"), ("Content-Type", "b")), "Content-Type", False, False),  # the first
    ((("Alt-Svc", "h3=\":443\""),), "Alt-Svc", False, False),                 # always dropped
    ((("Proxy-Foo", "1"),), "proxy-foo", False, False),
    ((("Keep-Alive", "timeout=5"),), "Keep-Alive", False, False),            # hop-by-hop
    ((("Connection", "X-Private"), ("X-Private", "1")), "X-Private", True, True),
    ((("Server", "x"),), "Date", False, False),
])
def test_response_header_answers_like_the_scrubbed_headers(pairs, name, connection, materialised):
    def make() -> Response:
        resp = Response(200, raw=raw(*pairs))
        resp.raw_connection = connection
        return resp
    resp = make()
    assert resp.header(name) == make().headers.get(name)
    assert resp.headers_read is materialised
