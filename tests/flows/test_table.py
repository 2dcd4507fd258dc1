"""proxytap.flows.table: ids, uids, per-client counts, open and close, the export hold."""

from __future__ import annotations

import re

import pytest

from proxytap.flows.table import (
    CloseReason,
    Connection,
    Flow,
    FlowTable,
    State,
    endpoint,
    new_uid,
)

CLIENT = ("192.0.2.1", 50000)
LOCAL = ("127.0.0.1", 3128)
SERVER = ("198.51.100.7", 443)


class RecordingValve:
    """A relay stand-in: records every hold / release it is asked for."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def export_hold(self, held: bool) -> None:
        self.calls.append(held)


def open_flow(table: FlowTable, conn: Connection | None = None) -> Flow:
    conn = conn or table.open_connection(CLIENT, LOCAL, "http", 1.0)
    return table.open_flow(conn, SERVER, "example.com", 443, 2.0)


def test_ids_are_unique_and_increasing_across_connections_and_flows() -> None:
    table = FlowTable()
    conn = table.open_connection(CLIENT, LOCAL, "http", 1.0)
    flow = table.open_flow(conn, SERVER, "example.com", 443, 2.0)
    other = table.open_connection(("192.0.2.2", 1), LOCAL, "socks", 3.0)
    assert [conn.id, flow.id, other.id] == [1, 2, 3]
    assert table.connections == {1: conn, 3: other}
    assert table.flows == {2: flow}
    assert FlowTable().open_connection(CLIENT, LOCAL, "http", 0.0).id == 1  # per table


def test_uids() -> None:
    table = FlowTable()
    conn = table.open_connection(CLIENT, LOCAL, "http", 1.0)
    flow = table.open_flow(conn, SERVER, "example.com", 443, 2.0)
    assert re.fullmatch(r"C[0-9a-f]{16}", conn.uid)
    assert re.fullmatch(r"F[0-9a-f]{16}", flow.uid)
    assert len({new_uid("X") for _ in range(1000)}) == 1000


def test_a_flow_carries_its_true_endpoints_and_its_outer_connection() -> None:
    table = FlowTable()
    conn = table.open_connection(CLIENT, LOCAL, "mixed", 1.0)
    conn.protocol, conn.user = "socks5", "alice"
    flow = table.open_flow(conn, SERVER, "Example.com", 443, 2.0, l4="udp")
    assert (flow.client, flow.server) == (CLIENT, SERVER)
    assert (flow.requested_host, flow.requested_port, flow.start, flow.l4) == (
        "Example.com",
        443,
        2.0,
        "udp",
    )
    assert (flow.tunnel, flow.user, flow.outer) == ("socks5", "alice", conn)
    assert (flow.state, flow.reason, flow.end) == (State.OPEN, None, None)
    assert conn.flows == 1
    table.open_flow(conn, SERVER, "example.com", 443, 3.0)
    assert conn.flows == 2


def test_per_client_counts() -> None:
    table = FlowTable()
    a1 = table.open_connection(("192.0.2.1", 1), LOCAL, "http", 0.0)
    a2 = table.open_connection(("192.0.2.1", 2), LOCAL, "http", 0.0)
    b = table.open_connection(("192.0.2.2", 1), LOCAL, "http", 0.0)
    assert table.per_client == {"192.0.2.1": 2, "192.0.2.2": 1}
    table.close_connection(a1)
    assert table.per_client == {"192.0.2.1": 1, "192.0.2.2": 1}
    table.close_connection(a2)
    table.close_connection(b)
    assert table.per_client == {}  # no zero entries left behind
    assert table.connections == {}


def test_close_connection_is_idempotent() -> None:
    table = FlowTable()
    conn = table.open_connection(CLIENT, LOCAL, "http", 0.0)
    other = table.open_connection(CLIENT, LOCAL, "http", 0.0)
    table.close_connection(conn)
    table.close_connection(conn)  # a second close must not take the other's count
    assert table.per_client == {CLIENT[0]: 1}
    assert table.connections == {other.id: other}


def test_close_flow() -> None:
    table = FlowTable()
    flow = open_flow(table)
    kept = open_flow(table)
    assert len(table) == 2 and list(table) == [flow, kept]
    table.close_flow(flow, CloseReason.RESET, 5.0)
    assert (flow.state, flow.reason, flow.end) == (State.CLOSED, CloseReason.RESET, 5.0)
    assert len(table) == 1 and list(table) == [kept]
    table.close_flow(flow, CloseReason.RESET, 5.0)  # closing again leaves the table alone
    assert list(table) == [kept]


def test_iterating_is_safe_while_flows_close() -> None:
    table = FlowTable()
    flows = [open_flow(table) for _ in range(3)]
    for flow in table:  # a snapshot: closing inside the loop is allowed
        table.close_flow(flow, CloseReason.SHUTDOWN, 9.0)
    assert len(table) == 0
    assert all(f.reason is CloseReason.SHUTDOWN for f in flows)


def test_hold_and_release_with_a_valve() -> None:
    flow = open_flow(FlowTable())
    valve = RecordingValve()
    flow.valve = valve
    a, b = object(), object()
    flow.hold(a)
    flow.hold(b)
    flow.hold(a)  # the same holder twice: still one hold
    assert valve.calls == [True]  # paused once, on the first holder
    flow.release(a)
    assert valve.calls == [True]  # b still holds
    flow.release(object())  # never held: ignored
    flow.release(b)
    assert valve.calls == [True, False]  # resumed once, when the last holder lets go
    assert flow.holders is None
    flow.release(b)  # again: nothing
    assert valve.calls == [True, False]


def test_hold_without_a_valve_is_remembered() -> None:
    """A flow held before its relay started: the relay reads ``holders`` when it starts."""
    flow = open_flow(FlowTable())
    holder = object()
    flow.hold(holder)
    assert flow.holders == {holder}
    valve = RecordingValve()
    flow.valve = valve
    flow.release(holder)
    assert valve.calls == [False] and flow.holders is None


@pytest.mark.parametrize(
    ("sockaddr", "expected"),
    [
        (("127.0.0.1", 80), ("127.0.0.1", 80)),
        (("::ffff:192.0.2.1", 81, 0, 0), ("192.0.2.1", 81)),  # dual-stack listener
        (("2001:DB8::1", 82, 0, 0), ("2001:db8::1", 82)),
        (("fe80::1%lo", 83, 0, 1), ("fe80::1", 83)),
    ],
)
def test_endpoint(sockaddr: tuple[object, ...], expected: tuple[str, int]) -> None:
    assert endpoint(sockaddr) == expected
