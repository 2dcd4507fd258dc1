#!/usr/bin/env python3
"""Merge bench.py result files and print proxytap's summary table (stdlib only).

summarize.py merge OUT FILE...     one JSON for ``bench.py report``; every (file, run)
                                   gets its own run id, so each "x direct" ratio uses the
                                   direct baseline measured in the same invocation and run
summarize.py summary MERGED [--reader FILE...] [--d-count N]
                                   markdown: ratios x direct for A/B/C, D KiB/tunnel,
                                   E CPU s/GiB, export ON vs OFF cost, failed rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

Row = dict[str, Any]
ORDER = (
    "proxytap-http",
    "proxytap-http-export",
    "proxytap-http-wait",
    "proxytap-socks5",
    "proxytap-socks5-export",
    "proxytap-socks5-wait",
)
RATIO_KEYS = {"A": "rps", "B": "MBps", "C": "per_sec"}


def merge(out: Path, files: list[Path]) -> None:
    rows: list[Row] = []
    metas = []
    for i, fn in enumerate(files, 1):
        d = json.loads(fn.read_text())
        metas.append(dict(file=fn.name, meta=d.get("meta")))
        for r in d.get("rows", []):
            r = dict(r, src=fn.name, run_in_file=r.get("run"), run=i * 1000 + int(r.get("run", 0)))
            rows.append(r)
    out.write_text(json.dumps(dict(meta=dict(merged=metas), rows=rows), indent=1))


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratios(rows: list[Row], w: str) -> dict[str, list[float]]:
    key = RATIO_KEYS[w]
    direct: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        if r["workload"] == w and r["peer"] == "direct" and r.get(key):
            direct[r["run"]].append(r[key])
    out: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["workload"] == w and r["peer"] != "direct" and direct.get(r["run"]):
            v = r.get(key)
            if v is not None:
                out[r["peer"]].append(v / statistics.mean(direct[r["run"]]))
    return out


def values(rows: list[Row], w: str, peer: str, key: str) -> list[float]:
    return [
        r[key] for r in rows if r["workload"] == w and r["peer"] == peer and r.get(key) is not None
    ]


def f(x: float | None, nd: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def problems(rows: list[Row], d_count: int | None) -> list[str]:
    out = []
    for r in rows:
        p, w = r["peer"], r["workload"]
        where = f"{p} {w} ({r.get('src', '?')} run {r.get('run_in_file', r.get('run'))})"
        if w == "A" and (not r.get("rps") or r.get("non2xx") or r.get("sock_err")):
            raw = (r.get("raw") or "").strip().replace("\n", " | ")[-200:]
            out.append(
                f"{where}: req/s {r.get('rps')}, non-2xx {r.get('non2xx')}, "
                f"socket errors {r.get('sock_err')}" + (f"; wrk: {raw}" if raw else "")
            )
        elif w == "B" and not r.get("ok"):
            out.append(f"{where}: tunnel failed: {r.get('error') or r.get('raw') or r}")
        elif w == "C" and (r.get("errors") or not r.get("ok")):
            out.append(f"{where}: {r.get('ok')} tunnels ok, {r.get('errors')} errors")
        elif w == "D":
            opened, alive = r.get("open"), r.get("alive_after_hold")
            if r.get("error"):
                out.append(f"{where}: {r['error']}")
            elif (d_count and opened != d_count) or (alive is not None and alive != opened):
                out.append(f"{where}: opened {opened}/{d_count}, alive after hold {alive}")
    return out


def summary(
    merged: Path, readers: list[Path], d_count: int | None, counters: list[Path] | None = None
) -> None:
    rows: list[Row] = json.loads(merged.read_text())["rows"]
    rat = {w: ratios(rows, w) for w in RATIO_KEYS}
    peers: list[str] = []
    for r in rows:
        if r["peer"] != "direct" and r["peer"] not in peers:
            peers.append(r["peer"])
    first = {p: i for i, p in enumerate(peers)}
    peers.sort(key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), first[p]))
    kind = {r["peer"]: r.get("kind", "") for r in rows}

    print("## Summary: proxytap vs direct and peers\n")
    print(
        "x direct = median over runs of value / mean of the direct baselines measured in the "
        "same bench.py invocation and run. D and E are absolute (D: fresh process, "
        "2,000 idle tunnels by default).\n"
    )
    head = [
        "proxy",
        "kind",
        "A req/s x direct",
        "B MB/s x direct",
        "C tunnels/s x direct",
        "D RSS KiB/tunnel",
        "D PSS KiB/tunnel",
        "D idle RSS MiB",
        "E CPU s/GiB",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in peers:
        idle = med(values(rows, "D", p, "base_rss_kib"))
        cells = [
            p,
            kind.get(p, ""),
            f(med(rat["A"].get(p, []))),
            f(med(rat["B"].get(p, []))),
            f(med(rat["C"].get(p, []))),
            f(med(values(rows, "D", p, "rss_per_tunnel_kib")), 1),
            f(med(values(rows, "D", p, "pss_per_tunnel_kib")), 1),
            f(idle / 1024 if idle is not None else None, 1),
            f(med(values(rows, "B", p, "cpu_s_per_GiB")), 2),
        ]
        print("| " + " | ".join(cells) + " |")

    print("\n## Flow export: ON (`--sftap-home` + a reader on every socket) vs OFF\n")
    any_pair = False
    lines = []
    for k, sfx in (
        ("http", "-export"),
        ("socks5", "-export"),
        ("http", "-wait"),
        ("socks5", "-wait"),
    ):
        off, on = f"proxytap-{k}", f"proxytap-{k}{sfx}"
        b_off, b_on = med(rat["B"].get(off, [])), med(rat["B"].get(on, []))
        if b_off is None or b_on is None:
            continue
        any_pair = True
        c_off, c_on = med(rat["C"].get(off, [])), med(rat["C"].get(on, []))
        e_off = med(values(rows, "B", off, "cpu_s_per_GiB"))
        e_on = med(values(rows, "B", on, "cpu_s_per_GiB"))
        d_off = med(values(rows, "D", off, "rss_per_tunnel_kib"))
        d_on = med(values(rows, "D", on, "rss_per_tunnel_kib"))

        def cost(a: float | None, b: float | None) -> str:
            return "-" if not a or b is None else f"{(1 - b / a) * 100:+.1f}%"

        def more(a: float | None, b: float | None) -> str:
            return "-" if not a or b is None else f"{(b / a - 1) * 100:+.1f}%"

        policy = "drop" if sfx == "-export" else "wait"
        lines.append(
            f"| {k} | {policy} | {f(b_off)} | {f(b_on)} | {cost(b_off, b_on)} "
            f"| {f(c_off)} | {f(c_on)} | {cost(c_off, c_on)} "
            f"| {f(e_off, 2)} | {f(e_on, 2)} | {more(e_off, e_on)} "
            f"| {f(d_off, 1)} | {f(d_on, 1)} |"
        )
    if any_pair:
        print(
            "| kind | overload | B x direct OFF | B ON | B cost | C x direct OFF | C ON | C cost "
            "| E CPU s/GiB OFF | E ON | E extra | D KiB/tunnel OFF | D ON |"
        )
        print("|" + "---|" * 13)
        print("\n".join(lines))
        print(
            "\nB/C cost = 1 - ON/OFF of the x-direct ratios (positive: slower with export). "
            "E counts the proxy process only; the reader's own CPU is listed below."
        )
    else:
        print("No export ON/OFF pair in this run (export ON skipped or failed; see above).")

    if readers:
        print("\n### Reader (bench/sftap_drain.py) per export-ON proxytap process\n")
        print("| proxytap process | sockets | bytes read | reconnects | EOFs | reader CPU s |")
        print("|---|---|---|---|---|---|")
        got = 0
        for fn in readers:
            try:
                s = json.loads(fn.read_text().strip().splitlines()[-1])
            except (OSError, ValueError, IndexError):
                print(f"| {fn.stem} | - | no stats | - | - | - |")
                continue
            got += s.get("bytes", 0)
            print(
                f"| {fn.stem.removeprefix('reader-')} | {s.get('sockets')} "
                f"| {s.get('bytes', 0):,} | {max(0, s.get('connects', 0) - s.get('sockets', 0))} "
                f"| {s.get('eofs')} | {s.get('cpu_s')} |"
            )
        b_on = sum(
            r.get("bytes", 0)
            for r in rows
            if r["workload"] == "B" and r["peer"].endswith(("-export", "-wait"))
        )
        if b_on:
            print(
                f"\nWorkload B relayed {b_on:,} bytes through export-ON proxytap and the reader "
                f"got {got:,} bytes in all ({got / b_on:.1%} of B alone; the reader total also "
                "holds A and C traffic and the event headers). Below 100% means proxytap "
                "dropped DATA because the reader's buffer (`reader_buffer`, 4 MiB) was full: "
                "the B/E export numbers then price a partial mirror, not a complete one."
            )

    if counters:
        print("\n### What proxytap exported and dropped, per export-ON process (its /metrics)\n")
        print(
            "| proxytap process | sent bytes (flow sockets) | dropped DATA bytes | dropped events "
            "| wait s | partial sends |"
        )
        print("|---|---|---|---|---|---|")
        for fn in counters:
            c = read_counters(fn)
            print(
                f"| {fn.stem.removeprefix('export-')} | {c['sent']:,.0f} "
                f"| {c['dropped_bytes']:,.0f} | {c['dropped_events']:,.0f} "
                f"| {c['wait']:.2f} | {c['partial']:,.0f} |"
            )
        print(
            "\nA reader that received 100%: 0 dropped DATA bytes (every event was written "
            "whole into the reader's socket, and the reader read them all before it stopped)."
        )

    probs = problems(rows, d_count)
    print("\n## Failed or degraded measurements\n")
    print("\n".join(f"* {p}" for p in probs) if probs else "None.")


def read_counters(fn: Path) -> dict[str, float]:
    """Sum proxytap's export counters (sink="sftap") from a scraped /metrics excerpt."""
    names = {
        "proxytap_export_sent_bytes_total": "sent",
        "proxytap_export_dropped_bytes_total": "dropped_bytes",
        "proxytap_export_dropped_events_total": "dropped_events",
        "proxytap_export_wait_seconds_total": "wait",
        "proxytap_export_partial_sends_total": "partial",
    }
    out = dict.fromkeys(names.values(), 0.0)
    try:
        text = fn.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in names and 'sink="sftap"' in rest:
            out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sp = ap.add_subparsers(dest="cmd", required=True)
    m = sp.add_parser("merge")
    m.add_argument("out", type=Path)
    m.add_argument("files", nargs="+", type=Path)
    s = sp.add_parser("summary")
    s.add_argument("merged", type=Path)
    s.add_argument("--reader", action="append", default=[], type=Path)
    s.add_argument("--d-count", type=int)
    s.add_argument("--counters", action="append", default=[], type=Path)
    a = ap.parse_args()
    if a.cmd == "merge":
        merge(a.out, a.files)
    else:
        summary(a.merged, a.reader, a.d_count, a.counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
