"""Chaining end to end: a real proxytap sends its flows through a real upstream proxy.

The upstream is a second proxytap process (with ``[auth]`` users: proxytap's
credentials are checked), microsocks (SOCKS5) or Squid (HTTP CONNECT), run
here on loopback ports and stopped by each test. Clients are curl (plain
HTTP, CONNECT, SOCKS5) and python-socks. What is checked: the origin
answered, and the first proxytap's exports name the true client, the final
destination as README "Chaining" documents it (ip2 ``0.0.0.0`` when the
upstream resolved the name, the address when proxytap knew it) and the
requested name; failures of the upstream answer precisely and are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import bcrypt
import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from proxytap.proto.sftap import DESTROYED, Event
from tests.certs import Pki
from tests.conftest import Origin, closed_port, run
from tests.export.sftap_helpers import TapReader, check_stream
from tests.intercept.interception import Intercepting, https_origin, start_intercepting
from tests.proxyproc import Proxytap, launch

Endpoint = tuple[str, int]
USER, PASSWORD = "alice", "s3cret"


# -- processes ---------------------------------------------------------------------------


def htpasswd(path: Path) -> Path:
    digest = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"{USER}:{digest}\n")
    return path


async def upstream_proxytap(work: Path, *, auth: bool = True) -> Proxytap:
    """The upstream: a mixed listener; with ``auth``, alice must log in."""
    return await launch(upstream_config(work, auth))


def upstream_config(work: Path, auth: bool) -> Path:
    work.mkdir(exist_ok=True)
    users = f'[auth]\nhtpasswd = "{htpasswd(work / "users")}"\n' if auth else ""
    config = work / "upstream.toml"
    config.write_text(
        f"""
[[listeners]]
kind = "mixed"
address = "127.0.0.1:0"
name = "up"

[access]
allow_dest = ["127.0.0.0/8"]
connect_ports = ["1-65535"]

[admin]
address = "off"

{users}
"""
    )
    return config


async def front_proxytap(
    work: Path,
    url: str,
    *,
    password: str | None = PASSWORD,
    user: str | None = USER,
    extra: str = "",
) -> Proxytap:
    """The proxytap under test: everything goes via the upstream ``url``, but denied.example."""
    home = Path(tempfile.mkdtemp(dir="/tmp", prefix="chn"))  # short: AF_UNIX paths
    try:
        px = await launch(front_config(work, home, url, password, user, extra))
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    px.flow_log = work / "flows.jsonl"
    px.home = home
    return px


def front_config(
    work: Path, home: Path, url: str, password: str | None, user: str | None, extra: str
) -> Path:
    work.mkdir(exist_ok=True)
    credentials = f'username = "{user}"\n' if user is not None else ""
    credentials += f'password = "{password}"\n' if password is not None else ""
    config = work / "front.toml"
    flow_log = work / "flows.jsonl"
    config.write_text(
        f"""
[[listeners]]
kind = "mixed"
address = "127.0.0.1:0"
name = "front"

[access]
allow_dest = ["127.0.0.0/8"]
connect_ports = ["1-65535"]

[[access.rules]]
name = "no-denied"
action = "deny"
domains = ["denied.example"]

[[access.rules]]
name = "chained"
action = "allow"
via = "up"

[[upstream.proxies]]
name = "up"
url = "{url}"
{credentials}

[export]
sftap_home = "{home}"

[log]
flows = "{flow_log}"

[admin]
address = "127.0.0.1:0"
{extra}
"""
    )
    return config


@pytest.fixture
async def stack() -> AsyncIterator[list[Proxytap]]:
    """What a test started, stopped afterwards (and the flow-socket homes removed)."""
    started: list[Proxytap] = []
    yield started
    for px in reversed(started):
        await px.stop()
        if px.home is not None:
            shutil.rmtree(px.home, ignore_errors=True)


# -- clients -----------------------------------------------------------------------------


async def curl(*args: str) -> tuple[int, str, Endpoint]:
    """curl ``args``: exit code, body, and the client endpoint it used (``-w``)."""
    rc, out, err = await run(
        "curl", "-sS", "--max-time", "20", "-w", "\n%{local_ip} %{local_port}", *args
    )
    body, _, w = out.decode(errors="replace").rpartition("\n")
    ip, _, port = w.partition(" ")
    assert rc == 0 or err, (rc, err)
    return rc, body if rc == 0 else err.decode(errors="replace"), (ip, int(port or 0))


async def socks_get(
    proxy_port: int, host: str, port: int, path: str, *, rdns: bool = True
) -> tuple[bytes, Endpoint]:
    """A GET through the front's SOCKS5 with python-socks: the response and the client end."""
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{proxy_port}", rdns=rdns)
    sock = await proxy.connect(dest_host=host, dest_port=port, timeout=10)
    reader, writer = await asyncio.open_connection(sock=sock)
    local = writer.get_extra_info("sockname")
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    )
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return data, (local[0], local[1])


async def exported_ends(tap: TapReader, count: int) -> list[set[Endpoint]]:
    """The endpoint pairs of the next ``count`` whole flows on a flow socket."""
    seen = 0

    def stop(ev: Event) -> bool:
        nonlocal seen
        seen += ev.event == DESTROYED
        return seen >= count

    flows = check_stream(await tap.until(stop, 15))
    return [
        {(r.created.key.ip1, r.created.key.port1), (r.created.key.ip2, r.created.key.port2)}
        for r in flows.values()
    ]


# -- through a second proxytap ----------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "socks5h"])
async def test_every_client_protocol_through_an_authenticating_proxytap(
    tmp_path: Path, origin: Origin, stack: list[Proxytap], scheme: str
) -> None:
    """CONNECT, plain HTTP and SOCKS5 (curl, python-socks), asked by name and by address."""
    up = await upstream_proxytap(tmp_path / "up")
    stack.append(up)
    front = await front_proxytap(tmp_path / "front", f"{scheme}://127.0.0.1:{up.port('up')}")
    stack.append(front)
    fp = front.port("front")
    assert front.home is not None
    tap = await TapReader.connect(front.home / "tcp" / "http")
    try:
        by_name = f"http://localhost:{origin.port}/hello"
        clients = [
            await curl("-x", f"http://127.0.0.1:{fp}", f"{by_name}?plain"),
            await curl("-p", "-x", f"http://127.0.0.1:{fp}", f"{by_name}?connect"),
            await curl("--socks5-hostname", f"127.0.0.1:{fp}", f"{by_name}?socks"),
        ]
        for rc, body, _ in clients:
            assert rc == 0, body
        assert [body for _, body, _ in clients] == [
            "hello GET /hello?plain",
            "hello GET /hello?connect",
            "hello GET /hello?socks",
        ]
        response, py_client = await socks_get(fp, "localhost", origin.port, "/hello?py")
        assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"hello GET /hello?py")
        # by address: the client resolved the name itself
        rc, body, literal_client = await curl(
            "--socks5", f"127.0.0.1:{fp}", f"http://127.0.0.1:{origin.port}/hello?literal"
        )
        assert (rc, body) == (0, "hello GET /hello?literal")
        ends = await exported_ends(tap, 5)
    finally:
        tap.close()
    unknown = ("0.0.0.0", origin.port)  # the upstream resolved the name: ip2 unknown
    named = [c for _, _, c in clients] + [py_client]
    assert sorted(ends, key=sorted) == sorted(
        [{c, unknown} for c in named] + [{literal_client, ("127.0.0.1", origin.port)}], key=sorted
    )
    for client in named:
        record = await front.flow_of(client)
        assert (record["id.resp_h"], record["id.resp_p"]) == unknown
        assert (record["requested_host"], record["requested_port"]) == ("localhost", origin.port)
        assert record["upstream_proxy"] == "up"
        assert (record["upstream_proxy_h"], record["upstream_proxy_p"]) == (
            "127.0.0.1",
            up.port("up"),
        )
        assert record["upstream_resolved"] is True
        if scheme == "http":  # CONNECT reports no bound address
            assert (record["upstream_bound_h"], record["upstream_bound_p"]) == (None, None)
        else:  # proxytap's SOCKS5 reports its own end toward the origin
            assert record["upstream_bound_h"] == "127.0.0.1" and record["upstream_bound_p"] > 0
        assert record["resp_bytes"] > 0
    record = await front.flow_of(literal_client)
    assert (record["id.resp_h"], record["id.resp_p"]) == ("127.0.0.1", origin.port)
    assert record["upstream_resolved"] is False and record["upstream_proxy"] == "up"
    assert await front.metric("proxytap_upstream_proxy_connections_total", proxy="up") == 5
    # destination rules still apply, before the upstream is asked
    rc, body, _ = await curl("-x", f"http://127.0.0.1:{fp}", "http://denied.example/")
    assert rc == 0 and "denied by rule 'no-denied'" in body
    assert await front.metric("proxytap_upstream_proxy_connections_total", proxy="up") == 5
    assert await front.metric("proxytap_policy_denied_total", rule="no-denied") == 1


@pytest.mark.parametrize(
    ("scheme", "resolved_by_upstream"),
    [("socks5", False), ("socks4", False), ("socks4a", True)],
)
async def test_who_resolves_decides_ip2(
    tmp_path: Path,
    origin: Origin,
    stack: list[Proxytap],
    scheme: str,
    resolved_by_upstream: bool,
) -> None:
    """socks5:// and socks4:// make proxytap resolve (ip2 known); socks4a:// does not."""
    up = await upstream_proxytap(tmp_path / "up", auth=False)  # SOCKS4 has no password
    stack.append(up)
    url = f"{scheme}://127.0.0.1:{up.port('up')}"
    # SOCKS4 sends a user id (no password); the upstream without users wants none at all
    user = USER if scheme != "socks5" else None
    front = await front_proxytap(tmp_path / "front", url, user=user, password=None)
    stack.append(front)
    rc, body, client = await curl(
        "-p",
        "-x",
        f"http://127.0.0.1:{front.port('front')}",
        f"http://localhost:{origin.port}/hello",
    )
    assert (rc, body) == (0, "hello GET /hello")
    record = await front.flow_of(client)
    ip2 = "0.0.0.0" if resolved_by_upstream else "127.0.0.1"
    assert (record["id.resp_h"], record["id.resp_p"]) == (ip2, origin.port)
    assert record["requested_host"] == "localhost"
    assert record["upstream_resolved"] is resolved_by_upstream


# -- failures ---------------------------------------------------------------------------------


async def test_upstream_down_is_a_precise_error_and_counted(
    tmp_path: Path, origin: Origin, stack: list[Proxytap]
) -> None:
    dead = closed_port()
    front = await front_proxytap(tmp_path / "front", f"http://127.0.0.1:{dead}")
    stack.append(front)
    fp = front.port("front")
    rc, out, err = await run(
        "curl", "-sS", "--max-time", "20", "-i", "-x", f"http://127.0.0.1:{fp}",
        f"http://localhost:{origin.port}/hello",
    )  # fmt: skip
    head = out.decode(errors="replace")
    assert rc == 0, err
    assert head.startswith("HTTP/1.1 502 ")
    assert re.search(r"(?im)^proxy-status: proxytap; error=connection_refused", head)
    assert "the upstream proxy 'up' could not be reached" in head
    with pytest.raises(ProxyError) as info:
        await socks_get(fp, "localhost", origin.port, "/hello")
    assert info.value.error_code == 0x05  # connection refused
    assert (
        await front.metric("proxytap_upstream_proxy_errors_total", proxy="up", reason="connect")
        == 2
    )
    assert (
        await front.metric(
            "proxytap_upstream_connect_errors_total", listener="front", reason="connection_refused"
        )
        == 2
    )
    await front.logged(rf"upstream proxy up \(http://127\.0\.0\.1:{dead}\): connect")


@pytest.mark.parametrize("scheme", ["http", "socks5h"])
async def test_wrong_credentials_are_a_configuration_error(
    tmp_path: Path, origin: Origin, stack: list[Proxytap], scheme: str
) -> None:
    up = await upstream_proxytap(tmp_path / "up")
    stack.append(up)
    url = f"{scheme}://127.0.0.1:{up.port('up')}"
    front = await front_proxytap(tmp_path / "front", url, password="wrong")
    stack.append(front)
    fp = front.port("front")
    rc, out, err = await run(
        "curl", "-sS", "--max-time", "20", "-i", "-p", "-x", f"http://127.0.0.1:{fp}",
        f"http://localhost:{origin.port}/hello",
    )  # fmt: skip
    assert rc != 0  # curl: the CONNECT failed
    assert b"CONNECT tunnel failed, response 502" in err
    with pytest.raises(ProxyError) as info:
        await socks_get(fp, "localhost", origin.port, "/hello")
    assert info.value.error_code == 0x01  # general failure: proxytap's config, not the request
    assert (
        await front.metric("proxytap_upstream_proxy_errors_total", proxy="up", reason="auth") == 2
    )
    assert (
        await front.metric(
            "proxytap_upstream_connect_errors_total",
            listener="front",
            reason="proxy_configuration_error",
        )
        == 2
    )
    line = await front.logged("refused proxytap's credentials")
    assert "WARNING" in line and "wrong" not in line  # the password is never logged
    # the same answer to a plain HTTP client, with its Proxy-Status
    rc, out, err = await run(
        "curl", "-sS", "--max-time", "20", "-i", "-x", f"http://127.0.0.1:{fp}",
        f"http://localhost:{origin.port}/hello",
    )  # fmt: skip
    head = out.decode(errors="replace")
    assert head.startswith("HTTP/1.1 502 ")
    assert re.search(r"(?im)^proxy-status: proxytap; error=proxy_configuration_error", head)


async def test_the_upstream_s_own_failure_is_passed_on(
    tmp_path: Path, stack: list[Proxytap]
) -> None:
    """The destination refuses the upstream: the client hears connection refused, as direct."""
    up = await upstream_proxytap(tmp_path / "up")
    stack.append(up)
    front = await front_proxytap(tmp_path / "front", f"socks5h://127.0.0.1:{up.port('up')}")
    stack.append(front)
    with pytest.raises(ProxyError) as info:
        await socks_get(front.port("front"), "localhost", closed_port(), "/")
    assert info.value.error_code == 0x05
    assert (
        await front.metric("proxytap_upstream_proxy_errors_total", proxy="up", reason="refused")
        == 1
    )


# -- other upstreams: microsocks, Squid --------------------------------------------------------


@contextlib.asynccontextmanager
async def subprocess(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def listening(port: int, within: float = 10) -> None:
    """Wait until something accepts on 127.0.0.1:``port``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


async def test_through_microsocks(tmp_path: Path, origin: Origin, stack: list[Proxytap]) -> None:
    assert shutil.which("microsocks"), "tests/setup-tools.sh installs microsocks"
    port = closed_port()
    args = ("-i", "127.0.0.1", "-p", str(port), "-u", USER, "-P", PASSWORD)
    async with subprocess("microsocks", *args):
        await listening(port)
        front = await front_proxytap(tmp_path / "front", f"socks5h://127.0.0.1:{port}")
        stack.append(front)
        bad = await front_proxytap(tmp_path / "bad", f"socks5h://127.0.0.1:{port}", password="x")
        stack.append(bad)
        fp = front.port("front")
        rc, body, client = await curl(
            "-x", f"http://127.0.0.1:{fp}", f"http://localhost:{origin.port}/hello"
        )
        assert (rc, body) == (0, "hello GET /hello")
        response, py_client = await socks_get(fp, "localhost", origin.port, "/hello?py")
        assert response.endswith(b"hello GET /hello?py")
        for c in (client, py_client):
            record = await front.flow_of(c)
            assert (record["id.resp_h"], record["id.resp_p"]) == ("0.0.0.0", origin.port)
            assert record["requested_host"] == "localhost"
            assert record["upstream_proxy_p"] == port
            assert record["upstream_bound_h"] is not None  # whatever microsocks reports
        with pytest.raises(ProxyError) as info:
            await socks_get(bad.port("front"), "localhost", origin.port, "/")
        assert info.value.error_code == 0x01
        assert (
            await bad.metric("proxytap_upstream_proxy_errors_total", proxy="up", reason="auth") == 1
        )


@pytest.fixture
def squid_dir() -> Iterator[Path]:
    """Squid drops to the ``proxy`` user: its files live in a directory it can read."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="squid"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_through_squid(
    tmp_path: Path, origin: Origin, stack: list[Proxytap], squid_dir: Path
) -> None:
    assert shutil.which("squid"), "tests/setup-tools.sh installs squid"
    port = closed_port()
    passwd = squid_dir / "passwd"
    rc, _, err = await run("htpasswd", "-b", "-c", "-m", str(passwd), USER, PASSWORD)
    assert rc == 0, err
    passwd.chmod(0o644)
    logs = squid_dir / "logs"
    logs.mkdir()
    shutil.chown(logs, "proxy", "proxy")
    conf = squid_dir / "squid.conf"
    conf.write_text(
        f"""
http_port 127.0.0.1:{port}
pid_filename {logs}/squid.pid
cache_log {logs}/cache.log
access_log {logs}/access.log
coredump_dir {logs}
netdb_filename none
cache deny all
shutdown_lifetime 0 seconds
auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}
acl authed proxy_auth REQUIRED
acl clients src 127.0.0.1/32
http_access allow clients authed
http_access deny all
"""
    )
    async with subprocess("squid", "-N", "-f", str(conf)):
        await listening(port, within=20)
        front = await front_proxytap(tmp_path / "front", f"http://127.0.0.1:{port}")
        stack.append(front)
        fp = front.port("front")
        # plain HTTP goes through Squid as a CONNECT tunnel too
        rc, body, client = await curl(
            "-x", f"http://127.0.0.1:{fp}", f"http://localhost:{origin.port}/hello"
        )
        assert (rc, body) == (0, "hello GET /hello")
        rc, body, socks_client = await curl(
            "--socks5-hostname", f"127.0.0.1:{fp}", f"http://localhost:{origin.port}/hello?s"
        )
        assert (rc, body) == (0, "hello GET /hello?s")
        for c in (client, socks_client):
            record = await front.flow_of(c)
            assert (record["id.resp_h"], record["id.resp_p"]) == ("0.0.0.0", origin.port)
            assert record["upstream_proxy_p"] == port and record["upstream_bound_h"] is None
        # Squid's own failure (its 503 for a refused connect) becomes destination_unavailable
        with pytest.raises(ProxyError) as info:
            await socks_get(fp, "localhost", closed_port(), "/")
        assert info.value.error_code == 0x04
        assert f"CONNECT localhost:{origin.port}" in (logs / "access.log").read_text()


# -- TLS interception over a chain ---------------------------------------------------------


async def test_interception_over_a_chain(tmp_path: Path, pki: Pki, stack: list[Proxytap]) -> None:
    """A tunnel sent via the upstream is still decrypted, exported and logged as such."""
    up = await upstream_proxytap(tmp_path / "up")
    stack.append(up)
    home = Path(tempfile.mkdtemp(dir="/tmp", prefix="chi"))
    extra = f"""
[[access.rules]]
name = "chained"
action = "allow"
via = "up"

[[upstream.proxies]]
name = "up"
url = "socks5h://127.0.0.1:{up.port("up")}"
username = "{USER}"
password = "{PASSWORD}"
"""
    px: Intercepting | None = None
    try:
        px = await start_intercepting(home, tmp_path, pki, extra=extra)
        async with https_origin(pki.server_context()) as port:
            rc, out, err = await run(
                "curl", "-sS", "--max-time", "30", "--http1.1", "--cacert", str(px.ca_cert),
                "-x", px.http, "-w", "\n%{local_port}", f"https://localhost:{port}/hello",
            )  # fmt: skip
            assert rc == 0, err
            body, _, local_port = out.decode().rpartition("\n")
            assert body == "hello GET /hello"
            for _ in range(500):
                records = [f for f in px.flows() if f["id.orig_p"] == int(local_port)]
                if records:
                    break
                await asyncio.sleep(0.02)
            (record,) = records
            assert record["decrypted"] is True
            assert record["upstream_proxy"] == "up" and record["upstream_resolved"] is True
            assert (record["id.resp_h"], record["id.resp_p"]) == ("0.0.0.0", port)
    finally:
        if px is not None:
            await px.stop()
        shutil.rmtree(home, ignore_errors=True)
