"""The I/O shell around ``policy.auth``: password checks off the event loop.

bcrypt and SHA-crypt checks cost 50-250 ms of CPU, so they run in a worker
thread, at most ``concurrency`` at once (a flood of wrong passwords cannot
take every thread), and a success is remembered for ``cache_ttl`` seconds so
a browser's many connections do not pay it again.
"""

from __future__ import annotations

import asyncio
import time

from proxytap.policy.auth import AuthCache, AuthConfig, Htpasswd


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
