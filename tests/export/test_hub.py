"""proxytap.export.hub: when a flow is classified, what subscribers see, and in what order.

The hub is driven directly, as the relay drives it (``opened`` / ``data`` /
``closed``, synchronously); subscribers are recorders. Tests without a
running loop have no ``classify_timeout`` timer, so only bytes and the close
decide there; the timer tests run on the loop with a short timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxytap.export.hub import DOWN, UP, Hub
from proxytap.flows.table import CloseReason, Flow, FlowTable
from proxytap.proto.classify import Classifier
from tests.conftest import wait_until

REQUEST = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
NOISE = b"\x00\x01binary nobody knows"


class Sub:
    """Records every call as a tuple; ``fail`` names the calls that raise."""

    def __init__(self, name: str = "sub", fail: tuple[str, ...] = (), udp: bool = True) -> None:
        self.name = name
        self.fail = fail
        self.events: list[tuple[Any, ...]] = []
        if udp:
            self.datagram = self._datagram

    def _check(self, what: str) -> None:
        if what in self.fail:
            raise RuntimeError(f"{self.name} fails in {what}")

    def flow_created(self, flow: Flow, now: float) -> None:
        self.events.append(("created", flow.id, flow.l7, now))
        self._check("created")

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        self.events.append(("data", flow.id, direction, data, now))
        self._check("data")

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        self.events.append(("destroyed", flow.id, reason, now))
        self._check("destroyed")

    def _datagram(
        self, src: tuple[str, int], dst: tuple[str, int], data: bytes, now: float, *, hop: int = 0
    ) -> None:
        self.events.append(("datagram", src, dst, data, now, hop))
        self._check("datagram")

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


def make_flow(table: FlowTable, server_port: int = 8080) -> Flow:
    conn = table.open_connection(("192.0.2.1", 50000), ("127.0.0.1", 3128), "http", 1.0)
    return table.open_flow(conn, ("198.51.100.1", server_port), "example.com", server_port, 1.0)


def setup(**kw: Any) -> tuple[Hub, Sub, Flow]:
    hub = Hub(Classifier(), **kw)
    sub = Sub()
    hub.subscribe(sub)
    flow = make_flow(FlowTable())
    hub.opened(flow)
    return hub, sub, flow


# -- when the decision is made -----------------------------------------------------------


def test_classified_once_both_directions_have_data_then_replayed_in_order() -> None:
    hub, sub, flow = setup()
    hub.data(flow, UP, REQUEST[:10], 10.0)
    hub.data(flow, UP, REQUEST[10:], 11.0)
    assert sub.events == []  # one direction, under the limit: not yet
    hub.data(flow, DOWN, RESPONSE, 12.0)
    assert flow.l7 == "http"
    assert (
        sub.events
        == [
            ("created", flow.id, "http", 12.0),
            ("data", flow.id, UP, REQUEST[:10], 10.0),  # arrival order, arrival times
            ("data", flow.id, UP, REQUEST[10:], 11.0),
            ("data", flow.id, DOWN, RESPONSE, 12.0),
        ]
    )
    hub.data(flow, UP, b"more", 13.0)  # from now on: straight through
    hub.closed(flow, CloseReason.NORMAL, 14.0)
    assert sub.events[-2:] == [
        ("data", flow.id, UP, b"more", 13.0),
        ("destroyed", flow.id, CloseReason.NORMAL, 14.0),
    ]
    assert hub.classified == {"http": 1}


def test_both_directions_unmatched_go_to_default_at_once() -> None:
    hub, sub, flow = setup()
    hub.data(flow, DOWN, NOISE, 1.0)
    hub.data(flow, UP, NOISE, 2.0)
    assert flow.l7 == "default"
    assert sub.kinds() == ["created", "data", "data"]
    assert [e[2] for e in sub.events[1:]] == [DOWN, UP]


def test_one_direction_reaching_the_limit_decides() -> None:
    hub, sub, flow = setup(classify_limit=16)
    hub.data(flow, UP, NOISE[:10], 1.0)
    assert sub.events == []
    hub.data(flow, UP, b"x" * 10, 2.0)  # 20 bytes >= 16: decided on what is there
    assert flow.l7 == "default"
    assert sub.kinds() == ["created", "data", "data"]
    # the whole chunks are replayed, not the classifier's truncated copy
    assert [e[3] for e in sub.events[1:]] == [NOISE[:10], b"x" * 10]


def test_the_close_decides_a_flow_the_bytes_did_not() -> None:
    hub, sub, flow = setup()
    hub.data(flow, UP, REQUEST, 1.0)  # a request, never an answer
    hub.closed(flow, CloseReason.RESET, 2.0)
    assert flow.l7 == "http_client"  # the request-only rule, on the final decision
    assert sub.events == [
        ("created", flow.id, "http_client", 2.0),
        ("data", flow.id, UP, REQUEST, 1.0),
        ("destroyed", flow.id, CloseReason.RESET, 2.0),
    ]


def test_a_flow_without_bytes_is_created_and_destroyed_at_close() -> None:
    hub, sub, flow = setup()
    hub.closed(flow, CloseReason.TIMEOUT, 3.0)
    assert sub.events == [
        ("created", flow.id, "default", 3.0),
        ("destroyed", flow.id, CloseReason.TIMEOUT, 3.0),
    ]
    assert flow.tap is None


def test_nothing_after_close() -> None:
    hub, sub, flow = setup()
    hub.closed(flow, CloseReason.NORMAL, 1.0)
    count = len(sub.events)
    hub.data(flow, UP, b"late", 2.0)
    hub.closed(flow, CloseReason.NORMAL, 3.0)  # a second close: no second DESTROYED
    assert len(sub.events) == count


def test_a_flow_never_opened_is_ignored() -> None:
    hub = Hub(Classifier())
    sub = Sub()
    hub.subscribe(sub)
    flow = make_flow(FlowTable())
    hub.data(flow, UP, b"x", 1.0)
    hub.closed(flow, CloseReason.NORMAL, 2.0)
    assert sub.events == []


async def test_classify_timeout_decides_a_quiet_flow_while_it_is_live() -> None:
    hub, sub, flow = setup(classify_timeout=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    hub.data(flow, UP, NOISE, 1.0)
    await wait_until(lambda: sub.events, what="CREATED by the classify timeout")
    assert loop.time() - start >= 0.04
    assert flow.l7 == "default" and hub.timed_out == 1
    assert sub.kinds() == ["created", "data"]
    assert flow.tap is not None  # still live: DESTROYED comes with the close
    hub.closed(flow, CloseReason.NORMAL, 2.0)
    assert sub.kinds() == ["created", "data", "destroyed"]


async def test_classify_timeout_runs_one_timer_over_flows_in_opening_order() -> None:
    hub = Hub(Classifier(), classify_timeout=0.05)
    sub = Sub()
    hub.subscribe(sub)
    table = FlowTable()
    decided_by_bytes, closed_early, quiet = make_flow(table), make_flow(table), make_flow(table)
    for flow in (decided_by_bytes, closed_early, quiet):
        hub.opened(flow)
    hub.data(decided_by_bytes, UP, NOISE, 1.0)
    hub.data(decided_by_bytes, DOWN, NOISE, 1.0)
    hub.closed(closed_early, CloseReason.RESET, 1.0)
    await wait_until(lambda: quiet.l7 is not None, what="the quiet flow classified")
    assert hub.timed_out == 1  # only the one the timer decided
    created = [e[1] for e in sub.events if e[0] == "created"]
    assert created == [decided_by_bytes.id, closed_early.id, quiet.id]
    assert hub._timer is None  # nothing left to wait for


async def test_rearm_restarts_the_classify_timeout_of_a_flow_without_bytes() -> None:
    """An intercepted flow's bytes start after two TLS handshakes: timed from the first."""
    hub = Hub(Classifier(), classify_timeout=0.2)
    sub = Sub()
    hub.subscribe(sub)
    flow = make_flow(FlowTable())
    hub.opened(flow)
    await asyncio.sleep(0.15)
    hub.rearm(flow)
    hub.data(flow, UP, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1.0)
    await asyncio.sleep(0.1)  # past the first deadline, not the rearmed one
    assert flow.l7 is None and hub.timed_out == 0
    hub.data(flow, DOWN, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1.0)
    assert flow.l7 == "http"  # on its bytes, both ways
    hub.rearm(flow)  # a classified flow: nothing changes
    assert flow.l7 == "http" and sub.kinds() == ["created", "data", "data"]


# -- subscribers -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["created", "data", "destroyed"])
def test_a_failing_subscriber_is_contained_and_counted(where: str) -> None:
    hub = Hub(Classifier())
    bad, good = Sub("bad", fail=(where,)), Sub("good")
    hub.subscribe(bad)
    hub.subscribe(good)
    flow = make_flow(FlowTable())
    hub.opened(flow)
    hub.data(flow, UP, NOISE, 1.0)
    hub.data(flow, DOWN, NOISE, 2.0)
    hub.data(flow, UP, b"after", 3.0)
    hub.closed(flow, CloseReason.NORMAL, 4.0)
    assert good.kinds() == ["created", "data", "data", "data", "destroyed"]
    # a failure while replaying skips the rest of that replay, for that subscriber only;
    # each failing call counts once
    expected = {"created": 1, "data": 2, "destroyed": 1}[where]
    assert hub.subscriber_errors == expected


def test_subscribe_and_unsubscribe() -> None:
    hub, sub, flow = setup()
    late = Sub("late")
    hub.subscribe(late)
    hub.data(flow, UP, NOISE, 1.0)
    hub.data(flow, DOWN, NOISE, 2.0)
    assert late.kinds() == sub.kinds() == ["created", "data", "data"]
    hub.unsubscribe(late)
    hub.unsubscribe(late)  # not subscribed any more: no error
    hub.data(flow, UP, b"x", 3.0)
    assert len(late.events) == 3 and len(sub.events) == 4


def test_datagrams_fan_out_to_the_sinks_that_take_them() -> None:
    hub = Hub(Classifier())
    udp, tcp_only, broken = Sub("udp"), Sub("tcp", udp=False), Sub("broken", fail=("datagram",))
    for sub in (udp, broken, tcp_only):
        hub.subscribe(sub)
    src, dst = ("192.0.2.1", 5353), ("198.51.100.1", 53)
    hub.datagram(src, dst, b"query", 1.0)
    hub.datagram(dst, src, b"answer", 2.0, hop=1)
    assert udp.events == [
        ("datagram", src, dst, b"query", 1.0, 0),
        ("datagram", dst, src, b"answer", 2.0, 1),
    ]
    assert tcp_only.events == []
    assert len(broken.events) == 2 and hub.subscriber_errors == 2
