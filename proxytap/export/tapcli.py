"""``proxytap tap PATH [--hexdump] [--binary] [--count N]``: watch an SF-TAP flow socket.

Connects to a flow socket (proxytap's own or an original abstractor's) as an
analyzer would, and prints each event's header as a text line: text headers
as received, binary headers decoded and rendered in the text format. With
``--hexdump`` each DATA body follows as ``hexdump -C`` style lines. The
stream is parsed with the same decoder the tests use, so a framing error is
reported (exit 2) rather than printed as garbage.

Exit codes: 0 at end of stream, after ``--count`` events or on a closed
stdout; 1 when the socket cannot be opened; 2 on bad usage or a malformed
stream.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import BinaryIO, TextIO

from proxytap.errors import ProtocolError
from proxytap.proto.sftap import DATA, HEADER_SIZE, decode_binary, decode_text, encode_text

_MAX_LINE = 4096


def hexdump(data: bytes, *, offset: int = 0) -> str:
    """``data`` as ``hexdump -C`` prints it: offset, 16 bytes in two groups, ASCII."""
    lines = []
    for i in range(0, len(data), 16):
        row = data[i : i + 16]
        left = " ".join(f"{b:02x}" for b in row[:8])
        right = " ".join(f"{b:02x}" for b in row[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{offset + i:08x}  {left:<23}  {right:<23}  |{text}|\n")
    return "".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxytap tap",
        description="Print the events of an SF-TAP flow socket (e.g. /tmp/sf-tap/tcp/http).",
    )
    p.add_argument("path", help="the flow socket to read")
    p.add_argument("--hexdump", action="store_true", help="print each DATA body as a hexdump")
    p.add_argument("--binary", action="store_true", help="the socket serves binary headers")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N events")
    return p


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ProtocolError(f"stream ended inside an event ({len(data)} of {n} bytes)")
    return data


def main(argv: list[str], *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the tap; ``argv`` is what follows ``proxytap tap``."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.path)
    except OSError as exc:
        sock.close()
        print(f"proxytap tap: cannot connect to {args.path}: {exc.strerror or exc}", file=err)
        return 1
    f = sock.makefile("rb")
    seen = 0
    try:
        while not args.count or seen < args.count:
            if args.binary:
                head = f.read(HEADER_SIZE)
                if not head:
                    break
                if len(head) != HEADER_SIZE:
                    raise ProtocolError("stream ended inside a binary header")
                ev = decode_binary(head)
                line = encode_text(ev).decode("ascii")
            else:
                raw = f.readline(_MAX_LINE)
                if not raw:
                    break
                if not raw.endswith(b"\n"):
                    raise ProtocolError("header line too long or cut short")
                ev = decode_text(raw)
                line = raw.decode("ascii")
            body = _read_exactly(f, ev.length) if ev.event == DATA else b""
            out.write(line)
            if args.hexdump and body:
                out.write(hexdump(body))
            out.flush()
            seen += 1
    except ProtocolError as exc:
        print(f"proxytap tap: malformed stream from {args.path}: {exc}", file=err)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        f.close()
        sock.close()
    return 0


__all__ = ["hexdump", "main"]
