"""How a client connection in its handshake is answered and ended.

``ClientConnection`` (``handshake``) reads the client's SOCKS or HTTP
request and opens its tunnel; this base class holds what it does when the
answer is not a tunnel: every final reply (a SOCKS reply code or an HTTP
status with ``Proxy-Status``; refusals name the rule and the setting that
would allow the request), how each is counted (tunnel results, policy
denials, refusals, protocol errors), the first-byte and handshake deadlines,
the open-file refusal, and the close (lingering after a final answer so it
is not lost to an RST).
"""

from __future__ import annotations

import asyncio
import logging

from proxytap.config import ListenerConfig
from proxytap.errors import Failure, ProtocolError
from proxytap.flows.table import Connection
from proxytap.front.relay import linger_close
from proxytap.front.replies import http_error
from proxytap.front.services import CLIENT_ACL, HANDSHAKE_TEXT, SOCKS4_USERID, Services
from proxytap.hostport import hostport
from proxytap.modules.api import ModuleError
from proxytap.proto.socks import SocksServer

log = logging.getLogger("proxytap.front")

# refusals at the handshake that access policy decides (the rest: limits, authentication)
POLICY_RULES = frozenset((CLIENT_ACL, SOCKS4_USERID))

# the ``result`` label of tunnel replies: SOCKS reply codes by name (RFC 1928, SOCKS4)
SOCKS5_RESULTS = (
    "succeeded",
    "general_failure",
    "not_allowed",
    "network_unreachable",
    "host_unreachable",
    "connection_refused",
    "ttl_expired",
    "command_not_supported",
    "address_type_not_supported",
)
SOCKS4_RESULTS = {0x5A: "granted", 0x5B: "rejected", 0x5C: "identd_unreachable"}
SOCKS4_RESULTS[0x5D] = "identd_mismatch"
AUTH_FAILED = "auth_failed"  # SOCKS5: the user name / password sub-negotiation failed
NO_REPLY = "protocol_error"  # SOCKS: the client broke the protocol before a reply was due


def socks_result(version: int, code: int) -> str:
    """The name of the reply code ``SocksServer.reply(code)`` sends to this version."""
    if version == 4:
        if code in (0x00, 0x5A):
            return "granted"
        return SOCKS4_RESULTS.get(code, "rejected")
    return SOCKS5_RESULTS[code] if code < len(SOCKS5_RESULTS) else "unassigned"


class Answering(asyncio.Protocol):
    """The answering and ending half of ``ClientConnection`` (its state is set there)."""

    services: Services
    listener: ListenerConfig
    transport: asyncio.Transport | None
    conn: Connection | None
    socks: SocksServer | None
    socks_version: int
    first_byte: int
    http: bool
    http_version: str
    connect: bool
    auth_rejected: bool
    counted: bool
    done: bool
    timer: asyncio.TimerHandle | None
    refusal: tuple[str, str] | None

    def _protocol_name(self) -> str:
        assert self.conn is not None
        if self.socks is None:
            return self.conn.protocol or "http-connect"
        return self.conn.protocol or ("socks5" if self.first_byte == 5 else "socks4")

    def _module_refused(self, exc: ProtocolError) -> None:
        """A module refused the tunnel (``Refuse``) or failed (``ModuleError``: 500 / 0x01)."""
        assert self.transport is not None and self.conn is not None
        failed = isinstance(exc, ModuleError)
        if not failed:
            self.services.refused("module", exc.reason)
        if self.socks is not None:
            code = 0x01 if failed else (exc.socks_code if exc.socks_code is not None else 0x02)
            self.transport.write(self.socks.reply(code))
            self._answered(socks_result(self.socks_version, code))
        else:
            self._http_error(exc.status, exc.reason, exc.proxy_status)
        log.info("client %s refused by a module: %s", hostport(*self.conn.client), exc.reason)
        self._close("refused by a module", linger=True)

    def _connect_failed(
        self, host: str, port: int, failure: Failure, detail: str, message: str = ""
    ) -> None:
        """``message``: what the client is told (a policy refusal's rule and setting)."""
        assert self.transport is not None and self.conn is not None
        message = message or failure.description
        log.info(
            "connect %s %s -> %s failed: %s (%s): %s",
            self.conn.protocol,
            hostport(*self.conn.client),
            hostport(host, port),
            failure.value,
            detail,
            message,
        )
        if self.socks is not None:
            self.transport.write(self.socks.reply(failure.socks5))
            self._answered(socks_result(self.socks_version, failure.socks5))
        else:
            self._http_error(failure.http_status, message, failure.value)
        self._close(f"connect failed: {failure.value}", linger=True)

    def _deny(
        self,
        rule: str,
        reason: str,
        *,
        status: int | None = None,
        count: bool = True,
    ) -> None:
        """A policy refusal: 403/407/503 for HTTP, 0x02 (0x01 for limits) / 0x5B for SOCKS.

        ``count=False`` when the caller has counted the refusal already.
        """
        assert self.transport is not None and self.conn is not None
        if count:
            self._count_refusal(rule, reason)
        limit = rule.startswith("max-connections")
        text = HANDSHAKE_TEXT.get(rule, reason)  # policy rules: the setting to change
        if self.socks is not None:
            code = 0x01 if limit else 0x02
            self.transport.write(self.socks.reply(code))
            self._answered(socks_result(self.socks_version, code))
        else:
            if status is None:
                status = 503 if limit else 403
            error = "connection_limit_reached" if limit else "http_request_denied"
            self._http_error(status, text, error)
        log.info("client %s refused by %s: %s", hostport(*self.conn.client), rule, text)
        self._close(f"refused by {rule}", linger=True)

    def _count_refusal(self, rule: str, reason: str) -> None:
        if rule in POLICY_RULES:
            self.services.denied(self.listener.name, rule, reason)
        else:
            self.services.refused(rule, reason)

    def _answered(self, result: str) -> None:
        """A CONNECT or SOCKS request got its final reply: counted by its result."""
        key = (self.listener.name, self._protocol_name(), result)
        self.services.stats.tunnel_results[key] += 1

    def _refuse(self, exc: ProtocolError) -> None:
        assert self.transport is not None
        family = "socks" if self.socks is not None else "http"
        self.services.stats.protocol_errors[(self.listener.name, family)] += 1
        if self.socks is not None:
            out = self.socks.data_to_send() + exc.reply
            if out:
                self.transport.write(out)
            if len(exc.reply) >= 8 and exc.socks_code is not None:  # a reply with a code
                self._answered(socks_result(4 if self.first_byte == 4 else 5, exc.socks_code))
            elif self.auth_rejected:
                self._answered(AUTH_FAILED)
            else:
                self._answered(NO_REPLY)
        else:
            self._http_error(exc.status, exc.reason, exc.proxy_status)
        self._close(f"protocol error: {exc.reason}", linger=True)

    def _no_files(self) -> None:
        """Near the open-file limit: accepted, closed at once, counted, logged once a window."""
        assert self.transport is not None
        services = self.services
        self.done = True
        self.transport.close()
        services.stats.fd_refusals[self.listener.name] += 1
        reported = services.fd_log.hit()
        if reported:
            fds = services.fds
            assert fds is not None
            log.warning(
                "open-file limit %d nearly reached: refusing new client connections "
                "(%d refused since the last report; %d open, room for ~%d)",
                fds.limit,
                reported,
                len(services.table.connections),
                fds.capacity,
            )

    def _spoke(self) -> None:
        """The first bytes: no longer silent; a limit decided at open is judged again."""
        conn = self.conn
        assert conn is not None
        services = self.services
        services.spoke(conn.client[0], self)
        if self.refusal is not None:
            self.refusal = services.readmit(conn.client[0])

    def evict(self) -> None:
        """A request of the same client, over its connection limit, takes this place."""
        self.services.stats.silent_evictions[self.listener.name] += 1
        self._close("closed for a request of the same client over its limit", quiet=True)

    def _first_byte_due(self) -> None:
        self.timer = None
        if self.done or self.transport is None:
            return
        if self.first_byte < 0:
            self._silent_timeout()
            return
        timeouts = self.services.config.timeouts
        loop = asyncio.get_running_loop()
        rest = timeouts.handshake - timeouts.first_byte
        self.timer = loop.call_later(rest, self._handshake_timeout)

    def _silent_timeout(self) -> None:
        """Nothing sent: closed without an answer (nothing was asked), counted, not logged."""
        self.services.stats.handshake_timeouts[(self.listener.name, "first_byte")] += 1
        self._close("sent nothing within timeouts.first_byte", quiet=True)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.done or self.transport is None:
            return
        if self.first_byte < 0:  # timeouts.first_byte is not shorter than this
            self._silent_timeout()
            return
        self.services.stats.handshake_timeouts[(self.listener.name, "handshake")] += 1
        if self.http:
            self._http_error(408, "the request head did not arrive in time", "http_request_error")
        self._close("handshake timeout", linger=True)

    def _http_error(
        self, status: int, reason: str, proxy_status: str, retry_after: int | None = None
    ) -> None:
        """A final HTTP error answer: text/plain reason, Proxy-Status, Connection: close."""
        assert self.transport is not None
        if self.connect:  # plain-HTTP requests are counted by their status class
            self._answered(str(status))
        config = self.services.config
        self.transport.write(
            http_error(
                config,
                status,
                reason,
                proxy_status,
                version=self.http_version,
                retry_after=retry_after,
            )
        )

    def _handed_over(self) -> None:
        if not self.done and self.conn is not None and not self.counted:
            protocol = self.conn.protocol
            if not protocol:
                if self.socks is not None:
                    protocol = "socks5" if self.first_byte == 5 else "socks4"
                else:
                    protocol = "http" if self.http else "unknown"
            self.services.stats.downstream[(self.listener.name, protocol)] += 1
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        services = self.services
        services.live.discard(self)
        if self.first_byte < 0 and self.conn is not None:
            services.spoke(self.conn.client[0], self)

    def _close(self, why: str, *, linger: bool = False, quiet: bool = False) -> None:
        """Close the client; ``linger`` after a final answer so it is not lost to an RST.

        ``quiet``: logged at DEBUG only (closes that come by the thousand in a
        flood and are counted in metrics).
        """
        if self.conn is not None and self.done is False:
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "client %s closed: %s",
                hostport(*self.conn.client),
                why,
            )
        self._handed_over()
        services = self.services
        if self.conn is not None:
            services.table.close_connection(self.conn)
        if self.transport is not None and not self.transport.is_closing():
            if linger:
                if linger_close(self.transport, on_closed=self._lingered):
                    services.lingering += 1  # its descriptor stays in use for a while
            else:
                self.transport.close()

    def _lingered(self) -> None:
        self.services.lingering -= 1
