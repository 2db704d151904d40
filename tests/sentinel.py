"""A Redis master, a replica and a sentinel of the test's own (no persistence), for the
Sentinel tests: :meth:`SentinelSet.fail_over` kills the master with SIGKILL and waits
until the sentinel has promoted the replica."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from .faults import free_port, wait_port

MASTER_NAME = "gwmaster"


def _server(directory: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait(condition: object, timeout: float, what: str) -> None:
    """Poll a server's state (``condition`` a callable): Redis has no event to await."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


class SentinelSet:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.master_port, self.replica_port, self.sentinel_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self.url = f"sentinel://127.0.0.1:{self.sentinel_port}/0"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        self.procs["master"] = _server(self.directory / "master", self.master_port)
        wait_port(self.master_port)
        self.procs["replica"] = _server(
            self.directory / "replica",
            self.replica_port,
            "--replicaof",
            "127.0.0.1",
            str(self.master_port),
        )
        wait_port(self.replica_port)
        replica = redis.Redis(port=self.replica_port)
        _wait(
            lambda: replica.info("replication")["master_link_status"] == "up",
            30,
            "the replica links to the master",
        )
        replica.close()
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 5000\n"
        )
        self.procs["sentinel"] = subprocess.Popen(
            ["redis-server", str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.sentinel_port)
        sentinel = redis.Redis(port=self.sentinel_port)
        _wait(
            lambda: len(sentinel.sentinel_slaves(MASTER_NAME)) == 1,
            30,
            "the sentinel knows the replica",
        )
        sentinel.close()

    def replicate(self) -> None:
        """Return once the replica has every write the master acknowledged so far."""
        master = redis.Redis(port=self.master_port)
        try:
            assert master.wait(1, 10_000) >= 1, "the replica did not catch up"
        finally:
            master.close()

    def fail_over(self) -> None:
        """kill -9 the master; return when the sentinel names the replica the master."""
        master = self.procs.pop("master")
        master.send_signal(signal.SIGKILL)
        master.wait(10)
        sentinel = redis.Redis(port=self.sentinel_port)
        try:

            def promoted() -> bool:
                address = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
                return isinstance(address, tuple) and int(address[1]) == self.replica_port

            _wait(promoted, 60, "the sentinel promotes the replica")
        finally:
            sentinel.close()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(30)
        self.procs.clear()
