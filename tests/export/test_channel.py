"""The whole-message channel on its own: real AF_UNIX socket pairs, a recording valve.

What the served sockets and loopback7 rely on (proxytap.export.channel): every
message sent whole in one call, a bounded queue, ``drop`` never holding a flow,
``wait`` holding and releasing flows as the consumer falls behind and catches
up, giving up after ``max_wait``, and a consumer that leaves releasing all.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxytap.export.channel import MIN_SNDBUF, Channel
from proxytap.flows.table import Flow, FlowTable
from tests.export.sftap_helpers import make_flow, wait_for

BODY = bytes(range(256)) * 128  # 32 KiB


class Valve:
    """Records what the export asked of the flow's relay."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def export_hold(self, held: bool) -> None:
        self.calls.append(held)


def flow_with_valve(table: FlowTable, port: int) -> tuple[Flow, Valve]:
    flow = make_flow(table, client=("10.0.0.1", port))
    valve = Valve()
    flow.valve = valve
    return flow, valve


def pair(**kw: object) -> tuple[Channel, socket.socket, list[str | None]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    closed: list[str | None] = []
    options: dict[str, object] = {"limit": 256 << 10, "headroom": 64 << 10, "sndbuf": MIN_SNDBUF}
    options.update(kw)
    ch = Channel(ours, name="test", on_closed=lambda _c, why: closed.append(why), **options)  # type: ignore[arg-type]
    theirs.setblocking(False)
    return ch, theirs, closed


def message(i: int) -> tuple[bytes, bytes]:
    head = b"%08d|%05d\n" % (i, len(BODY))
    return head, BODY


SIZE = len(message(0)[0]) + len(BODY)  # every message's size, header and body


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


async def drain(sock: socket.socket, ch: Channel, within: float = 5.0) -> bytes:
    """Read until the channel has nothing queued and the socket nothing unread."""
    got = bytearray()

    def done() -> bool:
        got.extend(read_all(sock))
        return not ch.queued and not ch.in_kernel()

    await wait_for(done, within)
    return bytes(got)


def check_framing(stream: bytes, count: int) -> list[int]:
    """Every message whole and in order; the sequence numbers seen."""
    seen = []
    pos = 0
    while pos < len(stream):
        nl = stream.index(b"\n", pos)
        seq, length = (int(x) for x in stream[pos:nl].split(b"|"))
        assert stream[nl + 1 : nl + 1 + length] == BODY
        seen.append(seq)
        pos = nl + 1 + length
    assert len(seen) <= count
    return seen


async def test_drop_queues_then_drops_whole_and_never_holds() -> None:
    ch, peer, _ = pair()
    flow, valve = flow_with_valve(FlowTable(), 1)
    sent = [ch.data(flow, message(i), SIZE) for i in range(40)]
    assert sent[0] and not all(sent)  # 40 x 32 KiB > kernel buffer + queue: some dropped
    assert ch.drops["buffer_full"] == sent.count(False)
    assert ch.dropped_bytes["buffer_full"] == sent.count(False) * len(BODY)
    assert ch.queued <= (256 << 10) + len(BODY) + 64  # the limit plus one message
    assert valve.calls == [] and flow.holders is None
    stream = await drain(peer, ch)
    seen = check_framing(stream, 40)
    assert seen == [i for i, ok in enumerate(sent) if ok]  # what was kept, whole and in order
    assert ch.partial_sends == 0


async def test_wait_holds_the_flow_until_the_consumer_catches_up() -> None:
    ch, peer, _ = pair(overload="wait", max_wait=30.0)
    flow, valve = flow_with_valve(FlowTable(), 2)
    i = 0
    while flow.holders is None and i < 200:  # the relay would stop reading at the first hold
        assert ch.data(flow, message(i), SIZE)
        i += 1
    assert valve.calls == [True] and ch.waiting
    assert "buffer_full" not in ch.drops
    stream = await drain(peer, ch)
    assert check_framing(stream, i) == list(range(i))  # nothing lost
    assert valve.calls == [True, False] and flow.holders is None and not ch.waiting
    assert ch.wait_seconds > 0 and ch.wait_timeouts == 0


async def test_wait_gives_up_after_max_wait_then_drops_until_caught_up() -> None:
    ch, peer, _ = pair(overload="wait", max_wait=0.2)
    flow, valve = flow_with_valve(FlowTable(), 3)
    i = 0
    while flow.holders is None and i < 200:
        ch.data(flow, message(i), SIZE)
        i += 1
    await wait_for(lambda: valve.calls == [True, False], 3)  # released by max_wait
    # max_wait is a loop timer (whole milliseconds on uvloop); the wait is on the monotonic clock
    assert ch.wait_timeouts == 1 and ch.lapsed and ch.wait_seconds >= 0.2 - 0.005
    # while behind past max_wait: dropped and counted, not held again
    while ch.queued < 2 * (256 << 10) and ch.data(flow, message(i), SIZE):
        i += 1
    assert not ch.data(flow, message(i), SIZE)
    assert ch.drops["max_wait"] >= 1 and valve.calls == [True, False]
    await drain(peer, ch)  # caught up: waiting again next time
    assert not ch.lapsed


async def test_a_consumer_that_leaves_releases_every_flow() -> None:
    ch, peer, closed = pair(overload="wait", max_wait=30.0)
    table = FlowTable()
    flows = [flow_with_valve(table, 10 + n) for n in range(3)]
    for i in range(60):
        flow, _ = flows[i % 3]
        ch.data(flow, message(i), SIZE)
    assert all(f.holders for f, _ in flows)
    peer.close()
    await wait_for(lambda: ch.closed, 3)
    assert closed and all(f.holders is None for f, _ in flows)
    assert all(v.calls == [True, False] for _, v in flows)
    assert not ch.data(flows[0][0], message(0), SIZE)


@pytest.mark.parametrize("overload", ["drop", "wait"])
async def test_control_messages_past_the_headroom_disconnect(overload: str) -> None:
    ch, peer, closed = pair(overload=overload, max_wait=30.0, headroom=4096)
    flow, _ = flow_with_valve(FlowTable(), 20)
    while ch.queued < 256 << 10:
        ch.data(flow, message(0), SIZE)
    n = 0
    while ch.control(b"x" * 100 + b"\n") and n < 1000:
        n += 1
    assert ch.closed and closed == ["overflow"] and ch.drops["overflow"] == 1
    assert flow.holders is None  # nothing stays held by a consumer that is gone
    peer.close()
    await asyncio.sleep(0)
