"""argv and TOML -> one frozen, validated ``Config``.

Every section is a frozen dataclass; the loader checks each key against the
dataclass field's type, so an unknown key or a wrong type stops start-up with
one line naming the key (``ConfigError``). Defaults give a working proxy:
HTTP on 127.0.0.1:8080 and SOCKS on 127.0.0.1:1080.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from proxytap.errors import ConfigError, unknown_key
from proxytap.export.channel import MIN_SNDBUF, OVERLOAD_POLICIES
from proxytap.policy.acl import AccessConfig, parse_network
from proxytap.policy.auth import AuthConfig
from proxytap.policy.chain import build_proxies
from proxytap.policy.headers import HttpConfig
from proxytap.policy.intercept import InterceptPolicy
from proxytap.proto.pcap import MAX_MSS

LISTENER_KINDS = ("http", "socks", "mixed")


def parse_hostport(text: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); host must be an IP literal or a name."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(key, f"expected [IPV6]:PORT, got {text!r}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ConfigError(key, f"expected HOST:PORT or [IPV6]:PORT, got {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(key, f"port must be 0..65535, got {port_text!r}")
    return host, int(port_text)


BUILTIN_MODULES = ("validate", "rewrite")  # proxytap.modules.builtin; "validate" always runs first


@dataclass(frozen=True)
class ListenerConfig:
    kind: str
    address: str
    name: str = ""
    # module chains by name (proxytap.modules): built-ins "validate" and "rewrite", or a
    # user module (addons/NAME.py, or a path to a .py file). None: ["validate", "rewrite"]
    client_to_server: tuple[str, ...] | None = None
    server_to_client: tuple[str, ...] | None = None
    # PROXY protocol v1/v2 behind a load balancer (front/proxyheader.py): every connection
    # starts with a header naming the real client; only proxy_protocol_from may connect
    proxy_protocol: bool = False
    proxy_protocol_from: tuple[str, ...] = ()  # the balancers' addresses (CIDRs)

    @property
    def host(self) -> str:
        return parse_hostport(self.address, "listeners.address")[0]

    @property
    def port(self) -> int:
        return parse_hostport(self.address, "listeners.address")[1]

    def validate(self, key: str) -> None:
        if self.kind not in LISTENER_KINDS:
            raise ConfigError(f"{key}.kind", f"must be one of {', '.join(LISTENER_KINDS)}")
        parse_hostport(self.address, f"{key}.address")
        for direction in ("client_to_server", "server_to_client"):
            chain = getattr(self, direction)
            if chain is None:
                continue
            for i, name in enumerate(chain):
                if not name:
                    raise ConfigError(f"{key}.{direction}[{i}]", "empty module name")
                if name == "validate" and i != 0:
                    raise ConfigError(
                        f"{key}.{direction}[{i}]", "validate always runs first: list it first"
                    )
            if len(set(chain)) != len(chain):
                raise ConfigError(f"{key}.{direction}", "a module is named twice")
        if self.proxy_protocol and not self.proxy_protocol_from:
            raise ConfigError(
                f"{key}.proxy_protocol_from",
                "required with proxy_protocol = true: the load balancers' addresses "
                '(CIDRs, e.g. ["10.0.0.5/32"]); anyone else could claim any client address',
            )
        if self.proxy_protocol_from and not self.proxy_protocol:
            raise ConfigError(
                f"{key}.proxy_protocol_from", "has no effect without proxy_protocol = true"
            )
        for i, cidr in enumerate(self.proxy_protocol_from):
            parse_network(cidr, f"{key}.proxy_protocol_from[{i}]")

    def chain(self, direction: str) -> tuple[str, ...]:
        """The module names of ``direction``, ``validate`` first (it is never optional)."""
        names: tuple[str, ...] | None = getattr(self, direction)
        if names is None:
            return BUILTIN_MODULES
        return names if names[:1] == ("validate",) else ("validate", *names)


@dataclass(frozen=True)
class Timeouts:
    """Seconds."""

    # a connection that has sent nothing for this long is closed (counted, no answer):
    # real clients send their greeting or request at once, so this sheds silent
    # connections (port scans, half-open floods, abandoned preconnects) long before
    # ``handshake`` would; a browser whose preconnected socket was closed opens another
    first_byte: float = 2.0
    handshake: float = 10.0  # client must finish its SOCKS/CONNECT/request head within this
    connect: float = 10.0  # resolve + connect upstream
    idle: float = 300.0  # a relay with no bytes either way for this long is closed
    shutdown_grace: float = 5.0  # on SIGTERM, open tunnels may drain this long
    http_keepalive: float = 60.0  # idle plain-HTTP client connection between requests
    # a SOCKS5 UDP association with no datagram either way for this long ends (its
    # control connection is closed); a destination of it idle this long is forgotten
    udp_idle: float = 120.0

    def validate(self, key: str) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"{key}.{f.name}", "must be > 0")


@dataclass(frozen=True)
class UpstreamConfig:
    happy_eyeballs_delay: float = 0.25  # RFC 8305 connection attempt delay
    prefer: str = "any"  # "any" (resolver order), "ipv4", "ipv6"
    # [[upstream.proxies]]: upstream proxies an [[access.rules]] rule routes through with
    # via = NAME (proxytap.policy.chain): name, url (http:// socks5:// socks5h:// socks4://
    # socks4a:// HOST:PORT), username, password or password_file
    proxies: tuple[Mapping[str, Any], ...] = ()

    def validate(self, key: str) -> None:
        if self.happy_eyeballs_delay < 0:
            raise ConfigError(f"{key}.happy_eyeballs_delay", "must be >= 0")
        if self.prefer not in ("any", "ipv4", "ipv6"):
            raise ConfigError(f"{key}.prefer", "must be any, ipv4 or ipv6")
        build_proxies(self.proxies, f"{key}.proxies")


@dataclass(frozen=True)
class LimitsConfig:
    max_head: int = 65536  # bytes of an HTTP request/response head
    max_request_line: int = 8192
    max_headers: int = 100  # header fields in one HTTP head (431 / 502 past it)
    max_connections: int = 10000  # client connections open at once; 0: no limit
    # per client address; 0: no limit. One address is often a whole office behind NAT:
    # browsers open up to 32 connections to a proxy (Chromium's and Firefox's
    # per-proxy cap), so 100 people can hold 3,200; 4096 fits them with room for
    # tools, and still keeps one address from taking the whole of max_connections.
    # Over the cap, a connection that sends a request takes the place of that
    # address's oldest connection that has sent nothing yet; only when there is
    # none is it refused (503, SOCKS 0x01 / 0x5B).
    max_connections_per_client: int = 4096
    # descriptors kept free below the open-file limit (RLIMIT_NOFILE): a new client
    # connection is refused (accepted and closed at once) when the open ones, at two
    # descriptors each, would leave fewer. Covers what is not counted per connection:
    # flow-socket readers, admin requests, the flow log, resolver sockets. At most a
    # quarter of the descriptors free at start-up is kept (a low limit is not all reserve).
    open_files_reserve: int = 256
    write_buffer_high: int = 1 << 20  # relay backpressure high-water mark per side
    # destinations one SOCKS5 UDP association may have at once (one inner flow each);
    # datagrams to a further one are dropped and counted until one goes idle
    max_udp_destinations: int = 256

    def validate(self, key: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("max_connections"):
                if value < 0:
                    raise ConfigError(f"{key}.{f.name}", "must be >= 0 (0: no limit)")
            elif f.name == "open_files_reserve":
                if value < 0:
                    raise ConfigError(f"{key}.{f.name}", "must be >= 0")
            elif value <= 0:
                raise ConfigError(f"{key}.{f.name}", "must be > 0")


SNI_MISMATCH = ("allow", "log", "deny")


@dataclass(frozen=True)
class TlsCheckConfig:
    """Checks on a tunnel's TLS ClientHello (read, never altered)."""

    # the ClientHello's SNI names another host than the CONNECT / SOCKS target:
    # "allow" (record only), "log" (record and warn), "deny" (close before it is sent)
    sni_mismatch: str = "log"
    inspect_timeout: float = 5.0  # seconds to wait for a whole ClientHello in "deny" mode
    # the interception CA's directory (proxytap ca init): relative paths are from the
    # working directory, so a checkout's `make run` uses its certs/
    ca_dir: str = "certs"
    # Interception (proxytap.policy.intercept): host patterns ("a.b" exact, "*.a.b" below
    # it, ".a.b" both, "~REGEX" the whole name, "*" every host) decided on the ClientHello's
    # SNI (else the CONNECT / SOCKS host). Empty ``intercept``: nothing is decrypted.
    intercept: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()  # never intercepted (wins over ``intercept``)
    intercept_clients: tuple[str, ...] = ()  # CIDRs; only these clients (empty: every client)
    passthrough_clients: tuple[str, ...] = ()  # CIDRs never intercepted
    verify_upstream: bool = True  # check origin certificates (never turn off in production)
    upstream_ca: str | None = None  # PEM bundle origins are verified against (default: certifi)
    http2: bool = True  # offer HTTP/2 to intercepted clients when the origin speaks it
    export_ciphertext: bool = False  # also export an intercepted client leg's TLS bytes (tcp/ssl)
    # a client that rejects proxytap's certificate (pinning, no trust) gets that host passed
    # through untouched for this many seconds; 0: never
    pinning_fail_open: float = 3600.0
    keylog_file: str | None = None  # SSLKEYLOGFILE-format TLS secrets of intercepted sessions

    def validate(self, key: str) -> None:
        if not self.ca_dir:
            raise ConfigError(f"{key}.ca_dir", "must name a directory")
        if self.pinning_fail_open < 0:
            raise ConfigError(f"{key}.pinning_fail_open", "must be >= 0 (0: never)")
        InterceptPolicy.from_config(self, key)
        if self.sni_mismatch not in SNI_MISMATCH:
            raise ConfigError(f"{key}.sni_mismatch", "must be allow, log or deny")
        if self.inspect_timeout <= 0:
            raise ConfigError(f"{key}.inspect_timeout", "must be > 0")


@dataclass(frozen=True)
class PcapConfig:
    """``[export.pcap]``: inner flows as synthesized TCP/IP packets (proxytap.proto.pcap)."""

    dir: str | None = None  # write pcap files here (created 0750 if missing)
    rotate_bytes: int = 100 << 20  # start a new file before one would pass this size; 0: never
    rotate_seconds: float = 3600.0  # start a new file after this long; 0: never
    snaplen: int = 65535  # bytes of each packet kept (the original length is recorded)
    mss: int = 1460  # largest TCP payload per synthesized segment
    listen: str | None = None  # PCAP-over-IP: serve the live packets on HOST:PORT (TCP)
    buffer: int = 8 << 20  # bytes waiting for the disk, and per PCAP-over-IP reader

    def validate(self, key: str) -> None:
        if self.dir is not None and not self.dir:
            raise ConfigError(f"{key}.dir", "must be a directory path")
        if self.rotate_bytes < 0:
            raise ConfigError(f"{key}.rotate_bytes", "must be >= 0 (0: no size rotation)")
        if self.rotate_seconds < 0:
            raise ConfigError(f"{key}.rotate_seconds", "must be >= 0 (0: no time rotation)")
        if not 64 <= self.snaplen <= 262144:
            raise ConfigError(f"{key}.snaplen", "must be 64..262144")
        if not 1 <= self.mss <= MAX_MSS:
            raise ConfigError(f"{key}.mss", f"must be 1..{MAX_MSS}")
        if self.listen is not None:
            parse_hostport(self.listen, f"{key}.listen")
        if self.buffer <= 0:
            raise ConfigError(f"{key}.buffer", "must be > 0")


@dataclass(frozen=True)
class ExportConfig:
    sftap_home: str | None = None  # serve SF-TAP flow sockets under this directory
    sftap_mode: int = 0o660  # permission bits of the served sockets
    format: str = "text"  # default format of served sockets: "text" or "binary"
    # per interface, e.g. {"tcp/http" = "binary"}
    formats: Mapping[str, str] = field(default_factory=dict)
    reader_buffer: int = 4 << 20  # bytes queued in proxytap per reader, beyond its socket buffer
    reader_sndbuf: int = 4 << 20  # SO_SNDBUF of each reader socket (the kernel doubles it)
    overload: str = "drop"  # a reader that is behind: "drop" DATA, or "wait" (lossless)
    max_wait: float = 2.0  # "wait": seconds a flow may be paused for one reader per stall
    on_gap: str = "skip"  # after a drop: "skip" (go on with a hole) or "cut" (COMPROMISED)
    loopback7: str | None = None  # connect to a running abstractor's loopback7 socket
    loopback7_format: str = "text"  # "text" or "binary" (abstractor: loopback7 format binary)
    loopback7_buffer: int = 8 << 20
    loopback7_sndbuf: int = 4 << 20
    loopback7_overload: str = "drop"
    loopback7_max_wait: float = 2.0
    loopback7_on_gap: str = "skip"
    loopback7_vlan: bool = True  # add vlan=-1 after port2 (harmless, keeps VLAN builds happy)
    classify_timeout: float = 0.5  # a flow no rule matched yet goes to "default" after this
    chunk: int = 32768  # largest DATA body on served sockets (<= 65535; see README)
    rules: tuple[Mapping[str, Any], ...] = ()  # extra / overriding classification rules
    pcap: PcapConfig = PcapConfig()  # [export.pcap]: pcap files and PCAP-over-IP

    def validate(self, key: str) -> None:
        for name, fmt in (
            ("format", self.format),
            ("loopback7_format", self.loopback7_format),
            *self.formats.items(),
        ):
            if fmt not in ("text", "binary"):
                raise ConfigError(f"{key}.{name}", "must be text or binary")
        if not 0 <= self.sftap_mode <= 0o777:
            raise ConfigError(f"{key}.sftap_mode", "must be permission bits 0..0o777")
        for name in ("reader_buffer", "loopback7_buffer"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be > 0")
        for name in ("reader_sndbuf", "loopback7_sndbuf"):
            if getattr(self, name) < MIN_SNDBUF:
                raise ConfigError(f"{key}.{name}", f"must be >= {MIN_SNDBUF} (128 KiB)")
        for name in ("overload", "loopback7_overload"):
            if getattr(self, name) not in OVERLOAD_POLICIES:
                raise ConfigError(f"{key}.{name}", "must be drop or wait")
        for name in ("on_gap", "loopback7_on_gap"):
            if getattr(self, name) not in ("skip", "cut"):
                raise ConfigError(f"{key}.{name}", "must be skip or cut")
        if not 1 <= self.chunk <= 65535:
            raise ConfigError(f"{key}.chunk", "must be 1..65535")
        for name in ("max_wait", "loopback7_max_wait", "classify_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be > 0")
        self.pcap.validate(f"{key}.pcap")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"
    # JSON flow log: one Zeek conn.log-style object per line when an inner flow ends
    flows: str | None = None
    flows_max_bytes: int = 0  # rotate the flow log past this size; 0: never (use logrotate)
    flows_backups: int = 5  # rotated files kept: PATH.1 .. PATH.N
    flows_buffer: int = 4 << 20  # bytes of records waiting for the disk before records drop

    def validate(self, key: str) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"{key}.level", "must be debug, info, warning, error or critical")
        if self.format not in ("text", "json"):
            raise ConfigError(f"{key}.format", "must be text or json")
        if self.flows is not None and not self.flows:
            raise ConfigError(f"{key}.flows", "must be a file path")
        if self.flows_max_bytes < 0:
            raise ConfigError(f"{key}.flows_max_bytes", "must be >= 0 (0: no rotation)")
        if self.flows_backups < 1:
            raise ConfigError(f"{key}.flows_backups", "must be >= 1")
        if self.flows_buffer <= 0:
            raise ConfigError(f"{key}.flows_buffer", "must be > 0")


@dataclass(frozen=True)
class ModulesConfig:
    """``[modules]``: where user modules are found and their options."""

    # directories searched for NAME.py when a listener chain names NAME (relative to
    # the working directory)
    path: tuple[str, ...] = ("addons",)
    # [modules.options.NAME]: a table handed to NAME's create(options)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        for i, entry in enumerate(self.path):
            if not entry:
                raise ConfigError(f"{key}.path[{i}]", "must be a directory")


ADMIN_OFF = "off"
DEFAULT_ADMIN = "127.0.0.1:9090"


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP server: /metrics, /healthz, /readyz, /flows, /subscribers, /stats.

    ``address`` is ``HOST:PORT`` or ``"off"``. Unset, ``proxytap run`` uses
    ``DEFAULT_ADMIN`` (loopback); an ``App`` built in-process without it runs
    no admin server. ``token``: every endpoint but /healthz and /readyz then
    needs ``Authorization: Bearer <token>``.
    """

    address: str | None = None
    token: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None and self.address != ADMIN_OFF

    @property
    def host(self) -> str:
        assert self.address is not None
        return parse_hostport(self.address, "admin.address")[0]

    @property
    def port(self) -> int:
        assert self.address is not None
        return parse_hostport(self.address, "admin.address")[1]

    def validate(self, key: str) -> None:
        if self.enabled:
            assert self.address is not None
            parse_hostport(self.address, f"{key}.address")
        if self.token is not None and (
            not self.token or any(c.isspace() or not c.isprintable() for c in self.token)
        ):
            raise ConfigError(f"{key}.token", "must be a non-empty string without spaces")


DEFAULT_LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:8080", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:1080", name="socks"),
)


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...] = DEFAULT_LISTENERS
    timeouts: Timeouts = Timeouts()
    upstream: UpstreamConfig = UpstreamConfig()
    limits: LimitsConfig = LimitsConfig()
    export: ExportConfig = ExportConfig()
    log: LogConfig = LogConfig()
    admin: AdminConfig = AdminConfig()
    access: AccessConfig = field(default_factory=AccessConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsCheckConfig = TlsCheckConfig()
    http: HttpConfig = field(default_factory=HttpConfig)
    modules: ModulesConfig = ModulesConfig()
    proxy_name: str = "proxytap"  # names proxytap in Proxy-Status (and in Via unless http.via)

    def validate(self) -> Config:
        if not self.listeners:
            raise ConfigError("listeners", "at least one listener is needed")
        names = set()
        for i, lst in enumerate(self.listeners):
            lst.validate(f"listeners[{i}]")
            if lst.name in names:
                raise ConfigError(f"listeners[{i}].name", f"duplicate listener name {lst.name!r}")
            names.add(lst.name)
        self.timeouts.validate("timeouts")
        self.upstream.validate("upstream")
        self.limits.validate("limits")
        self.export.validate("export")
        self.log.validate("log")
        self.admin.validate("admin")
        self.access.validate("access")
        proxies = build_proxies(self.upstream.proxies, "upstream.proxies")
        for i, rule in enumerate(self.access.rules):
            via = rule.get("via")
            if isinstance(via, str) and via not in proxies:
                known = ", ".join(sorted(proxies)) or "none configured"
                raise ConfigError(
                    f"access.rules[{i}].via", f"no [[upstream.proxies]] entry {via!r} ({known})"
                )
        self.auth.validate("auth")
        self.tls.validate("tls")
        self.http.validate("http")
        self.modules.validate("modules")
        if not self.proxy_name or any(c in self.proxy_name for c in ' ,;="\r\n'):
            raise ConfigError("proxy_name", "must be a non-empty token")
        return self


# -- loading -----------------------------------------------------------------------


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce) ``value`` against a dataclass field's type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(key, f"wrong type {type(value).__name__}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, f"must be one of {typing.get_args(tp)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {type(value).__name__}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(key, f"expected a {tp.__name__}, got {type(value).__name__}")
        return value
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, "expected a list")
        return tuple(_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(key, "expected a table")
        _kt, vt = typing.get_args(tp)
        return {k: _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(key, f"unsupported type {tp!r}")  # pragma: no cover


def _build(cls: Any, data: Any, key: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(key or "config", "expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else name
        if name not in known:
            raise unknown_key(sub, known)
        kwargs[name] = _check_type(value, hints[name], sub)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> Config:
    data = dict(data)
    listeners = data.pop("listeners", None)
    cfg: Config = _build(Config, data, "")
    if listeners is not None:
        if not isinstance(listeners, list):
            raise ConfigError("listeners", "expected an array of tables ([[listeners]])")
        built = []
        for i, item in enumerate(listeners):
            # kind and address have no defaults: placeholders let the keys given be checked
            # first (and the dataclass be built), then their absence is named (not a TypeError)
            given = {"kind": "", "address": "", **item} if isinstance(item, dict) else item
            lst = _build(ListenerConfig, given, f"listeners[{i}]")
            if "kind" not in item or "address" not in item:
                raise ConfigError(f"listeners[{i}]", "needs kind and address")
            built.append(dataclasses.replace(lst, name=lst.name or f"{lst.kind}{i}"))
        cfg = dataclasses.replace(cfg, listeners=tuple(built))
    return cfg.validate()


def load(path: str | Path) -> Config:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    return from_dict(data)
