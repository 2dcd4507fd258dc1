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
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from proxytap.errors import Failure, UpstreamError, classify_os_error

SockAddr = tuple[str, int] | tuple[str, int, int, int]
AddrInfo = tuple[int, SockAddr]  # (family, sockaddr)


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[AddrInfo]: ...


class Connector(Protocol):
    async def connect(self, family: int, sockaddr: SockAddr) -> socket.socket: ...

    async def open[P: asyncio.BaseProtocol](
        self, family: int, sockaddr: SockAddr, factory: Callable[[], P]
    ) -> tuple[asyncio.Transport, P]: ...


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
    """TCP connections: ``open`` gives a transport, ``connect`` a bare socket.

    ``open`` lets the event loop create, connect and wrap the socket in one
    call (in C on uvloop: the connect path of every tunnel). A subclass that
    replaces ``connect`` (tests inject refusals and hangs that way) is used by
    ``open`` too.
    """

    async def open[P: asyncio.BaseProtocol](
        self, family: int, sockaddr: SockAddr, factory: Callable[[], P]
    ) -> tuple[asyncio.Transport, P]:
        loop = asyncio.get_running_loop()
        if type(self).connect is SocketConnector.connect:
            transport, protocol = await loop.create_connection(
                factory, sockaddr[0], sockaddr[1], family=family
            )
        else:
            sock = await self.connect(family, sockaddr)
            try:
                transport, protocol = await loop.create_connection(factory, sock=sock)
            except BaseException:
                sock.close()
                raise
        return transport, protocol

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
    ip = _literal(host)
    if ip is None:
        return None
    if ":" not in ip:
        return [(socket.AF_INET, (ip, port))]
    return [(socket.AF_INET6, (ip, port, 0, 0))]


@functools.lru_cache(maxsize=8192)
def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


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


async def _happy_eyeballs[T](
    addrs: Sequence[AddrInfo],
    attempt: Callable[[int, SockAddr], Awaitable[T]],
    discard: Callable[[T], None],
    delay: float,
) -> T:
    """Start one attempt, then the next after ``delay`` or when one fails; first wins.

    ``attempt`` connects to one address; ``discard`` closes what a losing
    attempt produced.
    """
    if len(addrs) == 1:  # the common case (an IP literal, a name with one address)
        try:
            return await attempt(*addrs[0])
        except OSError as only:
            raise UpstreamError(classify_os_error(only), repr(only)) from None
    errors: list[BaseException] = []
    pending: set[asyncio.Future[T]] = set()
    winner: list[T] = []
    queue = list(addrs)
    try:
        while (queue or pending) and not winner:
            if queue:
                family, sockaddr = queue.pop(0)
                pending.add(asyncio.ensure_future(attempt(family, sockaddr)))
            done, _ = await asyncio.wait(
                pending, timeout=delay if queue else None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                pending.discard(task)
                failed = task.exception()
                if failed is not None:
                    errors.append(failed)
                elif not winner:
                    winner.append(task.result())
                else:
                    discard(task.result())
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                discard(await task)
    if winner:
        return winner[0]
    first = errors[0] if errors else OSError("no address to connect to")
    raise UpstreamError(classify_os_error(first), repr(first))


async def open_upstream[T](
    host: str,
    port: int,
    *,
    resolver: Resolver,
    attempt: Callable[[int, SockAddr], Awaitable[T]],
    discard: Callable[[T], None],
    timeout: float,
    delay: float = 0.25,
    prefer: str = "any",
    check: Callable[[AddrInfo], tuple[Failure, str] | None] | None = None,
) -> T:
    """Resolve ``host`` and connect to it within ``timeout`` seconds.

    ``attempt(family, sockaddr)`` makes one connection (a socket, or a
    transport and protocol), ``discard`` closes a losing one. ``check`` may
    veto an address (returning the ``Failure`` to report and a detail for the
    log); vetoed addresses are never contacted. Raises ``UpstreamError``.
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
            return await _happy_eyeballs(interleave(addrs, prefer), attempt, discard, delay)
    except TimeoutError:
        failure = Failure.DNS_TIMEOUT if phase == "dns" else Failure.TIMEOUT
        raise UpstreamError(failure, f"{phase} for {host}:{port} over {timeout}s") from None
