"""One listener's modules, in order, each hook call failing closed."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from proxytap.errors import ProtocolError
from proxytap.modules.api import Context, ModuleError
from proxytap.modules.builtin import Rewrite, Validate
from proxytap.policy.headers import HeaderRules
from proxytap.policy.message import RequestHead, ResponseHead

log = logging.getLogger("proxytap.modules")

Hook = Callable[..., Any]


def _hooks(modules: Sequence[Any], hook: str) -> tuple[tuple[str, Hook], ...]:
    out = []
    for module in modules:
        fn = getattr(module, hook, None)
        if fn is not None:
            out.append((str(module.name), fn))
    return tuple(out)


class Chain:
    """The modules of one listener: ``client_to_server`` and ``server_to_client`` lists.

    ``validate`` is first in both (the config makes sure) and is no hook: the
    caller has validated every head before the chain sees it. Request heads and
    client-to-server bytes go through the first list, response heads and
    server-to-client bytes through the second; ``on_connect`` and ``on_close``
    run for every module of either list, once. ``rewrite_requests`` /
    ``rewrite_responses``: ``rewrite`` directly follows ``validate``, so the
    two run fused and memoized (``HeaderRules.prepare_request``); the hooks
    below are what comes after them.
    """

    def __init__(
        self,
        listener: str,
        client_to_server: Sequence[Any],
        server_to_client: Sequence[Any],
        rules: HeaderRules,
        errors: Counter[str],
    ) -> None:
        if not (
            client_to_server
            and isinstance(client_to_server[0], Validate)
            and server_to_client
            and isinstance(server_to_client[0], Validate)
        ):
            raise ValueError("validate must be first in both chains")
        self.listener = listener
        self.rules = rules
        self.errors = errors
        self.names = (
            tuple(m.name for m in client_to_server),
            tuple(m.name for m in server_to_client),
        )
        self.rewrite_requests = len(client_to_server) > 1 and isinstance(
            client_to_server[1], Rewrite
        )
        self.rewrite_responses = len(server_to_client) > 1 and isinstance(
            server_to_client[1], Rewrite
        )
        after_c2s = client_to_server[2 if self.rewrite_requests else 1 :]
        after_s2c = server_to_client[2 if self.rewrite_responses else 1 :]
        self.request_hooks = _hooks(after_c2s, "request")
        self.response_hooks = _hooks(after_s2c, "response")
        self.c2s_data = _hooks(client_to_server, "client_to_server")
        self.s2c_data = _hooks(server_to_client, "server_to_client")
        unique: list[Any] = []
        for module in (*client_to_server, *server_to_client):
            if not any(module is seen for seen in unique):
                unique.append(module)
        self.modules = tuple(unique)  # every module of the listener, once
        self.connect_hooks = _hooks(unique, "on_connect")
        self.close_hooks = _hooks(unique, "on_close")
        # a context is needed at all (else the fast paths skip every module call)
        self.active = bool(
            self.request_hooks
            or self.response_hooks
            or self.c2s_data
            or self.s2c_data
            or self.connect_hooks
            or self.close_hooks
        )
        self.filters = bool(self.c2s_data or self.s2c_data)

    def __repr__(self) -> str:
        return f"Chain({self.listener}: {list(self.names[0])} / {list(self.names[1])})"

    def failed(self, name: str, hook: str, exc: BaseException) -> ModuleError:
        """Log and count a module failure; the error to fail closed with."""
        log.error(
            "module %s failed in %s (listener %s): %s",
            name,
            hook,
            self.listener,
            exc,
            exc_info=exc,
        )
        self.errors[name] += 1
        return ModuleError(name, hook)

    def _refusal(self, name: str, hook: str, exc: ProtocolError) -> ProtocolError:
        if isinstance(exc, ModuleError) or not 400 <= exc.status <= 599:
            return self.failed(name, hook, exc)
        log.info("module %s refused (%s): %s", name, hook, exc.reason)
        return exc

    # -- hooks ----------------------------------------------------------------------

    def on_connect(self, ctx: Context) -> None:
        """Raises ``Refuse`` (a module refused) or ``ModuleError`` (a module failed)."""
        for name, fn in self.connect_hooks:
            try:
                fn(ctx)
            except ProtocolError as exc:
                raise self._refusal(name, "on_connect", exc) from exc
            except Exception as exc:
                raise self.failed(name, "on_connect", exc) from exc

    def request(self, ctx: Context | None, req: RequestHead) -> None:
        """The request hooks after the fused built-ins; the head is checked after each."""
        length = req.length
        for name, fn in self.request_hooks:
            try:
                fn(ctx, req)
                self.rules.recheck_request(req, length)
            except ProtocolError as exc:
                raise self._refusal(name, "request", exc) from exc
            except Exception as exc:
                raise self.failed(name, "request", exc) from exc

    def response(self, ctx: Context | None, resp: ResponseHead) -> None:
        length = resp.length
        for name, fn in self.response_hooks:
            try:
                fn(ctx, resp)
                self.rules.recheck_response(resp, length)
            except ProtocolError as exc:
                raise self._refusal(name, "response", exc) from exc
            except Exception as exc:
                raise self.failed(name, "response", exc) from exc

    def client_to_server(self, ctx: Context | None, data: bytes) -> bytes:
        return self._data(self.c2s_data, "client_to_server", ctx, data)

    def server_to_client(self, ctx: Context | None, data: bytes) -> bytes:
        return self._data(self.s2c_data, "server_to_client", ctx, data)

    def _data(
        self,
        hooks: tuple[tuple[str, Hook], ...],
        hook: str,
        ctx: Context | None,
        data: bytes,
    ) -> bytes:
        for name, fn in hooks:
            try:
                data = fn(ctx, data)
                if type(data) is not bytes:
                    raise TypeError(f"{hook} returned {type(data).__name__}, not bytes")
            except Exception as exc:
                raise self.failed(name, hook, exc) from exc
        return data

    def on_close(self, ctx: Context) -> None:
        """Never raises; runs once per context."""
        if ctx.closed:
            return
        ctx.closed = True
        for name, fn in self.close_hooks:
            try:
                fn(ctx)
            except Exception as exc:
                self.failed(name, "on_close", exc)
