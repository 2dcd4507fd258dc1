"""Helpers for tests of proxytap behind a load balancer: a proxytap process and what it exports.

``running`` starts ``proxytap run`` as a real process with flow sockets, a
JSON flow log and an admin server; ``Proxytap`` reads them back as outside
consumers do (``/metrics``, ``/flows``, the flow log, stderr once stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from proxytap.proto.sftap import CREATED, DESTROYED, Event
from tests.conftest import start_proxytap
from tests.export.sftap_helpers import TapReader, short_tmp

Endpoint = tuple[str, int]


@dataclass
class Proxytap:
    proc: asyncio.subprocess.Process
    ports: dict[str, int]
    home: Path  # the SF-TAP home: flow sockets under tcp/
    flowlog: Path
    admin: str  # http://HOST:PORT
    stderr: str = ""

    async def get(self, path: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.admin + path) as resp:
            assert resp.status == 200, (path, resp.status)
            return await resp.text()

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics, found by its exact label set."""
        text = await self.get("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
            if m and ",".join(sorted(m.group(1).split(","))) == want:
                return float(m.group(2))
        raise AssertionError(f"{name}{{{want}}} not in /metrics")

    async def live_flows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(await self.get("/flows"))["flows"]
        return rows

    async def stop(self) -> str:
        """SIGTERM, then everything it logged (the flow log is flushed by then)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(self.proc.communicate(), 20)
        self.stderr = err.decode()
        return self.stderr

    def flows(self) -> list[dict[str, Any]]:
        """The JSON flow log's records."""
        return [json.loads(line) for line in self.flowlog.read_text().splitlines()]


@contextlib.asynccontextmanager
async def running(workdir: Path, config: str) -> AsyncIterator[Proxytap]:
    """``proxytap run`` with ``config`` (TOML) plus flow sockets, a flow log and admin."""
    os.makedirs(workdir, exist_ok=True)
    with short_tmp() as home:
        flowlog = workdir / "flows.json"
        path = workdir / "proxytap.toml"
        path.write_text(
            f'{config}\n[export]\nsftap_home = "{home}"\n\n[log]\nflows = "{flowlog}"\n\n'
            '[admin]\naddress = "127.0.0.1:0"\n'
        )
        proc, ports, lines = await start_proxytap("--config", str(path))
        try:
            admin = next(
                m.group(1) for ln in lines if (m := re.search(r"(http://\S+)/metrics", ln))
            )
            yield Proxytap(proc, ports, home, flowlog, admin)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def key_endpoints(ev: Event) -> set[Endpoint]:
    """The two endpoints of an SF-TAP key (ip1 is the smaller one, not the client)."""
    return {(ev.key.ip1, ev.key.port1), (ev.key.ip2, ev.key.port2)}


async def flows_ended(tap: TapReader, count: int) -> list[Event]:
    """The CREATED events of ``count`` flows, read until that many have ended."""
    created: list[Event] = []
    ended = 0
    while ended < count:
        ev, _ = await tap.event()
        if ev.event == CREATED:
            created.append(ev)
        elif ev.event == DESTROYED:
            ended += 1
    return created
