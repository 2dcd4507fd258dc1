"""proxytap.config: TOML -> one frozen, validated Config; a bad file names the key, in one line."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from proxytap.config import (
    DEFAULT_LISTENERS,
    AdminConfig,
    Config,
    ExportConfig,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    ModulesConfig,
    Timeouts,
    TlsCheckConfig,
    UpstreamConfig,
    from_dict,
    load,
    parse_hostport,
)
from proxytap.errors import ConfigError
from proxytap.policy.acl import _RULE_KEYS, AccessConfig
from proxytap.policy.auth import AuthConfig
from proxytap.policy.chain import PROXY_KEYS
from proxytap.policy.headers import DEFAULT_METHODS, HttpConfig

EXAMPLE = Path(__file__).parent.parent / "deploy" / "proxytap.example.toml"

SECTIONS: dict[str, Any] = {
    "timeouts": Timeouts,
    "upstream": UpstreamConfig,
    "limits": LimitsConfig,
    "export": ExportConfig,
    "log": LogConfig,
    "admin": AdminConfig,
    "access": AccessConfig,
    "auth": AuthConfig,
    "tls": TlsCheckConfig,
    "http": HttpConfig,
    "modules": ModulesConfig,
}


def config_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return info.value


def assert_one_line(exc: ConfigError, key: str) -> None:
    assert exc.key == key
    assert str(exc) == f"{key}: {exc.problem}"
    assert "\n" not in str(exc)


# -- defaults ------------------------------------------------------------------------------


def test_an_empty_file_is_the_default_config() -> None:
    cfg = from_dict({})
    assert cfg == Config()
    assert cfg.listeners == DEFAULT_LISTENERS
    assert [(lst.name, lst.kind, lst.address) for lst in cfg.listeners] == [
        ("http", "http", "127.0.0.1:8080"),
        ("socks", "socks", "127.0.0.1:1080"),
    ]
    assert cfg.proxy_name == "proxytap"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_an_empty_section_is_that_section_s_defaults(section: str) -> None:
    cfg = from_dict({section: {}})
    assert getattr(cfg, section) == SECTIONS[section]()
    assert cfg == Config()


def test_default_values() -> None:
    """The documented defaults (README, deploy/proxytap.example.toml), section by section."""
    cfg = Config().validate()
    t = cfg.timeouts
    assert (t.first_byte, t.handshake, t.connect, t.idle) == (2.0, 10.0, 10.0, 300.0)
    assert (t.shutdown_grace, t.http_keepalive) == (5.0, 60.0)
    assert (cfg.upstream.happy_eyeballs_delay, cfg.upstream.prefer) == (0.25, "any")
    lim = cfg.limits
    assert (lim.max_head, lim.max_request_line, lim.max_headers) == (65536, 8192, 100)
    assert (lim.max_connections, lim.max_connections_per_client) == (10000, 4096)
    assert (lim.open_files_reserve, lim.write_buffer_high) == (256, 1 << 20)
    exp = cfg.export
    assert (exp.sftap_home, exp.loopback7, exp.format, exp.sftap_mode) == (
        None,
        None,
        "text",
        0o660,
    )
    assert (exp.overload, exp.max_wait, exp.on_gap) == ("drop", 2.0, "skip")
    assert (exp.reader_buffer, exp.reader_sndbuf) == (4 << 20, 4 << 20)
    assert (exp.loopback7_format, exp.loopback7_overload, exp.loopback7_vlan) == (
        "text",
        "drop",
        True,
    )
    assert (exp.classify_timeout, exp.rules, dict(exp.formats)) == (0.5, (), {})
    log = cfg.log
    assert (log.level, log.format, log.flows) == ("info", "text", None)
    assert (log.flows_max_bytes, log.flows_backups, log.flows_buffer) == (0, 5, 4 << 20)
    assert (cfg.admin.address, cfg.admin.token, cfg.admin.enabled) == (None, None, False)
    assert (cfg.auth.htpasswd, cfg.auth.realm, cfg.auth.socks4_userids) == (None, "proxytap", None)
    assert (cfg.access.allow_dest, cfg.access.connect_ports, cfg.access.rules) == ((), (443,), ())
    assert (cfg.tls.sni_mismatch, cfg.tls.inspect_timeout) == ("log", 5.0)
    http = cfg.http
    assert (http.methods, http.via, http.forwarded_for) == (DEFAULT_METHODS, None, "delete")
    assert (cfg.modules.path, dict(cfg.modules.options)) == (("addons",), {})


def test_a_listener_without_chains_gets_validate_and_rewrite() -> None:
    cfg = from_dict({"listeners": [{"kind": "socks", "address": "[::1]:0"}]})
    (listener,) = cfg.listeners
    assert listener.name == "socks0"  # kind and position when unnamed
    assert (listener.host, listener.port) == ("::1", 0)
    for direction in ("client_to_server", "server_to_client"):
        assert listener.chain(direction) == ("validate", "rewrite")


# -- types ---------------------------------------------------------------------------------


def test_int_is_accepted_for_float_fields() -> None:
    cfg = from_dict(
        {"timeouts": {"idle": 5, "connect": 2.5}, "upstream": {"happy_eyeballs_delay": 0}}
    )
    assert cfg.timeouts.idle == 5.0 and type(cfg.timeouts.idle) is float
    assert cfg.timeouts.connect == 2.5
    assert type(cfg.upstream.happy_eyeballs_delay) is float


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"timeouts": {"idle": "5"}}, "timeouts.idle", "expected a number, got str"),
        ({"timeouts": {"idle": True}}, "timeouts.idle", "expected a number, got bool"),
        ({"limits": {"max_head": 1.5}}, "limits.max_head", "expected an integer, got float"),
        ({"limits": {"max_head": False}}, "limits.max_head", "expected an integer, got bool"),
        ({"log": {"level": 1}}, "log.level", "expected a str, got int"),
        ({"export": {"loopback7_vlan": "yes"}}, "export.loopback7_vlan", "expected a bool"),
        ({"export": {"sftap_home": 3}}, "export.sftap_home", "wrong type int"),
        ({"modules": {"path": "addons"}}, "modules.path", "expected a list"),
        ({"modules": {"path": ["a", 2]}}, "modules.path[1]", "expected a str, got int"),
        ({"export": {"formats": ["x"]}}, "export.formats", "expected a table"),
        ({"timeouts": 5}, "timeouts", "expected a table"),
        ({"proxy_name": ["x"]}, "proxy_name", "expected a str, got list"),
    ],
)
def test_a_wrong_type_names_the_key(data: dict[str, Any], key: str, problem: str) -> None:
    exc = config_error(data)
    assert_one_line(exc, key)
    assert problem in exc.problem


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"timeout": {}}, "timeout"),
        ({"timeouts": {"idel": 1}}, "timeouts.idel"),
        ({"export": {"bogus": 1}}, "export.bogus"),
        (
            {"listeners": [{"kind": "http", "address": "127.0.0.1:0", "port": 1}]},
            "listeners[0].port",
        ),
    ],
)
def test_an_unknown_key_names_the_key(data: dict[str, Any], key: str) -> None:
    exc = config_error(data)
    assert_one_line(exc, key)
    assert exc.problem.startswith("unknown key")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"timeouts": {"idle": 0}}, "timeouts.idle"),
        ({"upstream": {"happy_eyeballs_delay": -1}}, "upstream.happy_eyeballs_delay"),
        ({"upstream": {"prefer": "ipv5"}}, "upstream.prefer"),
        ({"limits": {"max_connections": -1}}, "limits.max_connections"),
        ({"limits": {"write_buffer_high": 0}}, "limits.write_buffer_high"),
        ({"export": {"format": "json"}}, "export.format"),
        ({"export": {"formats": {"tcp/http": "xml"}}}, "export.tcp/http"),
        ({"export": {"sftap_mode": 0o1777}}, "export.sftap_mode"),
        ({"export": {"reader_sndbuf": 1024}}, "export.reader_sndbuf"),
        ({"export": {"overload": "block"}}, "export.overload"),
        ({"export": {"loopback7_on_gap": "x"}}, "export.loopback7_on_gap"),
        ({"export": {"classify_timeout": 0}}, "export.classify_timeout"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"log": {"flows": ""}}, "log.flows"),
        ({"log": {"flows_backups": 0}}, "log.flows_backups"),
        ({"admin": {"address": "localhost"}}, "admin.address"),
        ({"admin": {"token": "a b"}}, "admin.token"),
        ({"tls": {"sni_mismatch": "maybe"}}, "tls.sni_mismatch"),
        ({"http": {"forwarded_for": "yes"}}, "http.forwarded_for"),
        ({"modules": {"path": [""]}}, "modules.path[0]"),
        ({"proxy_name": "a b"}, "proxy_name"),
        ({"listeners": []}, "listeners"),
        ({"listeners": {"kind": "http"}}, "listeners"),
        ({"listeners": [{"kind": "http"}]}, "listeners[0]"),  # was a TypeError
        ({"listeners": [{"address": "127.0.0.1:1"}]}, "listeners[0]"),
        ({"listeners": ["http"]}, "listeners[0]"),
        ({"listeners": [{"kind": "ftp", "address": "127.0.0.1:1"}]}, "listeners[0].kind"),
        ({"listeners": [{"kind": "http", "address": "127.0.0.1:99999"}]}, "listeners[0].address"),
        ({"listeners": [{"kind": "http", "address": "[::1:80"}]}, "listeners[0].address"),
        (
            {
                "listeners": [
                    {"kind": "http", "address": "127.0.0.1:0", "name": "a"},
                    {"kind": "socks", "address": "127.0.0.1:0", "name": "a"},
                ]
            },
            "listeners[1].name",
        ),
        (
            {
                "listeners": [
                    {
                        "kind": "http",
                        "address": "127.0.0.1:0",
                        "client_to_server": ["rewrite", "validate"],
                    }
                ]
            },
            "listeners[0].client_to_server[1]",
        ),
    ],
)
def test_a_bad_value_names_the_key(data: dict[str, Any], key: str) -> None:
    assert_one_line(config_error(data), key)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:8080", "k") == ("127.0.0.1", 8080)
    assert parse_hostport("[::1]:0", "k") == ("::1", 0)
    assert parse_hostport("proxy.example:3128", "k") == ("proxy.example", 3128)
    for bad in ("127.0.0.1", "::1:80", "[::1]80", "[zz]:1", "a:-1", "a:65536", ":80"):
        with pytest.raises(ConfigError) as info:
            parse_hostport(bad, "k")
        assert info.value.key == "k", bad


def test_the_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.proxy_name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.timeouts.idle = 1.0  # type: ignore[misc]


# -- files ---------------------------------------------------------------------------------


def test_the_example_config_loads() -> None:
    cfg = load(EXAMPLE)
    assert [lst.name for lst in cfg.listeners] == ["http", "socks"]
    assert cfg.admin.enabled and (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9090)
    assert cfg.export.sftap_mode == 0o660  # TOML octal
    assert cfg.timeouts == Timeouts()  # it shows the defaults


def test_a_file_is_loaded_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[[listeners]]\nkind = "mixed"\naddress = "127.0.0.1:3128"\n'
        "[timeouts]\nidle = 30\n[limits]\nmax_connections = 0\n"
    )
    cfg = load(path)
    assert cfg.listeners == (ListenerConfig(kind="mixed", address="127.0.0.1:3128", name="mixed0"),)
    assert (cfg.timeouts.idle, cfg.limits.max_connections) == (30.0, 0)
    path.write_text("[timeouts]\nidle = -1\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert_one_line(info.value, "timeouts.idle")


def test_unreadable_and_invalid_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.toml")
    assert_one_line(info.value, "config")
    assert "cannot read" in info.value.problem
    bad = tmp_path / "bad.toml"
    bad.write_text("[timeouts\nidle = 1\n")
    with pytest.raises(ConfigError) as info:
        load(bad)
    assert_one_line(info.value, "config")
    assert "not valid TOML" in info.value.problem


def _schema_keys(cls: Any, prefix: str) -> list[tuple[str, str]]:
    """(dotted key, leaf name) of every key the loader accepts under ``cls``."""
    out: list[tuple[str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out += _schema_keys(hints[f.name], key)
        else:
            out.append((key, f.name))
    return out


def test_the_example_config_documents_every_key() -> None:
    """Every key the loader accepts appears in deploy/proxytap.example.toml (set or commented).

    Derived from the schema, so a key added to a section fails here until it is
    documented; tables of tables count when their header is shown.
    """
    text = EXAMPLE.read_text()
    keys = _schema_keys(Config, "") + _schema_keys(ListenerConfig, "listeners")
    keys += [(f"access.rules.{k}", k) for k in sorted(_RULE_KEYS)]
    keys += [(f"upstream.proxies.{k}", k) for k in sorted(PROXY_KEYS)]
    undocumented = []
    for key, leaf in keys:
        as_value = re.search(rf"^\s*#?\s*{re.escape(leaf)}\s*=", text, re.M)
        as_table = re.search(rf"^\s*#?\s*\[\[?{re.escape(key)}[\].]", text, re.M)
        if not (as_value or as_table):
            undocumented.append(key)
    assert undocumented == [], f"not in {EXAMPLE.name}: {undocumented}"
