"""When to decrypt a TLS tunnel: the interception rules and the pinning memory (pure).

A tunnel whose first bytes are a TLS ClientHello is *intercepted* (handed to
the TLS engine, ``proxytap.intercept.engine``) or *passed through* (relayed
as ciphertext, as every tunnel is by default). The decision uses the
ClientHello's SNI, or the host the client asked the proxy for (CONNECT target,
SOCKS name or address) when the hello names none, and the client's address:

1. a client in ``tls.passthrough_clients`` is never intercepted;
2. a host matching ``tls.passthrough`` is never intercepted (exceptions to 4);
3. a (client, host) pair that rejected proxytap's certificate recently is
   passed through (pinning fail-open, ``PinMemory``);
4. otherwise the tunnel is intercepted when the host matches ``tls.intercept``
   and, if ``tls.intercept_clients`` is set, the client is in it.

Host patterns: ``"a.b"`` that name exactly, ``"*.a.b"`` any name below it,
``".a.b"`` both, ``"~REGEX"`` a regular expression matching the whole name
(case-insensitive), ``"*"`` every host (IP addresses included). Names are
compared as the access rules compare them (lower-case, no trailing dot, IDNA).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxytap.errors import ConfigError
from proxytap.policy.acl import ClientAcl, DestRule, normalize_host, parse_ip

if TYPE_CHECKING:
    from proxytap.config import TlsCheckConfig

MAX_PINNED: Final = 65536  # (client, host) pairs remembered; the oldest are forgotten first


class HostPatterns:
    """A compiled list of host patterns (see the module docstring)."""

    def __init__(self, patterns: Sequence[str], key: str) -> None:
        self.everything = False
        domains: list[str] = []
        regex: list[str] = []
        for i, text in enumerate(patterns):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{key}[{i}]", "expected a host pattern")
            text = text.strip()
            if text == "*":
                self.everything = True
            elif text.startswith("~"):
                regex.append(text[1:])
            else:
                domains.append(text)
        self.empty = not (self.everything or domains or regex)
        self.literals = frozenset(p for p in domains if parse_ip(p) is not None)
        names = [p for p in domains if parse_ip(p) is None]
        try:
            self.names = (
                DestRule.build("intercept", "allow", domains=names, key=key) if names else None
            )
            self.regex = (
                DestRule.build("intercept", "allow", regex=regex, key=key) if regex else None
            )
        except ConfigError as exc:
            raise ConfigError(key, exc.problem) from None

    def matches(self, host: str) -> bool:
        if self.everything:
            return True
        name = normalize_host(host)
        if parse_ip(name) is not None:
            return name in self.literals
        return any(
            rule is not None and rule.matches_request(name, False, 0, None)
            for rule in (self.names, self.regex)
        )


def _clients(cidrs: Iterable[str], key: str) -> ClientAcl | None:
    cidrs = list(cidrs)
    return ClientAcl(cidrs, key=key) if cidrs else None


@dataclass(frozen=True, slots=True)
class Verdict:
    intercept: bool
    reason: str  # intercept, not-listed, passthrough-client, passthrough-host, pinned, client


class PinMemory:
    """(client, host) pairs that rejected proxytap's certificate, and until when.

    Bounded: past ``limit`` pairs the oldest is forgotten (it is intercepted
    again, fails again, and is remembered again).
    """

    def __init__(self, ttl: float, limit: int = MAX_PINNED) -> None:
        self.ttl = ttl
        self.limit = limit
        self._until: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def record(self, client_ip: str, host: str, now: float) -> bool:
        """Remember a rejection; False when fail-open is off (ttl 0)."""
        if self.ttl <= 0:
            return False
        key = (client_ip, normalize_host(host))
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        while len(self._until) > self.limit:
            self._until.popitem(last=False)
        return True

    def active(self, client_ip: str, host: str, now: float) -> bool:
        key = (client_ip, normalize_host(host))
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True


class InterceptPolicy:
    """The ``tls.intercept`` / ``tls.passthrough`` rules of one configuration."""

    def __init__(
        self,
        intercept: Sequence[str] = (),
        passthrough: Sequence[str] = (),
        intercept_clients: Sequence[str] = (),
        passthrough_clients: Sequence[str] = (),
        key: str = "tls",
    ) -> None:
        self.intercept = HostPatterns(intercept, f"{key}.intercept")
        self.passthrough = HostPatterns(passthrough, f"{key}.passthrough")
        self.intercept_clients = _clients(intercept_clients, f"{key}.intercept_clients")
        self.passthrough_clients = _clients(passthrough_clients, f"{key}.passthrough_clients")

    @classmethod
    def from_config(cls, tls: TlsCheckConfig, key: str = "tls") -> InterceptPolicy:
        for name in ("intercept", "passthrough", "intercept_clients", "passthrough_clients"):
            value = getattr(tls, name)
            if isinstance(value, str):
                raise ConfigError(f"{key}.{name}", "expected a list of strings")
        return cls(
            tls.intercept,
            tls.passthrough,
            tls.intercept_clients,
            tls.passthrough_clients,
            key=key,
        )

    @property
    def enabled(self) -> bool:
        """Some tunnel can be intercepted at all."""
        return not self.intercept.empty

    def may_intercept(self, client_ip: str) -> bool:
        """Could a tunnel of this client be intercepted? (False: no need to wait for its hello.)"""
        if not self.enabled:
            return False
        if self.passthrough_clients is not None and self.passthrough_clients.allowed(client_ip):
            return False
        return self.intercept_clients is None or self.intercept_clients.allowed(client_ip)

    def decide(self, client_ip: str, host: str, pins: PinMemory | None, now: float) -> Verdict:
        if not self.may_intercept(client_ip):
            reason = "not-listed" if not self.enabled else "client"
            if self.passthrough_clients is not None and self.passthrough_clients.allowed(client_ip):
                reason = "passthrough-client"
            return Verdict(False, reason)
        if self.passthrough.matches(host):
            return Verdict(False, "passthrough-host")
        if not self.intercept.matches(host):
            return Verdict(False, "not-listed")
        if pins is not None and pins.active(client_ip, host, now):
            return Verdict(False, "pinned")
        return Verdict(True, "intercept")
