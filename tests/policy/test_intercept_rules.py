"""The interception rules and the pinning memory (proxytap.policy.intercept), pure."""

from __future__ import annotations

import pytest

from proxytap.errors import ConfigError
from proxytap.policy.intercept import InterceptPolicy, PinMemory

POLICY = InterceptPolicy(
    intercept=["*.example.com", "a.test", ".both.test", r"~api[0-9]+\.corp", "192.0.2.7"],
    passthrough=["bank.example.com"],
    passthrough_clients=["10.9.0.0/16"],
)


@pytest.mark.parametrize(
    ("host", "intercept", "reason"),
    [
        ("www.example.com", True, "intercept"),
        ("a.b.example.com", True, "intercept"),
        ("example.com", False, "not-listed"),  # *.x is below x only
        ("A.TEST.", True, "intercept"),  # compared as the access rules compare names
        ("b.a.test", False, "not-listed"),
        ("both.test", True, "intercept"),
        ("x.both.test", True, "intercept"),
        ("api12.corp", True, "intercept"),
        ("api12.corp.evil", False, "not-listed"),  # a regex matches the whole name
        ("bank.example.com", False, "passthrough-host"),
        ("192.0.2.7", True, "intercept"),
        ("192.0.2.8", False, "not-listed"),
    ],
)
def test_hosts(host: str, intercept: bool, reason: str) -> None:
    verdict = POLICY.decide("127.0.0.1", host, None, 0.0)
    assert (verdict.intercept, verdict.reason) == (intercept, reason)


def test_clients() -> None:
    assert not POLICY.may_intercept("10.9.1.1")
    assert POLICY.decide("10.9.1.1", "www.example.com", None, 0.0).reason == "passthrough-client"
    only = InterceptPolicy(intercept=["*"], intercept_clients=["10.0.0.0/8"])
    assert only.may_intercept("10.1.2.3") and not only.may_intercept("192.168.1.1")
    assert only.decide("10.1.2.3", "anything.test", None, 0.0).intercept
    assert not InterceptPolicy().enabled and not InterceptPolicy().may_intercept("10.1.2.3")


def test_pins_pass_a_pair_through_for_their_time_then_expire() -> None:
    pins = PinMemory(ttl=60.0)
    assert pins.record("10.0.0.1", "WWW.Example.com.", 100.0)
    verdict = POLICY.decide("10.0.0.1", "www.example.com", pins, 120.0)
    assert (verdict.intercept, verdict.reason) == (False, "pinned")
    assert POLICY.decide("10.0.0.2", "www.example.com", pins, 120.0).intercept  # other client
    assert POLICY.decide("10.0.0.1", "www.example.com", pins, 161.0).intercept  # expired
    assert len(pins) == 0
    assert not PinMemory(ttl=0).record("10.0.0.1", "a.test", 0.0)  # fail-open off


def test_pins_are_bounded_oldest_first() -> None:
    pins = PinMemory(ttl=60.0, limit=3)
    for i in range(5):
        pins.record("10.0.0.1", f"h{i}.test", 0.0)
    assert len(pins) == 3
    assert not pins.active("10.0.0.1", "h0.test", 1.0)
    assert pins.active("10.0.0.1", "h4.test", 1.0)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"intercept": ["~a["]}, "tls.intercept"),
        ({"intercept": ["not a domain"]}, "tls.intercept"),
        ({"passthrough": [""]}, "tls.passthrough[0]"),
        ({"intercept_clients": ["10.0.0.0/33"]}, "tls.intercept_clients[0]"),
    ],
)
def test_bad_rules_name_their_key(kwargs: dict[str, list[str]], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        InterceptPolicy(**kwargs)
    assert err.value.key == key
