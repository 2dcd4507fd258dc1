"""The export rendering of decrypted exchanges (pure): any interleaving pairs correctly.

HTTP/2 streams start, send body chunks and end in any order; what
``ExchangeOrder`` writes must parse, with h11 (strict), into the same
requests and responses, the n-th response answering the n-th request.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.flows.table import DOWN, UP
from proxytap.intercept.render import (
    TRUNCATED,
    WAIT_CAP,
    Exchange,
    ExchangeOrder,
    request_line,
    status_line,
    with_host,
)
from tests.intercept.interception import header, http_pairs


class Sink:
    def __init__(self) -> None:
        self.up = bytearray()
        self.down = bytearray()

    def __call__(self, direction: int, data: bytes) -> None:
        assert data
        (self.up if direction == UP else self.down).extend(data)


def test_lines_and_host() -> None:
    assert request_line(b"GET", b"/a", b"HTTP/2.0") == b"GET /a HTTP/1.1\r\n"
    assert request_line(b"GET", b"/a", b"HTTP/1.0") == b"GET /a HTTP/1.0\r\n"
    assert status_line(404, b"", b"HTTP/2.0") == b"HTTP/1.1 404 Not Found\r\n"
    assert status_line(200, b"Fine", b"HTTP/1.1") == b"HTTP/1.1 200 Fine\r\n"
    assert with_host([(b"a", b"1")], b"h:1") == [(b"Host", b"h:1"), (b"a", b"1")]
    assert with_host([(b"host", b"x")], b"h:1") == [(b"host", b"x")]


def test_http1_content_length_and_chunked_bodies_keep_their_framing() -> None:
    sink = Sink()
    order = ExchangeOrder(sink)
    ex = order.start(keep_length=True)
    ex.request_head(b"POST /u HTTP/1.1\r\n", [(b"Host", b"h"), (b"Content-Length", b"5")])
    ex.body(UP, b"hel")
    ex.body(UP, b"lo")
    ex.message_end(UP)
    ex.response_head(b"HTTP/1.1 200 OK\r\n", [(b"Transfer-Encoding", b"chunked")], False)
    ex.body(DOWN, b"abc")
    ex.message_end(DOWN)
    ex.end()
    assert bytes(sink.up) == b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    assert bytes(sink.down) == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )


def test_bodyless_and_empty_responses() -> None:
    sink = Sink()
    order = ExchangeOrder(sink)
    for status, bodyless in ((204, True), (200, False)):
        ex = order.start(keep_length=False)
        ex.request_head(b"GET / HTTP/1.1\r\n", [(b"Host", b"h")])
        ex.message_end(UP)
        ex.response_head(status_line(status, b"", b"HTTP/2.0"), [], bodyless)
        ex.message_end(DOWN)
        ex.end()
    pairs = http_pairs(bytes(sink.up), bytes(sink.down))
    assert [p[1].head.status_code for p in pairs] == [204, 200]
    assert b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" in sink.down


def test_a_waiting_exchange_past_the_cap_is_truncated_and_marked() -> None:
    sink = Sink()
    order = ExchangeOrder(sink)
    first = order.start(keep_length=False)
    second = order.start(keep_length=False)
    for ex, path in ((first, b"/1"), (second, b"/2")):
        ex.request_head(b"GET " + path + b" HTTP/1.1\r\n", [(b"Host", b"h")])
        ex.message_end(UP)
        ex.response_head(b"HTTP/1.1 200 OK\r\n", [(b"Content-Length", b"99999999")], False)
    big = b"x" * (WAIT_CAP // 4)
    for _ in range(6):
        second.body(DOWN, big)  # waits behind ``first``: kept up to the cap
    second.message_end(DOWN)
    second.end()
    first.body(DOWN, b"first")
    first.message_end(DOWN)
    first.end()
    ((_, s1), (_, s2)) = http_pairs(bytes(sink.up), bytes(sink.down))
    assert s1.body == b"first" and header(s1, TRUNCATED[0].decode()) is None
    assert len(s2.body) == WAIT_CAP and header(s2, TRUNCATED[0].decode()) == "1"


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_any_interleaving_of_streams_pairs_in_order(n: int, seed: int) -> None:
    rnd = random.Random(seed)
    sink = Sink()
    order = ExchangeOrder(sink)
    # each stream: start, request head, body chunks, request end, response head, body, end
    plans = []
    for i in range(n):
        req_body = [bytes([65 + i]) * rnd.randint(1, 50) for _ in range(rnd.randint(0, 3))]
        resp_body = [f"r{i}-{k};".encode() for k in range(rnd.randint(0, 4))]
        steps = [("start", None)]
        steps.append(("req", None))
        steps += [("up", c) for c in req_body]
        steps.append(("up_end", None))
        steps.append(("resp", None))
        steps += [("down", c) for c in resp_body]
        steps.append(("end", None))
        plans.append([i, steps, req_body, resp_body])
    exchanges: dict[int, Exchange] = {}
    started: list[int] = []
    live = list(plans)
    # a stream may only start once every earlier one has started (start order = request order)
    while live:
        candidates = [p for p in live if p[1][0][0] != "start" or p[0] == len(started)]
        plan = rnd.choice(candidates)
        i, steps = plan[0], plan[1]
        kind, chunk = steps.pop(0)
        if kind == "start":
            exchanges[i] = order.start(keep_length=False)
            started.append(i)
            continue
        ex = exchanges[i]
        if kind == "req":
            ex.request_head(
                request_line(b"POST", f"/s{i}".encode(), b"HTTP/2.0"),
                with_host([], b"h"),
            )
        elif kind == "up":
            ex.body(UP, chunk)
        elif kind == "up_end":
            ex.message_end(UP)
        elif kind == "resp":
            ex.response_head(status_line(200, b"", b"HTTP/2.0"), [], False)
        elif kind == "down":
            ex.body(DOWN, chunk)
        else:
            ex.message_end(DOWN)
            ex.end()
        if not steps:
            live.remove(plan)
    pairs = http_pairs(bytes(sink.up), bytes(sink.down))
    assert len(pairs) == n
    for req, resp in pairs:
        i = int(req.head.target.decode()[2:])  # type: ignore[union-attr]
        assert req.body == b"".join(plans[i][2])
        assert resp.body == b"".join(plans[i][3])
