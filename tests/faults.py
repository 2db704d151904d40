"""Fault injection for the broker tests: a private Redis server and a TCP proxy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class PrivateRedis:
    """A redis-server of the test's own, with an fsync-always AOF, so a restart keeps
    every queue and unacked message (as a production Redis with persistence would)."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = directory
        self.durable = durable  # False: no AOF (a scratch server, for speed)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        """A clean server shutdown (SIGTERM): clients see their connections drop."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a broker (``tests/tcpproxy.py``, its own process);
    :meth:`cut` drops every connection and refuses new ones until :meth:`restore`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def restore(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.tcpproxy", str(self.port), str(self.upstream_port)],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port)

    start = restore

    def cut(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
