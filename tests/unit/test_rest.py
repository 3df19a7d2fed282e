"""proxy.rest (the REST facade's pure logic) as tables: routing, validation, JMAP request building,
the JMAP error -> HTTP table, answer shaping, the cache; then the addon's own answers (routing
errors, OpenAPI, body caps) through a real AddonManager."""
from __future__ import annotations

import base64
import contextlib
import email
import email.policy
from typing import AsyncIterator

import orjson
import pytest
from multidict import CIMultiDict

from addons.jmap_guard import JmapGuard, account_path
from addons.rest_facade import FACADE_ROOT, RestFacade, RestFacadeOptions
from addons.upstream_identity import UpstreamIdentity
from proxy import rest
from proxy.addonmanager import AddonManager
from proxy.config import Config, StalwartOptions, load_config
from proxy.errors import (BadGateway, BadRequest, Forbidden, InternalError, NotFound, PayloadTooLarge,
                          ProxyError, TooManyRequests, Unauthorized, to_response)
from proxy.flow import Flow, Request
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.openapi import document
from proxy.rest import (Address, Attachment, Draft, ListQuery, Mailbox, Patch, Responses)
from proxy.target import Target
from proxy.tls import ClientTLS
from proxy.upstream import UpstreamPool
from tests.stalwart_double import StalwartDouble, serve

ACCT = "a"
BOXES = (
    Mailbox("i1", "Inbox", "inbox", None, 3, 1),
    Mailbox("d1", "Drafts", "drafts", None, 0, 0),
    Mailbox("s1", "Sent", "sent", None, 0, 0),
    Mailbox("t1", "Trash", "trash", None, 0, 0),
    Mailbox("w1", "Work", None, None, 0, 0),
    Mailbox("w2", "work", None, "w1", 0, 0),
    Mailbox("p1", "Projects", None, None, 0, 0),
    Mailbox("x1", "d1", None, None, 0, 0),  # a mailbox named like another's id: the name wins
)


def answer(*items: list) -> Responses:
    return rest.api_responses(200, {}, orjson.dumps({"methodResponses": list(items), "sessionState": "0"}))


def problem_of(exc: ProxyError) -> dict:
    return orjson.loads(to_response(exc, "r1")[2])


# ---------------------------------------------------------------------------- routing
@pytest.mark.parametrize("method, path, endpoint, params", [
    ("GET", "/api/v1/mail/mailboxes", "list_mailboxes", ()),
    ("GET", "/api/v1/mail/messages", "list_messages", ()),
    ("POST", "/api/v1/mail/messages", "send_message", ()),
    ("GET", "/api/v1/mail/messages/M1", "get_message", ("M1",)),
    ("PATCH", "/api/v1/mail/messages/M1", "update_message", ("M1",)),
    ("DELETE", "/api/v1/mail/messages/M-1_x", "delete_message", ("M-1_x",)),
    ("GET", "/api/v1/mail/messages/M1/attachments/G2", "download_attachment", ("M1", "G2")),
    ("POST", "/api/v1/mail/attachments", "upload_attachment", ()),
    ("GET", "/api/v1/mail/quota", "get_quota", ()),
    ("GET", "/api/v1/openapi.json", "openapi", ()),
])
def test_route(method, path, endpoint, params):
    assert rest.route(method, path) == rest.Route(endpoint, params)


@pytest.mark.parametrize("method, path, error, allow", [
    ("GET", "/api/v1/mail", NotFound, None),
    ("GET", "/api/v1/mail/", NotFound, None),
    ("GET", "/api/v1/mail/messages/", BadRequest, None),          # an empty id
    ("GET", "/api/v1/mail/messages/M1/attachments", NotFound, None),
    ("GET", "/api/v1/mail/nothing", NotFound, None),
    ("GET", "/api/v1/mail/messages/a.b", BadRequest, None),
    ("GET", "/api/v1/mail/messages/a%20b", BadRequest, None),
    ("GET", "/api/v1/mail/messages/" + "x" * 256, BadRequest, None),
    ("GET", "/api/v1/mail/messages/M1/attachments/G%2F1", BadRequest, None),
    ("PUT", "/api/v1/mail/messages/M1", rest.MethodNotAllowed, "GET, PATCH, DELETE"),
    ("DELETE", "/api/v1/mail/mailboxes", rest.MethodNotAllowed, "GET"),
    ("GET", "/api/v1/mail/attachments", rest.MethodNotAllowed, "POST"),
    ("POST", "/api/v1/openapi.json", rest.MethodNotAllowed, "GET, HEAD"),
])
def test_route_refusals(method, path, error, allow):
    with pytest.raises(error) as e:
        rest.route(method, path)
    assert type(e.value) is error
    assert e.value.headers.get("Allow") == allow


@pytest.mark.parametrize("path, facade", [
    ("/api/v1/mail", True), ("/api/v1/mail/x", True), ("/api/v1/openapi.json", True),
    ("/api/v1/mail/", True), (rest.UPLOAD_PATH, True),
    ("/api/v1/mailx", False), ("/api/v1/other", False), ("/jmap/", False), ("/api/v1", False), ("", False),
])
def test_is_facade_path(path, facade):
    assert rest.is_facade_path(path) is facade
    if facade:  # the addon's cheap first test lets every facade path through
        assert path.startswith(FACADE_ROOT)
    assert FACADE_ROOT == "/api/v1/"


# ---------------------------------------------------------------------------- list query validation
@pytest.mark.parametrize("query, expected", [
    ("", ListQuery()),
    ("mailbox=INBOX&limit=10&position=20", ListQuery(mailbox="INBOX", limit=10, position=20)),
    ("sort=subject,-size", ListQuery(sort=(("subject", True), ("size", False)))),
    ("sort=-receivedAt", ListQuery(sort=(("receivedAt", False),))),
    ("q=hello+world&unread=true&from=bob", ListQuery(text="hello world", unread=True, sender="bob")),
    ("unread=0&q=", ListQuery(unread=False)),
    ("after=2025-01-31&before=2025-02-01T10:00:00%2B01:00",
     ListQuery(after="2025-01-31T00:00:00Z", before="2025-02-01T09:00:00Z")),
    ("after=2025-01-31T08:00:00Z", ListQuery(after="2025-01-31T08:00:00Z")),
    ("limit=500", ListQuery(limit=500)),
])
def test_parse_list_query(query, expected):
    assert rest.parse_list_query(query, 500) == expected


@pytest.mark.parametrize("query, fragment", [
    ("limit=501", "limit must be between 1 and 500"),
    ("limit=0", "limit must be between 1 and 500"),
    ("limit=-1", "limit must be a whole number"),
    ("limit=ten", "limit must be a whole number"),
    ("position=99999999999999", "position must be"),
    ("sort=bogus", "Cannot sort by 'bogus'"),
    ("sort=receivedAt:desc", "Cannot sort by"),
    ("sort=size,-size", "at most 3 different"),
    ("sort=size,from,to,subject", "at most 3 different"),
    ("sort=", "Cannot sort by ''"),
    ("unread=maybe", "unread must be true or false"),
    ("after=yesterday", "after must be an RFC 3339"),
    ("before=2025-13-01", "before must be an RFC 3339"),
    ("q=a%00b", "q contains control characters"),
    ("q=" + "x" * 1025, "q is longer than 1024"),
    ("mailbox=", "mailbox must not be empty"),
    ("limt=5", "Unknown query parameter 'limt'"),
    ("limit=5&limit=6", "more than once"),
])
def test_parse_list_query_refusals(query, fragment):
    with pytest.raises(BadRequest) as e:
        rest.parse_list_query(query, 500)
    assert fragment in e.value.detail


def test_messages_request_uses_one_request_with_a_back_reference():
    q = ListQuery(limit=5, position=10, sort=(("size", True),), text="t", unread=True, sender="bob",
                  after="2025-01-01T00:00:00Z", before="2025-02-01T00:00:00Z")
    doc = rest.messages_request(ACCT, "i1", q)
    assert doc["using"] == ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"]
    (qn, qa, qid), (gn, ga, gid) = doc["methodCalls"]
    assert (qn, qid, gn, gid) == ("Email/query", "q", "Email/get", "g")
    assert qa == {"accountId": ACCT, "filter": {"inMailbox": "i1", "text": "t", "from": "bob",
                                                "after": "2025-01-01T00:00:00Z", "before": "2025-02-01T00:00:00Z",
                                                "notKeyword": "$seen"},
                  "sort": [{"property": "size", "isAscending": True}], "position": 10, "limit": 5,
                  "calculateTotal": True}
    assert ga["#ids"] == {"resultOf": "q", "name": "Email/query", "path": "/ids"}
    assert "ids" not in ga and ga["accountId"] == ACCT
    assert rest.messages_request(ACCT, "i1", ListQuery(unread=False))["methodCalls"][0][1]["filter"] == \
        {"inMailbox": "i1", "hasKeyword": "$seen"}


# ---------------------------------------------------------------------------- mailboxes
@pytest.mark.parametrize("ref, expected", [
    ("INBOX", "i1"), ("inbox", "i1"), ("Trash", "t1"), ("trash", "t1"),
    ("Work", "w1"), ("work", "w2"),              # exact name first
    ("PROJECTS", "p1"),                          # case-insensitive name when unambiguous
    ("d1", "x1"),                                # a name wins over an id
    ("s1", "s1"), ("w2", "w2"),                  # ids
])
def test_resolve_mailbox(ref, expected):
    assert rest.resolve_mailbox(BOXES, ref).id == expected


@pytest.mark.parametrize("ref", ["WORK", "nope", "archive", "", "a\x01"])
def test_resolve_mailbox_unknown(ref):
    with pytest.raises(BadRequest):
        rest.resolve_mailbox(BOXES, ref)


def test_parse_mailboxes_keeps_only_the_facade_properties():
    r = answer(["Mailbox/get", {"accountId": ACCT, "list": [
        {"id": "i1", "name": "Inbox", "role": "INBOX", "parentId": None, "totalEmails": 2, "unreadEmails": 1,
         "myRights": {}},
        {"id": "x", "name": None, "totalEmails": -1, "unreadEmails": True},
        {"name": "no id"}]}, "m"])
    assert rest.parse_mailboxes(r) == (Mailbox("i1", "Inbox", "inbox", None, 2, 1), Mailbox("x", "", None, None, 0, 0))
    assert rest.mailboxes_request(ACCT)["methodCalls"] == [
        ["Mailbox/get", {"accountId": ACCT, "ids": None,
                         "properties": ["id", "name", "role", "parentId", "totalEmails", "unreadEmails"]}, "m"]]


# ---------------------------------------------------------------------------- changes
@pytest.mark.parametrize("doc, expected", [
    ({"seen": True}, Patch(seen=True)),
    ({"flagged": False, "mailbox": "Archive"}, Patch(flagged=False, mailbox="Archive")),
])
def test_parse_patch(doc, expected):
    assert rest.parse_patch(doc) == expected


@pytest.mark.parametrize("doc, fragment", [
    ({}, "Nothing to change"),
    ({"seen": "yes"}, "seen must be true or false"),
    ({"read": True}, "Unknown PATCH body member 'read'"),
    ({"mailbox": ""}, "mailbox must not be empty"),
    ({"mailbox": 3}, "mailbox must be a string"),
])
def test_parse_patch_refusals(doc, fragment):
    with pytest.raises(BadRequest) as e:
        rest.parse_patch(doc)
    assert fragment in e.value.detail


@pytest.mark.parametrize("patch, mailbox, change", [
    (Patch(seen=True), None, {"keywords/$seen": True}),
    (Patch(seen=False, flagged=True), None, {"keywords/$seen": None, "keywords/$flagged": True}),
    (Patch(mailbox="Archive"), "ar", {"mailboxIds": {"ar": True}}),
])
def test_update_request(patch, mailbox, change):
    calls = rest.update_request(ACCT, "M1", patch, mailbox)["methodCalls"]
    assert calls[0] == ["Email/set", {"accountId": ACCT, "update": {"M1": change}}, "u"]
    assert calls[1][0] == "Email/get" and calls[1][1]["ids"] == ["M1"]


@pytest.mark.parametrize("trash, call", [
    ("t1", ["Email/set", {"accountId": ACCT, "update": {"M1": {"mailboxIds": {"t1": True}}}}, "d"]),
    (None, ["Email/set", {"accountId": ACCT, "destroy": ["M1"]}, "d"]),
])
def test_delete_request(trash, call):
    calls = rest.delete_request(ACCT, "M1", trash)["methodCalls"]
    assert calls[-1] == call
    if trash is None:  # the id is read first: Cyrus reports destroying an unknown id as done
        assert calls[0] == ["Email/get", {"accountId": ACCT, "ids": ["M1"], "properties": ["id"]}, "e"]


@pytest.mark.parametrize("query, permanent", [("", False), ("permanent=true", True), ("permanent=false", False)])
def test_parse_delete_query(query, permanent):
    assert rest.parse_delete_query(query) is permanent


@pytest.mark.parametrize("args, permanent, found, error", [
    ({"updated": {"M1": None}}, False, True, None),
    ({"destroyed": ["M1"]}, True, True, None),
    ({"destroyed": ["M1"]}, True, False, NotFound),
    ({"notUpdated": {"M1": {"type": "notFound"}}}, False, True, NotFound),
    ({"notDestroyed": {"M1": {"type": "forbidden"}}}, True, True, Forbidden),
    ({}, False, True, BadGateway),
])
def test_delete_result(args, permanent, found, error):
    r = answer(["Email/get", {"list": [{"id": "M1"}] if found else [], "notFound": [] if found else ["M1"]}, "e"],
               ["Email/set", args, "d"])
    if error is None:
        rest.delete_result(r, "M1", permanent)
    else:
        with pytest.raises(error):
            rest.delete_result(r, "M1", permanent)


# ---------------------------------------------------------------------------- sending
def test_parse_draft():
    d = rest.parse_draft({"to": ["bob@example.com", {"name": "Carol", "email": "carol@example.com"}],
                          "cc": "dave@example.com", "bcc": [{"email": "bob@example.com"}], "subject": "Hi",
                          "text": "t", "attachments": [{"blobId": "G1", "type": "Image/PNG", "name": "a.png"}],
                          "from": "alice@example.com"})
    assert d == Draft(to=(Address("bob@example.com"), Address("carol@example.com", "Carol")),
                      cc=(Address("dave@example.com"),), bcc=(Address("bob@example.com"),), subject="Hi",
                      text="t", attachments=(Attachment("G1", "image/png", "a.png"),), sender="alice@example.com")
    assert d.recipients == ["bob@example.com", "carol@example.com", "dave@example.com"]
    assert rest.parse_draft({"send": False}) == Draft(send=False)


@pytest.mark.parametrize("doc, fragment", [
    ({"subject": "no one"}, "needs at least one recipient"),
    ({"to": ["not-an-address"]}, "to[0] is not an email address"),
    ({"to": ["a@b\r\nBcc: x@y"]}, "to[0] is not an email address"),
    ({"to": [{"email": "a@b", "nick": "x"}]}, "Unknown to[0] member 'nick'"),
    ({"to": 5}, "to must be a list"),
    ({"to": ["a@b"], "subject": "x\r\nBcc: y@z"}, "subject contains control characters"),
    ({"to": ["a@b"], "text": 5}, "text must be a string"),
    ({"to": ["a@b"], "attachments": [{"blobId": "../x"}]}, "attachments[0].blobId is not valid"),
    ({"to": ["a@b"], "attachments": [{"blobId": "G1", "type": "text"}]}, "not a media type"),
    ({"to": ["a@b"], "send": "yes"}, "send must be true or false"),
    ({"to": ["a@b"], "from": "me"}, "from is not an email address"),
    ({"to": ["a@b"], "priority": 1}, "Unknown message member 'priority'"),
    ({"to": [f"u{i}@example.com" for i in range(101)]}, "at most 100 recipients"),
])
def test_parse_draft_refusals(doc, fragment):
    with pytest.raises(BadRequest) as e:
        rest.parse_draft(doc)
    assert fragment in e.value.detail


IDENTITIES = [{"id": "i-a", "email": "Alice@Example.com", "name": "Alice"},
              {"id": "i-w", "email": "*@example.org", "name": ""}]


@pytest.mark.parametrize("wanted, expected", [
    ("alice@example.com", {"id": "i-a", "email": "Alice@Example.com", "name": "Alice"}),
    ("sales@example.org", {"id": "i-w", "email": "sales@example.org", "name": ""}),
])
def test_choose_identity(wanted, expected):
    assert rest.choose_identity(IDENTITIES, wanted) == expected


@pytest.mark.parametrize("wanted", ["bob@example.com", "alice@example.org.evil"])
def test_choose_identity_refuses_other_addresses(wanted):
    with pytest.raises(Forbidden) as e:
        rest.choose_identity(IDENTITIES, wanted)
    assert e.value.extra["jmapType"] == "forbiddenFrom"


def test_send_request_creates_in_drafts_and_submits_with_an_envelope():
    d = Draft(to=(Address("bob@example.com", "Bob"),), bcc=(Address("eve@example.com"),), subject="S",
              text="hello", html="<p>hello</p>", attachments=(Attachment("G1", "text/plain", "a.txt"),))
    doc = rest.send_request(ACCT, {"id": "i-a", "email": "alice@example.com", "name": "Alice"}, d, "d1", "s1")
    assert doc["using"] == ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail",
                            "urn:ietf:params:jmap:submission"]
    (cn, ca, cid), (sn, sa, sid) = doc["methodCalls"]
    email = ca["create"]["draft"]
    assert (cn, cid, sn, sid) == ("Email/set", "c", "EmailSubmission/set", "s")
    assert email["mailboxIds"] == {"d1": True} and email["keywords"] == {"$draft": True, "$seen": True}
    assert email["from"] == [{"name": "Alice", "email": "alice@example.com"}]
    assert email["to"] == [{"name": "Bob", "email": "bob@example.com"}]
    assert "bcc" not in email  # Bcc recipients only in the envelope
    assert email["bodyValues"] == {"t": {"value": "hello"}, "h": {"value": "<p>hello</p>"}}
    assert email["textBody"] == [{"partId": "t", "type": "text/plain"}]
    assert email["htmlBody"] == [{"partId": "h", "type": "text/html"}]
    assert email["attachments"] == [{"blobId": "G1", "type": "text/plain", "name": "a.txt",
                                     "disposition": "attachment"}]
    assert sa["create"]["send"] == {"identityId": "i-a", "emailId": "#draft", "envelope": {
        "mailFrom": {"email": "alice@example.com"},
        "rcptTo": [{"email": "bob@example.com"}, {"email": "eve@example.com"}]}}
    assert sa["onSuccessUpdateEmail"] == {"#send": {"keywords/$draft": None, "mailboxIds": {"s1": True}}}


def test_send_request_draft_only():
    doc = rest.send_request(ACCT, {"id": "i", "email": "a@b"}, Draft(send=False), "d1", None)
    assert [c[0] for c in doc["methodCalls"]] == ["Email/set"]
    assert doc["methodCalls"][0][1]["create"]["draft"]["textBody"] == [{"partId": "t", "type": "text/plain"}]


@pytest.mark.parametrize("items, send, expected, error", [
    ([["Email/set", {"created": {"draft": {"id": "M9"}}}, "c"],
      ["EmailSubmission/set", {"created": {"send": {"id": "S1"}}}, "s"],
      ["Email/set", {"updated": {"M9": None}}, "s"]], True,
     {"id": "M9", "sent": True, "submissionId": "S1", "mailbox": "sent"}, None),
    ([["Email/set", {"created": {"draft": {"id": "M9"}}}, "c"]], False,
     {"id": "M9", "sent": False, "submissionId": None, "mailbox": "drafts"}, None),
    ([["Email/set", {"notCreated": {"draft": {"type": "invalidProperties", "properties": ["attachments"]}}}, "c"]],
     True, None, (BadRequest, "invalidProperties")),
    ([["Email/set", {"created": {"draft": {"id": "M9"}}}, "c"],
      ["EmailSubmission/set", {"notCreated": {"send": {"type": "forbiddenFrom"}}}, "s"]], True, None,
     (Forbidden, "forbiddenFrom")),
    ([["Email/set", {"created": {"draft": {"id": "M9"}}}, "c"],
      ["error", {"type": "unknownMethod"}, "s"]], True, None, (rest.NotImplementedHere, "unknownMethod")),
])
def test_send_result(items, send, expected, error):
    r = answer(*items)
    draft = Draft(to=(Address("b@c"),), send=send)
    if error is None:
        assert rest.send_result(r, draft) == expected
    else:
        with pytest.raises(error[0]) as e:
            rest.send_result(r, draft)
        assert e.value.extra["jmapType"] == error[1]
        if error[1] == "forbiddenFrom":
            assert e.value.extra["draftId"] == "M9"


# ---------------------------------------------------------------------------- error mapping
@pytest.mark.parametrize("jmap_type, status, retry_after", [
    ("notFound", 404, None), ("forbidden", 403, None), ("overQuota", 429, None),
    ("serverFail", 500, None), ("serverPartialFail", 500, None), ("serverUnavailable", 503, "60"),
    ("invalidArguments", 400, None), ("invalidProperties", 400, None), ("stateMismatch", 409, None),
    ("requestTooLarge", 413, None), ("tooLarge", 413, None), ("rateLimit", 429, "60"),
    ("accountNotFound", 404, None), ("unknownMethod", 501, None), ("unsupportedSort", 400, None),
    ("unsupportedFilter", 400, None), ("accountReadOnly", 403, None), ("mailboxHasEmail", 409, None),
    ("blobNotFound", 400, None), ("forbiddenFrom", 403, None), ("invalidResultReference", 500, None),
    ("somethingNew", 502, None), (None, 502, None),
])
def test_error_table(jmap_type, status, retry_after):
    e = rest.jmap_error(jmap_type, "the server's words")
    assert e.status == status
    assert e.headers.get("Retry-After") == retry_after
    body = problem_of(e)
    assert body["status"] == status
    assert body["jmapType"] == (jmap_type or "unknown")
    # the server's description reaches the client for client errors only
    assert (body["detail"] == "the server's words") is (status < 500)


def test_method_error_inside_200_is_mapped():
    r = answer(["error", {"type": "stateMismatch"}, "q"],
               ["error", {"type": "invalidArguments", "arguments": ["filter"], "description": "bad filter"}, "x"])
    with pytest.raises(rest.Conflict) as e:
        r.get("q", "Email/query")
    assert e.value.extra == {"jmapType": "stateMismatch"}
    with pytest.raises(BadRequest) as e:
        r.get("x", "Email/query")
    assert (e.value.detail, e.value.extra) == ("bad filter", {"jmapType": "invalidArguments", "arguments": ["filter"]})


@pytest.mark.parametrize("status, headers, body, cls, code, extra", [
    (400, {"Content-Type": "application/problem+json"},
     b'{"type":"urn:ietf:params:jmap:error:limit","status":400,"title":"Limit","detail":"too many",'
     b'"limit":"maxCallsInRequest"}',
     rest.UpstreamProblem, 400, {"jmapType": "urn:ietf:params:jmap:error:limit", "limit": "maxCallsInRequest"}),
    (429, {"Content-Type": "application/problem+json", "Retry-After": "7"},
     b'{"type":"about:blank","status":429,"title":"Too Many Requests","detail":"slow down"}',
     rest.UpstreamProblem, 429, {}),
    (403, {"Content-Type": "application/problem+json"},
     b'{"type":"about:blank","status":403,"title":"Forbidden","detail":"Quota exceeded"}',
     rest.UpstreamProblem, 403, {}),
    (401, {"Content-Type": "application/problem+json"}, b'{"type":"about:blank","status":401}', BadGateway, 502, {}),
    (503, {"Retry-After": "3"}, b"down", rest.Unavailable, 503, {}),
    (413, {}, b"", PayloadTooLarge, 413, {}),
    (429, {}, b"", TooManyRequests, 429, {}),
    (500, {"Content-Type": "text/html"}, b"<h1>oops</h1>", BadGateway, 502, {}),
    (302, {}, b"", BadGateway, 502, {}),
])
def test_request_level_errors(status, headers, body, cls, code, extra):
    with pytest.raises(cls) as e:
        rest.api_responses(status, headers, body)
    assert e.value.status == code
    for k, v in extra.items():
        assert e.value.extra[k] == v
    if code in (429, 503) and "Retry-After" in headers:
        assert e.value.headers["Retry-After"] == headers["Retry-After"]
    assert problem_of(e.value)["status"] == code


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"methodResponses": 5}'])
def test_unusable_jmap_answers(body):
    with pytest.raises(BadGateway):
        rest.api_responses(200, {}, body)


# ---------------------------------------------------------------------------- shaping
EMAIL = {
    "id": "M1", "threadId": "T1", "mailboxIds": {"i1": True, "x": False}, "keywords": {"$Seen": True, "$flagged": True},
    "from": [{"name": "Bob", "email": "bob@example.com"}], "to": [{"email": "alice@example.com"}],
    "subject": "Hello", "receivedAt": "2025-01-01T00:00:00Z", "sentAt": "2025-01-01T01:00:00+01:00",
    "size": 1234, "preview": "hi", "hasAttachment": True, "cc": None,
    "headers": [{"name": "Subject", "value": " Hello"}],
    "bodyValues": {"1": {"value": "plain"}, "2": {"value": "<b>html</b>"}},
    "textBody": [{"partId": "1", "type": "text/plain"}],
    "htmlBody": [{"partId": "2", "type": "text/html"}],
    "attachments": [{"partId": "3", "blobId": "G1", "name": "a.pdf", "type": "application/pdf", "size": 10,
                     "disposition": "attachment", "cid": None}],
}


def test_message_result():
    m = rest.message_result(answer(["Email/get", {"list": [EMAIL], "notFound": []}, "e"]), "M1")
    assert m["mailboxIds"] == ["i1"] and m["seen"] and m["flagged"] and not m["draft"]
    assert m["keywords"] == ["$flagged", "$seen"]
    assert m["to"] == [{"name": None, "email": "alice@example.com"}]
    assert m["headers"] == [{"name": "Subject", "value": "Hello"}]
    assert (m["text"], m["html"]) == ("plain", "<b>html</b>")
    assert m["attachments"] == [{"blobId": "G1", "name": "a.pdf", "type": "application/pdf", "size": 10,
                                 "disposition": "attachment", "cid": None,
                                 "url": "/api/v1/mail/messages/M1/attachments/G1"}]


def test_message_without_html_has_html_null():
    e = {**EMAIL, "htmlBody": [{"partId": "1", "type": "text/plain"}]}
    assert rest.message_result(answer(["Email/get", {"list": [e]}, "e"]), "M1")["html"] is None


def test_unknown_message_is_404():
    with pytest.raises(NotFound) as e:
        rest.message_result(answer(["Email/get", {"list": [], "notFound": ["M1"]}, "e"]), "M1")
    assert e.value.extra["jmapType"] == "notFound"


def test_list_result_keeps_query_order():
    r = answer(["Email/query", {"ids": ["M2", "M1"], "total": 7, "position": 5}, "q"],
               ["Email/get", {"list": [{**EMAIL, "id": "M1"}, {**EMAIL, "id": "M2"}]}, "g"])
    out = rest.list_result(r)
    assert (out["total"], out["position"]) == (7, 5)
    assert [m["id"] for m in out["messages"]] == ["M2", "M1"]


def test_attachment_of():
    r = answer(["Email/get", {"list": [EMAIL]}, "e"])
    assert rest.attachment_of(r, "M1", "G1")["name"] == "a.pdf"
    with pytest.raises(NotFound):
        rest.attachment_of(r, "M1", "G2")


def test_quota_result():
    r = answer(["Quota/get", {"list": [{"id": "q1", "resourceType": "octets", "scope": "account", "used": 5,
                                        "hardLimit": 10, "name": "mail", "types": ["Mail"]}]}, "q"])
    assert rest.quota_result(r) == {"quotas": [{"id": "q1", "name": "mail", "resourceType": "octets",
                                                "scope": "account", "used": 5, "hardLimit": 10, "warnLimit": None,
                                                "softLimit": None, "types": ["Mail"]}]}


# ---------------------------------------------------------------------------- URLs and headers
@pytest.mark.parametrize("template, values, path", [
    ("/jmap/upload/{accountId}/", {"accountId": "alice@example.com"}, "/jmap/upload/alice%40example.com/"),
    ("https://mail.example.com/jmap/download/{accountId}/{blobId}/{name}?accept={type}",
     {"accountId": "a", "blobId": "G1", "name": "../x y.pdf", "type": "application/pdf"},
     "/jmap/download/a/G1/..%2Fx%20y.pdf?accept=application%2Fpdf"),
    ("https://mail.example.com/jmap/", {}, "/jmap/"),
    ("/jmap/", {}, "/jmap/"),
])
def test_expand_and_url_path(template, values, path):
    assert rest.url_path(rest.expand(template, **values)) == path


@pytest.mark.parametrize("name, header", [
    (None, "attachment"),
    ("report.pdf", "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"),
    ('a"b;c\\d.txt', "attachment; filename=\"a_b_c_d.txt\"; filename*=UTF-8''a%22b%3Bc%5Cd.txt"),
    ("résumé.txt", "attachment; filename=\"r_sum_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt"),
    ("x\r\ny", "attachment; filename=\"x__y\"; filename*=UTF-8''x%0D%0Ay"),
])
def test_content_disposition(name, header):
    assert rest.content_disposition(name) == header


@pytest.mark.parametrize("value, media", [
    ("image/PNG", "image/png"), ("text/html; charset=x", "application/octet-stream"),
    (None, "application/octet-stream"),
    ("text", "application/octet-stream"), ("a/b\r\nX: y", "application/octet-stream"),
])
def test_safe_media_type(value, media):
    assert rest.safe_media_type(value) == media


# ---------------------------------------------------------------------------- the cache
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cache_ttl_lru_and_invalidation():
    clock = Clock()
    c = rest.FacadeCache(2, 10, clock)
    c.put("a", 1, c.begin())
    c.put("b", 2, c.begin())
    assert c.get("a") == 1
    c.put("c", 3, c.begin())      # b was least recently used
    assert (c.get("b"), c.get("c")) == (None, 3)
    clock.now = 10
    assert c.get("a") is None     # expired
    c.put("a", 1, c.begin())
    c.invalidate("a")
    assert c.get("a") is None


def test_cache_fill_started_before_an_invalidation_is_dropped():
    c = rest.FacadeCache(10, 10, Clock())
    begun = c.begin()             # a read goes upstream ...
    c.invalidate("k")             # ... a write lands meanwhile
    assert c.put("k", "stale", begun) is False
    assert c.get("k") is None
    assert c.put("k", "fresh", c.begin()) is True
    assert c.get("k") == "fresh"


# ---------------------------------------------------------------------------- the OpenAPI document
def test_openapi_document_names_every_route():
    doc = document("http://127.0.0.1:8080/")
    assert doc["openapi"] == "3.1.0" and doc["servers"] == [{"url": "http://127.0.0.1:8080"}]
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    routed = set()
    for pattern, methods in rest.ROUTES:
        path = rest.PREFIX + "/" + "/".join(pattern)
        path = path.replace("{}", "{id}", 1).replace("{}", "{blobId}", 1)
        routed |= {(m, path) for m in methods}
    routed.add(("GET", rest.OPENAPI_PATH))
    assert documented == routed


# ---------------------------------------------------------------------------- the addon's own answers
@pytest.fixture
async def facade():
    config = load_config(None, env={}, overrides={"chain": [], "listen": "127.0.0.1:8080",
                                                 "addons.rest_facade": {"max_json_body": "1KiB"}})
    mgr = AddonManager(config, Metrics())
    addon = RestFacade()
    await mgr.add(addon)
    yield mgr
    await mgr.done()


def make_flow(method: str, target: str, *, who: str | None = "alice@example.com", length: int | None = None) -> Flow:
    f = Flow(Request(method, target, CIMultiDict()), id="r1")
    f.request.content_length = length
    if who is not None:
        f.identity = Identity(subject=who, email=who)
    return f


async def run(mgr: AddonManager, flow: Flow) -> None:
    await mgr.run("requestheaders", flow)
    await mgr.run("request", flow)


async def test_openapi_is_served_without_upstream(facade):
    flow = make_flow("GET", "/api/v1/openapi.json", who=None)
    await run(facade, flow)
    assert flow.response.status == 200
    assert flow.response.headers["Content-Type"] == "application/json"
    assert orjson.loads(flow.response.body)["servers"] == [{"url": "http://127.0.0.1:8080"}]


@pytest.mark.parametrize("method, target, who, error", [
    ("GET", "/api/v1/mail/nothing", "alice@example.com", NotFound),
    ("PUT", "/api/v1/mail/mailboxes", "alice@example.com", rest.MethodNotAllowed),
    ("GET", "/api/v1/mail/mailboxes", None, Unauthorized),
    ("GET", "/api/v1/mail/messages/a.b", "alice@example.com", BadRequest),
    ("GET", "/api/v1/mail/mailboxes", "alice@example.com", InternalError),  # no jmap_guard in the chain
])
async def test_refused_before_any_upstream_call(facade, method, target, who, error):
    flow = make_flow(method, target, who=who)
    with pytest.raises(error):
        await run(facade, flow)
    assert flow.response is None


async def test_json_bodies_are_capped(facade):
    flow = make_flow("POST", "/api/v1/mail/messages", length=2048)
    with pytest.raises(PayloadTooLarge):
        await facade.run("requestheaders", flow)
    small = make_flow("PATCH", "/api/v1/mail/messages/M1", length=10)
    await facade.run("requestheaders", small)
    assert small.request.body_cap == 1024
    other = make_flow("POST", "/jmap/", length=10)
    await facade.run("requestheaders", other)
    assert other.request.body_cap is None


# ---------------------------------------------------------------------------- streamed attachments
@pytest.mark.parametrize("header, media", [
    ("", "application/octet-stream"),
    ("Application/PDF", "application/pdf"),
    ("text/plain; charset=utf-8", "text/plain"),
])
def test_upload_type(header, media):
    assert rest.upload_type(header) == media


@pytest.mark.parametrize("header", ["text", "text/plain/x", "a b/c", "text/\u00e9"])
def test_upload_type_refusals(header):
    with pytest.raises(BadRequest):
        rest.upload_type(header)


@pytest.mark.parametrize("name, segment", [
    ("report.pdf", "report.pdf"),
    ("a/b\\c.txt", "a_b_c.txt"),
    ("x\r\ny\x00", "x__y_"),
    ("..", "attachment"),
    (".", "attachment"),
    ("", "attachment"),
    (None, "attachment"),
    ("résumé (1).bin", "résumé (1).bin"),
])
def test_download_name_is_one_plain_segment(name, segment):
    assert rest.download_name(name) == segment
    path = rest.url_path(rest.expand("/jmap/download/{accountId}/{blobId}/{name}", accountId="a", blobId="G1",
                                     name=rest.download_name(name)))
    # what the JMAP guard checks on the rewritten flow: no dot segment, no encoded slash
    assert account_path(path, "/jmap") == ("download", "a")


def test_rewritten_headers_keep_only_forwarding_and_credentials():
    client = CIMultiDict([("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https"),
                          ("Authorization", "Bearer t"), ("Cookie", "s=1"), ("Range", "bytes=0-1"),
                          ("Content-Type", "text/evil"), ("If-None-Match", "*")])
    assert rest.rewritten_headers(client, [("Content-Type", "text/plain")]) == [
        ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https"), ("Authorization", "Bearer t"),
        ("Content-Type", "text/plain")]


@pytest.mark.parametrize("status, body, size, expected", [
    (201, {"accountId": "a", "blobId": "G1", "type": "Image/PNG", "size": 5}, 5,
     {"blobId": "G1", "type": "image/png", "size": 5}),
    (200, {"blobId": "G1"}, 7, {"blobId": "G1", "type": "text/plain", "size": 7}),  # Cyrus-style 200, no type
    (201, {"blobId": "G1", "type": "no type", "size": True}, 3, {"blobId": "G1", "type": "application/octet-stream",
                                                                  "size": 3}),
])
def test_upload_result(status, body, size, expected):
    assert rest.upload_result(status, {}, orjson.dumps(body), "text/plain", size) == expected


@pytest.mark.parametrize("status, headers, body, cls, jmap_type", [
    (201, {}, b"not json", BadGateway, None),
    (201, {}, b'{"size": 1}', BadGateway, None),
    (400, {"Content-Type": "application/problem+json"},
     b'{"type": "urn:ietf:params:jmap:error:limit", "limit": "maxSizeUpload", "title": "Limit", "status": 400}',
     rest.UpstreamProblem, "urn:ietf:params:jmap:error:limit"),
    (401, {}, b"", BadGateway, None),
    (413, {}, b"", PayloadTooLarge, None),
    (503, {"Retry-After": "7"}, b"", rest.Unavailable, None),
])
def test_upload_errors_map_through_the_table(status, headers, body, cls, jmap_type):
    with pytest.raises(cls) as e:
        rest.upload_result(status, headers, body, "text/plain", 1)
    assert type(e.value) is cls
    assert problem_of(e.value).get("jmapType") == jmap_type
    if status == 503:
        assert e.value.headers["Retry-After"] == "7"


@pytest.mark.parametrize("status, cls, jmap_type", [
    (404, NotFound, "blobNotFound"),
    (403, BadGateway, None),
    (429, TooManyRequests, None),
])
def test_download_error(status, cls, jmap_type):
    err = rest.download_error(status, {}, b"")
    assert type(err) is cls and problem_of(err).get("jmapType") == jmap_type


def test_download_headers_replace_the_mail_servers():
    upstream = CIMultiDict([("Content-Type", "text/html"), ("Content-Length", "10"), ("Server", "Stalwart"),
                            ("Content-Disposition", "inline"), ("ETag", '"x"'), ("Set-Cookie", "a=b")])
    assert rest.download_headers("application/pdf", "a.pdf", upstream) == [
        ("Content-Type", "application/pdf"),
        ("Content-Disposition", "attachment; filename=\"a.pdf\"; filename*=UTF-8''a.pdf"),
        ("X-Content-Type-Options", "nosniff"), ("Content-Security-Policy", "default-src 'none'; sandbox"),
        ("Cache-Control", "private, no-store"), ("Content-Length", "10")]


async def test_upload_with_a_length_streams_and_chunked_is_capped(facade):
    sized = make_flow("POST", "/api/v1/mail/attachments", length=10 << 20)
    await facade.run("requestheaders", sized)
    assert sized.request.body_cap is None  # never buffered: the engine streams it upstream
    small = make_flow("POST", "/api/v1/mail/attachments", length=1 << 20)
    await facade.run("requestheaders", small)
    assert small.request.body_cap == RestFacadeOptions().max_upload  # small: buffered, hashed by the signer
    chunked = make_flow("POST", "/api/v1/mail/attachments")
    chunked.request.chunked = True
    await facade.run("requestheaders", chunked)
    assert chunked.request.body_cap == RestFacadeOptions().max_upload


# ---------------------------------------------------------------------------- the rewrite, against the double
@contextlib.asynccontextmanager
async def chain(double: StalwartDouble) -> AsyncIterator[tuple[AddonManager, UpstreamPool, Target]]:
    """jmap_guard, rest_facade and upstream_identity in a real AddonManager, the engine's pool as
    the loader's fetch, the Stalwart double behind it."""
    async with serve(double) as base:
        cfg = Config(stalwart=StalwartOptions(url=base, allow_insecure=True), addons={
            "upstream_identity": {"mode": "impersonate", "impersonator": "proxy", "secret": "proxypw"}})
        metrics = Metrics()
        mgr = AddonManager(cfg, metrics)
        pool = UpstreamPool(ClientTLS.from_files(cert=None, key=None, ca=None), cfg.stalwart, metrics)
        mgr.fetcher = pool.fetch
        await mgr.add(JmapGuard(), RestFacade(), UpstreamIdentity())
        try:
            yield mgr, pool, cfg.default_target()
        finally:
            await mgr.done()
            await pool.close()


def upload_flow(target: Target, body: bytes, ctype: str = "text/plain") -> Flow:
    f = Flow(Request("POST", "/api/v1/mail/attachments",
                     CIMultiDict({"Content-Type": ctype, "Cookie": "s=1", "X-Forwarded-For": "10.0.0.9"})),
             id="r1", upstream=target)
    f.request.content_length = len(body)
    f.identity = Identity(subject="alice", email="alice@example.com")
    return f


async def cycle(mgr: AddonManager, pool: UpstreamPool, flow: Flow, body: bytes) -> None:
    """The engine's request cycle by hand: request hooks, forward what they let through (the body
    as the engine would stream it), response hooks."""
    await mgr.run("requestheaders", flow)
    await mgr.run("request", flow)
    assert flow.response is None and flow.request.body is None
    h = [(k, v) for k, v in flow.request.headers.items()]
    flow.response = await pool.fetch(flow.upstream, flow.request.method, flow.request.target, headers=h, body=body)
    await mgr.run("responseheaders", flow)
    await mgr.run("response", flow)


async def test_upload_is_rewritten_to_the_users_upload_url():
    double = StalwartDouble()
    async with chain(double) as (mgr, pool, target):
        flow = upload_flow(target, b"hello")
        await cycle(mgr, pool, flow, b"hello")
        assert flow.response.status == 201 and flow.response.headers["Content-Type"] == "application/json"
        doc = orjson.loads(flow.response.body)
        assert doc == {"blobId": doc["blobId"], "type": "text/plain", "size": 5}
        assert double.blobs[("a", doc["blobId"])] == ("text/plain", b"hello")
        (sent,) = double.seen("/jmap/upload/")
        assert sent.target == "/jmap/upload/a/" and sent.body == b"hello"
        assert sent.headers["Content-Type"] == "text/plain"
        assert sent.headers["Authorization"] == \
            "Basic " + base64.b64encode(b"alice@example.com%proxy:proxypw").decode()
        assert "Cookie" not in sent.headers and sent.headers["X-Forwarded-For"] == "10.0.0.9"


async def test_upload_over_the_sessions_limit_never_goes_upstream():
    double = StalwartDouble()
    double.limits["maxSizeUpload"] = 4
    async with chain(double) as (mgr, pool, target):
        flow = upload_flow(target, b"hello")
        await mgr.run("requestheaders", flow)
        with pytest.raises(PayloadTooLarge) as e:
            await mgr.run("request", flow)
        assert problem_of(e.value)["limit"] == "maxSizeUpload"
        assert double.seen("/jmap/upload/") == []


async def test_upload_refused_upstream_maps_through_the_table():
    double = StalwartDouble()
    async with chain(double) as (mgr, pool, target):
        await cycle(mgr, pool, upload_flow(target, b"x"), b"x")  # the session (50 MB limit) is cached now
        double.limits["maxSizeUpload"] = 4
        with pytest.raises(rest.UpstreamProblem) as e:
            await cycle(mgr, pool, upload_flow(target, b"hello"), b"hello")
        doc = problem_of(e.value)
        assert doc["status"] == 400 and doc["jmapType"] == "urn:ietf:params:jmap:error:limit"
        assert doc["limit"] == "maxSizeUpload"


class ForeignUploadUrl(StalwartDouble):
    """A server whose session's uploadUrl names another account outright (no {accountId})."""

    def session(self, u):
        doc = super().session(u)
        doc["uploadUrl"] = doc["uploadUrl"].replace("{accountId}", "b")
        return doc


async def test_the_guard_checks_the_rewritten_path():
    double = ForeignUploadUrl()
    async with chain(double) as (mgr, pool, target):
        flow = upload_flow(target, b"hello")
        await mgr.run("requestheaders", flow)
        with pytest.raises(Forbidden):
            await mgr.run("request", flow)
        assert double.seen("/jmap/upload/") == []


# ---------------------------------------------------------------------------- export
@pytest.mark.parametrize("raw, received, want", [
    (b"Subject: a\r\n\r\nbody\r\n", "2026-11-27T03:04:05Z",
     b"From MAILER-DAEMON Fri Nov 27 03:04:05 2026\nSubject: a\n\nbody\n\n"),
    # mboxrd: any number of '>' before "From " gets one more; "From" without the space does not
    (b"S: a\r\n\r\nFrom here\r\n>From there\r\n>>From x\r\nFromage\r\n From y", "2026-01-05T10:00:00+02:00",
     b"From MAILER-DAEMON Mon Jan  5 08:00:00 2026\nS: a\n\n>From here\n>>From there\n>>>From x\nFromage\n From y\n\n"),
    (b"S: a\n\nno final newline", None, b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970\nS: a\n\nno final newline\n\n"),
])
def test_mbox_entries(raw, received, want):
    assert rest.mbox_entry(raw, received) == want


def test_export_request_pages_by_anchor():
    first = rest.export_request("acct", None, None, 200)
    q = first["methodCalls"][0][1]
    assert q["sort"] == [{"property": "receivedAt", "isAscending": True}] and q["limit"] == 200
    assert "anchor" not in q and "filter" not in q
    nxt = rest.export_request("acct", "box1", "M42", 200)["methodCalls"][0][1]
    assert (nxt["anchor"], nxt["anchorOffset"], nxt["filter"]) == ("M42", 1, {"inMailbox": "box1"})
    get = first["methodCalls"][1][1]
    assert get["#ids"] == {"resultOf": "q", "name": "Email/query", "path": "/ids"}


def test_export_page_keeps_the_query_order():
    r = rest.Responses([("Email/query", {"ids": ["b", "a", "gone"]}, "q"),
                        ("Email/get", {"list": [{"id": "a", "blobId": "Ba", "receivedAt": "2026-01-01T00:00:00Z"},
                                                {"id": "b", "blobId": "Bb"}]}, "g")])
    assert rest.export_page(r) == [("b", "Bb", None), ("a", "Ba", "2026-01-01T00:00:00Z")]


@pytest.mark.parametrize("query, want", [("", None), ("mailbox=inbox", "inbox"), ("mailbox=Sent%20Items", "Sent Items")])
def test_export_query(query, want):
    assert rest.parse_export_query(query) == want


@pytest.mark.parametrize("query", ["mailbox=", "folder=x", "mailbox=a&mailbox=b", "mailbox=%01"])
def test_bad_export_query(query):
    with pytest.raises(BadRequest):
        rest.parse_export_query(query)


# ---------------------------------------------------------------------------- erasure
@pytest.mark.parametrize("doc, want", [
    ({"confirm": "alice@example.com"}, None),
    ({"confirm": "ALICE@Example.com", "mailbox": "archive"}, "archive"),
])
def test_erasure_body(doc, want):
    assert rest.parse_erasure(doc, "alice@example.com") == want


@pytest.mark.parametrize("doc", [
    {}, {"confirm": "bob@example.com"}, {"confirm": None}, {"confirm": "alice@example.com", "mailbox": ""},
    {"confirm": "alice@example.com", "everything": True}, {"confirm": "alice@example.com", "mailbox": 7},
])
def test_bad_erasure_body(doc):
    with pytest.raises(BadRequest):
        rest.parse_erasure(doc, "alice@example.com")


def test_erase_request_destroys_what_the_query_found():
    doc = rest.erase_request("acct", "box", 500)
    (q_name, q, _), (s_name, s, _) = doc["methodCalls"]
    assert (q_name, q["filter"], q["limit"]) == ("Email/query", {"inMailbox": "box"}, 500)
    assert (s_name, s["#destroy"]) == ("Email/set", {"resultOf": "q", "name": "Email/query", "path": "/ids"})
    assert "filter" not in rest.erase_request("acct", None, 10)["methodCalls"][0][1]
    r = rest.Responses([("Email/query", {"ids": ["a", "b", "c"]}, "q"),
                        ("Email/set", {"destroyed": ["a", "b"], "notDestroyed": {"c": {"type": "forbidden"}}}, "d")])
    assert rest.erase_round(r) == (3, 2, 1)


# ---------------------------------------------------------------------------- end-to-end encryption
PGP_BLOCK = ("-----BEGIN PGP MESSAGE-----\n\nhQEMA1x2\n=AbCd\n-----END PGP MESSAGE-----\n")


def _smime_envelope() -> tuple[bytes, object, object]:
    """A real CMS EnvelopedData for a fresh recipient certificate (cryptography's S/MIME builder)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs7
    from cryptography.x509.oid import NameOID
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, "bob@example.org")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    der = (pkcs7.PKCS7EnvelopeBuilder().set_data(b"Content-Type: text/plain\r\n\r\nsecret words\r\n")
           .add_recipient(cert).encrypt(serialization.Encoding.DER, []))
    return der, cert, key


def _draft(**kw):
    doc = {"to": [{"email": "bob@example.org", "name": "Bob"}], "subject": "..."}
    doc.update(kw)
    return rest.parse_draft(doc)


def test_pgp_mime_message_structure():
    d = _draft(encrypted={"type": "pgp-mime", "data": PGP_BLOCK}, bcc=[{"email": "hidden@example.org"}])
    raw = rest.encrypted_message(d, {"email": "alice@example.com", "name": "Alice"}, now=0,
                                 message_id="<m1@example.com>")
    assert b"\r\n" in raw and b"hidden@example.org" not in raw  # CRLF; Bcc only in the envelope
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/encrypted"
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    control, body = msg.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted"
    assert control.get_payload().strip() == "Version: 1"
    assert body.get_content_type() == "application/octet-stream" and body.get_filename() == "encrypted.asc"
    assert body.get_payload(decode=True).replace(b"\r\n", b"\n").strip() == PGP_BLOCK.strip().encode()
    assert msg["From"] == "Alice <alice@example.com>" and msg["To"] == "Bob <bob@example.org>"
    assert msg["Message-ID"] == "<m1@example.com>" and msg["Subject"] == "..."


def test_smime_message_decrypts_for_the_recipient():
    from cryptography.hazmat.primitives.serialization import pkcs7
    der, cert, key = _smime_envelope()
    d = _draft(encrypted={"type": "smime", "data": base64.b64encode(der).decode()})
    raw = rest.encrypted_message(d, {"email": "alice@example.com"}, now=0, message_id="<m2@example.com>")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "application/pkcs7-mime"
    assert msg.get_param("smime-type") == "enveloped-data" and msg.get_filename() == "smime.p7m"
    inner = pkcs7.pkcs7_decrypt_der(msg.get_payload(decode=True), cert, key, [])
    assert b"secret words" in inner


@pytest.mark.parametrize("encrypted, extra", [
    ({"type": "pgp", "data": PGP_BLOCK}, {}),
    ({"type": "pgp-mime", "data": "hello"}, {}),
    ({"type": "pgp-mime", "data": PGP_BLOCK + "trailing text"}, {}),
    ({"type": "pgp-mime", "data": PGP_BLOCK}, {"text": "in clear too?"}),
    ({"type": "pgp-mime", "data": PGP_BLOCK, "key": "x"}, {}),
    ({"type": "smime", "data": "not base64!"}, {}),
    ({"type": "smime", "data": base64.b64encode(b"\x30" + b"\x00" * 40).decode()}, {}),  # not EnvelopedData
    ("ciphertext", {}),
])
def test_bad_encrypted_content(encrypted, extra):
    with pytest.raises(BadRequest):
        _draft(encrypted=encrypted, **extra)


@pytest.mark.parametrize("types, want", [
    (["application/pgp-encrypted", "application/octet-stream"], "pgp-mime"),
    (["application/pkcs7-mime"], "smime"), (["application/x-pkcs7-mime"], "smime"),
    (["image/png"], None), ([], None),
])
def test_encryption_of_a_read_message(types, want):
    assert rest.encryption_of([{"type": t} for t in types]) == want


def test_send_encrypted_request_imports_then_submits():
    d = _draft(encrypted={"type": "pgp-mime", "data": PGP_BLOCK})
    doc = rest.send_encrypted_request("acct", {"id": "I1", "email": "alice@example.com"}, d, "B1", "drafts", "sent")
    (imp, args, _), (sub, sargs, _) = doc["methodCalls"]
    assert imp == "Email/import" and args["emails"]["draft"]["blobId"] == "B1"
    assert sub == "EmailSubmission/set" and sargs["create"]["send"]["emailId"] == "#draft"
    assert sargs["create"]["send"]["envelope"]["rcptTo"] == [{"email": "bob@example.org"}]


@pytest.mark.parametrize("query", ["after=", "before=", "after=&before=2026-01-01"])
def test_an_empty_date_is_no_date(query):
    """Found by schemathesis: `after=` was taken as absent while the document says date-time."""
    with pytest.raises(BadRequest):
        rest.parse_list_query(query, 500)
