"""Running the strict stand-ins (``strict_consumer.py``) as subprocesses, and polling them.

Shared by ``test_strict_consumer.py`` (the stand-ins' own self-check) and
``test_whole_messages.py`` (the acceptance tests over a real proxy process).
"""

from __future__ import annotations

import fcntl
import json
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STRICT = Path(__file__).with_name("strict_consumer.py")


def poll[T](cond: Callable[[], T | None], within: float, what: str, *, every: float = 0.02) -> T:
    """Call ``cond`` until it returns something truthy (returned); fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.1f}s: {what}")
        time.sleep(every)


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode is not None
    return proc.returncode


def unsent(sock: Any) -> int:
    """Bytes this AF_UNIX stream socket sent that its peer has not read yet (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


class Consumer:
    """One ``strict_consumer.py`` process and its JSON summary."""

    def __init__(
        self,
        mode: str,
        path: Path | str,
        workdir: Path,
        name: str,
        *,
        fmt: str = "text",
        throttle: float | None = None,
        stall_after: int | None = None,
        nice: int = 0,
    ) -> None:
        self.mode = mode
        self.path = str(path)
        self.name = name
        self.out = workdir / f"{name}.json"
        self.err_path = workdir / f"{name}.stderr"
        argv = [
            sys.executable,
            str(STRICT),
            mode,
            self.path,
            "--format",
            fmt,
            "--out",
            str(self.out),
        ]
        if throttle is not None:
            argv += ["--throttle", str(throttle)]
        if stall_after is not None:
            argv += ["--stall-after", str(stall_after)]
        if nice:
            argv += ["--nice", str(nice)]
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.final: dict[str, Any] | None = None

    def start(self, within: float = 10.0) -> Consumer:
        """Start it and wait for its first summary (connected, or listening)."""
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=err)
        self.wait(lambda s: s["connected"], within, "connected / listening")
        return self

    @property
    def stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def summary(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.out.read_text())
        except FileNotFoundError:
            return None
        assert isinstance(data, dict)
        return data

    def wait(
        self, cond: Callable[[dict[str, Any]], Any], within: float, what: str
    ) -> dict[str, Any]:
        """Poll the summary until ``cond(summary)``; fail early if the process died."""

        def check() -> dict[str, Any] | None:
            s = self.summary()
            if s is not None and cond(s):
                return s
            assert self.proc is not None
            if self.proc.poll() is not None and self.proc.returncode != 0:
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode}: {self.stderr[-2000:]}"
                )
            return None

        return poll(check, within, f"{self.name}: {what} (last: {self.brief()})")

    def brief(self) -> str:
        s = self.summary()
        if s is None:
            return "no summary"
        keys = (
            "events",
            "bytes_total",
            "short_reads",
            "parse_errors",
            "protocol_errors",
            "connections",
            "connections_closed_by_standin",
            "stalled",
            "eof",
        )
        return json.dumps({k: s.get(k) for k in keys} | {"errors": s.get("errors", [])[:3]})

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the final summary (written by the process on its way out)."""
        if self.final is not None:
            return self.final
        assert self.proc is not None
        rc = stop_process(self.proc)
        s = self.summary()
        assert s is not None, f"{self.name}: no summary; stderr: {self.stderr[-2000:]}"
        assert rc == 0, f"{self.name} exited {rc}: {self.stderr[-2000:]}"
        assert s["terminated"] or s["eof"], s
        self.final = s
        return s

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, grace=5)
