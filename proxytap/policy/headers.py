"""HTTP/1 header rules: the one place request and response heads are judged and rewritten.

Pure functions over plain data: heads are ``proxytap.policy.message``'s
``RequestHead`` / ``ResponseHead``; where a request goes is worked out by
``proxytap.policy.target``; heads judged before are remembered by
``proxytap.policy.cache`` (``prepare_request`` / ``prepare_response``). No
sockets, no parser types: the plain-HTTP forwarder calls this with what llhttp
parsed, the CONNECT handshake with what ``proxytap.proto.httpconnect`` parsed,
and the interception path will call it with what mitmproxy parsed. Two steps,
the two built-in modules of ``proxytap.modules``:

``validate`` (always first, never optional)
    Checks a head and puts it in the shape a correct intermediary forwards:
    hop-by-hop fields removed (``proxytap.policy.hopbyhop``), ``Host`` moved
    into ``authority``, ``Content-Length`` in canonical form, the framing
    (``length`` / ``chunked`` / ``codings``) worked out once. Raises
    ``ProtocolError`` with the status to answer, ``Proxy-Status`` type and a
    plain-text reason.
``rewrite`` (operator policy)
    ``Forwarded`` / ``X-Forwarded-For`` (``forwarded_for``), the user header
    rules of each direction, then ``Via``.

Decisions (requests: the status the client gets)
    * Request line over ``max_request_line``: 414. Head over ``max_head`` or more
      than ``max_headers`` fields: 431.
    * Method not in ``methods``: 501 (``http_request_denied``). 405 would claim
      the *target resource* does not allow the method and needs an ``Allow``
      field the proxy cannot know; 501 says the proxy does not do it.
    * Version other than HTTP/1.0 and HTTP/1.1 (llhttp passes ``HTTP/2.0``): 505.
    * Field name not a token: 400. CR, LF, NUL or any other control character
      but HTAB in a value: 400 (RFC 9110 section 5.5 lets a recipient keep
      other CTLs; we do not, so no parser's leniency can pass one on). obs-fold
      (a value that carries a folded line): 400, named as such.
    * ``Content-Length``: exactly one field, ``1*DIGIT`` (at most 18 digits).
      Several fields, even equal ones, and list forms (``1, 1``) are 400:
      RFC 9110 section 8.6 allows replacing an all-equal list by one value,
      but llhttp rejects them, and a proxy that accepts what the next parser
      may read differently is a smuggling vector (RFC 9112 section 6.3 item 5:
      an invalid Content-Length is an unrecoverable framing error, 400).
      Leading zeros are valid (``007``) and forwarded canonical (``7``).
    * ``Transfer-Encoding``: all fields together form one list. An empty
      element, a repeated coding, one with parameters or any HTAB in the value
      (llhttp reads ``chunked<HTAB>`` as not chunked: a framing differential,
      so refused rather than interpreted): 400; a coding not in
      chunked, gzip, deflate, compress (and x-gzip, x-compress): 501 (RFC 9112
      section 6.1: a coding the server does not understand); chunked not last,
      or missing: 400 (RFC 9112 section 6.3 item 4); with ``Content-Length``:
      400 (never "TE wins": both is a smuggling attempt or a broken client);
      in an HTTP/1.0 request: 400.
    * ``Connection`` naming ``Content-Length`` or ``Host`` does not remove them
      (``hopbyhop.PROTECTED``): the framing we check is the framing we send.
    * ``Host``: more than one field: 400. With an absolute-form target
      (``http://a:8080/``) a ``Host`` that names another host or port: 400
      (not "the URI wins" as RFC 9112 section 3.2.2 allows: a mismatch is what
      cache-poisoning and routing tricks look like, and no honest client sends
      one). Host names compare case-insensitively, without a trailing dot, an
      absent port being 80. No ``Host`` at all is accepted: it is rebuilt
      from the URI.
    * ``Max-Forwards`` (RFC 9110 section 7.6.2), OPTIONS and TRACE only (other
      methods pass it on untouched, as the RFC says): one field, ``1*DIGIT``,
      else 400 (a value we cannot decrement is not guessed at); ``N > 0`` is
      forwarded as ``N - 1``; ``0`` sets ``max_forwards`` to 0 and the
      forwarder answers itself. The method check comes first: a refused TRACE
      is refused (501) whatever its ``Max-Forwards``.
    * CONNECT (authority-form): ``Transfer-Encoding`` or a non-zero
      ``Content-Length``: 400 (a CONNECT request has no content; what follows
      its head is tunnel data). ``Host`` is not compared with the authority.
    * Targets (``proxytap.policy.target``): origin-form and asterisk-form: 400
      (a forward proxy, not a reverse proxy); ``https://`` and other schemes:
      501; userinfo, a bad host or port: 400.

Decisions (responses from the origin: the client gets 502)
    Version, field syntax, field count, ``Content-Length`` and
    ``Transfer-Encoding`` as for requests, but any violation is a 502
    (``http_protocol_error``; too many fields ``http_response_header_section_size``).
    A response without chunked as its last coding is delimited by the close of
    the connection (RFC 9112 section 6.3 item 4), so ``gzip`` alone is valid;
    chunked anywhere but last is not.

Rewriting
    * ``forwarded_for`` (Squid's semantics, applied to ``X-Forwarded-For`` and
      RFC 7239 ``Forwarded`` alike): ``on`` appends the client address,
      ``off`` appends ``unknown``, ``truncate`` replaces both with the client
      address only, ``delete`` removes both. Default ``delete``: a forward
      proxy in front of users does not hand their internal addresses to every
      origin (RFC 7239 section 8), nor pass on chains a client made up.
    * User rules, in order: ``remove`` (every field of that name), ``add``
      (append one), ``set`` (remove, then append). Framing, routing and
      hop-by-hop names (Content-Length, Transfer-Encoding, Host, Connection...)
      cannot be named: changing them is what smuggling is made of.
    * ``Via: 1.1 <pseudonym>`` (``1.0`` when the message came as HTTP/1.0)
      appended last; pseudonym ``""`` sends none.
    * ``recheck_request`` / ``recheck_response`` judge a head after other
      modules changed it: syntax again, no hop-by-hop or ``Host`` field, the
      ``Content-Length`` unchanged. A module that breaks them is a module
      error (fail closed), never forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxytap.errors import ConfigError
from proxytap.policy.cache import RequestMemo, ResponseMemo
from proxytap.policy.hopbyhop import (
    HOP_BY_HOP,
    connection_tokens,
    is_websocket_upgrade,
    strip_hop_by_hop,
)
from proxytap.policy.message import (
    RESPONSE_TOO_BIG,
    Fields,
    RequestHead,
    ResponseHead,
    remove_fields,
    request_error,
    response_error,
)
from proxytap.policy.target import parse_host, parse_target
from proxytap.proto.httpconnect import parse_authority

__all__ = [
    "CODINGS",
    "DEFAULT_METHODS",
    "FORWARDED_FOR",
    "HeaderRule",
    "HeaderRules",
    "HttpConfig",
]
DEFAULT_METHODS: Final = (
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
)
FORWARDED_FOR: Final = ("on", "off", "truncate", "delete")
RULE_ACTIONS: Final = ("remove", "add", "set")
CODINGS: Final = frozenset((b"chunked", b"gzip", b"deflate", b"compress", b"x-gzip", b"x-compress"))

_TCHARS: Final = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN: Final = re.compile(rb"[" + _TCHARS + rb"]+")
_NAMES: Final = re.compile(rb"[" + _TCHARS + rb"]+(?::[" + _TCHARS + rb"]+)*")  # joined by ":"
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_FOLD: Final = re.compile(rb"\r?\n[ \t]")
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")
_OWS_EDGE: Final = re.compile(rb"[ \t]\t|\t[ \t]|^[ \t]|[ \t]$")
_PATH: Final = re.compile(rb"(?:/[\x21-\x7e]*|\*)")
_VERSIONS: Final = {b"HTTP/1.1": False, b"HTTP/1.0": True}  # -> is HTTP/1.0
_HTTP_VERSION: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")
_OWS: Final = b" \t"

# names that cannot be named by user rules nor appear after other modules ran
_RESERVED: Final = frozenset(n.encode() for n in HOP_BY_HOP) | {
    b"content-length",
    b"host",
}
# names validate looks at (lower case)
_CL: Final = b"content-length"
_TE: Final = b"transfer-encoding"
_HOST: Final = b"host"
_PROXY_AUTH: Final = b"proxy-authorization"
_EXPECT: Final = b"expect"
_MAX_FORWARDS: Final = b"max-forwards"
_MAX_FORWARDS_METHODS: Final = frozenset((b"OPTIONS", b"TRACE"))  # RFC 9110 section 7.6.2
_XFF: Final = b"x-forwarded-for"
_FORWARDED: Final = b"forwarded"
_SPECIAL: Final = frozenset((_CL, _TE, _HOST, _PROXY_AUTH, _EXPECT)) | {
    n.encode() for n in HOP_BY_HOP
}
# Framing and hop-by-hop names with a "-": a field that differs from one only by
# "_" for "-" (``Transfer_Encoding``) is refused, never forwarded: servers and
# CGI-style gateways that map "-" to "_" (HTTP_TRANSFER_ENCODING) would read it
# as the real one, and then two hops disagree on framing (request smuggling).
_LOOKALIKES: Final = {n.replace(b"-", b"_"): n for n in _RESERVED if b"-" in n}


# -- configuration --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """One user rule: ``remove`` / ``add`` / ``set`` a field."""

    action: str
    name: bytes
    value: bytes = b""

    @classmethod
    def from_config(cls, table: Mapping[str, Any], key: str) -> HeaderRule:
        unknown = set(table) - {"action", "name", "value"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
        action = table.get("action")
        if action not in RULE_ACTIONS:
            raise ConfigError(f"{key}.action", "must be remove, add or set")
        name = table.get("name")
        if not isinstance(name, str) or _TOKEN.fullmatch(name.encode("latin-1", "replace")) is None:
            raise ConfigError(f"{key}.name", "must be a header field name (a token)")
        if name.lower().encode() in _RESERVED:
            raise ConfigError(
                f"{key}.name",
                f"{name} frames or routes the message (or is hop-by-hop): rules cannot change it",
            )
        value = table.get("value")
        if action == "remove":
            if value is not None:
                raise ConfigError(f"{key}.value", "remove takes no value")
            value = ""
        elif not isinstance(value, str):
            raise ConfigError(f"{key}.value", f"{action} needs a string value")
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raise ConfigError(f"{key}.value", "must be latin-1 text") from None
        if _BAD_VALUE.search(raw) is not None or raw != raw.strip(_OWS):
            raise ConfigError(
                f"{key}.value", "no control characters and no leading or trailing space"
            )
        return cls(action, name.encode("latin-1"), raw)

    def apply(self, fields: Fields) -> Fields:
        if self.action != "add":
            fields = remove_fields(fields, self.name)
        if self.action != "remove":
            fields.append((self.name, self.value))
        return fields


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: the header rules of plain-HTTP forwarding (and of interception)."""

    # methods clients may use (CONNECT included); others are answered 501
    methods: tuple[str, ...] = DEFAULT_METHODS
    # Via pseudonym; None: proxy_name; "": send no Via
    via: str | None = None
    # X-Forwarded-For and Forwarded: "on" | "off" | "truncate" | "delete" (Squid's forwarded_for)
    forwarded_for: str = "delete"
    # [[http.request_rules]] / [[http.response_rules]]: action = remove|add|set, name, value
    request_rules: tuple[Mapping[str, Any], ...] = ()
    response_rules: tuple[Mapping[str, Any], ...] = ()

    def validate(self, key: str) -> None:
        for i, method in enumerate(self.methods):
            if _TOKEN.fullmatch(method.encode("latin-1", "replace")) is None:
                raise ConfigError(f"{key}.methods[{i}]", "must be a method name (a token)")
        if self.via is not None and self.via and _TOKEN.fullmatch(self.via.encode()) is None:
            raise ConfigError(f"{key}.via", 'must be a token (a pseudonym), or "" for no Via')
        if self.forwarded_for not in FORWARDED_FOR:
            raise ConfigError(f"{key}.forwarded_for", "must be on, off, truncate or delete")
        self.rules(key)

    def rules(self, key: str = "http") -> tuple[tuple[HeaderRule, ...], tuple[HeaderRule, ...]]:
        return (
            tuple(
                HeaderRule.from_config(t, f"{key}.request_rules[{i}]")
                for i, t in enumerate(self.request_rules)
            ),
            tuple(
                HeaderRule.from_config(t, f"{key}.response_rules[{i}]")
                for i, t in enumerate(self.response_rules)
            ),
        )


class HeaderRules:
    """The compiled header rules of one configuration."""

    def __init__(
        self,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        via: str = "proxytap",
        forwarded_for: str = "delete",
        request_rules: Sequence[HeaderRule] = (),
        response_rules: Sequence[HeaderRule] = (),
        max_head: int = 65536,
        max_request_line: int = 8192,
        max_headers: int = 100,
    ) -> None:
        self.methods = frozenset(m.encode("ascii") for m in methods)
        self.via = via.encode("ascii")
        self.forwarded_for = forwarded_for
        self.request_rules = tuple(request_rules)
        self.response_rules = tuple(response_rules)
        self.max_head = max_head
        self.max_request_line = max_request_line
        self.max_headers = max_headers
        # heads judged before (proxytap.policy.cache): prepare_request / prepare_response
        self.request_memo = RequestMemo()
        self.response_memo = ResponseMemo()

    @classmethod
    def from_config(
        cls,
        http: HttpConfig,
        *,
        proxy_name: str = "proxytap",
        max_head: int = 65536,
        max_request_line: int = 8192,
        max_headers: int = 100,
    ) -> HeaderRules:
        request_rules, response_rules = http.rules()
        return cls(
            methods=http.methods,
            via=proxy_name if http.via is None else http.via,
            forwarded_for=http.forwarded_for,
            request_rules=request_rules,
            response_rules=response_rules,
            max_head=max_head,
            max_request_line=max_request_line,
            max_headers=max_headers,
        )

    # -- shared checks ------------------------------------------------------------

    def _fields(self, fields: Fields, request: bool) -> tuple[Fields, int]:
        """Field syntax and count: the fields with OWS stripped from values, and their size
        as ``name: value CRLF`` lines (before stripping)."""
        if len(fields) > self.max_headers:
            if request:
                raise request_error("too many header fields", 431)
            raise response_error("too many header fields in the response", RESPONSE_TOO_BIG)
        if not fields:
            return fields, 0
        names = b":".join([n for n, _ in fields])  # one match for all: ":" is no tchar
        if _NAMES.fullmatch(names) is None or names.count(b":") != len(fields) - 1:
            bad = next(n for n, _ in fields if _TOKEN.fullmatch(n) is None)
            why = "obsolete line folding" if bad[:1] in (b" ", b"\t") else "invalid header name"
            if request:
                raise request_error(why)
            raise response_error(f"{why} in the response")
        if b"_" in names:  # rare: one search of all names keeps the common case cheap
            for name, _ in fields:
                real = _LOOKALIKES.get(name.lower())
                if real is not None:
                    why = f"header name {name.decode()} looks like {real.decode()} ('_' for '-')"
                    if request:
                        raise request_error(why)
                    raise response_error(f"{why} in the response")
        values = b"\t".join([v for _, v in fields])
        if _BAD_VALUE.search(values) is not None:
            why = (
                "obsolete line folding"
                if _FOLD.search(values) is not None
                else "invalid character in header value"
            )
            if request:
                raise request_error(why)
            raise response_error(f"{why} in the response")
        size = len(names) + len(values) + 2 * len(fields) + 2  # + ": " and CRLF, - separators
        if _OWS_EDGE.search(values) is not None:
            stripped = []
            for name, value in fields:
                if b"\t" in value and name.lower() == _TE:
                    # llhttp does not read "chunked<HTAB>" as chunked: no guessing here
                    if request:
                        raise request_error("HTAB in Transfer-Encoding")
                    raise response_error("HTAB in Transfer-Encoding in the response")
                stripped.append((name, value.strip(_OWS)))
            return stripped, size
        return fields, size

    @staticmethod
    def _framing(
        cls_values: list[bytes], te_values: list[bytes], error: Any, request: bool
    ) -> tuple[int, bytes, bool]:
        """``(length, codings, chunked)`` from the Content-Length / Transfer-Encoding values."""
        length = -1
        if cls_values:
            if len(cls_values) > 1:
                raise error("more than one Content-Length field")
            if _DIGITS.fullmatch(cls_values[0]) is None:
                raise error("invalid Content-Length")
            length = int(cls_values[0])
        if not te_values:
            return length, b"", False
        if cls_values:
            raise error("Content-Length together with Transfer-Encoding")
        joined = b",".join(te_values)
        if b"\t" in joined:
            raise error("HTAB in Transfer-Encoding")
        codings = []
        for element in joined.split(b","):
            coding = element.strip(_OWS).lower()
            if not coding:
                raise error("empty element in Transfer-Encoding")
            if coding in codings:
                raise error("repeated transfer coding")
            if coding not in CODINGS:
                if _TOKEN.fullmatch(coding) is None:
                    raise error("invalid transfer coding")
                if request:
                    raise request_error(f"unknown transfer coding {coding.decode()!r}", 501)
                raise error("unknown transfer coding")
            codings.append(coding)
        if b"chunked" in codings[:-1]:
            raise error("chunked is not the last transfer coding")
        chunked = codings[-1] == b"chunked"
        if request and not chunked:
            raise error("the last transfer coding of a request must be chunked")
        return length, b", ".join(codings), chunked

    # -- requests -------------------------------------------------------------------

    def validate_request(self, head: RequestHead) -> None:
        """Check ``head`` and put it in forwarding shape (see the module docstring)."""
        host, _ = self.check_request(head)
        self.route(head, host)

    def check_request(self, head: RequestHead) -> tuple[bytes | None, int]:
        """``validate_request`` but for the route: everything that does not depend on the
        target's host and port. Returns the ``Host`` value for ``route`` and the size of
        the fields (``check_request_line`` judges another target with the same fields).
        """
        http10, line = self._request_line(head.method, head.target, head.version)
        fields, size = self._fields(head.headers, True)
        self._head_size(line, size)
        return self._request_fields(head, fields, http10), size

    def check_request_line(self, method: bytes, target: bytes, version: bytes, size: int) -> None:
        """The request line of a head whose fields (``size`` bytes) passed ``check_request``."""
        _, line = self._request_line(method, target, version)
        self._head_size(line, size)

    def _head_size(self, line: int, size: int) -> None:
        if line + 4 + size > self.max_head:  # + CRLF after the line and the blank line
            raise request_error("request head too large", 431)

    def _request_line(self, method: bytes, target: bytes, version: bytes) -> tuple[bool, int]:
        """``(is HTTP/1.0, request line length)``; raises on the line's own errors."""
        line = len(method) + len(target) + len(version) + 2
        if line > self.max_request_line:
            raise request_error("request line too long", 414)
        if _TOKEN.fullmatch(method) is None:
            raise request_error("invalid method")
        http10 = _VERSIONS.get(version)
        if http10 is None:
            if _HTTP_VERSION.fullmatch(version) is None:
                raise request_error("invalid HTTP version")
            raise request_error("HTTP version not supported", 505)
        if method not in self.methods:
            raise request_error(
                f"method {method.decode('latin-1')} is not allowed", 501, "http_request_denied"
            )
        return http10, line

    def _request_fields(self, head: RequestHead, fields: Fields, http10: bool) -> bytes | None:
        """Framing, Host count, hop-by-hop: everything that depends on the fields only.

        Sets ``head``'s framing, ``close``, ``websocket``, ``credentials`` and
        ``headers``; returns the ``Host`` value (or ``None``) for ``route``.
        """
        cls_values: list[bytes] = []
        te_values: list[bytes] = []
        hosts: list[bytes] = []
        drop: list[int] = []  # Host (rebuilt from the URI), Expect in HTTP/1.0
        hop = False
        for i, (name, value) in enumerate(fields):
            lname = name.lower()
            if lname in _SPECIAL:
                if lname == _CL:
                    cls_values.append(value)
                elif lname == _HOST:
                    hosts.append(value)
                    drop.append(i)
                elif lname == _EXPECT:
                    if http10:
                        drop.append(i)
                else:  # hop-by-hop
                    hop = True
                    if lname == _TE:
                        te_values.append(value)
                    elif lname == _PROXY_AUTH and head.credentials is None:
                        head.credentials = value
        length, codings, chunked = self._framing(cls_values, te_values, request_error, True)
        if codings and http10:
            raise request_error("Transfer-Encoding in an HTTP/1.0 request")
        if len(hosts) > 1:
            raise request_error("more than one Host header field")
        if head.method == b"CONNECT" and (codings or length > 0):
            raise request_error("a CONNECT request has no content")
        head.length = length
        head.codings = codings
        head.chunked = chunked
        if drop:
            if fields is head.headers:
                fields = list(fields)
            for i in reversed(drop):
                del fields[i]
        if hop:
            tokens = connection_tokens(fields)
            head.close = b"close" in tokens
            head.websocket = b"upgrade" in tokens and is_websocket_upgrade(fields)
            fields = strip_hop_by_hop(fields, keep_upgrade=head.websocket)
        if cls_values and cls_values[0] != b"%d" % length:
            fields = [(n, b"%d" % length if n.lower() == _CL else v) for n, v in fields]
        if head.method in _MAX_FORWARDS_METHODS:
            fields = _max_forwards(head, fields)
        head.headers = fields
        return hosts[0] if hosts else None

    def route(self, head: RequestHead, host: bytes | None) -> None:
        """Where the request goes: the target checked, and ``Host`` against it."""
        if head.method == b"CONNECT":
            name, port = _authority(head.target)
            head.host, head.port, head.authority, head.path = name, port, head.target, b""
            return
        to = parse_target(head.target, head.method)
        if host is not None:
            given = parse_host(host)
            if given is None:
                raise request_error("invalid Host header field")
            if given[0] != to.host or (given[1] or 80) != to.port:
                raise request_error("the Host header field does not match the request target")
        head.host, head.port, head.authority, head.path = to.host, to.port, to.authority, to.path

    def rewrite_request(self, head: RequestHead) -> None:
        """Forwarded / X-Forwarded-For, the request rules, then Via."""
        fields = head.headers
        mode = self.forwarded_for
        xff: list[bytes] = []
        fwd: list[bytes] = []
        if any(n.lower() in (_XFF, _FORWARDED) for n, _ in fields):
            keep = []
            for n, v in fields:
                lname = n.lower()
                if lname == _XFF:
                    xff.append(v)
                elif lname == _FORWARDED:
                    fwd.append(v)
                else:
                    keep.append((n, v))
            fields = keep
        if mode != "delete":
            node = "unknown" if mode == "off" or not head.client else head.client
            node_b = node.encode("ascii")
            if mode == "truncate":
                xff, fwd = [], []
            fields.append((b"X-Forwarded-For", b", ".join([*xff, node_b])))
            fields.append((b"Forwarded", b", ".join([*fwd, b"for=" + _forwarded_node(node)])))
        for rule in self.request_rules:
            fields = rule.apply(fields)
        if self.via:
            fields.append((b"Via", (b"1.0 " if head.http10 else b"1.1 ") + self.via))
        head.headers = fields

    def recheck_request(self, head: RequestHead, length: int) -> None:
        """After other modules: valid fields and path, no framing or hop-by-hop change.

        Raises ``ValueError`` naming what a module broke.
        """
        _recheck(head.headers, length, self.max_headers)
        if head.method != b"CONNECT" and _PATH.fullmatch(head.path) is None:
            raise ValueError(f"invalid request path {head.path[:80]!r}")

    def prepare_request(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        client: str | None,
        rewrite: bool,
        cacheable: bool = True,
    ) -> RequestHead:
        """validate (and rewrite) in one call, memoized for heads seen before.

        The result is shared: callers copy it (``RequestHead.copy``) before changing it.
        ``cacheable=False`` (a large head) judges it without keeping it.
        """
        if cacheable:
            return self.request_memo.prepare(
                self, method, target, version, headers, client, rewrite
            )
        head = RequestHead(method, target, version, headers, client)
        self.validate_request(head)
        if rewrite:
            self.rewrite_request(head)
        return head

    # -- responses ----------------------------------------------------------------

    def validate_response(self, head: ResponseHead) -> None:
        http10 = _VERSIONS.get(head.version)
        if http10 is None:
            raise response_error("the response is not HTTP/1.0 or HTTP/1.1")
        if not 100 <= head.status <= 599:
            raise response_error("invalid response status")
        fields, _ = self._fields(head.headers, False)
        cls_values: list[bytes] = []
        te_values: list[bytes] = []
        special = False
        for name, value in fields:
            lname = name.lower()
            if lname in _SPECIAL:
                special = True
                if lname == _CL:
                    cls_values.append(value)
                elif lname == _TE:
                    te_values.append(value)
        length, codings, chunked = self._framing(cls_values, te_values, response_error, False)
        head.length = length
        head.codings = codings
        head.chunked = chunked
        if special:
            fields = strip_hop_by_hop(fields, keep_upgrade=head.status == 101)
            if cls_values and cls_values[0] != b"%d" % length:
                fields = [(n, b"%d" % length if n.lower() == _CL else v) for n, v in fields]
        head.headers = fields

    def rewrite_response(self, head: ResponseHead) -> None:
        """The response rules, then Via."""
        fields = head.headers
        for rule in self.response_rules:
            fields = rule.apply(fields)
        if self.via:
            fields.append((b"Via", (b"1.0 " if head.http10 else b"1.1 ") + self.via))
        head.headers = fields

    def recheck_response(self, head: ResponseHead, length: int) -> None:
        """After other modules: valid fields, no framing or hop-by-hop change (``ValueError``)."""
        _recheck(head.headers, length, self.max_headers)

    def prepare_response(
        self, raw: bytes, status: int, rewrite: bool
    ) -> tuple[bytes, ResponseHead, bytes]:
        """A raw response head (as llhttp accepted it) validated, rewritten, serialized.

        Returns ``(status line, head, field block)``; an HTTP/1.0 status line
        comes back as HTTP/1.1 (we answer in HTTP/1.1). Memoized: an origin sends
        the same heads again and again. The result is shared: copy before changing.
        """
        return self.response_memo.prepare(self, raw, status, rewrite)


def _max_forwards(head: RequestHead, fields: Fields) -> Fields:
    """OPTIONS / TRACE: ``head.max_forwards`` set, the field decremented (a new list)."""
    at = [i for i, (n, _) in enumerate(fields) if n.lower() == _MAX_FORWARDS]
    if not at:
        return fields
    if len(at) > 1:
        raise request_error("more than one Max-Forwards header field")
    name, value = fields[at[0]]
    if not value.isdigit():  # bytes: ASCII digits only, not empty
        raise request_error(
            f"invalid Max-Forwards value {value[:40].decode('latin-1')!r}: "
            "it must be a non-negative integer"
        )
    hops = int(value)
    head.max_forwards = hops
    if hops == 0:  # answered by the proxy: nothing is forwarded
        return fields
    fields = list(fields)
    fields[at[0]] = (name, b"%d" % (hops - 1))
    return fields


def _forwarded_node(node: str) -> bytes:
    """An RFC 7239 node: IPv6 quoted in brackets, the rest as it is."""
    if ":" in node:
        return b'"[' + node.encode("ascii") + b']"'
    return node.encode("ascii")


def _authority(target: bytes) -> tuple[str, int]:
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise request_error("invalid CONNECT target") from None
    return parse_authority(text)


def _recheck(fields: Fields, length: int, max_headers: int) -> None:
    if len(fields) > max_headers:
        raise ValueError("too many header fields")
    cls_values = []
    for name, value in fields:
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise ValueError(f"header fields must be bytes, got {(name, value)!r}"[:200])
        if _TOKEN.fullmatch(name) is None:
            raise ValueError(f"invalid header name {name[:80]!r}")
        if _BAD_VALUE.search(value) is not None:
            raise ValueError(f"invalid character in the value of {name[:80]!r}")
        lname = name.lower()
        if lname == _CL:
            cls_values.append(value)
        elif lname in _RESERVED:
            raise ValueError(f"{name.decode('latin-1')} cannot be set by a module")
    if cls_values != ([b"%d" % length] if length >= 0 else []):
        raise ValueError("Content-Length cannot be added, changed or removed by a module")
