"""The audit log: one JSON line per security event or routing decision, apart from the access log.

Events (`event` names the kind; every line has `ts`, and, when the event belongs to a request,
`request_id`, `client`, `user`, `tenant`, `method`, `path`, `upstream`: the server's origin, not
the bounded metric name):

- `auth.refused` (`reason`: expired, bad_signature, unknown_key, missing, ...; never a credential)
- `policy.denied`, `policy.would_deny` (shadow mode) (`rule`, `denied_method`, `reason`)
- `jmap_guard.refused` (`reason`: foreign_account, result_reference, too_many_calls, ...)
- `rate_limit.limited` (`limit`), `rate_limit.unavailable` (the shared store is down, failing closed)
- `addon.failed_closed` (`addon`, `hook`, `error`: the exception's type)
- `routing.failover` (`primary`, `upstream`: the server that took the request instead, `reason`:
  `unhealthy_or_open` when picked before sending, else the error that never reached the primary)
- `routing.residency_refused` (`detail`), `routing.fallback_dropped` (`region`, `route`,
  `fallback`, `fallback_region`: once per route, fallback and region until the next reload)
- `upstream.health` (`upstream`, `healthy`, `check`), `upstream.circuit` (`upstream`, `state`,
  `previous`)
- `config.reloaded` (`generation`, `changed`, `restart_needed`), `config.reload_refused` (`status`,
  `detail`)
- `tls.client_certificate` (`source`, `subject`, `not_after`, `generation`): a rotated upstream
  client certificate in use
- `websocket.opened` (`subprotocol`), `websocket.closed` (`close_code`, `closed_by_client`,
  `messages_from_client`, `messages_from_server`)

Where: `audit_log` (`SGE_AUDIT_LOG`): `-` (stdout, beside the access log, told apart by `event`),
a file, or `off`. Lines are written in batches like the access log (proxy.accesslog), at most
0.2 s late.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .accesslog import AccessLog

if TYPE_CHECKING:
    from .flow import Flow

__all__ = ["AuditLog"]


class AuditLog:
    """`event(name, flow, **fields)`: one line; fields that are None are left out."""

    def __init__(self, target: str) -> None:
        self._out = AccessLog(target)
        self.enabled = self._out.enabled
        self.worker: int | None = None  # the engine's index under --workers

    def start(self) -> None:
        self._out.start()

    def flush(self) -> None:
        self._out.flush()

    async def close(self) -> None:
        await self._out.close()

    def event(self, name: str, flow: "Flow | None" = None, /, **fields: Any) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"ts": int(time.time() * 1000) / 1000, "event": name}
        if flow is not None:
            ident = flow.identity
            req = flow.request
            record.update(request_id=flow.id, client=flow.client_addr,
                          user=ident.subject if ident is not None else None,
                          tenant=getattr(ident, "tenant", None) if ident is not None else None,
                          method=req.method, path=req.path,
                          upstream=flow.upstream.origin if flow.upstream is not None else None,
                          trace_id=flow.trace_id)
        record.update(fields)
        if self.worker is not None:
            record["worker"] = self.worker
        self._out.write({k: v for k, v in record.items() if v is not None})
