"""Connecting to the destination: resolve without blocking, Happy Eyeballs, a deadline.

The resolver and the connector are injected (tests replace them to make a
name fail to resolve or a connect never complete); the defaults use the event
loop's ``getaddrinfo`` and non-blocking ``sock_connect``. ``check`` is called
with every resolved address before anything is sent to it, so policy judges
the address really about to be connected (no DNS-rebinding bypass).
Failures come back as ``UpstreamError`` with a ``Failure``; the errno text
goes to the log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

from proxytap.errors import Failure, UpstreamError, classify_os_error

SockAddr = tuple[str, int] | tuple[str, int, int, int]
AddrInfo = tuple[int, SockAddr]  # (family, sockaddr)


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[AddrInfo]: ...


class Connector(Protocol):
    async def connect(self, family: int, sockaddr: SockAddr) -> socket.socket: ...


class SystemResolver:
    """The loop's ``getaddrinfo`` (a thread pool in asyncio, libuv's in uvloop)."""

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        out: list[AddrInfo] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                item: AddrInfo = (int(family), sockaddr)  # type: ignore[assignment]
                if item not in out:
                    out.append(item)
        return out


class SocketConnector:
    """A non-blocking TCP socket connected with ``loop.sock_connect``."""

    async def connect(self, family: int, sockaddr: SockAddr) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock


def literal_address(host: str, port: int) -> list[AddrInfo] | None:
    """Addresses for an IP literal host, or None when ``host`` is a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4:
        return [(socket.AF_INET, (str(ip), port))]
    return [(socket.AF_INET6, (str(ip), port, 0, 0))]


def interleave(addrs: Sequence[AddrInfo], prefer: str = "any") -> list[AddrInfo]:
    """RFC 8305 section 4: alternate address families, starting with the preferred one."""
    if not addrs:
        return []
    first: int = addrs[0][0]
    if prefer == "ipv4":
        first = socket.AF_INET
    elif prefer == "ipv6":
        first = socket.AF_INET6
    primary = [a for a in addrs if a[0] == first]
    secondary = [a for a in addrs if a[0] != first]
    out: list[AddrInfo] = []
    for i in range(max(len(primary), len(secondary))):
        if i < len(primary):
            out.append(primary[i])
        if i < len(secondary):
            out.append(secondary[i])
    return out


async def _happy_eyeballs(
    addrs: Sequence[AddrInfo], connector: Connector, delay: float
) -> socket.socket:
    """Start one attempt, then the next after ``delay`` or when one fails; first wins."""
    errors: list[BaseException] = []
    pending: set[asyncio.Task[socket.socket]] = set()
    winner: socket.socket | None = None
    queue = list(addrs)
    try:
        while (queue or pending) and winner is None:
            if queue:
                family, sockaddr = queue.pop(0)
                pending.add(asyncio.ensure_future(connector.connect(family, sockaddr)))
            done, _ = await asyncio.wait(
                pending, timeout=delay if queue else None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                pending.discard(task)
                exc = task.exception()
                if exc is not None:
                    errors.append(exc)
                elif winner is None:
                    winner = task.result()
                else:
                    task.result().close()
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                (await task).close()
    if winner is not None:
        return winner
    exc = errors[0] if errors else OSError("no address to connect to")
    raise UpstreamError(classify_os_error(exc), repr(exc))


async def open_upstream(
    host: str,
    port: int,
    *,
    resolver: Resolver,
    connector: Connector,
    timeout: float,
    delay: float = 0.25,
    prefer: str = "any",
    check: Callable[[AddrInfo], tuple[Failure, str] | None] | None = None,
) -> socket.socket:
    """Resolve ``host`` and connect to it within ``timeout`` seconds; a connected socket.

    ``check`` may veto an address (returning the ``Failure`` to report and a
    detail for the log); vetoed addresses are never contacted. Raises
    ``UpstreamError``.
    """
    phase = "connect"
    try:
        async with asyncio.timeout(timeout):
            addrs = literal_address(host, port)
            if addrs is None:
                phase = "dns"
                try:
                    addrs = await resolver.resolve(host, port)
                except (OSError, UnicodeError) as exc:
                    raise UpstreamError(
                        Failure.DNS_ERROR
                        if not isinstance(exc, OSError)
                        else classify_os_error(exc),
                        repr(exc),
                    ) from None
                if not addrs:
                    raise UpstreamError(Failure.DNS_ERROR, f"{host!r} has no address")
                phase = "connect"
            if check is not None:
                allowed = []
                veto: tuple[Failure, str] | None = None
                for addr in addrs:
                    verdict = check(addr)
                    if verdict is None:
                        allowed.append(addr)
                    elif veto is None:
                        veto = verdict
                if not allowed:
                    assert veto is not None
                    raise UpstreamError(*veto)
                addrs = allowed
            return await _happy_eyeballs(interleave(addrs, prefer), connector, delay)
    except TimeoutError:
        failure = Failure.DNS_TIMEOUT if phase == "dns" else Failure.TIMEOUT
        raise UpstreamError(failure, f"{phase} for {host}:{port} over {timeout}s") from None
