"""The JSON flow log: one Zeek ``conn.log``-style object per line when an inner flow ends.

A hub subscriber. ``flow_destroyed`` formats the record and appends it to an
in-memory buffer; a background task hands whatever has accumulated to a worker
thread that writes it, so the event loop never waits for the disk. The buffer
is bounded (``buffer_limit`` bytes): past it, records are dropped and counted
(``buffer_full``). A failed write loses its batch, is counted
(``write_error``) and logged once per failure streak; nothing is ever raised
into the hub.

Fields (Zeek names where Zeek has one):

``ts`` flow start (epoch seconds), ``uid`` the inner flow's uid, ``id.orig_h`` /
``id.orig_p`` the true client, ``id.resp_h`` / ``id.resp_p`` the address the
proxy actually connected to (the resolved address), ``proto``, ``service`` (the
L7 class), ``duration``, ``orig_bytes`` / ``resp_bytes`` (payload client to
server / server to client), ``tunnel_parents`` (the outer connection's uid,
as Zeek links a tunnelled connection to its tunnel), and proxytap's own:
``outer_uid`` (same uid, for joins), ``tunnel`` (http-connect, http-forward,
socks4, socks4a, socks5), ``listener``, ``proxy_h`` / ``proxy_p`` (the
listener address the client connected to), ``requested_host`` /
``requested_port`` (what the client asked for, before resolution), ``sni``,
``alpn``, ``ja3`` / ``ja4`` (the client's TLS fingerprints, from its
ClientHello; ``null`` when the flow carried none), ``http_host``, ``user``,
``close_reason`` (normal, reset, timeout, error), ``decrypted``,
``orig_chunks`` / ``resp_chunks``, and for a flow sent through an upstream
proxy (chaining): ``upstream_proxy`` (its ``[[upstream.proxies]]`` name),
``upstream_proxy_h`` / ``upstream_proxy_p`` (its address proxytap connected
to), ``upstream_bound_h`` / ``upstream_bound_p`` (the BND address a SOCKS
upstream reported: its own end toward the destination; ``null`` over HTTP)
and ``upstream_resolved`` (true: the upstream resolved ``requested_host``
itself, so ``id.resp_h`` is ``0.0.0.0``); all ``null`` for a direct flow.

Rotation: ``reopen()`` (SIGHUP, after logrotate moved the file) closes and
reopens the path; with ``max_bytes`` the log rotates itself to ``PATH.1`` ..
``PATH.<backups>`` before a write would take it past ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING, BinaryIO

from proxytap.export.sink import Sink, SinkStats, known
from proxytap.export.writer import WriterTask
from proxytap.flows.table import CloseReason, Flow

if TYPE_CHECKING:
    from proxytap.config import LogConfig

log = logging.getLogger(__name__)

FILE_MODE = 0o640
WRITE_ERROR = "write_error"
BUFFER_FULL = "buffer_full"


def flow_record(flow: Flow, reason: CloseReason, now: float) -> dict[str, object]:
    """The log record of a finished inner flow (a plain dict, JSON-ready)."""
    outer = flow.outer
    via = flow.via
    bound = via.bound if via is not None else None
    return {
        "ts": round(flow.start, 6),
        "uid": flow.uid,
        "id.orig_h": flow.client[0],
        "id.orig_p": flow.client[1],
        "id.resp_h": flow.server[0],
        "id.resp_p": flow.server[1],
        "proto": flow.l4,
        "service": flow.l7,
        "duration": round(max(0.0, now - flow.start), 6),
        "orig_bytes": flow.bytes_up,
        "resp_bytes": flow.bytes_down,
        "orig_chunks": flow.chunks_up,
        "resp_chunks": flow.chunks_down,
        "tunnel_parents": [outer.uid],
        "outer_uid": outer.uid,
        "tunnel": outer.protocol,
        "listener": outer.listener,
        "proxy_h": outer.local[0],
        "proxy_p": outer.local[1],
        "requested_host": flow.requested_host,
        "requested_port": flow.requested_port,
        "upstream_proxy": via.proxy if via is not None else None,
        "upstream_proxy_h": via.address[0] if via is not None else None,
        "upstream_proxy_p": via.address[1] if via is not None else None,
        "upstream_bound_h": bound[0] if bound is not None else None,
        "upstream_bound_p": bound[1] if bound is not None else None,
        "upstream_resolved": via.by_name if via is not None else None,
        "sni": flow.sni,
        "alpn": flow.alpn,
        "ja3": flow.ja3,
        "ja4": flow.ja4,
        "http_host": flow.http_host,
        "user": outer.user,
        "close_reason": reason.value,
        "decrypted": flow.decrypted,
        "tls_version": flow.tls_version,
        "tls_cipher": flow.tls_cipher,
    }


class JsonFlowLog(WriterTask, Sink):
    """A hub subscriber appending one JSON line per finished flow to ``path``.

    Stats: ``records`` (lines written), ``bytes_written``, ``drops`` and
    ``dropped_bytes`` by reason, ``buffered`` (bytes waiting), ``reopens``,
    ``rotations``.
    """

    name: str

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "flowlog",
        max_bytes: int = 0,
        backups: int = 5,
        buffer_limit: int = 4 << 20,
    ) -> None:
        self.name = name
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.buffer_limit = buffer_limit
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._fh: BinaryIO | None = None
        self._size = 0
        self._init_writer()
        self._failing = False
        self.records = 0
        self.bytes_written = 0
        self.reopens = 0
        self.rotations = 0
        self.drops: dict[str, int] = {}
        self.dropped_bytes: dict[str, int] = {}
        self.last_error: str | None = None

    @classmethod
    def from_config(cls, cfg: LogConfig) -> JsonFlowLog:
        assert cfg.flows is not None
        return cls(
            cfg.flows,
            max_bytes=cfg.flows_max_bytes,
            backups=cfg.flows_backups,
            buffer_limit=cfg.flows_buffer,
        )

    # -- stats -------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes of records not yet written."""
        return self._pending_bytes

    @property
    def is_open(self) -> bool:
        return self._fh is not None

    def stats(self) -> SinkStats:
        reasons = (BUFFER_FULL, WRITE_ERROR)
        return SinkStats(
            name=self.name,
            kind="flowlog",
            connected=int(self.is_open),
            buffered=self.buffered,
            flows=0,
            events={"flow": self.records},
            bytes_sent=self.bytes_written,
            drops=known(reasons, self.drops),
            dropped_bytes=known(reasons, self.dropped_bytes),
            detail={
                "path": str(self.path),
                "reopens": self.reopens,
                "rotations": self.rotations,
                "last_error": self.last_error,
            },
        )

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the file (an unwritable path stops start-up) and start the writer."""
        self._open()
        self._start_writer()

    # -- the hub's calls -----------------------------------------------------------

    def flow_created(self, flow: Flow, now: float) -> None:
        pass

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        pass

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        line = json.dumps(flow_record(flow, reason, now), separators=(",", ":")).encode() + b"\n"
        if self._pending_bytes + len(line) > self.buffer_limit:
            self._drop(BUFFER_FULL, 1, len(line))
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        self._wake.set()

    # -- writing -----------------------------------------------------------------

    def _drop(self, reason: str, records: int, size: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + records
        self.dropped_bytes[reason] = self.dropped_bytes.get(reason, 0) + size

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            reopen, self._reopen = self._reopen, False
            batch = self._pending
            if not batch and not reopen:
                if self._stopping:
                    return
                continue
            self._pending = []
            self._pending_bytes = 0
            self._idle.clear()
            try:
                error = await asyncio.to_thread(self._write, batch, reopen)
            except Exception as exc:  # never let the writer die: count and go on
                error = repr(exc)
            finally:
                self._idle.set()
            if reopen:
                self.reopens += 1
            size = sum(len(b) for b in batch)
            if error is None:
                self.records += len(batch)
                self.bytes_written += size
                if self._failing:
                    log.info("flow log %s: writing again", self.path)
                self._failing = False
            else:
                if batch:
                    self._drop(WRITE_ERROR, len(batch), size)
                self.last_error = error
                if not self._failing:
                    log.error("flow log %s: %s; records are lost until it works", self.path, error)
                self._failing = True
            if self._stopping and not self._pending:
                return

    def _write(self, batch: list[bytes], reopen: bool) -> str | None:
        """In the worker thread: reopen or rotate if due, then write ``batch``."""
        try:
            if reopen or self._fh is None:
                self._close()
                self._open()
            data = b"".join(batch)
            if self.max_bytes and self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            fh = self._fh
            assert fh is not None
            fh.write(data)
            fh.flush()
            self._size += len(data)
        except (OSError, ValueError) as exc:
            self._close()
            return str(exc)
        return None

    def _open(self) -> None:
        # The records name users, client addresses and requested hosts: a file
        # proxytap creates is 0640 (owner and group), whatever the umask; an
        # existing one keeps the mode its owner gave it.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        else:
            os.fchmod(fd, FILE_MODE)
        fh = os.fdopen(fd, "ab")
        self._fh = fh
        self._size = os.fstat(fh.fileno()).st_size

    def _close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()

    def _rotate(self) -> None:
        """PATH -> PATH.1 -> ... -> PATH.<backups> (the oldest is removed)."""
        self._close()
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self.rotations += 1
        self._open()


__all__ = ["JsonFlowLog", "flow_record"]
