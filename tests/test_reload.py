"""Config reload on SIGHUP: a real proxytap process, its config file rewritten mid-run.

New connections follow the new config; a tunnel opened before keeps relaying;
an invalid config is one log line, counted, and the running config stays; a
key that needs a restart keeps its running value with a warning; the command
line's overrides survive the reload. The pure part (which keys need a
restart) is tested on ``proxytap.reload`` directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from proxytap.config import (
    Config,
    ExportConfig,
    ListenerConfig,
    LogConfig,
    PcapConfig,
    from_dict,
    load,
)
from proxytap.export.sftap_server import SftapServer
from proxytap.reload import RESTART_KEYS, get, keep_restart_keys, replace
from tests.conftest import TEST_ACCESS, ProxyFactory, RawServer, RunningProxy, run
from tests.export.sftap_helpers import short_tmp
from tests.proxyproc import Proxytap, launch

BASE = """
[[listeners]]
kind = "mixed"
address = "127.0.0.1:0"
name = "mixed"

[admin]
address = "127.0.0.1:0"
"""
DENY_ECHO = """
[[access.rules]]
name = "no-echo"
action = "deny"
ports = [{port}]
"""


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@pytest.fixture
async def echo_server(raw_server: Callable[..., Any]) -> RawServer:
    return await raw_server(echo)  # type: ignore[no-any-return]


@pytest.fixture
async def stopped() -> AsyncIterator[list[Proxytap]]:
    started: list[Proxytap] = []
    yield started
    for px in started:
        await px.stop()


async def tunnel(px: Proxytap, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A SOCKS5 tunnel (python-socks) through ``px`` to 127.0.0.1:``port``."""
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{px.port('mixed')}")
    sock = await proxy.connect(dest_host="127.0.0.1", dest_port=port, timeout=10)
    return await asyncio.open_connection(sock=sock)


async def echoes(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes) -> bytes:
    reader, writer = stream
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 10)


async def hup(px: Proxytap, result: str, count: int) -> None:
    """SIGHUP, then wait for the reload to be counted as ``result``."""
    px.proc.send_signal(signal.SIGHUP)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await px.metric("proxytap_config_reloads_total", result=result) < count:
        assert loop.time() < deadline, f"reload {result} #{count} not counted"
        await asyncio.sleep(0.05)


async def test_a_rule_changed_on_sighup_while_a_tunnel_stays_up(
    tmp_path: Path, echo_server: RawServer, stopped: list[Proxytap]
) -> None:
    config = tmp_path / "proxytap.toml"
    config.write_text(BASE)
    # loopback destinations come from the command line: the reload must keep them
    px = await launch(config, "--allow-dest", "127.0.0.0/8", "--connect-ports", "1-65535")
    stopped.append(px)
    assert await px.metric("proxytap_config_last_reload_success_timestamp_seconds") == 0
    old = await tunnel(px, echo_server.port)
    assert await echoes(old, b"before") == b"before"

    config.write_text(BASE + DENY_ECHO.format(port=echo_server.port))
    await hup(px, "ok", 1)
    line = await px.logged("config reloaded: changed access")
    assert "open ones keep theirs" in line
    reloaded_at = await px.metric("proxytap_config_last_reload_success_timestamp_seconds")
    assert reloaded_at > 0
    # new connections follow the new rule, with the precise replies
    with pytest.raises(ProxyError) as info:
        await tunnel(px, echo_server.port)
    assert info.value.error_code == 0x02
    rc, out, _ = await run(
        "curl", "-sS", "--max-time", "10", "-i", "-x", f"http://127.0.0.1:{px.port('mixed')}",
        f"http://127.0.0.1:{echo_server.port}/",
    )  # fmt: skip
    assert rc == 0 and out.startswith(b"HTTP/1.1 403 ")
    assert b"denied by rule 'no-echo'" in out
    assert await px.metric("proxytap_policy_denied_total", rule="no-echo") == 2
    # the tunnel opened before still relays, both ways
    assert await echoes(old, b"after the reload" * 1000) == b"after the reload" * 1000

    # an invalid config: one line naming the key, counted, the running config stays
    config.write_text(BASE + '[[access.rules]]\nname = "x"\naction = "maybe"\n')
    await hup(px, "error", 1)
    line = await px.logged(r"config reload rejected, the running config stays")
    assert "access.rules[0].action: must be allow or deny" in line
    with pytest.raises(ProxyError) as info:
        await tunnel(px, echo_server.port)
    assert info.value.error_code == 0x02  # no-echo still in force
    assert await px.metric("proxytap_config_reloads_total", result="ok") == 1
    assert await px.metric("proxytap_config_last_reload_success_timestamp_seconds") == reloaded_at
    assert await echoes(old, b"still") == b"still"

    # back to allowing: a new tunnel works again (and --allow-dest still applies)
    config.write_text(BASE)
    await hup(px, "ok", 2)
    assert await echoes(await tunnel(px, echo_server.port), b"again") == b"again"
    assert await echoes(old, b"end") == b"end"
    old[1].close()


async def test_users_restart_only_keys_and_an_unreadable_file(
    tmp_path: Path, echo_server: RawServer, stopped: list[Proxytap]
) -> None:
    """The htpasswd file is read again; a listener change waits for a restart, with a warning."""
    users = tmp_path / "users"

    def write_users(name: str) -> None:
        digest = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
        users.write_text(f"{name}:{digest}\n")

    write_users("alice")
    config = tmp_path / "proxytap.toml"
    auth = f'[auth]\nhtpasswd = "{users}"\n'
    config.write_text(BASE + auth)
    px = await launch(config, "--allow-dest", "127.0.0.0/8")
    stopped.append(px)
    port = px.port("mixed")

    async def login(name: str) -> bool:
        proxy = Proxy.from_url(f"socks5://{name}:pw@127.0.0.1:{port}")
        try:
            sock = await proxy.connect(dest_host="127.0.0.1", dest_port=echo_server.port)
        except ProxyError:
            return False
        sock.close()
        return True

    assert await login("alice") and not await login("bob")
    write_users("bob")
    moved = BASE.replace('address = "127.0.0.1:0"\nname', 'address = "127.0.0.1:1"\nname', 1)
    config.write_text(moved + auth)
    await hup(px, "ok", 1)
    assert await login("bob") and not await login("alice")
    line = await px.logged("config reload: listeners changed but take effect only on a restart")
    assert "WARNING" in line
    assert px.port("mixed") == port  # still served where it was

    users.unlink()  # the file named by the config is gone: rejected, bob stays
    await hup(px, "error", 1)
    assert "auth.htpasswd" in await px.logged("config reload rejected")
    assert await login("bob")


# -- the pure part -----------------------------------------------------------------------------


def test_restart_only_keys_keep_their_running_values() -> None:
    running = from_dict({"listeners": [{"kind": "http", "address": "127.0.0.1:8080"}]})
    new = from_dict(
        {
            "listeners": [{"kind": "http", "address": "127.0.0.1:9090"}],
            "access": {"rules": [{"name": "r", "action": "deny"}]},
            "export": {"sftap_home": "/tmp/x", "classify_timeout": 2.0, "overload": "wait"},
            "log": {"flows": "/tmp/flows.json", "level": "debug"},
        }
    )
    applied, changed = keep_restart_keys(running, new)
    assert changed == ["listeners", "export.sftap_home", "log.flows"]
    assert applied.listeners == running.listeners
    assert applied.export.sftap_home is None and applied.log.flows is None
    # what is live is taken over
    assert applied.access == new.access
    assert (applied.export.classify_timeout, applied.export.overload) == (2.0, "wait")
    assert applied.log.level == "debug"
    assert keep_restart_keys(running, running) == (running, [])


def test_every_restart_key_names_a_config_key() -> None:
    for key in RESTART_KEYS:
        head, _, rest = key.partition(".")
        section = getattr(Config(), head)
        if rest:
            assert dataclasses.is_dataclass(section) and rest in {
                f.name for f in dataclasses.fields(section)
            }, key


def test_get_and_replace_reach_nested_keys() -> None:
    cfg = Config(export=ExportConfig(pcap=PcapConfig(dir="/a")), log=LogConfig(level="info"))
    assert get(cfg, "export.pcap.dir") == "/a"
    changed = replace(cfg, "export.pcap", PcapConfig(dir="/b"))
    assert changed.export.pcap.dir == "/b" and cfg.export.pcap.dir == "/a"
    assert changed.log == cfg.log


# -- export settings, in process ---------------------------------------------------------------


async def test_export_settings_on_reload(start_proxy: ProxyFactory) -> None:
    """Classification and overload policies change live; other flow sockets need a restart."""
    with short_tmp() as home:
        base = Config(
            listeners=(ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),),
            access=TEST_ACCESS,
            export=ExportConfig(sftap_home=str(home)),
        )
        proxy: RunningProxy = await start_proxy(base)
        app = proxy.app
        (served,) = [s for s in app.sinks if isinstance(s, SftapServer)]
        sockets = set(served.interfaces)
        classifier = app.hub.classifier
        # the same sockets, other matches and policies: all live
        live = dataclasses.replace(
            base.export,
            rules=({"name": "http", "port": [8080]},),
            overload="wait",
            max_wait=0.5,
            on_gap="cut",
            classify_timeout=1.5,
        )
        assert await app.reload(lambda: dataclasses.replace(base, export=live))
        assert app.hub.classifier is not classifier and served.classifier is app.hub.classifier
        assert app.hub.timeout == 1.5
        assert (served.overload, served.max_wait, served.cut) == ("wait", 0.5, True)
        assert app.config.export.rules == live.rules
        assert app.services.stats.config_reloads["ok"] == 1
        # a new rule name would need a new socket: kept for a restart, the rest applies
        more = dataclasses.replace(live, rules=({"name": "extra", "port": [9999]},), max_wait=1.0)
        assert await app.reload(lambda: dataclasses.replace(base, export=more))
        assert app.config.export.rules == live.rules and served.max_wait == 1.0
        assert set(served.interfaces) == sockets
        # the file could not be read: rejected, counted
        assert not await app.reload(lambda: load(home / "missing.toml"))
        assert app.services.stats.config_reloads == {"ok": 2, "error": 1}
