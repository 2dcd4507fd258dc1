"""One way to write a host and port in log lines: ``[::1]:18000`` for IPv6.

``%s:%d`` on an IPv6 address gives ``::1:18000``, which no one can split back
into address and port; RFC 3986 brackets the address, as URLs and most
tools (curl, ss, nginx logs) do.
"""

from __future__ import annotations


def hostport(host: str, port: int) -> str:
    """``host:port``, the host in brackets when it is an IPv6 address (has a colon)."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


__all__ = ["hostport"]
