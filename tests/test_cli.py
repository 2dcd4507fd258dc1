"""The command line as a user runs it: a real process, real signals."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

from proxytap import __version__
from tests.conftest import Origin, run, start_proxytap

ROOT = Path(__file__).resolve().parent.parent
PROXYTAP = [sys.executable, "-m", "proxytap"]


async def test_version() -> None:
    rc, out, _ = await run(*PROXYTAP, "--version")
    assert rc == 0
    assert out.decode().strip() == f"proxytap {__version__}"


async def test_help_lists_commands() -> None:
    rc, out, _ = await run(*PROXYTAP, "run", "--help")
    assert rc == 0
    for flag in ("--config", "--http", "--socks", "--mixed", "--sftap-home", "--loopback7"):
        assert flag in out.decode()


async def test_example_config_is_valid() -> None:
    rc, out, err = await run(*PROXYTAP, "check-config", str(ROOT / "deploy/proxytap.example.toml"))
    assert rc == 0, err
    assert out.decode().endswith(": ok\n")


async def test_bad_config_is_one_clear_line(tmp_path: Path) -> None:
    cases = {
        "[timeouts]\nbogus = 1\n": "timeouts.bogus: unknown key",
        "[timeouts]\nidle = -1\n": "timeouts.idle: must be > 0",
        "[timeouts]\nidle = 'x'\n": "timeouts.idle: expected a number, got str",
        "[[listeners]]\nkind = 'ftp'\naddress = '127.0.0.1:1'\n": (
            "listeners[0].kind: must be one of"
        ),
        "[[listeners]]\nkind = 'http'\naddress = 'nope'\n": (
            "listeners[0].address: expected HOST:PORT"
        ),
        "[export]\nformat = 'xml'\n": "export.format: must be text or binary",
        "not toml [": "is not valid TOML",
        # a near miss gets a suggestion, in every table that checks its keys
        "[timeouts]\nidel = 3\n": "timeouts.idel: unknown key; did you mean 'idle'?",
        "[export]\noverlod = 'wait'\n": "export.overlod: unknown key; did you mean 'overload'?",
        "[[access.rules]]\nname = 'x'\naction = 'deny'\ndomain = ['a.test']\n": (
            "access.rules[0].domain: unknown key; did you mean 'domains'?"
        ),
        "[export]\nsftap_home = '/tmp/x'\n[[export.rules]]\nname = 'r'\nnic = 1\n": (
            "export.rules[0].nic: unknown key; did you mean 'nice'?"
        ),
        "[timeouts]\nxyzzy = 3\n": "timeouts.xyzzy: unknown key",
    }
    for text, expected in cases.items():
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        for command in ("check-config", "run --config"):
            rc, _, err = await run(*PROXYTAP, *command.split(), str(cfg))
            assert rc == 2, (text, err)
            lines = err.decode().splitlines()
            assert len(lines) == 1, lines
            assert lines[0].startswith("proxytap: config error: ")
            assert expected in lines[0], (expected, lines[0])


async def test_run_serves_and_sigterm_drains_then_exits_zero(origin: Origin) -> None:
    proc, ports, _ = await start_proxytap(
        "--http",
        "127.0.0.1:0",
        "--socks",
        "127.0.0.1:0",
        "--mixed",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--allow-dest",
        "127.0.0.0/8",
        "--connect-ports",
        "1-65535",
    )
    try:
        assert set(ports) == {"http", "socks", "mixed"}
        rc, body, err = await run(
            "curl",
            "-sS",
            "--fail",
            "--socks5-hostname",
            f"127.0.0.1:{ports['socks']}",
            f"http://localhost:{origin.port}/hello",
        )
        assert rc == 0, err
        assert body == b"hello GET /hello"
        # an open tunnel during shutdown: it may drain, then the process exits 0
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["http"])
        writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(reader.readuntil(b"hello GET /hello"), 5)
        assert response.startswith(b"HTTP/1.1 200")
        rc = await asyncio.wait_for(proc.wait(), 15)
        assert rc == 0
        # no longer accepting
        try:
            _, w = await asyncio.open_connection("127.0.0.1", ports["socks"])
            w.close()
            raise AssertionError("listener still accepting after shutdown")
        except OSError:
            pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_check_config_refuses_what_run_refuses(tmp_path: Path) -> None:
    """One validation path: check-config says what run says, for the user file and sinks too."""
    sha = tmp_path / "sha.htpasswd"
    sha.write_text("alice:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n")  # unsalted: refused
    cases = {
        f"[auth]\nhtpasswd = '{tmp_path / 'missing.htpasswd'}'\n": "cannot read",
        f"[auth]\nhtpasswd = '{sha}'\n": "unsalted {SHA} hashes are not accepted",
        "[export]\nsftap_home = '/tmp/x'\nformats = { 'tcp/nope' = 'text' }\n": (
            "export.formats.tcp/nope: no such flow socket"
        ),
        "[[listeners]]\nkind = 'http'\naddress = '127.0.0.1:0'\n"
        "client_to_server = ['no_such_module']\n": "no_such_module",
    }
    for text, expected in cases.items():
        cfg = tmp_path / "c.toml"
        cfg.write_text(text)
        outputs = []
        for command in ("check-config", "run --admin off --config"):
            rc, _, err = await run(*PROXYTAP, *command.split(), str(cfg))
            assert rc == 2, (command, text, err)
            (line,) = err.decode().splitlines()
            assert line.startswith("proxytap: config error: ") and expected in line, line
            outputs.append(line)
        assert outputs[0] == outputs[1]


async def test_second_sigterm_during_the_drain_stops_at_once(
    origin: Origin, tmp_path: Path
) -> None:
    cfg = tmp_path / "grace.toml"
    cfg.write_text("[timeouts]\nshutdown_grace = 120.0\n")  # far longer than the wait below
    proc, ports, _ = await start_proxytap(
        "--config", str(cfg), "--http", "127.0.0.1:0", "--admin", "off",
        "--allow-dest", "127.0.0.0/8", "--connect-ports", "1-65535",
    )  # fmt: skip
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["http"])
        writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert proc.stderr is not None
        proc.send_signal(signal.SIGTERM)
        while b"draining" not in await asyncio.wait_for(proc.stderr.readline(), 10):
            pass
        # the open tunnel would hold the drain for the whole grace: a second signal ends it
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        rest = (await proc.stderr.read()).decode()
        assert "closing 1 connections still open (asked twice to stop)" in rest, rest
        try:
            got = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            got = None
        assert got is None, f"the tunnel ended with a clean end of file ({got!r}), not a reset"
        writer.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_startup_lines_name_each_listener_once_ipv6_bracketed(tmp_path: Path) -> None:
    cfg = tmp_path / "listeners.toml"
    cfg.write_text(
        "[[listeners]]\nkind = 'http'\naddress = '127.0.0.1:0'\nname = 'http'\n"
        "[[listeners]]\nkind = 'mixed'\naddress = '[::1]:0'\nname = 'edge'\n"
    )
    proc = await asyncio.create_subprocess_exec(
        *PROXYTAP, "run", "--config", str(cfg), "--admin", "off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        while not lines or "proxytap ready" not in lines[-1]:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, f"proxytap exited early: {lines}"
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    listening = [ln.split("listening: ", 1)[1].strip() for ln in lines if "listening: " in ln]
    assert len(listening) == 2, listening
    assert re.fullmatch(r"http on 127\.0\.0\.1:\d+", listening[0]), listening
    assert re.fullmatch(r"edge \(mixed\) on \[::1\]:\d+", listening[1]), listening


def test_readme_calls_the_program_one_way() -> None:
    """README: `proxytap ...` everywhere (after the one line that puts .venv/bin on PATH)."""
    text = (ROOT / "README.md").read_text()
    assert 'export PATH="$PWD/.venv/bin:$PATH"' in text
    assert text.count(".venv/bin/proxytap") == 1  # where it says what the program is
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    lines = [ln for b in blocks for ln in b.splitlines()]
    commands = [ln.split()[1] for ln in lines if ln.startswith("proxytap ")]
    assert commands and set(commands) <= {"run", "check-config", "tap", "flows", "ca"}, commands


async def test_ipv6_addresses_are_bracketed_in_log_lines(origin6: Origin) -> None:
    proc = await asyncio.create_subprocess_exec(
        *PROXYTAP, "run", "--http", "[::1]:0", "--admin", "off", "--allow-dest", "::1/128",
        "--connect-ports", "1-65535",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        port = 0
        while "proxytap ready" not in (lines[-1] if lines else ""):
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, f"proxytap exited early: {lines}"
            lines.append(line)
            if m := re.search(r"listening: http on \[::1\]:(\d+)$", line.strip()):
                port = int(m.group(1))
        assert port, lines
        for extra in ((), ("-p",)):  # plain HTTP, then a CONNECT tunnel
            rc, body, err = await run(
                "curl", "-sS", *extra, "-x", f"http://[::1]:{port}",
                f"http://[::1]:{origin6.port}/hello",
            )  # fmt: skip
            assert rc == 0 and body == b"hello GET /hello", err
    finally:
        proc.send_signal(signal.SIGTERM)
        out = (await asyncio.wait_for(proc.stderr.read(), 20)).decode()
        await asyncio.wait_for(proc.wait(), 20)
    access = [ln for ln in out.splitlines() if "proxytap.access" in ln]
    dest = f"[::1]:{origin6.port}"
    plain = [ln for ln in access if f" GET {dest}/hello " in ln]
    tunnel = [ln for ln in access if ln.split("proxytap.access: ", 1)[1].startswith("tunnel ")]
    assert len(plain) == 1 and re.search(r"access: \[::1\]:\d+ GET ", plain[0]), access
    assert len(tunnel) == 1 and f"-> {dest} ({dest})" in tunnel[0], access
    assert re.search(r"tunnel http-connect \[::1\]:\d+ -> ", tunnel[0]), tunnel
