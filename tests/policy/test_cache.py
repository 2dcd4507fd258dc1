"""proxytap.policy.cache: the memos behind ``prepare_request`` / ``prepare_response``.

A hit is what a fresh judgement of the same head gives; a new target with known
fields has its target judged again; refusals are never remembered; both memos
stay bounded.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.errors import ProtocolError
from proxytap.modules.builtin import Rewrite
from proxytap.policy.cache import CACHE_HEAD, CACHE_MAX, RequestMemo, ResponseMemo
from proxytap.policy.headers import HeaderRules
from proxytap.policy.message import RequestHead, ResponseHead, split_head

H = list[tuple[bytes, bytes]]
URL = b"http://example.com/p?q=1"
FUZZ = settings(max_examples=500, deadline=None)
NAMES = st.one_of(
    st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Connection", b"Host"]),
    st.binary(min_size=1, max_size=8),
)
VALUES = st.one_of(
    st.sampled_from([b"0", b"5", b"1, 1", b"chunked", b"gzip", b"close", b"a\r\n b"]),
    st.binary(max_size=12),
)


def test_prepare_request_memo() -> None:
    rules = HeaderRules(forwarded_for="on")
    args: tuple[Any, ...] = (b"GET", URL, b"HTTP/1.1", [(b"Accept", b"*/*")])
    one = rules.prepare_request(*args, "192.0.2.1", True)
    assert rules.prepare_request(*args, "192.0.2.1", True) is one
    other = rules.prepare_request(*args, "192.0.2.2", True)
    assert other is not one and other.get("X-Forwarded-For") == b"192.0.2.2"
    assert rules.prepare_request(*args, "192.0.2.1", True, cacheable=False) is not one


def test_prepare_request_new_targets_for_known_fields() -> None:
    """Fields seen before with another target: only the target is judged again."""
    rules = HeaderRules(max_request_line=60, max_head=120)
    fields: H = [(b"Host", b"example.com"), (b"Connection", b"close"), (b"A", b"1")]
    first = rules.prepare_request(b"GET", URL, b"HTTP/1.1", fields, None, True)
    second = rules.prepare_request(
        b"GET", b"http://example.com/other", b"HTTP/1.1", fields, None, True
    )
    assert second is not first and second.headers is first.headers
    assert (second.path, second.authority, second.close) == (b"/other", b"example.com", True)
    assert first.path == b"/p?q=1"
    assert second.serialized() == b"A: 1\r\nVia: 1.1 proxytap\r\n"
    for target, status in (
        (b"http://other.example/", 400),  # Host no longer matches
        (b"http://example.com/" + b"x" * 40, 414),
        (b"/origin-form", 400),
    ):
        with pytest.raises(ProtocolError) as info:
            rules.prepare_request(b"GET", target, b"HTTP/1.1", fields, None, True)
        assert info.value.status == status, target
    big: H = [(b"Host", b"example.com"), (b"A", b"x" * 60)]
    rules.prepare_request(b"GET", b"http://example.com/", b"HTTP/1.1", big, None, True)
    with pytest.raises(ProtocolError) as info:  # the same fields, a longer line: too large
        rules.prepare_request(
            b"GET", b"http://example.com/" + b"y" * 20, b"HTTP/1.1", big, None, True
        )
    assert info.value.status == 431


def test_fused_path_equals_validate_then_the_rewrite_hook() -> None:
    """The memoized path gives what validation followed by the ``rewrite`` module's hook
    gives (the hook runs when ``rewrite`` does not directly follow ``validate``)."""
    rules = HeaderRules(forwarded_for="on", via="p")
    headers: H = [(b"Host", b"example.com"), (b"Connection", b"x"), (b"X", b"1"), (b"x", b"2")]
    fused = rules.prepare_request(b"GET", URL, b"HTTP/1.1", headers, "192.0.2.9", True)
    head = RequestHead(b"GET", URL, b"HTTP/1.1", headers, "192.0.2.9")
    rules.validate_request(head)
    Rewrite(rules).request(None, head)
    assert head.headers == fused.headers
    assert (head.host, head.port, head.path) == (fused.host, fused.port, fused.path)
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    _, fused_resp, _ = rules.prepare_response(raw, 200, True)
    resp = ResponseHead(200, b"HTTP/1.1", split_head(raw)[1])
    rules.validate_response(resp)
    Rewrite(rules).response(None, resp)
    assert resp.headers == fused_resp.headers


def test_response_cache_is_shared_and_bounded() -> None:
    rules = HeaderRules()
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"
    assert rules.prepare_response(raw, 200, True) is rules.prepare_response(raw, 200, True)
    for i in range(300):
        rules.prepare_response(b"HTTP/1.1 200 OK\r\nX: %d\r\n\r\n" % i, 200, True)
    assert len(rules.response_memo) <= 256


def test_request_memo_is_bounded_and_starts_over() -> None:
    rules = HeaderRules()
    for i in range(CACHE_MAX + 10):
        rules.prepare_request(b"GET", b"http://example.com/%d" % i, b"HTTP/1.1", [], None, True)
        assert len(rules.request_memo) <= CACHE_MAX
    assert len(rules.request_memo) == 10  # full at CACHE_MAX: cleared, then refilled


def test_refusals_are_not_remembered() -> None:
    """A refused head raises every time; it leaves nothing a later hit could return."""
    rules = HeaderRules()
    bad: H = [(b"Content-Length", b"1"), (b"Content-Length", b"1")]
    for _ in range(2):
        with pytest.raises(ProtocolError, match="more than one Content-Length"):
            rules.prepare_request(b"POST", URL, b"HTTP/1.1", bad, None, True)
    assert len(rules.request_memo) == 0
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"
    for _ in range(2):
        with pytest.raises(ProtocolError, match="invalid Content-Length"):
            rules.prepare_response(raw, 200, True)
    assert len(rules.response_memo) == 0


def test_large_response_heads_are_judged_but_not_kept() -> None:
    rules = HeaderRules()
    raw = b"HTTP/1.1 200 OK\r\nX: " + b"a" * CACHE_HEAD + b"\r\n\r\n"
    first = rules.prepare_response(raw, 200, True)
    assert first[2] == b"X: " + b"a" * CACHE_HEAD + b"\r\nVia: 1.1 proxytap\r\n"
    assert rules.prepare_response(raw, 200, True) is not first
    assert len(rules.response_memo) == 0


def test_memos_serve_the_rules_they_are_given() -> None:
    """The memos hold no rules: the same memo objects work for any ``HeaderRules``."""
    requests, responses = RequestMemo(size=2), ResponseMemo(size=2)
    rules = HeaderRules(via="m1")
    head = requests.prepare(rules, b"GET", URL, b"HTTP/1.1", [], None, True)
    assert head.headers == [(b"Via", b"1.1 m1")] and len(requests) == 1
    line, resp, block = responses.prepare(rules, b"HTTP/1.0 204 No\r\n\r\n", 204, False)
    assert (line, resp.http10, block) == (b"HTTP/1.1 204 No", True, b"")
    for i in range(3):
        requests.prepare(rules, b"GET", URL + b"%d" % i, b"HTTP/1.1", [], None, True)
    assert len(requests) == 2  # its own bound


@FUZZ
@given(fields=st.lists(st.tuples(NAMES, VALUES), max_size=6), rewrite=st.booleans())
def test_fuzz_memo_agrees_with_a_fresh_judgement(fields: H, rewrite: bool) -> None:
    """Whatever the fields: the memoized path refuses what validation refuses, with the
    same status and reason, and otherwise returns the same head, on a miss and on a hit."""
    rules = HeaderRules(forwarded_for="on")
    fresh = RequestHead(b"POST", URL, b"HTTP/1.1", fields, "192.0.2.1")
    try:
        rules.validate_request(fresh)
        if rewrite:
            rules.rewrite_request(fresh)
    except ProtocolError as exc:
        for _ in range(2):
            with pytest.raises(ProtocolError) as info:
                rules.prepare_request(b"POST", URL, b"HTTP/1.1", fields, "192.0.2.1", rewrite)
            assert (info.value.status, info.value.reason) == (exc.status, exc.reason)
        return
    for _ in range(2):
        head = rules.prepare_request(b"POST", URL, b"HTTP/1.1", fields, "192.0.2.1", rewrite)
        assert head.headers == fresh.headers
        got = (head.host, head.port, head.path, head.length, head.chunked, head.close)
        assert got == (fresh.host, fresh.port, fresh.path, fresh.length, fresh.chunked, fresh.close)
