"""Staying up under load, over real sockets: silent connections, per-client caps, descriptors.

* A connection that sends nothing within ``timeouts.first_byte`` is closed
  without an answer and counted; one that sent part of a request keeps
  ``timeouts.handshake`` (and gets its 408).
* A client over its connection cap loses its oldest silent connection to a
  connection that sends a request; a client whose connections all talk is
  refused as before.
* Near the open-file limit (a child process with a lowered RLIMIT_NOFILE),
  new connections are accepted and closed at once, counted in /metrics and
  logged once, while every open tunnel keeps working and nothing answers
  ``proxy_internal_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxytap.config import AdminConfig, Config, LimitsConfig, ListenerConfig, Timeouts
from tests.conftest import TEST_ACCESS, Origin, ProxyFactory, RawServer, RunningProxy, curl

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
)
ADMIN = AdminConfig(address="127.0.0.1:0")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# -- helpers ------------------------------------------------------------------------------


async def scrape_url(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET a /metrics URL: every sample by (name, sorted labels)."""
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(proxy: RunningProxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert proxy.app.admin is not None
    host, port = proxy.app.admin.addresses()[0]
    return await scrape_url(f"http://{host}:{port}/metrics")


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``check()`` to hold, polling, at most ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def open_silent(addr: tuple[str, int], count: int) -> list[Streams]:
    """``count`` connections that send nothing."""
    return [await asyncio.open_connection(*addr) for _ in range(count)]


async def closed_without_answer(conns: list[Streams], timeout: float) -> None:
    """Every connection in ``conns`` is closed by the proxy, having been sent no byte."""
    got = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in conns)), timeout)
    assert set(got) == {b""}


def close_all(conns: list[Streams]) -> None:
    for _, w in conns:
        w.close()


async def tunnel(addr: tuple[str, int], port: int) -> tuple[bytes, Streams]:
    """CONNECT to 127.0.0.1:``port``: the proxy's answer head, and the streams."""
    conn = await asyncio.open_connection(*addr)
    return await ask_tunnel(conn, port), conn


async def ask_tunnel(conn: Streams, port: int) -> bytes:
    """CONNECT on an open connection: the answer head (b"" when closed unanswered)."""
    r, w = conn
    w.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except ConnectionResetError:
        return b""


def found(pattern: str, text: str) -> re.Match[str]:
    m = re.search(pattern, text)
    assert m is not None, (pattern, text)
    return m


async def echoes(conn: Streams, payload: bytes) -> bool:
    r, w = conn
    w.write(payload)
    return await asyncio.wait_for(r.readexactly(len(payload)), 5) == payload


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()


async def hello(proxy_url: str, origin: Origin) -> tuple[int, bytes, bytes, float]:
    """curl a plain-HTTP GET through the proxy: rc, body, stderr, seconds taken."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    rc, body, err = await curl("--max-time", "5", "--fail", "-x", proxy_url, f"{origin.url}/hello")
    return rc, body, err, loop.time() - started


# -- silent connections -------------------------------------------------------------------


async def test_silent_connections_close_at_first_byte_deadline_not_handshake(
    start_proxy: ProxyFactory,
) -> None:
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        admin=ADMIN,
        timeouts=Timeouts(first_byte=0.3, handshake=3.0),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    loop = asyncio.get_running_loop()
    started = loop.time()
    silent = await open_silent(proxy.http, 20) + await open_silent(proxy.socks, 20)
    # one that spoke: part of a request head, never finished
    r, w = await asyncio.open_connection(*proxy.http)
    w.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")
    try:
        await closed_without_answer(silent, 5)
        # closed by the first-byte deadline, well before the handshake one
        assert loop.time() - started < 3.0
        # the one that spoke keeps the handshake deadline, and is answered
        answer = await asyncio.wait_for(r.read(), 10)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert loop.time() - started >= 3.0
        m = await scrape(proxy)
        name = "proxytap_downstream_handshake_timeouts_total"
        assert sample(m, name, listener="http", stage="first_byte") == 20
        assert sample(m, name, listener="socks", stage="first_byte") == 20
        assert sample(m, name, listener="http", stage="handshake") == 1
        assert sample(m, name, listener="socks", stage="handshake") == 0
    finally:
        close_all(silent)
        w.close()


async def test_500_silent_connections_do_not_keep_a_request_waiting(
    start_proxy: ProxyFactory, origin: Origin
) -> None:
    """The operator's case, default limits and timeouts: 500 silent connections from one
    address, then a real request from it: answered at once, the silent ones shed."""
    proxy: RunningProxy = await start_proxy(
        Config(listeners=LISTENERS, access=TEST_ACCESS, admin=ADMIN)
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    silent = await open_silent(proxy.http, 500)
    try:
        rc, body, err, took = await hello(proxy.http_url, origin)
        assert rc == 0, err
        assert body == b"hello GET /hello"
        assert took < 5
        first_byte = Timeouts().first_byte
        await closed_without_answer(silent, first_byte + 10)
        assert loop.time() - started < Timeouts().handshake
        m = await scrape(proxy)
        timeouts = "proxytap_downstream_handshake_timeouts_total"
        assert sample(m, timeouts, listener="http", stage="first_byte") == 500
        requests = "proxytap_downstream_http_requests_total"
        assert sample(m, requests, listener="http", code_class="2xx", source="origin") == 1
        handshaking = (
            "proxytap_downstream_connections_active",
            (("listener", "http"), ("protocol", "handshake")),
        )
        assert m.get(handshaking, 0) == 0  # a label set that only shows while non-zero
    finally:
        close_all(silent)


async def test_over_the_per_client_cap_a_request_takes_a_silent_ones_place(
    start_proxy: ProxyFactory, origin: Origin
) -> None:
    """Cap 50, 500 silent connections (that never time out here): each request evicts
    the client's oldest silent connection and is served."""
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        admin=ADMIN,
        limits=LimitsConfig(max_connections_per_client=50),
        timeouts=Timeouts(first_byte=60.0, handshake=120.0),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    silent = await open_silent(proxy.http, 500)
    try:
        for i in range(1, 6):
            rc, body, err, took = await hello(proxy.http_url, origin)
            assert rc == 0, err
            assert body == b"hello GET /hello"
            assert took < 5
            # the oldest silent connections went, in order; the rest are still open
            await until(
                lambda i=i: sum(r.at_eof() for r, _ in silent) == i,
                5,
                f"{i} silent connections closed",
            )
            assert all(r.at_eof() for r, _ in silent[:i])
        m = await scrape(proxy)
        assert sample(m, "proxytap_downstream_silent_evictions_total", listener="http") == 5
        assert sample(m, "proxytap_downstream_silent_evictions_total", listener="socks") == 0
        assert proxy.app.services.table.per_client["127.0.0.1"] == 495
    finally:
        close_all(silent)


async def test_per_client_cap_evicts_only_silent_connections(
    start_proxy: ProxyFactory, raw_server: Callable[..., Awaitable[RawServer]]
) -> None:
    """Cap 3: two tunnels and two silent connections. A CONNECT takes the older silent
    one's place; the newer one, speaking last with no silent connection left to give
    up, is refused (503); the tunnels are never touched."""
    server = await raw_server(echo)
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        admin=ADMIN,
        limits=LimitsConfig(max_connections_per_client=3),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    tunnels = []
    for _ in range(2):
        head, conn = await tunnel(proxy.http, server.port)
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        tunnels.append(conn)
    older, newer = await open_silent(proxy.http, 2)  # the newer one is over the cap
    third = None
    try:
        head, third = await tunnel(proxy.http, server.port)
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert await asyncio.wait_for(older[0].read(), 5) == b""  # evicted, no answer
        newer[1].write(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\n\r\n".encode())
        refused = await asyncio.wait_for(newer[0].read(), 5)
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert b"error=connection_limit_reached" in refused
        for i, conn in enumerate([*tunnels, third]):
            assert await echoes(conn, b"still here %d" % i)
        m = await scrape(proxy)
        assert sample(m, "proxytap_downstream_silent_evictions_total", listener="http") == 1
        rejections = "proxytap_downstream_rejections_total"
        reason = "too many connections from this client"
        assert sample(m, rejections, rule="max-connections-per-client", reason=reason) == 1
    finally:
        close_all([*tunnels, older, newer] + ([third] if third else []))


# -- the open-file limit ------------------------------------------------------------------

NOFILE = 160  # the child's RLIMIT_NOFILE, soft and hard (so start-up cannot raise it)

# sets the limit, then runs proxytap exactly as `python -m proxytap` would
LIMITED = (
    "import resource, runpy, sys\n"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}))\n"
    "sys.argv[0] = 'proxytap'\n"
    "runpy.run_module('proxytap', run_name='__main__', alter_sys=True)\n"
)


async def test_near_the_open_file_limit_new_connections_are_refused_cleanly(
    tmp_path: Path, origin: Origin, raw_server: Callable[..., Awaitable[RawServer]]
) -> None:
    server = await raw_server(echo)
    config = tmp_path / "proxytap.toml"
    config.write_text(
        "[[listeners]]\n"
        'name = "http"\nkind = "http"\naddress = "127.0.0.1:0"\n'
        '[admin]\naddress = "127.0.0.1:0"\n'
        '[access]\nallow_dest = ["127.0.0.0/8"]\nconnect_ports = ["1-65535"]\n'
        f'[log]\nflows = "{tmp_path / "flows.json"}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LIMITED,
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    drain: asyncio.Task[None] | None = None
    conns: list[Streams] = []
    pending: list[Streams] = []
    try:
        assert proc.stderr is not None
        stderr = proc.stderr
        while not any("proxytap ready" in x for x in lines):
            line = (await asyncio.wait_for(stderr.readline(), 20)).decode()
            assert line, f"proxytap exited early: {lines}"
            lines.append(line)

        async def read_rest() -> None:
            while line := await stderr.readline():
                lines.append(line.decode())

        drain = asyncio.get_running_loop().create_task(read_rest())
        text = "".join(lines)
        http = ("127.0.0.1", int(found(r"listening: http on 127\.0\.0\.1:(\d+)", text)[1]))
        admin = found(r"admin: serving (http://\S+/metrics)", text)[1]
        budget = found(
            rf"open-file limit {NOFILE}: up to ~(\d+) client connections "
            r"\(2 descriptors each, (\d+) in use now, (\d+) kept in reserve\)",
            text,
        )
        capacity, base, reserve = (int(x) for x in budget.groups())
        assert capacity == (NOFILE - base - reserve) // 2 > 10
        # enough tunnels that, without the check, the proxy would run out of descriptors;
        # all connected before any asks, so the upstream connects come last (the
        # operator's case: descriptors gone by the time a tunnel needs its second)
        attempts = (NOFILE - base) // 2 + 10
        pending = [await asyncio.open_connection(*http) for _ in range(attempts)]
        outcomes = []
        for conn in pending:
            head = await ask_tunnel(conn, server.port)
            assert b"proxy_internal_error" not in head
            if head:
                assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
                conns.append(conn)
                outcomes.append("open")
            else:  # accepted and closed at once: no answer at all
                conn[1].close()
                outcomes.append("refused")
        opened = outcomes.count("open")
        refused = attempts - opened
        # refusals start at the budget and nothing gets through after the first
        assert capacity - 2 <= opened <= capacity
        assert outcomes == ["open"] * opened + ["refused"] * refused
        assert refused >= 10
        # every tunnel still carries bytes: none failed for lack of a descriptor
        for i, conn in enumerate(conns):
            assert await echoes(conn, b"tunnel %d" % i)
        m = await scrape_url(admin)
        refusals = "proxytap_downstream_open_file_refusals_total"
        assert sample(m, refusals, listener="http") == refused
        assert sample(m, "proxytap_downstream_connections_open_file_capacity") == capacity
        # the tunnels end; a well-behaved client is served again
        close_all(conns)
        conns = []

        async def idle() -> bool:
            active = await scrape_url(admin)
            return (
                sum(
                    v
                    for (n, _), v in active.items()
                    if n == "proxytap_downstream_connections_active"
                )
                == 0
            )

        deadline = asyncio.get_running_loop().time() + 10
        while not await idle():
            assert asyncio.get_running_loop().time() < deadline, "tunnels still open"
            await asyncio.sleep(0.05)
        rc, body, err, _ = await hello(f"http://127.0.0.1:{http[1]}", origin)
        assert rc == 0, err
        assert body == b"hello GET /hello"
        head, conn = await tunnel(http, server.port)
        conns.append(conn)
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert await echoes(conn, b"after")
    finally:
        close_all(pending + conns)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 15)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if drain is not None:
            await asyncio.wait_for(drain, 5)
    assert proc.returncode == 0
    log = "".join(lines)
    for bad in ("proxy_internal_error", "Too many open files", "Traceback", "ERROR"):
        assert bad not in log, log
    warned = [x for x in lines if "refusing new client connections" in x]
    assert len(warned) == 1, warned  # one line per 10 s window: the refusals took less
    assert f"open-file limit {NOFILE} nearly reached" in warned[0]
