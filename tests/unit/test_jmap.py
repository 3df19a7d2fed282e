"""proxy.jmap: request parsing, JMAP's own error types, account extraction, route classes."""
from __future__ import annotations

import orjson
import pytest
from multidict import CIMultiDict

from proxy.errors import BadRequest
from proxy.flow import Flow, Request
from proxy.jmap import JmapRequest, MethodCall, is_api_request, parse_request, request_of, route_class

NOT_JSON = "urn:ietf:params:jmap:error:notJSON"
NOT_REQUEST = "urn:ietf:params:jmap:error:notRequest"


def body(using=("urn:ietf:params:jmap:core",), calls=()) -> bytes:
    return orjson.dumps({"using": list(using), "methodCalls": list(calls)})


@pytest.mark.parametrize("raw, jmap_type", [
    (b"", NOT_JSON),
    (b"{", NOT_JSON),
    (b"\xff\xfe", NOT_JSON),
    (b"[]", NOT_REQUEST),
    (b'"x"', NOT_REQUEST),
    (b"{}", NOT_REQUEST),
    (b'{"using": "urn:ietf:params:jmap:core", "methodCalls": []}', NOT_REQUEST),
    (b'{"using": [1], "methodCalls": []}', NOT_REQUEST),
    (b'{"using": [], "methodCalls": {}}', NOT_REQUEST),
    (b'{"using": []}', NOT_REQUEST),
    (b'{"using": [], "methodCalls": [["Mailbox/get", {}]]}', NOT_REQUEST),
    (b'{"using": [], "methodCalls": [["Mailbox/get", [], "0"]]}', NOT_REQUEST),
    (b'{"using": [], "methodCalls": [[1, {}, "0"]]}', NOT_REQUEST),
    (b'{"using": [], "methodCalls": [["Mailbox/get", {}, 0]]}', NOT_REQUEST),
    (b'{"using": [], "methodCalls": ["Mailbox/get"]}', NOT_REQUEST),
])
def test_parse_errors_carry_jmap_types(raw, jmap_type) -> None:
    with pytest.raises(BadRequest) as e:
        parse_request(raw)
    assert e.value.status == 400
    assert e.value.extra["jmapType"] == jmap_type


@pytest.mark.parametrize("using, calls", [
    ([], []),
    (["urn:ietf:params:jmap:core"], []),
    (["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
     [["Mailbox/get", {"accountId": "b", "ids": None}, "c0"]]),
    ([], [["Core/echo", {}, "0"], ["Email/set", {"accountId": "a", "create": {"k": {}}}, "1"],
          ["Core/echo", {"x": [1, 2]}, "0"]]),
])
def test_parse_builds_what_the_constructors_build(using, calls) -> None:
    raw = body(using, calls)
    doc = orjson.loads(raw)
    expected = JmapRequest(tuple(using), tuple(MethodCall(n, a, c) for n, a, c in calls), doc)
    got = parse_request(raw)
    assert got == expected
    assert got.names == expected.names == tuple(n for n, _, _ in calls)
    assert [repr(c) for c in got.calls] == [repr(c) for c in expected.calls]
    with pytest.raises(AttributeError):  # still frozen
        got.using = ()  # type: ignore[misc]
    for call in got.calls:
        with pytest.raises(AttributeError):
            call.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("args, expected", [
    ({}, []),
    ({"accountId": "a"}, ["a"]),
    ({"accountId": "a", "fromAccountId": "b"}, ["a", "b"]),
    ({"fromAccountId": "b"}, ["b"]),
    ({"accountId": None}, []),
    ({"accountId": 7}, ["7"]),               # a non-string id is kept (as its repr) so a guard sees it
    ({"accountId": ["a"]}, ["['a']"]),
    ({"#accountId": {"resultOf": "0"}}, []),  # a back-reference is not an account id
    ({"ids": ["a"], "filter": {"accountId": "z"}}, []),  # only top-level arguments name accounts
])
def test_account_ids_of_a_call(args, expected) -> None:
    req = parse_request(body(calls=[["Foo/get", args, "c0"]]))
    assert req.calls[0].account_ids() == expected


def test_request_collects_every_account() -> None:
    req = parse_request(body(calls=[
        ["Mailbox/get", {"accountId": "a"}, "0"],
        ["Email/copy", {"fromAccountId": "b", "accountId": "a"}, "1"],
        ["Core/echo", {}, "2"],
    ]))
    assert req.account_ids() == {"a", "b"}
    assert req.method_names == ["Mailbox/get", "Email/copy", "Core/echo"]
    assert [c.call_id for c in req.calls] == ["0", "1", "2"]
    assert req.using == ("urn:ietf:params:jmap:core",)


def _flow(method: str, target: str, raw: bytes | None = None) -> Flow:
    return Flow(Request(method, target, CIMultiDict(), body=raw), id="r1")


def test_request_of_parses_once_and_caches() -> None:
    f = _flow("POST", "/jmap", body(calls=[["Core/echo", {}, "0"]]))
    first = request_of(f)
    f.request.body = b"garbage"  # a later change does not re-parse
    assert request_of(f) is first


def test_request_of_without_body_is_none() -> None:
    assert request_of(_flow("POST", "/jmap")) is None


def test_request_of_raises_for_bad_body() -> None:
    with pytest.raises(BadRequest):
        request_of(_flow("POST", "/jmap", b"nope"))


@pytest.mark.parametrize("method, target, jmap_path, expected", [
    ("POST", "/jmap", "/jmap", True),
    ("POST", "/jmap/", "/jmap", True),
    ("POST", "/jmap/?x=1", "/jmap", True),
    ("POST", "/jmap/api", "/jmap", True),
    ("GET", "/jmap", "/jmap", False),
    ("POST", "/jmap/upload/a/", "/jmap", False),
    ("POST", "/jmapx", "/jmap", False),
    ("POST", "/mail/jmap", "/mail/jmap/", True),
])
def test_is_api_request(method, target, jmap_path, expected) -> None:
    assert is_api_request(_flow(method, target), jmap_path) is expected


@pytest.mark.parametrize("path, expected", [
    ("/.well-known/jmap", "session"),
    ("/jmap/session", "session"),
    ("/jmap", "api"),
    ("/jmap/", "api"),
    ("/jmap/upload/a/", "upload"),
    ("/jmap/download/a/b/n", "download"),
    ("/jmap/eventsource/", "eventsource"),
    ("/jmap/ws", "websocket"),
    ("/jmap/other", "jmap_other"),
    ("/api/v1/mail/messages", "rest"),
    ("/", "other"),
])
def test_route_class(path, expected) -> None:
    assert route_class(path) == expected


@pytest.mark.parametrize("path,route", [
    ("/.well-known/jmap", "session"), ("/jmap", "api"), ("/jmap/", "api"), ("/jmap/session", "session"),
    ("/jmap/upload/a/", "upload"), ("/jmap/download/a/b/c", "download"), ("/jmap/eventsource/", "eventsource"),
    ("/jmap/ws", "websocket"), ("/jmapx", "other"), ("/jmap/other", "jmap_other"),
    ("/api/v1/mail/messages", "rest"), ("/wp-login.php", "other"),
])
def test_route_class_of_every_kind(path, route):
    from proxy.jmap import route_class
    assert route_class(path) == route
