"""Built-in addons, one concern per module, and the default chain.

Names here are what `chain:` in the config and SGE_CHAIN accept; each addon's options live in the
config file under `addons.<name>`.
"""
from __future__ import annotations

__all__ = ["BUILTIN", "DEFAULT_CHAIN", "default_chain"]

BUILTIN: dict[str, str] = {
    "path_allowlist": "addons.path_allowlist:PathAllowlist",
    "auth": "addons.auth:Auth",
    "rate_limit": "addons.rate_limit:RateLimit",
    "policy": "addons.policy:Policy",
    "resolver": "addons.resolver:Resolver",
    "jmap_guard": "addons.jmap_guard:JmapGuard",
    "dav_guard": "addons.dav_guard:DavGuard",
    "rest_facade": "addons.rest_facade:RestFacade",
    "upstream_identity": "addons.upstream_identity:UpstreamIdentity",
    "header_signer": "addons.header_signer:HeaderSigner",
    "response_filter": "addons.response_filter:ResponseFilter",
}

# DESIGN.md's order: limits -> auth -> rate limit -> policy -> resolver -> JMAP guard -> upstream
# identity -> header signer -> [forward] -> response filter. The resolver sets flow.upstream, which
# the JMAP guard fetches the user's session from: it must come first.
DEFAULT_CHAIN: tuple[str, ...] = (
    "path_allowlist",
    "auth",
    "rate_limit",
    "policy",
    "resolver",
    "jmap_guard",
    "dav_guard",
    "rest_facade",
    "upstream_identity",
    "header_signer",
    "response_filter",
)


def default_chain() -> list[str]:
    return list(DEFAULT_CHAIN)
