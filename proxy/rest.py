"""The REST facade (/api/v1/mail/...) as pure logic: routing, input validation, the JMAP requests
each endpoint sends, the one table that maps JMAP errors to HTTP, and the shapes of the answers.
Sans-IO: addons/rest_facade.py moves the bytes.

Every JMAP request built here names the user's own mail account (the caller passes
primaryAccounts["urn:ietf:params:jmap:mail"]) and is complete: no `#accountId` references.
"""
from __future__ import annotations

import base64
import binascii
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate
from typing import Any, Callable, Hashable, Mapping
from urllib.parse import parse_qsl, quote, urlsplit

import orjson

from .cache import TTLCache
from .errors import (BadGateway, BadRequest, Forbidden, InternalError, NotFound, PayloadTooLarge,
                     ProxyError, TooManyRequests)
from .session import CORE, MAIL

__all__ = [
    "PREFIX", "OPENAPI_PATH", "SUBMISSION", "QUOTA", "ROUTES", "Route", "route", "is_facade_path",
    "Conflict", "MethodNotAllowed", "UnsupportedMediaType", "NotImplementedHere", "Unavailable",
    "UpstreamProblem", "ERRORS", "jmap_error", "upstream_error", "Responses", "api_responses",
    "Mailbox", "parse_mailboxes", "resolve_mailbox", "mailboxes_request", "identities_request",
    "ListQuery", "parse_list_query", "messages_request", "list_result", "message_request",
    "message_result", "Patch", "parse_patch", "update_request", "update_result", "delete_request",
    "delete_result", "Address", "Attachment", "Draft", "parse_draft", "choose_identity",
    "send_request", "send_result", "quota_request", "quota_result", "parse_json_object",
    "check_id", "parse_bool", "parse_delete_query", "attachments_request", "expand", "url_path",
    "content_disposition", "safe_media_type", "UPLOAD_PATH", "STREAMED", "FORWARDED_HEADERS",
    "KEPT_DOWNLOAD_HEADERS", "upload_type", "download_name", "rewritten_headers", "upload_result",
    "download_error", "download_headers",
    "attachment_of", "summary", "FacadeCache", "SORTABLE", "SUMMARY_PROPERTIES", "WRITE_METHODS",
]

PREFIX = "/api/v1/mail"
OPENAPI_PATH = "/api/v1/openapi.json"
SUBMISSION = "urn:ietf:params:jmap:submission"
QUOTA = "urn:ietf:params:jmap:quota"

_ID = re.compile(r"[A-Za-z0-9_-]{1,255}\Z")  # RFC 8620 §1.2
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EMAIL = re.compile(r"[^@\s<>\",;:()\\\[\]]{1,64}@[^@\s<>\",;:()\\\[\]]{1,253}\Z")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z")
SORTABLE = ("receivedAt", "sentAt", "size", "from", "to", "subject")  # RFC 8621 §4.4.2
MAX_SORT_KEYS = 3
DEFAULT_LIMIT = 50
MAX_POSITION = 2**31 - 1
MAX_TEXT = 1024
MAX_RECIPIENTS = 100
MAX_ATTACHMENTS = 100
# JMAP methods that change mailbox counts or quota usage: a raw JMAP request through the proxy
# that calls one invalidates the facade's cached mailboxes and quotas for that user
WRITE_METHODS = frozenset({"Mailbox/set", "Email/set", "Email/import", "Email/copy",
                           "EmailSubmission/set", "Blob/upload", "Blob/copy"})


# ---------------------------------------------------------------------------- errors
class Conflict(ProxyError):
    status, code, title = 409, "conflict", "Conflict"


class MethodNotAllowed(ProxyError):
    status, code, title = 405, "method_not_allowed", "Method Not Allowed"


class UnsupportedMediaType(ProxyError):
    status, code, title = 415, "unsupported_media_type", "Unsupported Media Type"


class NotImplementedHere(ProxyError):
    status, code, title = 501, "not_implemented", "Not Implemented"


class Unavailable(ProxyError):
    status, code, title = 503, "unavailable", "Service Unavailable"


class UpstreamProblem(ProxyError):
    """A request-level problem+json from the mail server, passed on with its status."""

    code = "upstream_problem"

    def __init__(self, status: int, title: str, detail: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail, headers=headers, extra=extra)
        self.status, self.title = status, title


# The one table: JMAP error type (method-level, RFC 8620 §3.6.2, and per-object SetError,
# RFC 8620 §5.3 / RFC 8621) -> the error the client gets, with the detail used when the server
# gives no description (and always for server-side failures, whose descriptions stay in the logs).
ERRORS: Mapping[str, tuple[type[ProxyError], str]] = {
    # not found
    "notFound": (NotFound, "No such object."),
    "accountNotFound": (NotFound, "The mail account does not exist."),
    "blobNotFound": (BadRequest, "A referenced blob (attachment) does not exist."),
    "anchorNotFound": (BadRequest, "The anchor is not in the results."),
    # refused
    "forbidden": (Forbidden, "The mail server does not allow this."),
    "accountReadOnly": (Forbidden, "The mail account is read-only."),
    "forbiddenFrom": (Forbidden, "You may not send from this address."),
    "forbiddenMailFrom": (Forbidden, "You may not send from this envelope address."),
    "forbiddenToSend": (Forbidden, "You may not send mail."),
    # bad input
    "invalidArguments": (BadRequest, "The mail server refused the arguments."),
    "invalidProperties": (BadRequest, "The mail server refused some properties."),
    "invalidPatch": (BadRequest, "The mail server refused the change."),
    "unsupportedFilter": (BadRequest, "The mail server does not support this filter."),
    "unsupportedSort": (BadRequest, "The mail server does not support this sort."),
    "invalidEmail": (BadRequest, "The message is not valid."),
    "invalidRecipients": (BadRequest, "Some recipients are not valid."),
    "noRecipients": (BadRequest, "The message has no recipients."),
    "tooManyRecipients": (BadRequest, "The message has too many recipients."),
    "tooManyKeywords": (BadRequest, "The message has too many keywords."),
    "tooManyMailboxes": (BadRequest, "The message is in too many mailboxes."),
    "singleton": (BadRequest, "This object cannot be created or destroyed."),
    # state
    "stateMismatch": (Conflict, "The mail data changed; retry."),
    "cannotCalculateChanges": (Conflict, "The mail server cannot calculate the changes."),
    "alreadyExists": (Conflict, "The object already exists."),
    "mailboxHasChild": (Conflict, "The mailbox has child mailboxes."),
    "mailboxHasEmail": (Conflict, "The mailbox is not empty."),
    "willDestroy": (Conflict, "The object is being destroyed."),
    "cannotUnsend": (Conflict, "The message can no longer be unsent."),
    # size and rate
    "requestTooLarge": (PayloadTooLarge, "The request is too large for the mail server."),
    "tooLarge": (PayloadTooLarge, "The object is too large."),
    "overQuota": (TooManyRequests, "The mail account is over quota."),
    "rateLimit": (TooManyRequests, "Too many messages sent; retry later."),
    # not supported
    "unknownMethod": (NotImplementedHere, "The mail server does not implement this operation."),
    "unknownCapability": (NotImplementedHere, "The mail server does not support this capability."),
    "accountNotSupportedByMethod": (NotImplementedHere, "The mail account does not support this operation."),
    # the server's own failures
    "serverFail": (InternalError, "The mail server failed."),
    "serverPartialFail": (InternalError, "The mail server failed part of the change."),
    "serverUnavailable": (Unavailable, "The mail server is temporarily unavailable."),
    "invalidResultReference": (InternalError, "The proxy sent a request the mail server could not resolve."),
}
_UNKNOWN = (BadGateway, "The mail server answered with an error the proxy does not know.")
_RETRY_AFTER_TYPES = frozenset({"rateLimit", "serverUnavailable"})


def jmap_error(type_: Any, description: Any = None, *, retry_after: int = 60,
               extra: Mapping[str, Any] | None = None) -> ProxyError:
    """The ProxyError for a JMAP error type (from ERRORS). The problem's `jmapType` names it;
    the server's description is shown for client-side errors only. Pure."""
    t = type_ if isinstance(type_, str) else "unknown"
    cls, default = ERRORS.get(t, _UNKNOWN)
    detail = default
    if cls.status < 500 and isinstance(description, str) and description.strip():
        detail = description.strip()[:500]
    ex: dict[str, Any] = {"jmapType": t}
    if extra:
        ex.update(extra)
    headers = {"Retry-After": str(retry_after)} if t in _RETRY_AFTER_TYPES else None
    return cls(detail, headers=headers, extra=ex)


def _set_error(err: Any, **extra: Any) -> ProxyError:
    if not isinstance(err, dict):
        return jmap_error(None, extra=extra or None)
    props = err.get("properties")
    if isinstance(props, list) and all(isinstance(p, str) for p in props):
        extra["properties"] = props
    return jmap_error(err.get("type"), err.get("description"), extra=extra or None)


def upstream_error(status: int, headers: Mapping[str, str], body: bytes | None) -> ProxyError:
    """A non-200 answer to a JMAP API request. A problem+json keeps its status (its `type` in
    `jmapType`); a 401/407 means the mail server refused the proxy's own credentials: 502. Pure."""
    retry = headers.get("Retry-After")
    keep = {"Retry-After": retry} if retry and status in (429, 503) else None
    if status in (401, 407):
        return BadGateway("The mail server refused the proxy's credentials for this user.")
    ctype = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    doc: Any = None
    if ctype in ("application/problem+json", "application/json") and body:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
    if isinstance(doc, dict) and 400 <= status <= 599:
        t = doc.get("type")
        extra = {"jmapType": t} if isinstance(t, str) and t not in ("", "about:blank") else {}
        limit = doc.get("limit")
        if isinstance(limit, str):
            extra["limit"] = limit
        title = doc.get("title") if isinstance(doc.get("title"), str) else "Mail Server Error"
        detail = doc.get("detail") if isinstance(doc.get("detail"), str) else title
        return UpstreamProblem(status, title[:200], detail[:500], headers=keep, extra=extra)
    if status == 413:
        return PayloadTooLarge("The request is too large for the mail server.")
    if status == 429:
        return TooManyRequests("The mail server is rate limiting this account.", headers=keep)
    if status == 503:
        return Unavailable("The mail server is not available.", headers=keep)
    return BadGateway(f"The mail server answered {status}.")


# ---------------------------------------------------------------------------- routing
@dataclass(frozen=True, slots=True)
class Route:
    endpoint: str
    params: tuple[str, ...] = ()


# (path pattern, {method: endpoint}); `{}` is one path segment
ROUTES: tuple[tuple[tuple[str, ...], Mapping[str, str]], ...] = (
    (("mailboxes",), {"GET": "list_mailboxes"}),
    (("messages",), {"GET": "list_messages", "POST": "send_message"}),
    (("messages", "{}"), {"GET": "get_message", "PATCH": "update_message", "DELETE": "delete_message"}),
    (("messages", "{}", "attachments", "{}"), {"GET": "download_attachment"}),
    (("attachments",), {"POST": "upload_attachment"}),
    (("quota",), {"GET": "get_quota"}),
    (("export",), {"GET": "export"}),
    (("erasure",), {"POST": "erase"}),
)


def is_facade_path(path: str) -> bool:
    return path == OPENAPI_PATH or path == PREFIX or path.startswith(PREFIX + "/")


def route(method: str, path: str) -> Route:
    """The endpoint for a facade path. NotFound for an unknown path, MethodNotAllowed (with
    Allow) for a known path and another method. Path parameters are checked as JMAP ids. Pure."""
    if path == OPENAPI_PATH:
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{method} is not allowed here.", headers={"Allow": "GET, HEAD"})
        return Route("openapi")
    segs = tuple(path[len(PREFIX) + 1:].split("/")) if path.startswith(PREFIX + "/") else ()
    for pattern, methods in ROUTES:
        if len(pattern) != len(segs) or any(p != "{}" and p != s for p, s in zip(pattern, segs)):
            continue
        endpoint = methods.get(method)
        if endpoint is None:
            raise MethodNotAllowed(f"{method} is not allowed here.", headers={"Allow": ", ".join(methods)})
        names = ("message id", "blob id")
        params = tuple(s for p, s in zip(pattern, segs) if p == "{}")
        for name, value in zip(names, params):
            check_id(value, name)
        return Route(endpoint, params)
    raise NotFound("No such REST resource.")


# ---------------------------------------------------------------------------- validation
def check_id(value: Any, what: str = "id") -> str:
    """A JMAP Id: 1-255 of [A-Za-z0-9_-]."""
    if not isinstance(value, str) or not _ID.match(value):
        raise BadRequest(f"The {what} is not valid: ids are 1-255 letters, digits, '-' or '_'.")
    return value


def _text(value: Any, what: str, *, max_len: int = MAX_TEXT, multiline: bool = False) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string.")
    if len(value) > max_len:
        raise BadRequest(f"{what} is longer than {max_len} characters.")
    bad = value.replace("\r\n", "").replace("\n", "").replace("\t", "") if multiline else value
    if _CONTROL.search(bad):
        raise BadRequest(f"{what} contains control characters.")
    return value


def parse_bool(value: str, what: str) -> bool:
    v = value.lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise BadRequest(f"{what} must be true or false.")


def _int(value: str, what: str, lo: int, hi: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise BadRequest(f"{what} must be a whole number.")
    n = int(value)
    if not lo <= n <= hi:
        raise BadRequest(f"{what} must be between {lo} and {hi}.", extra={"parameter": what})
    return n


def _utc_date(value: str, what: str) -> str:
    """RFC 3339 date-time (or a plain date, meaning midnight UTC) -> JMAP UTCDate."""
    try:
        if len(value) == 10:
            dt = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        else:
            if len(value) > 40 or "T" not in value.upper():
                raise ValueError
            dt = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            dt = dt.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise BadRequest(f"{what} must be an RFC 3339 date-time such as 2025-01-31T09:00:00Z, "
                         "or a date such as 2025-01-31.") from None
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _query_params(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict",
                          max_num_fields=len(allowed) + 1)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The query string is not valid (too many parameters or bad encoding).") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k not in allowed:
            raise BadRequest(f"Unknown query parameter {k[:50]!r}; allowed: {', '.join(allowed)}.")
        if k in out:
            raise BadRequest(f"The query parameter {k!r} is given more than once.")
        out[k] = v
    return out


def parse_delete_query(query: str) -> bool:
    """DELETE /messages/{id}: `permanent` (default false)."""
    p = _query_params(query, ("permanent",))
    return parse_bool(p["permanent"], "permanent") if "permanent" in p else False


def parse_json_object(body: bytes | None, content_type: str) -> dict[str, Any]:
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType("The request body must be application/json.")
    try:
        doc = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise BadRequest("The request body must be a JSON object.")
    return doc


def _check_keys(doc: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> None:
    for k in doc:
        if k not in allowed:
            raise BadRequest(f"Unknown {what} member {str(k)[:50]!r}; allowed: {', '.join(allowed)}.")


# ---------------------------------------------------------------------------- JMAP responses
class Responses:
    """The method responses of one JMAP answer, by call id (a call id can have several: the
    implicit Email/set of onSuccessUpdateEmail shares its EmailSubmission/set's id)."""

    def __init__(self, items: list[tuple[str, dict[str, Any], str]]) -> None:
        self.items = items

    def all(self, call_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [(n, a) for n, a, c in self.items if c == call_id]

    def get(self, call_id: str, name: str) -> dict[str, Any]:
        """The arguments of `name`'s answer to `call_id`; a method error raises its mapped error."""
        for n, a in self.all(call_id):
            if n == "error":
                args = a.get("arguments")
                ok = isinstance(args, list) and all(isinstance(x, str) for x in args)
                extra = {"arguments": args} if ok else None
                raise jmap_error(a.get("type"), a.get("description"), extra=extra)
            if n == name:
                return a
        raise BadGateway(f"The mail server did not answer {name}.")


def api_responses(status: int, headers: Mapping[str, str], body: bytes | None) -> Responses:
    """Parse the answer to a JMAP API POST (RFC 8620 §3.4). Pure."""
    if status != 200:
        raise upstream_error(status, headers, body)
    try:
        doc = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        raise BadGateway("The mail server's JMAP answer is not JSON.") from None
    items = doc.get("methodResponses") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise BadGateway("The mail server's JMAP answer has no methodResponses.")
    out = []
    for r in items:
        if isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], dict) \
                and isinstance(r[2], str):
            out.append((r[0], r[1], r[2]))
    return Responses(out)


def _request(using: list[str], *calls: list[Any]) -> dict[str, Any]:
    return {"using": using, "methodCalls": list(calls)}


# ---------------------------------------------------------------------------- mailboxes
MAILBOX_PROPERTIES = ["id", "name", "role", "parentId", "totalEmails", "unreadEmails"]


@dataclass(frozen=True, slots=True)
class Mailbox:
    id: str
    name: str
    role: str | None
    parent_id: str | None
    total_emails: int
    unread_emails: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "role": self.role, "parentId": self.parent_id,
                "totalEmails": self.total_emails, "unreadEmails": self.unread_emails}


def mailboxes_request(account: str) -> dict[str, Any]:
    return _request([CORE, MAIL], ["Mailbox/get", {"accountId": account, "ids": None,
                                                   "properties": MAILBOX_PROPERTIES}, "m"])


def parse_mailboxes(responses: Responses, call_id: str = "m") -> tuple[Mailbox, ...]:
    args = responses.get(call_id, "Mailbox/get")
    out = []
    for m in args.get("list") or ():
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            continue
        role = m.get("role")
        parent = m.get("parentId")
        out.append(Mailbox(m["id"], m["name"] if isinstance(m.get("name"), str) else "",
                           role.lower() if isinstance(role, str) else None,
                           parent if isinstance(parent, str) else None,
                           _count(m.get("totalEmails")), _count(m.get("unreadEmails"))))
    return tuple(out)


def _count(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def resolve_mailbox(boxes: tuple[Mailbox, ...], ref: str) -> Mailbox:
    """By role (case-insensitive: INBOX is the inbox), then by name (exact, then ignoring case
    when that is unambiguous), then by id. BadRequest for an unknown mailbox. Pure."""
    _text(ref, "mailbox", max_len=255)
    if not ref:
        raise BadRequest("mailbox must not be empty.")
    low = ref.lower()
    for attempt in (lambda m: m.role == low, lambda m: m.name == ref):
        for m in boxes:
            if attempt(m):
                return m
    folded = [m for m in boxes if m.name.casefold() == ref.casefold()]
    if len(folded) == 1:
        return folded[0]
    for m in boxes:
        if m.id == ref:
            return m
    raise BadRequest(f"Unknown mailbox {ref[:100]!r}: give a role (inbox, drafts, sent, trash, junk, "
                     "archive), a mailbox name or a mailbox id.", extra={"mailbox": ref[:100]})


def _role(boxes: tuple[Mailbox, ...], role: str) -> Mailbox | None:
    return next((m for m in boxes if m.role == role), None)


# ---------------------------------------------------------------------------- message lists
SUMMARY_PROPERTIES = ["id", "threadId", "mailboxIds", "keywords", "from", "to", "subject",
                      "receivedAt", "sentAt", "size", "preview", "hasAttachment"]
LIST_PARAMS = ("mailbox", "limit", "position", "sort", "q", "unread", "from", "after", "before")


@dataclass(frozen=True, slots=True)
class ListQuery:
    mailbox: str = "inbox"
    limit: int = DEFAULT_LIMIT
    position: int = 0
    sort: tuple[tuple[str, bool], ...] = (("receivedAt", False),)  # (property, ascending)
    text: str | None = None
    unread: bool | None = None
    sender: str | None = None
    after: str | None = None
    before: str | None = None


def parse_list_query(query: str, max_limit: int) -> ListQuery:
    """GET /messages parameters; every problem is a 400 naming the parameter. Pure."""
    p = _query_params(query, LIST_PARAMS)
    kw: dict[str, Any] = {}
    if "mailbox" in p:
        kw["mailbox"] = _text(p["mailbox"], "mailbox", max_len=255)
        if not kw["mailbox"]:
            raise BadRequest("mailbox must not be empty.")
    if "limit" in p:
        kw["limit"] = _int(p["limit"], "limit", 1, max_limit)
    if "position" in p:
        kw["position"] = _int(p["position"], "position", 0, MAX_POSITION)
    if "sort" in p:
        keys = []
        for part in p["sort"].split(","):
            prop, asc = (part[1:], False) if part.startswith("-") else (part, True)
            if prop not in SORTABLE:
                raise BadRequest(f"Cannot sort by {prop[:50]!r}: use {', '.join(SORTABLE)}, each optionally "
                                 "prefixed with '-' for descending, separated by commas.",
                                 extra={"parameter": "sort"})
            keys.append((prop, asc))
        if len(keys) > MAX_SORT_KEYS or len({k for k, _ in keys}) != len(keys):
            raise BadRequest(f"sort takes at most {MAX_SORT_KEYS} different properties.",
                             extra={"parameter": "sort"})
        kw["sort"] = tuple(keys)
    if p.get("q"):
        kw["text"] = _text(p["q"], "q")
    if "unread" in p:
        kw["unread"] = parse_bool(p["unread"], "unread")
    if p.get("from"):
        kw["sender"] = _text(p["from"], "from", max_len=255)
    for name in ("after", "before"):
        if name in p:  # (an empty one too is a 400: it is no date, and the document says date-time)
            kw[name] = _utc_date(p[name], name)
    return ListQuery(**kw)


def messages_request(account: str, mailbox_id: str, q: ListQuery) -> dict[str, Any]:
    """Email/query and Email/get in one request: the get takes the query's ids by a `#ids`
    back-reference (RFC 8620 §3.7)."""
    flt: dict[str, Any] = {"inMailbox": mailbox_id}
    if q.text is not None:
        flt["text"] = q.text
    if q.sender is not None:
        flt["from"] = q.sender
    if q.after is not None:
        flt["after"] = q.after
    if q.before is not None:
        flt["before"] = q.before
    if q.unread is True:
        flt["notKeyword"] = "$seen"
    elif q.unread is False:
        flt["hasKeyword"] = "$seen"
    return _request(
        [CORE, MAIL],
        ["Email/query", {"accountId": account, "filter": flt,
                         "sort": [{"property": p, "isAscending": a} for p, a in q.sort],
                         "position": q.position, "limit": q.limit, "calculateTotal": True}, "q"],
        ["Email/get", {"accountId": account, "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                       "properties": SUMMARY_PROPERTIES}, "g"])


def _addresses(v: Any) -> list[dict[str, Any]] | None:
    if not isinstance(v, list):
        return None
    return [{"name": a.get("name") if isinstance(a.get("name"), str) else None,
             "email": a.get("email") if isinstance(a.get("email"), str) else None}
            for a in v if isinstance(a, dict)]


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def summary(email: Mapping[str, Any]) -> dict[str, Any]:
    """An Email object as the facade shows it in lists. Pure."""
    kw = email.get("keywords") if isinstance(email.get("keywords"), dict) else {}
    boxes = email.get("mailboxIds") if isinstance(email.get("mailboxIds"), dict) else {}
    keywords = sorted(k.lower() for k, v in kw.items() if v)
    return {
        "id": email.get("id"),
        "threadId": _str_or_none(email.get("threadId")),
        "mailboxIds": sorted(k for k, v in boxes.items() if v),
        "from": _addresses(email.get("from")),
        "to": _addresses(email.get("to")),
        "subject": _str_or_none(email.get("subject")),
        "receivedAt": _str_or_none(email.get("receivedAt")),
        "sentAt": _str_or_none(email.get("sentAt")),
        "size": _count(email.get("size")),
        "preview": _str_or_none(email.get("preview")),
        "hasAttachment": email.get("hasAttachment") is True,
        "seen": "$seen" in keywords,
        "flagged": "$flagged" in keywords,
        "draft": "$draft" in keywords,
        "keywords": keywords,
    }


def list_result(responses: Responses) -> dict[str, Any]:
    qa = responses.get("q", "Email/query")
    ga = responses.get("g", "Email/get")
    by_id = {e.get("id"): e for e in ga.get("list") or () if isinstance(e, dict)}
    ids = [i for i in qa.get("ids") or () if i in by_id]
    total = qa.get("total")
    return {"total": total if isinstance(total, int) else None,
            "position": _count(qa.get("position")),
            "messages": [summary(by_id[i]) for i in ids]}


# ---------------------------------------------------------------------------- one message
BODY_PROPERTIES = ["partId", "blobId", "size", "name", "type", "charset", "disposition", "cid"]
DETAIL_PROPERTIES = SUMMARY_PROPERTIES + ["cc", "bcc", "replyTo", "sender", "messageId", "inReplyTo",
                                          "references", "headers", "bodyValues", "textBody",
                                          "htmlBody", "attachments"]


def message_request(account: str, email_id: str, *, max_body_bytes: int = 0) -> dict[str, Any]:
    args: dict[str, Any] = {"accountId": account, "ids": [email_id], "properties": DETAIL_PROPERTIES,
                            "bodyProperties": BODY_PROPERTIES, "fetchTextBodyValues": True,
                            "fetchHTMLBodyValues": True}
    if max_body_bytes > 0:
        args["maxBodyValueBytes"] = max_body_bytes
    return _request([CORE, MAIL], ["Email/get", args, "e"])


def _email(responses: Responses, call_id: str, email_id: str) -> dict[str, Any]:
    args = responses.get(call_id, "Email/get")
    for e in args.get("list") or ():
        if isinstance(e, dict) and e.get("id") == email_id:
            return e
    raise NotFound("No such message.", extra={"jmapType": "notFound"})


def _body_text(parts: Any, values: Mapping[str, Any], media_type: str) -> str | None:
    if not isinstance(parts, list):
        return None
    chunks = []
    for p in parts:
        if isinstance(p, dict) and str(p.get("type", "")).lower() == media_type:
            v = values.get(p.get("partId"))
            if isinstance(v, dict) and isinstance(v.get("value"), str):
                chunks.append(v["value"])
    return "".join(chunks) if chunks else None


def _attachment(email_id: str, part: Mapping[str, Any]) -> dict[str, Any]:
    blob = part.get("blobId")
    return {"blobId": blob, "name": _str_or_none(part.get("name")),
            "type": _str_or_none(part.get("type")) or "application/octet-stream",
            "size": _count(part.get("size")), "disposition": _str_or_none(part.get("disposition")),
            "cid": _str_or_none(part.get("cid")),
            "url": f"{PREFIX}/messages/{email_id}/attachments/{blob}"}


def message_result(responses: Responses, email_id: str, call_id: str = "e") -> dict[str, Any]:
    e = _email(responses, call_id, email_id)
    values = e.get("bodyValues") if isinstance(e.get("bodyValues"), dict) else {}
    out = summary(e)
    out.update({
        "cc": _addresses(e.get("cc")), "bcc": _addresses(e.get("bcc")),
        "replyTo": _addresses(e.get("replyTo")), "sender": _addresses(e.get("sender")),
        "messageId": _str_list(e.get("messageId")), "inReplyTo": _str_list(e.get("inReplyTo")),
        "references": _str_list(e.get("references")),
        "headers": [{"name": h["name"], "value": h["value"].strip()} for h in e.get("headers") or ()
                    if isinstance(h, dict) and isinstance(h.get("name"), str) and isinstance(h.get("value"), str)],
        "text": _body_text(e.get("textBody"), values, "text/plain"),
        "html": _body_text(e.get("htmlBody"), values, "text/html"),
        "attachments": [_attachment(email_id, a) for a in e.get("attachments") or ()
                        if isinstance(a, dict) and isinstance(a.get("blobId"), str)],
        "encryption": encryption_of(e.get("attachments")),
    })
    return out


def _str_list(v: Any) -> list[str] | None:
    return [s for s in v if isinstance(s, str)] if isinstance(v, list) else None


def attachment_of(responses: Responses, email_id: str, blob_id: str) -> dict[str, Any]:
    """The attachment `blob_id` of the message (NotFound unless it is one of its attachments)."""
    e = _email(responses, "e", email_id)
    for a in e.get("attachments") or ():
        if isinstance(a, dict) and a.get("blobId") == blob_id:
            return _attachment(email_id, a)
    raise NotFound("The message has no such attachment.", extra={"jmapType": "blobNotFound"})


def attachments_request(account: str, email_id: str) -> dict[str, Any]:
    return _request([CORE, MAIL], ["Email/get", {"accountId": account, "ids": [email_id],
                                                 "properties": ["id", "attachments"],
                                                 "bodyProperties": BODY_PROPERTIES}, "e"])


# ---------------------------------------------------------------------------- changes
PATCH_KEYS = ("seen", "flagged", "mailbox")


@dataclass(frozen=True, slots=True)
class Patch:
    seen: bool | None = None
    flagged: bool | None = None
    mailbox: str | None = None  # move: the message ends up in exactly this mailbox


def parse_patch(doc: Mapping[str, Any]) -> Patch:
    _check_keys(doc, PATCH_KEYS, "PATCH body")
    kw: dict[str, Any] = {}
    for k in ("seen", "flagged"):
        if k in doc:
            if not isinstance(doc[k], bool):
                raise BadRequest(f"{k} must be true or false.")
            kw[k] = doc[k]
    if "mailbox" in doc:
        kw["mailbox"] = _text(doc["mailbox"], "mailbox", max_len=255)
        if not kw["mailbox"]:
            raise BadRequest("mailbox must not be empty.")
    if not kw:
        raise BadRequest(f"Nothing to change: give at least one of {', '.join(PATCH_KEYS)}.")
    return Patch(**kw)


def update_request(account: str, email_id: str, patch: Patch, mailbox_id: str | None) -> dict[str, Any]:
    """Email/set (keywords by patch path, mailboxIds replaced on a move) then Email/get of the
    changed message, in one request."""
    change: dict[str, Any] = {}
    if patch.seen is not None:
        change["keywords/$seen"] = True if patch.seen else None
    if patch.flagged is not None:
        change["keywords/$flagged"] = True if patch.flagged else None
    if mailbox_id is not None:
        change["mailboxIds"] = {mailbox_id: True}
    return _request(
        [CORE, MAIL],
        ["Email/set", {"accountId": account, "update": {email_id: change}}, "u"],
        ["Email/get", {"accountId": account, "ids": [email_id], "properties": SUMMARY_PROPERTIES}, "e"])


def update_result(responses: Responses, email_id: str) -> dict[str, Any]:
    args = responses.get("u", "Email/set")
    failed = (args.get("notUpdated") or {}).get(email_id)
    if failed is not None or email_id not in (args.get("updated") or {}):
        raise _set_error(failed) if failed is not None else BadGateway("The mail server did not apply the change.")
    return summary(_email(responses, "e", email_id))


def delete_request(account: str, email_id: str, trash_id: str | None) -> dict[str, Any]:
    """Move to Trash (trash_id) or, with trash_id None, destroy. A destroy is preceded by an
    Email/get of the id in the same request: Cyrus answers `destroyed` for an unknown id."""
    if trash_id is None:
        return _request([CORE, MAIL],
                        ["Email/get", {"accountId": account, "ids": [email_id], "properties": ["id"]}, "e"],
                        ["Email/set", {"accountId": account, "destroy": [email_id]}, "d"])
    return _request([CORE, MAIL], ["Email/set", {"accountId": account,
                                                 "update": {email_id: {"mailboxIds": {trash_id: True}}}}, "d"])


def delete_result(responses: Responses, email_id: str, permanent: bool) -> None:
    if permanent:
        _email(responses, "e", email_id)
    args = responses.get("d", "Email/set")
    failed = (args.get("notDestroyed" if permanent else "notUpdated") or {}).get(email_id)
    if failed is not None:
        raise _set_error(failed)
    done = args.get("destroyed") if permanent else args.get("updated")
    if not done or email_id not in done:
        raise BadGateway("The mail server did not apply the change.")


# ---------------------------------------------------------------------------- sending
DRAFT_KEYS = ("to", "cc", "bcc", "subject", "text", "html", "attachments", "from", "send", "encrypted")
ENCRYPTIONS = ("pgp-mime", "smime")
_PGP_ARMOR = re.compile(r"\A\s*-----BEGIN PGP MESSAGE-----\r?\n[\s\S]*\r?\n-----END PGP MESSAGE-----\s*\Z")
_ENVELOPED_DATA_OID = bytes.fromhex("06092a864886f70d010703")  # 1.2.840.113549.1.7.3, DER


@dataclass(frozen=True, slots=True)
class Encrypted:
    """Content the client encrypted end to end (the proxy and the server never see it in clear):
    an ASCII-armored OpenPGP message (RFC 3156's PGP/MIME) or a DER CMS EnvelopedData (S/MIME,
    RFC 8551)."""
    kind: str   # "pgp-mime" | "smime"
    data: bytes  # the armored text, or the DER

    def __repr__(self) -> str:
        return f"Encrypted({self.kind}, {len(self.data)} bytes)"


def parse_encrypted(v: Any, max_bytes: int) -> Encrypted:
    """The `encrypted` member of POST /messages: {"type": "pgp-mime", "data": "-----BEGIN PGP
    MESSAGE-----..."} or {"type": "smime", "data": "<base64 of the DER EnvelopedData>"}. Pure."""
    if not isinstance(v, dict):
        raise BadRequest('encrypted must be {"type": "pgp-mime" | "smime", "data": "..."}.')
    _check_keys(v, ("type", "data"), "encrypted")
    kind, data = v.get("type"), v.get("data")
    if kind not in ENCRYPTIONS:
        raise BadRequest(f"encrypted.type must be one of {', '.join(ENCRYPTIONS)}.")
    if not isinstance(data, str) or not data or len(data) > max_bytes:
        raise BadRequest(f"encrypted.data must be a non-empty string of at most {max_bytes} characters.")
    if kind == "pgp-mime":
        if not data.isascii() or not _PGP_ARMOR.match(data):
            raise BadRequest("encrypted.data must be one ASCII-armored OpenPGP message "
                             "(-----BEGIN PGP MESSAGE----- ... -----END PGP MESSAGE-----).")
        return Encrypted(kind, data.strip().replace("\r\n", "\n").encode("ascii"))
    try:
        der = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("encrypted.data must be the base64 of a DER CMS EnvelopedData (S/MIME).") from None
    # a DER SEQUENCE whose contentType is envelopedData: what a client's S/MIME library makes
    if len(der) < 16 or der[0] != 0x30 or _ENVELOPED_DATA_OID not in der[:32]:
        raise BadRequest("encrypted.data is not a CMS EnvelopedData (S/MIME).")
    return Encrypted(kind, der)


def encrypted_message(draft: Draft, identity: Mapping[str, Any], *, now: float, message_id: str) -> bytes:
    """The whole RFC 5322 message for end-to-end encrypted content: the envelope headers in clear
    (From, To, Cc, Subject, Date, Message-ID; no Bcc), the body the client's ciphertext as
    PGP/MIME (multipart/encrypted, RFC 3156) or S/MIME (application/pkcs7-mime enveloped-data,
    RFC 8551). CRLF line ends. Pure."""
    enc = draft.encrypted
    assert enc is not None
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr((identity.get("name") or "", identity["email"]))
    for key, addrs in (("To", draft.to), ("Cc", draft.cc)):
        if addrs:
            msg[key] = ", ".join(formataddr((a.name or "", a.email)) for a in addrs)
    msg["Subject"] = draft.subject
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = message_id
    if enc.kind == "pgp-mime":
        msg.set_content("This is an OpenPGP/MIME encrypted message (RFC 3156).\n")
        msg.make_mixed()
        msg.set_type("multipart/encrypted")
        msg.set_param("protocol", "application/pgp-encrypted")
        msg.set_payload([])
        control = EmailMessage(policy=SMTP)
        control.set_content(b"Version: 1\n", maintype="application", subtype="pgp-encrypted", cte="7bit")
        control.add_header("Content-Description", "PGP/MIME version identification")
        body = EmailMessage(policy=SMTP)
        body.set_content(enc.data, maintype="application", subtype="octet-stream", cte="7bit",
                         disposition="inline", filename="encrypted.asc")
        body.add_header("Content-Description", "OpenPGP encrypted message")
        msg.attach(control)
        msg.attach(body)
        msg.preamble = "This is an OpenPGP/MIME encrypted message (RFC 3156)."
    else:
        msg.set_content(enc.data, maintype="application", subtype="pkcs7-mime", cte="base64",
                        disposition="attachment", filename="smime.p7m",
                        params={"smime-type": "enveloped-data", "name": "smime.p7m"})
    return msg.as_bytes()


def encryption_of(attachments: Any) -> str | None:
    """How a read message is encrypted end to end, from its parts: "pgp-mime" (an
    application/pgp-encrypted part), "smime" (application/pkcs7-mime), else None. Pure."""
    for a in attachments or ():
        t = (a.get("type") or "").lower() if isinstance(a, dict) else ""
        if t == "application/pgp-encrypted":
            return "pgp-mime"
        if t in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
            return "smime"
    return None


def send_encrypted_request(account: str, identity: Mapping[str, Any], draft: Draft, blob_id: str,
                           drafts_id: str, sent_id: str | None) -> dict[str, Any]:
    """Email/import of the uploaded message into Drafts, then (to send) the same EmailSubmission
    as a plain message: the created id is shared within the request (#draft)."""
    calls: list[list[Any]] = [["Email/import", {"accountId": account, "emails": {"draft": {
        "blobId": blob_id, "mailboxIds": {drafts_id: True}, "keywords": {"$draft": True, "$seen": True}}}}, "c"]]
    using = [CORE, MAIL]
    if draft.send:
        using.append(SUBMISSION)
        calls.append(_submission(account, identity, draft, sent_id))
    return _request(using, *calls)


@dataclass(frozen=True, slots=True)
class Address:
    email: str
    name: str | None = None

    def to_jmap(self) -> dict[str, Any]:
        return {"name": self.name, "email": self.email}


@dataclass(frozen=True, slots=True)
class Attachment:
    blob_id: str
    type: str
    name: str | None


@dataclass(frozen=True, slots=True)
class Draft:
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    sender: str | None = None  # the client's "from": which identity to send as
    send: bool = True
    encrypted: "Encrypted | None" = None  # end-to-end encrypted content: the proxy only wraps it

    @property
    def recipients(self) -> list[str]:
        seen: dict[str, None] = {}
        for a in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(a.email, None)
        return list(seen)


def _email_address(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) > 254 or not _EMAIL.match(v) or _CONTROL.search(v):
        raise BadRequest(f"{what} is not an email address.")
    return v


def _address(v: Any, what: str) -> Address:
    if isinstance(v, str):
        return Address(_email_address(v, what))
    if isinstance(v, dict):
        _check_keys(v, ("email", "name"), what)
        name = v.get("name")
        if name is not None:
            name = _text(name, f"{what}.name", max_len=256)
        return Address(_email_address(v.get("email"), f"{what}.email"), name or None)
    raise BadRequest(f"{what} must be an email address or {{\"name\", \"email\"}}.")


def _addresses_in(doc: Mapping[str, Any], key: str) -> tuple[Address, ...]:
    v = doc.get(key, [])
    if isinstance(v, (str, dict)):
        v = [v]
    if not isinstance(v, list):
        raise BadRequest(f"{key} must be a list of addresses.")
    return tuple(_address(a, f"{key}[{i}]") for i, a in enumerate(v))


def parse_draft(doc: Mapping[str, Any], *, max_body: int = 10 << 20) -> Draft:
    """POST /messages. Pure."""
    _check_keys(doc, DRAFT_KEYS, "message")
    send = doc.get("send", True)
    if not isinstance(send, bool):
        raise BadRequest("send must be true or false.")
    to, cc, bcc = (_addresses_in(doc, k) for k in ("to", "cc", "bcc"))
    subject = _text(doc.get("subject", ""), "subject", max_len=998)
    bodies = {}
    for k in ("text", "html"):
        v = doc.get(k)
        if v is not None and not isinstance(v, str):
            raise BadRequest(f"{k} must be a string.")
        if v is not None and len(v) > max_body:
            raise BadRequest(f"{k} is longer than {max_body} characters.")
        bodies[k] = v
    atts = doc.get("attachments", [])
    if not isinstance(atts, list) or len(atts) > MAX_ATTACHMENTS:
        raise BadRequest(f"attachments must be a list of at most {MAX_ATTACHMENTS} uploaded blobs.")
    parsed_atts = []
    for i, a in enumerate(atts):
        if not isinstance(a, dict):
            raise BadRequest(f"attachments[{i}] must be {{\"blobId\", \"type\", \"name\"}}.")
        _check_keys(a, ("blobId", "type", "name"), f"attachments[{i}]")
        t = a.get("type", "application/octet-stream")
        if not isinstance(t, str) or not _MEDIA_TYPE.match(t):
            raise BadRequest(f"attachments[{i}].type is not a media type.")
        name = a.get("name")
        if name is not None:
            name = _text(name, f"attachments[{i}].name", max_len=255)
        parsed_atts.append(Attachment(check_id(a.get("blobId"), f"attachments[{i}].blobId"), t.lower(),
                                      name or None))
    sender = doc.get("from")
    if sender is not None:
        sender = _email_address(sender, "from")
    encrypted = None
    if doc.get("encrypted") is not None:
        if bodies["text"] is not None or bodies["html"] is not None or parsed_atts:
            raise BadRequest("An encrypted message carries its text and attachments inside the ciphertext: "
                             "give encrypted alone, without text, html or attachments.")
        encrypted = parse_encrypted(doc["encrypted"], max_body)
    draft = Draft(to=to, cc=cc, bcc=bcc, subject=subject, text=bodies["text"], html=bodies["html"],
                  attachments=tuple(parsed_atts), sender=sender, send=send, encrypted=encrypted)
    n = len(draft.recipients)
    if send and n == 0:
        raise BadRequest("A message to send needs at least one recipient (to, cc or bcc).")
    if n > MAX_RECIPIENTS:
        raise BadRequest(f"A message may have at most {MAX_RECIPIENTS} recipients.")
    return draft


def identities_request(account: str) -> dict[str, Any]:
    return _request([CORE, MAIL, SUBMISSION], ["Identity/get", {"accountId": account, "ids": None}, "i"])


def choose_identity(identities: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    """The identity whose email is `wanted` (ignoring case), else a wildcard `*@domain` identity
    of its domain. Forbidden when none: the user may not send as that address. Pure."""
    w = wanted.casefold()
    for ident in identities:
        if isinstance(ident.get("email"), str) and ident["email"].casefold() == w and isinstance(ident.get("id"), str):
            return ident
    domain = w.rpartition("@")[2]
    for ident in identities:
        if isinstance(ident.get("email"), str) and ident["email"].casefold() == "*@" + domain \
                and isinstance(ident.get("id"), str):
            return {**ident, "email": wanted}
    raise Forbidden(f"You have no sending identity for {wanted[:254]}.", extra={"jmapType": "forbiddenFrom"})


def send_request(account: str, identity: Mapping[str, Any], draft: Draft, drafts_id: str,
                 sent_id: str | None) -> dict[str, Any]:
    """Email/set creating the message in Drafts ($draft, $seen), then, to send, EmailSubmission/set
    with the identity and an explicit envelope (Bcc recipients only there, never in a header);
    onSuccessUpdateEmail moves it to Sent and clears $draft."""
    email: dict[str, Any] = {
        "mailboxIds": {drafts_id: True},
        "keywords": {"$draft": True, "$seen": True},
        "from": [{"name": identity.get("name") or None, "email": identity["email"]}],
        "subject": draft.subject,
        "bodyValues": {},
    }
    for key, addrs in (("to", draft.to), ("cc", draft.cc)):
        if addrs:
            email[key] = [a.to_jmap() for a in addrs]
    if draft.text is not None or draft.html is None:
        email["bodyValues"]["t"] = {"value": draft.text or ""}
        email["textBody"] = [{"partId": "t", "type": "text/plain"}]
    if draft.html is not None:
        email["bodyValues"]["h"] = {"value": draft.html}
        email["htmlBody"] = [{"partId": "h", "type": "text/html"}]
    if draft.attachments:
        email["attachments"] = [{"blobId": a.blob_id, "type": a.type, "name": a.name, "disposition": "attachment"}
                                for a in draft.attachments]
    calls: list[list[Any]] = [["Email/set", {"accountId": account, "create": {"draft": email}}, "c"]]
    using = [CORE, MAIL]
    if draft.send:
        using.append(SUBMISSION)
        calls.append(_submission(account, identity, draft, sent_id))
    return _request(using, *calls)


def _submission(account: str, identity: Mapping[str, Any], draft: Draft, sent_id: str | None) -> list[Any]:
    """EmailSubmission/set of the message created as #draft, with an explicit envelope;
    onSuccessUpdateEmail moves it to Sent and clears $draft."""
    after: dict[str, Any] = {"keywords/$draft": None}
    if sent_id is not None:
        after["mailboxIds"] = {sent_id: True}
    return ["EmailSubmission/set", {
        "accountId": account,
        "create": {"send": {"identityId": identity["id"], "emailId": "#draft",
                            "envelope": {"mailFrom": {"email": identity["email"]},
                                         "rcptTo": [{"email": r} for r in draft.recipients]}}},
        "onSuccessUpdateEmail": {"#send": after}}, "s"]


def send_result(responses: Responses, draft: Draft) -> dict[str, Any]:
    created = responses.get("c", "Email/import" if draft.encrypted is not None else "Email/set")
    made = (created.get("created") or {}).get("draft")
    if not isinstance(made, dict) or not isinstance(made.get("id"), str):
        raise _set_error((created.get("notCreated") or {}).get("draft"))
    email_id = made["id"]
    out: dict[str, Any] = {"id": email_id, "sent": False, "submissionId": None, "mailbox": "drafts"}
    if not draft.send:
        return out
    sub = responses.get("s", "EmailSubmission/set")
    done = (sub.get("created") or {}).get("send")
    if not isinstance(done, dict):
        raise _set_error((sub.get("notCreated") or {}).get("send"), draftId=email_id)
    out["sent"] = True
    out["submissionId"] = _str_or_none(done.get("id"))
    for name, args in responses.all("s"):
        if name == "Email/set" and email_id in (args.get("updated") or {}):
            out["mailbox"] = "sent"
    return out


# ---------------------------------------------------------------------------- quota
def quota_request(account: str) -> dict[str, Any]:
    return _request([CORE, QUOTA], ["Quota/get", {"accountId": account, "ids": None}, "q"])


def quota_result(responses: Responses) -> dict[str, Any]:
    args = responses.get("q", "Quota/get")
    out = []
    for q in args.get("list") or ():
        if not isinstance(q, dict):
            continue
        out.append({
            "id": q.get("id"), "name": _str_or_none(q.get("name")),
            "resourceType": _str_or_none(q.get("resourceType")), "scope": _str_or_none(q.get("scope")),
            "used": _count(q.get("used")), "hardLimit": _count(q.get("hardLimit")),
            "warnLimit": q.get("warnLimit") if isinstance(q.get("warnLimit"), int) else None,
            "softLimit": q.get("softLimit") if isinstance(q.get("softLimit"), int) else None,
            "types": _str_list(q.get("types")) or [],
        })
    return {"quotas": out}


# ---------------------------------------------------------------------------- URLs and headers
def expand(template: str, **values: str) -> str:
    """RFC 6570 level-1 expansion of a session URL template ({accountId}, {blobId}, {name},
    {type}); values are percent-encoded whole (a '/' in a name cannot add a path segment)."""
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", quote(v, safe=""))
    return out


def url_path(url: str) -> str:
    """The path and query of a session URL (absolute on Stalwart, relative on Cyrus)."""
    parts = urlsplit(url)
    path = parts.path if parts.scheme or parts.netloc else url.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    return path + ("?" + parts.query if parts.query else "")


def safe_media_type(value: Any) -> str:
    return value.lower() if isinstance(value, str) and _MEDIA_TYPE.match(value) else "application/octet-stream"


def content_disposition(filename: str | None) -> str:
    """`attachment` with an ASCII fallback filename and RFC 8187 filename* for the rest."""
    if not filename:
        return "attachment"
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\;' else "_" for c in filename)[:200]
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename[:200], safe='')}"


# ---------------------------------------------------------------------------- streamed attachments
# POST /attachments and GET .../attachments/{blobId} are not answered by the facade: the flow is
# rewritten to the session's upload or download URL and the engine streams the bytes both ways.
UPLOAD_PATH = PREFIX + "/attachments"
STREAMED = frozenset({"upload_attachment", "download_attachment"})
# the client's headers that travel with a rewritten request (the engine's scrubbed X-Forwarded-*;
# Authorization only matters without upstream_identity, which replaces it otherwise)
FORWARDED_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "Authorization")
# the mail server's download headers passed on; everything else (Server, ETag, its own
# Content-Type and Content-Disposition, ...) is replaced by the facade's
KEPT_DOWNLOAD_HEADERS = ("Content-Length", "Content-Encoding")


def upload_type(content_type: str) -> str:
    """The blob type of an upload from its Content-Type (parameters dropped; none given:
    application/octet-stream). BadRequest for something that is not a media type. Pure."""
    raw = content_type.split(";", 1)[0].strip()
    if not raw:
        return "application/octet-stream"
    if not _MEDIA_TYPE.match(raw):
        raise BadRequest("Content-Type is not a valid media type.")
    return raw.lower()


def download_name(name: str | None) -> str:
    """The {name} of a download URL: cosmetic (the facade sets Content-Disposition itself), so it
    is kept to one plain path segment that no server or guard could read as another path. Pure."""
    n = "".join("_" if c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F else c for c in name or "")[:200]
    return "attachment" if n.strip(".") == "" else n


def rewritten_headers(client: Mapping[str, str] | Any, own: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers of a request the facade rewrites for the upstream: FORWARDED_HEADERS from the
    client's (already scrubbed) headers, then the facade's own. Nothing else the client sent
    (cookies, Range, conditionals, ...) reaches the mail server. Pure."""
    getall = getattr(client, "getall", None)
    out = []
    for name in FORWARDED_HEADERS:
        values = getall(name, ()) if getall is not None else ([client[name]] if name in client else [])
        out.extend((name, v) for v in values)
    return out + own


def upload_result(status: int, headers: Mapping[str, str], body: bytes | None, ctype: str,
                  size: int | None) -> dict[str, Any]:
    """The facade's answer ({"blobId", "type", "size"}) from the upload URL's answer, or the
    error from the one table. `size` is what was sent, when known. Pure."""
    if status not in (200, 201):
        raise upstream_error(status, headers, body)
    try:
        doc = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("blobId"), str):
        raise BadGateway("The mail server's upload answer has no blobId.")
    n = doc.get("size")
    if not isinstance(n, int) or isinstance(n, bool):
        n = size
    if n is None:
        raise BadGateway("The mail server's upload answer has no size.")
    return {"blobId": doc["blobId"], "type": safe_media_type(doc.get("type") or ctype), "size": n}


def download_error(status: int, headers: Mapping[str, str], body: bytes | None) -> ProxyError:
    """A download URL's answer other than 200. Pure."""
    if status == 404:
        return NotFound("The attachment's content is gone.", extra={"jmapType": "blobNotFound"})
    return upstream_error(status, headers, body)


def download_headers(ctype: str, name: str | None, upstream: Mapping[str, str]) -> list[tuple[str, str]]:
    """The headers of a streamed download: the facade's documented ones, plus the body's framing
    and encoding from the mail server (KEPT_DOWNLOAD_HEADERS). Pure."""
    out = [("Content-Type", ctype), ("Content-Disposition", content_disposition(name)),
           ("X-Content-Type-Options", "nosniff"), ("Content-Security-Policy", "default-src 'none'; sandbox"),
           ("Cache-Control", "private, no-store")]
    for h in KEPT_DOWNLOAD_HEADERS:
        v = upstream.get(h)
        if v is not None:
            out.append((h, v))
    return out


# ---------------------------------------------------------------------------- the cache
class FacadeCache:
    """Values per key (user, target) with a TTL in a bounded LRU. An invalidation wins over a fill
    that started before it: `begin()` before the upstream call, `put(key, value, begun)` after;
    the put is dropped when the key was invalidated in between. Sans-IO: the clock is injected."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl = size, ttl
        self._data: TTLCache[Hashable, Any] = TTLCache(size, ttl, clock)
        self._dropped: TTLCache[Hashable, int] = TTLCache(size, math.inf, clock)  # key -> tick of its invalidation
        self._tick = 0

    def get(self, key: Hashable) -> Any | None:
        return self._data.get(key)

    def begin(self) -> int:
        return self._tick

    def put(self, key: Hashable, value: Any, begun: int) -> bool:
        dropped = self._dropped.peek(key)
        if dropped is not None and dropped > begun:
            return False
        self._data.put(key, value)
        return True

    def invalidate(self, key: Hashable) -> None:
        self._tick += 1
        self._data.pop(key)
        self._dropped.put(key, self._tick)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# ---------------------------------------------------------------------------- export (data portability)
EXPORT_PAGE = 200  # messages per Email/query page (capped by the server's maxObjectsInGet)
EXPORT_PROPERTIES = ["id", "blobId", "receivedAt", "size"]
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def parse_export_query(query: str) -> str | None:
    """GET /export parameters: `mailbox` (role, name or id; default: every message). Pure."""
    p = _query_params(query, ("mailbox",))
    if "mailbox" not in p:
        return None
    box = _text(p["mailbox"], "mailbox", max_len=255)
    if not box:
        raise BadRequest("mailbox must not be empty.")
    return box


def export_request(account: str, mailbox_id: str | None, after: str | None, limit: int) -> dict[str, Any]:
    """One page of the export: the messages in receivedAt order after the id `after` (an anchor,
    so that messages arriving or leaving during the export neither repeat nor shift the pages),
    and their blob ids."""
    q: dict[str, Any] = {"accountId": account, "sort": [{"property": "receivedAt", "isAscending": True}],
                         "limit": limit}
    if mailbox_id is not None:
        q["filter"] = {"inMailbox": mailbox_id}
    if after is not None:
        q.update(anchor=after, anchorOffset=1)
    return _request([CORE, MAIL], ["Email/query", q, "q"],
                    ["Email/get", {"accountId": account, "#ids": {"resultOf": "q", "name": "Email/query",
                                                                   "path": "/ids"},
                                   "properties": EXPORT_PROPERTIES}, "g"])


def export_page(responses: Responses) -> list[tuple[str, str, str | None]]:
    """(id, blobId, receivedAt) of a page, in the query's order. Pure."""
    qa = responses.get("q", "Email/query")
    ga = responses.get("g", "Email/get")
    by_id = {e.get("id"): e for e in ga.get("list") or () if isinstance(e, dict)}
    out = []
    for i in qa.get("ids") or ():
        e = by_id.get(i)
        if e is not None and isinstance(e.get("blobId"), str):
            out.append((i, e["blobId"], _str_or_none(e.get("receivedAt"))))
    return out


def mbox_from_line(received_at: str | None) -> bytes:
    """The mbox separator: `From MAILER-DAEMON Fri Nov 27 03:00:00 2026` (asctime, UTC). Pure."""
    try:
        t = datetime.fromisoformat((received_at or "").replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        t = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (f"From MAILER-DAEMON {_DAYS[t.weekday()]} {_MONTHS[t.month - 1]} {t.day:2d} "
            f"{t:%H:%M:%S} {t.year}\n").encode("ascii")


def mbox_entry(raw: bytes, received_at: str | None) -> bytes:
    """One message as an mboxrd entry (RFC 4155; the mboxrd quoting, which is reversible): the
    From_ line, the message with LF line ends and every line that starts with `From ` after any
    number of `>` given one more `>`, then an empty line. Pure."""
    body = raw.replace(b"\r\n", b"\n")
    body = _FROM_LINE.sub(rb">\1", body)
    if not body.endswith(b"\n"):
        body += b"\n"
    return mbox_from_line(received_at) + body + b"\n"


# ---------------------------------------------------------------------------- erasure
ERASE_KEYS = ("confirm", "mailbox")
ERASE_PAGE = 500  # ids per query and destroy (capped by the server's maxObjectsInSet)
ERASE_MAX_ROUNDS = 20_000


def parse_erasure(doc: Mapping[str, Any], login: str) -> str | None:
    """POST /erasure's body: `confirm` must be the user's own login (case aside), `mailbox` (role,
    name or id) limits it to one mailbox. Returns the mailbox reference. Pure."""
    unknown = set(doc) - set(ERASE_KEYS)
    if unknown:
        raise BadRequest(f"Unknown field {sorted(unknown)[0][:50]!r}; allowed: {', '.join(ERASE_KEYS)}.")
    confirm = doc.get("confirm")
    if not isinstance(confirm, str) or confirm.casefold() != login.casefold():
        raise BadRequest("confirm must be your own login: erasure destroys messages for good.",
                         extra={"field": "confirm"})
    box = doc.get("mailbox")
    if box is None:
        return None
    box = _text(box, "mailbox", max_len=255)
    if not box:
        raise BadRequest("mailbox must not be empty.")
    return box


def erase_request(account: str, mailbox_id: str | None, limit: int) -> dict[str, Any]:
    """One round: the first `limit` ids (of the mailbox, or of the account) and their destruction,
    in one request (the destroy takes the query's ids by back-reference)."""
    q: dict[str, Any] = {"accountId": account, "limit": limit}
    if mailbox_id is not None:
        q["filter"] = {"inMailbox": mailbox_id}
    return _request([CORE, MAIL], ["Email/query", q, "q"],
                    ["Email/set", {"accountId": account,
                                   "#destroy": {"resultOf": "q", "name": "Email/query", "path": "/ids"}}, "d"])


def erase_round(responses: Responses) -> tuple[int, int, int]:
    """(ids found, destroyed, not destroyed) of a round. Pure."""
    ids = responses.get("q", "Email/query").get("ids") or ()
    d = responses.get("d", "Email/set")
    return len(ids), len(d.get("destroyed") or ()), len(d.get("notDestroyed") or {})
