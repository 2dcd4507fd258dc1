"""The process log: one stream (stderr), written once per event-loop iteration.

logging's ``StreamHandler`` writes and flushes every record, and a record costs
a ``LogRecord``, a formatter and a lock. A proxy logging one access line per
request pays that per request: measured here it was a tenth of the CPU of a
16-byte tunnel and one system call of every six on a keep-alive request. So:

* ``LineWriter`` queues finished lines and writes them in one ``write`` when
  the event loop comes round again (``call_soon``), or at once when no loop
  runs in the calling thread, when a WARNING or worse is logged (order is kept:
  it goes after what is queued), or when 64 KiB are queued.
* ``BufferedHandler`` is the root handler that feeds it, with the text or JSON
  formatter the operator chose.
* ``access`` writes the access lines (one per finished tunnel or plain-HTTP
  request) on the ``proxytap.access`` logger. Once ``install`` has set up the
  stream, an access line is formatted straight into the writer, byte for byte
  what the handler would have produced, without a ``LogRecord``. Without
  ``install`` (embedding, tests) it is ordinary logging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import TextIO

ACCESS = "proxytap.access"
FLUSH_AT = 64 << 10  # queued characters written at once
_JSON_MIDDLE = f'"level": "info", "logger": "{ACCESS}"'


class LineWriter:
    """Lines for one text stream, batched per event-loop iteration."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._size = 0
        self._scheduled = False
        self._lock = threading.Lock()

    def write(self, line: str, *, urgent: bool = False) -> None:
        """Queue ``line`` (without its newline)."""
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            if urgent or self._size >= FLUSH_AT:
                self._write_locked()
                return
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: write now
                self._write_locked()
                return
            self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        self._scheduled = False
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._size = 0
        lines.append("")
        try:
            self.stream.write("\n".join(lines))
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing to tell anyone
            pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc with a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class BufferedHandler(logging.Handler):
    """The root handler: formats each record and queues it on a ``LineWriter``."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.writer.write(line, urgent=record.levelno >= logging.WARNING)

    def flush(self) -> None:
        self.writer.flush()


class AccessLog:
    """Access lines at INFO on ``proxytap.access``, the fast way once installed."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS)
        self._writer: LineWriter | None = None
        self._json = False
        self._second = -1
        self._stamp = ""

    def install(self, writer: LineWriter | None, *, json_format: bool = False) -> None:
        """Format straight into ``writer`` (None: back to plain logging)."""
        self._writer = writer
        self._json = json_format
        self._second = -1

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def __call__(self, fmt: str, *args: object) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        writer = self._writer
        if writer is None:
            logger.info(fmt, *args)
            return
        now = time.time()
        msg = fmt % args
        if self._json:
            writer.write(f'{{"ts": {now!r}, {_JSON_MIDDLE}, "msg": {json.dumps(msg)}}}')
            return
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        ms = int((now - second) * 1000)
        writer.write(f"{self._stamp},{ms:03d} INFO {ACCESS}: {msg}")


access = AccessLog()


def install(stream: TextIO, level: str, fmt: str) -> LineWriter:
    """Route all logging to ``stream`` through one ``LineWriter``; return it."""
    writer = LineWriter(stream)
    handler = BufferedHandler(writer)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access.install(writer, json_format=fmt == "json")
    return writer


__all__ = [
    "ACCESS",
    "AccessLog",
    "BufferedHandler",
    "JsonFormatter",
    "LineWriter",
    "access",
    "install",
]
