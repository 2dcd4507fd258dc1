"""proxytap.modules.chain: validate first, and every head re-checked after each module."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from proxytap.config import Config
from proxytap.errors import ProtocolError
from proxytap.modules.builtin import Rewrite, Validate
from proxytap.modules.chain import Chain
from proxytap.policy.headers import HeaderRules
from proxytap.policy.message import RequestHead

H = list[tuple[bytes, bytes]]
URL = b"http://example.com/p?q=1"


def request(headers: H, method: bytes = b"GET") -> RequestHead:
    head = RequestHead(method, URL, b"HTTP/1.1", headers, "192.0.2.7")
    HeaderRules().validate_request(head)
    return head


def test_chain_rechecks_what_modules_did() -> None:
    class Mod:
        name = "mod"

        def __init__(self, action: Any) -> None:
            self.action = action

        def request(self, ctx: Any, req: RequestHead) -> None:
            self.action(req)

    rules = HeaderRules()
    errors: Counter[str] = Counter()
    for action in (
        lambda r: r.add("Content-Length", "1"),
        lambda r: r.add("X", "a\nb"),
        lambda r: r.add("Keep-Alive", "1"),
        lambda r: setattr(r, "path", b"no-slash"),
    ):
        chain = Chain("l", [Validate(), Mod(action)], [Validate()], rules, errors)
        head = request([])
        with pytest.raises(ProtocolError) as info:
            chain.request(None, head)
        assert info.value.status == 500
    assert errors == Counter({"mod": 4})
    chain = Chain("l", [Validate(), Mod(lambda r: r.add("X", "ok"))], [Validate()], rules, errors)
    head = request([(b"Content-Length", b"4")], method=b"POST")
    chain.request(None, head)
    assert head.headers[-1] == (b"X", b"ok")


def test_validate_must_come_first() -> None:
    rules = HeaderRules()
    with pytest.raises(ValueError, match="validate"):
        Chain("l", [Rewrite(rules)], [Validate()], rules, Counter())
    assert Config().validate().listeners[0].chain("client_to_server") == ("validate", "rewrite")
