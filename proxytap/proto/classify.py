"""SF-TAP classification: which flow socket a flow goes to (pure, no I/O).

The rules and their semantics follow the original abstractor (spec section 3,
``fabs_appif.cpp``):

* Rules are tried in ascending ``nice``; equal ``nice`` keeps the given order.
  (The original also moves the last hit to the front of its list, an LRU
  optimisation that makes ties depend on traffic; proxytap keeps ties stable.)
* A regex is searched over the prefix as bytes (Latin-1, ``.`` matches
  newline), like RE2's ``PartialMatch`` in the original; every default regex
  is anchored with ``^``. A rule matches when its ``up`` regex matches the
  client-to-server prefix and its ``down`` regex the server-to-client prefix.
  The original does not know the client, so it also tries the rule with the
  directions swapped; a proxy knows who the client is and does not.
* A regex that is ``None`` does not constrain its side, so a rule with no
  regex at all is a port-only rule. A rule with ``ports`` only matches when the
  client's or the server's port is in the set.
* Until ``final``, nothing is decided unless both directions have bytes (the
  original classifies once both sides have data); ``None`` then means "wait".
  When ``final`` (the flow closed, or a side reached the hub's 4096-byte
  limit), rules are evaluated on what there is (an empty side matches only a
  regex that matches ``b""``) and unmatched flows go to ``default``.
* ``balance: N`` (N > 1) spreads a rule over sockets ``<name>0``..``<name>N-1``
  by the original's flow hash (``proxytap.proto.sftap.flow_hash``). As in the
  original, ``balance`` 0 or 1 means one socket named ``<name>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from proxytap.errors import ConfigError, unknown_key

DEFAULT: Final = "default"
DEFAULT_NICE: Final = 2**31 - 1
_FLAGS: Final = re.DOTALL
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_RANGE = re.compile(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?")


@dataclass(frozen=True, slots=True)
class Rule:
    """One classification rule; ``name`` is also its socket's name under ``tcp/`` or ``udp/``."""

    name: str
    nice: int = 100
    up: re.Pattern[bytes] | None = None
    down: re.Pattern[bytes] | None = None
    ports: frozenset[int] | None = None
    l4: str = "tcp"
    balance: int = 0


def _rx(pattern: bytes) -> re.Pattern[bytes]:
    return re.compile(pattern, _FLAGS)


_HTTP_UP = rb"^[-a-zA-Z]+ .+ HTTP/1\.(0\r?\n|1\r?\n([-a-zA-Z]+: .+\r?\n)+)"
_TLS_UP = (
    rb"^((\x16\x03[\x00-\x03]..\x01...(\x02\x00|\x03[\x00-\x03]))"
    rb"|(..\x01(\x02\x00|\x03[\x00-\x03])))"
)
_TLS_DOWN = (
    rb"^((\x16\x03[\x00-\x03]..\x02...(\x02\x00|\x03[\x00-\x03]))"
    rb"|(..\x02(\x02\x00|\x03[\x00-\x03])))"
)
_SSH = rb"^SSH-[12]\.[0-9]+-.+\r\n"

#: The original abstractor's default rules (spec section 3), in its order.
DEFAULT_RULES: Final[tuple[Rule, ...]] = (
    Rule(
        "http_proxy",
        90,
        _rx(rb"^(CONNECT|connect) .+ HTTP/1\.(0\r?\n|1\r?\n([-a-zA-Z]+: .+\r?\n)+)"),
        _rx(rb"^HTTP/1\.[01] 200 .+\r?\n"),
    ),
    Rule(
        "websocket",
        90,
        _rx(rb"^GET .+ HTTP/1.1\r\n"),
        _rx(rb"^HTTP/1.1 101 Switching Protocols\r\n"),
    ),
    Rule("http", 100, _rx(_HTTP_UP), _rx(rb"^HTTP/1\.[01] [1-9][0-9]{2} .+\r?\n")),
    Rule("ssl", 100, _rx(_TLS_UP), _rx(_TLS_DOWN)),
    Rule("ssh", 100, _rx(_SSH), _rx(_SSH)),
    Rule("smtp", 100, _rx(rb"^(EH|HE)LO .+\r\n"), _rx(rb"^220 .+\r\n")),
    Rule("ftp", 100, _rx(rb"^USER .+\r\n"), _rx(rb"^220 .+\r\n")),
    Rule("irc", 100, _rx(rb"^(PASS .+\r\n)?USER .+\r\nNICK .+\r\n"), _rx(rb"^:.+ [0-9]{3} .+\r\n")),
    Rule("http_client", 200, _rx(_HTTP_UP), _rx(rb".*")),
    Rule("dns", 200, ports=frozenset({53, 5353, 5355}), l4="udp"),
    Rule(DEFAULT, DEFAULT_NICE, l4="tcp"),
    Rule(DEFAULT, DEFAULT_NICE, l4="udp"),
)


def _ports_match(rule: Rule, p1: int, p2: int) -> bool:
    ports = rule.ports
    return ports is None or p1 in ports or p2 in ports


class Classifier:
    """Picks a ``Rule`` for a flow; ``rules`` is every rule, defaults included, by ``nice``."""

    def __init__(self, rules: Iterable[Rule] = DEFAULT_RULES) -> None:
        given = list(rules)
        seen: set[tuple[str, str]] = set()
        for rule in given:
            if rule.l4 not in ("tcp", "udp"):
                raise ConfigError(f"rule {rule.name}", f"l4 must be tcp or udp, not {rule.l4!r}")
            if (rule.name, rule.l4) in seen:
                raise ConfigError(f"rule {rule.name}", f"two {rule.l4} rules with this name")
            seen.add((rule.name, rule.l4))
        ordered = sorted(given, key=lambda r: r.nice)  # sorted() is stable
        defaults = {r.l4: r for r in ordered if r.name == DEFAULT}
        self.tcp_default = defaults.get("tcp") or Rule(DEFAULT, DEFAULT_NICE, l4="tcp")
        self.udp_default = defaults.get("udp") or Rule(DEFAULT, DEFAULT_NICE, l4="udp")
        self._tcp = tuple(r for r in ordered if r.l4 == "tcp" and r.name != DEFAULT)
        self._udp = tuple(r for r in ordered if r.l4 == "udp" and r.name != DEFAULT)
        self.rules: tuple[Rule, ...] = (*self._tcp, self.tcp_default, *self._udp, self.udp_default)

    def tcp(self, up: bytes, down: bytes, ports: tuple[int, int], final: bool) -> Rule | None:
        """The rule for a TCP flow from its first bytes, or ``None`` for "not yet"."""
        if not final and (not up or not down):
            return None
        p1, p2 = ports
        for rule in self._tcp:
            if rule.ports is not None and p1 not in rule.ports and p2 not in rule.ports:
                continue
            if rule.up is not None and rule.up.search(up) is None:
                continue
            if rule.down is not None and rule.down.search(down) is None:
                continue
            return rule
        return self.tcp_default if final else None

    def udp(self, ports: tuple[int, int], payload: bytes | None = None) -> Rule:
        """The rule for a datagram; a rule's ``up`` regex (if any) is tried on ``payload``."""
        p1, p2 = ports
        for rule in self._udp:
            if not _ports_match(rule, p1, p2):
                continue
            if rule.up is not None and (payload is None or rule.up.search(payload) is None):
                continue
            return rule
        return self.udp_default


def interface_for(rule: Rule, key_hash: int) -> str:
    """The socket name a flow of ``rule`` goes to, given ``flow_hash`` of its key."""
    if rule.balance > 1:
        return f"{rule.name}{key_hash % rule.balance}"
    return rule.name


def interfaces(rule: Rule) -> list[str]:
    """Every socket name of ``rule`` (one, or one per ``balance`` slot)."""
    if rule.balance > 1:
        return [f"{rule.name}{i}" for i in range(rule.balance)]
    return [rule.name]


# -- configuration ---------------------------------------------------------------

_KEYS = frozenset({"name", "nice", "up", "down", "port", "l4", "balance"})


def _int(value: object, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(key, f"must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _regex(value: object, key: str) -> re.Pattern[bytes]:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {value!r}")
    try:
        return re.compile(value.encode("latin-1"), _FLAGS)
    except UnicodeEncodeError:
        raise ConfigError(key, "regex must be Latin-1 (write other bytes as \\xNN)") from None
    except re.error as exc:
        raise ConfigError(key, f"bad regex: {exc}") from None


def _ports(value: object, key: str) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "must be a non-empty list of ports or 'LO-HI' ranges")
    out: set[int] = set()
    for item in value:
        if isinstance(item, str):
            m = _RANGE.fullmatch(item)
            if m is None:
                raise ConfigError(key, f"bad port range {item!r}")
            lo = _int(int(m[1]), key, 0, 65535)
            hi = _int(int(m[2]), key, lo, 65535) if m[2] else lo
            out.update(range(lo, hi + 1))
        else:
            out.add(_int(item, key, 0, 65535))
    return frozenset(out)


def rules_from_config(
    entries: Iterable[Mapping[str, object]],
    base: Iterable[Rule] = DEFAULT_RULES,
    *,
    where: str = "export.rules",
) -> list[Rule]:
    """``base`` with rules added or overridden from TOML-style tables.

    Keys: ``name`` (required; also the socket name), ``l4`` ("tcp" default or
    "udp"), ``nice``, ``up``, ``down`` (regex strings, Latin-1; ``\\xNN`` for
    other bytes), ``port`` (list of ports or "LO-HI" strings), ``balance``.
    An entry naming an existing rule of the same ``l4`` overrides only the keys
    it gives (``{name = "http", balance = 4}``); a new rule needs a regex or a
    port. Errors raise ``ConfigError`` naming ``<where>[i].<key>``.
    """
    rules = list(base)
    index = {(r.name, r.l4): i for i, r in enumerate(rules)}
    for n, entry in enumerate(entries):
        at = f"{where}[{n}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(at, "must be a table")
        unknown = set(entry) - _KEYS
        if unknown:
            raise unknown_key(f"{at}.{sorted(unknown)[0]}", _KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise ConfigError(f"{at}.name", f"must be a socket file name, not {name!r}")
        l4 = entry.get("l4", "tcp")
        if l4 not in ("tcp", "udp"):
            raise ConfigError(f"{at}.l4", f"must be 'tcp' or 'udp', not {l4!r}")
        assert isinstance(l4, str)
        old = index.get((name, l4))
        rule = rules[old] if old is not None else Rule(name, l4=l4)
        if "nice" in entry:
            rule = replace(rule, nice=_int(entry["nice"], f"{at}.nice", -(2**31), 2**31 - 1))
        if "up" in entry:
            rule = replace(rule, up=_regex(entry["up"], f"{at}.up"))
        if "down" in entry:
            if l4 == "udp":
                raise ConfigError(f"{at}.down", "a udp rule has no down regex")
            rule = replace(rule, down=_regex(entry["down"], f"{at}.down"))
        if "port" in entry:
            rule = replace(rule, ports=_ports(entry["port"], f"{at}.port"))
        if "balance" in entry:
            rule = replace(rule, balance=_int(entry["balance"], f"{at}.balance", 0, 1024))
        if name != DEFAULT and rule.up is None and rule.down is None and rule.ports is None:
            raise ConfigError(at, "a rule needs an up/down regex or a port list")
        if old is None:
            index[(name, l4)] = len(rules)
            rules.append(rule)
        else:
            rules[old] = rule
    return rules


__all__ = [
    "DEFAULT",
    "DEFAULT_NICE",
    "DEFAULT_RULES",
    "Classifier",
    "Rule",
    "interface_for",
    "interfaces",
    "rules_from_config",
]
