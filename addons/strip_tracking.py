"""strip_tracking: drop click-tracking parameters from request URLs and analytics cookies.

A proxytap module (see the README, "Modules"). Put it in a listener's chain::

    [[listeners]]
    kind = "http"
    address = "127.0.0.1:8080"
    client_to_server = ["validate", "rewrite", "strip_tracking"]

    [modules.options.strip_tracking]      # optional: more names to strip
    params = ["ref_src"]
    cookies = ["_pk_id"]

Plain-HTTP requests, and requests inside intercepted TLS (``tls.intercept``);
other tunnels are encrypted and pass untouched. Removed from the query:
``utm_*`` and the click ids of the big ad networks (``fbclid``, ``gclid``,
``msclkid``...). Removed from ``Cookie``: Google Analytics / Ads, Meta,
Microsoft and HubSpot cookies (``_ga``, ``_ga_<id>``, ``_gid``, ``_gcl_au``,
``_fbp``, ``__utma``...). The rest of the URL and of the cookie line is kept
byte for byte, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxytap.modules import Context, HttpRequest

PARAMS = (
    "fbclid",
    "gclid",
    "gclsrc",
    "dclid",
    "gbraid",
    "wbraid",
    "msclkid",
    "yclid",
    "twclid",
    "ttclid",
    "li_fat_id",
    "igshid",
    "mc_cid",
    "mc_eid",
    "_hsenc",
    "_hsmi",
    "mkt_tok",
)
PARAM_PREFIXES = ("utm_",)
COOKIES = ("_gid", "_fbp", "_fbc", "_uetsid", "_uetvid", "hubspotutk", "__hstc", "__hssc")
COOKIE_PREFIXES = ("_ga", "_gat", "_gcl_", "__utm")  # _ga, _ga_XYZ, _gat_UA-1, __utma


class StripTracking:
    name = "strip_tracking"

    def __init__(
        self,
        params: tuple[str, ...] = PARAMS,
        param_prefixes: tuple[str, ...] = PARAM_PREFIXES,
        cookies: tuple[str, ...] = COOKIES,
        cookie_prefixes: tuple[str, ...] = COOKIE_PREFIXES,
    ) -> None:
        self.params = frozenset(p.lower().encode() for p in params)
        self.param_prefixes = tuple(p.lower().encode() for p in param_prefixes)
        self.cookies = frozenset(c.encode() for c in cookies)
        self.cookie_prefixes = tuple(c.encode() for c in cookie_prefixes)

    def _tracking_param(self, name: bytes) -> bool:
        name = name.lower()
        return name in self.params or name.startswith(self.param_prefixes)

    def _tracking_cookie(self, name: bytes) -> bool:
        return name in self.cookies or name.startswith(self.cookie_prefixes)

    def _cookies(self, value: bytes) -> bytes:
        crumbs = [c.strip() for c in value.split(b";")]
        return b"; ".join(c for c in crumbs if c and not self._tracking_cookie(c.split(b"=")[0]))

    def request(self, ctx: Context | None, req: HttpRequest) -> None:
        path, mark, query = req.path.partition(b"?")
        if mark:
            pairs = query.split(b"&")
            kept = [p for p in pairs if not self._tracking_param(p.partition(b"=")[0])]
            if len(kept) != len(pairs):
                req.path = path + b"?" + b"&".join(kept) if kept else path
        if any(n.lower() == b"cookie" for n, _ in req.headers):
            headers = []
            for name, value in req.headers:
                if name.lower() == b"cookie":
                    value = self._cookies(value)
                    if not value:
                        continue  # nothing but tracking cookies: no Cookie field at all
                headers.append((name, value))
            req.headers = headers


def create(options: Mapping[str, Any]) -> StripTracking:
    unknown = set(options) - {"params", "cookies"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r} (params, cookies)")
    return StripTracking(
        params=PARAMS + tuple(options.get("params", ())),
        cookies=COOKIES + tuple(options.get("cookies", ())),
    )
