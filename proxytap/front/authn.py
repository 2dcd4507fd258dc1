"""The I/O shell around ``policy.auth``: password checks off the event loop.

bcrypt and SHA-crypt checks cost 50-250 ms of CPU, so they run in a worker
thread, at most ``concurrency`` at once (a flood of wrong passwords cannot
take every thread), and a success is remembered for ``cache_ttl`` seconds so
a browser's many connections do not pay it again.

HTTP proxy authentication (CONNECT and plain HTTP alike) checks one
``Proxy-Authorization`` value with ``check_proxy_authorization``, and every
failed check, SOCKS5 ones included, is counted and logged by
``auth_failed``: one place, so the counters mean the same on every path.
That place also feeds the per-address ``FailureThrottle``; every path asks
``auth_throttled`` before checking a password: a client address past
``auth.max_failures`` failures is refused unchecked for the rest of
``auth.failure_window`` (HTTP 429 with ``Retry-After``, SOCKS5 a failed
sub-negotiation), counted per listener, logged once per window and address.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from proxytap.errors import ProtocolError
from proxytap.hostport import hostport
from proxytap.policy.auth import (
    AuthCache,
    AuthConfig,
    FailureThrottle,
    Htpasswd,
    parse_proxy_authorization,
)

if TYPE_CHECKING:
    from proxytap.flows.table import Connection
    from proxytap.front.services import Services

log = logging.getLogger("proxytap.front")


class Authenticator:
    def __init__(
        self,
        db: Htpasswd,
        cache: AuthCache,
        concurrency: int = 2,
        throttle: FailureThrottle | None = None,
    ) -> None:
        self.db = db
        self.cache = cache
        self.throttle = AuthConfig().throttle() if throttle is None else throttle
        self.slots = asyncio.Semaphore(concurrency)
        self.failures = 0
        self.successes = 0

    @classmethod
    def from_config(cls, cfg: AuthConfig) -> Authenticator | None:
        db = cfg.load_htpasswd()
        if db is None:
            return None
        return cls(db, cfg.cache(), throttle=cfg.throttle())

    async def check(self, user: str, password: str) -> bool:
        now = time.monotonic()
        if self.cache.get(user, password, now):
            self.successes += 1
            return True
        async with self.slots:
            ok = await asyncio.to_thread(self.db.verify, user, password)
        if ok:
            self.cache.put(user, password, time.monotonic())
            self.successes += 1
        else:
            self.failures += 1
        return ok


WRONG_PASSWORD = "wrong user name or password"


async def check_proxy_authorization(
    auth: Authenticator, value: str
) -> tuple[str | None, ProtocolError | None]:
    """One ``Proxy-Authorization`` value: ``(user, None)`` when it is good.

    Else ``(user or None, the refusal)``: 407 for wrong credentials, or what
    parsing the value raised (400 for a malformed one, 407 for another scheme).
    """
    user: str | None = None
    try:
        user, password = parse_proxy_authorization(value)
        ok = await auth.check(user, password)
    except ProtocolError as exc:
        return user, exc
    if ok:
        return user, None
    return user, ProtocolError(WRONG_PASSWORD, status=407, proxy_status="http_request_denied")


def auth_failed(services: Services, conn: Connection, user: str | None) -> None:
    """A failed authentication (HTTP or SOCKS5): counted as a refusal and a failure, logged."""
    services.refused("auth", "bad credentials")
    services.stats.auth_failures[conn.listener] += 1
    log.info("client %s authentication failed (user %r)", hostport(*conn.client), user)
    if services.auth is not None:
        services.auth.throttle.failed(conn.client[0], time.monotonic())


class Throttled(ProtocolError):
    """Refused unchecked: too many failed authentications from the client's address.

    429 (RFC 6585), not 407: a 407 invites the client to ask for the password
    again at once, and says nothing of when trying again makes sense; 429 with
    ``Retry-After`` does. ``http_request_denied``: the proxy refused the request.
    """

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"too many failed authentications from this address: retry in {retry_after} s",
            status=429,
            proxy_status="http_request_denied",
        )
        self.retry_after = retry_after


def auth_throttled(services: Services, conn: Connection) -> Throttled | None:
    """Whether the client's address is refused without a check (counted, logged once)."""
    auth = services.auth
    assert auth is not None
    hit = auth.throttle.blocked(conn.client[0], time.monotonic())
    if hit is None:
        return None
    left, first = hit
    services.stats.auth_throttled[conn.listener] += 1
    if first:  # once per window and address: a brute force does not flood the log
        log.warning(
            "client %s: %d failed authentications within %g s; "
            "its attempts are refused unchecked for %.0f s",
            conn.client[0],
            auth.throttle.limit,
            auth.throttle.window,
            left,
        )
    return Throttled(max(1, math.ceil(left)))
