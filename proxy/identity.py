"""Who the client is, once an auth addon has proved it. Sans-IO."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Identity"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """An authenticated principal.

    subject: the user id (JWT `sub`, or the API key's configured user id).
    email: the mail login the upstream knows this user by (the `email` claim).
    tenant: from a `tenant:{name}` role, or a configured claim.
    roles: every role the token carried, `tenant:*` ones included.
    region: the user's region claim, if any (region routing).
    session_id: `sid`, else `jti`, else None.
    scopes: API-key scopes or the token's `scope`/`scp` claim.
    method: how the identity was proved: "jwt" or "api_key".
    expires_at: unix time after which the credential is no longer valid (None: never).
    """

    subject: str
    email: str | None = None
    tenant: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    region: str | None = None
    session_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    method: str = "jwt"
    expires_at: float | None = None

    @property
    def login(self) -> str:
        """The name the upstream mail server knows this user by."""
        return self.email or self.subject
