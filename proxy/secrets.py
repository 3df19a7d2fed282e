"""Where secrets come from: the SecretSource interface, and the errors every source raises.

A secret is addressed by a path and a key, Vault KV style: the seed's
`secret/stalwart/tenants/acme/server_url` is path `stalwart/tenants/acme`, key `server_url`, in the
KV mount `secret`. Sources cache what they read; when the backend is unreachable they keep
answering with the last value read (a *stale* read, counted) and report themselves degraded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["SecretSource", "SecretError", "SecretNotFound", "SecretUnavailable", "SourceStatus",
           "split_ref"]


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
