"""Modules (addons/) end to end: loading, chains, every hook, failing closed.

Modules under test are written to a temporary directory as real files and
loaded by name, as an operator's would be; traffic goes through a real
in-process proxy to raw origins that record every byte.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from python_socks import ProxyError, ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.config import Config, ListenerConfig, ModulesConfig
from proxytap.errors import ConfigError
from proxytap.modules.loader import build_chains, check_modules, header_rules
from tests.conftest import (
    TEST_ACCESS,
    ProxyFactory,
    RawServer,
    RunningProxy,
    exchange,
    here,
    run,
    wait_until,
)
from tests.front.test_http_forward import Script, error_reply, ok, read_message

ADDONS = here().parent / "addons"
VIA = b"Via: 1.1 proxytap\r\n"


def config(
    tmp_path: Path,
    c2s: tuple[str, ...] | None = None,
    s2c: tuple[str, ...] | None = None,
    **modules: str,
) -> Config:
    """A mixed listener named "http" with these chains; ``modules`` are NAME=source files."""
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return Config(
        listeners=(
            ListenerConfig(
                kind="mixed",
                address="127.0.0.1:0",
                name="http",
                client_to_server=c2s,
                server_to_client=s2c,
            ),
        ),
        access=TEST_ACCESS,
        modules=ModulesConfig(path=(str(tmp_path), str(ADDONS))),
    )


async def start_script(raw_server: ProxyFactory, *answers: bytes) -> tuple[Script, RawServer]:
    script = Script(list(answers))
    server: RawServer = await raw_server(script)
    return script, server


async def fetch(proxy: RunningProxy, request: bytes) -> bytes:
    """One response (kept-alive connections do not close after it)."""
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(request)
    try:
        return (await asyncio.wait_for(read_message(reader), 5)).raw
    finally:
        writer.close()


def get(port: int, path: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET http://127.0.0.1:%d%b HTTP/1.1\r\n%b\r\n" % (port, path, extra)


# -- the shipped example: addons/strip_tracking.py --------------------------------------


async def test_strip_tracking_changes_traffic(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, tmp_path: Path
) -> None:
    cfg = config(tmp_path, ("validate", "rewrite", "strip_tracking"))
    proxy: RunningProxy = await start_proxy(cfg)
    script, server = await start_script(raw_server, ok(), ok(), ok())
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(
        get(
            server.port,
            b"/article?id=7&utm_source=news&utm_medium=mail&fbclid=IwAR0&lang=en&GCLID=x",
            b"Cookie: _ga=GA1.2.3; session=abc; _gid=GA1.4; _ga_X1Y2=GS1; theme=dark\r\n"
            b"Accept: */*\r\n",
        )
    )
    assert (await read_message(reader)).status == 200
    writer.write(get(server.port, b"/?utm_campaign=x", b"Cookie: _fbp=fb.1; __utma=1\r\n"))
    assert (await read_message(reader)).status == 200
    writer.write(get(server.port, b"/plain?q=utm_source", b"Cookie: a=1\r\n"))  # untouched
    assert (await read_message(reader)).status == 200
    writer.close()
    first, second, third = script.requests
    assert first.raw == (
        b"GET /article?id=7&lang=en HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Cookie: session=abc; theme=dark\r\nAccept: */*\r\n%b\r\n" % (server.port, VIA)
    )
    assert second.raw == b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%b\r\n" % (server.port, VIA)
    assert third.raw == (
        b"GET /plain?q=utm_source HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nCookie: a=1\r\n%b\r\n"
        % (server.port, VIA)
    )
    assert proxy.app.services.stats.module_errors == Counter()


async def test_strip_tracking_options_and_position(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, tmp_path: Path
) -> None:
    """Before ``rewrite`` in the chain (the hooks run one by one), with extra names."""
    cfg = config(tmp_path, ("validate", "strip_tracking", "rewrite"))
    cfg = Config(
        listeners=cfg.listeners,
        access=TEST_ACCESS,
        modules=ModulesConfig(
            path=(str(ADDONS),), options={"strip_tracking": {"params": ["ref_src"]}}
        ),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    script, server = await start_script(raw_server, ok())
    got = await fetch(proxy, get(server.port, b"/a?ref_src=tw&b=1&utm_id=3"))
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    (req,) = script.requests
    assert req.raw == b"GET /a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%b\r\n" % (server.port, VIA)


# -- chains and loading -----------------------------------------------------------------


def test_default_chain_and_validate_first(tmp_path: Path) -> None:
    chains = build_chains(config(tmp_path), header_rules(Config()), Counter())
    assert chains["http"].names == (("validate", "rewrite"), ("validate", "rewrite"))
    assert not chains["http"].active  # the fast path: no module calls at all
    cfg = config(tmp_path, ("strip_tracking",), ("validate",))
    chain = build_chains(cfg, header_rules(cfg), Counter())["http"]
    assert chain.names == (("validate", "strip_tracking"), ("validate",))  # validate implied
    assert not chain.rewrite_requests and not chain.rewrite_responses
    with pytest.raises(ConfigError) as info:
        config(tmp_path, ("rewrite", "validate")).validate()
    assert info.value.key == "listeners[0].client_to_server[1]"
    with pytest.raises(ConfigError, match="named twice"):
        config(tmp_path, ("strip_tracking", "strip_tracking")).validate()


BROKEN = {
    "syntax": ("def create(options) ->:\n", "failed to load"),
    "raises": ("raise RuntimeError('no')\n", "RuntimeError"),
    "nocreate": ("X = 1\n", "defines no create"),
    "createfails": ("def create(options):\n    raise ValueError('bad option')\n", "bad option"),
    "noname": (
        "class M:\n    def request(self, ctx, req): pass\ndef create(options):\n    return M()\n",
        "without a name",
    ),
    "nohooks": (
        "class M:\n    name = 'nohooks'\ndef create(options):\n    return M()\n",
        "defines none of the hooks",
    ),
    "badhook": (
        "class M:\n    name = 'badhook'\n    request = 3\ndef create(options):\n    return M()\n",
        "not callable",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_module_that_fails_to_load_stops_start_up(tmp_path: Path, name: str) -> None:
    source, problem = BROKEN[name]
    cfg = config(tmp_path, ("validate", name), **{name: source})
    with pytest.raises(ConfigError) as info:
        check_modules(cfg)
    assert info.value.key == "listeners[0].client_to_server"
    assert problem in info.value.problem


def test_unknown_module_and_stray_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no module 'nosuch': no nosuch\.py in"):
        check_modules(config(tmp_path, ("nosuch",)))
    with pytest.raises(ConfigError, match="does not exist"):
        check_modules(config(tmp_path, (str(tmp_path / "missing.py"),)))
    with pytest.raises(ConfigError, match="neither a module name"):
        check_modules(config(tmp_path, ("bad-name",)))
    cfg = Config(modules=ModulesConfig(options={"strip_tracking": {}}))
    with pytest.raises(ConfigError) as info:
        check_modules(cfg)
    assert info.value.key == "modules.options.strip_tracking"
    cfg = Config(
        listeners=(
            ListenerConfig("http", "127.0.0.1:0", "h", client_to_server=("strip_tracking",)),
        ),
        modules=ModulesConfig(path=(str(ADDONS),), options={"strip_tracking": {"nope": 1}}),
    )
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        check_modules(cfg)


async def test_check_config_and_run_report_a_broken_module(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import does_not_exist\n")
    conf = tmp_path / "p.toml"
    conf.write_text(
        f"[[listeners]]\nkind = 'http'\naddress = '127.0.0.1:0'\n"
        f"client_to_server = ['validate', 'broken']\n[modules]\npath = ['{tmp_path}']\n"
    )
    proxytap = (sys.executable, "-m", "proxytap")  # the interpreter running the tests
    code, out, err = await run(*proxytap, "check-config", str(conf))
    assert code == 2, (out, err)
    assert b"listeners[0].client_to_server: module 'broken'" in err
    assert b"ModuleNotFoundError" in err
    code, out, err = await run(*proxytap, "run", "--config", str(conf), "--admin", "off")
    assert code == 2, (out, err)
    assert b"config error: listeners[0].client_to_server: module 'broken'" in err
    good = tmp_path / "good.toml"
    good.write_text(
        f"[[listeners]]\nkind = 'http'\naddress = '127.0.0.1:0'\n"
        f"client_to_server = ['validate', 'rewrite', 'strip_tracking']\n"
        f"[modules]\npath = ['{ADDONS}']\n"
    )
    code, out, err = await run(*proxytap, "check-config", str(good))
    assert code == 0, (out, err)


# -- request and response hooks ---------------------------------------------------------

BOOM = """
    class Boom:
        name = "boom"

        def request(self, ctx, req):
            if req.path.startswith(b"/boom"):
                raise RuntimeError("module bug")

    def create(options):
        return Boom()
"""


async def test_an_exception_in_a_module_fails_closed(
    start_proxy: ProxyFactory,
    raw_server: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy: RunningProxy = await start_proxy(config(tmp_path, ("validate", "boom"), boom=BOOM))
    script, server = await start_script(raw_server, ok())
    with caplog.at_level(logging.ERROR, logger="proxytap.modules"):
        got = await exchange(proxy.http, get(server.port, b"/boom"))
    assert got == error_reply(
        b"500 Internal Server Error",
        b"proxy_internal_error",
        b"a proxy module failed to process the request",
    )
    assert proxy.app.services.stats.module_errors == Counter({"boom": 1})
    assert "module boom failed in request" in caplog.text
    assert "RuntimeError: module bug" in caplog.text  # with its traceback
    assert script.connections == 0  # nothing went upstream
    assert (await fetch(proxy, get(server.port, b"/fine"))).startswith(b"HTTP/1.1 200 OK")


BREAKER = """
    class Breaker:
        name = "breaker"

        def request(self, ctx, req):
            what = req.path.decode()[1:]
            if what == "te":
                req.add("Transfer-Encoding", "chunked")
            elif what == "crlf":
                req.set("X-Evil", "a\\r\\nContent-Length: 5")
            elif what == "nul":
                req.add("X-Nul", b"a\\x00b")
            elif what == "name":
                req.add("Bad Name", "x")
            elif what == "host":
                req.add("Host", "elsewhere.example")
            elif what == "cl":
                req.remove("Content-Length")
            elif what == "path":
                req.path = b"/a b"
            elif what == "connection":
                req.add("Connection", "close")
            elif what == "type":
                req.headers.append(("X-Str", "not bytes"))

    def create(options):
        return Breaker()
"""


@pytest.mark.parametrize(
    "what", ["te", "crlf", "nul", "name", "host", "cl", "path", "connection", "type"]
)
async def test_a_module_cannot_smuggle_through_the_head(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, tmp_path: Path, what: str
) -> None:
    proxy: RunningProxy = await start_proxy(
        config(tmp_path, ("validate", "rewrite", "breaker"), breaker=BREAKER)
    )
    script, server = await start_script(raw_server, ok())
    request = b"POST http://127.0.0.1:%d/%b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" % (
        server.port,
        what.encode(),
    )
    got = await exchange(proxy.http, request)
    assert got.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), got
    assert proxy.app.services.stats.module_errors == Counter({"breaker": 1})
    assert script.connections == 0


GATE = """
    from proxytap.modules import Refuse

    class Gate:
        name = "gate"

        def __init__(self, blocked):
            self.blocked = blocked.encode()
            self.closed = []

        def on_connect(self, ctx):
            ctx.state["seen"] = True
            if ctx.port == 9:
                raise Refuse(403, "port 9 is closed here", socks_code=0x02)

        def request(self, ctx, req):
            assert ctx.state["seen"] and ctx.protocol == "http-forward"
            if req.path.startswith(self.blocked):
                raise Refuse(451, "unavailable for legal reasons")
            req.add("X-User-Seen", ctx.user or "-")

        def response(self, ctx, resp):
            if resp.get("X-Block") is not None:
                raise Refuse(403, "the response was refused")
            resp.set("X-Gate", b"%d" % resp.status)

        def on_close(self, ctx):
            self.closed.append((ctx.protocol, ctx.host, ctx.port))

    def create(options):
        return Gate(options["blocked"])
"""


async def test_refusals_and_header_changes_both_ways(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path, ("validate", "rewrite", "gate"), ("validate", "rewrite", "gate"), gate=GATE
    )
    cfg = Config(
        listeners=cfg.listeners,
        access=TEST_ACCESS,
        modules=ModulesConfig(path=(str(tmp_path),), options={"gate": {"blocked": "/secret"}}),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    gate = proxy.app.services.chains["http"].modules[-1]
    script, server = await start_script(
        raw_server, ok(b"fine", b"X-Origin: 1\r\n"), ok(b"no", b"X-Block: yes\r\n")
    )
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(get(server.port))
    resp = await read_message(reader)
    assert resp.raw == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Origin: 1\r\n%bX-Gate: 200\r\n"
        b"Connection: keep-alive\r\n\r\nfine" % VIA
    )
    (req,) = script.requests
    assert req.raw == (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%bX-User-Seen: -\r\n\r\n" % (server.port, VIA)
    )
    # a refused response: the client gets the module's status, not the origin's answer
    writer.write(get(server.port))
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest == error_reply(
        b"403 Forbidden", b"http_request_denied", b"the response was refused"
    )
    writer.close()
    # a refused request: nothing goes upstream
    got = await exchange(proxy.http, get(server.port, b"/secret/x"))
    assert got == error_reply(
        b"451 Unavailable For Legal Reasons",
        b"http_request_denied",
        b"unavailable for legal reasons",
    )
    assert len(script.requests) == 2
    got = await exchange(proxy.http, get(9))
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n") and got.endswith(
        b"port 9 is closed here\n"
    )
    # the same module refuses tunnels in on_connect: SOCKS5 0x02, CONNECT 403
    with pytest.raises(ProxyError) as info:
        await Proxy(ProxyType.SOCKS5, *proxy.http).connect("127.0.0.1", 9, timeout=5)
    assert info.value.error_code == 0x02
    got = await exchange(proxy.http, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n") and got.endswith(
        b"port 9 is closed here\n"
    )
    await wait_until(lambda: len(gate.closed) == 6, what="on_close for every exchange")
    assert sorted(gate.closed) == sorted(
        [("http-forward", "127.0.0.1", server.port)] * 3
        + [("http-forward", "127.0.0.1", 9), ("socks5", "127.0.0.1", 9)]
        + [("http-connect", "127.0.0.1", 9)]
    )
    refusals = proxy.app.services.stats.refusals
    assert refusals[("module", "port 9 is closed here")] == 2
    assert proxy.app.services.stats.module_errors == Counter()


# -- byte hooks -------------------------------------------------------------------------

SHOUT = """
    class Shout:
        name = "shout"

        def __init__(self):
            self.opened = 0
            self.closed = 0

        def on_connect(self, ctx):
            self.opened += 1

        def client_to_server(self, ctx, data):
            if b"explode" in data:
                raise ValueError("cannot shout that")
            return data.upper()

        def server_to_client(self, ctx, data):
            return data.replace(b"o", b"0")

        def on_close(self, ctx):
            self.closed += 1

    def create(options):
        return Shout()
"""


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(b"echo:" + data)
        await writer.drain()


async def test_tunnel_bytes_through_modules(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, tmp_path: Path
) -> None:
    cfg = config(tmp_path, ("validate", "shout"), ("validate", "shout"), shout=SHOUT)
    proxy: RunningProxy = await start_proxy(cfg)
    shout = proxy.app.services.chains["http"].modules[-1]
    server: RawServer = await raw_server(echo)
    # SOCKS5 and CONNECT: up upper-cased, down with zeros, the tap sees what was sent
    sock = await Proxy(ProxyType.SOCKS5, *proxy.http).connect("127.0.0.1", server.port, timeout=5)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"hello world")
    assert await reader.readexactly(16) == b"ech0:HELLO WORLD"
    writer.close()
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\nfoo"
        % (server.port, server.port)
    )
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert await reader.readexactly(8) == b"ech0:FOO"
    # an exception closes the tunnel (fail closed), logged and counted
    writer.write(b"now explode")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await proxy.recorder.wait_destroyed(2)
    assert proxy.app.services.stats.module_errors == Counter({"shout": 1})
    flows = proxy.recorder.flows()
    from proxytap.flows.table import DOWN, UP

    assert proxy.recorder.data(flows[0], UP) == b"HELLO WORLD"
    assert proxy.recorder.data(flows[0], DOWN) == b"ech0:HELLO WORLD"
    assert proxy.recorder.data(flows[1], UP) == b"FOO"
    assert (shout.opened, shout.closed) == (2, 2)


async def test_http_bodies_through_modules(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, tmp_path: Path
) -> None:
    cfg = config(tmp_path, ("validate", "rewrite", "shout"), ("validate", "shout"), shout=SHOUT)
    proxy: RunningProxy = await start_proxy(cfg)
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nfoo\r\n2\r\nxo\r\n0\r\n\r\n"
    )
    script, server = await start_script(raw_server, ok(b"good"), chunked, ok(b"x"))
    reader, writer = await asyncio.open_connection(*proxy.http)
    # a Content-Length body keeps its length; a chunked one is chunked again
    writer.write(
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" % server.port
    )
    assert (await read_message(reader)).body == b"g00d"
    writer.write(
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n" % server.port
    )
    resp = await read_message(reader)
    assert resp.body == b"f00x0"
    assert resp.raw.endswith(b"\r\n\r\n3\r\nf00\r\n2\r\nx0\r\n0\r\n\r\n")
    first, second = script.requests[:2]
    assert first.body == b"HELLO"
    assert second.body == b"ABC"
    assert second.raw.endswith(b"\r\n\r\n2\r\nAB\r\n1\r\nC\r\n0\r\n\r\n")
    # an exception in a body hook: 500 before the response started
    writer.write(
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nContent-Length: 7\r\n\r\nexplode" % server.port
    )
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), rest
    writer.close()
    assert proxy.app.services.stats.module_errors == Counter({"shout": 1})


WHO = """
    class Who:
        name = "who"

        def on_connect(self, ctx):
            ctx.state["user"] = ctx.user

        def request(self, ctx, req):
            req.add("X-Proxy-User", ctx.state["user"] or "-")

        def client_to_server(self, ctx, data):
            return data.replace(b"secret", b"******")

    def create(options):
        return Who()
"""


async def test_modules_see_the_authenticated_user(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, tmp_path: Path
) -> None:
    """The hooks of the first request run once its credentials were checked (in a task)."""
    htpasswd = tmp_path / "htpasswd"
    proc = await asyncio.create_subprocess_exec("htpasswd", "-bcB", str(htpasswd), "alice", "pw")
    assert await proc.wait() == 0
    from proxytap.policy.auth import AuthConfig, basic_credentials

    cfg = config(tmp_path, ("validate", "rewrite", "who"), who=WHO)
    cfg = Config(
        listeners=cfg.listeners,
        access=TEST_ACCESS,
        modules=cfg.modules,
        auth=AuthConfig(htpasswd=str(htpasswd)),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    script, server = await start_script(raw_server, ok(), ok())
    creds = basic_credentials("alice", "pw").encode()
    reader, writer = await asyncio.open_connection(*proxy.http)
    for _ in range(2):  # the body arrives with the head, before the check is done
        writer.write(
            b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nProxy-Authorization: %b\r\n"
            b"Content-Length: 9\r\n\r\nmy secret" % (server.port, creds)
        )
        assert (await read_message(reader)).status == 200
    writer.close()
    for req in script.requests:
        assert req.get("X-Proxy-User") == "alice"
        assert req.body == b"my ******"


async def test_a_bug_in_the_built_in_rules_fails_closed(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, tmp_path: Path
) -> None:
    proxy: RunningProxy = await start_proxy(config(tmp_path))
    script, server = await start_script(raw_server, ok())

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug")

    proxy.app.services.rules.prepare_request = broken  # type: ignore[method-assign]
    got = await exchange(proxy.http, get(server.port))
    assert got.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"error=proxy_internal_error" in got
    assert proxy.app.services.stats.module_errors == Counter({"validate": 1})
    proxy.app.services.rules.prepare_response = broken  # type: ignore[method-assign]
    del proxy.app.services.rules.prepare_request  # the class's own again
    got = await exchange(proxy.http, get(server.port))
    assert got.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert proxy.app.services.stats.module_errors == Counter({"validate": 2})
    assert len(script.requests) == 1  # the request went, the response did not come back
