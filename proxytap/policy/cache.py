"""Memos of prepared heads: validate (and rewrite) once per head seen before.

An origin sends the same response heads again and again, and a client the
same request fields with a new URL each time; judging them once saves most
of the forwarder's per-request work. The memos hold no rules of their own:
every head that is not a hit goes through ``HeaderRules`` (the one place heads
are judged), and a hit returns what that judgement produced for the very same
input. Results are shared between hits: callers copy before changing them.

Each memo is bounded: when it reaches ``size`` entries it starts over (a
working set that does not fit is not worth an eviction order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from proxytap.policy.message import RequestHead, ResponseHead, serialize, split_head

if TYPE_CHECKING:
    from proxytap.policy.headers import HeaderRules

__all__ = ["CACHE_HEAD", "CACHE_MAX", "RequestMemo", "ResponseMemo"]

CACHE_MAX: Final = 256  # prepared heads kept per memo
CACHE_HEAD: Final = 4096  # response heads larger than this are not kept


class RequestMemo:
    """Prepared request heads, in two memos.

    Whole heads (a repeated request costs one dict lookup), and field lists
    with their verdict (a new URL with fields seen before only has its target
    judged: request line, target, ``Host`` against it, size).
    """

    __slots__ = ("_heads", "_shapes", "size")

    def __init__(self, size: int = CACHE_MAX) -> None:
        self.size = size
        self._heads: dict[tuple[Any, ...], RequestHead] = {}
        # fields -> (the judged head, its Host value, the size of its fields)
        self._shapes: dict[tuple[Any, ...], tuple[RequestHead, bytes | None, int]] = {}

    def __len__(self) -> int:
        return len(self._heads)

    def prepare(
        self,
        rules: HeaderRules,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        client: str | None,
        rewrite: bool,
    ) -> RequestHead:
        """``rules``' verdict on this head, validated (and rewritten); raises ``ProtocolError``."""
        fields = tuple(headers)
        key = (method, target, version, fields, client, rewrite)
        hit = self._heads.get(key)
        if hit is not None:
            return hit
        # the same fields with another target (a new URL): only the target is judged again
        shape = (method, version, fields, client, rewrite)
        template = self._shapes.get(shape)
        if template is None:
            head = RequestHead(method, target, version, headers, client)
            host, size = rules.check_request(head)
            if rewrite:
                rules.rewrite_request(head)
            if len(self._shapes) >= self.size:
                self._shapes.clear()
            self._shapes[shape] = (head, host, size)
        else:
            base, host, size = template
            rules.check_request_line(method, target, version, size)
            head = base.retarget(target)
        rules.route(head, host)
        if len(self._heads) >= self.size:
            self._heads.clear()
        self._heads[key] = head
        return head


class ResponseMemo:
    """Prepared response heads by their raw bytes (as llhttp accepted them)."""

    __slots__ = ("_heads", "size")

    def __init__(self, size: int = CACHE_MAX) -> None:
        self.size = size
        self._heads: dict[tuple[bytes, int, bool], tuple[bytes, ResponseHead, bytes]] = {}

    def __len__(self) -> int:
        return len(self._heads)

    def prepare(
        self, rules: HeaderRules, raw: bytes, status: int, rewrite: bool
    ) -> tuple[bytes, ResponseHead, bytes]:
        """``(status line, head, field block)``; an HTTP/1.0 status line comes back as
        HTTP/1.1 (we answer in HTTP/1.1). Raises ``ProtocolError``."""
        key = (raw, status, rewrite)
        hit = self._heads.get(key)
        if hit is not None:
            return hit
        line, fields = split_head(raw)
        version, _, rest = line.partition(b" ")
        reason = rest.partition(b" ")[2]
        head = ResponseHead(status, version, fields, reason)
        rules.validate_response(head)
        if rewrite:
            rules.rewrite_response(head)
        if head.http10:
            line = b"HTTP/1.1" + line[8:]
        result = (line, head, serialize(head.headers))
        if len(raw) <= CACHE_HEAD:
            if len(self._heads) >= self.size:
                self._heads.clear()
            self._heads[key] = result
        return result
