"""The one interface of an export sink, and the stats record every sink reports.

A sink subscribes to the hub (``flow_created`` / ``flow_data`` /
``flow_destroyed``, and ``datagram`` for UDP), has a lifecycle (``start``,
``stop``, ``reopen`` after log rotation), and describes itself with
``stats()``: one ``SinkStats`` that metrics and the admin API read without
knowing what kind of sink it is. Sinks never block the hub: each owns its
buffering and its overload policy.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxytap.flows.table import CloseReason, Endpoint, Flow


@dataclass
class SinkStats:
    """One sink's numbers in one shape (what ``/metrics`` and ``/subscribers`` show).

    ``drops`` and ``dropped_bytes`` list every reason the sink can report
    (at 0 when nothing was dropped), so rates and alerts work from the start.
    """

    name: str
    kind: str  # "sftap", "loopback7", "flowlog"
    connected: int  # consumers connected: readers, 1/0 for a link or an open file
    buffered: int  # bytes waiting in proxytap for consumers
    flows: int  # flows currently exported
    events: dict[str, int]  # events written, by type
    bytes_sent: int
    drops: dict[str, int]  # events dropped, by reason
    dropped_bytes: dict[str, int]  # payload bytes of dropped events, by reason
    wait_seconds: float = 0.0  # overload "wait": time flows were held for consumers
    partial_sends: int = 0  # messages the kernel took only part of (should stay 0)
    sndbuf: int = 0  # the kernel send buffer of a consumer socket (0: not a socket sink)
    link: dict[str, Any] | None = None  # a connecting sink: link_up, reconnects, failures
    detail: dict[str, Any] = field(default_factory=dict)  # kind-specific, for /subscribers


def event_counts(sent: int, created: int, destroyed: int) -> dict[str, int]:
    """SF-TAP events by type, from all sent and the CREATED and DESTROYED among them."""
    return {"created": created, "data": sent - created - destroyed, "destroyed": destroyed}


def known(reasons: tuple[str, ...], seen: dict[str, int]) -> dict[str, int]:
    """``seen`` with every reason of ``reasons`` present (0 when never seen)."""
    out = dict.fromkeys(reasons, 0)
    out.update(seen)
    return out


class Sink(abc.ABC):
    """What every export sink implements."""

    name: str

    async def start(self) -> None:  # noqa: B027 - a sink may have nothing to open
        """Open files, sockets or connections (may return before a peer is there)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Flush briefly, then close everything."""

    def reopen(self) -> None:  # noqa: B027 - most sinks have nothing to reopen
        """SIGHUP: reopen files (after logrotate); a no-op for socket sinks."""

    @abc.abstractmethod
    def flow_created(self, flow: Flow, now: float) -> None: ...

    @abc.abstractmethod
    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None: ...

    @abc.abstractmethod
    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None: ...

    def datagram(  # noqa: B027 - a sink without UDP export ignores datagrams
        self, src: Endpoint, dst: Endpoint, data: bytes, now: float, *, hop: int = 0
    ) -> None:
        """One UDP datagram (DATA only, never CREATED/DESTROYED)."""

    @abc.abstractmethod
    def stats(self) -> SinkStats: ...


__all__ = ["Sink", "SinkStats", "event_counts", "known"]
