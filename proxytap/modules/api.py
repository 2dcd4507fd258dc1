"""The module contract: what a module is, what its hooks get, how it refuses.

A module is any object with a ``name`` (str) and any of these hooks; a hook it
does not define costs nothing (a tunnel whose listener has no byte hook keeps
the plain relay). Hooks run on the event loop: they must not block.

``on_connect(ctx)``
    A client asked for ``ctx.host:ctx.port`` and passed authentication and
    access control; nothing was sent upstream yet. For a tunnel (CONNECT,
    SOCKS) once per tunnel; for plain HTTP once per request. Raise ``Refuse``
    to refuse: HTTP gets ``status`` (default 403), SOCKS5 ``socks_code``
    (default 0x02), SOCKS4 0x5B.
``request(ctx, req)``
    A plain-HTTP request head (``HttpRequest``), validated (and rewritten, if
    ``rewrite`` comes earlier in the chain). Change ``req.path`` (origin-form
    target: path and query) or ``req.headers`` (a list of ``(bytes, bytes)``;
    ``get`` / ``get_all`` / ``add`` / ``set`` / ``remove`` take ``str`` or
    ``bytes``), or raise ``Refuse``. The destination (``req.host``,
    ``req.port``, ``req.authority``) and the framing are read-only: after each
    module the head is checked again, and a module that adds a control
    character, an invalid name, a hop-by-hop, ``Host`` or framing field
    (``Content-Length``, ``Transfer-Encoding``) fails closed.
``response(ctx, resp)``
    A response head (``HttpResponse``: ``status``, ``reason``, ``version``,
    ``headers``) on its way to the client; change its headers (same checks)
    or raise ``Refuse`` to answer the client with that status instead.
``client_to_server(ctx, data) -> bytes`` / ``server_to_client(ctx, data) -> bytes``
    Raw bytes: a tunnel's payload (CONNECT, SOCKS, a WebSocket after its
    101), and plain-HTTP bodies (de-chunked; they are chunked again after
    the hook). Return what to send on (``b""``: nothing for now). A body
    with a ``Content-Length`` must keep its length chunk by chunk. Only
    called for modules in that direction's chain.
``on_close(ctx)``
    The tunnel or the HTTP exchange is over (answered, failed or cut off).
    Exceptions here are logged and counted, nothing else.

Fail closed: an exception other than ``Refuse`` (or ``ProtocolError``) in a
hook is logged with its traceback, counted in
``stats.module_errors[module name]`` (``proxytap_module_errors_total``) and
ends the exchange: HTTP 500 before the response head went out, else the
connection is closed; a tunnel is closed; a SOCKS request gets 0x01.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from proxytap.errors import ProtocolError
from proxytap.policy.message import RequestHead, ResponseHead

if TYPE_CHECKING:
    from proxytap.flows.table import Flow

HttpRequest = RequestHead
HttpResponse = ResponseHead

HOOKS: Final = (
    "on_connect",
    "request",
    "response",
    "client_to_server",
    "server_to_client",
    "on_close",
)


class Module(Protocol):
    """A module: a ``name``, plus any of the hooks in ``HOOKS`` (see this file's docstring)."""

    name: str


class Context:
    """One exchange a module sees: a tunnel, or one plain-HTTP request and its response.

    ``client`` is the client's (address, port) as the proxy saw it; ``host``
    and ``port`` what the client asked for; ``server`` the address actually
    connected to (``None`` until connected); ``protocol`` one of
    ``http-connect``, ``http-forward``, ``socks4``, ``socks4a``, ``socks5``;
    ``user`` the authenticated user (or ``None``); ``flow`` the inner flow
    once it exists. ``state`` is a dict for the modules' own use.
    """

    __slots__ = (
        "client",
        "closed",
        "flow",
        "host",
        "listener",
        "port",
        "protocol",
        "server",
        "state",
        "user",
    )

    def __init__(
        self,
        *,
        listener: str,
        protocol: str,
        client: tuple[str, int],
        host: str,
        port: int,
        user: str | None = None,
    ) -> None:
        self.listener = listener
        self.protocol = protocol
        self.client = client
        self.host = host
        self.port = port
        self.user = user
        self.server: tuple[str, int] | None = None
        self.flow: Flow | None = None
        self.state: dict[str, Any] = {}
        self.closed = False  # on_close ran

    def __repr__(self) -> str:
        return (
            f"Context({self.protocol} {self.client[0]}:{self.client[1]} -> "
            f"{self.host}:{self.port} on {self.listener})"
        )


class Refuse(ProtocolError):
    """Raised by a hook to refuse: ``status`` for HTTP, ``socks_code`` for SOCKS5."""

    def __init__(
        self,
        status: int = 403,
        reason: str = "refused by policy",
        *,
        proxy_status: str = "http_request_denied",
        socks_code: int = 0x02,
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"a refusal needs a 4xx or 5xx status, not {status}")
        super().__init__(reason, status=status, proxy_status=proxy_status, socks_code=socks_code)


class ModuleError(ProtocolError):
    """A module failed (raised, or broke the head): the exchange fails closed."""

    def __init__(self, module: str, hook: str) -> None:
        super().__init__(
            "a proxy module failed to process the request",
            status=500,
            proxy_status="proxy_internal_error",
            socks_code=0x01,
        )
        self.module = module
        self.hook = hook
