"""Access control: client allow list, destination rules, default-denied ranges, CONNECT ports."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.config import _build
from proxytap.errors import ConfigError, Failure
from proxytap.policy.acl import (
    DEFAULT_DENIED,
    AccessConfig,
    ClientAcl,
    Decision,
    DestinationPolicy,
    DestRule,
    PortRanges,
    build_policy,
    embedded_ipv4,
    normalize_host,
    parse_ip,
    parse_network,
)

# -- clients ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped: the IPv4 address
        ("::ffff:7f00:1", True),
        ("10.0.0.1", False),
        ("::2", False),
        ("::ffff:10.0.0.1", False),
        ("192.0.2.1", False),
        ("", False),
        ("localhost", False),
        ("not an ip", False),
        ("127.0.0.1:80", False),
        ("fe80::1%lo", False),
    ],
)
def test_default_client_acl_is_loopback_only(ip: str, allowed: bool) -> None:
    assert ClientAcl().allowed(ip) is allowed


def test_client_acl_networks() -> None:
    acl = ClientAcl(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "::ffff:198.51.100.0/120"])
    assert acl.allowed("10.1.2.3")
    assert acl.allowed("::ffff:10.1.2.3")
    assert acl.allowed("2001:db8::5")
    assert acl.allowed("192.0.2.7")
    assert not acl.allowed("192.0.2.8")
    assert acl.allowed("198.51.100.9")  # the mapped network became an IPv4 network
    assert acl.allowed("fe80::1%eth0") is False
    assert not acl.allowed("127.0.0.1")


def test_client_acl_allow_all() -> None:
    acl = ClientAcl(["0.0.0.0/0", "::/0"])
    assert (
        acl.allowed("203.0.113.1") and acl.allowed("2001:db8::1") and acl.allowed("::ffff:1.2.3.4")
    )


@pytest.mark.parametrize(
    "bad", [[], ["10.0.0.1/8"], ["10.0.0.0/33"], ["example.com"], ["fe80::/10%eth0"], [8]]
)
def test_client_acl_bad_config(bad: list[Any]) -> None:
    with pytest.raises(ConfigError) as exc:
        ClientAcl(bad, key="access.clients")
    assert exc.value.key.startswith("access.clients")


# -- helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("1.2.3", None),
        ("01.2.3.4", None),
        ("", None),
        ("example.com", None),
    ],
)
def test_parse_ip(text: str, parsed: str | None) -> None:
    addr = parse_ip(text)
    assert (None if addr is None else str(addr)) == parsed


@pytest.mark.parametrize(
    ("text", "net"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.1", "192.0.2.1/32"),
        (" 2001:db8::/32 ", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
        ("::/0", "::/0"),
    ],
)
def test_parse_network(text: str, net: str) -> None:
    assert str(parse_network(text, "k")) == net


@pytest.mark.parametrize("text", ["10.0.0.1/8", "1.2.3.4/40", "x", "", "10/8"])
def test_parse_network_errors(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^k: "):
        parse_network(text, "k")


@pytest.mark.parametrize(
    ("addr", "embedded"),
    [
        ("64:ff9b::a00:1", [("nat64", "10.0.0.1")]),
        ("64:ff9b::808:808", [("nat64", "8.8.8.8")]),
        ("2002:7f00:1::", [("6to4", "127.0.0.1")]),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", [("teredo", "192.0.2.45")]),  # RFC 4380 example
        ("2001:db8::1", []),
        ("10.0.0.1", []),
    ],
)
def test_embedded_ipv4(addr: str, embedded: list[tuple[str, str]]) -> None:
    parsed = parse_ip(addr)
    assert parsed is not None
    assert [(how, str(a)) for how, a in embedded_ipv4(parsed)] == embedded


@pytest.mark.parametrize(
    ("host", "norm"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        (" example.com ", "example.com"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("a..", "a.."),
    ],
)
def test_normalize_host(host: str, norm: str) -> None:
    assert normalize_host(host) == norm


# -- ports -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "inside", "outside", "text"),
    [
        ([443], [443], [80, 444, 0], "443"),
        (["8000-8100", 443], [8000, 8050, 8100, 443], [7999, 8101], "443,8000-8100"),
        (["1-65535"], [1, 65535], [0, 65536], "1-65535"),
        ([" 80 ", "22 - 23"], [80, 22, 23], [24], "22-23,80"),
        ([443, 443], [443], [], "443"),
    ],
)
def test_port_ranges(values: list[Any], inside: list[int], outside: list[int], text: str) -> None:
    ports = PortRanges.parse(values, "k")
    assert all(p in ports for p in inside)
    assert not any(p in ports for p in outside)
    assert str(ports) == text
    assert "443" not in ports


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ([0], "k[0]"),
        ([65536], "k[0]"),
        (["8100-8000"], "k[0]"),
        ([443, "a-b"], "k[1]"),
        (["80,81"], "k[0]"),
        ([True], "k[0]"),
        ([1.5], "k[0]"),
        ([], "k"),
        ({"a": 1}, "k"),
    ],
)
def test_port_range_errors(values: Any, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        PortRanges.parse(values, "k")
    assert exc.value.key == key


def test_connect_ports() -> None:
    policy = DestinationPolicy()
    assert policy.check_connect_port(443) == Decision(True, "connect-ports")
    denied = policy.check_connect_port(22)
    assert not denied.allowed and denied.failure is Failure.PROHIBITED
    wide = DestinationPolicy(connect_ports=PortRanges.parse([443, "8000-8443"], "k"))
    assert wide.check_connect_port(8443).allowed
    assert not wide.check_connect_port(80).allowed
    none = DestinationPolicy(connect_ports=PortRanges.parse([], "k", allow_empty=True))
    assert not none.check_connect_port(443).allowed


# -- default-denied ranges ---------------------------------------------------------------

DENIED_TABLE = [
    ("127.0.0.1", "loopback"),
    ("127.1.2.3", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "shared"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("fec0::1", "site-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("192.0.0.8", "ietf-protocol"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"),
    ("2001:db8::1", "documentation"),
    ("100::1", "discard"),
    ("::1.2.3.4", "ipv4-compatible"),
    ("64:ff9b:1::1", "nat64-local"),
    # IPv4-mapped forms are the IPv4 address
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("[::ffff:192.168.0.1]", "private"),
    # embedded IPv4
    ("64:ff9b::7f00:1", "nat64:loopback"),
    ("64:ff9b::a9fe:a9fe", "nat64:metadata"),
    ("64:ff9b::c0a8:101", "nat64:private"),
    ("2002:a00:1::1", "6to4:private"),
    ("2002:7f00:1::1", "6to4:loopback"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "teredo:private"),
]

ALLOWED_TABLE = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",
    "172.15.255.255",
    "100.128.0.1",
    "11.0.0.1",
    "223.255.255.255",
    "2001:4860:4860::8888",
    "2606:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of a public address
    "2002:808:808::1",  # 6to4 of a public address
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo client 192.0.2.45 -> documentation!
]


@pytest.mark.parametrize(("ip", "label"), DENIED_TABLE)
def test_default_denied(ip: str, label: str) -> None:
    decision = DestinationPolicy().check_address(ip, 443, "example.com")
    assert decision == Decision(False, f"default-deny:{label}", Failure.PROHIBITED)


@pytest.mark.parametrize("ip", ALLOWED_TABLE)
def test_public_addresses_allowed(ip: str) -> None:
    decision = DestinationPolicy().check_address(ip, 443, "example.com")
    if ip.startswith("2001:0:"):  # the RFC 4380 example embeds a documentation address
        assert decision.rule == "default-deny:teredo:documentation"
        return
    assert decision == Decision(True, "default-allow", None)


@pytest.mark.parametrize(("ip", "label"), DENIED_TABLE)
def test_allow_dest_opens_denied_ranges(ip: str, label: str) -> None:
    addr = parse_ip(ip)
    assert addr is not None
    embedded = embedded_ipv4(addr)
    target = embedded[0][1] if embedded else addr
    prefix = 32 if isinstance(target, ipaddress.IPv4Address) else 128
    policy = DestinationPolicy(allow_dest=[f"{target}/{prefix}"])
    assert policy.check_address(ip, 443) == Decision(True, "default-allow")
    # the connected address itself also works
    policy = DestinationPolicy(allow_dest=[f"{addr}/{32 if addr.version == 4 else 128}"])
    assert policy.check_address(ip, 443).allowed


def test_allow_dest_is_precise() -> None:
    policy = DestinationPolicy(allow_dest=["10.1.0.0/16", "fd00:1::/32"])
    assert policy.check_address("10.1.2.3", 80).allowed
    assert policy.check_address("::ffff:10.1.2.3", 80).allowed
    assert policy.check_address("64:ff9b::a01:203", 80).allowed
    assert policy.check_address("fd00:1::5", 80).allowed
    assert policy.check_address("10.2.0.1", 80).rule == "default-deny:private"
    assert policy.check_address("127.0.0.1", 80).rule == "default-deny:loopback"
    assert policy.check_address("fd00:2::5", 80).rule == "default-deny:unique-local"


def test_custom_denied_ranges() -> None:
    policy = DestinationPolicy(default_deny_ranges=())
    assert policy.check_address("127.0.0.1", 80).allowed
    only = DestinationPolicy(
        default_deny_ranges=[d for d in DEFAULT_DENIED if d.label == "metadata"]
    )
    assert only.check_address("10.0.0.1", 80).allowed
    assert not only.check_address("169.254.169.254", 80).allowed


@pytest.mark.parametrize("ip", ["", "garbage", "300.1.1.1", "1.2.3", "::g", "localhost"])
def test_invalid_address_is_denied(ip: str) -> None:
    assert DestinationPolicy().check_address(ip, 443) == Decision.deny("invalid-address")


# -- rules -------------------------------------------------------------------------------


def rule(name: str, action: str = "deny", **kw: Any) -> DestRule:
    return DestRule.build(name, action, **kw)


DOMAIN_TABLE = [
    # pattern, host, matches
    ("example.com", "example.com", True),
    ("example.com", "EXAMPLE.COM.", True),
    ("example.com", "www.example.com", False),
    ("example.com", "notexample.com", False),
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "wwwexample.com", False),
    (".example.com", "example.com", True),
    (".example.com", "a.b.example.com", True),
    (".example.com", "badexample.com", False),
    ("Bücher.Example", "xn--bcher-kva.example", True),
    ("bücher.example", "BÜCHER.example", True),
    ("*.com", "example.com", True),
    ("example.com", "example.com.evil.test", False),
]


@pytest.mark.parametrize(("pattern", "host", "matches"), DOMAIN_TABLE)
def test_domain_rules(pattern: str, host: str, matches: bool) -> None:
    policy = DestinationPolicy([rule("d", domains=[pattern])])
    by_name = policy.check_name(host, 443)
    by_address = policy.check_address("93.184.216.34", 443, host)
    if matches:
        assert by_name == Decision.deny("d")
        assert by_address == Decision.deny("d")
    else:
        assert by_name is None
        assert by_address == Decision.allow("default-allow")


def test_domains_never_match_ip_literals() -> None:
    policy = DestinationPolicy([rule("d", domains=["*.4"]), rule("r", regex=r"9\.9\.9\.9")])
    assert policy.check_name("1.2.3.4", 443) is None
    assert policy.check_address("1.2.3.4", 443, "1.2.3.4").allowed
    # a regex sees the literal, though
    assert policy.check_name("9.9.9.9", 443) == Decision.deny("r")
    assert policy.check_address("9.9.9.9", 443) == Decision.deny("r")


REGEX_TABLE = [
    (r"ads?\..*", "ads.example", True),
    (r"ads?\..*", "ad.example", True),
    (r"ads?\..*", "xads.example", False),  # fullmatch: no implicit search
    (r"example\.com", "example.com.evil.test", False),
    (r"EXAMPLE\.com", "example.COM", True),  # case-insensitive
    (r".*\.onion", "abc.onion", True),
]


@pytest.mark.parametrize(("pattern", "host", "matches"), REGEX_TABLE)
def test_regex_rules(pattern: str, host: str, matches: bool) -> None:
    policy = DestinationPolicy([rule("rx", regex=[pattern])])
    assert (policy.check_name(host, 80) is not None) is matches


def test_cidr_rules_need_the_address() -> None:
    policy = DestinationPolicy([rule("net", cidrs=["93.184.216.0/24", "2606:2800::/32"])])
    assert policy.check_name("example.com", 443) is None
    assert policy.check_address("93.184.216.34", 443, "example.com") == Decision.deny("net")
    assert policy.check_address("2606:2800:220:1::1", 443, "example.com") == Decision.deny("net")
    assert policy.check_address("::ffff:93.184.216.34", 443) == Decision.deny("net")
    assert policy.check_address("64:ff9b::5db8:d822", 443) == Decision.deny("net")  # via NAT64
    assert policy.check_address("93.184.217.1", 443, "example.com").allowed
    # an IP literal is fully decided by name
    assert policy.check_name("93.184.216.34", 443) == Decision.deny("net")
    assert policy.check_name("[2606:2800::1]", 443) == Decision.deny("net")


def test_port_rules() -> None:
    policy = DestinationPolicy([rule("smtp", ports=[25, "465-587"])])
    assert policy.check_name("mail.example", 25) == Decision.deny("smtp")
    assert policy.check_name("mail.example", 500) == Decision.deny("smtp")
    assert policy.check_name("mail.example", 443) is None
    assert policy.check_address("8.8.8.8", 587) == Decision.deny("smtp")


def test_user_rules() -> None:
    policy = DestinationPolicy(
        [
            rule("admins-anywhere", "allow", users=["alice"]),
            rule("guests-no-social", domains=[".social.example"], users=["guest"]),
            rule("rest", domains=[".intranet.example"]),
        ]
    )
    assert policy.check_name("intranet.example", 443, "alice") is None
    assert policy.check_address("8.8.8.8", 443, "x.intranet.example", "alice") == Decision.allow(
        "admins-anywhere"
    )
    assert policy.check_name("intranet.example", 443, "bob") == Decision.deny("rest")
    assert policy.check_name("intranet.example", 443, None) == Decision.deny("rest")
    assert policy.check_name("www.social.example", 443, "guest") == Decision.deny(
        "guests-no-social"
    )
    assert policy.check_name("www.social.example", 443, "bob") is None
    assert policy.check_name("www.social.example", 443) is None


def test_criteria_are_anded() -> None:
    policy = DestinationPolicy([rule("both", domains=["example.com"], ports=[80])])
    assert policy.check_name("example.com", 80) == Decision.deny("both")
    assert policy.check_name("example.com", 443) is None
    assert policy.check_name("example.org", 80) is None


def test_first_match_wins_and_allow_list_mode() -> None:
    policy = DestinationPolicy(
        [
            rule("ok", "allow", domains=[".good.example"]),
            rule("bad-net", cidrs=["8.8.0.0/16"]),
            rule("rest"),  # no criteria: matches everything
        ]
    )
    assert policy.check_name("www.good.example", 443) is None
    assert policy.check_address("8.8.8.8", 443, "www.good.example") == Decision.allow("ok")
    assert policy.check_name("other.example", 443) is None  # bad-net or rest: the address decides
    assert policy.check_address("8.8.8.8", 443, "other.example") == Decision.deny("bad-net")
    assert policy.check_address("1.1.1.1", 443, "other.example") == Decision.deny("rest")
    assert policy.check_address("1.1.1.1", 443) == Decision.deny("rest")
    names_only = DestinationPolicy([rule("ok", "allow", domains=[".good.example"]), rule("rest")])
    assert names_only.check_name("other.example", 443) == Decision.deny("rest")
    assert names_only.check_name("good.example", 443) is None


def test_cidr_rule_before_name_rule_leaves_name_undecided() -> None:
    policy = DestinationPolicy([rule("net", "allow", cidrs=["1.1.1.0/24"]), rule("rest")])
    assert policy.check_name("one.example", 443) is None  # could resolve into 1.1.1.0/24
    assert policy.check_address("1.1.1.1", 443, "one.example") == Decision.allow("net")
    assert policy.check_address("2.2.2.2", 443, "one.example") == Decision.deny("rest")


def test_allow_rules_never_open_denied_ranges() -> None:
    policy = DestinationPolicy(
        [rule("all", "allow", cidrs=["0.0.0.0/0", "::/0"]), rule("names", "allow", domains=[".x"])]
    )
    assert policy.check_address("127.0.0.1", 80, "a.x") == Decision.deny("default-deny:loopback")
    assert policy.check_address("10.0.0.1", 80) == Decision.deny("default-deny:private")
    assert policy.check_name("10.0.0.1", 80) == Decision.deny("default-deny:private")
    assert policy.check_address("8.8.8.8", 80) == Decision.allow("all")


def test_deny_rules_beat_allow_dest() -> None:
    policy = DestinationPolicy([rule("no-db", cidrs=["10.0.5.0/24"])], allow_dest=["10.0.0.0/8"])
    assert policy.check_address("10.0.5.1", 5432) == Decision.deny("no-db")
    assert policy.check_address("10.0.6.1", 5432) == Decision.allow("default-allow")


def test_check_name_denies_ip_literals_early() -> None:
    policy = DestinationPolicy()
    assert policy.check_name("169.254.169.254", 80) == Decision.deny("default-deny:metadata")
    assert policy.check_name("[::ffff:127.0.0.1]", 80) == Decision.deny("default-deny:loopback")
    assert policy.check_name("8.8.8.8", 80) is None
    assert policy.check_name("localhost", 80) is None  # a name: its addresses decide
    assert policy.check_name("x" * 300, 80) == Decision.deny("invalid-host")
    # inet_aton spellings are names here; the resolved address is what gets checked
    for spelling in ("2130706433", "127.1", "0x7f.0.0.1"):
        assert policy.check_name(spelling, 80) is None
        assert not policy.check_address("127.0.0.1", 80, spelling).allowed


# -- config ------------------------------------------------------------------------------


def test_access_config_defaults() -> None:
    cfg = AccessConfig()
    assert cfg.clients == ("127.0.0.0/8", "::1/128")
    assert cfg.allow_dest == ()
    assert cfg.connect_ports == (443,)
    assert cfg.rules == ()
    cfg.validate("access")
    clients, policy = build_policy(cfg)
    assert clients.allowed("127.0.0.1") and not clients.allowed("10.0.0.1")
    assert policy.check_connect_port(443).allowed and not policy.check_connect_port(80).allowed
    assert policy.rules == ()


def test_access_config_from_toml_shape() -> None:
    data = {
        "clients": ["10.0.0.0/8", "::1"],
        "allow_dest": ["10.20.0.0/16"],
        "connect_ports": [443, "8443", "9000-9100"],
        "rules": [
            {"name": "block-ads", "action": "deny", "domains": [".ads.example", "*.track.example"]},
            {"name": "internal", "action": "allow", "cidrs": ["10.20.0.0/16"], "users": ["ops"]},
            {"name": "no-smtp", "action": "deny", "ports": [25, "465-587"]},
            {"name": "rx", "action": "deny", "regex": "^.*\\.onion$"},
        ],
    }
    cfg = _build(AccessConfig, data, "access")  # the generic TOML loader of config.py
    cfg.validate("access")
    clients, policy = build_policy(cfg)
    assert clients.allowed("10.9.9.9") and clients.allowed("::1")
    assert [r.name for r in policy.rules] == ["block-ads", "internal", "no-smtp", "rx"]
    assert policy.check_name("x.ads.example", 443) == Decision.deny("block-ads")
    assert policy.check_address("10.20.1.1", 443, "db.corp", "ops") == Decision.allow("internal")
    assert policy.check_address("10.20.1.1", 443, "db.corp", "bob").allowed  # allow_dest
    assert policy.check_address("10.21.1.1", 443, "db.corp", "ops").rule == "default-deny:private"
    assert policy.check_connect_port(9050).allowed and policy.check_connect_port(8443).allowed
    assert policy.check_name("abc.onion", 80) == Decision.deny("rx")


BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"clients": []}, "access.clients"),
    ({"clients": ["10.0.0.1/8"]}, "access.clients[0]"),
    ({"clients": ["127.0.0.0/8", "nope"]}, "access.clients[1]"),
    ({"allow_dest": ["10.0.0.0/33"]}, "access.allow_dest[0]"),
    ({"connect_ports": [0]}, "access.connect_ports[0]"),
    ({"connect_ports": [443, "9-1"]}, "access.connect_ports[1]"),
    ({"connect_ports": ["https"]}, "access.connect_ports[0]"),
    ({"rules": [{"action": "deny"}]}, "access.rules[0].name"),
    ({"rules": [{"name": "a"}]}, "access.rules[0].action"),
    ({"rules": [{"name": "a", "action": "block"}]}, "access.rules[0].action"),
    ({"rules": [{"name": "a b", "action": "deny"}]}, "access.rules[0].name"),
    ({"rules": [{"name": "default-x", "action": "deny"}]}, "access.rules[0].name"),
    ({"rules": [{"name": "a", "action": "deny", "colour": "red"}]}, "access.rules[0].colour"),
    ({"rules": [{"name": "a", "action": "deny", "cidrs": "10.0.0.0/8"}]}, "access.rules[0].cidrs"),
    ({"rules": [{"name": "a", "action": "deny", "cidrs": ["x"]}]}, "access.rules[0].cidrs[0]"),
    ({"rules": [{"name": "a", "action": "deny", "cidrs": []}]}, "access.rules[0].cidrs"),
    (
        {"rules": [{"name": "a", "action": "deny", "domains": ["a..b"]}]},
        "access.rules[0].domains[0]",
    ),
    ({"rules": [{"name": "a", "action": "deny", "domains": ["*"]}]}, "access.rules[0].domains[0]"),
    (
        {"rules": [{"name": "a", "action": "deny", "domains": ["a.*.b"]}]},
        "access.rules[0].domains[0]",
    ),
    (
        {"rules": [{"name": "a", "action": "deny", "domains": ["1.2.3.4"]}]},
        "access.rules[0].domains[0]",
    ),
    ({"rules": [{"name": "a", "action": "deny", "domains": [3]}]}, "access.rules[0].domains"),
    ({"rules": [{"name": "a", "action": "deny", "regex": "("}]}, "access.rules[0].regex[0]"),
    (
        {"rules": [{"name": "a", "action": "deny", "regex": ["ok", "[z-a]"]}]},
        "access.rules[0].regex[1]",
    ),
    ({"rules": [{"name": "a", "action": "deny", "regex": 5}]}, "access.rules[0].regex"),
    ({"rules": [{"name": "a", "action": "deny", "ports": ["1-2-3"]}]}, "access.rules[0].ports[0]"),
    ({"rules": [{"name": "a", "action": "deny", "ports": []}]}, "access.rules[0].ports"),
    ({"rules": [{"name": "a", "action": "deny", "users": []}]}, "access.rules[0].users"),
    ({"rules": [{"name": "a", "action": "deny", "users": [1]}]}, "access.rules[0].users"),
    (
        {"rules": [{"name": "a", "action": "deny"}, {"name": "a", "action": "allow"}]},
        "access.rules[1].name",
    ),
    ({"rules": ["deny all"]}, "access.rules[0]"),
]


@pytest.mark.parametrize(("data", "key"), BAD_CONFIGS)
def test_access_config_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg = AccessConfig(**data)
        cfg.validate("access")
    assert exc.value.key == key, exc.value


def test_loader_type_errors() -> None:
    with pytest.raises(ConfigError) as exc:
        _build(AccessConfig, {"connect_ports": [True]}, "access")
    assert exc.value.key == "access.connect_ports[0]"
    with pytest.raises(ConfigError) as exc:
        _build(AccessConfig, {"colour": 1}, "access")
    assert exc.value.key == "access.colour"


# -- properties --------------------------------------------------------------------------

_v4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_v6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
_mapped = st.integers(0, 2**32 - 1).map(lambda n: f"::ffff:{ipaddress.IPv4Address(n)}")
_any_ip = _v4 | _v6 | _mapped | st.text(max_size=40)

_PERMISSIVE = DestinationPolicy(
    [
        DestRule.build("all-v4", "allow", cidrs=["0.0.0.0/0"]),
        DestRule.build("all-v6", "allow", cidrs=["::/0"]),
    ]
)
_RULED = DestinationPolicy(
    [
        DestRule.build("names", "deny", domains=[".example"], regex=[r"a.*"]),
        DestRule.build("net", "deny", cidrs=["8.0.0.0/8", "2001:4860::/32"], ports=["1-1024"]),
        DestRule.build("u", "allow", users=["u"]),
    ],
    allow_dest=["10.0.0.0/8"],
)


@settings(max_examples=500)
@given(
    _any_ip, st.integers(0, 70000), st.text(max_size=30) | st.none(), st.sampled_from([None, "u"])
)
def test_random_input_never_raises(ip: str, port: int, host: str | None, user: str | None) -> None:
    for policy in (_PERMISSIVE, _RULED, DestinationPolicy()):
        decision = policy.check_address(ip, port, host, user)
        assert isinstance(decision, Decision)
        assert (decision.failure is None) is decision.allowed
        if host is not None:
            early = policy.check_name(host, port, user)
            assert early is None or not early.allowed
        policy.check_connect_port(port)
    assert isinstance(ClientAcl().allowed(ip), bool)


def _in_range(data: st.DataObject) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    r = data.draw(st.sampled_from(DEFAULT_DENIED))
    net = r.network
    offset = data.draw(st.integers(0, net.num_addresses - 1))
    addr = net.network_address + offset
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::/96 holds no mapped addresses, but keep it honest
    form = data.draw(st.sampled_from(["plain", "mapped", "nat64"]))
    if isinstance(addr, ipaddress.IPv4Address) and form == "mapped":
        return f"::ffff:{addr}", addr
    if isinstance(addr, ipaddress.IPv4Address) and form == "nat64":
        return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(addr))), addr
    return str(addr), addr


@settings(max_examples=400)
@given(st.data())
def test_denied_stays_denied_unless_allow_dest_covers(data: st.DataObject) -> None:
    ip, inner = _in_range(data)
    port = data.draw(st.integers(1, 65535))
    host = data.draw(st.sampled_from([None, "example.com", ip]))
    for policy in (_PERMISSIVE, DestinationPolicy()):
        decision = policy.check_address(ip, port, host, "u")
        assert not decision.allowed
        assert decision.rule.startswith("default-deny:")
    prefix = 32 if inner.version == 4 else 128
    opened = DestinationPolicy(allow_dest=[f"{inner}/{prefix}"])
    assert opened.check_address(ip, port, host).allowed
    other = DestinationPolicy(allow_dest=["203.0.113.0/24"] if inner.version == 6 else ["fc00::/7"])
    assert not other.check_address(ip, port, host).allowed


@settings(max_examples=300)
@given(st.data())
def test_check_name_denial_agrees_with_check_address(data: st.DataObject) -> None:
    host = data.draw(st.sampled_from(["a.example", "b.example", "x.test", "a", "example"]))
    port = data.draw(st.sampled_from([80, 443, 2000]))
    user = data.draw(st.sampled_from([None, "u"]))
    ip = data.draw(_v4 | _v6)
    early = _RULED.check_name(host, port, user)
    if early is not None:  # a name-time denial holds for every address
        assert _RULED.check_address(ip, port, host, user) == early
