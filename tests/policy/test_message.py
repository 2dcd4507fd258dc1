"""proxytap.policy.message: heads as plain data, their helpers and the wire form of fields."""

from __future__ import annotations

from proxytap.policy.message import (
    RequestHead,
    ResponseHead,
    as_bytes,
    get_field,
    remove_fields,
    request_error,
    response_error,
    serialize,
    split_head,
)

H = list[tuple[bytes, bytes]]


def test_as_bytes_and_serialize() -> None:
    fields = as_bytes([("Name", "caf\u00e9"), (b"X", b"1"), ("Y", b"2")])
    assert fields == [(b"Name", b"caf\xe9"), (b"X", b"1"), (b"Y", b"2")]  # latin-1: every byte
    assert serialize(fields) == b"Name: caf\xe9\r\nX: 1\r\nY: 2\r\n"
    assert serialize([]) == b""


def test_split_head() -> None:
    line, fields = split_head(b"HTTP/1.1 200 OK\r\nA:  1 \r\nB:\r\nbroken\r\n\r\n")
    assert line == b"HTTP/1.1 200 OK"
    # leading OWS gone, trailing OWS kept (validation judges it); no colon: empty name
    assert fields == [(b"A", b"1 "), (b"B", b""), (b"broken", b"")]
    assert split_head(b"HTTP/1.1 204 No Content\r\n\r\n") == (b"HTTP/1.1 204 No Content", [])


def test_field_helpers_ignore_case_and_keep_order() -> None:
    fields: H = [(b"A", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert get_field(fields, "a") == b"1"
    assert get_field(fields, b"C") is None
    assert remove_fields(fields, "A") == [(b"b", b"2")]
    assert fields == [(b"A", b"1"), (b"b", b"2"), (b"a", b"3")]  # a new list


def test_request_head_from_str_and_bytes() -> None:
    head = RequestHead("GET", "http://a/", "HTTP/1.0", [("Host", "a")], "192.0.2.1")
    assert (head.method, head.target, head.version) == (b"GET", b"http://a/", b"HTTP/1.0")
    assert head.headers == [(b"Host", b"a")] and head.http10
    assert (head.host, head.port, head.length, head.credentials) == ("", 0, -1, None)
    fields: H = [(b"X", b"1")]
    head = RequestHead(b"GET", b"http://a/", b"HTTP/1.1", fields)
    assert head.headers == fields and head.headers is not fields  # the caller's list is left alone
    assert not head.http10


def test_request_head_helpers_for_modules() -> None:
    head = RequestHead(b"GET", b"http://a/", b"HTTP/1.1", [(b"X", b"1"), (b"x", b"2")])
    assert head.get("X") == b"1"
    assert head.get_all(b"x") == [b"1", b"2"]
    head.add("Y", "3")
    head.set("x", b"4")
    assert head.headers == [(b"Y", b"3"), (b"x", b"4")]
    head.remove("Y")
    assert head.headers == [(b"x", b"4")]


def test_request_head_copy_and_retarget() -> None:
    head = RequestHead(b"POST", b"http://a/1", b"HTTP/1.1", [(b"X", b"1")], "192.0.2.1")
    head.host, head.port, head.path, head.length, head.close = "a", 80, b"/1", 5, True
    assert head.serialized() == b"X: 1\r\n"
    copy = head.copy()
    copy.add("Y", "2")
    assert head.headers == [(b"X", b"1")]  # the copy's fields are its own
    assert copy.serialized() == b"X: 1\r\nY: 2\r\n"  # and its block is rebuilt
    assert (copy.host, copy.length, copy.close, copy.client) == ("a", 5, True, "192.0.2.1")
    other = head.retarget(b"http://b/2")
    assert other.target == b"http://b/2" and other.headers is head.headers  # shared
    assert (other.host, other.port, other.authority, other.path) == ("", 0, b"", b"")
    assert (other.length, other.close, other.client) == (5, True, "192.0.2.1")
    assert other.serialized() is head.serialized()


def test_response_head() -> None:
    head = ResponseHead(200, "HTTP/1.0", [("X", "1")], "OK")
    assert (head.status, head.version, head.reason, head.http10) == (200, b"HTTP/1.0", b"OK", True)
    copy = head.copy()
    copy.set("X", "2")
    assert head.get("x") == b"1" and copy.get("x") == b"2"
    assert copy.get_all("X") == [b"2"]


def test_errors() -> None:
    bad = request_error("nope")
    assert (bad.status, bad.proxy_status, bad.reason) == (400, "http_request_error", "nope")
    assert request_error("big", 431).status == 431
    upstream = response_error("broken")
    assert (upstream.status, upstream.proxy_status) == (502, "http_protocol_error")
