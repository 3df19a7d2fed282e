"""Header scrubbing tables and message serialisation."""
from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.http1 import (TrustedProxies, forwarded_client, request_head, response_head, scrub_request, scrub_response,
                         valid_request_id)


@pytest.mark.parametrize("sent,kept_names", [
    ([("Host", "a"), ("Authorization", "Basic x")], {"host", "authorization"}),
    ([("Connection", "close"), ("Keep-Alive", "1"), ("TE", "trailers"), ("Trailer", "x"),
      ("Transfer-Encoding", "chunked"), ("Upgrade", "websocket")], set()),
    ([("Proxy-Authorization", "x"), ("Proxy-Connection", "k"), ("Proxy-Anything", "1")], set()),
    ([("Forwarded", "for=1"), ("X-Forwarded-For", "1"), ("X-Forwarded-Host", "h"),
      ("X-Forwarded-Proto", "https"), ("X-Real-IP", "1")], set()),
    ([("X-SGE-User-ID", "bob"), ("x-sge-tenant", "t"), ("X-Sge-Signature", "s")], set()),
    ([("Connection", "X-A, x-b"), ("X-A", "1"), ("X-B", "2"), ("X-C", "3")], {"x-c"}),
    # Connection must not be able to strip what framing or auth needs
    ([("Connection", "Content-Length, Authorization"), ("Content-Length", "3"),
      ("Authorization", "x")], {"content-length", "authorization"}),
])
def test_scrub_request(sent, kept_names):
    h = CIMultiDict(sent)
    scrub_request(h, "10.0.0.9", "https")
    names = {k.lower() for k in h}
    assert names - {"x-forwarded-for", "x-forwarded-proto"} == kept_names
    assert h.getall("X-Forwarded-For") == ["10.0.0.9"]
    assert h.getall("X-Forwarded-Proto") == ["https"]


@pytest.mark.parametrize("sent,kept_names", [
    ([("Content-Type", "a"), ("Server", "x")], {"content-type", "server"}),
    ([("Upgrade", "h2c"), ("Connection", "Upgrade"), ("Alt-Svc", 'h2c=":1"')], set()),
    ([("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Trailer", "x")], set()),
    ([("Connection", "X-Private"), ("X-Private", "1"), ("X-Public", "2")], {"x-public"}),
    ([("Proxy-Authenticate", "Basic")], set()),
])
def test_scrub_response(sent, kept_names):
    h = CIMultiDict(sent)
    scrub_response(h)
    assert {k.lower() for k in h} == kept_names


@pytest.mark.parametrize("value,ok", [
    ("0123456789abcdef", True), ("a1b2c3d4-e5f6-7890-abcd-ef1234567890", True), ("short", False),
    ("has space inside", False), ("x" * 129, False), ("tab\tin-the-middle", False), (None, False),
    ("trace:span.01_x", True), ("crlf\r\ninjected!", False),
])
def test_valid_request_id(value, ok):
    assert valid_request_id(value) is ok


def test_request_and_response_heads():
    h = CIMultiDict([("Host", "h"), ("A", "1"), ("A", "2")])
    assert request_head("POST", "/jmap/?x=1", h) == b"POST /jmap/?x=1 HTTP/1.1\r\nHost: h\r\nA: 1\r\nA: 2\r\n\r\n"
    assert response_head(404, "", [("X", "y")]) == b"HTTP/1.1 404 Not Found\r\nX: y\r\n\r\n"


@pytest.mark.parametrize("loc,out", [
    ("https://up.example:8443/jmap/session", "/jmap/session"),
    ("https://up.example:8443", "/"),
    ("https://up.example:8443?x=1", "?x=1"),
    ("https://up.example:84430/x", "https://up.example:84430/x"),  # another port is another origin
    ("https://elsewhere.example/x", "https://elsewhere.example/x"),
    ("/relative", "/relative"),
])
def test_rewrite_location(loc, out):
    from proxy.http1 import rewrite_location
    assert rewrite_location(loc, "https://up.example:8443") == out


def _raw(pairs):
    return [(n.lower().encode(), n.encode(), v.encode()) for n, v in pairs]


REQUEST_CASES = [
    [("Host", "a"), ("Authorization", "Basic x"), ("Accept", "*/*")],
    [("Host", "a"), ("Connection", "keep-alive, X-A"), ("X-A", "1"), ("Keep-Alive", "5"), ("TE", "trailers")],
    [("X-SGE-User-ID", "bob"), ("Forwarded", "for=1"), ("X-Forwarded-For", "6.6.6.6"), ("X-Real-IP", "1"),
     ("Proxy-Authorization", "x"), ("Cookie", "c=1"), ("X-Request-ID", "old-id-123456")],
    [("Connection", "Authorization, Content-Length"), ("Authorization", "keep"), ("Expect", "100-continue")],
]


@pytest.mark.parametrize("pairs", REQUEST_CASES)
def test_raw_request_head_matches_the_scrubbed_headers(pairs):
    """The engine's two ways to serialise a request upstream give the same header multiset."""
    from proxy.http1 import raw_request_head
    h = CIMultiDict(pairs)
    scrub_request(h, "10.1.1.1", "https")
    for name in ("Expect", "Transfer-Encoding", "Content-Length", "X-Request-ID", "Host"):
        h.popall(name, None)
    own = [("Host", "up:443"), ("X-Request-ID", "rid-00000001")]
    h.extend(own)
    via_dict = request_head("GET", "/x", h)
    via_raw = raw_request_head("GET", "/x", _raw(pairs),
                               frozenset({b"host", b"x-request-id", b"expect", b"content-length",
                                          b"transfer-encoding"}),
                               [("X-Forwarded-For", "10.1.1.1"), ("X-Forwarded-Proto", "https"), *own])

    def lines(b):
        return sorted(b.split(b"\r\n"))
    assert lines(via_raw) == lines(via_dict)


@pytest.mark.parametrize("pairs", [
    [("Content-Type", "a"), ("Server", "x"), ("Content-Length", "3")],
    [("Upgrade", "h2c"), ("Connection", "Upgrade, X-P"), ("X-P", "1"), ("Alt-Svc", 'h2c=":1"'), ("ETag", "e")],
    [("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Proxy-Foo", "1"), ("Set-Cookie", "a=1")],
])
def test_raw_response_head_matches_the_scrubbed_headers(pairs):
    from proxy.http1 import raw_response_head
    h = CIMultiDict(pairs)
    scrub_response(h)
    h["X-Request-ID"] = "rid"
    via_dict = response_head(200, "OK", h)
    via_raw = raw_response_head(200, "OK", _raw(pairs), [("X-Request-ID", "rid")], frozenset({b"x-request-id"}))
    assert sorted(via_raw.split(b"\r\n")) == sorted(via_dict.split(b"\r\n"))


@pytest.mark.parametrize("value, names", [
    (b"keep-alive", False), (b"Keep-Alive", False), (b" keep-alive , ", False), (b"", False),
    (b"close", True), (b"Upgrade", True), (b"keep-alive, X-Private", True), (b"TE, close", True),
])
def test_names_headers(value, names):
    """Only a Connection header naming something beyond Keep-Alive makes the raw path look
    for what it names (Keep-Alive itself is hop-by-hop and always dropped)."""
    from proxy.http1 import names_headers
    assert names_headers(value) is names


def test_raw_heads_drop_what_a_keep_alive_connection_header_implies():
    from proxy.http1 import raw_request_head, raw_response_head
    raw = _raw([("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("Accept", "a")])
    req = raw_request_head("GET", "/", raw, frozenset(), b"", has_connection=False)
    resp = raw_response_head(200, "OK", raw, b"", has_connection=False)
    for head in (req, resp):
        assert b"Accept: a\r\n" in head
        assert b"Connection" not in head and b"Keep-Alive" not in head


@pytest.mark.parametrize("value, trace_id", [
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"),
    (b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ", "4bf92f3577b34da6a3ce929d0e0e4736"),
    (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", "4bf92f3577b34da6a3ce929d0e0e4736"),
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),  # version 00: nothing more
    (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),        # version ff is invalid
    (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),        # all-zero trace id
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),        # all-zero parent id
    (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),        # upper case
    (b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),         # short
    (b"garbage\n{\"injected\": 1}", None),
    (b"", None),
], ids=["w3c-example", "padded", "future-version", "v00-extra", "version-ff", "zero-trace", "zero-parent",
        "upper-case", "short", "garbage", "empty"])
def test_trace_id_of_a_traceparent(value, trace_id):
    from proxy.http1 import trace_id_of
    assert trace_id_of(value) == trace_id


# ---------------------------------------------------------------------------- trusted proxies
TRUSTED = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])


@pytest.mark.parametrize("values, want", [
    ([b"192.0.2.1"], "192.0.2.1"),                                   # the balancer's client
    ([b"192.0.2.1, 10.1.1.1"], "192.0.2.1"),                         # through two trusted hops
    ([b"198.51.100.9, 192.0.2.1, 10.1.1.1"], "192.0.2.1"),           # a spoofed left part is ignored
    ([b"192.0.2.1", b"10.1.1.1"], "192.0.2.1"),                      # two headers are one list
    ([b"10.2.2.2, 10.1.1.1"], "10.2.2.2"),                           # every hop trusted: the leftmost
    ([b"bogus, 10.1.1.1"], "10.1.1.1"),                              # a malformed hop ends the walk
    ([b"192.0.2.1, bogus"], "10.9.9.9"),                             # ... even the last one: the peer
    ([b" 2001:db8::5 , 2001:db9::7 "], "2001:db9::7"),
    ([b""], "10.9.9.9"),
])
def test_forwarded_client(values, want):
    assert forwarded_client("10.9.9.9", values, TRUSTED) == want


@pytest.mark.parametrize("addr, trusted", [
    ("10.0.0.1", True), ("::ffff:10.0.0.1", True), ("2001:db8::1", True), ("192.0.2.1", False),
    ("not-an-ip", False), ("", False),
])
def test_trusted_proxies(addr, trusted):
    assert (addr in TRUSTED) is trusted
    assert not TrustedProxies([]) and TRUSTED
