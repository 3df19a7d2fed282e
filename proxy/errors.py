"""Every error a client can see, and the one function that turns it into an answer.

Each ProxyError carries its HTTP status and a short machine code (h11's `error_status_hint`,
aiohttp's `status_code`). `to_response()` is the only place a problem+json body is built.
"""
from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "ProxyError", "BadRequest", "Unauthorized", "Forbidden", "NotFound", "PayloadTooLarge",
    "HeadersTooLarge", "TooManyRequests", "InternalError", "BadGateway", "UpstreamConnectError",
    "UpstreamTLSError", "UpstreamProtocolError", "UpstreamTooLarge", "UpstreamTimeout", "NoUpstream", "ConfigError",
    "problem", "to_response",
]

PROBLEM_BASE = "https://sge-mail-proxy.dev/problems/"


class ProxyError(Exception):
    """An error with an HTTP status. `detail` is shown to the client: keep it free of secrets."""

    status: int = 502
    code: str = "bad_gateway"
    title: str = "Bad Gateway"

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra or {}


class BadRequest(ProxyError):
    status, code, title = 400, "bad_request", "Bad Request"


class Unauthorized(ProxyError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(ProxyError):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(ProxyError):
    status, code, title = 404, "not_found", "Not Found"


class PayloadTooLarge(ProxyError):
    status, code, title = 413, "payload_too_large", "Payload Too Large"


class HeadersTooLarge(ProxyError):
    status, code, title = 431, "headers_too_large", "Request Header Fields Too Large"


class TooManyRequests(ProxyError):
    status, code, title = 429, "too_many_requests", "Too Many Requests"


class InternalError(ProxyError):
    status, code, title = 500, "internal_error", "Internal Server Error"


class BadGateway(ProxyError):
    status, code, title = 502, "bad_gateway", "Bad Gateway"


class UpstreamConnectError(BadGateway):
    code = "upstream_connect_failed"


class UpstreamTLSError(BadGateway):
    code = "upstream_tls_failed"


class UpstreamProtocolError(BadGateway):
    code = "upstream_protocol_error"


class UpstreamTooLarge(BadGateway):
    code = "upstream_response_too_large"


class NoUpstream(ProxyError):
    status, code, title = 503, "no_upstream", "Service Unavailable"


class UpstreamTimeout(ProxyError):
    status, code, title = 504, "upstream_timeout", "Gateway Timeout"


class ConfigError(Exception):
    """Bad configuration. str() is one line naming the key (and file) and the reason."""

    def __init__(self, key: str, reason: str, *, source: str | None = None) -> None:
        self.key, self.reason, self.source = key, reason, source
        where = f" (in {source})" if source else ""
        super().__init__(f"config error: {key}{where}: {reason}")


def problem(status: int, title: str, detail: str, request_id: str, *, code: str | None = None,
            extra: dict[str, Any] | None = None) -> bytes:
    """An RFC 7807 body. Pure."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (code or "about-blank"),
        "title": title,
        "status": status,
        "detail": detail,
        "requestId": request_id,
    }
    if extra:
        for k, v in extra.items():
            body.setdefault(k, v)
    return orjson.dumps(body)


def to_response(exc: ProxyError, request_id: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) for an error. The only builder of error answers."""
    body = problem(exc.status, exc.title, exc.detail, request_id, code=exc.code, extra=exc.extra)
    headers = [("Content-Type", "application/problem+json"), ("Cache-Control", "no-store")]
    headers.extend(exc.headers.items())
    return exc.status, headers, body
