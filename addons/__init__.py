"""Built-in addons, one concern per module, and the default chain.

Names here are what `chain:` in the config and SGE_CHAIN accept; each addon's options live in the
config file under `addons.<name>`.
"""
from __future__ import annotations

__all__ = ["BUILTIN", "DEFAULT_CHAIN", "default_chain"]

BUILTIN: dict[str, str] = {
    "path_allowlist": "addons.path_allowlist:PathAllowlist",
    "auth": "addons.auth:Auth",
    "policy": "addons.policy:Policy",
    "jmap_guard": "addons.jmap_guard:JmapGuard",
    "upstream_identity": "addons.upstream_identity:UpstreamIdentity",
    "header_signer": "addons.header_signer:HeaderSigner",
    "response_filter": "addons.response_filter:ResponseFilter",
}

# DESIGN.md's order: limits -> auth -> policy -> (resolver) -> JMAP guard -> upstream identity ->
# header signer -> [forward] -> response filter
DEFAULT_CHAIN: tuple[str, ...] = (
    "path_allowlist",
    "auth",
    "policy",
    "jmap_guard",
    "upstream_identity",
    "header_signer",
    "response_filter",
)


def default_chain() -> list[str]:
    return list(DEFAULT_CHAIN)
