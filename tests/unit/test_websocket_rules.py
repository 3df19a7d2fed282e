"""The pure parts of WebSocket bridging: the handshake's accept token and which requests are
bridged (proxy/websocket.py), and the JMAP guard's verdict on JMAP-over-WebSocket messages
(addons/jmap_guard.py)."""
from __future__ import annotations

import orjson
import pytest

from addons.jmap_guard import check_ws_message
from proxy.errors import BadRequest, Forbidden, PayloadTooLarge, ProxyError
from proxy.jmap import ws_request_error
from proxy.session import Limits
from proxy.websocket import accept_token, is_websocket_upgrade

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example


def test_accept_token_is_rfc_6455s_example():
    assert accept_token(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert accept_token(b" " + KEY + b" ") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("method, upgrade, key, version, bridged", [
    ("GET", b"websocket", KEY, b"13", True),
    ("GET", b"WebSocket", KEY, b"13", True),
    ("GET", b"h2c, websocket", KEY, b"13", True),
    ("POST", b"websocket", KEY, b"13", False),           # only GET upgrades
    ("GET", b"h2c", KEY, b"13", False),                  # another protocol
    ("GET", b"websocketx", KEY, b"13", False),
    ("GET", b"websocket", None, b"13", False),           # no key
    ("GET", b"websocket", b"c2hvcnQ=", b"13", False),    # a key that is not 16 bytes
    ("GET", b"websocket", b"not base64!!", b"13", False),
    ("GET", b"websocket", KEY, b"8", False),             # an old draft's version
    ("GET", b"websocket", KEY, None, False),
    ("GET", None, KEY, b"13", False),
])
def test_which_upgrades_are_bridged(method, upgrade, key, version, bridged):
    assert is_websocket_upgrade(method, upgrade, key, version) is bridged


OWN = frozenset({"a"})
CALL = ["Mailbox/get", {"accountId": "a"}, "0"]


def _msg(**doc) -> bytes:
    return orjson.dumps(doc)


@pytest.mark.parametrize("content, refusal, limit_or_type", [
    (_msg(**{"@type": "Request", "id": "1", "using": [], "methodCalls": [CALL]}), None, None),
    (_msg(**{"@type": "WebSocketPushEnable", "dataTypes": None}), None, None),
    (_msg(**{"@type": "WebSocketPushDisable"}), None, None),
    (b"{", BadRequest, "urn:ietf:params:jmap:error:notJSON"),
    (b"[]", BadRequest, "urn:ietf:params:jmap:error:notRequest"),
    (_msg(**{"using": [], "methodCalls": [CALL]}), BadRequest, "urn:ietf:params:jmap:error:notRequest"),  # no @type
    (_msg(**{"@type": "Response", "methodResponses": []}), BadRequest, "urn:ietf:params:jmap:error:notRequest"),
    (_msg(**{"@type": "Request", "using": [], "methodCalls": "x"}), BadRequest, "urn:ietf:params:jmap:error:notRequest"),
    (_msg(**{"@type": "Request", "using": [], "methodCalls": [["Mailbox/get", {"accountId": "b"}, "0"]]}),
     Forbidden, None),
    (_msg(**{"@type": "Request", "using": [], "methodCalls": [["Email/copy", {"fromAccountId": "b", "accountId": "a"}, "0"]]}),
     Forbidden, None),
    (_msg(**{"@type": "Request", "using": [], "methodCalls": [CALL] * 3}), BadRequest, "maxCallsInRequest"),
    (_msg(**{"@type": "Request", "using": [], "methodCalls": [CALL], "pad": "x" * 200}), PayloadTooLarge,
     "maxSizeRequest"),
], ids=["request", "push-enable", "push-disable", "not-json", "not-object", "no-type", "response-type",
        "bad-calls", "foreign-account", "foreign-from-account", "too-many-calls", "too-large"])
def test_the_guards_verdict_on_a_message(content, refusal, limit_or_type):
    limits = Limits(max_calls_in_request=2, max_size_request=200)
    if refusal is None:
        check_ws_message(content, OWN, limits)
        return
    with pytest.raises(refusal) as e:
        check_ws_message(content, OWN, limits)
    if limit_or_type is not None:
        assert limit_or_type in (e.value.extra.get("limit"), e.value.extra.get("jmapType"))


@pytest.mark.parametrize("exc, rid, expect", [
    (Forbidden("not yours"), "r1", {"@type": "RequestError", "type": "about:blank", "status": 403,
                                    "title": "Forbidden", "detail": "not yours", "requestId": "r1"}),
    (BadRequest("bad", extra={"jmapType": "urn:ietf:params:jmap:error:notJSON"}), None,
     {"@type": "RequestError", "type": "urn:ietf:params:jmap:error:notJSON", "status": 400,
      "title": "Bad Request", "detail": "bad"}),
    (PayloadTooLarge("big", extra={"jmapType": "urn:ietf:params:jmap:error:limit", "limit": "maxSizeRequest"}), "r2",
     {"@type": "RequestError", "type": "urn:ietf:params:jmap:error:limit", "status": 413,
      "title": "Payload Too Large", "detail": "big", "limit": "maxSizeRequest", "requestId": "r2"}),
])
def test_request_error_message(exc: ProxyError, rid, expect):
    assert orjson.loads(ws_request_error(exc, rid)) == expect


@pytest.mark.parametrize("reason, expect", [
    ("bye", "bye"),
    ("x" * 200, "x" * 123),
    ("é" * 100, "é" * 61),  # two bytes each: 61 fit, half of the 62nd is dropped
])
def test_close_reasons_fit_a_close_frame(reason, expect):
    from proxy.websocket import _close_reason
    assert _close_reason(reason) == expect
    assert len(_close_reason(reason).encode()) <= 123


@pytest.mark.parametrize("headers, protocols, authorization", [
    ([("Sec-WebSocket-Protocol", "jmap, sge.bearer.abc.def.ghi")], "jmap", "Bearer abc.def.ghi"),
    ([("Sec-WebSocket-Protocol", "sge.bearer.t0k")], None, "Bearer t0k"),
    ([("Sec-WebSocket-Protocol", "jmap"), ("Sec-WebSocket-Protocol", "sge.bearer.x, chat")], "jmap, chat",
     "Bearer x"),
    ([("Sec-WebSocket-Protocol", "jmap")], "jmap", None),  # nothing offered: untouched
    ([], None, None),
], ids=["with-jmap", "alone", "two-headers", "none", "no-protocols"])
def test_a_bearer_offered_as_a_subprotocol_becomes_the_authorization(headers, protocols, authorization):
    from multidict import CIMultiDict

    from addons.auth import protocol_credential
    h = CIMultiDict(headers)
    protocol_credential(h)
    assert h.get("Sec-WebSocket-Protocol") == protocols
    assert h.get("Authorization") == authorization


@pytest.mark.parametrize("headers", [
    [("Sec-WebSocket-Protocol", "sge.bearer.a, sge.bearer.b")],
    [("Sec-WebSocket-Protocol", "sge.bearer.a"), ("Authorization", "Bearer b")],
], ids=["two-tokens", "token-and-header"])
def test_two_credentials_on_an_upgrade_are_refused(headers):
    from multidict import CIMultiDict

    from addons.auth import protocol_credential
    from proxy.tokens import AuthFailure
    with pytest.raises(AuthFailure):
        protocol_credential(CIMultiDict(headers))
