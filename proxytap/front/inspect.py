"""A tunnel's first client bytes: the TLS ClientHello is read before it is relayed.

The client side of a tunnel starts here instead of in the relay. It holds what
the client sends until the ClientHello is complete (or the bytes are clearly
not TLS), records SNI, ALPN and the client's JA3 / JA4 fingerprints on the
flow, compares the SNI with the host the client asked the proxy for (CONNECT
target, SOCKS4a / SOCKS5 name), and then
either hands everything to the relay or, with ``sni_mismatch = "deny"``,
closes the tunnel before a single byte of the hello reaches the destination
(domain fronting and smuggled destinations show up here). When TLS
interception may apply to the client (``proxytap.policy.intercept``), the
hello is held too, and the verdict on its SNI may hand the tunnel, hello
included, to the TLS engine instead of the relay; bytes that are not a
ClientHello always go to the relay. Only the first bytes of a tunnel pass
through this; the relay's hot path is untouched.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxytap.errors import ProtocolError
from proxytap.flows.table import CloseReason
from proxytap.hostport import hostport
from proxytap.proto.fingerprint import ja3, ja4
from proxytap.proto.tlshello import ClientHello, ClientHelloReader, is_tls_handshake

if TYPE_CHECKING:
    from proxytap.front.relay import Relay

log = logging.getLogger("proxytap.front")


def _canonical(host: str) -> str:
    return host.lower().rstrip(".")


def sni_mismatch(requested_host: str, sni: str | None) -> bool:
    """True when the hello names another host than the one the client asked for.

    A request by IP address cannot be compared with a name (the client chose
    the address itself), and a hello without SNI names nothing: neither is a
    mismatch.
    """
    if sni is None:
        return False
    try:
        ipaddress.ip_address(requested_host)
        return False
    except ValueError:
        pass
    return _canonical(requested_host) != _canonical(sni)


class HelloInspector(asyncio.Protocol):
    """The client transport's protocol until the first bytes are judged.

    With ``sni_mismatch = "deny"``, or an ``intercept`` callback, the bytes are
    held until the verdict (at most one ClientHello, bounded by the reader, or
    ``timeout`` seconds). Otherwise every chunk goes on to the relay at once and
    the reader only looks at it, so "allow" and "log" add no latency and need
    no timer. ``intercept(hello, held)`` returns True when it took the tunnel.
    """

    def __init__(
        self,
        relay: Relay,
        mode: str,
        timeout: float,
        on_mismatch: Callable[[ClientHello], None],
        intercept: Callable[[ClientHello, bytes], bool] | None = None,
    ) -> None:
        self.relay = relay
        self.strict = mode == "deny"
        self.intercept = intercept
        self.hold = self.strict or intercept is not None
        self.reader = ClientHelloReader()
        self.seen = bytearray()  # the first bytes, until the verdict
        self.fed = 0  # how much of ``seen`` the hello reader has had
        self.on_mismatch = on_mismatch
        self.decided = False
        self.timer = (
            asyncio.get_running_loop().call_later(timeout, self._timeout) if self.hold else None
        )

    def data_received(self, data: bytes) -> None:
        if self.decided:  # only after a deny: the relay is closing
            return
        if not self.hold:
            self.relay.up.data_received(data)
        self.seen += data
        verdict = is_tls_handshake(bytes(self.seen[:3]))
        if verdict is None:
            return
        if not verdict:
            self._release()
            return
        try:
            hello = self.reader.feed(bytes(self.seen[self.fed :]))
        except ProtocolError as exc:
            self._not_a_hello(exc.reason)
            return
        self.fed = len(self.seen)
        if hello is not None:
            self._judge(hello)

    def eof_received(self) -> bool | None:
        self._release()
        return self.relay.up.eof_received() if not self.relay.closed else False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.decided:
            self._release()
        if not self.relay.closed:
            self.relay.up.connection_lost(exc)

    def pause_writing(self) -> None:
        self.relay.up.pause_writing()

    def resume_writing(self) -> None:
        self.relay.up.resume_writing()

    # -----------------------------------------------------------------------------

    def _judge(self, hello: ClientHello) -> None:
        flow = self.relay.flow
        flow.sni = hello.sni
        flow.alpn = ",".join(hello.alpn) or None
        # fingerprints of the client, not of a negotiation: once per tunnel, off the relay path
        flow.ja3 = ja3(hello)[1]
        flow.ja4 = ja4(hello)
        if sni_mismatch(flow.requested_host, hello.sni):
            self.on_mismatch(hello)
            if self.strict:
                self._close()
                return
        intercept = self.intercept
        # a destination that spoke first is not a TLS server waiting for this hello
        if intercept is not None and flow.bytes_down == 0 and not self.relay.closed:
            held = bytes(self.seen)
            if intercept(hello, held):
                self.decided = True
                if self.timer is not None:
                    self.timer.cancel()
                self.seen = bytearray()
                return
        self._release()

    def _not_a_hello(self, reason: str) -> None:
        if self.strict:
            flow = self.relay.flow
            log.warning(
                "tunnel %s -> %s closed: malformed TLS ClientHello (%s)",
                hostport(*flow.client),
                hostport(flow.requested_host, flow.requested_port),
                reason,
            )
            self._close()
            return
        self._release()

    def _close(self) -> None:
        self.decided = True
        if self.timer is not None:
            self.timer.cancel()
        self.relay.finish(CloseReason.ERROR)

    def _timeout(self) -> None:
        if not self.decided and not self.relay.closed:
            self._release()

    def _release(self) -> None:
        """Hand the client transport (and, when holding, what it sent) to the relay."""
        if self.decided:
            return
        self.decided = True
        if self.timer is not None:
            self.timer.cancel()
        relay = self.relay
        if relay.closed:
            return
        relay.up.rx.set_protocol(relay.up)
        if self.hold and self.seen:
            relay.up.data_received(bytes(self.seen))
        self.seen = bytearray()
