"""Processes the harness starts: their own process group, a raised RLIMIT_NOFILE, and the
RSS and CPU time of the whole process tree (psutil when installed, else /proc)."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import resource
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in bench/requirements.txt
    psutil = None

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: A log line reporting a problem: the level of Python's logging, or a traceback.
ERROR_LINE = re.compile(r"^.*(?:\bERROR\b|\bCRITICAL\b|^Traceback ).*$", re.MULTILINE)
#: Process groups started and not yet reaped: killed at exit whatever happens.
_LIVE_GROUPS: set[int] = set()


def raise_nofile() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (10,000 sockets need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
        _LIVE_GROUPS.discard(pgid)


atexit.register(_kill_live_groups)


class Group:
    """A command run in a new session (its own process group) with a raised RLIMIT_NOFILE.

    ``stop()`` sends SIGTERM to the group, then SIGKILL; ``kill()`` SIGKILLs at once.
    Used as a context manager, the whole group is always killed on exit.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        stdout: int | IO[Any] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.started = time.time()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else self._log,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=raise_nofile,
        )
        self.pid = self.popen.pid
        _LIVE_GROUPS.add(self.pid)

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_main(self, signum: int) -> None:
        with contextlib.suppress(OSError):
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> bool:
        """Wait for the main process to exit; True if it did within ``timeout``."""
        try:
            self.popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the main process (as a supervisor would: it stops its own children),
        give it ``grace`` seconds, then SIGKILL the whole group."""
        if self.alive():
            self.signal_main(signal.SIGTERM)
            self.wait(grace)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)  # stragglers of the group too
        with contextlib.suppress(Exception):
            self.popen.wait(10)
        _LIVE_GROUPS.discard(self.pid)
        if not self._log.closed:
            self._log.close()

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_errors(self, upto: int | None = None) -> int:
        """Lines of the log (its first ``upto`` bytes) that report an error or a traceback."""
        try:
            with self.log_path.open("rb") as fh:
                text = fh.read(upto if upto is not None else -1).decode(errors="replace")
        except OSError:
            return 0
        return len(ERROR_LINE.findall(text))

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    # ------------------------------------------------------------ the process tree

    def tree(self) -> list[int]:
        return tree_pids(self.pid)

    def rss_bytes(self) -> int:
        return sum(rss_bytes(pid) for pid in self.tree())

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.tree())


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants that are alive."""
    if psutil is not None:
        try:
            proc = psutil.Process(root)
            return [root, *(child.pid for child in proc.children(recursive=True))]
        except psutil.Error:
            return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def rss_bytes(pid: int) -> int:
    if psutil is not None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pid: int) -> float:
    if psutil is not None:
        try:
            times = psutil.Process(pid).cpu_times()
            return float(times.user + times.system)
        except psutil.Error:
            return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0
