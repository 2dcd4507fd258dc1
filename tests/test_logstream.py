"""The batched log stream and the fast access lines (proxytap.logstream)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from proxytap import logstream
from proxytap.logstream import ACCESS, LineWriter, access, install

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.install(None)


async def test_one_write_per_loop_iteration() -> None:
    stream = CountingStream()
    writer = LineWriter(stream)
    for i in range(100):
        writer.write(f"line {i}")
    assert stream.writes == 0  # queued until the loop comes round
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert stream.getvalue() == "".join(f"line {i}\n" for i in range(100))


async def test_urgent_line_is_written_at_once_after_what_is_queued() -> None:
    stream = CountingStream()
    writer = LineWriter(stream)
    writer.write("first")
    writer.write("warning", urgent=True)
    assert stream.getvalue() == "first\nwarning\n"
    await asyncio.sleep(0)
    assert stream.writes == 1  # the scheduled flush found nothing left


async def test_a_large_queue_is_written_without_waiting() -> None:
    stream = CountingStream()
    writer = LineWriter(stream)
    line = "x" * 1000
    for _ in range(logstream.FLUSH_AT // 1000 + 1):
        writer.write(line)
    assert stream.writes == 1


def test_without_a_loop_lines_are_written_at_once() -> None:
    stream = CountingStream()
    writer = LineWriter(stream)
    writer.write("a")
    writer.write("b")
    assert (stream.writes, stream.getvalue()) == (2, "a\nb\n")


def test_a_closed_stream_does_not_raise() -> None:
    stream = io.StringIO()
    stream.close()
    LineWriter(stream).write("lost")  # no exception reaches the proxy


@pytest.mark.usefixtures("restore_logging")
def test_text_access_line_matches_what_logging_writes() -> None:
    stream = io.StringIO()
    install(stream, "info", "text")
    access("tunnel %s %s:%d up=%d %.3fs", "socks5", "10.0.0.1", 4242, 17, 0.25)
    logging.getLogger(ACCESS).info(
        "tunnel %s %s:%d up=%d %.3fs", "socks5", "10.0.0.1", 4242, 17, 0.25
    )
    fast, slow = stream.getvalue().splitlines()
    assert STAMP.match(fast) and STAMP.match(slow)
    assert (
        fast[24:] == slow[24:] == "INFO proxytap.access: tunnel socks5 10.0.0.1:4242 up=17 0.250s"
    )


@pytest.mark.usefixtures("restore_logging")
def test_json_access_line_matches_what_logging_writes() -> None:
    stream = io.StringIO()
    install(stream, "info", "json")
    msg = 'GET "quoted" \\ \u00e9 \x01'
    access("%s", msg)
    logging.getLogger(ACCESS).info("%s", msg)
    fast, slow = (json.loads(x) for x in stream.getvalue().splitlines())
    assert list(fast) == list(slow) == ["ts", "level", "logger", "msg"]
    assert abs(fast.pop("ts") - slow.pop("ts")) < 5
    assert fast == slow == {"level": "info", "logger": ACCESS, "msg": msg}


@pytest.mark.usefixtures("restore_logging")
def test_access_lines_follow_the_log_level() -> None:
    stream = io.StringIO()
    install(stream, "warning", "text")
    assert not access.enabled()
    access("tunnel %s", "x")
    logging.getLogger("proxytap").warning("kept")
    assert stream.getvalue().endswith("WARNING proxytap: kept\n")
    assert "tunnel" not in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_without_install_access_lines_are_plain_logging(caplog: pytest.LogCaptureFixture) -> None:
    access.install(None)
    with caplog.at_level(logging.INFO, logger=ACCESS):
        access("GET %s %d", "/x", 200)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [(ACCESS, "GET /x 200")]
