"""The I/O shell around ``policy.auth``: password checks off the event loop.

bcrypt and SHA-crypt checks cost 50-250 ms of CPU, so they run in a worker
thread, at most ``concurrency`` at once (a flood of wrong passwords cannot
take every thread), and a success is remembered for ``cache_ttl`` seconds so
a browser's many connections do not pay it again.

HTTP proxy authentication (CONNECT and plain HTTP alike) checks one
``Proxy-Authorization`` value with ``check_proxy_authorization``, and every
failed check, SOCKS5 ones included, is counted and logged by
``auth_failed``: one place, so the counters mean the same on every path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from proxytap.errors import ProtocolError
from proxytap.policy.auth import AuthCache, AuthConfig, Htpasswd, parse_proxy_authorization

if TYPE_CHECKING:
    from proxytap.flows.table import Connection
    from proxytap.front.services import Services

log = logging.getLogger("proxytap.front")


class Authenticator:
    def __init__(self, db: Htpasswd, cache: AuthCache, concurrency: int = 2) -> None:
        self.db = db
        self.cache = cache
        self.slots = asyncio.Semaphore(concurrency)
        self.failures = 0
        self.successes = 0

    @classmethod
    def from_config(cls, cfg: AuthConfig) -> Authenticator | None:
        db = cfg.load_htpasswd()
        if db is None:
            return None
        return cls(db, cfg.cache())

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
    log.info("client %s:%d authentication failed (user %r)", *conn.client, user)
