"""Upstream targets: where a flow goes. Sans-IO."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = ["Target", "parse_target"]


@dataclass(frozen=True, slots=True)
class Target:
    """A server to forward to. `name` is the bounded label used in metrics and logs."""

    scheme: str
    host: str
    port: int
    base_path: str = ""
    name: str = ""

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.authority}"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    def __str__(self) -> str:
        return self.origin + self.base_path


def parse_target(url: str, *, key: str = "stalwart.url", allow_insecure: bool = False,
                 allowed_hosts: tuple[str, ...] = (), name: str | None = None) -> Target:
    """Parse and validate a server URL. Raises ConfigError naming `key`.

    https only unless allow_insecure; no credentials, query or fragment; when allowed_hosts is
    given the host must match one entry exactly or a `*.suffix` pattern.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ConfigError(key, f"not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise ConfigError(key, f"scheme must be https (got {parts.scheme or 'none'!r})")
    if scheme == "http" and not allow_insecure:
        raise ConfigError(key, "plain http upstream refused; set stalwart.allow_insecure: true to allow it")
    if not parts.hostname:
        raise ConfigError(key, "URL has no host")
    if parts.username or parts.password:
        raise ConfigError(key, "credentials in the URL are not allowed")
    if parts.query or parts.fragment:
        raise ConfigError(key, "URL must not have a query or fragment")
    host = parts.hostname.lower()
    if allowed_hosts and not host_allowed(host, allowed_hosts):
        raise ConfigError(key, f"host {host!r} is not in the upstream host allow-list")
    base = parts.path.rstrip("/")
    port = port or (443 if scheme == "https" else 80)
    return Target(scheme, host, port, base, name or host)


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """Exact host, `*.domain` suffix, or an IP network in CIDR form."""
    for p in patterns:
        p = p.lower()
        if p.startswith("*."):
            if host.endswith(p[1:]) and host != p[2:]:
                return True
        elif "/" in p:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(p, strict=False):
                    return True
            except ValueError:
                continue
        elif host == p:
            return True
    return False
