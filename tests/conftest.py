"""Shared fixtures: uvloop, a throwaway PKI, real origins, an in-process proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import re
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

from proxytap.app import App
from proxytap.config import Config, ListenerConfig, Timeouts
from proxytap.flows.table import CloseReason, Flow
from proxytap.policy.acl import AccessConfig
from tests.certs import Pki, make_pki

# Tests talk to origins on loopback, which the default policy denies (a fresh
# install must not reach the proxy host's own services), on any port.
TEST_ACCESS = AccessConfig(allow_dest=("127.0.0.0/8", "::1/128"), connect_ports=("1-65535",))

BLOCK = random.Random(20261122).randbytes(1 << 20)  # same bytes in every importer


def pattern(n: int) -> bytes:
    """``n`` bytes of a fixed random pattern (same content on both ends)."""
    reps, rest = divmod(n, len(BLOCK))
    return BLOCK * reps + BLOCK[:rest]


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    reps, rest = divmod(n, len(BLOCK))
    for _ in range(reps):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test runs on uvloop, the loop proxytap runs on; ``both_loops`` tests
    also on asyncio's own loop (proxytap's fallback without uvloop)."""
    if item.get_closest_marker("both_loops") is not None:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- waiting on a condition -----------------------------------------------------------


async def wait_until(cond: Callable[[], object], within: float = 5.0, what: str = "") -> None:
    """Poll ``cond`` until it is true, at most ``within`` seconds (then fail the test).

    For state the test cannot await directly (server-side bookkeeping, a
    counter, a callback): a bounded wait on the condition, never a fixed sleep.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {within}s: {what or cond}")
        await asyncio.sleep(0.005)


# -- a recording export subscriber -----------------------------------------------------


class Recorder:
    """Hub subscriber keeping every event, for assertions."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[str, Flow, Any]] = []
        self.closed = asyncio.Event()

    def flow_created(self, flow: Flow, now: float) -> None:
        self.events.append(("created", flow, now))

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        self.events.append(("data", flow, (direction, data)))

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        self.events.append(("destroyed", flow, reason))
        self.closed.set()

    def flows(self) -> list[Flow]:
        return [f for kind, f, _ in self.events if kind == "created"]

    def data(self, flow: Flow, direction: int) -> bytes:
        """Every DATA payload of ``flow`` in ``direction``, concatenated."""
        out = bytearray()
        for kind, f, value in self.events:
            if kind == "data" and f is flow and value[0] == direction:
                out += value[1]
        return bytes(out)

    def reason(self, flow: Flow) -> CloseReason | None:
        for kind, f, value in self.events:
            if kind == "destroyed" and f is flow:
                return value  # type: ignore[no-any-return]
        return None

    async def wait_destroyed(self, count: int = 1, timeout: float = 10.0) -> None:
        async def _wait() -> None:
            while sum(1 for e in self.events if e[0] == "destroyed") < count:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(_wait(), timeout)


# -- the proxy under test --------------------------------------------------------------


@dataclasses.dataclass
class RunningProxy:
    app: App
    recorder: Recorder

    def addr(self, name: str) -> tuple[str, int]:
        return self.app.addresses(name)[0]

    @property
    def http(self) -> tuple[str, int]:
        return self.addr("http")

    @property
    def socks(self) -> tuple[str, int]:
        return self.addr("socks")

    @property
    def mixed(self) -> tuple[str, int]:
        return self.addr("mixed")

    @property
    def http_url(self) -> str:
        host, port = self.http
        return f"http://{host}:{port}"


ProxyFactory = Callable[..., Any]


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    apps: list[App] = []

    async def _start(
        config: Config | None = None,
        *,
        resolver: Any = None,
        connector: Any = None,
        **timeouts: float,
    ) -> RunningProxy:
        cfg = config or Config(
            listeners=(
                ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
                ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
                ListenerConfig(kind="mixed", address="127.0.0.1:0", name="mixed"),
            ),
            access=TEST_ACCESS,
        )
        if timeouts:
            cfg = dataclasses.replace(cfg, timeouts=dataclasses.replace(Timeouts(), **timeouts))
        app = App(cfg.validate(), resolver=resolver, connector=connector)
        recorder = Recorder()
        app.hub.subscribe(recorder)
        await app.start()
        apps.append(app)
        return RunningProxy(app, recorder)

    yield _start
    for app in apps:
        await app.stop(0)


@pytest.fixture
async def proxy(start_proxy: ProxyFactory) -> RunningProxy:
    return await start_proxy()  # type: ignore[no-any-return]


# -- origins ---------------------------------------------------------------------------


def origin_app() -> web.Application:
    async def get_bytes(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Length": str(n)})
        await resp.prepare(request)
        sent = 0
        while sent < n:
            step = min(len(BLOCK), n - sent)
            await resp.write(BLOCK[:step])
            sent += step
        await resp.write_eof()
        return resp

    async def upload(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            total += len(chunk)
        return web.Response(text=f"{total} {h.hexdigest()}")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.method} {request.path_qs}")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_get("/bytes/{n}", get_bytes)
    app.router.add_post("/upload", upload)
    app.router.add_put("/upload", upload)
    app.router.add_route("*", "/hello", hello)
    return app


@dataclasses.dataclass
class Origin:
    host: str
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}"

    tls: bool = False


async def start_origin(
    host: str = "127.0.0.1",
    ssl_ctx: ssl.SSLContext | None = None,
    app: web.Application | None = None,
) -> Origin:
    """``app`` (``origin_app()`` by default) served on ``host``, over TLS with ``ssl_ctx``."""
    runner = web.AppRunner(app if app is not None else origin_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_ctx)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Origin(host, port, runner, tls=ssl_ctx is not None)


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    o = await start_origin()
    yield o
    await o.runner.cleanup()


@pytest.fixture
async def tls_origin(pki: Pki) -> AsyncIterator[Origin]:
    o = await start_origin(ssl_ctx=pki.server_context())
    yield o
    await o.runner.cleanup()


@pytest.fixture
async def origin6() -> AsyncIterator[Origin]:
    if not has_ipv6():
        pytest.fail("IPv6 loopback is not available on this machine")
    o = await start_origin("::1")
    yield o
    await o.runner.cleanup()


@dataclasses.dataclass
class RawServer:
    server: asyncio.Server
    accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[..., Any]]:
    servers: list[asyncio.Server] = []

    async def _start(
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        host: str = "127.0.0.1",
    ) -> RawServer:
        accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def _handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append((r, w))
            try:
                await handler(r, w)
            finally:
                w.close()

        server = await asyncio.start_server(_handle, host, 0)
        servers.append(server)
        return RawServer(server, accepted)

    yield _start
    for s in servers:
        s.close()


async def exchange(addr: tuple[str, int], data: bytes, local: str | None = None) -> bytes:
    """Send ``data`` on a new connection (from ``local`` when given) and read until EOF."""
    reader, writer = await asyncio.open_connection(*addr, local_addr=(local, 0) if local else None)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def closed_port() -> int:
    """A loopback port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(
    *argv: str, input: bytes | None = None, timeout: float = 60
) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    assert proc.returncode is not None
    return proc.returncode, out, err


def here() -> Path:
    return Path(__file__).parent


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    """curl, quiet but for errors, bounded in time."""
    return await run("curl", "-sS", "--max-time", "60", *args)


async def check_curl_download(tmp_path: Path, url: str, size: int, *client: str) -> None:
    """curl ``client`` options fetch ``size`` pattern bytes from ``url``: sha256-identical."""
    out = tmp_path / "down"
    rc, _, err = await curl(*client, "--fail", "-o", str(out), url)
    assert rc == 0, err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(size)


async def check_curl_upload(
    tmp_path: Path,
    url: str,
    size: int,
    *client: str,
    header: str = "Content-Type: application/octet-stream",
) -> None:
    """curl ``client`` options post ``size`` pattern bytes to /upload, which hashes them."""
    up = tmp_path / "up"
    up.write_bytes(pattern(size))
    rc, body, err = await curl(*client, "--fail", "--data-binary", f"@{up}", "-H", header, url)
    assert rc == 0, err
    assert body.decode() == f"{size} {pattern_sha256(size)}"


PROXYTAP = (sys.executable, "-m", "proxytap")


async def start_proxytap(
    *args: str,
) -> tuple[asyncio.subprocess.Process, dict[str, int], list[str]]:
    """``proxytap run ARGS`` as a real process, once ready: it, its listeners' ports, its lines.

    The ports come from the start-up lines (``listening: NAME on 127.0.0.1:PORT``).
    The caller stops the process.
    """
    proc = await asyncio.create_subprocess_exec(
        *PROXYTAP,
        "run",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    ports: dict[str, int] = {}
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert line, f"proxytap exited early: {lines}"
        lines.append(line)
        m = re.search(r"listening: (\S+)(?: \(\S+\))? on 127\.0\.0\.1:(\d+)", line)
        if m:
            ports[m.group(1)] = int(m.group(2))
        if "proxytap ready" in line:
            return proc, ports, lines
