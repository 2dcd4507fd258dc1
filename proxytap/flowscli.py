"""``proxytap flows``: the live flow table (or running totals) from a proxy's admin API.

Like ``snabb wall spy``: one row per live inner flow with its id, chunks and
bytes each way, ``client -> destination (requested name)``, L7 class, state
and age, refreshed every ``--interval`` seconds (clearing the screen on a
terminal). ``--once`` prints once and exits; ``--json`` prints the admin API's
JSON, one document per line. ``--stats`` prints one line of totals and rates
per interval instead: bytes each way, flows, bytes/s, new flows/s, export
drops (the first line's rates are averages since the proxy started).
``--count N`` stops after N tables or lines.

Exit codes: 0 done (or interrupted, or stdout closed); 1 the admin API could
not be reached or refused the request; 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"
TOKEN_ENV = "PROXYTAP_ADMIN_TOKEN"
CLEAR = "\x1b[H\x1b[2J"


class AdminError(Exception):
    """The admin API could not be reached or answered with an error."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxytap flows",
        description="Show the live flow table of a running proxytap, from its admin API.",
    )
    p.add_argument(
        "--admin",
        metavar="URL",
        default=DEFAULT_ADMIN_URL,
        help=f"admin API base URL or HOST:PORT (default: {DEFAULT_ADMIN_URL})",
    )
    p.add_argument("--token", metavar="TOKEN", help=f"bearer token (default: ${TOKEN_ENV} if set)")
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument("--json", action="store_true", help="print JSON, one document per line")
    p.add_argument(
        "--stats", action="store_true", help="print one line of totals and rates per interval"
    )
    p.add_argument("--count", type=int, metavar="N", help="stop after N tables or lines")
    p.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="refresh (default: 2)"
    )
    p.add_argument("--client", metavar="IP[:PORT]", help="only flows from this client")
    p.add_argument(
        "--destination", metavar="HOST[:PORT]", help="only flows to this name or address"
    )
    p.add_argument("--class", dest="l7", metavar="NAME", help="only flows of this L7 class")
    p.add_argument("--state", choices=["open", "half-closed"], help="only flows in this state")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N rows")
    p.add_argument("--timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    return p


def base_url(text: str) -> str:
    """``HOST:PORT`` or a URL -> ``http://HOST:PORT`` without a trailing slash."""
    if "://" not in text:
        text = "http://" + text
    return text.rstrip("/")


def fetch(url: str, token: str | None, timeout: float) -> Any:
    """GET ``url`` and decode its JSON; ``AdminError`` with a one-line reason otherwise."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        detail = ""
        with contextlib.suppress(ValueError, OSError, AttributeError):
            detail = json.loads(exc.read()).get("error", "")
        hint = f" (--token or ${TOKEN_ENV})" if exc.code == 401 else ""
        raise AdminError(f"{url}: HTTP {exc.code} {detail or exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the admin API at {url}: {reason}") from None
    except ValueError:
        raise AdminError(f"{url}: the answer is not JSON") from None


# -- formatting --------------------------------------------------------------------------


def human(n: float) -> str:
    """Bytes for people: ``999B``, ``1.5KiB``, ``12.0MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _ep(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def age(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``2h07m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


HEADER = ("ID", "CHUNKS", "BYTES UP", "BYTES DOWN", "CLIENT -> DESTINATION (REQUESTED)")
TAIL = ("L7", "STATE", "AGE")


def render_table(doc: dict[str, Any]) -> str:
    """The flow table as fixed-width text, with a one-line summary on top."""
    rows = []
    for f in doc["flows"]:
        c, s, r = f["client"], f["server"], f["requested"]
        path = (
            f"{_ep(c['ip'], c['port'])} -> {_ep(s['ip'], s['port'])} ({_ep(r['host'], r['port'])})"
        )
        rows.append(
            (
                str(f["id"]),
                f"{f['chunks_up']}/{f['chunks_down']}",
                str(f["bytes_up"]),
                str(f["bytes_down"]),
                path,
                f["l7"] or "-",
                f["state"],
                age(f["age"]),
            )
        )
    cols = (*HEADER, *TAIL)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(cols)]
    right = {0, 1, 2, 3}

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    summary = f"{doc['total']} flows, {doc['connections']} client connections" + (
        f", {len(rows)} shown" if len(rows) != doc["total"] else ""
    )
    return "\n".join([summary, line(cols), *(line(r) for r in rows)]) + "\n"


def stats_line(cur: dict[str, Any], prev: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """One ``--stats`` line and its numbers (rates over the interval since ``prev``)."""
    if prev is None:
        dt = max(cur["uptime"], 1e-9)
        base = {"bytes_up": 0, "bytes_down": 0, "flows_total": 0}
    else:
        dt = max(cur["now"] - prev["now"], 1e-9)
        base = prev
    rates = {
        "up_bps": (cur["bytes_up"] - base["bytes_up"]) / dt,
        "down_bps": (cur["bytes_down"] - base["bytes_down"]) / dt,
        "new_flows_per_s": (cur["flows_total"] - base["flows_total"]) / dt,
    }
    stamp = time.strftime("%H:%M:%S", time.localtime(cur["now"]))
    text = (
        f"{stamp} bytes up {human(cur['bytes_up'])} down {human(cur['bytes_down'])}"
        f" | {human(rates['up_bps'])}/s up {human(rates['down_bps'])}/s down"
        f" | flows {cur['flows_active']} active {cur['flows_total']} total"
        f" {rates['new_flows_per_s']:.1f} new/s"
        f" | conns {cur['connections_active']}"
        f" | drops {cur['export_dropped_events']} events {human(cur['export_dropped_bytes'])}"
    )
    return text, {**cur, **rates}


# -- main --------------------------------------------------------------------------------


def _flows_url(base: str, args: argparse.Namespace) -> str:
    filters = {
        "client": args.client,
        "destination": args.destination,
        "class": args.l7,
        "state": args.state,
    }
    query = {"limit": str(args.limit)} | {k: v for k, v in filters.items() if v is not None}
    return f"{base}/flows?{urllib.parse.urlencode(query)}"


def run(args: argparse.Namespace, out: TextIO) -> int:
    base = base_url(args.admin)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    count = 1 if args.once else args.count
    clear = out.isatty() and not args.json and not args.stats and count != 1
    prev: dict[str, Any] | None = None
    n = 0
    while True:
        if args.stats:
            cur = fetch(f"{base}/stats", token, args.timeout)
            text, numbers = stats_line(cur, prev)
            prev = cur
            out.write((json.dumps(numbers) if args.json else text) + "\n")
        else:
            doc = fetch(_flows_url(base, args), token, args.timeout)
            if args.json:
                out.write(json.dumps(doc) + "\n")
            else:
                out.write((CLEAR if clear else "") + render_table(doc))
                if not clear and count != 1:
                    out.write("\n")
        out.flush()
        n += 1
        if count is not None and n >= count:
            return 0
        time.sleep(args.interval)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.count is not None and args.count < 1:
        print("proxytap flows: --count must be >= 1", file=sys.stderr)
        return 2
    if args.interval <= 0:
        print("proxytap flows: --interval must be > 0", file=sys.stderr)
        return 2
    try:
        return run(args, out or sys.stdout)
    except AdminError as exc:
        print(f"proxytap flows: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # the reader went away (| head): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


__all__ = ["main", "render_table", "stats_line"]
