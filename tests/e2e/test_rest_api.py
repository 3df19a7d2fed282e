"""The REST facade end to end: the full default chain in front of Cyrus (through the nginx mTLS
front), alice and bob signed in with ES256 JWTs from a local JWKS. Every endpoint as both users,
the send path to the SMTP sink, attachments byte for byte, the error table through real failing
calls, the mailbox cache and its invalidation, and the policy in front of the facade.

Messages are put in a user's Inbox over IMAP (outside the proxy, like real delivery) with a unique
marker in the subject, then found through the facade's search; Cyrus indexes with a short lag, so
tests poll. Every message a test makes is destroyed at the end of the module.
"""
from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import imaplib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from addons.policy import DEFAULT_POLICY
from tests.conftest import free_port
from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ALICE, BOB = "alice@example.com", "bob@example.com"
OTHER = {ALICE: BOB, BOB: ALICE}
API = "/api/v1/mail"
IMAP_PORT = int(os.environ.get("IMAP_PORT", "18143"))
NO_DELETE_POLICY = """\
name: e2e-no-delete
rules:
  - id: no-delete-role
    effect: deny
    roles: [no-delete]
    http_methods: [DELETE]
    paths: ["/api/v1/mail/**"]
    reason: this role may not delete mail
"""


@dataclass
class Env:
    base: str
    engine: Any
    key: SigningKey
    stack: Any
    http: aiohttp.ClientSession
    created: list[tuple[str, str]] = field(default_factory=list)  # (user, message id)

    def token(self, user: str, roles: list[str] | None = None) -> str:
        return self.key.token(user, email=user, roles=roles or ["user"])

    async def call(self, user: str | None, method: str, path: str, *, json: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None, roles: list[str] | None = None):
        h = dict(headers or {})
        if user is not None:
            h["Authorization"] = "Bearer " + self.token(user, roles)
        async with self.http.request(method, self.base + path, json=json, data=data, headers=h) as r:
            body = await r.read()
            return r.status, r.headers, body

    async def ok(self, user: str, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        code, headers, body = await self.call(user, method, path, **kw)
        assert code == status, (method, path, code, body[:500])
        return orjson.loads(body) if body and headers.get("Content-Type") == "application/json" else body

    def cache_count(self, cache: str, result: str) -> float:
        v = self.engine.metrics.registry.get_sample_value(
            "sge_proxy_cache_requests_total", {"cache": cache, "result": result})
        return v or 0.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rest")
    extra_policy = tmp / "no-delete.yaml"
    extra_policy.write_text(NO_DELETE_POLICY)
    async with JwksServer() as idp:
        key = SigningKey("rest-key")
        idp.publish(key)
        port = free_port()
        eng = await start_proxy(stack.certs, stack.url, chain=None, listen=f"127.0.0.1:{port}", **{
            "stalwart.health_interval": 3600,
            "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
            "addons.policy": {"files": [str(DEFAULT_POLICY), str(extra_policy)]},
            "addons.upstream_identity": {"mode": "authorize-as", "admin_user": stack.admin[0],
                                         "secret": stack.admin[1]},
            "addons.header_signer": {"key_id": "e2e", "keys": {"e2e": base64.b64encode(os.urandom(32)).decode()}},
            "addons.rest_facade": {"max_upload": "1MiB"},
        })
        http = aiohttp.ClientSession()
        e = Env(f"http://127.0.0.1:{eng.port}", eng, key, stack, http)
        try:
            yield e
        finally:
            for user, mid in e.created:
                await e.call(user, "DELETE", f"{API}/messages/{mid}?permanent=true")
            await http.close()
            await eng.stop(drain_timeout=1)


# ---------------------------------------------------------------------------- helpers
def marker() -> str:
    return f"rest{uuid.uuid4().hex[:16]}"


def _append(stack, user: str, raw: bytes, mailbox: str = "INBOX") -> None:
    imap = imaplib.IMAP4("127.0.0.1", IMAP_PORT)
    try:
        imap.login(user, stack.users[user])
        typ, data = imap.append(mailbox, "", None, raw)
        assert typ == "OK", data
    finally:
        imap.logout()


async def deliver(env: Env, user: str, subject: str, *, sender: str = "Carol <carol@example.net>",
                  text: str = "plain body", html: str | None = None) -> dict:
    """Append an unread message to the user's Inbox over IMAP; returns its summary once the
    facade's search finds it (the index lags)."""
    boundary = uuid.uuid4().hex
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    head = f"From: {sender}\r\nTo: {user}\r\nSubject: {subject}\r\nDate: {date}\r\n" \
           f"Message-ID: <{uuid.uuid4().hex}@example.net>\r\nMIME-Version: 1.0\r\n"
    if html is None:
        raw = head + f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
    else:
        raw = head + (f"Content-Type: multipart/alternative; boundary={boundary}\r\n\r\n"
                      f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
                      f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--{boundary}--\r\n")
    await asyncio.to_thread(_append, env.stack, user, raw.encode())
    found = await find(env, user, subject)
    env.created.append((user, found["id"]))
    return found


async def find(env: Env, user: str, q: str, mailbox: str = "inbox", *, count: int = 1,
               timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = await env.ok(user, "GET", f"{API}/messages?mailbox={mailbox}&q={q}")
        if len(doc["messages"]) >= count or time.monotonic() > deadline:
            assert len(doc["messages"]) == count, (q, mailbox, doc)
            return doc["messages"][0]
        await asyncio.sleep(0.1)


async def mailboxes(env: Env, user: str, *, fresh: bool = False) -> dict[str, dict]:
    headers = {"Cache-Control": "no-cache"} if fresh else None
    doc = await env.ok(user, "GET", f"{API}/mailboxes", headers=headers)
    return {m["role"] or m["name"]: m for m in doc["mailboxes"]}


async def sink_message(env: Env, mark: str, timeout: float = 5.0) -> tuple[dict, email.message.EmailMessage]:
    """The envelope (.json) and message (.eml) the SMTP sink wrote for the message with `mark`."""
    sink: Path = env.stack.smtp_sink
    deadline = time.monotonic() + timeout
    while True:
        for eml in sorted(sink.glob("*.eml"), reverse=True)[:50]:
            raw = eml.read_bytes()
            if mark.encode() in raw:
                meta = eml.with_suffix(".json")
                if meta.exists():
                    msg = email.message_from_bytes(raw, policy=email.policy.default)
                    return orjson.loads(meta.read_bytes()), msg  # type: ignore[return-value]
        assert time.monotonic() < deadline, f"nothing with {mark} reached the SMTP sink"
        await asyncio.sleep(0.05)


def assert_problem(status: int, headers: Any, body: bytes, expected: int, jmap_type: str | None = None) -> dict:
    assert status == expected, body
    assert headers["Content-Type"] == "application/problem+json"
    doc = orjson.loads(body)
    assert doc["status"] == expected and doc["requestId"] == headers["X-Request-ID"]
    if jmap_type is not None:
        assert doc["jmapType"] == jmap_type, doc
    return doc


users = pytest.mark.parametrize("user", [ALICE, BOB])


# ---------------------------------------------------------------------------- reading
@users
async def test_mailboxes(env, user):
    boxes = await mailboxes(env, user, fresh=True)
    assert {"inbox", "drafts", "sent", "trash", "junk", "archive"} <= set(boxes)
    assert boxes["inbox"]["name"] == "Inbox" and boxes["inbox"]["parentId"] is None
    assert all(isinstance(m["totalEmails"], int) and isinstance(m["unreadEmails"], int) for m in boxes.values())
    theirs = await mailboxes(env, OTHER[user])
    assert not {m["id"] for m in boxes.values()} & {m["id"] for m in theirs.values()}


@users
async def test_list_search_and_read(env, user):
    mark = marker()
    found = await deliver(env, user, f"Hello {mark}", text=f"plain {mark}", html=f"<p>html {mark}</p>")
    assert found["subject"] == f"Hello {mark}" and not found["seen"] and not found["flagged"]
    assert found["from"] == [{"name": "Carol", "email": "carol@example.net"}]
    mid = found["id"]

    msg = await env.ok(user, "GET", f"{API}/messages/{mid}")
    assert msg["text"].strip() == f"plain {mark}"
    assert msg["html"].strip() == f"<p>html {mark}</p>"
    assert {"name": "Subject", "value": f"Hello {mark}"} in msg["headers"]
    assert msg["to"] == [{"name": None, "email": user}] and msg["attachments"] == []

    # filters: each one narrows the search the expected way
    for query, hit in [("unread=true", True), ("unread=false", False), ("from=carol@example.net", True),
                       ("from=nobody.else", False), ("after=2000-01-01", True), ("before=2000-01-01T00:00:00Z", False),
                       ("sort=subject,-size", True), ("mailbox=INBOX", True), ("mailbox=Trash", False)]:
        doc = await env.ok(user, "GET", f"{API}/messages?q={mark}&{query}")
        assert [m["id"] for m in doc["messages"]] == ([mid] if hit else []), query

    # pagination with a total
    inbox = await env.ok(user, "GET", f"{API}/messages?mailbox=inbox&limit=1")
    assert inbox["limit"] == 1 and len(inbox["messages"]) == 1 and inbox["total"] >= 1
    assert inbox["mailbox"]["role"] == "inbox"
    end = await env.ok(user, "GET", f"{API}/messages?mailbox=inbox&limit=1&position={inbox['total']}")
    assert end["messages"] == [] and end["position"] == inbox["total"]

    # the other user cannot read it
    assert_problem(*(await env.call(OTHER[user], "GET", f"{API}/messages/{mid}")), 404, "notFound")
    assert (await env.call(OTHER[user], "GET", f"{API}/messages?q={mark}"))[0] == 200
    assert (await env.ok(OTHER[user], "GET", f"{API}/messages?q={mark}"))["messages"] == []


# ---------------------------------------------------------------------------- changing
@users
async def test_flags_and_moves_show_on_the_next_read(env, user):
    mid = (await deliver(env, user, f"Flags {marker()}"))["id"]
    changed = await env.ok(user, "PATCH", f"{API}/messages/{mid}", json={"seen": True, "flagged": True})
    assert changed["seen"] and changed["flagged"]
    again = await env.ok(user, "GET", f"{API}/messages/{mid}")
    assert again["seen"] and again["flagged"] and "$flagged" in again["keywords"]

    boxes = await mailboxes(env, user)
    moved = await env.ok(user, "PATCH", f"{API}/messages/{mid}", json={"mailbox": "Archive", "seen": False})
    assert moved["mailboxIds"] == [boxes["archive"]["id"]] and not moved["seen"]
    now = await env.ok(user, "GET", f"{API}/messages/{mid}")
    assert now["mailboxIds"] == [boxes["archive"]["id"]] and now["flagged"] and not now["seen"]
    by_id = await env.ok(user, "GET", f"{API}/messages?mailbox={boxes['archive']['id']}&limit=500")
    assert mid in [m["id"] for m in by_id["messages"]]


@users
async def test_delete_moves_to_trash_then_destroys(env, user):
    mid = (await deliver(env, user, f"Delete {marker()}"))["id"]
    boxes = await mailboxes(env, user)
    code, _, body = await env.call(user, "DELETE", f"{API}/messages/{mid}")
    assert code == 204 and body == b""
    assert (await env.ok(user, "GET", f"{API}/messages/{mid}"))["mailboxIds"] == [boxes["trash"]["id"]]
    assert await env.ok(user, "DELETE", f"{API}/messages/{mid}?permanent=true", 204) == b""
    assert_problem(*(await env.call(user, "GET", f"{API}/messages/{mid}")), 404, "notFound")
    assert_problem(*(await env.call(user, "DELETE", f"{API}/messages/{mid}")), 404, "notFound")


async def test_policy_governs_facade_routes(env):
    mid = (await deliver(env, ALICE, f"Policy {marker()}"))["id"]
    doc = assert_problem(*(await env.call(ALICE, "DELETE", f"{API}/messages/{mid}", roles=["user", "no-delete"])), 403)
    assert doc["policyRule"] == "no-delete-role"
    assert (await env.ok(ALICE, "GET", f"{API}/messages/{mid}", roles=["user", "no-delete"]))["id"] == mid


# ---------------------------------------------------------------------------- sending and attachments
@users
async def test_send_reaches_the_sink_and_lands_in_sent(env, user):
    to = OTHER[user]
    mark = marker()
    payload = os.urandom(4096) + mark.encode()
    up = await env.ok(user, "POST", f"{API}/attachments", 201, data=payload,
                      headers={"Content-Type": "application/x-sge-test"})
    assert up["size"] == len(payload) and up["type"] == "application/x-sge-test"
    sent = await env.ok(user, "POST", f"{API}/messages", 201, json={
        "to": [{"name": "Friend", "email": to}], "bcc": ["hidden@example.net"], "subject": f"Send {mark}",
        "text": f"text {mark}", "html": f"<p>{mark}</p>",
        "attachments": [{"blobId": up["blobId"], "type": "application/x-sge-test", "name": "data.bin"}]})
    env.created.append((user, sent["id"]))
    assert sent["sent"] is True and sent["mailbox"] == "sent" and sent["submissionId"]

    envelope, msg = await sink_message(env, f"Send {mark}")
    assert envelope["mail_from"] == user
    assert sorted(envelope["rcpt_tos"]) == sorted([to, "hidden@example.net"])
    assert "Bcc" not in msg and msg["Subject"] == f"Send {mark}" and to in msg["To"]
    parts = [p for p in msg.iter_attachments()]
    assert [p.get_filename() for p in parts] == ["data.bin"]
    assert parts[0].get_content() == payload

    boxes = await mailboxes(env, user)
    stored = await env.ok(user, "GET", f"{API}/messages/{sent['id']}")
    assert stored["mailboxIds"] == [boxes["sent"]["id"]]
    assert not stored["draft"] and stored["subject"] == f"Send {mark}"


@users
async def test_draft_only(env, user):
    mark = marker()
    saved = await env.ok(user, "POST", f"{API}/messages", 201, json={"to": [OTHER[user]], "subject": f"Draft {mark}",
                                                                     "text": "later", "send": False})
    env.created.append((user, saved["id"]))
    assert saved == {"id": saved["id"], "sent": False, "submissionId": None, "mailbox": "drafts"}
    boxes = await mailboxes(env, user)
    stored = await env.ok(user, "GET", f"{API}/messages/{saved['id']}")
    assert stored["mailboxIds"] == [boxes["drafts"]["id"]] and stored["draft"]


@users
async def test_attachments_round_trip_byte_for_byte(env, user):
    payload = bytes(range(256)) * 1200 + os.urandom(1000)  # every byte value, ~300 KB
    name = "résumé (1).bin"
    up = await env.ok(user, "POST", f"{API}/attachments", 201, data=payload,
                      headers={"Content-Type": "application/octet-stream"})
    draft = await env.ok(user, "POST", f"{API}/messages", 201, json={
        "to": [OTHER[user]], "subject": f"Attach {marker()}", "send": False,
        "attachments": [{"blobId": up["blobId"], "type": "application/x-sge-test", "name": name}]})
    env.created.append((user, draft["id"]))
    msg = await env.ok(user, "GET", f"{API}/messages/{draft['id']}")
    assert msg["hasAttachment"]
    (att,) = msg["attachments"]
    assert att["name"] == name and att["type"] == "application/x-sge-test"

    code, headers, body = await env.call(user, "GET", att["url"])
    assert code == 200 and body == payload
    assert headers["Content-Type"] == "application/x-sge-test"
    assert headers["Content-Disposition"] == \
        "attachment; filename=\"r_sum_ (1).bin\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%281%29.bin"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "private, no-store"
    assert headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert not {"Server", "ETag", "Last-Modified", "Set-Cookie"} & set(headers)  # Cyrus's own are gone

    # another message's attachment, or another user, gets nothing
    assert_problem(*(await env.call(user, "GET", f"{API}/messages/{draft['id']}/attachments/Gdeadbeef")),
                   404, "blobNotFound")
    assert_problem(*(await env.call(OTHER[user], "GET", att["url"])), 404, "notFound")


async def test_upload_over_the_cap_is_refused_before_reading(env):
    host, port = env.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"POST {API}/attachments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.token(ALICE)}\r\n"
                  f"Content-Type: application/octet-stream\r\nContent-Length: {2 << 20}\r\n\r\n").encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.split()[1] == b"413"


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method, path, kw, status, jmap_type", [
    ("GET", f"{API}/messages/Mnosuchmessage0000", {}, 404, "notFound"),
    ("PATCH", f"{API}/messages/Mnosuchmessage0000", {"json": {"seen": True}}, 404, "notFound"),
    ("DELETE", f"{API}/messages/Mnosuchmessage0000?permanent=true", {}, 404, "notFound"),
    ("GET", f"{API}/messages?sort=bogus", {}, 400, None),
    ("GET", f"{API}/messages?limit=4097", {}, 400, None),          # Cyrus's maxObjectsInGet is 4096
    ("GET", f"{API}/messages?mailbox=No%20Such%20Box", {}, 400, None),
    ("GET", f"{API}/messages?after=last-week", {}, 400, None),
    ("GET", f"{API}/messages/bad.id", {}, 400, None),
    ("PATCH", f"{API}/messages/M1", {"json": {}}, 400, None),
    ("PATCH", f"{API}/messages/M1", {"data": b"seen", "headers": {"Content-Type": "text/plain"}}, 415, None),
    ("POST", f"{API}/messages", {"json": {"to": ["bob@example.com"], "from": "bob@example.com"}}, 403,
     "forbiddenFrom"),
    ("POST", f"{API}/messages", {"json": {"to": ["bob@example.com"], "send": False,
                                          "attachments": [{"blobId": "Gnosuchblob0000"}]}}, 400, "blobNotFound"),
    ("POST", f"{API}/messages", {"json": {"to": "nobody"}}, 400, None),
    ("POST", f"{API}/attachments", {"data": b""}, 400, None),
    ("GET", f"{API}/quota", {}, 501, "unknownCapability"),       # Cyrus offers no JMAP quota
    ("DELETE", f"{API}/mailboxes", {}, 405, None),
    ("GET", f"{API}/nothing", {}, 404, None),
])
async def test_error_mapping(env, method, path, kw, status, jmap_type):
    code, headers, body = await env.call(ALICE, method, path, **kw)
    doc = assert_problem(code, headers, body, status, jmap_type)
    if status == 405:
        assert headers["Allow"] == "GET"
    assert doc["detail"]


async def test_unauthenticated_gets_401(env):
    assert_problem(*(await env.call(None, "GET", f"{API}/mailboxes")), 401)


# ---------------------------------------------------------------------------- caching
async def test_cached_mailboxes_are_invalidated_by_writes(env):
    before = await mailboxes(env, ALICE, fresh=True)
    inbox, archive = before["inbox"]["totalEmails"], before["archive"]["totalEmails"]

    mid = (await deliver(env, ALICE, f"Cache {marker()}"))["id"]  # delivered outside the proxy
    hits = env.cache_count("mailbox", "hit")
    cached = await mailboxes(env, ALICE)
    assert cached["inbox"]["totalEmails"] == inbox                  # served from the cache
    assert env.cache_count("mailbox", "hit") == hits + 1
    assert (await mailboxes(env, ALICE, fresh=True))["inbox"]["totalEmails"] == inbox + 1  # no-cache bypasses

    await env.ok(ALICE, "PATCH", f"{API}/messages/{mid}", json={"mailbox": "archive"})  # a facade write
    misses = env.cache_count("mailbox", "miss")
    after = await mailboxes(env, ALICE)
    assert env.cache_count("mailbox", "miss") == misses + 1
    assert (after["inbox"]["totalEmails"], after["archive"]["totalEmails"]) == (inbox, archive + 1)

    # a raw JMAP write through the proxy invalidates too
    code, _, body = await env.call(ALICE, "POST", "/jmap/", json={
        "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
        "methodCalls": [["Email/set", {"accountId": ALICE, "update": {
            mid: {"mailboxIds": {before["inbox"]["id"]: True}}}}, "0"]]})
    assert code == 200 and mid in orjson.loads(body)["methodResponses"][0][1]["updated"]
    final = await mailboxes(env, ALICE)
    assert (final["inbox"]["totalEmails"], final["archive"]["totalEmails"]) == (inbox + 1, archive)


async def test_openapi_document_is_served(env):
    doc = await env.ok(ALICE, "GET", "/api/v1/openapi.json")
    assert doc["openapi"] == "3.1.0" and doc["servers"] == [{"url": env.base}]
    assert f"{API}/messages/{{id}}" in doc["paths"]


# ---------------------------------------------------------------------------- export (data portability)
def mbox_entries(data: bytes) -> list[bytes]:
    """The messages of an mboxrd file, unquoted (what a mail client importing it would read)."""
    entries: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From MAILER-DAEMON "):
            entries.append(b"")
            continue
        assert entries, "the file starts with a From_ line"
        if line.startswith(b">") and line.lstrip(b">").startswith(b"From "):
            line = line[1:]
        entries[-1] += line
    return [e[:-1] if e.endswith(b"\n\n") else e for e in entries]


async def jmap_total(env: Env, user: str, flt: dict | None = None) -> int:
    doc = await env.ok(user, "POST", "/jmap/", json={
        "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
        "methodCalls": [["Email/query", {"accountId": user, "calculateTotal": True, "limit": 1,
                                         **({"filter": flt} if flt else {})}, "0"]]})
    doc = orjson.loads(doc) if isinstance(doc, bytes) else doc
    return doc["methodResponses"][0][1]["total"]


async def test_export_is_every_own_message_as_mboxrd(env):
    mine, theirs = marker(), marker()
    await deliver(env, ALICE, mine, text="From the start, a line mbox must quote.\r\n>From quoted too")
    await deliver(env, BOB, theirs)
    code, headers, body = await env.call(ALICE, "GET", f"{API}/export")
    assert code == 200, body[:300]
    assert headers["Content-Type"] == "application/mbox"
    assert headers["Transfer-Encoding"] == "chunked"
    assert headers["Content-Disposition"].startswith('attachment; filename="mail-export-')
    entries = mbox_entries(body)
    assert len(entries) == await jmap_total(env, ALICE)
    ours = [e for e in entries if mine.encode() in e]
    assert len(ours) == 1
    # the body comes back as it was, once unquoted; in the file it was quoted
    assert b"\nFrom the start, a line mbox must quote.\n>From quoted too" in ours[0]
    assert b"\n>From the start" in body and b"\n>>From quoted too" in body
    assert b"\r\n" not in ours[0]
    assert not [e for e in entries if theirs.encode() in e]  # bob's mail is not in alice's export


async def test_export_of_one_mailbox(env):
    await deliver(env, ALICE, marker())
    boxes = await mailboxes(env, ALICE, fresh=True)
    code, _, body = await env.call(ALICE, "GET", f"{API}/export?mailbox=inbox")
    assert code == 200
    assert len(mbox_entries(body)) == await jmap_total(env, ALICE, {"inMailbox": boxes["inbox"]["id"]})
    code, headers, body = await env.call(ALICE, "GET", f"{API}/export?mailbox=no-such-box")
    assert_problem(code, headers, body, 400)
    code, headers, body = await env.call(ALICE, "GET", f"{API}/export?folder=inbox")
    assert_problem(code, headers, body, 400)


# ---------------------------------------------------------------------------- erasure
async def test_erasure_of_a_mailbox_needs_the_role_and_the_confirmation(env):
    mark = marker()
    for i in range(3):
        raw = (f"From: carol@example.net\r\nTo: {ALICE}\r\nSubject: {mark} {i}\r\n"
               f"Message-ID: <{uuid.uuid4().hex}@e2e>\r\n\r\nto be erased\r\n").encode()
        await asyncio.to_thread(_append, env.stack, ALICE, raw, "Archive")
    await find(env, ALICE, mark, "archive", count=3)
    body = {"confirm": ALICE, "mailbox": "archive"}
    # an ordinary user may not (the shipped policy), whatever the body says
    code, headers, raw = await env.call(ALICE, "POST", f"{API}/erasure", json=body)
    assert_problem(code, headers, raw, 403)
    # the role without the confirmation: nothing happens
    code, headers, raw = await env.call(ALICE, "POST", f"{API}/erasure", json={"confirm": BOB, "mailbox": "archive"},
                                        roles=["user", "mail-erasure"])
    assert_problem(code, headers, raw, 400)
    assert len((await env.ok(ALICE, "GET", f"{API}/messages?mailbox=archive&q={mark}"))["messages"]) == 3
    inbox_before = await jmap_total(env, ALICE, {"inMailbox": (await mailboxes(env, ALICE, fresh=True))["inbox"]["id"]})
    doc = await env.ok(ALICE, "POST", f"{API}/erasure", json=body, roles=["user", "mail-erasure"])
    assert doc["destroyed"] >= 3 and doc["notDestroyed"] == 0 and doc["mailbox"]["role"] == "archive"
    boxes = await mailboxes(env, ALICE, fresh=True)
    assert await jmap_total(env, ALICE, {"inMailbox": boxes["archive"]["id"]}) == 0
    code, _, data = await env.call(ALICE, "GET", f"{API}/export?mailbox=archive")
    assert code == 200 and data == b""
    assert await jmap_total(env, ALICE, {"inMailbox": boxes["inbox"]["id"]}) == inbox_before  # only that mailbox


# ---------------------------------------------------------------------------- end-to-end encryption
PGP_BLOCK = ("-----BEGIN PGP MESSAGE-----\n\nhQEMA1x2YWxpY2UgdG8gYm9i\n=AbCd\n-----END PGP MESSAGE-----\n")


async def test_pgp_mime_goes_out_as_ciphertext_and_reads_back_as_such(env):
    mark = marker()
    sent = await env.ok(ALICE, "POST", f"{API}/messages", 201, json={
        "to": [BOB], "subject": f"Encrypted {mark}", "encrypted": {"type": "pgp-mime", "data": PGP_BLOCK}})
    env.created.append((ALICE, sent["id"]))
    assert sent["sent"] is True and sent["mailbox"] == "sent"
    envelope, msg = await sink_message(env, f"Encrypted {mark}")
    assert envelope["mail_from"] == ALICE and envelope["rcpt_tos"] == [BOB]
    assert msg.get_content_type() == "multipart/encrypted" and msg.get_param("protocol") == "application/pgp-encrypted"
    control, body = msg.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted"
    assert body.get_payload(decode=True).replace(b"\r\n", b"\n").strip() == PGP_BLOCK.strip().encode()
    # the sender's copy in Sent says it is encrypted, and hands the ciphertext back unchanged
    stored = await env.ok(ALICE, "GET", f"{API}/messages/{sent['id']}")
    assert stored["encryption"] == "pgp-mime" and stored["text"] in (None, "")
    att = next(a for a in stored["attachments"] if a["name"] == "encrypted.asc")
    code, _, data = await env.call(ALICE, "GET", f"{API}/messages/{sent['id']}/attachments/{att['blobId']}")
    assert code == 200 and data.replace(b"\r\n", b"\n").strip() == PGP_BLOCK.strip().encode()


async def test_smime_reaches_the_recipient_who_alone_can_read_it(env):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs7
    from cryptography.x509.oid import NameOID
    rkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # CMS key transport: RSA
    name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, BOB)])
    now = datetime.datetime.now(datetime.timezone.utc)
    rcert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(rkey.public_key())
             .serial_number(8).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
             .sign(rkey, hashes.SHA256()))
    mark, secret = marker(), marker()
    der = (pkcs7.PKCS7EnvelopeBuilder().set_data(f"Content-Type: text/plain\r\n\r\nfor bob only {secret}\r\n".encode())
           .add_recipient(rcert).encrypt(serialization.Encoding.DER, []))
    sent = await env.ok(ALICE, "POST", f"{API}/messages", 201, json={
        "to": [BOB], "subject": f"S/MIME {mark}", "encrypted": {"type": "smime", "data": base64.b64encode(der).decode()}})
    env.created.append((ALICE, sent["id"]))
    _, msg = await sink_message(env, f"S/MIME {mark}")
    assert msg.get_content_type() == "application/pkcs7-mime" and msg.get_param("smime-type") == "enveloped-data"
    assert secret.encode() not in msg.as_bytes()  # nothing of the content in clear on the way
    inner = pkcs7.pkcs7_decrypt_der(msg.get_payload(decode=True), rcert, rkey, [])
    assert f"for bob only {secret}".encode() in inner
    stored = await env.ok(ALICE, "GET", f"{API}/messages/{sent['id']}")
    assert stored["encryption"] == "smime"
