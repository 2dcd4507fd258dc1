"""Upstream proxies (``[[upstream.proxies]]``): where a ``via`` rule sends its connections.

A destination rule of ``[[access.rules]]`` with ``via = "NAME"`` (an allow
rule) sends the connections it decides through the upstream proxy NAME
instead of connecting directly. Each entry names the proxy and how to speak
to it, as a URL whose scheme says who resolves the destination name (curl's
conventions):

* ``http://HOST:PORT``: HTTP CONNECT; the upstream resolves names.
* ``socks5h://HOST:PORT``: SOCKS5; the upstream resolves names.
* ``socks5://HOST:PORT``: SOCKS5; proxytap resolves names and asks for the
  address (every address judged by ``[[access.rules]]`` first, as a direct
  connect would be).
* ``socks4a://HOST:PORT``: SOCKS4a; the upstream resolves names (IPv4 only).
* ``socks4://HOST:PORT``: SOCKS4; proxytap resolves names (IPv4 only).

Credentials: ``username`` with ``password`` or ``password_file`` (the file's
first line; keeps the secret out of the config file). SOCKS4 sends
``username`` as its USERID and has no password. Credentials never go in the
URL (URLs are logged).

Pure: parsing and validation only; ``UpstreamProxy.secret`` reads the
password file (at start-up and reload, like the htpasswd file).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from proxytap.errors import ConfigError, unknown_key
from proxytap.proto.proxyclient import Kind

SCHEMES: Final = {
    # scheme -> (handshake, the upstream resolves names)
    "http": (Kind.HTTP, True),
    "socks5h": (Kind.SOCKS5, True),
    "socks5": (Kind.SOCKS5, False),
    "socks4a": (Kind.SOCKS4, True),
    "socks4": (Kind.SOCKS4, False),
}
PROXY_KEYS: Final = frozenset({"name", "url", "username", "password", "password_file"})
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    """One ``[[upstream.proxies]]`` entry, validated."""

    name: str
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    key: str = "upstream.proxies"  # where it was configured, for error messages

    @property
    def kind(self) -> Kind:
        return SCHEMES[self.scheme][0]

    @property
    def remote_dns(self) -> bool:
        """The upstream resolves names (proxytap sends the name as the client gave it)."""
        return SCHEMES[self.scheme][1]

    @property
    def ipv4_only(self) -> bool:
        return self.kind is Kind.SOCKS4

    @property
    def url(self) -> str:
        """The proxy's URL as logged (never with credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def secret(self) -> str | None:
        """The password (read from ``password_file`` now); ``ConfigError`` names the key."""
        if self.password_file is None:
            return self.password
        key = f"{self.key}.password_file"
        try:
            text = Path(self.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(key, f"cannot read {self.password_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(key, f"{self.password_file} is not UTF-8 text") from None
        secret = text.splitlines()[0] if text else ""
        if not secret:
            raise ConfigError(key, f"{self.password_file}: the first line is empty")
        _check_length(secret, key)
        return secret

    @classmethod
    def from_config(cls, table: object, key: str) -> UpstreamProxy:
        if not isinstance(table, Mapping):
            raise ConfigError(key, "expected a table")
        for k in table:
            if k not in PROXY_KEYS:
                raise unknown_key(f"{key}.{k}", PROXY_KEYS)
        for k in ("name", "url"):
            if k not in table:
                raise ConfigError(f"{key}.{k}", "missing")
        for k in PROXY_KEYS:
            if k in table and not isinstance(table[k], str):
                raise ConfigError(f"{key}.{k}", "expected a string")
        name = table["name"]
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{key}.name", "must be 1-64 of A-Z a-z 0-9 _ . - (not leading . -)")
        scheme, host, port = parse_proxy_url(table["url"], f"{key}.url")
        username = table.get("username")
        password = table.get("password")
        password_file = table.get("password_file")
        if password is not None and password_file is not None:
            raise ConfigError(f"{key}.password_file", "give password or password_file, not both")
        has_secret = password is not None or password_file is not None
        if SCHEMES[scheme][0] is Kind.SOCKS4:
            if has_secret:
                raise ConfigError(f"{key}.password", "SOCKS4 has no password (username only)")
        elif has_secret and username is None:
            raise ConfigError(f"{key}.username", "a password needs a username")
        elif username is not None and not has_secret:
            raise ConfigError(f"{key}.password", "a username needs password or password_file")
        if username is not None:
            if not username or (SCHEMES[scheme][0] is Kind.HTTP and ":" in username):
                raise ConfigError(f"{key}.username", "must be non-empty (no ':' for HTTP)")
            _check_length(username, f"{key}.username")
        if password is not None:
            _check_length(password, f"{key}.password")
        if password_file is not None and not password_file:
            raise ConfigError(f"{key}.password_file", "must be a file path")
        return cls(name, scheme, host, port, username, password, password_file, key)


def _check_length(value: str, key: str) -> None:
    """SOCKS5 carries at most 255 bytes of user name and of password (RFC 1929)."""
    if len(value.encode()) > 255:
        raise ConfigError(key, "longer than 255 bytes")
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(key, "must not contain CR, LF or NUL")


def parse_proxy_url(url: str, key: str) -> tuple[str, str, int]:
    """``scheme://host:port`` -> (scheme, host, port); nothing else is accepted."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"{url!r} is not a proxy URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(key, f"scheme must be one of {', '.join(SCHEMES)}; got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(key, "credentials go in username and password(_file), not the URL")
    if not parts.hostname:
        raise ConfigError(key, f"{url!r} has no host")
    if port is None or port == 0:
        raise ConfigError(key, f"{url!r} needs a port (scheme://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, f"{url!r}: only scheme://host:port is accepted")
    return scheme, parts.hostname, port


def build_proxies(tables: Sequence[Mapping[str, Any]], key: str) -> dict[str, UpstreamProxy]:
    """The ``[[upstream.proxies]]`` entries by name (``ConfigError`` names the bad key)."""
    out: dict[str, UpstreamProxy] = {}
    for i, table in enumerate(tables):
        proxy = UpstreamProxy.from_config(table, f"{key}[{i}]")
        if proxy.name in out:
            raise ConfigError(f"{key}[{i}].name", f"duplicate upstream proxy {proxy.name!r}")
        out[proxy.name] = proxy
    return out
