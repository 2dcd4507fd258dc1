"""proxytap.front.upstream: address order, Happy Eyeballs, deadlines, the address check.

``open_upstream`` takes its resolver and its connection attempt as arguments,
so the attempts here are scripted: each address succeeds, fails or hangs on
cue, and the script records when each attempt started, how it ended and what
was discarded. Delays are real loop time, kept small; every assertion on time
has the lower bound the code promises and a generous upper one.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from proxytap.errors import Failure, UpstreamError
from proxytap.front.upstream import (
    AddrInfo,
    SockAddr,
    SocketConnector,
    interleave,
    literal_address,
    open_upstream,
)
from tests.conftest import closed_port, wait_until

V4 = socket.AF_INET
V6 = socket.AF_INET6


def v4(n: int) -> AddrInfo:
    return (V4, (f"192.0.2.{n}", 80))


def v6(n: int) -> AddrInfo:
    return (V6, (f"2001:db8::{n}", 80, 0, 0))


# -- interleave (RFC 8305 section 4) ---------------------------------------------------


@pytest.mark.parametrize(
    ("addrs", "prefer", "expected"),
    [
        ([], "any", []),
        ([v6(1), v6(2), v4(1), v4(2)], "any", [v6(1), v4(1), v6(2), v4(2)]),
        ([v4(1), v6(1), v6(2)], "any", [v4(1), v6(1), v6(2)]),  # resolver's first family leads
        ([v6(1), v6(2), v4(1), v4(2)], "ipv4", [v4(1), v6(1), v4(2), v6(2)]),
        ([v4(1), v4(2), v6(1)], "ipv6", [v6(1), v4(1), v4(2)]),
        ([v4(1), v4(2), v4(3)], "ipv6", [v4(1), v4(2), v4(3)]),  # preferred family absent
        ([v4(1), v6(1), v6(2), v6(3), v4(2)], "any", [v4(1), v6(1), v4(2), v6(2), v6(3)]),
    ],
)
def test_interleave(addrs: list[AddrInfo], prefer: str, expected: list[AddrInfo]) -> None:
    assert interleave(addrs, prefer) == expected


def test_literal_address() -> None:
    assert literal_address("127.0.0.1", 1) == [(V4, ("127.0.0.1", 1))]
    assert literal_address("2001:DB8::0:1", 2) == [(V6, ("2001:db8::1", 2, 0, 0))]
    assert literal_address("example.org", 3) is None


# -- a scripted resolver and connector ---------------------------------------------------


class Resolver:
    def __init__(self, addrs: list[AddrInfo] | None = None, error: BaseException | None = None):
        self.addrs = addrs or []
        self.error = error
        self.hang = False
        self.calls: list[tuple[str, int]] = []

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        self.calls.append((host, port))
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        return self.addrs


@dataclass
class Cue:
    """What one address does: succeed or fail after ``after`` seconds (or on ``gate``),
    or hang (``outcome`` "hang") until cancelled."""

    outcome: str  # "ok", "fail", "hang"
    after: float = 0.0
    error: int = errno.ECONNREFUSED
    gate: asyncio.Event | None = None


@dataclass
class Script:
    cues: dict[str, Cue]
    started: dict[str, float] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)

    async def attempt(self, family: int, sockaddr: SockAddr) -> str:
        host = sockaddr[0]
        self.order.append(host)
        self.started[host] = asyncio.get_running_loop().time()
        cue = self.cues[host]
        try:
            if cue.gate is not None:
                await cue.gate.wait()
            if cue.outcome == "hang":
                await asyncio.Event().wait()
            await asyncio.sleep(cue.after)  # the scripted connect time, not a synchronisation
        except asyncio.CancelledError:
            self.cancelled.append(host)
            raise
        if cue.outcome == "fail":
            raise OSError(cue.error, errno.errorcode[cue.error])
        return host

    def discard(self, result: str) -> None:
        self.discarded.append(result)


async def connect(
    script: Script,
    addrs: list[AddrInfo],
    *,
    delay: float = 0.25,
    timeout: float = 5.0,
    prefer: str = "any",
    check: Callable[[AddrInfo], tuple[Failure, str] | None] | None = None,
) -> str:
    return await open_upstream(
        "example.org",
        80,
        resolver=Resolver(addrs),
        attempt=script.attempt,
        discard=script.discard,
        timeout=timeout,
        delay=delay,
        prefer=prefer,
        check=check,
    )


# -- Happy Eyeballs ----------------------------------------------------------------------


async def test_an_ip_literal_is_not_resolved() -> None:
    script = Script({"127.0.0.1": Cue("ok")})
    resolver = Resolver(error=AssertionError("resolved a literal"))
    got = await open_upstream(
        "127.0.0.1",
        8,
        resolver=resolver,
        attempt=script.attempt,
        discard=script.discard,
        timeout=5,
    )
    assert got == "127.0.0.1"
    assert resolver.calls == []


async def test_the_next_attempt_starts_after_the_delay() -> None:
    """The first address hangs: the second starts ``delay`` later, wins, the first is
    cancelled and nothing is discarded (a cancelled attempt produced nothing)."""
    script = Script({"2001:db8::1": Cue("hang"), "192.0.2.1": Cue("ok")})
    got = await connect(script, [v6(1), v4(1)], delay=0.05)
    assert got == "192.0.2.1"
    assert script.order == ["2001:db8::1", "192.0.2.1"]
    gap = script.started["192.0.2.1"] - script.started["2001:db8::1"]
    assert 0.04 <= gap < 2.0
    assert script.cancelled == ["2001:db8::1"]
    assert script.discarded == []


async def test_attempts_overlap_and_the_first_to_connect_wins() -> None:
    """The first attempt is still running when the second starts (staggered, not serial),
    and the first one's success does not wait for the second."""
    script = Script({"2001:db8::1": Cue("ok", after=0.15), "192.0.2.1": Cue("hang")})
    got = await connect(script, [v6(1), v4(1)], delay=0.03)
    assert got == "2001:db8::1"
    assert script.order == ["2001:db8::1", "192.0.2.1"]  # B started while A was connecting
    assert script.cancelled == ["192.0.2.1"]


async def test_a_failure_starts_the_next_attempt_at_once() -> None:
    script = Script({"2001:db8::1": Cue("fail"), "192.0.2.1": Cue("ok")})
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = await connect(script, [v6(1), v4(1)], delay=30.0, timeout=60.0)
    assert got == "192.0.2.1"
    assert loop.time() - start < 5.0  # not the 30 s attempt delay
    assert script.cancelled == [] and script.discarded == []


async def test_order_follows_interleave_and_prefer() -> None:
    addrs = [v6(1), v6(2), v4(1), v4(2)]
    cues = {a[1][0]: Cue("fail") for a in addrs}
    script = Script(dict(cues))
    with pytest.raises(UpstreamError):
        await connect(script, addrs, delay=0.01)
    assert script.order == ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"]
    script = Script(dict(cues))
    with pytest.raises(UpstreamError):
        await connect(script, addrs, delay=0.01, prefer="ipv4")
    assert script.order == ["192.0.2.1", "2001:db8::1", "192.0.2.2", "2001:db8::2"]


async def test_first_success_wins_and_a_later_one_is_discarded() -> None:
    """Two attempts that complete in the same turn of the loop: one is returned, the
    other's connection is handed to ``discard`` (never leaked, never returned)."""
    gate = asyncio.Event()
    script = Script({"2001:db8::1": Cue("ok", gate=gate), "192.0.2.1": Cue("ok", gate=gate)})
    task = asyncio.ensure_future(connect(script, [v6(1), v4(1)], delay=0.01))
    await wait_until(lambda: len(script.order) == 2, what="both attempts wait on the gate")
    gate.set()
    got = await task
    assert sorted([got, *script.discarded]) == ["192.0.2.1", "2001:db8::1"]
    assert script.cancelled == []


async def test_a_winner_cancels_the_attempts_still_running() -> None:
    script = Script(
        {"2001:db8::1": Cue("hang"), "192.0.2.1": Cue("hang"), "2001:db8::2": Cue("ok")}
    )
    got = await connect(script, [v6(1), v4(1), v6(2)], delay=0.01)
    assert got == "2001:db8::2"
    assert sorted(script.cancelled) == ["192.0.2.1", "2001:db8::1"]
    assert script.discarded == []


@pytest.mark.parametrize(
    ("errors", "failure"),
    [
        ((errno.ECONNREFUSED, errno.ENETUNREACH), Failure.REFUSED),
        ((errno.EHOSTUNREACH, errno.ECONNREFUSED), Failure.HOST_UNREACHABLE),
        ((errno.ENETUNREACH, errno.EHOSTUNREACH), Failure.NET_UNREACHABLE),
    ],
)
async def test_all_fail_reports_the_first_failure(
    errors: tuple[int, int], failure: Failure
) -> None:
    script = Script(
        {
            "2001:db8::1": Cue("fail", error=errors[0]),
            "192.0.2.1": Cue("fail", after=0.02, error=errors[1]),
        }
    )
    with pytest.raises(UpstreamError) as info:
        await connect(script, [v6(1), v4(1)], delay=0.01)
    assert info.value.failure is failure
    assert script.order == ["2001:db8::1", "192.0.2.1"]


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (errno.ECONNREFUSED, Failure.REFUSED),
        (errno.EHOSTUNREACH, Failure.HOST_UNREACHABLE),
        (errno.EACCES, Failure.PROHIBITED),
    ],
)
async def test_one_address_failing(error: int, failure: Failure) -> None:
    script = Script({"192.0.2.1": Cue("fail", error=error)})
    with pytest.raises(UpstreamError) as info:
        await connect(script, [v4(1)])
    assert info.value.failure is failure


async def test_connect_timeout_cancels_every_attempt() -> None:
    script = Script({"2001:db8::1": Cue("hang"), "192.0.2.1": Cue("hang")})
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(UpstreamError) as info:
        await connect(script, [v6(1), v4(1)], delay=0.01, timeout=0.1)
    assert info.value.failure is Failure.TIMEOUT
    assert 0.09 <= loop.time() - start < 3.0
    assert sorted(script.cancelled) == ["192.0.2.1", "2001:db8::1"]


async def test_one_address_timeout() -> None:
    script = Script({"192.0.2.1": Cue("hang")})
    with pytest.raises(UpstreamError) as info:
        await connect(script, [v4(1)], timeout=0.05)
    assert info.value.failure is Failure.TIMEOUT
    assert script.cancelled == ["192.0.2.1"]


# -- resolving ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolver", "failure"),
    [
        (Resolver(error=socket.gaierror(socket.EAI_NONAME, "no such name")), Failure.DNS_ERROR),
        (Resolver(error=socket.gaierror(socket.EAI_AGAIN, "try again")), Failure.DNS_TIMEOUT),
        (Resolver(error=UnicodeError("label too long")), Failure.DNS_ERROR),
        (Resolver([]), Failure.DNS_ERROR),
    ],
)
async def test_resolver_failures(resolver: Resolver, failure: Failure) -> None:
    script = Script({})
    with pytest.raises(UpstreamError) as info:
        await open_upstream(
            "example.org",
            80,
            resolver=resolver,
            attempt=script.attempt,
            discard=script.discard,
            timeout=5,
        )
    assert info.value.failure is failure
    assert script.order == []


async def test_resolver_timeout_is_a_dns_timeout() -> None:
    resolver = Resolver()
    resolver.hang = True
    script = Script({})
    with pytest.raises(UpstreamError) as info:
        await open_upstream(
            "example.org",
            80,
            resolver=resolver,
            attempt=script.attempt,
            discard=script.discard,
            timeout=0.05,
        )
    assert info.value.failure is Failure.DNS_TIMEOUT
    assert resolver.calls == [("example.org", 80)] and script.order == []


# -- the address check -------------------------------------------------------------------


async def test_check_removes_addresses_before_any_attempt() -> None:
    seen: list[AddrInfo] = []

    def no_v6(addr: AddrInfo) -> tuple[Failure, str] | None:
        seen.append(addr)
        return (Failure.PROHIBITED, "no v6") if addr[0] == V6 else None

    script = Script({"192.0.2.1": Cue("fail"), "192.0.2.2": Cue("ok")})
    got = await connect(script, [v6(1), v4(1), v6(2), v4(2)], delay=0.01, check=no_v6)
    assert got == "192.0.2.2"
    assert seen == [v6(1), v4(1), v6(2), v4(2)]  # every resolved address judged, in order
    assert script.order == ["192.0.2.1", "192.0.2.2"]  # vetoed ones never contacted


async def test_check_denying_every_address_reports_the_first_veto() -> None:
    verdicts = {
        "2001:db8::1": (Failure.PROHIBITED, "private"),
        "192.0.2.1": (Failure.DENIED, "acl"),
    }
    script = Script({})
    with pytest.raises(UpstreamError) as info:
        await connect(script, [v6(1), v4(1)], check=lambda a: verdicts[str(a[1][0])])
    assert info.value.failure is Failure.PROHIBITED
    assert script.order == []


# -- the real connector on loopback ------------------------------------------------------


async def test_socket_connector_falls_back_past_a_refused_address() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    refused = closed_port()
    connector = SocketConnector()
    closed: list[socket.socket] = []

    def discard(sock: socket.socket) -> None:
        closed.append(sock)
        sock.close()

    resolver = Resolver([(V4, ("127.0.0.1", refused)), (V4, ("127.0.0.1", port))])
    try:
        sock = await open_upstream(
            "localhost",
            port,
            resolver=resolver,
            attempt=connector.connect,
            discard=discard,
            timeout=5,
            delay=1.0,
        )
        try:
            assert sock.getpeername() == ("127.0.0.1", port)
            assert closed == []
        finally:
            sock.close()
        with pytest.raises(UpstreamError) as info:
            await open_upstream(
                "127.0.0.1",
                refused,
                resolver=resolver,
                attempt=connector.connect,
                discard=discard,
                timeout=5,
            )
        assert info.value.failure is Failure.REFUSED
    finally:
        listener.close()
