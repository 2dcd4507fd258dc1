"""The export hub: where the relay's tap lands and analyzers' sinks subscribe.

The relay calls ``opened`` / ``data`` / ``closed`` synchronously on the hot
path; nothing here blocks or awaits. The hub classifies each TCP flow once
(SF-TAP's rules, on the first bytes of each direction), then hands subscribers
``flow_created`` (``flow.l7`` set, carrying the flow's start time), the DATA
seen so far in arrival order, and from then on every chunk as it comes, and
finally one ``flow_destroyed``. Subscribers own their buffering and drop
policy: the hub never waits for them, and an exception in one is logged,
counted and does not reach the relay or the other subscribers.

When the decision is made (spec section 3, as the original abstractor does
it): as soon as both directions have data, on what has arrived so far, an
unmatched flow going to ``default`` at once; when one direction reaches
``classify_limit`` bytes; and, so that a quiet or one-sided flow of an
unknown protocol reaches analyzers while it is live, ``classify_timeout``
seconds after the flow opened, on whatever it has (one timer for all flows,
a queue of deadlines in opening order); at the latest when it closes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
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

    __slots__ = ("down", "events", "up")

    def __init__(self) -> None:
        self.up = bytearray()
        self.down = bytearray()
        self.events: list[tuple[int, bytes, float]] = []


_CLASSIFIED = object()


class Hub:
    def __init__(
        self,
        classifier: Classifier,
        *,
        classify_limit: int = 4096,
        classify_timeout: float = 0.5,
    ) -> None:
        self.classifier = classifier
        self.limit = classify_limit
        self.timeout = classify_timeout
        self._deadlines: collections.deque[tuple[float, Flow, _Pending]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self.timed_out = 0  # flows decided by classify_timeout
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
        state = _Pending()
        flow.tap = state
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (pure tests): decided by bytes or close only
            return
        deadline = loop.time() + self.timeout
        self._deadlines.append((deadline, flow, state))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire, loop)

    def rearm(self, flow: Flow) -> None:
        """Restart the ``classify_timeout`` of a flow that has no bytes yet.

        For a flow whose bytes start well after it opened: an intercepted
        tunnel's decrypted bytes come after two TLS handshakes, and judging it
        on nothing would put it on ``default`` (or on half an exchange).
        """
        state = flow.tap
        if isinstance(state, _Pending) and not state.events:
            self.opened(flow)  # a new state: the old deadline no longer matches it

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Decide the flows whose ``classify_timeout`` has passed (on what they have)."""
        self._timer = None
        now = loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, flow, state = deadlines.popleft()
            if flow.tap is state:
                self.timed_out += 1
                self._classify(flow, state, True, time.time())
        if deadlines:
            self._timer = loop.call_at(deadlines[0][0], self._expire, loop)

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
        up, down = state.up, state.down
        final = (up and down) or len(up) >= limit or len(down) >= limit
        self._classify(flow, state, bool(final), now)

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

    def udp_opened(self, flow: Flow, payload: bytes) -> None:
        """A UDP inner flow (a SOCKS5 association's client and one destination) begins.

        Classified at once, on its ports and first datagram (SF-TAP's UDP
        rules), and announced to no one: UDP has no CREATED. Its datagrams go
        through ``datagram``; ``closed`` then hands subscribers its
        ``flow_destroyed``, which sinks that export events ignore for a flow
        they never saw created (no DESTROYED for UDP either) and the flow log
        records.
        """
        rule = self.classifier.udp((flow.client[1], flow.server[1]), payload)
        flow.l7 = rule.name
        flow.tap = _CLASSIFIED
        self.classified[rule.name] = self.classified.get(rule.name, 0) + 1

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
        if not final:
            return  # one direction only, under the limit: the rules need both (or time)
        rule = self.classifier.tcp(
            bytes(state.up), bytes(state.down), (flow.client[1], flow.server[1]), final
        )
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
