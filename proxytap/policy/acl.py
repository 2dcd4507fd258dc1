"""Access control: who may use the proxy and where they may go (pure, no I/O).

Two questions, asked by every front end (HTTP CONNECT, plain HTTP, SOCKS) and by
the interception addon alike (one rules module, two adapters):

* **May this client use the proxy?** ``ClientAcl`` is an allow list of
  networks. The default is loopback only (``127.0.0.0/8``, ``::1/128``), so a
  fresh install is not an open proxy.
* **May this request go to this destination?** ``DestinationPolicy`` answers
  twice. ``check_name`` runs on the name the client asked for, before any DNS
  lookup, and can only *deny* (a denial that no address could change).
  ``check_address`` runs on each resolved address right before connecting to
  it and is the authoritative answer; the shell must call it for every address
  it tries (Happy Eyeballs included), which also defeats DNS rebinding.

Rule semantics:

* Rules are tried in order; the **first rule that matches decides**. A rule
  matches when *every* criterion it has matches (AND); inside a criterion any
  listed value may match (OR). A rule with no criteria matches everything, so
  ``{name = "rest", action = "deny"}`` at the end turns the policy into an
  allow list. With no matching rule the request is allowed (default-allow).
* Criteria: ``cidrs`` (the address connected to), ``domains`` and ``regex``
  (the name requested), ``ports`` (destination port), ``users`` (the
  authenticated user name; a request without one never matches a rule that
  lists users).
* ``via`` (allow rules only) names an ``[[upstream.proxies]]`` entry: what
  the rule decides is connected through that proxy (chaining; see
  ``route``, which picks the route on what the client asked for, never on a
  local lookup: rules with ``cidrs`` are passed over for names there).
* ``domains``: ``"example.com"`` matches exactly that name;
  ``"*.example.com"`` matches any name below it at any depth
  (``a.example.com``, ``a.b.example.com``) but not ``example.com``;
  ``".example.com"`` matches both (Squid's ``dstdomain`` form). Names are
  compared lower-case, without a trailing dot, non-ASCII names as IDNA
  (punycode). Domains never match an IP literal: to block an address, use
  ``cidrs``; a domain rule alone cannot stop a client that asks for the
  address directly.
* ``regex`` must match the *whole* normalised name (``re.fullmatch``,
  case-insensitive), so ``example\\.com`` does not match
  ``example.com.evil.test``.
* **An allow rule never opens a default-denied range.** Its only effect is to
  stop the rule scan (so a later deny does not apply). Private, loopback,
  metadata and the other ranges below are opened only by ``allow_dest``. A
  deny rule always wins over ``allow_dest``.

Default-denied destination ranges (``DEFAULT_DENIED``; the first that contains
the address names the denial, e.g. ``default-deny:private``):

* loopback ``127.0.0.0/8`` ``::1``; unspecified / "this network"
  ``0.0.0.0/8`` ``::`` (connecting to 0.0.0.0 or :: reaches the local host
  on Linux); cloud metadata ``169.254.169.254`` ``fd00:ec2::254``
  ``100.100.100.200``; private ``10/8`` ``172.16/12`` ``192.168/16``;
  shared (CGNAT, RFC 6598) ``100.64.0.0/10``; link-local ``169.254/16``
  ``fe80::/10``; unique-local ``fc00::/7``; site-local ``fec0::/10``;
  multicast ``224.0.0.0/4`` ``ff00::/8``; broadcast ``255.255.255.255``;
  reserved ``240.0.0.0/4``; IETF protocol assignments ``192.0.0.0/24``;
  benchmarking ``198.18.0.0/15``; documentation ``192.0.2.0/24``
  ``198.51.100.0/24`` ``203.0.113.0/24`` ``2001:db8::/32``; discard
  ``100::/64``; IPv4-compatible (deprecated) ``::/96``; NAT64 local-use
  ``64:ff9b:1::/48``. None of these is a destination on the public internet.
* **IPv4 inside IPv6.** An IPv4-mapped address (``::ffff:10.0.0.1``) *is* the
  IPv4 address: it is converted before anything else, for clients too. The
  IPv4 address embedded in a NAT64 well-known-prefix address
  (``64:ff9b::/96``, RFC 6052), a 6to4 address (``2002::/16``) and a Teredo
  client address (``2001::/32``) is checked as well, since a translator or
  relay would deliver to it: ``64:ff9b::a00:1`` is denied as
  ``default-deny:nat64:private``. CIDR rules match embedded addresses too.
  Network-specific NAT64 prefixes cannot be known here; deny them with a rule.
* ``allow_dest`` exempts an address from the default-denied ranges when it
  covers the address connected to or the (embedded) address that hit the
  range.

``connect_ports`` (default ``443``) limits the ports HTTP CONNECT may open;
it does not apply to SOCKS or plain HTTP, which carry their own protocols.

Nothing here raises on request data: a malformed address is denied
(``invalid-address``), a malformed name never matches name rules. Configuration
errors raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from proxytap.errors import ConfigError, Failure, unknown_key

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Action = Literal["allow", "deny"]

DEFAULT_CLIENTS: Final = ("127.0.0.0/8", "::1/128")
MAX_HOST: Final = 255

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64_HIGH: Final = int(ipaddress.IPv6Address("64:ff9b::")) >> 32
_RULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
CONNECT_PORTS = "connect-ports"  # the rule name of CONNECT port refusals
DEFAULT_DENY = "default-deny:"  # + the range's label: the rule name of a default-denied range
_RESERVED_NAMES = ("default-", "connect-ports", "invalid-")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_PORT_RANGE = re.compile(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?")
_RULE_KEYS = frozenset({"name", "action", "cidrs", "domains", "regex", "ports", "users", "via"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer: ``rule`` names what decided (a rule name or ``default-...``).

    ``failure`` is ``Failure.PROHIBITED`` for a denial and ``None`` when allowed.
    ``via`` names the upstream proxy an allowing ``via`` rule routes through.
    """

    allowed: bool
    rule: str
    failure: Failure | None = None
    via: str | None = None

    @classmethod
    def allow(cls, rule: str) -> Decision:
        return cls(True, rule, None)

    @classmethod
    def deny(cls, rule: str) -> Decision:
        return cls(False, rule, Failure.PROHIBITED)


# -- addresses and networks ----------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> IPAddress | None:
    """An address as the proxy saw it -> ``IPv4Address``/``IPv6Address``, or ``None``.

    Accepts ``[v6]`` brackets and a ``%zone`` suffix (dropped); an IPv4-mapped
    IPv6 address comes back as the IPv4 address. Cached: the same clients and
    destinations come back on every connection, and ``ipaddress`` parsing is
    the costliest step of a policy check.
    """
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.partition("%")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _host_ip(name: str) -> IPAddress | None:
    """``parse_ip`` for a normalised host, skipping the parse for obvious names."""
    if ":" not in name and not name[-1:].isdigit():
        return None
    return parse_ip(name)


def parse_network(text: object, key: str) -> Network:
    """A CIDR (or a bare address, meaning /32 or /128) from the config.

    Host bits must be zero (``10.0.0.1/8`` is refused as a likely typo). A
    network inside ``::ffff:0:0/96`` becomes the IPv4 network it maps.
    """
    if not isinstance(text, str):
        raise ConfigError(key, f"expected a CIDR string, got {type(text).__name__}")
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ConfigError(key, f"{text!r} is not a network: {exc}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


def embedded_ipv4(addr: IPAddress) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses a translator or relay would deliver ``addr`` to: (how, address)."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return []
    n = int(addr)
    if n >> 32 == _NAT64_HIGH:  # 64:ff9b::/96, RFC 6052
        return [("nat64", ipaddress.IPv4Address(n & 0xFFFFFFFF))]
    if n >> 112 == 0x2002:  # 6to4, RFC 3056: 2002:AABB:CCDD::/48
        return [("6to4", ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF))]
    if n >> 96 == 0x20010000:  # Teredo, RFC 4380: the client address is stored inverted
        return [("teredo", ipaddress.IPv4Address(~n & 0xFFFFFFFF))]
    return []


def _candidates(addr: IPAddress) -> list[tuple[str, IPAddress]]:
    return [("", addr), *embedded_ipv4(addr)]


def _mask(net: Network) -> tuple[int, int]:
    return int(net.network_address), int(net.netmask)


class _NetSet:
    """Networks split by family, tested with integer masks (hot path: every connection)."""

    __slots__ = ("v4", "v6")

    def __init__(self, nets: Iterable[Network]) -> None:
        all_nets = list(nets)
        self.v4 = tuple(_mask(n) for n in all_nets if isinstance(n, ipaddress.IPv4Network))
        self.v6 = tuple(_mask(n) for n in all_nets if isinstance(n, ipaddress.IPv6Network))

    def __contains__(self, addr: object) -> bool:
        if isinstance(addr, ipaddress.IPv4Address):
            nets = self.v4
        elif isinstance(addr, ipaddress.IPv6Address):
            nets = self.v6
        else:
            return False
        n = int(addr)
        return any(n & mask == base for base, mask in nets)

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)


@dataclass(frozen=True, slots=True)
class DeniedRange:
    label: str
    network: Network


def _ranges(*items: tuple[str, str]) -> tuple[DeniedRange, ...]:
    return tuple(DeniedRange(label, ipaddress.ip_network(cidr)) for label, cidr in items)


# Order matters: the first range containing the address names the denial.
DEFAULT_DENIED: Final = _ranges(
    ("loopback", "127.0.0.0/8"),
    ("loopback", "::1/128"),
    ("unspecified", "0.0.0.0/8"),
    ("unspecified", "::/128"),
    ("metadata", "169.254.169.254/32"),
    ("metadata", "fd00:ec2::254/128"),
    ("metadata", "100.100.100.200/32"),
    ("private", "10.0.0.0/8"),
    ("private", "172.16.0.0/12"),
    ("private", "192.168.0.0/16"),
    ("shared", "100.64.0.0/10"),
    ("link-local", "169.254.0.0/16"),
    ("link-local", "fe80::/10"),
    ("unique-local", "fc00::/7"),
    ("site-local", "fec0::/10"),
    ("multicast", "224.0.0.0/4"),
    ("multicast", "ff00::/8"),
    ("broadcast", "255.255.255.255/32"),
    ("reserved", "240.0.0.0/4"),
    ("ietf-protocol", "192.0.0.0/24"),
    ("benchmarking", "198.18.0.0/15"),
    ("documentation", "192.0.2.0/24"),
    ("documentation", "198.51.100.0/24"),
    ("documentation", "203.0.113.0/24"),
    ("documentation", "2001:db8::/32"),
    ("discard", "100::/64"),
    ("ipv4-compatible", "::/96"),
    ("nat64-local", "64:ff9b:1::/48"),
)


# -- ports ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortRanges:
    """A set of ports as inclusive ranges; ``port in ranges``."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(lo <= port <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)

    @classmethod
    def parse(cls, values: object, key: str, *, allow_empty: bool = False) -> PortRanges:
        """A list of ports (``443``) and ranges (``"8000-8100"``) from the config."""
        if isinstance(values, (str, int)):
            values = [values]
        elif isinstance(values, (set, frozenset)):
            values = list(values)
        if not isinstance(values, (list, tuple)):
            raise ConfigError(key, "expected a list of ports and 'a-b' ranges")
        if not values and not allow_empty:
            raise ConfigError(key, "empty list (leave the key out to match every port)")
        out = []
        for i, item in enumerate(values):
            sub = f"{key}[{i}]"
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise ConfigError(sub, "expected a port number or an 'a-b' range")
            if isinstance(item, int):
                lo = hi = item
            else:
                m = _PORT_RANGE.fullmatch(item)
                if m is None:
                    raise ConfigError(sub, f"{item!r} is not a port or an 'a-b' range")
                lo = int(m[1])
                hi = int(m[2]) if m[2] is not None else lo
            if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
                raise ConfigError(sub, "ports must be 1..65535")
            if lo > hi:
                raise ConfigError(sub, f"range {lo}-{hi} is backwards")
            out.append((lo, hi))
        return cls(tuple(sorted(set(out))))


DEFAULT_CONNECT_PORTS: Final = PortRanges(((443, 443),))


# -- clients -------------------------------------------------------------------------


class ClientAcl:
    """Which client addresses may use the proxy (an allow list of networks)."""

    def __init__(self, allow: Iterable[str] = DEFAULT_CLIENTS, *, key: str = "clients") -> None:
        allow = list(allow)
        if not allow:
            raise ConfigError(
                key, 'empty: no client could connect (allow all: ["0.0.0.0/0", "::/0"])'
            )
        self.networks = tuple(parse_network(c, f"{key}[{i}]") for i, c in enumerate(allow))
        self._nets = _NetSet(self.networks)
        # the answer depends on the address alone and the list never changes
        self._cached = functools.lru_cache(maxsize=16384)(self._allowed)

    def allowed(self, ip: str) -> bool:
        """Is this client address (as the proxy saw it) allowed? Never raises."""
        return self._cached(ip)

    def _allowed(self, ip: str) -> bool:
        addr = parse_ip(ip)
        return addr is not None and addr in self._nets


# -- destinations --------------------------------------------------------------------


def normalize_host(host: str) -> str:
    """A requested host name as rules see it: lower-case, no trailing dot, IDNA if non-ASCII.

    IP literals (``[v6]`` brackets removed) are returned as written, lower-cased.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host.isascii():
        with contextlib.suppress(UnicodeError):  # if it fails, it matches no ASCII pattern
            host = host.encode("idna").decode("ascii")
    return host.lower()


def _domain_pattern(text: object, key: str) -> str:
    if not isinstance(text, str):
        raise ConfigError(key, f"expected a domain string, got {type(text).__name__}")
    pattern = text.strip()
    prefix = ""
    for p in ("*.", "."):
        if pattern.startswith(p):
            prefix, pattern = p, pattern[len(p) :]
            break
    if parse_ip(pattern) is not None:
        raise ConfigError(key, f"{text!r} is an address: use cidrs")
    name = normalize_host(pattern)
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(x) for x in name.split(".")):
        raise ConfigError(key, f"{text!r} is not a domain (forms: a.b, .a.b, *.a.b)")
    return prefix + name


def _str_list(value: object, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "expected a list of strings")
    if not value:
        raise ConfigError(key, "empty list (leave the key out instead)")
    return list(value)


@dataclass(frozen=True, slots=True)
class DestRule:
    """One destination rule; build it with ``DestRule.build`` or ``from_config``."""

    name: str
    action: Action
    cidrs: tuple[Network, ...] = ()
    domains: tuple[str, ...] = ()  # normalised patterns: "a.b", ".a.b", "*.a.b"
    regex: tuple[re.Pattern[str], ...] = ()
    ports: PortRanges | None = None
    users: frozenset[str] | None = None
    via: str | None = None  # an [[upstream.proxies]] name: connect through it (allow only)
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _suffixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _nets: _NetSet = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact = set()
        suffixes = []
        for d in self.domains:
            if d.startswith("*."):
                suffixes.append(d[1:])
            elif d.startswith("."):
                exact.add(d[1:])
                suffixes.append(d)
            else:
                exact.add(d)
        object.__setattr__(self, "_exact", frozenset(exact))
        object.__setattr__(self, "_suffixes", tuple(suffixes))
        object.__setattr__(self, "_nets", _NetSet(self.cidrs))

    @classmethod
    def build(
        cls,
        name: str,
        action: str,
        *,
        cidrs: Iterable[str] | None = None,
        domains: Iterable[str] | None = None,
        regex: str | Iterable[str] | None = None,
        ports: Iterable[int | str] | None = None,
        users: Iterable[str] | None = None,
        via: str | None = None,
        key: str = "rule",
    ) -> DestRule:
        """Validate config-style values (strings) into a rule; ``ConfigError`` names ``key``."""
        if not isinstance(name, str) or not _RULE_NAME.fullmatch(name):
            raise ConfigError(f"{key}.name", "must be 1-64 of A-Z a-z 0-9 _ . - (not leading . -)")
        if name.startswith(_RESERVED_NAMES):
            raise ConfigError(f"{key}.name", f"{name!r} looks like a built-in decision name")
        if action not in ("allow", "deny"):
            raise ConfigError(f"{key}.action", "must be allow or deny")
        if via is not None:
            if not isinstance(via, str) or not _RULE_NAME.fullmatch(via):
                raise ConfigError(f"{key}.via", "must name an [[upstream.proxies]] entry")
            if action != "allow":
                raise ConfigError(f"{key}.via", "only an allow rule can route via a proxy")
        nets: tuple[Network, ...] = ()
        if cidrs is not None:
            items = _str_list(cidrs, f"{key}.cidrs")
            nets = tuple(parse_network(c, f"{key}.cidrs[{i}]") for i, c in enumerate(items))
        pats: tuple[str, ...] = ()
        if domains is not None:
            items = _str_list(domains, f"{key}.domains")
            pats = tuple(_domain_pattern(d, f"{key}.domains[{i}]") for i, d in enumerate(items))
        rxs: tuple[re.Pattern[str], ...] = ()
        if regex is not None:
            items = _str_list(regex, f"{key}.regex")
            compiled = []
            for i, pattern in enumerate(items):
                try:
                    compiled.append(re.compile(pattern, re.IGNORECASE | re.ASCII))
                except re.error as exc:
                    raise ConfigError(f"{key}.regex[{i}]", f"bad regex: {exc}") from None
            rxs = tuple(compiled)
        port_set = None if ports is None else PortRanges.parse(ports, f"{key}.ports")
        user_set = None
        if users is not None:
            user_set = frozenset(_str_list(users, f"{key}.users"))
        act: Action = "allow" if action == "allow" else "deny"
        return cls(name, act, nets, pats, rxs, port_set, user_set, via)

    @classmethod
    def from_config(cls, table: object, key: str) -> DestRule:
        """A rule from one TOML table (``[[access.rules]]``)."""
        if not isinstance(table, Mapping):
            raise ConfigError(key, "expected a table")
        for k in table:
            if k not in _RULE_KEYS:
                raise unknown_key(f"{key}.{k}", _RULE_KEYS)
        for k in ("name", "action"):
            if k not in table:
                raise ConfigError(f"{key}.{k}", "missing")
        lists: dict[str, Any] = {}
        for k in ("cidrs", "domains", "ports", "users"):
            if k in table:
                v = table[k]
                if not isinstance(v, (list, tuple)):
                    raise ConfigError(f"{key}.{k}", "expected a list")
                lists[k] = v
        regex = table.get("regex")
        if regex is not None and not isinstance(regex, (str, list, tuple)):
            raise ConfigError(f"{key}.regex", "expected a string or a list of strings")
        via = table.get("via")
        if via is not None and not isinstance(via, str):
            raise ConfigError(f"{key}.via", "expected a string")
        return cls.build(table["name"], table["action"], regex=regex, via=via, key=key, **lists)

    @property
    def needs_address(self) -> bool:
        """The rule has CIDRs: it can only be decided on a resolved address."""
        return bool(self.cidrs)

    def matches_request(self, host: str | None, is_ip: bool, port: int, user: str | None) -> bool:
        """Do the criteria other than ``cidrs`` match? ``host`` is already normalised."""
        if self.users is not None and (user is None or user not in self.users):
            return False
        if self.ports is not None and port not in self.ports:
            return False
        if self.domains:
            if host is None or is_ip:
                return False
            if host not in self._exact and not host.endswith(self._suffixes):
                return False
        if self.regex:
            if host is None or len(host) > MAX_HOST:
                return False
            if not any(rx.fullmatch(host) for rx in self.regex):
                return False
        return True

    def matches_address(self, candidates: list[tuple[str, IPAddress]]) -> bool:
        return not self.cidrs or any(a in self._nets for _, a in candidates)


class DestinationPolicy:
    """Destination rules, the default-denied ranges and the CONNECT port list."""

    def __init__(
        self,
        rules: Iterable[DestRule] = (),
        *,
        allow_dest: Iterable[str | Network] = (),
        default_deny_ranges: Iterable[DeniedRange] = DEFAULT_DENIED,
        connect_ports: PortRanges = DEFAULT_CONNECT_PORTS,
    ) -> None:
        self.rules = tuple(rules)
        self.chaining = any(rule.via is not None for rule in self.rules)
        self.allow_dest = tuple(
            n if not isinstance(n, str) else parse_network(n, f"allow_dest[{i}]")
            for i, n in enumerate(allow_dest)
        )
        self.default_deny_ranges = tuple(default_deny_ranges)
        self.connect_ports = connect_ports
        self._allow = _NetSet(self.allow_dest)
        self._cached_check = functools.lru_cache(maxsize=16384)(self._check_address)
        self._deny_v4 = tuple(
            (*_mask(r.network), r.label)
            for r in self.default_deny_ranges
            if isinstance(r.network, ipaddress.IPv4Network)
        )
        self._deny_v6 = tuple(
            (*_mask(r.network), r.label)
            for r in self.default_deny_ranges
            if isinstance(r.network, ipaddress.IPv6Network)
        )

    def check_connect_port(self, port: int) -> Decision:
        """HTTP CONNECT only: is this port in ``connect_ports``?"""
        if port in self.connect_ports:
            return Decision.allow(CONNECT_PORTS)
        return Decision.deny(CONNECT_PORTS)

    def check_name(self, host: str, port: int, user: str | None = None) -> Decision | None:
        """Before resolving: a denial certain for every address ``host`` may resolve to, or None.

        ``None`` means "not denied yet": the connection may proceed to resolution,
        and every resolved address must still pass ``check_address``. This never
        returns an allowing decision. An IP literal is checked in full here.
        """
        name = normalize_host(host)
        if _host_ip(name) is not None:
            decision = self.check_address(name, port, name, user)
            return None if decision.allowed else decision
        if len(name) > MAX_HOST:
            return Decision.deny("invalid-host")
        for rule in self.rules:
            if not rule.matches_request(name, False, port, user):
                continue
            if rule.needs_address or rule.action == "allow":
                return None  # the rest depends on the address
            return Decision.deny(rule.name)
        return None

    def route(self, host: str, port: int, user: str | None = None) -> Decision | None:
        """The allowing ``via`` rule that decides this request, or None: connect directly.

        Decided on what the client asked for, before any lookup: a name is
        never resolved here, since the upstream proxy may resolve it
        differently (or be the only one that can). So for a name, rules with
        ``cidrs`` are passed over (they need an address) and the first rule
        that matches the name, port and user decides: a ``via`` rule routes,
        any other means a direct connect, judged as always (``check_name``,
        then ``check_address`` on every resolved address, where those
        ``cidrs`` rules apply). An IP literal is judged in full
        (``check_address``: every rule and the default-denied ranges) and
        routes when the deciding rule has ``via``. Cheap when no rule has ``via``.
        """
        if not self.chaining:
            return None
        name = normalize_host(host)
        if _host_ip(name) is not None:
            decision = self.check_address(name, port, name, user)
            return decision if decision.via is not None else None
        if len(name) > MAX_HOST:
            return None  # the direct path denies it (invalid-host)
        for rule in self.rules:
            if rule.needs_address or not rule.matches_request(name, False, port, user):
                continue
            return Decision(True, rule.name, None, rule.via) if rule.via is not None else None
        return None

    def check_address(
        self, ip: str, port: int, host: str | None = None, user: str | None = None
    ) -> Decision:
        """The authoritative decision for connecting to ``ip``:``port``.

        ``host`` is the name the client asked for (``None`` when it gave an
        address: the address text then serves as the host). Never raises.
        Answers are cached: they depend on the arguments and the immutable
        rules alone, and the same destinations come back all the time.
        """
        return self._cached_check(ip, port, host, user)

    def _check_address(self, ip: str, port: int, host: str | None, user: str | None) -> Decision:
        addr = parse_ip(ip)
        if addr is None:
            return Decision.deny("invalid-address")
        name = normalize_host(host) if host is not None else None
        is_ip = name is None or _host_ip(name) is not None
        if name is None:
            name = str(addr)
        candidates = _candidates(addr)
        allowed_by = "default-allow"
        for rule in self.rules:
            if rule.matches_request(name, is_ip, port, user) and rule.matches_address(candidates):
                if rule.action == "deny":
                    return Decision.deny(rule.name)
                allowed_by = rule.name
                via = rule.via
                break
        else:
            via = None
        label = self.denied_range(addr, candidates)
        if label is not None:
            return Decision.deny(f"{DEFAULT_DENY}{label}")
        return Decision(True, allowed_by, None, via)

    def denied_range(
        self, addr: IPAddress, candidates: list[tuple[str, IPAddress]] | None = None
    ) -> str | None:
        """The label of the default-denied range ``addr`` falls in (after ``allow_dest``)."""
        if candidates is None:
            candidates = _candidates(addr)
        if addr in self._allow:
            return None
        for via, cand in candidates:
            ranges = self._deny_v4 if isinstance(cand, ipaddress.IPv4Address) else self._deny_v6
            n = int(cand)
            for base, mask, label in ranges:
                if n & mask == base:
                    if cand in self._allow:
                        break
                    return f"{via}:{label}" if via else label
        return None


# -- telling the client ---------------------------------------------------------------


def refusal_text(rule: str, port: int) -> str:
    """What the client is told when destination ``rule`` refused its request.

    It names the rule and the setting that would allow the request, so whoever
    reads it knows what to change; never an address the proxy resolved (a
    client must not learn where an internal name points). ``port`` is the
    client's own.
    """
    if rule == CONNECT_PORTS:
        return (
            f"CONNECT to port {port} is not allowed by rule connect-ports; "
            "allow the port with --connect-ports or access.connect_ports"
        )
    if rule.startswith(DEFAULT_DENY):
        return (
            f"the destination is in a range denied by default (rule {rule}); "
            "allow the range with --allow-dest or access.allow_dest"
        )
    if rule.startswith("invalid-"):
        return f"the destination is not a valid host (rule {rule})"
    return f"the destination is denied by rule {rule!r} of [[access.rules]]"


# -- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class AccessConfig:
    """``[access]``: client allow list, destination rules, CONNECT ports."""

    clients: tuple[str, ...] = DEFAULT_CLIENTS  # CIDRs allowed to use the proxy
    allow_dest: tuple[str, ...] = ()  # CIDRs exempt from the default-denied ranges
    connect_ports: tuple[int | str, ...] = (443,)  # HTTP CONNECT ports: 443, "8000-8100"
    rules: tuple[Mapping[str, Any], ...] = ()  # [[access.rules]] tables, first match wins

    def validate(self, key: str) -> None:
        build_policy(self, key)


def build_policy(cfg: AccessConfig, key: str = "access") -> tuple[ClientAcl, DestinationPolicy]:
    """The two policy objects for a config section; ``ConfigError`` names the bad key."""
    clients = ClientAcl(cfg.clients, key=f"{key}.clients")
    allow_dest = tuple(
        parse_network(c, f"{key}.allow_dest[{i}]") for i, c in enumerate(cfg.allow_dest)
    )
    ports = PortRanges.parse(list(cfg.connect_ports), f"{key}.connect_ports", allow_empty=True)
    rules = []
    names: set[str] = set()
    for i, table in enumerate(cfg.rules):
        rule = DestRule.from_config(table, f"{key}.rules[{i}]")
        if rule.name in names:
            raise ConfigError(f"{key}.rules[{i}].name", f"duplicate rule name {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    return clients, DestinationPolicy(rules, allow_dest=allow_dest, connect_ports=ports)
