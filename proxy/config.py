"""Configuration: defaults < YAML file < environment < command-line flags.

Every section is a frozen dataclass built by `options.build`, so a bad value fails at start with
one line naming the key and where it came from.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .errors import ConfigError
from .mail import MailOptions
from .options import build
from .target import Target, parse_target

__all__ = ["Config", "StalwartOptions", "TLSOptions", "LimitOptions", "VaultOptions", "SecretsOptions",
           "CertificateOptions", "BreakerOptions", "RetryOptions", "load_config", "parse_listen",
           "ENV_MAP", "DEFAULT_STALWART_URL"]

DEFAULT_STALWART_URL = "https://stalwart.skygenesisenterprise.com"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def parse_listen(value: str, key: str, source: str | None = None) -> tuple[str, int]:
    """"127.0.0.1:8080", "[::1]:8080", ":8080" -> (host, port)."""
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port_s = rest.lstrip(":")
    else:
        host, sep, port_s = v.rpartition(":")
        if not sep:
            raise ConfigError(key, f"expected HOST:PORT, got {value!r}", source=source)
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(key, f"port must be a number, got {port_s!r}", source=source) from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} out of range", source=source)
    return host or "127.0.0.1", port


@dataclass(frozen=True, kw_only=True)
class StalwartOptions:
    """The upstream (the seed's STALWART_* variables)."""
    url: str = DEFAULT_STALWART_URL
    jmap_path: str = "/jmap"
    routing_mode: Literal["official", "tenant", "region", "custom"] = "official"
    default_region: str = "us-east-1"
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_cert: Path | None = None
    max_connections: int = 100
    connect_timeout: float = field(default=5.0, metadata={"kind": "duration"})
    request_timeout: float | None = field(default=None, metadata={"kind": "duration"})
    timeout_seconds: float = field(default=30.0, metadata={"kind": "duration"})
    idle_timeout: float = field(default=30.0, metadata={"kind": "duration"})
    tls_min_version: Literal["1.2", "1.3"] = "1.3"
    verify_hostname: bool = True
    server_hostname: str | None = None
    allow_insecure: bool = False
    allowed_hosts: tuple[str, ...] = ()
    health_path: str = "/healthz/ready"
    health_interval: float = field(default=10.0, metadata={"kind": "duration"})
    health_status: int = 200  # what a healthy server answers on health_path
    health_timeout: float = field(default=2.0, metadata={"kind": "duration"})
    health_unhealthy_after: int = 2  # consecutive failed checks that mark a server unhealthy
    health_healthy_after: int = 1  # consecutive passed checks that mark it healthy again

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError("max_connections", "must be at least 1")
        if not self.jmap_path.startswith("/"):
            raise ConfigError("jmap_path", "must start with /")
        if (self.client_cert is None) != (self.client_key is None):
            raise ConfigError("client_cert", "client_cert and client_key go together")
        if self.connect_timeout <= 0 or self.timeout_seconds <= 0:
            raise ConfigError("connect_timeout", "timeouts must be positive")
        if self.health_interval <= 0 or self.health_timeout <= 0:
            raise ConfigError("health_interval", "health_interval and health_timeout must be positive")
        if self.health_unhealthy_after < 1 or self.health_healthy_after < 1:
            raise ConfigError("health_unhealthy_after", "health thresholds must be at least 1")

    @property
    def response_timeout(self) -> float:
        """Seconds to wait for the response head once the request is sent."""
        return self.request_timeout if self.request_timeout is not None else self.timeout_seconds


@dataclass(frozen=True, kw_only=True)
class BreakerOptions:
    """Outlier ejection and the circuit breaker, per upstream server (proxy/breaker.py)."""
    consecutive_failures: int = 5  # gateway failures in a row that eject a server
    ejection_time: float = field(default=5.0, metadata={"kind": "duration"})  # doubles per repeat
    max_ejection_time: float = field(default=60.0, metadata={"kind": "duration"})
    window: float = field(default=10.0, metadata={"kind": "duration"})  # the breaker's sliding window
    min_requests: int = 10  # requests in the window before the ratio counts
    failure_ratio: float = 0.5
    min_clients: int = 3  # distinct failing clients needed to open (one bad client cannot)
    open_time: float = field(default=5.0, metadata={"kind": "duration"})  # doubles per failed trial
    max_open_time: float = field(default=60.0, metadata={"kind": "duration"})
    failure_statuses: tuple[int, ...] = (500, 502, 503, 504)
    max_targets: int = 256  # servers tracked (health checked) at once
    forget_after: float = field(default=600.0, metadata={"kind": "duration"})  # unused this long: untracked

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.min_requests < 1 or self.min_clients < 1:
            raise ConfigError("consecutive_failures", "consecutive_failures, min_requests and min_clients "
                              "must be at least 1")
        if not 0.0 < self.failure_ratio <= 1.0:
            raise ConfigError("failure_ratio", "must be in (0, 1]")
        if min(self.ejection_time, self.window, self.open_time) <= 0:
            raise ConfigError("window", "ejection_time, window and open_time must be positive")
        if self.max_targets < 1:
            raise ConfigError("max_targets", "must be at least 1")


@dataclass(frozen=True, kw_only=True)
class RetryOptions:
    """Retries of requests that provably never reached the server (docs/reliability.md)."""
    attempts: int = 2
    backoff: float = field(default=0.025, metadata={"kind": "duration"})  # full jitter, x2 per attempt
    max_backoff: float = field(default=1.0, metadata={"kind": "duration"})

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ConfigError("attempts", "must not be negative")


@dataclass(frozen=True, kw_only=True)
class TLSOptions:
    """Downstream TLS (the proxy's own server certificate)."""
    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    # offer HTTP/2 by ALPN (proxy.http2; needs the `http2` extra: h2)
    http2: bool = False


@dataclass(frozen=True, kw_only=True)
class LimitOptions:
    max_header_bytes: int = field(default=64 << 10, metadata={"kind": "size"})
    max_body_buffer: int = field(default=10 << 20, metadata={"kind": "size"})
    max_headers: int = 128
    header_timeout: float = field(default=10.0, metadata={"kind": "duration"})
    keepalive_timeout: float = field(default=75.0, metadata={"kind": "duration"})
    # push channels: a WebSocket session (proxy.websocket) with no frame either way, or an event
    # stream (text/event-stream, JMAP's eventSourceUrl) with no byte from the server, for this long
    # is closed (WebSocket: 1001); other response bodies get stalwart.timeout_seconds. A larger
    # WebSocket message closes the session (1009). 10 MB: Stalwart's maxSizeRequest.
    push_idle_timeout: float = field(default=600.0, metadata={"kind": "duration"})
    websocket_max_message: int = field(default=10_000_000, metadata={"kind": "size"})


@dataclass(frozen=True, kw_only=True)
class VaultOptions:
    """How to reach and log in to Vault (secrets.vault)."""
    url: str = "http://127.0.0.1:8200"
    namespace: str | None = None
    mount: str = "secret"
    kv_version: int = 2
    auth: Literal["token", "approle", "kubernetes"] = "token"
    token: str | None = None
    token_file: Path | None = None
    role_id: str | None = None
    secret_id: str | None = None
    secret_id_file: Path | None = None
    approle_mount: str = "approle"
    kubernetes_role: str | None = None
    kubernetes_jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kubernetes_mount: str = "kubernetes"
    ca_cert: Path | None = None
    timeout: float = field(default=5.0, metadata={"kind": "duration"})

    def __post_init__(self) -> None:
        if self.kv_version not in (1, 2):
            raise ConfigError("kv_version", f"must be 1 or 2, got {self.kv_version}")
        if self.auth == "approle" and (not self.role_id or not (self.secret_id or self.secret_id_file)):
            raise ConfigError("role_id", "approle auth needs role_id and secret_id (or secret_id_file)")
        if self.auth == "kubernetes" and not self.kubernetes_role:
            raise ConfigError("kubernetes_role", "kubernetes auth needs kubernetes_role")


@dataclass(frozen=True, kw_only=True)
class SecretsOptions:
    """Where secrets come from (proxy/secrets.py, proxy/vault.py)."""
    backend: Literal["file", "vault"] = "file"
    file: Path | None = None
    dir: Path | None = None
    cache_ttl: float | None = field(default=None, metadata={"kind": "duration"})  # file 1s, vault 60s
    negative_ttl: float = field(default=5.0, metadata={"kind": "duration"})
    retry_interval: float = field(default=5.0, metadata={"kind": "duration"})
    refresh_interval: float = field(default=30.0, metadata={"kind": "duration"})
    vault: VaultOptions = field(default_factory=VaultOptions)

    def __post_init__(self) -> None:
        if self.refresh_interval <= 0:
            raise ConfigError("refresh_interval", "must be positive")


@dataclass(frozen=True, kw_only=True)
class CertificateOptions:
    """Where the upstream client certificate comes from and how it rotates (proxy/rotation.py)."""
    source: Literal["files", "vault-kv", "vault-pki"] = "files"
    refresh_interval: float = field(default=30.0, metadata={"kind": "duration"})
    path: str = "stalwart"
    kv_keys: tuple[str, ...] = ("client_cert", "client_key", "ca_cert")
    pki_mount: str = "pki"
    pki_role: str | None = None
    common_name: str = "sge-mail-proxy"
    ttl: float = field(default=86400.0, metadata={"kind": "duration"})
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        if self.refresh_interval <= 0:
            raise ConfigError("refresh_interval", "must be positive")
        if len(self.kv_keys) != 3:
            raise ConfigError("kv_keys", "three key names: certificate, private key, CA bundle")
        if self.source == "vault-pki" and not self.pki_role:
            raise ConfigError("pki_role", "certificates.source vault-pki needs pki_role")


@dataclass(frozen=True, kw_only=True)
class Config:
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9901"
    public_url: str | None = None
    # load balancers in front whose X-Forwarded-For is believed (CIDRs); empty: the TCP peer is the client
    trusted_proxies: tuple[str, ...] = ()
    tls: TLSOptions = field(default_factory=TLSOptions)
    stalwart: StalwartOptions = field(default_factory=StalwartOptions)
    limits: LimitOptions = field(default_factory=LimitOptions)
    secrets: SecretsOptions = field(default_factory=SecretsOptions)
    certificates: CertificateOptions = field(default_factory=CertificateOptions)
    breaker: BreakerOptions = field(default_factory=BreakerOptions)
    retry: RetryOptions = field(default_factory=RetryOptions)
    mail: MailOptions = field(default_factory=MailOptions)  # IMAP, SMTP submission, ManageSieve (proxy.mail)
    chain: tuple[str, ...] | None = None
    addon_files: tuple[str, ...] = ()
    addons: dict[str, Any] = field(default_factory=dict)
    access_log: str = "-"
    audit_log: str = "-"  # security events and routing decisions (proxy.audit)
    log_level: str = "INFO"
    drain_timeout: float = field(default=30.0, metadata={"kind": "duration"})
    workers: int = 1  # processes sharing the listener (proxy/workers.py); 1: no supervisor
    addon_reload_interval: float = field(default=1.0, metadata={"kind": "duration"})
    # not from the file: where it came from, for messages and relative paths
    source: str | None = None
    base_dir: Path = PACKAGE_ROOT

    def __post_init__(self) -> None:
        parse_listen(self.listen, "listen")
        parse_listen(self.admin_listen, "admin_listen")
        for i, cidr in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies[{i}]", f"{cidr!r} is not an address or CIDR") from None
        for proto in ("imap", "submission", "sieve"):
            if (addr := getattr(self.mail, proto).listen) is not None:
                parse_listen(addr, f"mail.{proto}.listen")
        if not 1 <= self.workers <= 256:
            raise ConfigError("workers", f"must be between 1 and 256, got {self.workers}")
        if self.tls.enabled and (self.tls.cert is None) != (self.tls.key is None):
            raise ConfigError("tls.cert", "tls.cert and tls.key go together")
        if self.certificates.source == "vault-pki" and self.secrets.backend != "vault":
            raise ConfigError("certificates.source", "vault-pki needs secrets.backend: vault")
        for name, section in self.addons.items():
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"addons.{name}", "expected a mapping")

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_listen(self.listen, "listen")

    @property
    def admin_addr(self) -> tuple[str, int]:
        return parse_listen(self.admin_listen, "admin_listen")

    def resolve(self, p: Path | None) -> Path | None:
        if p is None:
            return None
        return p if p.is_absolute() else self.base_dir / p

    def default_target(self) -> Target:
        s = self.stalwart
        return parse_target(s.url, key="stalwart.url", allow_insecure=s.allow_insecure,
                            allowed_hosts=s.allowed_hosts, name="official")

    def public_base(self) -> str:
        """The URL clients reach the proxy at (session URL rewriting)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.listen_addr
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls.enabled else 'http'}://{host}:{port}"


# environment variable -> dotted config key
ENV_MAP: dict[str, str] = {
    "STALWART_URL": "stalwart.url",
    "STALWART_JMAP_PATH": "stalwart.jmap_path",
    "STALWART_TIMEOUT_SECONDS": "stalwart.timeout_seconds",
    "STALWART_ROUTING_MODE": "stalwart.routing_mode",
    "STALWART_DEFAULT_REGION": "stalwart.default_region",
    "STALWART_CLIENT_CERT": "stalwart.client_cert",
    "STALWART_CLIENT_KEY": "stalwart.client_key",
    "STALWART_CA_CERT": "stalwart.ca_cert",
    "STALWART_MAX_CONNECTIONS": "stalwart.max_connections",
    "STALWART_CONNECT_TIMEOUT": "stalwart.connect_timeout",
    "STALWART_REQUEST_TIMEOUT": "stalwart.request_timeout",
    "SGE_LISTEN": "listen",
    "SGE_ADMIN_LISTEN": "admin_listen",
    "SGE_PUBLIC_URL": "public_url",
    "SGE_CHAIN": "chain",
    "SGE_ACCESS_LOG": "access_log",
    "SGE_AUDIT_LOG": "audit_log",
    "SGE_LOG_LEVEL": "log_level",
    "SGE_WORKERS": "workers",
    "SGE_SECRETS_BACKEND": "secrets.backend",
    "SGE_CERT_SOURCE": "certificates.source",
    "VAULT_ADDR": "secrets.vault.url",
    "VAULT_TOKEN": "secrets.vault.token",
    "VAULT_NAMESPACE": "secrets.vault.namespace",
}


# file paths: relative ones from the environment or the command line are relative to the working
# directory; relative ones in the config file are relative to the file
_PATH_KEYS = frozenset({"stalwart.client_cert", "stalwart.client_key", "stalwart.ca_cert", "tls.cert",
                        "tls.key"})


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError("--config", f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None, base: Mapping | None = None) -> Config:
    """Build the Config. `overrides` are dotted keys from flags (highest precedence); `base` is a
    mapping below the file (the embedded dev default)."""
    env = os.environ if env is None else env
    tree: dict = dict(base or {})
    source = None
    base_dir = PACKAGE_ROOT
    if path is not None:
        p = Path(path)
        tree = _merge(tree, read_yaml(p))
        source = str(p)
        base_dir = p.resolve().parent
    layered: dict = {}
    origin: dict[str, str] = {}
    for var, dotted in ENV_MAP.items():
        if var in env:
            origin[dotted] = f"environment variable {var}"
            value: Any = env[var]
            if dotted == "chain":
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif dotted in _PATH_KEYS and value:
                value = os.path.abspath(value)  # relative to where the command runs, not the file
            _set_dotted(layered, dotted, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            origin[dotted] = "command line"
            if dotted in _PATH_KEYS and isinstance(value, str) and value:
                value = os.path.abspath(value)
            _set_dotted(layered, dotted, value)
    tree = _merge(tree, layered)
    for k in ("source", "base_dir"):
        if k in tree:
            raise ConfigError(k, "is not a configuration key", source=source)
    try:
        cfg = build(Config, tree, prefix="", source=source)
        cfg = dataclasses.replace(cfg, source=source, base_dir=base_dir)
        cfg.default_target()  # validates stalwart.url now, not at the first request
    except ConfigError as e:
        if e.key in origin:  # say where the bad value came from
            raise ConfigError(e.key, e.reason, source=origin[e.key]) from None
        if e.source is None and source is not None:  # (checks across keys name no file themselves)
            raise ConfigError(e.key, e.reason, source=source) from None
        raise
    return cfg
