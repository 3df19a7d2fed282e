"""The addon chain: loading (`module:Class`, built-in name or file), hook dispatch, hot reload of
file addons, and the fail-closed rule for security addons."""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine

from . import options as options_mod
from .errors import ConfigError, InternalError, ProxyError
from .hooks import FLOW_HOOKS

if TYPE_CHECKING:
    from .config import Config
    from .flow import Flow, Response
    from .metrics import Metrics
    from .secrets import SecretSource
    from .target import Target

__all__ = ["AddonManager", "Loader", "AddonSpec", "resolve_spec", "addon_name", "is_security"]

log = logging.getLogger(__name__)

_REQUEST_HOOKS = frozenset({"requestheaders", "request"})  # an addon answering stops these

Fetch = Callable[..., Awaitable["Response"]]


def addon_name(addon: Any) -> str:
    return getattr(addon, "name", None) or type(addon).__name__.lower()


def is_security(addon: Any) -> bool:
    return bool(getattr(addon, "security", False))


class Loader:
    """What an addon's `load(loader)` hook receives. Built per addon; no global context."""

    def __init__(self, manager: "AddonManager", addon: Any) -> None:
        self._manager = manager
        self.owner = addon
        self.config: Config = manager.config
        self.metrics: Metrics = manager.metrics
        self.options: Any = manager.options_for(addon)

    @property
    def base_dir(self) -> Path:
        """Directory relative paths in the config resolve against."""
        return self.config.base_dir

    def path(self, p: str | Path) -> Path:
        p = Path(p)
        return p if p.is_absolute() else self.config.base_dir / p

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Start a background task the manager keeps a reference to and cancels on `done`."""
        return self._manager.spawn(coro, f"{addon_name(self.owner)}:{name}", owner=self.owner)

    async def fetch(self, target: "Target", method: str, path: str, *,
                    headers: list[tuple[str, str]] | None = None, body: bytes | None = None,
                    cap: int = 10 << 20) -> "Response":
        """A side request upstream through the engine's mTLS pool; the body comes back buffered."""
        if self._manager.fetcher is None:
            raise RuntimeError("no upstream client attached")
        return await self._manager.fetcher(target, method, path, headers=headers, body=body, cap=cap)

    @property
    def secrets(self) -> "SecretSource":
        """The engine's SecretSource (files or Vault): `await loader.secrets.get(path, key)`."""
        if self._manager.secrets is None:
            raise RuntimeError("no secret source attached")
        return self._manager.secrets

    def addon(self, name: str) -> Any | None:
        """Another addon of the chain by name (look it up when used: the chain may reload)."""
        return self._manager.get(name)

    def audit(self, event: str, flow: "Flow | None" = None, /, **fields: Any) -> None:
        """A line on the audit log (proxy.audit): `event` names it (`<addon>.<what>`); the flow
        gives the request's id, client, user, method, path and upstream. Never a credential."""
        a = self._manager.audit
        if a is not None:
            a.event(event, flow, **fields)

    @property
    def http(self) -> Any:
        """A shared aiohttp.ClientSession for side I/O that is not upstream (JWKS, ...)."""
        return self._manager.http_session()


@dataclass
class AddonSpec:
    """Where an addon comes from: a built-in name, `module:Class`, or a file path."""
    kind: str  # "object" | "file"
    ref: str


def resolve_spec(entry: str, builtins: dict[str, str]) -> AddonSpec:
    entry = entry.strip()
    if entry in builtins:
        return AddonSpec("object", builtins[entry])
    if entry.endswith(".py") or os.sep in entry:
        return AddonSpec("file", entry)
    if ":" in entry:
        return AddonSpec("object", entry)
    raise ConfigError("chain", f"unknown addon {entry!r} (built-ins: {', '.join(sorted(builtins))};"
                      " or give module:Class or a .py file)")


def instantiate(ref: str) -> Any:
    mod_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
        obj = getattr(mod, attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError("chain", f"cannot load addon {ref!r}: {e}") from None
    return obj() if inspect.isclass(obj) else obj


@dataclass
class _FileAddon:
    """A file addon: its module defines `addons = [...]` (or one class/instance named `addon`)."""
    path: Path
    mtime: float = 0.0
    instances: list[Any] = field(default_factory=list)
    generation: int = 0


def _load_file_module(path: Path, generation: int) -> list[Any]:
    name = f"sge_file_addon_{abs(hash(str(path)))}_{generation}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    if hasattr(mod, "addons"):
        objs = list(mod.addons)
    elif hasattr(mod, "addon"):
        objs = [mod.addon]
    else:
        raise ImportError(f"{path} defines neither `addons = [...]` nor `addon`")
    return [o() if inspect.isclass(o) else o for o in objs]


_Entry = tuple[str, Callable[..., Any], bool, bool]  # addon name, bound hook, is_async, security


class AddonManager:
    """Holds the ordered chain and runs hooks over it."""

    def __init__(self, config: "Config", metrics: "Metrics") -> None:
        self.config = config
        self.metrics = metrics
        self.fetcher: Fetch | None = None
        self.secrets: SecretSource | None = None  # assigned by the engine, like fetcher
        self.audit: Any = None  # the engine's AuditLog (proxy.audit), like fetcher
        self._items: list[Any | _FileAddon] = []
        self._dispatch: dict[str, list[_Entry]] = {h: [] for h in FLOW_HOOKS}
        self.present: frozenset[str] = frozenset()  # the flow hooks some addon has (has(), without the call)
        self._tasks: dict[asyncio.Task, Any] = {}
        self._http: Any = None
        self._watch_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ chain building
    @property
    def addons(self) -> list[Any]:
        out: list[Any] = []
        for item in self._items:
            out.extend(item.instances if isinstance(item, _FileAddon) else [item])
        return out

    def get(self, name: str) -> Any | None:
        for a in self.addons:
            if addon_name(a) == name:
                return a
        return None

    def options_for(self, addon: Any) -> Any:
        cls = getattr(addon, "Options", None)
        if cls is None:
            return None
        name = addon_name(addon)
        section = self.config.addons.get(name, {})
        return options_mod.build(cls, section, prefix=f"addons.{name}", source=self.config.source)

    async def add_spec(self, spec: AddonSpec) -> None:
        if spec.kind == "file":
            p = Path(spec.ref)
            if not p.is_absolute():
                p = (Path.cwd() / p).resolve()
            if not p.exists():
                raise ConfigError("addon", f"addon file {spec.ref} does not exist")
            fa = _FileAddon(p, p.stat().st_mtime)
            try:
                fa.instances = _load_file_module(p, 0)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError("addon", f"addon file {p} failed to load: {type(e).__name__}: {e}") from None
            for inst in fa.instances:
                await self._start(inst)
            self._items.append(fa)
        else:
            inst = instantiate(spec.ref)
            await self._start(inst)
            self._items.append(inst)
        self._rebuild()

    async def add(self, *addons: Any) -> None:
        """Add ready-made addon objects (tests, embedding)."""
        for a in addons:
            await self._start(a)
            self._items.append(a)
        self._rebuild()

    async def _start(self, addon: Any) -> None:
        loader = Loader(self, addon)
        await self._call_plain(addon, "load", loader)
        await self._call_plain(addon, "configure", {"*"})

    async def _call_plain(self, addon: Any, hook: str, *args: Any) -> None:
        fn = getattr(addon, hook, None)
        if fn is None:
            return
        r = fn(*args)
        if inspect.isawaitable(r):
            await r

    def _rebuild(self) -> None:
        table: dict[str, list[_Entry]] = {h: [] for h in FLOW_HOOKS}
        for a in self.addons:
            for h in FLOW_HOOKS:
                fn = getattr(a, h, None)
                if fn is not None:
                    table[h].append((addon_name(a), fn, inspect.iscoroutinefunction(fn), is_security(a)))
        self._dispatch = table
        self.present = frozenset(h for h, entries in table.items() if entries)

    # ------------------------------------------------------------------ dispatch (hot path)
    def has(self, hook: str) -> bool:
        return hook in self.present

    def run_sync(self, hook: str, flow: "Flow") -> "tuple[int, Awaitable[Any]] | None":
        """Run a flow hook along the chain for as long as every addon answers synchronously (the
        engine's path without a Task). Returns None when the hook ran to its end (or a request hook
        set flow.response), else (index, awaitable) for the first addon that has to wait: the
        caller continues with `await run(hook, flow, index, awaitable)`. Errors as in `run`."""
        stop_on_response = hook in _REQUEST_HOOKS
        for i, (name, fn, is_async, security) in enumerate(self._dispatch[hook]):
            try:
                r = fn(flow)
            except ProxyError:
                raise
            except Exception as e:
                self._addon_failed(name, hook, security, flow, e)
            else:
                if r is not None and (is_async or inspect.isawaitable(r)):
                    return i, r
            if stop_on_response and flow.response is not None:
                return None
        return None

    async def run(self, hook: str, flow: "Flow", start: int = 0, pending: "Awaitable[Any] | None" = None) -> None:
        """Run a flow hook along the chain. Stops when an addon sets flow.response in a request
        hook. A ProxyError passes through (it is an answer); any other exception in a security
        addon becomes a 500 (fail closed), elsewhere it is logged and the chain goes on.
        `start`/`pending`: continue where run_sync stopped (pending is what entry `start` returned)."""
        stop_on_response = hook in _REQUEST_HOOKS
        entries = self._dispatch[hook]
        for i in range(start, len(entries)):
            name, fn, is_async, security = entries[i]
            try:
                if pending is not None:
                    r, pending = pending, None
                else:
                    r = fn(flow)
                if is_async or (r is not None and inspect.isawaitable(r)):
                    await r
            except ProxyError:
                raise
            except Exception as e:
                self._addon_failed(name, hook, security, flow, e)
            if stop_on_response and flow.response is not None:
                return

    def _addon_failed(self, name: str, hook: str, security: bool, flow: "Flow", e: Exception) -> None:
        """Count and log an addon's exception; in a security addon it becomes a 500 (fail closed)."""
        self.metrics.addon_errors.labels(name, hook, "true" if security else "false").inc()
        if security:
            log.error("security addon %s failed in %s for %s; failing closed", name, hook,
                      flow.id, exc_info=e)
            if self.audit is not None:
                self.audit.event("addon.failed_closed", flow, addon=name, hook=hook, error=type(e).__name__)
            raise InternalError("The request could not be processed.") from e
        log.error("addon %s failed in %s for %s; continuing", name, hook, flow.id, exc_info=e)

    # ------------------------------------------------------------------ lifecycle
    async def running(self) -> None:
        for a in self.addons:
            await self._call_plain(a, "running")

    async def configure(self, updated: set[str]) -> None:
        for a in self.addons:
            await self._call_plain(a, "configure", updated)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, owner: Any = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = owner
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s died", task.get_name(), exc_info=task.exception())

    async def _cancel_tasks(self, owner: Any) -> None:
        tasks = [t for t, o in self._tasks.items() if o is owner or owner is None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def done(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
        for a in reversed(self.addons):
            try:
                await self._call_plain(a, "done")
            except Exception:
                log.exception("addon %s failed in done", addon_name(a))
        await self._cancel_tasks(None)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def http_session(self) -> Any:
        if self._http is None:
            import aiohttp
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._http

    # ------------------------------------------------------------------ file addon hot reload
    def watch_files(self, interval: float = 1.0) -> None:
        if any(isinstance(i, _FileAddon) for i in self._items) and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(interval), name="addon-watch")

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.check_files()

    async def check_files(self) -> list[Path]:
        """Reload file addons whose file changed. A file that fails to load keeps the previous
        version running (and logs why). Returns the paths reloaded."""
        reloaded = []
        for fa in [i for i in self._items if isinstance(i, _FileAddon)]:
            try:
                mtime = fa.path.stat().st_mtime
            except OSError:
                continue
            if mtime == fa.mtime:
                continue
            fa.mtime = mtime
            gen = fa.generation + 1
            try:
                new = _load_file_module(fa.path, gen)
                for inst in new:
                    await self._start(inst)
            except Exception as e:
                self.metrics.addon_reloads.labels("failed").inc()
                log.error("addon file %s failed to reload, keeping the previous version: %s: %s",
                          fa.path, type(e).__name__, e)
                continue
            old, fa.instances, fa.generation = fa.instances, new, gen
            self._rebuild()
            for inst in old:
                try:
                    await self._call_plain(inst, "done")
                except Exception:
                    log.exception("old addon %s failed in done", addon_name(inst))
                await self._cancel_tasks(inst)
            self.metrics.addon_reloads.labels("ok").inc()
            log.info("addon file %s reloaded", fa.path)
            reloaded.append(fa.path)
        return reloaded
