"""One JSON line per request, written in batches off the hot path."""
from __future__ import annotations

import asyncio
import sys
from typing import IO, Any

import orjson

__all__ = ["AccessLog"]


class AccessLog:
    """Buffers lines and flushes them every `interval` seconds or every 64 KiB.
    target: "-" (stdout), "off", or a file path (appended)."""

    def __init__(self, target: str, interval: float = 0.2) -> None:
        self.enabled = target not in ("off", "none", "")
        self._own = False
        self._out: IO[bytes] | None = None
        if self.enabled:
            if target == "-":
                self._out = sys.stdout.buffer
            else:
                self._out = open(target, "ab")
                self._own = True
        self._buf: list[bytes] = []
        self._size = 0
        self._interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flusher(), name="access-log")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        self._buf.append(line)
        self._size += len(line)
        if self._size >= 65536:
            self.flush()

    def flush(self) -> None:
        if self._buf and self._out is not None:
            data = b"".join(self._buf)
            self._buf = []
            self._size = 0
            try:
                self._out.write(data)
                self._out.flush()
            except (OSError, ValueError):
                pass

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.flush()
        if self._own and self._out is not None:
            self._out.close()
