#!/usr/bin/env python3
"""Drain every SF-TAP flow socket under HOME as fast as possible (benchmark reader).

Connects to every UNIX stream socket in ``HOME/tcp/`` and ``HOME/udp/``, reads
and discards, and counts bytes per socket. Sockets that appear later, or that
the server disconnected (proxytap drops a reader whose buffer overflows), are
(re)connected on the next scan. Prints ``READY <n>`` on stdout once it is
connected to every socket found, and a JSON line with its counters when it
gets SIGTERM or SIGINT, or after ``--max-secs`` (so it never runs unbounded).

usage: sftap_drain.py HOME [--stats FILE] [--ready-timeout 30] [--max-secs 7200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBDIRS = ("tcp", "udp")
RECV_BUF = 1 << 20


@dataclass
class Conn:
    path: str
    ino: int
    sock: socket.socket


@dataclass
class Stats:
    bytes: int = 0
    connects: int = 0
    eofs: int = 0
    connect_errors: int = 0
    per_socket: dict[str, int] = field(default_factory=dict)


def list_sockets(home: Path) -> dict[str, int]:
    """path -> inode of every UNIX socket directly under home/tcp and home/udp."""
    found: dict[str, int] = {}
    for sub in SUBDIRS:
        try:
            entries = list(os.scandir(home / sub))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                found[f"{sub}/{e.name}"] = st.st_ino
    return found


class Drain:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.sel = selectors.DefaultSelector()
        self.conns: dict[str, Conn] = {}
        self.stats = Stats()
        self.buf = bytearray(RECV_BUF)

    def scan(self) -> tuple[int, int]:
        """Connect to sockets not connected yet; (connected, present)."""
        present = list_sockets(self.home)
        for name, ino in present.items():
            c = self.conns.get(name)
            if c is not None and c.ino == ino:
                continue
            if c is not None:  # replaced by a new server socket
                self.close(name)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.settimeout(1.0)
                s.connect(str(self.home / name))
            except OSError:
                s.close()
                self.stats.connect_errors += 1
                continue
            s.setblocking(False)
            self.conns[name] = Conn(name, ino, s)
            self.sel.register(s, selectors.EVENT_READ, name)
            self.stats.connects += 1
            self.stats.per_socket.setdefault(name, 0)
        return sum(1 for n in present if n in self.conns), len(present)

    def close(self, name: str) -> None:
        c = self.conns.pop(name)
        self.sel.unregister(c.sock)
        c.sock.close()

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            name = key.data
            c = self.conns.get(name)
            if c is None:
                continue
            got = 0
            for _ in range(64):  # drain what is queued, but let other sockets have a turn
                try:
                    n = c.sock.recv_into(self.buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    n = 0
                if n == 0:
                    self.stats.eofs += 1
                    self.close(name)
                    break
                got += n
            self.stats.bytes += got
            self.stats.per_socket[name] += got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("home", type=Path)
    ap.add_argument("--stats", help="also write the final JSON counters to this file")
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    ap.add_argument("--max-secs", type=float, default=7200.0)
    ap.add_argument("--rescan", type=float, default=0.5, help="seconds between socket scans")
    a = ap.parse_args()

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    d = Drain(a.home)
    t0 = time.monotonic()
    ready = False
    while not stop and time.monotonic() - t0 < a.ready_timeout:
        connected, present = d.scan()
        if present and connected == present:
            ready = True
            break
        time.sleep(0.1)
    if ready:
        print(f"READY {len(d.conns)}", flush=True)
    else:
        print(f"NOT READY: no flow sockets under {a.home}/{{tcp,udp}}", flush=True)
    next_scan = time.monotonic() + a.rescan
    while ready and not stop and time.monotonic() - t0 < a.max_secs:
        d.pump(a.rescan)
        now = time.monotonic()
        if now >= next_scan:
            d.scan()
            next_scan = now + a.rescan

    ru = resource.getrusage(resource.RUSAGE_SELF)
    s = d.stats
    out = dict(
        ready=ready,
        sockets=len(s.per_socket),
        bytes=s.bytes,
        connects=s.connects,
        eofs=s.eofs,
        connect_errors=s.connect_errors,
        cpu_s=round(ru.ru_utime + ru.ru_stime, 3),
        secs=round(time.monotonic() - t0, 1),
        per_socket={k: v for k, v in sorted(s.per_socket.items()) if v},
    )
    line = json.dumps(out)
    print(line, flush=True)
    if a.stats:
        Path(a.stats).write_text(line + "\n")
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
