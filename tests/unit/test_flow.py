"""Request.header: the same answer as headers.get, from the parser's bytes when it can."""
from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.flow import Request


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
