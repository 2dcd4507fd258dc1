"""The life cycle of a sink that writes from a task of its own (the flow log, pcap files).

The hub's calls only append to ``_pending`` and set ``_wake``; the sink's
``_run`` task takes what is pending and writes it (files may block, so the
write itself runs off the loop where it can), marking ``_idle`` while it has
nothing in hand. This class holds what both file sinks share around that:
starting the task, ``stop`` (write what is buffered, then close), ``reopen``
(SIGHUP: the next write goes to a freshly opened file) and ``flush`` (wait
until what was handed over is written or counted as lost).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sized


class WriterTask:
    """Mixin: the writer task's events and the lifecycle calls built on them."""

    name: str
    _pending: Sized

    def _init_writer(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._reopen = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def _start_writer(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-writer")

    async def _run(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Write what is buffered, then close the file."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close()

    def reopen(self) -> None:
        """SIGHUP: the next write goes to a freshly opened file (after logrotate)."""
        self._reopen = True
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything handed over so far is written (or counted as lost)."""
        while self._pending or not self._idle.is_set():
            self._wake.set()
            await asyncio.sleep(0.005)


__all__ = ["WriterTask"]
