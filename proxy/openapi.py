"""The OpenAPI 3.1 document of the REST facade (served at /api/v1/openapi.json). Pure data: the
schemas mirror proxy.rest's validation and answer shapes, and a schemathesis test against the
running proxy keeps them true (tests/integration/test_rest_openapi.py)."""
from __future__ import annotations

import copy
from typing import Any

from .rest import DEFAULT_LIMIT, MAX_ATTACHMENTS, MAX_POSITION, MAX_TEXT, PREFIX, SORTABLE

__all__ = ["document", "VERSION"]

VERSION = "1.0.0"

_NULL_STR = {"type": ["string", "null"]}
_NO_CONTROL = "^[^\\x00-\\x1f\\x7f]*$"
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,255}$", "minLength": 1, "maxLength": 255}
_SORT_KEY = f"-?(?:{'|'.join(SORTABLE)})"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: list[str] | None = None, *, closed: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    out["required"] = list(props) if required is None else required
    if closed:
        out["additionalProperties"] = False
    return out


def _addresses() -> dict[str, Any]:
    return {"type": ["array", "null"], "items": _ref("Address")}


_SUMMARY = {
    "id": _ID,
    "threadId": _NULL_STR,
    "mailboxIds": {"type": "array", "items": {"type": "string"}},
    "from": _addresses(),
    "to": _addresses(),
    "subject": _NULL_STR,
    "receivedAt": {"type": ["string", "null"], "format": "date-time"},
    "sentAt": {"type": ["string", "null"]},
    "size": {"type": "integer", "minimum": 0},
    "preview": _NULL_STR,
    "hasAttachment": {"type": "boolean"},
    "seen": {"type": "boolean"},
    "flagged": {"type": "boolean"},
    "draft": {"type": "boolean"},
    "keywords": {"type": "array", "items": {"type": "string"}},
}
_DETAIL = {
    **_SUMMARY,
    "cc": _addresses(), "bcc": _addresses(), "replyTo": _addresses(), "sender": _addresses(),
    "messageId": {"type": ["array", "null"], "items": {"type": "string"}},
    "inReplyTo": {"type": ["array", "null"], "items": {"type": "string"}},
    "references": {"type": ["array", "null"], "items": {"type": "string"}},
    "headers": {"type": "array", "items": _obj({"name": {"type": "string"}, "value": {"type": "string"}})},
    "text": {"type": ["string", "null"], "description": "The text/plain body parts, concatenated."},
    "html": {"type": ["string", "null"], "description": "The text/html body parts, concatenated."},
    "attachments": {"type": "array", "items": _ref("Attachment")},
    "encryption": {"enum": ["pgp-mime", "smime", None],
                   "description": "End-to-end encryption of the content: its ciphertext is an attachment "
                                  "(encrypted.asc, smime.p7m) to download and decrypt on the client."},
}

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 7807 problem details. `jmapType` names the JMAP error behind it, when there is one.",
        "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                       "detail": {"type": "string"}, "requestId": {"type": "string"},
                       "jmapType": {"type": "string"}},
        "required": ["type", "title", "status", "detail", "requestId"],
    },
    "Address": _obj({"name": _NULL_STR, "email": _NULL_STR}),
    "Mailbox": _obj({"id": _ID, "name": {"type": "string"}, "role": _NULL_STR, "parentId": _NULL_STR,
                     "totalEmails": {"type": "integer", "minimum": 0},
                     "unreadEmails": {"type": "integer", "minimum": 0}}),
    "MailboxList": _obj({"mailboxes": {"type": "array", "items": _ref("Mailbox")}}),
    "MessageSummary": _obj(_SUMMARY),
    "Message": _obj(_DETAIL),
    "MessageList": _obj({"total": {"type": ["integer", "null"], "minimum": 0},
                         "position": {"type": "integer", "minimum": 0},
                         "limit": {"type": "integer", "minimum": 1},
                         "mailbox": _ref("Mailbox"),
                         "messages": {"type": "array", "items": _ref("MessageSummary")}}),
    "Attachment": _obj({"blobId": {"type": "string"}, "name": _NULL_STR, "type": {"type": "string"},
                        "size": {"type": "integer", "minimum": 0}, "disposition": _NULL_STR,
                        "cid": _NULL_STR, "url": {"type": "string"}}),
    "MessagePatch": {
        **_obj({"seen": {"type": "boolean"}, "flagged": {"type": "boolean"},
                "mailbox": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": _NO_CONTROL,
                            "description": "Move: the message ends up in exactly this mailbox "
                                           "(role, name or id)."}},
               [], closed=True),
        "minProperties": 1,
    },
    "AddressInput": {
        "oneOf": [
            {"type": "string", "format": "email", "maxLength": 254},
            _obj({"email": {"type": "string", "format": "email", "maxLength": 254},
                  "name": {"type": ["string", "null"], "maxLength": 256, "pattern": _NO_CONTROL}},
                 ["email"], closed=True),
        ],
    },
    "NewMessage": _obj({
        "to": {"type": "array", "items": _ref("AddressInput"), "maxItems": 100},
        "cc": {"type": "array", "items": _ref("AddressInput"), "maxItems": 100},
        "bcc": {"type": "array", "items": _ref("AddressInput"), "maxItems": 100,
                "description": "Only in the SMTP envelope, never in a header."},
        "subject": {"type": "string", "maxLength": 998, "pattern": _NO_CONTROL},
        "text": {"type": ["string", "null"]},
        "html": {"type": ["string", "null"]},
        "from": {"type": "string", "format": "email", "description": "Send as this identity (default: yours)."},
        "attachments": {"type": "array", "maxItems": MAX_ATTACHMENTS, "items": _obj(
            {"blobId": _ID, "type": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/"
                                                                  "[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"},
             "name": {"type": ["string", "null"], "maxLength": 255, "pattern": _NO_CONTROL}},
            ["blobId"], closed=True)},
        "send": {"type": "boolean", "default": True,
                 "description": "false: only save the draft in Drafts."},
        "encrypted": {
            "description": "End-to-end encrypted content (instead of text, html and attachments, which go "
                           "inside the ciphertext): the proxy wraps it as PGP/MIME (RFC 3156) or S/MIME "
                           "(RFC 8551) and never sees it in clear. The subject and addresses stay in clear.",
            **_obj({"type": {"enum": ["pgp-mime", "smime"]},
                    "data": {"type": "string", "minLength": 1,
                             "description": "pgp-mime: one ASCII-armored OpenPGP message; smime: the base64 of "
                                            "a DER CMS EnvelopedData."}}, closed=True)},
    }, [], closed=True),
    "SendResult": _obj({"id": {"type": "string"}, "sent": {"type": "boolean"},
                        "submissionId": _NULL_STR, "mailbox": {"enum": ["drafts", "sent"]}}),
    "UploadResult": _obj({"blobId": {"type": "string"}, "type": {"type": "string"},
                          "size": {"type": "integer", "minimum": 0}}),
    "Erasure": _obj({
        "confirm": {"type": "string", "description": "Your own login: nothing is destroyed without it."},
        "mailbox": {"type": "string", "minLength": 1, "maxLength": 255,
                    "description": "Only this mailbox (role, name or id); default: every message."},
    }, required=["confirm"], closed=True),
    "ErasureResult": _obj({
        "destroyed": {"type": "integer", "minimum": 0},
        "notDestroyed": {"type": "integer", "minimum": 0,
                         "description": "Messages the mail server refused to destroy (still there)."},
        "mailbox": {"oneOf": [_ref("Mailbox"), {"type": "null"}]},
    }, required=["destroyed", "notDestroyed", "mailbox"]),
    "QuotaList": _obj({"quotas": {"type": "array", "items": _obj({
        "id": {"type": "string"}, "name": _NULL_STR, "resourceType": _NULL_STR, "scope": _NULL_STR,
        "used": {"type": "integer"}, "hardLimit": {"type": "integer"},
        "warnLimit": {"type": ["integer", "null"]}, "softLimit": {"type": ["integer", "null"]},
        "types": {"type": "array", "items": {"type": "string"}}})}}),
}

_PROBLEM_TEXT = {
    400: "Invalid input (bad id, sort, limit, mailbox, body), or the mail server refused the arguments.",
    401: "Not authenticated.",
    403: "Refused by the policy or the mail server.",
    404: "No such message, attachment or resource.",
    405: "Method not allowed on this path.",
    409: "Conflict (stateMismatch, no Trash or Drafts mailbox).",
    413: "Too large (requestTooLarge, tooLarge, maxSizeUpload).",
    415: "The request body must be application/json.",
    429: "Over quota or rate limited (Retry-After).",
    500: "The mail server failed (serverFail).",
    501: "Not offered by the mail server (unknownMethod, no quota capability).",
    502: "The mail server answered something unusable.",
    503: "The mail server is unavailable.",
    504: "The mail server did not answer in time.",
}


def _problems(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in (*codes, 401, 403, 429, 500, 502, 503, 504):
        out[str(c)] = {"description": _PROBLEM_TEXT[c],
                       "content": {"application/problem+json": {"schema": _ref("Problem")}}}
    out["429"]["headers"] = {"Retry-After": {"schema": {"type": "string"},
                                             "description": "Seconds to wait, when known."}}
    return out


def _ok(status: int, description: str, schema: str | None, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"description": description}
    if schema is not None:
        r["content"] = {"application/json": {"schema": _ref(schema)}}
    r.update(extra)
    return {str(status): r}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID, "description": description}


_MESSAGE_ID = _path_param("id", "The message (JMAP Email) id.")

_PATHS: dict[str, Any] = {
    f"{PREFIX}/mailboxes": {"get": {
        "operationId": "listMailboxes", "summary": "List mailboxes (Mailbox/get).",
        "responses": {**_ok(200, "The mailboxes.", "MailboxList"), **_problems()},
    }},
    f"{PREFIX}/messages": {
        "get": {
            "operationId": "listMessages",
            "summary": "List or search messages in one mailbox (Email/query + Email/get, one request).",
            "parameters": [
                _q("mailbox", {"type": "string", "minLength": 1, "maxLength": 255, "pattern": _NO_CONTROL,
                               "default": "inbox"}, "A role (inbox, drafts, sent, trash, junk, archive), "
                                                    "a mailbox name or a mailbox id."),
                _q("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": DEFAULT_LIMIT},
                   "Page size; at most the server's maxObjectsInGet."),
                _q("position", {"type": "integer", "minimum": 0, "maximum": MAX_POSITION, "default": 0},
                   "Zero-based index of the first message."),
                _q("sort", {"type": "string", "pattern": f"^{_SORT_KEY}(?:,{_SORT_KEY}){{0,2}}$",
                            "default": "-receivedAt"},
                   f"Comma-separated keys of {', '.join(SORTABLE)}; '-' prefix for descending."),
                _q("q", {"type": "string", "maxLength": MAX_TEXT, "pattern": _NO_CONTROL},
                   "Full-text search (JMAP `text` filter)."),
                _q("unread", {"type": "boolean"}, "true: unread only; false: read only."),
                _q("from", {"type": "string", "maxLength": 255, "pattern": _NO_CONTROL},
                   "Sender contains this text."),
                _q("after", {"type": "string", "format": "date-time"}, "Received at or after (RFC 3339, or a date)."),
                _q("before", {"type": "string", "format": "date-time"}, "Received before (RFC 3339, or a date)."),
            ],
            "responses": {**_ok(200, "One page of messages, with the total.", "MessageList"),
                          **_problems(400)},
        },
        "post": {
            "operationId": "sendMessage",
            "summary": "Send a message, or save a draft with \"send\": false (Email/set in Drafts + "
                       "EmailSubmission/set; the sent message moves to Sent).",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("NewMessage")}}},
            "responses": {**_ok(201, "Sent (or saved as a draft).", "SendResult",
                                headers={"Location": {"schema": {"type": "string"}}}),
                          **_problems(400, 409, 413, 415)},
        },
    },
    f"{PREFIX}/messages/{{id}}": {
        "parameters": [_MESSAGE_ID],
        "get": {
            "operationId": "getMessage", "summary": "One message: headers, text and HTML bodies, attachments.",
            "responses": {**_ok(200, "The message.", "Message"), **_problems(400, 404)},
        },
        "patch": {
            "operationId": "updateMessage", "summary": "Mark seen/flagged, or move to another mailbox.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("MessagePatch")}}},
            "responses": {**_ok(200, "The message after the change.", "MessageSummary"),
                          **_problems(400, 404, 409, 413, 415)},
        },
        "delete": {
            "operationId": "deleteMessage", "summary": "Move to Trash, or destroy with permanent=true.",
            "parameters": [_q("permanent", {"type": "boolean", "default": False},
                              "Destroy instead of moving to Trash.")],
            "responses": {**_ok(204, "Deleted.", None), **_problems(400, 404, 409)},
        },
    },
    f"{PREFIX}/messages/{{id}}/attachments/{{blobId}}": {
        "parameters": [_MESSAGE_ID, _path_param("blobId", "The attachment's blob id.")],
        "get": {
            "operationId": "downloadAttachment",
            "summary": "Download an attachment of the message (streamed from the mail server).",
            "responses": {
                "200": {"description": "The attachment, with its media type and filename.",
                        "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                **_problems(400, 404)},
        },
    },
    f"{PREFIX}/attachments": {"post": {
        "operationId": "uploadAttachment",
        "summary": "Upload an attachment (streamed; at most the server's maxSizeUpload, checked against "
                   "Content-Length up front); send it by its blobId.",
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {**_ok(201, "Uploaded.", "UploadResult"), **_problems(400, 413)},
    }},
    f"{PREFIX}/quota": {"get": {
        "operationId": "getQuota", "summary": "Quotas (Quota/get, RFC 9425), when the server offers them.",
        "responses": {**_ok(200, "The quotas.", "QuotaList"), **_problems(501)},
    }},
    f"{PREFIX}/export": {"get": {
        "operationId": "exportMail",
        "summary": "Every message of the account (or of one mailbox) as one mboxrd file (RFC 4155), oldest "
                   "first, streamed: data portability.",
        "parameters": [_q("mailbox", {"type": "string", "minLength": 1, "maxLength": 255},
                          "Only this mailbox: a role, name or id (default: every message).")],
        "responses": {
            "200": {"description": "The mbox file (chunked; a failure midway cuts the connection, so a "
                                   "complete transfer is a complete export).",
                    "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                    "content": {"application/mbox": {"schema": {"type": "string", "format": "binary"}}}},
            **_problems(400)},
    }},
    f"{PREFIX}/erasure": {"post": {
        "operationId": "eraseMail",
        "summary": "Destroy every message of the account, or of one mailbox, for good (GDPR erasure). The "
                   "shipped policy allows it only to identities with the mail-erasure role.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Erasure")}}},
        "responses": {**_ok(200, "What was destroyed.", "ErasureResult"), **_problems(400, 415)},
    }},
    "/api/v1/openapi.json": {"get": {
        "operationId": "openapi", "summary": "This document.",
        "responses": {"200": {"description": "OpenAPI 3.1.",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      **_problems()},
    }},
}


def document(server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI document; `server_url` is the proxy's public base URL."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "sge-mail-proxy REST mail API", "version": VERSION,
                 "description": "A small REST facade over JMAP (RFC 8620/8621), answered by the proxy. "
                                "Errors are RFC 7807 problem+json; `jmapType` names the JMAP error."},
        "paths": copy.deepcopy(_PATHS),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A JWT or an API key accepted by the proxy."}},
        },
        "security": [{"bearer": []}],
    }
    if server_url:
        doc["servers"] = [{"url": server_url.rstrip("/")}]
    return doc
