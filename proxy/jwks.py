"""An identity provider's JWKS, fetched with aiohttp and cached.

The keys live for the response's Cache-Control max-age (else a default TTL). A token naming an
unknown kid triggers a refetch, at most once per `refetch_interval` (the whole JWKS is refetched,
so a rotated key is picked up without a restart). When a fetch fails, the keys already held keep
verifying (stale but used) and the next attempt waits the same interval: an identity provider that
is down costs one failed fetch per interval, not one per request.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable

import aiohttp
import orjson

from .tokens import KeySet, parse_jwks

__all__ = ["JwksCache", "JwksUnavailable", "cache_ttl"]

log = logging.getLogger(__name__)

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.I)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:,|$)", re.I)


class JwksUnavailable(Exception):
    """No JWKS has ever been fetched successfully, so no key is known."""


def cache_ttl(cache_control: str | None, default: float, *, floor: float, ceiling: float = 86400.0) -> float:
    """Seconds to keep a JWKS: max-age when given, else `default`; no-store/no-cache mean `floor`.
    Clamped to [floor, ceiling] so a provider cannot make us fetch on every request. Pure."""
    ttl = default
    if cache_control:
        if _NO_CACHE.search(cache_control):
            ttl = floor
        else:
            m = _MAX_AGE.search(cache_control)
            if m:
                ttl = float(m.group(1))
    return min(max(ttl, floor), ceiling)


class JwksCache:
    """The current KeySet from `url`. `session()` returns the aiohttp.ClientSession to use (the
    loader's shared one). `on_fetch(result)` is told "ok" or "error" after each attempt."""

    def __init__(self, url: str, *, session: Callable[[], aiohttp.ClientSession], allowed: frozenset[str],
                 default_ttl: float = 600.0, refetch_interval: float = 30.0, timeout: float = 5.0,
                 max_bytes: int = 1 << 20, clock: Callable[[], float] = time.monotonic,
                 on_fetch: Callable[[str], None] | None = None) -> None:
        self.url = url
        self._session = session
        self._allowed = allowed
        self._default_ttl = default_ttl
        self._interval = refetch_interval
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._clock = clock
        self._on_fetch = on_fetch
        self._keys: KeySet | None = None
        self._expires = 0.0
        self._next_attempt = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def keys(self) -> KeySet | None:
        """The keys held now (None before the first successful fetch)."""
        return self._keys

    @property
    def stale(self) -> bool:
        return self._keys is not None and self._clock() >= self._expires

    async def keys_for(self, kid: str | None) -> KeySet:
        """The keys to verify a token naming `kid`: refreshed first when expired, or when `kid`
        is unknown (rate-limited). Raises JwksUnavailable if no JWKS was ever fetched."""
        keys = self._keys
        if keys is None or self._clock() >= self._expires or (kid is not None and kid not in keys.by_kid):
            await self.refresh(kid)
        if self._keys is None:
            raise JwksUnavailable(self.url)
        return self._keys

    async def refresh(self, kid: str | None = None) -> None:
        """Fetch now unless another caller just did, or the rate limit says wait."""
        async with self._lock:
            now = self._clock()
            keys = self._keys
            if keys is not None and now < self._expires and (kid is None or kid in keys.by_kid):
                return  # refreshed by whoever held the lock before us
            if now < self._next_attempt:
                return
            # without any key yet, retry sooner: a provider blip at start should not last 30 s
            self._next_attempt = now + (self._interval if keys is not None else min(self._interval, 5.0))
            try:
                doc, cache_control = await self._fetch()
                new, skipped = parse_jwks(doc, self._allowed)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                log.warning("JWKS fetch from %s failed (%s: %s); %s", self.url, type(e).__name__, e,
                            "keeping the cached keys" if keys is not None else "no keys yet")
                self._count("error")
                return
            for why in skipped:
                log.warning("JWKS %s: skipped %s", self.url, why)
            self._keys = new
            self._expires = self._clock() + cache_ttl(cache_control, self._default_ttl, floor=self._interval)
            self._count("ok")
            log.info("JWKS fetched from %s: %d keys", self.url, len(new))

    async def _fetch(self) -> tuple[Any, str | None]:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with self._session().get(self.url, timeout=timeout, allow_redirects=False,
                                       headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > self._max_bytes:
                    raise ValueError(f"JWKS larger than {self._max_bytes} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
            try:
                return orjson.loads(body), resp.headers.get("Cache-Control")
            except orjson.JSONDecodeError:
                raise ValueError("JWKS is not JSON") from None

    def _count(self, result: str) -> None:
        if self._on_fetch is not None:
            self._on_fetch(result)
