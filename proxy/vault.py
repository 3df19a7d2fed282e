"""Secrets from HashiCorp Vault through hvac: KV v2 or v1, token / AppRole / Kubernetes login,
token renewal, and certificates from the PKI engine.

hvac is blocking; every call runs in a worker thread (asyncio.to_thread) so the event loop never
waits on Vault. Reads go through CachedSource: while Vault is down or sealed the last values read
keep being served (stale, counted) and status() says degraded; the next successful read, or the
periodic refresh, clears it.

Token life: after a login (or with a static token) the token's TTL is looked up; a renewable token
is renewed (renew-self) when two thirds of its TTL have passed. When renewal fails, AppRole and
Kubernetes log in again; a static token can only be re-read from `token_file`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import hvac
import hvac.exceptions as hvac_errors
import requests

from .secrets import CachedSource, SecretError, SecretNotFound, SecretUnavailable

if TYPE_CHECKING:
    from .config import VaultOptions
    from .metrics import Metrics

__all__ = ["VaultSecretSource", "renew_delay"]

log = logging.getLogger(__name__)

_UNAVAILABLE = (hvac_errors.VaultDown, hvac_errors.InternalServerError, hvac_errors.BadGateway,
                hvac_errors.RateLimitExceeded, hvac_errors.VaultNotInitialized, hvac_errors.UnexpectedError,
                requests.RequestException)


def renew_delay(ttl: float) -> float:
    """Seconds until a token with `ttl` seconds left should be renewed: at two thirds. Pure."""
    return max(0.0, ttl * 2 / 3)


def _describe(e: BaseException) -> str:
    """An hvac/requests error in a few words (never a secret: hvac messages are Vault's errors)."""
    if isinstance(e, requests.ConnectionError):
        return "cannot connect to Vault"
    if isinstance(e, requests.Timeout):
        return "Vault timed out"
    if isinstance(e, hvac_errors.VaultDown):
        return "Vault is sealed or down (503)"
    if isinstance(e, hvac_errors.Forbidden):
        return "permission denied (403)"
    if isinstance(e, hvac_errors.VaultError):
        return f"Vault answered {type(e).__name__}: {e.args[0] if e.args else ''}"
    return type(e).__name__


class VaultSecretSource(CachedSource):
    name = "vault"

    def __init__(self, opts: "VaultOptions", *, ttl: float = 60.0, negative_ttl: float = 5.0,
                 retry_interval: float = 5.0, metrics: "Metrics | None" = None,
                 resolve: Callable[[Path | None], Path | None] = lambda p: p,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl=ttl, negative_ttl=negative_ttl, retry_interval=retry_interval, metrics=metrics,
                         clock=clock)
        self.opts = opts
        self._resolve = resolve
        ca = resolve(opts.ca_cert)
        self.client = hvac.Client(url=opts.url, namespace=opts.namespace, timeout=opts.timeout,
                                  verify=str(ca) if ca is not None else True)
        self.token_expires: float | None = None  # wall clock; None: no expiry known
        self.renewals = 0
        self.logins = 0
        self._renewable = False
        self._token_task: asyncio.Task | None = None
        self._login_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Log in (or look the static token up) and start the renewal loop. Vault being down is
        not fatal here: the source starts degraded and the loop keeps trying."""
        try:
            await self._login()
        except SecretError as e:
            self._mark_down(str(e))
            self.client.token = None
        self._token_task = asyncio.get_running_loop().create_task(self._token_loop(), name="vault-token")

    async def close(self) -> None:
        if self._token_task is not None:
            self._token_task.cancel()
            await asyncio.gather(self._token_task, return_exceptions=True)
            self._token_task = None
        await super().close()
        await asyncio.to_thread(self.client.adapter.close)

    # ------------------------------------------------------------------ auth
    def _login_sync(self) -> float | None:
        """Blocking. Sets the client token; returns its TTL in seconds (None: does not expire or
        cannot be renewed, so there is nothing to schedule)."""
        o = self.opts
        if o.auth == "approle":
            secret_id = o.secret_id
            if o.secret_id_file is not None:
                secret_id = Path(self._resolve(o.secret_id_file)).read_text().strip()  # type: ignore[arg-type]
            r = self.client.auth.approle.login(role_id=o.role_id, secret_id=secret_id, mount_point=o.approle_mount)
        elif o.auth == "kubernetes":
            jwt = Path(self._resolve(o.kubernetes_jwt_file)).read_text().strip()  # type: ignore[arg-type]
            r = self.client.auth.kubernetes.login(role=o.kubernetes_role, jwt=jwt, mount_point=o.kubernetes_mount)
        else:
            token = o.token
            if o.token_file is not None:
                token = Path(self._resolve(o.token_file)).read_text().strip()  # type: ignore[arg-type]
            if not token:
                raise SecretUnavailable("no Vault token configured (secrets.vault.token or token_file)")
            self.client.token = token
            data = self.client.auth.token.lookup_self()["data"]
            ttl = float(data.get("ttl") or 0)
            self.token_expires = time.time() + ttl if ttl else None
            self._renewable = bool(ttl and data.get("renewable"))
            return ttl or None
        self.logins += 1
        ttl = float(r["auth"]["lease_duration"] or 0)
        self.token_expires = time.time() + ttl if ttl else None
        self._renewable = bool(ttl and r["auth"].get("renewable"))
        return ttl or None

    async def _login(self) -> float | None:
        async with self._login_lock:
            try:
                ttl = await asyncio.to_thread(self._login_sync)
            except OSError as e:
                raise SecretUnavailable(f"cannot read Vault credentials: {e.strerror}") from None
            except (hvac_errors.VaultError, requests.RequestException) as e:
                raise SecretUnavailable(f"Vault login ({self.opts.auth}) failed: {_describe(e)}") from None
        log.info("Vault %s auth ok (token ttl %s)", self.opts.auth, f"{ttl:.0f}s" if ttl else "none")
        self._mark_up()
        return ttl

    def _renew_sync(self) -> float | None:
        r = self.client.auth.token.renew_self()
        ttl = float(r["auth"]["lease_duration"] or 0)
        self.token_expires = time.time() + ttl if ttl else None
        self.renewals += 1
        self._renewable = bool(ttl and r["auth"].get("renewable", True))
        return ttl or None

    async def renew(self) -> float | None:
        """Renew the token; when that fails, log in again (AppRole, Kubernetes, token_file).
        Returns the new TTL (None: no expiry). Raises SecretUnavailable when neither works."""
        try:
            return await asyncio.to_thread(self._renew_sync)
        except (hvac_errors.VaultError, requests.RequestException) as e:
            log.warning("Vault token renewal failed: %s", _describe(e))
            if self.opts.auth == "token" and self.opts.token_file is None:
                raise SecretUnavailable(f"token renewal failed: {_describe(e)}") from None
        return await self._login()

    async def _token_loop(self) -> None:
        failed = False
        while True:
            if self._logged_in() and self.token_expires is None and not failed:
                return  # a token that never expires: nothing to keep up
            if failed or not self._logged_in() or self.token_expires is None:
                delay = self.retry_interval
            else:
                delay = renew_delay(self.token_expires - time.time())
            await asyncio.sleep(max(delay, 0.05))
            try:
                if self._logged_in() and self._renewable:
                    await self.renew()
                else:
                    await self._login()
            except SecretError as e:
                failed = True
                self._mark_down(str(e))
                log.warning("Vault token upkeep failed, retrying in %.1fs: %s", self.retry_interval, e)
            else:
                failed = False

    def _logged_in(self) -> bool:
        return bool(self.client.token)

    # ------------------------------------------------------------------ reads
    def _read_sync(self, path: str) -> dict[str, Any]:
        o = self.opts
        if o.kv_version == 2:
            r = self.client.secrets.kv.v2.read_secret_version(path=path, mount_point=o.mount,
                                                              raise_on_deleted_version=True)
            data = r["data"]["data"]
        else:
            r = self.client.secrets.kv.v1.read_secret(path=path, mount_point=o.mount)
            data = r["data"]
        if not isinstance(data, dict):
            raise hvac_errors.InvalidPath("no data")
        return data

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking hvac call; a 403 with AppRole/Kubernetes logs in again and retries once.
        Maps hvac's errors to ours."""
        for attempt in (1, 2):
            try:
                return await asyncio.to_thread(fn, *args)
            except hvac_errors.InvalidPath:
                raise SecretNotFound("not found") from None
            except hvac_errors.Forbidden as e:
                relogin = self.opts.auth in ("approle", "kubernetes") or self.opts.token_file is not None
                if attempt == 1 and relogin:
                    await self._login()
                    continue
                raise SecretUnavailable(_describe(e)) from None
            except _UNAVAILABLE as e:
                raise SecretUnavailable(_describe(e)) from None
            except hvac_errors.VaultError as e:
                raise SecretUnavailable(_describe(e)) from None
        raise AssertionError("unreachable")

    async def _fetch(self, path: str) -> dict[str, Any]:
        try:
            return await self._call(self._read_sync, path)
        except SecretNotFound:
            raise SecretNotFound(f"{self.name}: {self.opts.mount}/{path} not found") from None

    async def issue_certificate(self, *, role: str, common_name: str, ttl: float, mount: str = "pki") -> dict[str, Any]:
        """A fresh certificate from the PKI engine (`<mount>/issue/<role>`): certificate,
        private_key, issuing_ca, ca_chain, serial_number, expiration."""
        def issue() -> dict[str, Any]:
            r = self.client.secrets.pki.generate_certificate(
                name=role, common_name=common_name, extra_params={"ttl": f"{int(ttl)}s"}, mount_point=mount)
            return r["data"]
        try:
            data = await self._call(issue)
        except SecretNotFound:
            raise SecretNotFound(f"{self.name}: {mount}/issue/{role} not found") from None
        self._mark_up()
        return data
