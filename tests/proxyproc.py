"""A ``proxytap run`` subprocess for end-to-end tests: its ports, log lines, flow log, metrics.

``launch(config, *flags)`` starts it (``tests.conftest.start_proxytap``) and
keeps reading its stderr, so a test can wait for a log line; ``stop`` ends it
(SIGTERM, then SIGKILL) and the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import start_proxytap

Endpoint = tuple[str, int]


@dataclass
class Proxytap:
    """A ``proxytap run`` subprocess: its ports, its log lines, its admin API."""

    proc: asyncio.subprocess.Process
    ports: dict[str, int]
    lines: list[str]
    flow_log: Path | None = None
    home: Path | None = None  # SF-TAP flow sockets
    admin: int = 0
    drain: asyncio.Task[None] | None = field(default=None, repr=False)

    def port(self, name: str) -> int:
        return self.ports[name]

    def flows(self) -> list[dict[str, Any]]:
        if self.flow_log is None or not self.flow_log.exists():
            return []
        return [json.loads(line) for line in self.flow_log.read_text().splitlines() if line]

    async def flow_of(self, client: Endpoint, within: float = 10) -> dict[str, Any]:
        """The flow log record of the flow whose client endpoint is ``client``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            hits = [f for f in self.flows() if (f["id.orig_h"], f["id.orig_p"]) == client]
            if hits:
                (record,) = hits
                return record
            await asyncio.sleep(0.02)
        raise AssertionError(f"no flow record for {client}: {self.flows()}")

    async def samples(self, name: str, **labels: str) -> list[float]:
        """Every sample of ``name`` on /metrics whose labels include ``labels``."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.admin)
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        text = (await asyncio.wait_for(reader.read(), 10)).decode()
        writer.close()
        out = []
        for line in text.splitlines():
            m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
            if m is None or m.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                out.append(float(m.group(3)))
        return out

    async def metric(self, name: str, **labels: str) -> float:
        found = await self.samples(name, **labels)
        if not found:
            raise AssertionError(f"no sample {name} {labels}")
        return found[0]

    async def metric_sum(self, name: str, **labels: str) -> float:
        """The sum over the samples of ``name`` with ``labels`` (0 when there is none yet:
        a labelled family shows no sample before its first labelled event)."""
        return sum(await self.samples(name, **labels))

    async def logged(self, pattern: str, within: float = 5) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            for line in self.lines:
                if re.search(pattern, line):
                    return line
            await asyncio.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 15)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self.drain is not None:
            await self.drain


async def _drain(proc: asyncio.subprocess.Process, into: list[str]) -> None:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        into.append(line.decode(errors="replace"))


async def launch(config: Path, *flags: str) -> Proxytap:
    """``proxytap run --config CONFIG FLAGS``, once ready (its admin port read from its lines)."""
    proc, ports, lines = await start_proxytap("--config", str(config), *flags)
    px = Proxytap(proc, ports, lines)
    for line in lines:
        m = re.search(r"admin: serving http://127\.0\.0\.1:(\d+)/", line)
        if m:
            px.admin = int(m.group(1))
    px.drain = asyncio.get_running_loop().create_task(_drain(proc, px.lines))
    return px
