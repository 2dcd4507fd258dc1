"""Shutdown with tunnels still open: they are reset toward both sides and recorded as such.

Issue L item 3. The real process (``python -m proxytap run``), a real flow-socket
reader, the JSON flow log and the access log on stderr: a tunnel the client
keeps open past ``timeouts.shutdown_grace`` must not look like a normal end to
anyone: the client and the origin get a reset (ECONNRESET, not EOF), and the
flow log, the access line and the exported DESTROYED say ``shutdown``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path

from proxytap.proto.sftap import DESTROYED, decode_text
from tests.conftest import start_proxytap
from tests.export.sftap_helpers import short_tmp


async def _socks5(port: int, dest_port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x05\x01\x00")
    assert await r.readexactly(2) == b"\x05\x00"
    w.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + dest_port.to_bytes(2, "big"))
    reply = await r.readexactly(10)
    assert reply[:2] == b"\x05\x00", reply
    return r, w


async def _connect(port: int, dest_port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"CONNECT 127.0.0.1:{dest_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    return r, w


async def test_tunnels_open_after_the_grace_are_reset_and_say_shutdown(tmp_path: Path) -> None:
    origin_sides: list[asyncio.StreamReader] = []
    origin_saw: list[BaseException | bytes] = []

    async def echo_once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        origin_sides.append(r)
        w.write(await r.readexactly(20))  # 20 bytes each way, then the tunnel stays open
        try:
            origin_saw.append(await r.read())
        except ConnectionResetError as exc:
            origin_saw.append(exc)
        w.close()

    origin = await asyncio.start_server(echo_once, "127.0.0.1", 0)
    origin_port = origin.sockets[0].getsockname()[1]
    with short_tmp() as home:
        flowlog = tmp_path / "flows.json"
        config = tmp_path / "proxytap.toml"
        config.write_text(
            f"""
[[listeners]]
kind = "http"
address = "127.0.0.1:0"
name = "http"

[[listeners]]
kind = "socks"
address = "127.0.0.1:0"
name = "socks"

[access]
allow_dest = ["127.0.0.0/8"]
connect_ports = ["1-65535"]

[timeouts]
shutdown_grace = 0.5

[export]
sftap_home = "{home}"

[log]
flows = "{flowlog}"

[admin]
address = "off"
"""
        )
        proc, ports, _ = await start_proxytap("--config", str(config))
        try:
            tap = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            tap.connect(str(home / "tcp" / "default"))
            tunnels = [
                await _connect(ports["http"], origin_port),
                await _socks5(ports["socks"], origin_port),
            ]
            for i, (r, w) in enumerate(tunnels):
                msg = f"an unknown protocol{i}".encode()[:20]
                w.write(msg)
                assert await asyncio.wait_for(r.readexactly(20), 5) == msg
            proc.send_signal(signal.SIGTERM)
            for r, _ in tunnels:  # the client sees a reset, not an end of file
                try:
                    got = await asyncio.wait_for(r.read(), 10)
                except ConnectionResetError:
                    continue
                raise AssertionError(f"a clean end of file after {got!r}, not a reset")
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            assert proc.stderr is not None
            stderr = (await proc.stderr.read()).decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for _, w in locals().get("tunnels", []):
                w.close()
        for _ in range(100):  # the origin's side: reset too
            if len(origin_saw) == 2:
                break
            await asyncio.sleep(0.05)
        origin.close()
        assert [type(x) for x in origin_saw] == [ConnectionResetError] * 2, origin_saw

        # the access log: each tunnel's line says shutdown
        access = [ln for ln in stderr.splitlines() if f":{origin_port} (" in ln and "tunnel" in ln]
        assert len(access) == 2, stderr
        assert all(" shutdown " in ln for ln in access), access
        # the flow log
        records = [json.loads(ln) for ln in flowlog.read_text().splitlines()]
        assert [r["close_reason"] for r in records] == ["shutdown", "shutdown"], records
        # the exported DESTROYED (read as an analyzer would, after the proxy is gone)
        tap.settimeout(5)
        stream = bytearray()
        while chunk := tap.recv(65536):
            stream += chunk
        tap.close()
        reasons = []
        while stream:
            line, _, rest = bytes(stream).partition(b"\n")
            ev = decode_text(line + b"\n")
            stream = bytearray(rest[ev.length if ev.event == "DATA" else 0 :])
            if ev.event == DESTROYED:
                reasons.append(ev.reason)
        assert reasons == ["SHUTDOWN", "SHUTDOWN"], reasons
