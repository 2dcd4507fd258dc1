#!/usr/bin/env python3
"""Plain-HTTP sanity probe for a forward proxy, the way wrk uses it (stdlib only, loopback).

Sends COUNT absolute-form GETs, one after the other, on ONE keep-alive client
connection and reads each response to its end (Content-Length or chunked).
Prints one line: ``ok: 3/3 ...`` or where it stopped and the response head it
got, so a workload-A failure (wrk counts 0 requests) can be told apart:
no response, a response wrk cannot delimit, or a connection closed after one.

usage: http_probe.py PROXY_PORT [URL] [COUNT]
"""

from __future__ import annotations

import socket
import sys
import time

TIMEOUT = 3.0


class Probe:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        d = self.sock.recv(65536)
        self.buf += d
        return bool(d)

    def take_until(self, sep: bytes, deadline: float) -> bytes:
        while sep not in self.buf:
            if not self.fill(deadline):
                raise EOFError
        head, self.buf = self.buf.split(sep, 1)
        return head

    def take(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            if not self.fill(deadline):
                raise EOFError
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> tuple[str, dict[str, str], int]:
        deadline = time.monotonic() + TIMEOUT
        head = self.take_until(b"\r\n\r\n", deadline).decode("latin-1")
        status, *lines = head.split("\r\n")
        hdrs = {}
        for line in lines:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if "content-length" in hdrs:
            body = len(self.take(int(hdrs["content-length"]), deadline))
        elif "chunked" in hdrs.get("transfer-encoding", "").lower():
            body = 0
            while True:
                size = int(self.take_until(b"\r\n", deadline).split(b";")[0], 16)
                body += len(self.take(size + 2, deadline)) - 2
                if size == 0:  # "0\r\n\r\n": no trailers expected from the origin
                    break
        else:
            raise ValueError(f"no Content-Length and not chunked: {status!r} {hdrs}")
        return status, hdrs, body


def main() -> int:
    port = int(sys.argv[1])
    url = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:11080/small"
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    hostport = url.split("/")[2]
    req = f"GET {url} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode()
    done = 0
    status, hdrs = "", {}
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            p = Probe(s)
            for _ in range(count):
                s.sendall(req)
                status, hdrs, _body = p.response()
                if status.split()[1:2] != ["200"]:
                    break
                done += 1
    except (OSError, EOFError, TimeoutError, ValueError) as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        print(
            f"FAILED at request {done + 1}/{count}: {why}; last head {status!r} "
            f"{ {k: hdrs[k] for k in sorted(hdrs) if k in HEADS} }"
        )
        return 1
    shown = {k: hdrs[k] for k in sorted(hdrs) if k in HEADS}
    if done < count:
        print(f"FAILED: {done}/{count} ok, then {status!r} {shown}")
        return 1
    print(f"ok: {done}/{count} keep-alive responses complete; {status!r} {shown}")
    return 0


HEADS = ("connection", "content-length", "transfer-encoding", "keep-alive", "via")

if __name__ == "__main__":
    sys.exit(main())
