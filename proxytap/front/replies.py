"""The proxy's own HTTP error answers, built the same way on every path.

The CONNECT handshake and the plain-HTTP forwarder answer failures with the
same response: a ``text/plain`` reason, ``Proxy-Status`` with the RFC 9209
error type, ``Connection: close``, and the ``Proxy-Authenticate`` challenge
on every 407. Only the version (the client's) and whether a body follows
(not for HEAD) differ per call.
"""

from __future__ import annotations

from proxytap.config import Config
from proxytap.policy.auth import proxy_authenticate_header
from proxytap.proto import httpconnect


def http_error(
    config: Config,
    status: int,
    reason: str,
    proxy_status: str,
    *,
    version: str = "HTTP/1.1",
    include_body: bool = True,
    retry_after: int | None = None,
    close: bool = True,
) -> bytes:
    """A final HTTP error answer from the proxy (407 with its challenge).

    ``close=False``: the connection stays open (a 407 to a request read whole).
    """
    extra = [proxy_authenticate_header(config.auth.realm)] if status == 407 else []
    if retry_after is not None:
        extra.append(("Retry-After", str(retry_after)))
    return httpconnect.error_response(
        status,
        reason,
        proxy_status,
        version=version,
        proxy_name=config.proxy_name,
        extra_headers=extra,
        include_body=include_body,
        close=close,
    )
