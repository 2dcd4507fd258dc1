#!/usr/bin/env python3
"""Fit bench/proxytap-bench.toml to the proxytap under test.

Runs ``proxytap check-config`` and, while it rejects a key as unknown, drops that
key (or table) and tries again. Writes the accepted file to OUT and prints one
``dropped KEY`` line per key removed, so the benchmark still runs against a build
that predates a setting, and the report says which settings were missing.
Exit status 0 when a file was accepted, 2 otherwise (the last error is printed).

usage: config_fit.py SRC OUT PROXYTAP
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

UNKNOWN = re.compile(r"config error: ([A-Za-z0-9_.\[\]-]+): unknown key")


def value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} values")


def dump(data: dict[str, Any]) -> str:
    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, body in data.items():
        if isinstance(body, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def drop(data: dict[str, Any], key: str) -> bool:
    parts = key.split(".")
    node: Any = data
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


def main() -> int:
    src, out, proxytap = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    data = tomllib.loads(src.read_text())
    err = ""
    for _ in range(32):
        out.write_text(dump(data))
        p = subprocess.run(
            [proxytap, "check-config", str(out)], capture_output=True, text=True, timeout=60
        )
        if p.returncode == 0:
            return 0
        err = (p.stderr or p.stdout).strip()
        m = UNKNOWN.search(err)
        if not m or not drop(data, m.group(1)):
            break
        print(f"dropped {m.group(1)}")
    print(f"config not accepted: {err.splitlines()[-1] if err else 'no output'}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
