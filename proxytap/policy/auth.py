"""Proxy authentication: htpasswd users, HTTP Basic, SOCKS4 user ids (pure but for ``load``).

One module for every front end and the interception addon. The HTTP paths take
``Proxy-Authorization: Basic`` (RFC 7617, RFC 9110 11.7); SOCKS5 takes RFC 1929
username/password (parsed in ``proto/socks.py``); both check the pair with
``Htpasswd.verify``. SOCKS4 has no password, only a user id, which can be
matched against a list (``socks4_userid_ok``); it is not authentication.

Decisions:

* **Hash formats.** An Apache htpasswd file: ``user:hash`` per line, ``#``
  comments and blank lines ignored. Accepted: bcrypt (``$2y$``, ``$2b$``,
  ``$2a$``; ``htpasswd -B``), SHA-256/SHA-512 crypt (``$5$``, ``$6$``;
  ``htpasswd -2``/``-5``, ``openssl passwd -5/-6``, ``mkpasswd``), and the
  weak MD5 forms ``$apr1$`` (the ``htpasswd -m`` default) and ``$1$``, listed
  in ``weak_users`` so the shell can warn. Refused when loading, naming the
  line: unsalted ``{SHA}``, DES crypt, plain text, anything else. A user may
  appear once. bcrypt is checked with ``bcrypt``; the others with ``libpass``
  (imported as ``passlib``): Python's ``crypt`` module is gone in 3.13.
* **bcrypt reads 72 bytes.** Longer passwords are cut to 72 bytes before
  checking, as Apache's and OpenBSD's bcrypt do (``bcrypt`` 5 refuses them
  instead), so hashes ``htpasswd`` made from long passwords still verify.
* **No user-enumeration oracle.** ``verify`` always runs one hash check: for an
  unknown user it checks against the hash of an existing user with the most
  common scheme and cost in the file (and then answers False whatever the
  result), so "no such user" costs what "wrong password" costs. Users hashed
  with a different scheme or cost still take a different time; keep one
  scheme and cost per file. The hash libraries compare in constant time.
* **Slow on purpose.** bcrypt at cost 10-12 takes 50-250 ms of CPU, and SHA-crypt
  at high round counts likewise. ``verify`` is a plain blocking function: the
  asyncio shell must run it in a thread (``await asyncio.to_thread(...)``),
  bound how many run at once, and remember successes in an ``AuthCache``.
* **Cache.** ``AuthCache`` maps a user to a keyed digest (HMAC-SHA-256 under a
  random per-process key, so a memory dump gives no unsalted password hashes)
  of the last password that verified, with an expiry; lookups compare with
  ``hmac.compare_digest``. Only successes are cached; the cache is a bounded
  LRU; time is an argument. Clear it when the htpasswd file is reloaded.
* **Malformed credentials.** ``parse_proxy_authorization`` raises
  ``ProtocolError``: status 407 when the scheme is not Basic (the client may
  retry with Basic after the challenge), status 400 when a Basic credential is
  malformed (not base64, no colon, control characters: RFC 7617 section 2),
  which is a broken client, not a wrong password. The shell sends the
  ``proxy_authenticate_header`` with every 407.
* **Failure throttle.** ``FailureThrottle`` counts failed authentications per
  client address in a fixed window (``failure_window`` seconds from the first
  failure); at ``max_failures`` the address is refused for the rest of the
  window without a password being checked (brute force costs the attacker a
  window per ``max_failures`` guesses, and costs us no hash checks). A bounded
  LRU (``THROTTLE_ADDRESSES``): a flood of addresses evicts the oldest, which
  at worst lets an evicted address start a new window. Time is an argument.
* **Character set.** The challenge says ``charset="UTF-8"`` (RFC 7617 2.1);
  credentials are decoded as UTF-8, and as Latin-1 when they are not valid
  UTF-8 (older clients), which maps a Latin-1 "é" to the same character a
  UTF-8 client sends.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import bcrypt
from passlib.hash import (  # type: ignore[import-untyped]
    apr_md5_crypt,
    md5_crypt,
    sha256_crypt,
    sha512_crypt,
)

from proxytap.errors import ConfigError, ProtocolError

BCRYPT_MAX_PASSWORD: Final = 72
MAX_CREDENTIALS: Final = 4096  # characters of base64 in one Proxy-Authorization
WEAK_SCHEMES: Final = frozenset({"apr1", "md5-crypt"})

_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_USER = re.compile(r"[^:\x00-\x20\x7f#][^:\x00-\x1f\x7f]*")


class _Handler(Protocol):
    def verify(self, secret: bytes, hash: str) -> bool: ...
    def from_string(self, hash: str) -> object: ...


_PASSLIB: Final[dict[str, _Handler]] = {
    "sha256-crypt": sha256_crypt,
    "sha512-crypt": sha512_crypt,
    "apr1": apr_md5_crypt,
    "md5-crypt": md5_crypt,
}


def hash_scheme(stored: str) -> str | None:
    """The scheme of a stored hash by its prefix, or ``None`` if unsupported."""
    if stored.startswith(("$2y$", "$2b$", "$2a$")):
        return "bcrypt"
    for prefix, scheme in (
        ("$5$", "sha256-crypt"),
        ("$6$", "sha512-crypt"),
        ("$apr1$", "apr1"),
        ("$1$", "md5-crypt"),
    ):
        if stored.startswith(prefix):
            return scheme
    return None


def _check_hash(stored: str) -> str:
    """Validate a stored hash; returns its scheme, raises ValueError saying why not."""
    scheme = hash_scheme(stored)
    if scheme is None:
        if stored.startswith("{SHA}"):
            raise ValueError("unsalted {SHA} hashes are not accepted; re-create with htpasswd -B")
        if len(stored) == 13:
            raise ValueError("DES crypt hashes are not accepted; re-create with htpasswd -B")
        raise ValueError("unsupported hash (use bcrypt: htpasswd -B; or SHA-512 crypt)")
    if scheme == "bcrypt":
        if not _BCRYPT.fullmatch(stored):
            raise ValueError("malformed bcrypt hash")
    else:
        parsed = _PASSLIB[scheme].from_string(stored)  # ValueError when malformed
        if not getattr(parsed, "checksum", None):
            raise ValueError(f"malformed {scheme} hash (no checksum)")
    return scheme


def _cost_class(scheme: str, stored: str) -> tuple[str, str]:
    """Hashes of one class take the same time to check."""
    if scheme == "bcrypt":
        return scheme, stored[4:6]
    if scheme in ("sha256-crypt", "sha512-crypt"):
        part = stored.split("$")[2]
        return scheme, part if part.startswith("rounds=") else "rounds=5000"
    return scheme, ""


def check_password(stored: str, password: str) -> bool:
    """Run the one hash check for ``stored`` (a validated hash). Blocking and slow."""
    secret = password.encode("utf-8", "surrogatepass")
    try:
        if stored.startswith("$2"):
            return bcrypt.checkpw(secret[:BCRYPT_MAX_PASSWORD], stored.encode("ascii"))
        scheme = hash_scheme(stored)
        if scheme is None:
            return False
        return bool(_PASSLIB[scheme].verify(secret, stored))
    except ValueError:  # e.g. a NUL byte, which SHA-crypt refuses
        return False


class Htpasswd:
    """Users and their password hashes, from an Apache htpasswd file."""

    def __init__(self, entries: Mapping[str, str], *, key: str = "auth.htpasswd") -> None:
        if not entries:
            raise ConfigError(key, "no users: nobody could authenticate")
        self._hashes: dict[str, str] = {}
        schemes: dict[str, str] = {}
        for user, stored in entries.items():
            try:
                schemes[user] = _check_hash(stored)
            except ValueError as exc:
                raise ConfigError(key, f"user {user!r}: {exc}") from None
            self._hashes[user] = stored
        classes = collections.Counter(_cost_class(schemes[u], h) for u, h in self._hashes.items())
        common = classes.most_common(1)[0][0]
        self._dummy = next(
            h for u, h in self._hashes.items() if _cost_class(schemes[u], h) == common
        )
        self.users: frozenset[str] = frozenset(self._hashes)
        self.weak_users: frozenset[str] = frozenset(
            u for u, s in schemes.items() if s in WEAK_SCHEMES
        )

    @classmethod
    def parse(cls, text: str, *, source: str = "htpasswd", key: str = "auth.htpasswd") -> Htpasswd:
        """Parse htpasswd text; ``ConfigError`` names ``key`` and the line."""
        entries: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, stored = line.partition(":")
            where = f"{source} line {n}"
            if not sep or not stored:
                raise ConfigError(key, f"{where}: expected user:hash")
            if not _USER.fullmatch(user):
                raise ConfigError(key, f"{where}: bad user name {user!r}")
            if user in entries:
                raise ConfigError(key, f"{where}: user {user!r} appears twice")
            try:
                _check_hash(stored)
            except ValueError as exc:
                raise ConfigError(key, f"{where}: {exc}") from None
            entries[user] = stored
        return cls(entries, key=key)

    @classmethod
    def load(cls, path: str | Path, *, key: str = "auth.htpasswd") -> Htpasswd:
        """Read and parse an htpasswd file (the one I/O in this module)."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(key, f"{path} is not UTF-8") from None
        return cls.parse(text, source=str(path), key=key)

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, user: object) -> bool:
        return user in self._hashes

    def verify(self, user: str, password: str) -> bool:
        """Does ``password`` match ``user``'s hash? Blocking and slow: run it in a thread.

        Always runs exactly one hash check, for known and unknown users alike.
        """
        stored = self._hashes.get(user)
        ok = check_password(self._dummy if stored is None else stored, password)
        return stored is not None and ok


class AuthCache:
    """Bounded LRU of recent successful verifications, with a TTL; time is an argument."""

    def __init__(self, ttl: float = 300.0, max_entries: int = 1024, *, key: bytes | None = None):
        self.ttl = ttl
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32) if key is None else key
        self._entries: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()

    def _digest(self, user: str, password: str) -> bytes:
        msg = (
            user.encode("utf-8", "surrogatepass")
            + b"\0"
            + password.encode("utf-8", "surrogatepass")
        )
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def get(self, user: str, password: str, now: float) -> bool:
        """True if this pair verified less than ``ttl`` seconds before ``now``."""
        entry = self._entries.get(user)
        if entry is None:
            return False
        digest, expires = entry
        if now >= expires:
            del self._entries[user]
            return False
        ok = hmac.compare_digest(digest, self._digest(user, password))
        if ok:
            self._entries.move_to_end(user)
        return ok

    def put(self, user: str, password: str, now: float) -> None:
        """Remember a pair that ``verify`` accepted."""
        if self.ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[user] = (self._digest(user, password), now + self.ttl)
        self._entries.move_to_end(user)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


THROTTLE_ADDRESSES: Final = 4096  # client addresses whose failures are remembered


class _Failures:
    __slots__ = ("count", "reported", "start")

    def __init__(self, start: float) -> None:
        self.start = start  # the window began with the first failure
        self.count = 0
        self.reported = False  # the first refusal of this window was reported


class FailureThrottle:
    """Failed authentications per client address; ``limit`` 0 turns it off."""

    def __init__(self, limit: int, window: float, size: int = THROTTLE_ADDRESSES) -> None:
        self.limit = limit
        self.window = window
        self.size = size
        self._entries: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def failed(self, address: str, now: float) -> None:
        """One failed authentication from ``address``."""
        if self.limit <= 0:
            return
        entries = self._entries
        entry = entries.get(address)
        if entry is None or now - entry.start >= self.window:
            entry = entries[address] = _Failures(now)
        entry.count += 1
        entries.move_to_end(address)
        if len(entries) > self.size:
            entries.popitem(last=False)

    def blocked(self, address: str, now: float) -> tuple[float, bool] | None:
        """``(seconds left, first refusal of the window)`` when ``address`` is refused."""
        entry = self._entries.get(address)
        if entry is None or entry.count < self.limit:
            return None
        left = entry.start + self.window - now
        if left <= 0:  # the window is over: a clean slate
            del self._entries[address]
            return None
        first = not entry.reported
        entry.reported = True
        return left, first

    def __len__(self) -> int:
        return len(self._entries)


# -- HTTP Basic ----------------------------------------------------------------------


def _denied(reason: str) -> ProtocolError:
    return ProtocolError(reason, status=407, proxy_status="http_request_denied")


def _malformed(reason: str) -> ProtocolError:
    return ProtocolError(reason, status=400, proxy_status="http_request_error")


def parse_proxy_authorization(value: str) -> tuple[str, str]:
    """``Proxy-Authorization`` value -> (user, password); ``ProtocolError`` (407/400) if not."""
    value = value.strip(" \t")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        raise _denied("Proxy-Authorization scheme is not Basic")
    token = token.strip(" \t")
    if not token or len(token) > MAX_CREDENTIALS or not _BASE64.fullmatch(token):
        raise _malformed("Proxy-Authorization: Basic credentials are not base64")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _malformed("Proxy-Authorization: Basic credentials are not base64") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep:
        raise _malformed("Proxy-Authorization: Basic credentials have no ':'")
    if _CONTROL.search(text):
        raise _malformed("Proxy-Authorization: Basic credentials contain control characters")
    return user, password


def basic_credentials(user: str, password: str) -> str:
    """The ``Proxy-Authorization`` value a client sends (for tests and upstream chaining)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def proxy_authenticate_header(realm: str) -> tuple[str, str]:
    """The challenge for a 407: (name, value)."""
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
    return "Proxy-Authenticate", f'Basic realm="{quoted}", charset="UTF-8"'


# -- SOCKS4 --------------------------------------------------------------------------


def socks4_userid_ok(userid: bytes, allowed: Collection[str] | None) -> bool:
    """Is this SOCKS4 user id acceptable? ``None`` accepts any (the default)."""
    if allowed is None:
        return True
    try:
        text = userid.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text in allowed


# -- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: when ``htpasswd`` is set, HTTP needs Basic and SOCKS5 user/password."""

    htpasswd: str | None = None  # path of an Apache htpasswd file; None: no authentication
    realm: str = "proxytap"  # shown by browsers in the 407 prompt
    socks4_userids: tuple[str, ...] | None = None  # SOCKS4 user ids accepted; None: any
    cache_ttl: float = 300.0  # seconds a verified user:password is remembered; 0: never
    cache_size: int = 1024  # users remembered at most
    # failed authentications from one client address within failure_window seconds,
    # after which its attempts are refused unchecked for the rest of the window; 0: no limit
    max_failures: int = 10
    failure_window: float = 60.0

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None

    def validate(self, key: str) -> None:
        if self.htpasswd is not None and not self.htpasswd.strip():
            raise ConfigError(f"{key}.htpasswd", "empty path")
        if not self.realm or not self.realm.isprintable() or not self.realm.isascii():
            raise ConfigError(f"{key}.realm", "must be non-empty printable ASCII")
        if self.socks4_userids is not None:
            for i, uid in enumerate(self.socks4_userids):
                if not uid or "\0" in uid or len(uid.encode()) > 255:
                    raise ConfigError(f"{key}.socks4_userids[{i}]", "must be 1..255 bytes, no NUL")
        if self.cache_ttl < 0:
            raise ConfigError(f"{key}.cache_ttl", "must be >= 0")
        if self.cache_size <= 0:
            raise ConfigError(f"{key}.cache_size", "must be > 0")
        if self.max_failures < 0:
            raise ConfigError(f"{key}.max_failures", "must be >= 0 (0: no limit)")
        if not 0 < self.failure_window <= 86400:
            raise ConfigError(f"{key}.failure_window", "must be > 0 and at most 86400 seconds")

    def load_htpasswd(self, key: str = "auth") -> Htpasswd | None:
        """The user file, read now (``None`` when authentication is off)."""
        if self.htpasswd is None:
            return None
        return Htpasswd.load(self.htpasswd, key=f"{key}.htpasswd")

    def cache(self) -> AuthCache:
        return AuthCache(self.cache_ttl, self.cache_size)

    def throttle(self) -> FailureThrottle:
        return FailureThrottle(self.max_failures, self.failure_window)
