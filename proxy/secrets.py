"""Where secrets come from: the SecretSource interface, the errors every source raises, the cache
every source shares, and the file source (the default).

A secret is addressed by a path and a key, Vault KV style: the seed's
`secret/stalwart/tenants/acme/server_url` is path `stalwart/tenants/acme`, key `server_url`, in the
KV mount `secret`. Sources cache what they read; when the backend is unreachable they keep
answering with the last value read (a *stale* read, counted) and report themselves degraded.

`CachedSource` is the caching layer: a subclass supplies `_fetch(path)` and gets TTL caching, a
brief negative cache for missing paths, one backend read per path at a time, stale answers while
the backend is down (without hammering it: one retry per `retry_interval`), and status().
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import yaml

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["SecretSource", "SecretError", "SecretNotFound", "SecretUnavailable", "SourceStatus",
           "split_ref", "CachedSource", "FileSecretSource", "file_signature"]

log = logging.getLogger(__name__)


class SecretError(Exception):
    """Base class. str() never contains a secret value."""


class SecretNotFound(SecretError):
    """The path or the key does not exist (Vault 404, missing file or key)."""


class SecretUnavailable(SecretError):
    """The backend cannot be asked right now (sealed, down, permission denied) and nothing is
    cached for this path."""


@dataclass(frozen=True)
class SourceStatus:
    name: str
    healthy: bool
    detail: str = ""
    stale_paths: int = 0


@runtime_checkable
class SecretSource(Protocol):
    name: str

    async def get(self, path: str, key: str) -> str:
        """One value. Raises SecretNotFound or SecretUnavailable."""
        ...

    async def read(self, path: str) -> dict[str, Any]:
        """Every key at a path."""
        ...

    def status(self) -> SourceStatus:
        ...

    async def close(self) -> None:
        ...


def split_ref(ref: str) -> tuple[str, str]:
    """"stalwart/tenants/acme/server_url" -> ("stalwart/tenants/acme", "server_url"). Pure."""
    ref = ref.strip("/")
    path, _, key = ref.rpartition("/")
    if not path or not key:
        raise ValueError(f"a secret reference needs a path and a key: {ref!r}")
    return path, key


# ---------------------------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class _Entry:
    data: dict[str, Any] | None  # None: the backend said the path does not exist
    at: float                     # clock() when read


class CachedSource:
    """The caching layer. Subclasses implement `_fetch(path) -> dict` raising SecretNotFound (the
    backend says it does not exist) or SecretUnavailable (the backend cannot answer)."""

    name = "cached"

    def __init__(self, *, ttl: float = 60.0, negative_ttl: float = 5.0, retry_interval: float = 5.0,
                 metrics: "Metrics | None" = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.retry_interval = retry_interval
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._stale: set[str] = set()
        self._healthy = True
        self._detail = ""
        self._down_since: float | None = None
        self._stale_reads = self._up = None
        if metrics is not None:
            self._stale_reads = metrics.counter("sge_proxy_secret_stale_reads_total",
                                                "Secret reads answered from the cache because the source "
                                                "could not be asked.", ("source",)).labels(self.name)
            self._up = metrics.gauge("sge_proxy_secret_source_up",
                                     "1 when the secret source's last backend read succeeded.",
                                     ("source",)).labels(self.name)
            self._up.set(1)

    async def _fetch(self, path: str) -> dict[str, Any]:
        raise NotImplementedError

    # -------------------------------------------------------------- the interface
    async def get(self, path: str, key: str) -> str:
        data = await self.read(path)
        if key not in data:
            raise SecretNotFound(f"{self.name}: {path} has no key {key!r}")
        value = data[key]
        return value if isinstance(value, str) else str(value)

    async def read(self, path: str) -> dict[str, Any]:
        path = path.strip("/")
        now = self._clock()
        entry = self._cache.get(path)
        if entry is not None:
            if entry.data is None:
                if now - entry.at < self.negative_ttl:
                    raise SecretNotFound(f"{self.name}: {path} not found")
            elif now - entry.at < self.ttl:
                return dict(entry.data)
            elif self._down_since is not None and now - self._down_since < self.retry_interval:
                return self._stale_read(path, entry.data)  # the backend failed moments ago
        fut = self._inflight.get(path)
        if fut is None:
            fut = asyncio.ensure_future(self._load(path))
            self._inflight[path] = fut
            fut.add_done_callback(lambda _f, p=path: self._inflight.pop(p, None))
        return dict(await asyncio.shield(fut))

    def status(self) -> SourceStatus:
        return SourceStatus(self.name, self._healthy, self._detail, len(self._stale))

    async def refresh(self) -> None:
        """Re-read every expired cached path (the engine calls this on a timer): keeps the cache
        warm and notices a backend's recovery without waiting for a request."""
        now = self._clock()
        for path, entry in list(self._cache.items()):
            if entry.data is not None and now - entry.at >= self.ttl:
                try:
                    await self.read(path)
                except SecretError:
                    pass

    def invalidate(self, path: str | None = None) -> None:
        if path is None:
            self._cache.clear()
        else:
            self._cache.pop(path.strip("/"), None)

    async def close(self) -> None:
        for fut in list(self._inflight.values()):
            fut.cancel()

    # -------------------------------------------------------------- internals
    async def _load(self, path: str) -> dict[str, Any]:
        try:
            data = await self._fetch(path)
        except SecretNotFound:
            self._cache[path] = _Entry(None, self._clock())
            self._stale.discard(path)
            self._mark_up()
            raise
        except SecretUnavailable as e:
            self._mark_down(str(e))
            entry = self._cache.get(path)
            if entry is not None and entry.data is not None:
                return self._stale_read(path, entry.data)
            raise SecretUnavailable(f"{self.name}: {path}: {e}") from None
        self._cache[path] = _Entry(dict(data), self._clock())
        self._stale.discard(path)
        self._mark_up()
        return data

    def _stale_read(self, path: str, data: dict[str, Any]) -> dict[str, Any]:
        self._stale.add(path)
        if self._stale_reads is not None:
            self._stale_reads.inc()
        return dict(data)

    def _mark_down(self, detail: str) -> None:
        self._down_since = self._clock()
        if self._healthy:
            log.warning("secret source %s cannot be read (%s); serving cached values", self.name, detail)
        self._healthy, self._detail = False, detail
        if self._up is not None:
            self._up.set(0)

    def _mark_up(self) -> None:
        if not self._healthy:
            log.info("secret source %s answers again", self.name)
        self._healthy, self._detail, self._down_since = True, "", None
        if self._up is not None:
            self._up.set(1)


# ---------------------------------------------------------------------------------------------- files
def file_signature(path: Path) -> tuple[str, int, int, int] | None:
    """What identifies a file's content without reading it: the resolved real path, inode, mtime
    and size. Resolving catches Kubernetes' `..data` symlink swap, where the name stays and the
    target directory changes (mtime alone can repeat). None when it does not exist."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return real, st.st_ino, st.st_mtime_ns, st.st_size


def _safe_parts(path: str) -> list[str] | None:
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") or p.startswith(".") for p in parts):
        return None
    return parts


class FileSecretSource(CachedSource):
    """Secrets from a YAML file and/or a directory tree, re-read when they change.

    The YAML file maps paths to {key: value}:

        stalwart/tenants/acme: {server_url: "https://acme.mail.example"}

    The tree holds one file per key, `<dir>/<path>/<key>` (a Kubernetes Secret volume mounted at
    `<dir>/<path>` is such a directory; its `..data` entries are skipped). Where both name the same
    key, the tree wins. Values are read through the cache (default TTL 1 s, so a change is seen
    within a second); a YAML file that stops parsing keeps its last good values (served stale).
    """

    name = "file"

    def __init__(self, *, file: Path | None = None, directory: Path | None = None, ttl: float = 1.0,
                 negative_ttl: float = 1.0, retry_interval: float = 1.0, metrics: "Metrics | None" = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl=ttl, negative_ttl=negative_ttl, retry_interval=retry_interval, metrics=metrics,
                         clock=clock)
        self.file = file
        self.directory = directory
        self._doc: dict[str, dict[str, Any]] = {}
        self._doc_sig: tuple | None = None
        self._doc_error: str | None = None

    def _load_doc(self) -> None:
        """(Re)load the YAML file when its signature changed. Raises SecretUnavailable while it is
        unreadable or malformed (values read before are then served stale)."""
        assert self.file is not None
        sig = file_signature(self.file)
        if sig is None:
            self._doc, self._doc_sig, self._doc_error = {}, None, f"{self.file} does not exist"
            raise SecretUnavailable(self._doc_error)
        if sig == self._doc_sig:
            if self._doc_error:
                raise SecretUnavailable(self._doc_error)
            return
        self._doc_sig = sig
        try:
            raw = yaml.safe_load(Path(sig[0]).read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            self._doc_error = f"cannot read {self.file}: {e}"
            raise SecretUnavailable(self._doc_error) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            self._doc_error = f"{self.file}{f' line {mark.line + 1}' if mark else ''}: invalid YAML"
            raise SecretUnavailable(self._doc_error) from None
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            self._doc_error = f"{self.file}: expected a mapping of paths to {{key: value}} mappings"
            raise SecretUnavailable(self._doc_error)
        self._doc = {str(k).strip("/"): dict(v) for k, v in raw.items()}
        self._doc_error = None
        log.info("secrets file %s loaded (%d paths)", self.file, len(self._doc))

    def _read_tree(self, path: str) -> dict[str, str] | None:
        assert self.directory is not None
        parts = _safe_parts(path)
        if parts is None:
            return None
        d = self.directory.joinpath(*parts)
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise SecretUnavailable(f"cannot list {d}: {e.strerror}") from None
        out = {}
        for ent in entries:
            if ent.name.startswith(".") or not ent.is_file():  # is_file follows the ..data symlinks
                continue
            try:
                out[ent.name] = Path(ent.path).read_text().rstrip("\r\n")
            except FileNotFoundError:
                continue  # removed while listing
            except (OSError, UnicodeDecodeError) as e:
                raise SecretUnavailable(f"cannot read {ent.path}: {e}") from None
        return out

    async def _fetch(self, path: str) -> dict[str, Any]:
        found = False
        data: dict[str, Any] = {}
        if self.file is not None:
            self._load_doc()
            if path in self._doc:
                data.update(self._doc[path])
                found = True
        if self.directory is not None:
            tree = self._read_tree(path)
            if tree is not None:
                data.update(tree)
                found = True
        if not found:
            raise SecretNotFound(f"{self.name}: {path} not found")
        return data

    def status(self) -> SourceStatus:
        st = super().status()
        if self._doc_error and st.healthy:  # malformed but nothing read since: still degraded
            return SourceStatus(st.name, False, self._doc_error, st.stale_paths)
        return st
