"""Hot reload: what changed between two configurations, what of it needs a restart, and the
generation of the chain each request runs on. Sans-IO: the engine does the building and swapping
(Engine.reload).

A reload re-reads the configuration, builds a whole new chain from it next to the running one,
and swaps it in only when every addon loaded; requests already in flight finish on the chain they
started with, which is retired (its addons' `done`) once they have.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .addonmanager import AddonManager
    from .config import Config
    from .upstream import UpstreamPool

__all__ = ["Generation", "ReloadPlan", "ReloadResult", "RESTART_KEYS", "UPSTREAM_TLS_KEYS",
           "changed_keys", "plan_reload", "keep_running"]

# what is bound or built once per process: a change is reported and the running value kept
RESTART_KEYS = frozenset({"listen", "admin_listen", "workers", "tls", "secrets", "certificates", "access_log",
                          "audit_log", "mail", "trusted_proxies"})
# what the upstream client context is built from: applied (new ClientTLS and pool) when the
# certificate comes from files, else built by the rotator from Vault and left to a restart
UPSTREAM_TLS_KEYS = frozenset({"stalwart.client_cert", "stalwart.client_key", "stalwart.ca_cert",
                               "stalwart.tls_min_version", "stalwart.verify_hostname"})
_NOT_KEYS = frozenset({"source", "base_dir"})  # where the file was, not what it says


class Generation:
    """What a request runs on from its first hook to its last: the addon chain and the pool its
    addons fetch through. Counts the requests still on it, so that a reload can retire it."""

    __slots__ = ("number", "addons", "pool", "in_flight")

    def __init__(self, number: int, addons: "AddonManager", pool: "UpstreamPool") -> None:
        self.number = number
        self.addons = addons
        self.pool = pool
        self.in_flight = 0


def _diff(old: Any, new: Any, prefix: str, out: list[str]) -> None:
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        for f in dataclasses.fields(old):
            if not prefix and f.name in _NOT_KEYS:
                continue
            _diff(getattr(old, f.name), getattr(new, f.name), f"{prefix}{f.name}.", out)
    elif prefix == "addons." and isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new), key=str):
            if old.get(name) != new.get(name):
                out.append(f"addons.{name}")
    elif old != new:
        out.append(prefix[:-1])


def changed_keys(old: "Config", new: "Config") -> list[str]:
    """Dotted keys whose value differs (`addons.<name>` for a whole addon section). Pure."""
    out: list[str] = []
    _diff(old, new, "", out)
    return out


@dataclass(frozen=True)
class ReloadPlan:
    changed: tuple[str, ...]
    restart_needed: tuple[str, ...]   # changed, but the running value stays until a restart
    new_pool: bool                    # an applied stalwart.* change: a new UpstreamPool
    new_tls: bool                     # an applied upstream TLS change: a new ClientTLS as well


def plan_reload(old: "Config", new: "Config", *, cert_files: bool) -> ReloadPlan:
    """What a reload from `old` to `new` (both as loaded, before any port was filled in) does.
    `cert_files`: the upstream client certificate comes from files (certificates.source). Pure."""
    changed = changed_keys(old, new)
    restart = [k for k in changed if k.partition(".")[0] in RESTART_KEYS
               or (k in UPSTREAM_TLS_KEYS and not cert_files)]
    applied = [k for k in changed if k not in restart]
    return ReloadPlan(tuple(changed), tuple(restart),
                      new_pool=any(k.startswith("stalwart.") for k in applied),
                      new_tls=any(k in UPSTREAM_TLS_KEYS for k in applied))


def keep_running(new: "Config", running: "Config", restart_needed: tuple[str, ...]) -> "Config":
    """`new` with the running values of every RESTART_KEYS section (changed or not: the running
    `listen` holds the port the OS chose) and of the other keys in `restart_needed`. Pure (may
    raise ConfigError from the dataclasses' validation)."""
    top: dict[str, Any] = {k: getattr(running, k) for k in RESTART_KEYS}
    stalwart = {k.partition(".")[2]: getattr(running.stalwart, k.partition(".")[2])
                for k in restart_needed if k.startswith("stalwart.")}
    if stalwart:
        top["stalwart"] = dataclasses.replace(new.stalwart, **stalwart)
    return dataclasses.replace(new, **top)


@dataclass
class ReloadResult:
    """The outcome of one reload, as logged and as POST /reload answers it."""
    ok: bool
    status: int                       # the HTTP status POST /reload answers with
    error: str | None = None
    changed: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    generation: int | None = None

    @classmethod
    def refused(cls, status: int, error: str) -> "ReloadResult":
        return cls(False, status, error)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "reloaded" if self.ok else "refused"}
        if self.error is not None:
            out["error"] = self.error
        if self.ok:
            out.update(generation=self.generation, changed=list(self.changed),
                       restart_needed=list(self.restart_needed))
        return out
