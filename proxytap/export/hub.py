"""The export hub: where the relay's tap lands and analyzers' sinks subscribe.

The relay calls ``opened`` / ``data`` / ``closed`` synchronously on the hot
path; nothing here blocks or awaits. The hub classifies each TCP flow once
(SF-TAP's rules, on the first bytes of each direction), then hands subscribers
``flow_created`` (``flow.l7`` set, carrying the flow's start time), the DATA
seen so far in arrival order, and from then on every chunk as it comes, and
finally one ``flow_destroyed``. Subscribers own their buffering and drop
policy: the hub never waits for them, and an exception in one is logged,
counted and does not reach the relay or the other subscribers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from proxytap.flows.table import DOWN, UP, CloseReason, Endpoint, Flow

if TYPE_CHECKING:
    from proxytap.proto.classify import Classifier

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    """What a sink implements. ``direction`` is ``UP`` (client to server) or ``DOWN``."""

    name: str

    def flow_created(self, flow: Flow, now: float) -> None: ...

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None: ...

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None: ...


class _Pending:
    """Per-flow state until the flow is classified."""

    __slots__ = ("down", "events", "tried", "up")

    def __init__(self) -> None:
        self.up = bytearray()
        self.down = bytearray()
        self.events: list[tuple[int, bytes, float]] = []
        self.tried = (-1, -1)  # (len(up), len(down)) the rules last failed on


_CLASSIFIED = object()


class Hub:
    def __init__(self, classifier: Classifier, *, classify_limit: int = 4096) -> None:
        self.classifier = classifier
        self.limit = classify_limit
        self.subscribers: list[Subscriber] = []
        self.subscriber_errors = 0
        self.classified: dict[str, int] = {}  # L7 class -> flows, for metrics

    def subscribe(self, sub: Subscriber) -> None:
        self.subscribers.append(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    # -- the tap, called by the relay --------------------------------------------

    def opened(self, flow: Flow) -> None:
        flow.tap = _Pending()

    def data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        state = flow.tap
        if state is _CLASSIFIED:
            for sub in self.subscribers:
                try:
                    sub.flow_data(flow, direction, data, now)
                except Exception:
                    self._failed(sub)
            return
        if not isinstance(state, _Pending):
            return  # closed already, or never opened
        state.events.append((direction, data, now))
        limit = self.limit
        side = state.up if direction == UP else state.down
        if len(side) < limit:
            side += data[: limit - len(side)]
        final = len(state.up) >= limit or len(state.down) >= limit
        self._classify(flow, state, final, now)

    def closed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        state = flow.tap
        if isinstance(state, _Pending):
            self._classify(flow, state, True, now)
        if flow.tap is not _CLASSIFIED:
            return
        flow.tap = None
        for sub in self.subscribers:
            try:
                sub.flow_destroyed(flow, reason, now)
            except Exception:
                self._failed(sub)

    def datagram(
        self, src: Endpoint, dst: Endpoint, data: bytes, now: float, *, hop: int = 0
    ) -> None:
        """One UDP datagram (SOCKS5 UDP ASSOCIATE): DATA only, no CREATED/DESTROYED.

        ``src`` sent it to ``dst``; sinks that export UDP implement ``datagram``.
        """
        for sub in self.subscribers:
            send = getattr(sub, "datagram", None)
            if send is None:
                continue
            try:
                send(src, dst, data, now, hop=hop)
            except Exception:
                self._failed(sub)

    # -----------------------------------------------------------------------------

    def _classify(self, flow: Flow, state: _Pending, final: bool, now: float) -> None:
        seen = (len(state.up), len(state.down))
        classifier = self.classifier
        if seen == state.tried:  # the same bytes the rules just failed on: only the default
            rule = classifier.tcp_default if final else None
        else:
            rule = classifier.tcp(
                bytes(state.up), bytes(state.down), (flow.client[1], flow.server[1]), final
            )
            if rule is None and state.up and state.down:
                state.tried = seen
        if rule is None:
            return
        flow.l7 = rule.name
        flow.tap = _CLASSIFIED
        self.classified[rule.name] = self.classified.get(rule.name, 0) + 1
        for sub in self.subscribers:
            try:
                sub.flow_created(flow, now)
                for direction, data, t in state.events:
                    sub.flow_data(flow, direction, data, t)
            except Exception:
                self._failed(sub)

    def _failed(self, sub: Subscriber) -> None:
        self.subscriber_errors += 1
        log.exception("export subscriber %s failed; the proxied traffic is unaffected", sub.name)


__all__ = ["DOWN", "UP", "Hub", "Subscriber"]
