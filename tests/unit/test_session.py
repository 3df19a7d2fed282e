"""proxy.session: parsing, own accounts, limits and URL rewriting, Stalwart- and Cyrus-shaped."""
from __future__ import annotations

import orjson
import pytest

from proxy.errors import UpstreamProtocolError
from proxy.session import MAIL, WEBSOCKET, Limits, Session, own_accounts, rewrite, rewrite_url
from tests.stalwart_double import StalwartDouble

CORE = "urn:ietf:params:jmap:core"


def stalwart_doc(shares: dict | None = None, user: str = "alice") -> dict:
    d = StalwartDouble(public_base="https://mail.example.test", shares=shares or {})
    return d.session(d.user(user))


def cyrus_doc() -> dict:
    """Cyrus 3.6's session as recorded in the upstream notes (relative URLs, accountId = login)."""
    acct = "alice@example.com"
    return {
        "capabilities": {
            CORE: {"maxSizeUpload": 1073741824, "maxConcurrentUpload": 5, "maxSizeRequest": 10485760,
                   "maxConcurrentRequests": 5, "maxCallsInRequest": 50, "maxObjectsInGet": 4096,
                   "maxObjectsInSet": 4096, "collationAlgorithms": []},
            MAIL: {}, "urn:ietf:params:jmap:submission": {},
        },
        "accounts": {acct: {"name": acct, "isPersonal": True, "isReadOnly": False,
                            "accountCapabilities": {MAIL: {}}}},
        "primaryAccounts": {MAIL: acct, "urn:ietf:params:jmap:submission": acct},
        "username": acct,
        "apiUrl": "/jmap/",
        "uploadUrl": "/jmap/upload/{accountId}/",
        "downloadUrl": "/jmap/download/{accountId}/{blobId}/{name}?accept={type}",
        "eventSourceUrl": "/jmap/eventsource/?types={types}&closeafter={closeafter}&ping={ping}",
        "state": "0",
    }


# ---------------------------------------------------------------------------- parse
def test_parse_stalwart_session() -> None:
    s = Session.parse(orjson.dumps(stalwart_doc()))
    assert s.username == "alice"
    assert set(s.accounts) == {"a"}
    assert s.mail_account == "a"
    assert s.api_url == "https://mail.example.test/jmap/"
    assert s.upload_url == "https://mail.example.test/jmap/upload/{accountId}/"
    assert s.websocket_url == "wss://mail.example.test/jmap/ws"
    assert s.limits == Limits()  # the double states Stalwart's defaults


def test_parse_cyrus_session() -> None:
    s = Session.parse(orjson.dumps(cyrus_doc()))
    assert s.mail_account == "alice@example.com"
    assert s.websocket_url is None
    assert s.download_url.startswith("/jmap/download/")
    assert s.limits == Limits(1073741824, 5, 10485760, 5, 50, 4096, 4096)


@pytest.mark.parametrize("core, expected", [
    (None, Limits()),
    ({}, Limits()),
    ({"maxCallsInRequest": 3}, Limits(max_calls_in_request=3)),
    ({"maxSizeRequest": "big", "maxCallsInRequest": True}, Limits()),  # wrong types keep defaults
    ({"maxSizeUpload": 0, "maxObjectsInSet": -1}, Limits()),
    ({"maxObjectsInGet": 7, "maxConcurrentUpload": 2}, Limits(max_objects_in_get=7, max_concurrent_upload=2)),
])
def test_limits_from_core_capability(core, expected) -> None:
    assert Limits.from_capability(core) == expected


@pytest.mark.parametrize("body", [
    b"not json",
    b"[]",
    b'{"accounts": {}, "apiUrl": "/jmap/"}',                         # no capabilities
    b'{"capabilities": {}, "apiUrl": "/jmap/"}',                     # no accounts
    b'{"capabilities": {}, "accounts": {}}',                         # no apiUrl
    b'{"capabilities": {}, "accounts": {"a": 1}, "apiUrl": "/j"}',   # account not an object
    b'{"capabilities": {}, "accounts": {}, "apiUrl": "/j", "primaryAccounts": {"m": 1}}',
])
def test_parse_refuses_what_is_not_a_session(body) -> None:
    with pytest.raises(UpstreamProtocolError) as e:
        Session.parse(body)
    assert e.value.status == 502


# ---------------------------------------------------------------------------- own accounts
def _session(accounts: dict, primary: dict) -> Session:
    return Session.from_doc({"capabilities": {}, "accounts": accounts, "primaryAccounts": primary,
                             "apiUrl": "/jmap/"})


ACC = {
    "a": {"name": "Alice Liddell", "isPersonal": True},   # alice's own (Stalwart: name = description)
    "b": {"name": "bob", "isPersonal": True},             # bob's, shared with alice (Stalwart: personal!)
    "c": {"name": "sales", "isPersonal": False},          # a group alice is in
    "x": {"name": "ALICE", "isPersonal": True},           # personal and named like the login
    "y": {"name": "alice", "isPersonal": False},          # named like the login but not personal
}


@pytest.mark.parametrize("primary, login, shared, expected", [
    ({MAIL: "a"}, "alice", False, {"a", "x"}),
    ({MAIL: "a"}, "Alice", False, {"a", "x"}),                    # the name compare ignores case
    ({MAIL: "a"}, "bob", False, {"a", "b"}),
    ({MAIL: "a", "urn:x": "c"}, "carol", False, {"a", "c"}),      # every primary account counts
    ({MAIL: "zz"}, "carol", False, set()),                        # a primary id not listed is not trusted
    ({}, "nobody", False, set()),
    ({MAIL: "a"}, "carol", True, {"a", "b", "c", "x", "y"}),      # allow_shared: all listed accounts
])
def test_own_accounts(primary, login, shared, expected) -> None:
    assert own_accounts(_session(ACC, primary), login, allow_shared=shared) == frozenset(expected)


def test_own_accounts_excludes_stalwart_shared_account() -> None:
    s = Session.from_doc(stalwart_doc(shares={"alice": ["b", "c"]}))
    assert set(s.accounts) == {"a", "b", "c"}
    assert s.accounts["b"].is_personal  # Stalwart lists another user's account as personal
    assert own_accounts(s, "alice@example.com") == {"a"}
    assert own_accounts(s, "alice@example.com", allow_shared=True) == {"a", "b", "c"}


def test_own_accounts_cyrus() -> None:
    assert own_accounts(Session.from_doc(cyrus_doc()), "alice@example.com") == {"alice@example.com"}


# ---------------------------------------------------------------------------- rewrite
@pytest.mark.parametrize("url, base, ws, expected", [
    ("https://mail.example.test/jmap/", "https://proxy.example", False, "https://proxy.example/jmap/"),
    ("https://mail.example.test:8443/jmap/upload/{accountId}/", "https://proxy.example",
     False, "https://proxy.example/jmap/upload/{accountId}/"),
    ("https://mail.example.test/jmap/download/{accountId}/{blobId}/{name}?accept={type}",
     "https://proxy.example:9443/", False,
     "https://proxy.example:9443/jmap/download/{accountId}/{blobId}/{name}?accept={type}"),
    ("https://mail.example.test/jmap/eventsource/?types={types}&closeafter={closeafter}&ping={ping}",
     "https://p", False, "https://p/jmap/eventsource/?types={types}&closeafter={closeafter}&ping={ping}"),
    ("https://mail.example.test", "https://p", False, "https://p/"),
    ("https://mail.example.test?x=1", "https://p", False, "https://p/?x=1"),
    ("https://mail.example.test/jmap/#frag", "https://p", False, "https://p/jmap/"),
    ("/jmap/", "https://proxy.example", False, "https://proxy.example/jmap/"),
    ("/jmap/upload/{accountId}/", "http://127.0.0.1:8080", False, "http://127.0.0.1:8080/jmap/upload/{accountId}/"),
    ("jmap/", "https://p", False, "https://p/jmap/"),
    ("wss://mail.example.test/jmap/ws", "https://proxy.example", True, "wss://proxy.example/jmap/ws"),
    ("ws://mail.example.test/jmap/ws", "http://proxy.example", True, "ws://proxy.example/jmap/ws"),
    ("https://mail.example.test/prefix/jmap/", "https://p/edge", False, "https://p/edge/prefix/jmap/"),
])
def test_rewrite_url(url, base, ws, expected) -> None:
    assert rewrite_url(url, base, websocket=ws) == expected


def test_rewrite_stalwart_session() -> None:
    doc = stalwart_doc(shares={"alice": ["b"]})
    before = orjson.dumps(doc)
    out = rewrite(doc, "https://proxy.example", {"a"})
    assert orjson.dumps(doc) == before  # the input is not changed
    assert out["apiUrl"] == "https://proxy.example/jmap/"
    assert out["uploadUrl"] == "https://proxy.example/jmap/upload/{accountId}/"
    assert out["downloadUrl"] == "https://proxy.example/jmap/download/{accountId}/{blobId}/{name}?accept={type}"
    assert out["eventSourceUrl"] == (
        "https://proxy.example/jmap/eventsource/?types={types}&closeafter={closeafter}&ping={ping}")
    assert out["capabilities"][WEBSOCKET]["url"] == "wss://proxy.example/jmap/ws"
    assert set(out["accounts"]) == {"a"}
    assert set(out["primaryAccounts"].values()) == {"a"}
    assert b"mail.example.test" not in orjson.dumps(out)


def test_rewrite_cyrus_session_makes_urls_absolute() -> None:
    out = rewrite(cyrus_doc(), "https://proxy.example", {"alice@example.com"})
    assert out["apiUrl"] == "https://proxy.example/jmap/"
    assert out["uploadUrl"] == "https://proxy.example/jmap/upload/{accountId}/"
    assert out["downloadUrl"] == "https://proxy.example/jmap/download/{accountId}/{blobId}/{name}?accept={type}"
    assert set(out["accounts"]) == {"alice@example.com"}
    assert out["primaryAccounts"][MAIL] == "alice@example.com"


def test_rewrite_drops_primary_entries_of_dropped_accounts() -> None:
    doc = {"capabilities": {}, "apiUrl": "/jmap/", "accounts": {"a": {}, "c": {}},
           "primaryAccounts": {MAIL: "a", "urn:x": "c"}}
    out = rewrite(doc, "https://p", {"a"})
    assert out["accounts"] == {"a": {}}
    assert out["primaryAccounts"] == {MAIL: "a"}
