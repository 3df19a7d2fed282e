"""Policy enforcement: evaluates the declarative policy (proxy.policy) for every request.

Files are validated at start (a bad file stops the proxy with the file and line) and reloaded
when they change or when `reload()` is called (SIGHUP, admin POST /reload): a file that fails
validation on reload keeps the previous policy in force and the error is logged.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import policies
from proxy import jmap
from proxy.errors import BadRequest, ConfigError, Forbidden
from proxy.policy import Decision, DecisionCache, Facts, PolicySet, build_set, evaluate, parse_policy

if TYPE_CHECKING:
    from proxy.addonmanager import Loader
    from proxy.flow import Flow

__all__ = ["Policy", "PolicyOptions", "DEFAULT_POLICY", "load_policy_files"]

log = logging.getLogger(__name__)

DEFAULT_POLICY = Path(policies.__file__).resolve().parent / "default.yaml"


def load_policy_files(paths: list[Path], default_timezone: str) -> PolicySet:
    """Read and validate the files, merged in order. Raises ConfigError naming file and line."""
    parsed = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("addons.policy.files", f"cannot read {p}: {e}") from None
        parsed.append(parse_policy(text, str(p), default_timezone=default_timezone))
    return build_set(parsed)


def _signature(paths: list[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class PolicyOptions:
    """[addons.policy]

    files: policy files, merged in order (relative paths resolve against the config file).
    mode: enforce refuses denied requests; shadow only logs and counts what would be refused.
    timezone: for time windows that name none.
    reload_interval: how often the files are checked for changes (0 turns the watch off).
    max_body: the most of a JMAP API request body buffered to read its method calls.
    """
    files: tuple[Path, ...] = (DEFAULT_POLICY,)
    mode: Literal["enforce", "shadow"] = "enforce"
    timezone: str = "UTC"
    reload_interval: float = field(default=2.0, metadata={"kind": "duration"})
    max_body: int = field(default=10 << 20, metadata={"kind": "size"})

    def __post_init__(self) -> None:
        if not self.files:
            raise ConfigError("files", "at least one policy file is needed")
        if self.timezone.upper() != "UTC":
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError("timezone", f"unknown timezone {self.timezone!r}") from None
        if self.max_body < 1:
            raise ConfigError("max_body", "must be at least 1 byte")


class Policy:
    """Refuses (403) what the policy denies: a route, or a JMAP request with any forbidden call."""

    name = "policy"
    security = True
    Options = PolicyOptions

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self.policy_set = PolicySet()
        self._opts = PolicyOptions()
        self._paths: list[Path] = []
        self._sig: tuple[Any, ...] = ()
        self._jmap_path = "/jmap"
        self._counter: Any = None
        self._children: dict[tuple[str, str], Any] = {}
        self._cache = DecisionCache(self.policy_set)  # follows policy_set (see request)

    def load(self, loader: "Loader") -> None:
        self._audit = loader.audit
        self._opts = loader.options
        self._paths = [loader.path(p) for p in self._opts.files]
        self._jmap_path = loader.config.stalwart.jmap_path
        self._counter = loader.metrics.counter(
            "sge_proxy_policy_decisions_total", "Policy decisions (shadow ones included).",
            ("policy", "effect", "mode"))
        self._sig = _signature(self._paths)
        self.policy_set = load_policy_files(self._paths, self._opts.timezone)
        log.info("policy loaded: %s (%d rules, mode %s)", ", ".join(self.policy_set.names),
                 len(self.policy_set.rules), self._opts.mode)
        if self._opts.reload_interval > 0:
            loader.spawn(self._watch(self._opts.reload_interval), "reload")

    # ------------------------------------------------------------------ reload
    def reload(self) -> bool:
        """Re-read every file. On any error the previous policy stays in force. True if swapped."""
        self._sig = _signature(self._paths)
        try:
            new = load_policy_files(self._paths, self._opts.timezone)
        except ConfigError as e:
            log.error("policy reload failed, keeping the previous policy: %s", e)
            return False
        self.policy_set = new
        log.info("policy reloaded: %s (%d rules)", ", ".join(new.names), len(new.rules))
        return True

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if _signature(self._paths) != self._sig:
                try:
                    self.reload()
                except Exception:  # a bug in loading must not end the watch; the old policy stays
                    log.exception("policy reload crashed, keeping the previous policy")

    # ------------------------------------------------------------------ hooks
    def requestheaders(self, flow: "Flow") -> None:
        if jmap.is_api_request(flow, self._jmap_path):
            flow.request.want_body(self._opts.max_body)

    def request(self, flow: "Flow") -> None:
        names, using = self._jmap_facts(flow)
        self._decide(flow, flow.request.method, flow.request.path, names, using)

    def websocket_message(self, flow: "Flow") -> None:
        """JMAP over WebSocket: each Request message from the client is decided as a POST to the
        API with its method names; a denied one is answered with a RequestError (403) and not
        forwarded. Messages that are not JMAP are the JMAP guard's to refuse."""
        msg = flow.websocket.messages[-1]  # type: ignore[union-attr]
        if not msg.from_client or msg.dropped or not msg.is_text:
            return
        try:
            req = jmap.ws_message_of(flow)[2]
        except BadRequest:
            return
        if req is None:  # push enable/disable
            return
        try:
            self._decide(flow, "POST", self._jmap_path, req.names, req.using)
        except Forbidden as e:
            jmap.refuse_ws_message(flow, e)

    def _decide(self, flow: "Flow", method: str, path: str, names: tuple[str, ...] | None,
                using: tuple[str, ...] | None) -> None:
        """Evaluate (through the decision cache), count, log; raise Forbidden when enforcing a deny."""
        cache = self._cache
        if cache.policy_set is not self.policy_set:  # reloaded (or replaced): start afresh
            cache = self._cache = DecisionCache(self.policy_set)
        now = self._clock() if cache.windows else None  # the clock matters only to time windows
        key = cache.key(method, path, names, using, flow.identity, flow.client_addr, now)
        hit = cache.get(key) if key is not None else None
        if hit is not None:  # (decision, its metric child): the child's look-up is cached too
            decision, child = hit
        else:
            decision = evaluate(self.policy_set, Facts(
                method=method, path=path, now=now or self._clock(), jmap_methods=names,
                using=using, identity=flow.identity, source_ip=flow.client_addr))
            child = self._child(decision)
            if key is not None:
                cache.put(key, (decision, child))
        if decision.allowed and not log.isEnabledFor(logging.DEBUG):
            child.inc()  # the common case: a counted allow, nothing to log
            return
        self._record(flow, decision, child)
        if not decision.allowed and self._opts.mode == "enforce":
            raise Forbidden(_detail(flow, decision),
                            extra={"policyRule": decision.rule_id} if decision.rule_id else None)

    def facts(self, flow: "Flow") -> Facts:
        names, using = self._jmap_facts(flow)
        return Facts(method=flow.request.method, path=flow.request.path, now=self._clock(),
                     jmap_methods=names, using=using, identity=flow.identity,
                     source_ip=flow.client_addr)

    def _jmap_facts(self, flow: "Flow") -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
        """The JMAP method names and capabilities of an API request, else (None, None)."""
        if not jmap.is_api_request(flow, self._jmap_path):
            return None, None
        req = jmap.request_of(flow)
        if req is None:
            raise BadRequest("The JMAP request has no body.",
                             extra={"jmapType": "urn:ietf:params:jmap:error:notJSON"})
        return req.names, req.using

    def _child(self, d: Decision) -> Any:
        """The decisions counter's child for this decision's policy and effect."""
        key = (d.policy, d.effect)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(d.policy, d.effect, self._opts.mode)
        return child

    def _record(self, flow: "Flow", d: Decision, child: Any) -> None:
        mode = self._opts.mode
        child.inc()
        if d.allowed:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("policy allow %s: rule=%s subject=%s %s %s", flow.id, d.rule_id,
                          flow.identity.subject if flow.identity else "-", flow.request.method,
                          flow.request.path)
            return
        subject = flow.identity.subject if flow.identity else "-"
        self._audit("policy.denied" if mode == "enforce" else "policy.would_deny", flow,
                    rule=d.rule_id or "default-deny", denied_method=d.denied_method, reason=d.reason)
        log.info("policy %s %s: rule=%s subject=%s method=%s route=%s %s reason=%s",
                 "denied" if mode == "enforce" else "would deny (shadow)", flow.id,
                 d.rule_id or "default-deny", subject, d.denied_method or "-",
                 flow.request.method, flow.request.path[:200], d.reason)


def _detail(flow: "Flow", d: Decision) -> str:
    if d.denied_method:
        what = f"JMAP method {d.denied_method}"
    else:
        what = f"{flow.request.method} {flow.request.path[:200]}"
    return f"{what} is not allowed: {d.reason}"
