"""Chaining policy: [[upstream.proxies]] entries, ``via`` rules, and how a request is routed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from proxytap.config import from_dict
from proxytap.errors import ConfigError
from proxytap.policy.acl import AccessConfig, Decision, build_policy
from proxytap.policy.chain import UpstreamProxy, build_proxies, parse_proxy_url
from proxytap.proto.proxyclient import Kind


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.example:3128", ("http", "proxy.example", 3128)),
        ("HTTP://Proxy.Example:3128/", ("http", "proxy.example", 3128)),
        ("socks5h://127.0.0.1:1080", ("socks5h", "127.0.0.1", 1080)),
        ("socks5://[::1]:1080", ("socks5", "::1", 1080)),
        ("socks4a://10.0.0.1:1080", ("socks4a", "10.0.0.1", 1080)),
        ("socks4://10.0.0.1:1080", ("socks4", "10.0.0.1", 1080)),
    ],
)
def test_proxy_urls(url: str, expected: tuple[str, str, int]) -> None:
    assert parse_proxy_url(url, "k") == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://proxy:3128", "scheme must be one of"),
        ("proxy:3128", "scheme must be one of"),
        ("http://proxy", "needs a port"),
        ("http://proxy:0", "needs a port"),
        ("http://proxy:99999", "not a proxy URL"),
        ("http://user:pw@proxy:3128", "credentials go in username"),
        ("http://proxy:3128/path", "only scheme://host:port"),
        ("http://:3128", "has no host"),
    ],
)
def test_bad_proxy_urls_name_the_key(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        parse_proxy_url(url, "upstream.proxies[0].url")
    assert info.value.key == "upstream.proxies[0].url"


def test_schemes_say_who_resolves() -> None:
    def proxy(scheme: str) -> UpstreamProxy:
        return UpstreamProxy.from_config({"name": "p", "url": f"{scheme}://h:1"}, "k")

    assert [(proxy(s).kind, proxy(s).remote_dns) for s in ("http", "socks5h", "socks5")] == [
        (Kind.HTTP, True),
        (Kind.SOCKS5, True),
        (Kind.SOCKS5, False),
    ]
    assert [(proxy(s).kind, proxy(s).remote_dns) for s in ("socks4a", "socks4")] == [
        (Kind.SOCKS4, True),
        (Kind.SOCKS4, False),
    ]
    assert proxy("socks4").ipv4_only and not proxy("socks5").ipv4_only
    assert proxy("http").url == "http://h:1"


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"url": "http://h:1"}, "[0].name", "missing"),
        ({"name": "p"}, "[0].url", "missing"),
        ({"name": "p", "url": "http://h:1", "passwd": "x"}, "[0].passwd", "unknown key"),
        ({"name": "-p", "url": "http://h:1"}, "[0].name", "must be"),
        ({"name": "p", "url": 1}, "[0].url", "expected a string"),
        ({"name": "p", "url": "http://h:1", "password": "x"}, "[0].username", "needs a username"),
        ({"name": "p", "url": "http://h:1", "username": "u"}, "[0].password", "needs password"),
        (
            {
                "name": "p",
                "url": "http://h:1",
                "username": "u",
                "password": "x",
                "password_file": "f",
            },
            "[0].password_file",
            "not both",
        ),
        (
            {"name": "p", "url": "http://h:1", "username": "a:b", "password": "x"},
            "[0].username",
            ":",
        ),
        ({"name": "p", "url": "socks4://h:1", "password": "x"}, "[0].password", "SOCKS4"),
        (
            {"name": "p", "url": "socks5://h:1", "username": "u", "password": "x" * 256},
            "[0].password",
            "255 bytes",
        ),
    ],
)
def test_bad_entries_name_the_key(table: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        build_proxies([table], "upstream.proxies")
    assert info.value.key == f"upstream.proxies{key}"


def test_duplicate_names_and_socks4_user_id() -> None:
    entry = {"name": "p", "url": "http://h:1"}
    with pytest.raises(ConfigError, match="duplicate") as info:
        build_proxies([entry, entry], "upstream.proxies")
    assert info.value.key == "upstream.proxies[1].name"
    four = build_proxies([{"name": "p", "url": "socks4://h:1", "username": "id"}], "u")["p"]
    assert (four.username, four.secret()) == ("id", None)


def test_password_file_is_read_at_build_time(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cret\nignored\n")
    table = {"name": "p", "url": "http://h:1", "username": "u", "password_file": str(path)}
    proxy = build_proxies([table], "upstream.proxies")["p"]
    assert proxy.secret() == "s3cret"
    path.write_text("")
    with pytest.raises(ConfigError, match="empty") as info:
        proxy.secret()
    assert info.value.key == "upstream.proxies[0].password_file"
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        proxy.secret()


# -- the config: via names an entry ---------------------------------------------------------


def test_via_must_name_an_upstream_proxy() -> None:
    data: dict[str, Any] = {
        "access": {"rules": [{"name": "r", "action": "allow", "via": "nope"}]},
        "upstream": {"proxies": [{"name": "up", "url": "http://127.0.0.1:3128"}]},
    }
    problem = re.escape("no [[upstream.proxies]] entry 'nope'")
    with pytest.raises(ConfigError, match=problem) as info:
        from_dict(data)
    assert info.value.key == "access.rules[0].via"
    data["access"]["rules"][0]["via"] = "up"
    assert from_dict(data).upstream.proxies[0]["name"] == "up"


def test_via_only_on_allow_rules() -> None:
    access = AccessConfig(rules=({"name": "r", "action": "deny", "via": "up"},))
    with pytest.raises(ConfigError, match="only an allow rule") as info:
        build_policy(access)
    assert info.value.key == "access.rules[0].via"


# -- routing ------------------------------------------------------------------------------


def policy(*rules: dict[str, Any], allow_dest: tuple[str, ...] = ()) -> Any:
    return build_policy(AccessConfig(rules=rules, allow_dest=allow_dest))[1]


def test_no_via_rule_means_never_routed() -> None:
    plain = policy({"name": "r", "action": "allow"})
    assert not plain.chaining
    assert plain.route("example.com", 443) is None


def test_a_name_is_routed_by_the_first_rule_that_matches_it() -> None:
    p = policy(
        {"name": "no-ads", "action": "deny", "domains": ["ads.example"]},
        {"name": "lan", "action": "deny", "cidrs": ["10.0.0.0/8"]},  # needs an address
        {"name": "corp", "action": "allow", "domains": [".corp.example"], "via": "up"},
        {"name": "alice", "action": "allow", "users": ["alice"], "via": "other"},
    )
    assert p.route("a.corp.example", 443) == Decision(True, "corp", None, "up")
    assert p.route("A.Corp.Example.", 443) == Decision(True, "corp", None, "up")
    assert p.route("ads.example", 443) is None  # a deny rule decides: the direct path refuses
    assert p.check_name("ads.example", 443) == Decision.deny("no-ads")
    assert p.route("example.net", 443) is None
    assert p.route("example.net", 443, "alice") == Decision(True, "alice", None, "other")
    assert p.route("x" * 300, 443) is None  # invalid-host: refused on the direct path


def test_an_address_is_judged_by_every_rule_and_the_default_ranges() -> None:
    p = policy(
        {"name": "lan", "action": "deny", "cidrs": ["10.1.0.0/16"]},
        {"name": "via-lan", "action": "allow", "cidrs": ["10.0.0.0/8"], "via": "up"},
        {"name": "rest", "action": "allow", "via": "up"},
        allow_dest=("10.0.0.0/8",),
    )
    assert p.route("10.2.3.4", 80) == Decision(True, "via-lan", None, "up")
    assert p.route("10.1.2.3", 80) is None  # denied: the direct path answers the denial
    assert p.route("127.0.0.1", 80) is None  # default-denied stays denied over a chain
    assert p.route("93.184.216.34", 80) == Decision(True, "rest", None, "up")
    assert p.route("[2606:2800:220:1::1]", 80) == Decision(True, "rest", None, "up")
    # for a name, the cidrs rules are passed over: nothing was resolved
    assert p.route("intranet.example", 80) == Decision(True, "rest", None, "up")
