"""Tunnel bytes through modules: relay sides that filter before they write and tap.

Only used when a module of the listener defines ``client_to_server`` or
``server_to_client``; every other tunnel keeps the plain ``_Side`` (one write
and one tap per chunk, nothing else). The tap records what the proxy sent,
after the modules: the same rule as the plain-HTTP forwarder's (UP is what
the destination got). A module exception closes the tunnel (fail closed);
the chain has logged and counted it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxytap.errors import ProtocolError
from proxytap.flows.table import UP, CloseReason
from proxytap.front.relay import Relay, _Side
from proxytap.modules.api import Context
from proxytap.modules.chain import Chain


class FilterSide(_Side):
    """A relay direction whose bytes pass the chain's hooks of that direction first."""

    __slots__ = ("ctx", "filter")

    def __init__(
        self,
        relay: Relay,
        direction: int,
        rx: asyncio.Transport,
        tx: asyncio.Transport,
        chain: Chain,
        ctx: Context,
    ) -> None:
        super().__init__(relay, direction, rx, tx)
        self.ctx = ctx
        self.filter = chain.client_to_server if direction == UP else chain.server_to_client

    def data_received(self, data: bytes) -> None:
        if self.relay.closed:
            return
        try:
            data = self.filter(self.ctx, data)
        except ProtocolError:  # logged and counted by the chain
            self.relay.finish(CloseReason.ERROR)
            return
        if data:
            super().data_received(data)


def filtering_sides(
    chain: Chain, ctx: Context
) -> Callable[[Relay, int, asyncio.Transport, asyncio.Transport], _Side]:
    """The ``sides`` factory for ``Relay.start``: both directions filtered."""

    def make(relay: Relay, direction: int, rx: asyncio.Transport, tx: asyncio.Transport) -> _Side:
        return FilterSide(relay, direction, rx, tx, chain, ctx)

    return make
