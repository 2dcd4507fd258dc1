"""Memory is given back: a real proxytap process, rounds of many concurrent tunnels.

Each round opens 5,000 idle CONNECT tunnels at once, closes them all, waits
until the proxy reports no connection left, and reads the process's RSS. A
closed tunnel that leaves a reference cycle is kept until a rare full
collection (app.py tunes the collector for throughput): about 3 KiB per
tunnel, 15 MiB more after every round. Freed by reference counting, the
memory of one round is reused by the next.
"""

from __future__ import annotations

import asyncio
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

TUNNELS = 5_000
ROUNDS = 3
BATCH = 200  # tunnels being opened at once (below the listen backlog)


class Holder(asyncio.Protocol):
    """The origin: accepts, never answers, keeps the connection until the proxy closes it."""

    def __init__(self, held: set[asyncio.BaseTransport]) -> None:
        self.held = held
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.held.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.transport is not None
        self.held.discard(self.transport)


def config(tmp_path: Path) -> Path:
    path = tmp_path / "proxytap.toml"
    path.write_text(
        f"""
[[listeners]]
name = "http"
kind = "http"
address = "127.0.0.1:0"

[access]
allow_dest = ["127.0.0.0/8"]
connect_ports = ["1-65535"]

[limits]
max_connections = {TUNNELS + 1000}
max_connections_per_client = {TUNNELS + 1000}

[admin]
address = "127.0.0.1:0"
"""
    )
    return path


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


async def started(log: Path, proc: asyncio.subprocess.Process) -> tuple[int, int]:
    """The HTTP listener's and the admin server's ports, once proxytap is ready."""
    text = ""

    async def ready() -> bool:
        nonlocal text
        text = await asyncio.to_thread(log.read_text)
        assert proc.returncode is None, f"proxytap exited: {text}"
        return "proxytap ready" in text

    await until("proxytap ready", ready, 30)
    listener = re.search(r"listening: http on 127\.0\.0\.1:(\d+)", text)
    admin = re.search(r"admin: serving http://127\.0\.0\.1:(\d+)/", text)
    assert listener is not None and admin is not None, text
    return int(listener.group(1)), int(admin.group(1))


async def open_tunnel(proxy_port: int, request: bytes) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", proxy_port))
        await loop.sock_sendall(sock, request)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = await loop.sock_recv(sock, 4096)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_memory_is_given_back_after_rounds_of_concurrent_tunnels(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * TUNNELS + 1000  # our client sockets and the origin's, and then some
    raised = max(soft, need) if hard == resource.RLIM_INFINITY else hard
    assert raised >= need, f"open-file hard limit {hard} < {need}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    loop = asyncio.get_running_loop()
    held: set[asyncio.BaseTransport] = set()
    origin = await loop.create_server(lambda: Holder(held), "127.0.0.1", 0)
    origin_port = origin.sockets[0].getsockname()[1]
    log = tmp_path / "proxytap.log"
    sockets: list[socket.socket] = []
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "proxytap", "run", "--config", str(config(tmp_path))),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        proxy_port, admin_port = await started(log, proc)
        request = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (
            origin_port,
            origin_port,
        )
        async with aiohttp.ClientSession() as session:

            async def stats() -> dict[str, Any]:
                url = f"http://127.0.0.1:{admin_port}/stats"
                async with session.get(url) as resp:
                    assert resp.status == 200
                    doc: dict[str, Any] = await resp.json()
                    return doc

            async def all_closed() -> bool:
                now = await stats()
                return now["connections_active"] == 0 and now["flows_active"] == 0 and not held

            rss: list[float] = []
            for _ in range(ROUNDS):
                async with asyncio.timeout(120):
                    while len(sockets) < TUNNELS:
                        batch = min(BATCH, TUNNELS - len(sockets))
                        opened = await asyncio.gather(
                            *(open_tunnel(proxy_port, request) for _ in range(batch)),
                            return_exceptions=True,
                        )
                        sockets += [s for s in opened if isinstance(s, socket.socket)]
                        failed = [e for e in opened if not isinstance(e, socket.socket)]
                        assert not failed, failed[:3]
                now = await stats()
                assert now["connections_active"] == TUNNELS and now["flows_active"] == TUNNELS
                assert len(held) == TUNNELS
                for sock in sockets:
                    sock.close()
                sockets.clear()
                await until("every tunnel closed", all_closed, 60)
                rss.append(vm_rss_mib(proc.pid))
        print(f"RSS after each round closed: {', '.join(f'{r:.1f} MiB' for r in rss)}")
        assert abs(rss[-1] - rss[0]) <= 0.10 * rss[0], rss
    finally:
        for sock in sockets:
            sock.close()
        origin.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
