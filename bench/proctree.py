"""A process and its descendants, from /proc (the benchmarks measure a proxy's whole tree)."""

from __future__ import annotations

import os


def tree_pids(root: int) -> list[int]:
    """root and its descendants (a wrapper that forks is measured with its child)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out
