"""A slow HTTP server on gevent: ``GET /?ms=N`` sleeps N ms, then answers 200 and closes.

    python -m bench.slow_server [--port 8765] [--backlog 65535]

Built for 10,000 concurrent connections: one gevent StreamServer, a large listen
backlog, RLIMIT_NOFILE raised to the hard limit, and up to ``--max-accept`` accepts per
wake-up.  The harness reads ``GET /stats`` (JSON: requests, peak concurrent requests, time
of the first request since the last ``GET /reset``) to time I/O runs from the first
request a worker makes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import gevent
from gevent.server import StreamServer
from gevent.socket import socket as GeventSocket

MAX_HEAD = 16384


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.active = 0
        self.peak_active = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "active": self.active,
            "peak_active": self.peak_active,
            "first_at": self.first_at,
            "last_at": self.last_at,
        }


STATS = Stats()


def respond(sock: GeventSocket, status: str, body: bytes, content_type: str) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode("ascii") + body)


def read_head(sock: GeventSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_HEAD:
            break
    return data


def handle(sock: GeventSocket, _address: Any) -> None:
    try:
        head = read_head(sock)
        if not head:
            return
        try:
            target = head.split(b"\r\n", 1)[0].split()[1].decode("ascii")
        except (IndexError, UnicodeDecodeError):
            respond(sock, "400 Bad Request", b"bad request\n", "text/plain")
            return
        url = urlsplit(target)
        if url.path == "/stats":
            respond(sock, "200 OK", json.dumps(STATS.as_dict()).encode(), "application/json")
            return
        if url.path == "/reset":
            STATS.reset()
            respond(sock, "200 OK", b"reset\n", "text/plain")
            return
        try:
            ms = float(parse_qs(url.query).get("ms", ["0"])[0])
        except ValueError:
            respond(sock, "400 Bad Request", b"ms must be a number\n", "text/plain")
            return
        now = time.time()
        if STATS.first_at is None:
            STATS.first_at = now
        STATS.requests += 1
        STATS.active += 1
        STATS.peak_active = max(STATS.peak_active, STATS.active)
        try:
            gevent.sleep(ms / 1000)
            respond(sock, "200 OK", b"ok", "text/plain")
        finally:
            STATS.active -= 1
            STATS.last_at = time.time()
    except OSError:
        pass  # the client went away
    finally:
        sock.close()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--backlog", type=int, default=65535)
    parser.add_argument("--max-accept", type=int, default=2000)
    args = parser.parse_args()
    nofile = raise_nofile()
    server = StreamServer((args.host, args.port), handle, backlog=args.backlog)
    server.max_accept = args.max_accept
    server.start()
    print(
        json.dumps({"listening": server.server_port, "nofile": nofile, "backlog": args.backlog}),
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
