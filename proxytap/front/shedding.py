"""Staying up under load: the open-file budget, and log lines rate-limited per window.

A proxy that runs out of file descriptors fails in the middle of things: an
upstream connect, a flow-log rotation, an accept. So proxytap refuses a new
client connection while it can still do so cleanly (accept, close, count),
before the descriptors its open connections may still need are gone.

The budget is a model, read at no cost on every accept: descriptors open when
the listeners were bound (``base``), two per client connection (itself and
the upstream connection it will open), more for a plain-HTTP connection that
holds several upstream connections (the flow table counts them), and the
connections still lingering after a final error answer. ``reserve`` is kept
free for everything the model does not count: flow-socket readers, admin
requests, the flow log, resolver sockets, a second Happy Eyeballs attempt.
Counting ``/proc/self/fd`` instead would be exact, but it costs about 20 ms
at 15,000 descriptors: far too much per accept.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass

log = logging.getLogger("proxytap")

PER_CONNECTION = 2  # descriptors a client connection is budgeted: itself and its upstream


def open_file_limit() -> tuple[int, int]:
    """RLIMIT_NOFILE (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one (what most servers do at start-up).

    Returns (before, after). The soft limit is only a default for programs
    that use select(); proxytap's loops use epoll. An infinite hard limit is
    left alone (Linux refuses an infinite RLIMIT_NOFILE).
    """
    soft, hard = open_file_limit()
    if soft == hard or hard == resource.RLIM_INFINITY:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft, soft
    return soft, hard


def open_fds() -> int:
    """Descriptors open in this process now (Linux: /proc/self/fd; elsewhere a guess)."""
    try:
        # the listing's own descriptor is in it
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return 16


@dataclass
class FdBudget:
    """How many client connections the open-file limit allows, and the check on accept."""

    limit: int  # RLIMIT_NOFILE soft
    base: int  # descriptors open before any client connection (listeners, sinks, admin)
    reserve: int  # kept free for what the model does not count

    @classmethod
    def measure(cls, reserve: int) -> FdBudget:
        """The limit and the descriptors open now; ``reserve`` at most a quarter of the rest
        (under a low limit a full reserve would leave next to nothing for connections)."""
        limit, base = open_file_limit()[0], open_fds()
        return cls(limit, base, max(0, min(reserve, (limit - base) // 4)))

    @property
    def capacity(self) -> int:
        """Client connections (tunnels) that fit: two descriptors each."""
        return max(0, (self.limit - self.base - self.reserve) // PER_CONNECTION)

    def full(self, connections: int, flows: int, lingering: int) -> bool:
        """True when one more client connection would eat into the reserve.

        ``connections``: open client connections, the new one included;
        ``flows``: open upstream connections; ``lingering``: closed client
        connections still draining after a final answer.
        """
        upstreams = max(connections, flows)  # each client connection may still open one
        return self.base + connections + upstreams + lingering + self.reserve > self.limit


class LogWindow:
    """Counts events and says when to log them: at most once per ``window`` seconds."""

    __slots__ = ("count", "logged_at", "window")

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.count = 0  # events since the last line
        self.logged_at = -window

    def hit(self) -> int:
        """Count one event; the number to report when a line is due now, else 0."""
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at < self.window:
            return 0
        self.logged_at = now
        n, self.count = self.count, 0
        return n


__all__ = [
    "PER_CONNECTION",
    "FdBudget",
    "LogWindow",
    "open_fds",
    "open_file_limit",
    "raise_open_file_limit",
]
