"""The scenarios, one run each: start what is needed, measure, and always clean up.

Every ``run_*`` returns a row (a dict of metrics) or raises; the caller turns an
exception into an ``error: ...`` row.  Workers run in their own process group and are
killed on the way out; the broker's queues are purged before and after each run (on the
embedded broker: each run gets a new, empty data directory, removed after).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import systems
from bench.proc import Group
from bench.systems import (
    BROKERS,
    COUNTER_KEY,
    EMBEDDED,
    EMBEDDED_KOMBU_URL,
    LATENCY_KEY,
    PY,
    REDIS_URL,
    ROOT,
)

POLL = 0.005  # seconds between reads of the counter
RSS_EVERY = 0.05  # seconds between samples of the worker tree's RSS
MB = 1024 * 1024
#: G's worker process counts: the table shows each and the ratio of the last to the first.
G_PROCESSES = (1, 2)
#: L's log levels: the table shows each and the ratio of the last to the first.
L_LEVELS = ("warning", "info")


@dataclass(frozen=True)
class Sizes:
    """Counts and durations of every scenario (full size, or --quick)."""

    a_tasks: int = 20_000
    a_concurrency: tuple[int, ...] = (100, 1000)
    b_tasks: int = 5_000
    b_concurrency: int = 500
    b_ms: int = 50
    c_rate: float = 200.0
    c_seconds: float = 10.0
    c_concurrency: int = 100
    d_messages: int = 20_000
    d_prefetch: int = 400  # greenworker's: concurrency 100 x prefetch multiplier 4
    e_settle: float = 1.0
    e_idle: float = 5.0
    f_tasks: int = 10_000
    f_concurrency: int = 10_000
    f_ms: int = 1000
    g_tasks: int = 20_000
    g_concurrency: int = 100  # each process's
    l_tasks: int = 20_000
    l_concurrency: int = 100
    #: Per-run timeouts (seconds from the worker's start) by scenario.
    timeouts: dict[str, float] = field(
        default_factory=lambda: {
            "A": 600,
            "B": 120,
            "C": 60,
            "D": 300,
            "E": 60,
            "F": 30,
            "G": 600,
            "L": 600,
        }
    )


QUICK = Sizes(
    a_tasks=1_000,
    b_tasks=1_000,
    c_seconds=2.0,
    d_messages=2_000,
    e_settle=0.5,
    e_idle=2.0,
    f_tasks=1_000,
    f_concurrency=1_000,
    g_tasks=1_000,
    l_tasks=1_000,
    timeouts={"A": 60, "B": 30, "C": 30, "D": 60, "E": 30, "F": 20, "G": 60, "L": 60},
)


class WorkerDied(RuntimeError):
    pass


@dataclass
class Progress:
    """What a watch of the counter saw (times are ``time.time()``)."""

    first: float | None = None
    last: float | None = None
    done: int = 0
    peak_rss: int = 0

    @property
    def finished(self) -> bool:
        return self.last is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


class Runner:
    """Runs single scenario cases against the local Redis / RabbitMQ and slow server."""

    def __init__(self, sizes: Sizes, log_dir: Path, timeout: float | None = None) -> None:
        self.sizes = sizes
        self.log_dir = log_dir
        self.timeout_override = timeout
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.slow_port = 0
        self._slow: Group | None = None
        self._runs = 0
        #: The embedded broker's data directory of the run in progress (see ``clean``).
        self.data_dir: str | None = None
        #: G's runs so far per (system, broker): the order of its process counts alternates.
        self._g_runs: dict[tuple[str, str], int] = {}
        #: L's, for the order of its log levels.
        self._l_runs: dict[tuple[str, str], int] = {}

    def timeout(self, scenario: str) -> float:
        return self.timeout_override or self.sizes.timeouts[scenario]

    # ------------------------------------------------------------ the slow server

    def start_slow_server(self) -> None:
        if self._slow is not None and self._slow.alive():
            return
        self.slow_port = free_port()
        self._slow = Group(
            [PY, "-m", "bench.slow_server", "--port", str(self.slow_port)],
            env=systems.worker_env(BROKERS["redis"], self.slow_port),
            cwd=ROOT,
            log_path=self.log_dir / "slow_server.log",
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.server("/stats") is not None:
                return
            if not self._slow.alive():
                break
            time.sleep(0.05)
        raise RuntimeError(f"the slow server did not start: {self._slow.log_tail()}")

    def stop_slow_server(self) -> None:
        if self._slow is not None:
            self._slow.stop(grace=2)
            self._slow = None

    def server(self, path: str) -> dict[str, Any] | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.slow_port, timeout=5)
        try:
            conn.request("GET", path)
            body = conn.getresponse().read()
            return dict(json.loads(body)) if path == "/stats" else {}
        except (OSError, ValueError):
            return None
        finally:
            conn.close()

    # ------------------------------------------------------------ helpers

    def start_worker(
        self, system: str, broker: str, concurrency: int, tag: str, extra: tuple[str, ...] = ()
    ) -> Group:
        self._runs += 1
        return Group(
            systems.worker_command(system, concurrency, extra),
            env=systems.worker_env(
                BROKERS[broker], self.slow_port, concurrency, system, self.data_dir
            ),
            cwd=systems.worker_cwd(system),
            log_path=self.log_dir / f"{self._runs:04d}-{tag}-{system}-{broker}.log",
        )

    def publish(
        self,
        system: str,
        broker: str,
        task: str,
        count: int,
        *,
        ms: int = 50,
        rate: float | None = None,
        timeout: float = 600,
    ) -> float:
        """``systems.publish`` to this run's broker (and data directory)."""
        return systems.publish(
            system,
            BROKERS[broker],
            task,
            count,
            ms=ms,
            rate=rate,
            timeout=timeout,
            data_dir=self.data_dir,
        )

    def watch(
        self,
        worker: Group | Sequence[Group],
        target: int,
        deadline: float,
        *,
        key: str = COUNTER_KEY,
        is_list: bool = False,
        sample_rss: bool = True,
    ) -> Progress:
        """Poll the counter (or the list's length) until ``target``, the deadline, or the
        death of a worker (RSS: the sum of the workers' process trees)."""
        workers = [worker] if isinstance(worker, Group) else list(worker)
        seen = Progress()
        next_sample = 0.0
        while True:
            done = int(self.redis.llen(key) if is_list else (self.redis.get(key) or 0))
            now = time.time()
            seen.done = done
            if done and seen.first is None:
                seen.first = now
            if sample_rss and now >= next_sample:
                seen.peak_rss = max(seen.peak_rss, sum(w.rss_bytes() for w in workers))
                next_sample = now + RSS_EVERY
            if done >= target:
                seen.last = now
                return seen
            for one in workers:
                if not one.alive():
                    raise WorkerDied(
                        f"worker exited with code {one.popen.returncode}: {one.log_tail(3)}"
                    )
            if now > deadline:
                return seen
            time.sleep(POLL)

    @contextlib.contextmanager
    def clean(self, broker: str) -> Any:
        """Purge before, and after whatever happened.  On the embedded broker the run gets
        a new, empty data directory (``self.data_dir``), removed after."""
        systems.purge(broker)
        if broker == EMBEDDED:
            self.data_dir = systems.new_data_dir()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                systems.purge(broker)
            if self.data_dir is not None:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.data_dir = None

    @staticmethod
    def timed_out(seen: Progress, target: int, timeout: float) -> str:
        return f"timeout ({seen.done}/{target} done after {timeout:.0f}s)"

    # ------------------------------------------------------------ A: noop throughput

    def run_a(self, system: str, broker: str, tasks: int, concurrency: int) -> dict[str, Any]:
        with self.clean(broker):
            publish_s = self.publish(system, broker, "noop", tasks)
            started = time.time()
            with self.start_worker(system, broker, concurrency, "A") as worker:
                seen = self.watch(worker, tasks, started + self.timeout("A"))
                measured = worker.log_size()
                worker.stop()
                log_errors = worker.log_errors(measured)
        row: dict[str, Any] = {
            "log_errors": log_errors,
            "tasks": tasks,
            "concurrency": concurrency,
            "publish_s": round(publish_s, 2),
            "peak_rss_mb": round(seen.peak_rss / MB, 1),
            "startup_to_first_s": round(seen.first - started, 3) if seen.first else None,
        }
        if not seen.finished or seen.first is None or seen.last is None:
            return {**row, "status": self.timed_out(seen, tasks, self.timeout("A"))}
        elapsed = seen.last - seen.first
        return {
            **row,
            "status": "ok",
            "seconds": round(elapsed, 3),
            "tasks_per_s": round(tasks / elapsed, 1) if elapsed > 0 else None,
        }

    # ------------------------------------------------------------ B and F: I/O tasks

    def run_io(
        self, scenario: str, system: str, broker: str, tasks: int, concurrency: int, ms: int
    ) -> dict[str, Any]:
        self.start_slow_server()
        timeout = self.timeout(scenario)
        with self.clean(broker):
            publish_s = self.publish(system, broker, "io", tasks, ms=ms)
            if self.server("/reset") is None:
                raise RuntimeError("the slow server does not answer")
            started = time.time()
            with self.start_worker(system, broker, concurrency, scenario) as worker:
                try:
                    seen = self.watch(worker, tasks, started + timeout)
                finally:
                    stats = self.server("/stats") or {}
                    measured = worker.log_size()
                    worker.stop(grace=5)
                log_errors = worker.log_errors(measured)
        first_request = stats.get("first_at")
        row: dict[str, Any] = {
            "log_errors": log_errors,
            "tasks": tasks,
            "concurrency": concurrency,
            "ms": ms,
            "ideal_s": round(math.ceil(tasks / concurrency) * ms / 1000, 3),
            "publish_s": round(publish_s, 2),
            "peak_rss_mb": round(seen.peak_rss / MB, 1),
            "peak_concurrent": stats.get("peak_active"),
            "startup_to_first_request_s": (
                round(first_request - started, 3) if first_request else None
            ),
        }
        if not seen.finished or seen.last is None or seen.first is None:
            return {**row, "status": self.timed_out(seen, tasks, timeout)}
        # from the first request the worker made to the last completion; without the
        # server's clock: the first completion minus one task's sleep
        began = first_request if first_request else seen.first - ms / 1000
        return {**row, "status": "ok", "run_s": round(seen.last - began, 3)}

    # ------------------------------------------------------------ C: latency

    def run_c(self, system: str, broker: str) -> dict[str, Any]:
        sizes = self.sizes
        count = int(sizes.c_rate * sizes.c_seconds)
        timeout = self.timeout("C")
        with self.clean(broker):
            self.publish(system, broker, "noop", 1)  # warm-up: the worker is consuming
            started = time.time()
            with self.start_worker(system, broker, sizes.c_concurrency, "C") as worker:
                ready = self.watch(worker, 1, started + timeout, sample_rss=False)
                if not ready.finished:
                    return {"status": f"timeout (not ready after {timeout:.0f}s)"}
                publish_s = self.publish(
                    system, broker, "latency", count, rate=sizes.c_rate, timeout=sizes.c_seconds * 3
                )
                seen = self.watch(
                    worker,
                    count,
                    time.time() + timeout,
                    key=LATENCY_KEY,
                    is_list=True,
                    sample_rss=False,
                )
                measured = worker.log_size()
                worker.stop()
                log_errors = worker.log_errors(measured)
            values = [float(v) * 1000 for v in self.redis.lrange(LATENCY_KEY, 0, -1)]
        row: dict[str, Any] = {
            "log_errors": log_errors,
            "tasks": count,
            "rate": sizes.c_rate,
            "concurrency": sizes.c_concurrency,
            "publish_s": round(publish_s, 2),
            "received": len(values),
        }
        if values:
            row.update(
                p50_ms=round(percentile(values, 50), 2),
                p99_ms=round(percentile(values, 99), 2),
                max_ms=round(max(values), 2),
            )
        if not seen.finished:
            return {**row, "status": self.timed_out(seen, count, timeout)}
        return {**row, "status": "ok"}

    # ------------------------------------------------------------ D: broker ceiling

    def run_d(self, broker: str) -> dict[str, Any]:
        url = BROKERS[broker]
        count = self.sizes.d_messages
        timeout = self.timeout("D")
        with self.clean(broker):
            publish_s = self.publish("greenworker", broker, "noop", count)
            # the embedded broker: kombu alone on the store greenworker published to
            where = (
                [EMBEDDED_KOMBU_URL, "--data-dir", self.data_dir]
                if self.data_dir is not None
                else [url]
            )
            done = subprocess.run(
                [
                    PY,
                    "-m",
                    "bench.kombu_bare",
                    *where,
                    str(count),
                    "--prefetch",
                    str(self.sizes.d_prefetch),
                    "--timeout",
                    str(timeout),
                ],
                cwd=ROOT,
                env=systems.worker_env(url, self.slow_port, data_dir=self.data_dir),
                capture_output=True,
                text=True,
                timeout=timeout + 30,
            )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"kombu_bare failed: {tail[0]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        row: dict[str, Any] = {
            "messages": count,
            "prefetch": self.sizes.d_prefetch,
            "publish_s": round(publish_s, 2),
            "seconds": result["seconds"],
            "messages_per_s": result["messages_per_s"],
        }
        if result["messages"] < count:
            return {**row, "status": f"timeout ({result['messages']}/{count} after {timeout}s)"}
        return {**row, "status": "ok"}

    def run_d_worker(self, system: str, broker: str) -> dict[str, Any]:
        """D's worker row: greenworker draining as many tasks that do nothing (``empty``)
        at -c 100, prefetch 400 like the bare consumer: the worker's own ceiling."""
        count = self.sizes.d_messages
        os.environ["BENCH_EMPTY_TOTAL"] = str(count)  # the worker's environment
        try:
            with self.clean(broker):
                publish_s = self.publish(system, broker, "empty", count)
                started = time.time()
                with self.start_worker(system, broker, self.sizes.d_prefetch // 4, "D") as worker:
                    seen = self.watch(worker, count, started + self.timeout("D"))
                    worker.stop()
        finally:
            del os.environ["BENCH_EMPTY_TOTAL"]
        row: dict[str, Any] = {
            "messages": count,
            "prefetch": self.sizes.d_prefetch,
            "publish_s": round(publish_s, 2),
        }
        if not seen.finished or seen.first is None or seen.last is None:
            return {**row, "status": self.timed_out(seen, count, self.timeout("D"))}
        elapsed = seen.last - seen.first
        return {
            **row,
            "status": "ok",
            "seconds": round(elapsed, 3),
            "messages_per_s": round(count / elapsed, 1) if elapsed > 0 else None,
        }

    # ------------------------------------------------------------ E: startup, idle, shutdown

    def run_e(self, system: str, broker: str, concurrency: int) -> dict[str, Any]:
        sizes = self.sizes
        timeout = self.timeout("E")
        row: dict[str, Any] = {"concurrency": concurrency, "idle_window_s": sizes.e_idle}
        with self.clean(broker):
            self.publish(system, broker, "noop", 1)
            started = time.time()
            with self.start_worker(system, broker, concurrency, "E") as worker:
                seen = self.watch(worker, 1, started + timeout)
                if not seen.finished or seen.last is None:
                    return {**row, "status": f"timeout (no task done after {timeout:.0f}s)"}
                row["startup_s"] = round(seen.last - started, 3)
                time.sleep(sizes.e_settle)
                cpu_before, at = worker.cpu_seconds(), time.monotonic()
                time.sleep(sizes.e_idle)
                cpu_after, window = worker.cpu_seconds(), time.monotonic() - at
                row["idle_cpu_pct"] = round((cpu_after - cpu_before) / window * 100, 2)
                row["idle_rss_mb"] = round(worker.rss_bytes() / MB, 1)
                row["log_errors"] = worker.log_errors()
                asked = time.monotonic()
                worker.signal_main(signal.SIGTERM)
                if worker.wait(timeout):
                    row["shutdown_s"] = round(time.monotonic() - asked, 3)
                    row["exit_code"] = worker.popen.returncode
                    return {**row, "status": "ok"}
                return {**row, "status": f"timeout (still running {timeout:.0f}s after SIGTERM)"}

    # ------------------------------------------------------------ G: scale-out

    def run_g(self, system: str, broker: str) -> dict[str, Any]:
        """G's noop throughput with 1 and then 2 worker processes (each at the same
        concurrency) on one broker, and the ratio.  The order alternates from one round
        to the next, so that neither count always runs first."""
        sizes = self.sizes
        row = {"tasks": sizes.g_tasks, "concurrency": sizes.g_concurrency}
        return self._alternating(
            self._g_runs,
            system,
            broker,
            row,
            G_PROCESSES,
            functools.partial(self._run_g_once, system, broker),
            lambda processes: f"N={processes}",
            lambda processes: f"n{processes}",
            ("scale_ratio", 2),
        )

    def _alternating(
        self,
        counts: dict[tuple[str, str], int],
        system: str,
        broker: str,
        row: dict[str, Any],
        variants: tuple[Any, ...],
        run_once: Callable[[Any], dict[str, Any]],
        label: Callable[[Any], str],
        prefix: Callable[[Any], str],
        ratio: tuple[str, int],
    ) -> dict[str, Any]:
        """One round of a scenario that runs each of ``variants`` once (the order
        alternating from one round to the next, so that none always runs first) and
        reports the last one's throughput over the first one's as ``ratio`` (its name,
        its digits).  Each variant's figures are in ``row`` under ``prefix(variant)``."""
        runs = counts.get((system, broker), 0)
        counts[system, broker] = runs + 1
        order = variants[::-1] if runs % 2 else variants
        row = {**row, "order": list(order), "log_errors": 0}
        problems = []
        for variant in order:
            try:
                part = run_once(variant)
            except Exception as exc:  # one variant failing still reports the other
                part = {"status": f"error: {type(exc).__name__}: {exc}"}
            row["log_errors"] += part.pop("log_errors", 0)
            status = part.pop("status")
            if status != "ok":
                problems.append(f"{label(variant)}: {status}")
            row.update({f"{prefix(variant)}_{name}": value for name, value in part.items()})
        first, last = (row.get(f"{prefix(v)}_tasks_per_s") for v in (variants[0], variants[-1]))
        if first and last:
            name, digits = ratio
            row[name] = round(last / first, digits)
        return {**row, "status": "; ".join(problems) or "ok"}

    def _run_g_once(self, system: str, broker: str, processes: int) -> dict[str, Any]:
        tasks, concurrency = self.sizes.g_tasks, self.sizes.g_concurrency
        timeout = self.timeout("G")
        with self.clean(broker), contextlib.ExitStack() as stack:
            publish_s = self.publish(system, broker, "noop", tasks)
            started = time.time()
            workers = [
                stack.enter_context(
                    self.start_worker(
                        system, broker, concurrency, f"G{processes}", self.node_options(number)
                    )
                )
                for number in range(1, processes + 1)
            ]
            seen = self.watch(workers, tasks, started + timeout)
            measured = [worker.log_size() for worker in workers]
            for worker in workers:
                worker.stop()
            log_errors = sum(w.log_errors(upto) for w, upto in zip(workers, measured, strict=True))
        row: dict[str, Any] = {
            "log_errors": log_errors,
            "publish_s": round(publish_s, 2),
            "peak_rss_mb": round(seen.peak_rss / MB, 1),
        }
        if not seen.finished or seen.first is None or seen.last is None:
            return {**row, "status": self.timed_out(seen, tasks, timeout)}
        elapsed = seen.last - seen.first
        return {
            **row,
            "status": "ok",
            "seconds": round(elapsed, 3),
            "tasks_per_s": round(tasks / elapsed, 1) if elapsed > 0 else None,
        }

    # ------------------------------------------------------------ L: the log's cost

    def run_l(self, system: str, broker: str) -> dict[str, Any]:
        """L's noop throughput at ``-l warning`` and at ``-l info`` (Celery's task lines,
        two per task), each logging to a file (``-f``), and the ratio INFO / WARNING.  The
        order alternates from one round to the next."""
        sizes = self.sizes
        row = {"tasks": sizes.l_tasks, "concurrency": sizes.l_concurrency}
        return self._alternating(
            self._l_runs,
            system,
            broker,
            row,
            L_LEVELS,
            functools.partial(self._run_l_once, system, broker),
            lambda level: f"-l {level}",
            str,
            ("log_ratio", 3),
        )

    def _run_l_once(self, system: str, broker: str, level: str) -> dict[str, Any]:
        tasks, timeout = self.sizes.l_tasks, self.timeout("L")
        logfile = self.log_dir / f"{self._runs + 1:04d}-L-{level}-{system}-{broker}.file.log"
        with self.clean(broker):
            publish_s = self.publish(system, broker, "noop", tasks)
            started = time.time()
            options = ("-l", level, "-f", str(logfile))  # after the command's -l warning
            with self.start_worker(system, broker, self.sizes.l_concurrency, "L", options) as w:
                seen = self.watch(w, tasks, started + timeout)
                w.stop()
        lines = logfile.read_text(errors="replace").splitlines() if logfile.exists() else []
        row: dict[str, Any] = {
            "log_errors": sum(1 for line in lines if "ERROR" in line or "CRITICAL" in line),
            "publish_s": round(publish_s, 2),
            "log_lines": len(lines),
        }
        if not seen.finished or seen.first is None or seen.last is None:
            return {**row, "status": self.timed_out(seen, tasks, timeout)}
        elapsed = seen.last - seen.first
        return {
            **row,
            "status": "ok",
            "seconds": round(elapsed, 3),
            "tasks_per_s": round(tasks / elapsed, 1) if elapsed > 0 else None,
        }

    def node_options(self, number: int) -> tuple[str, ...]:
        """Worker ``number``'s own hostname, and on the embedded broker its own state
        store (two workers cannot share one)."""
        options: tuple[str, ...] = ("-n", f"bench{number}@%h")
        if self.data_dir is not None:
            options += ("-S", f"{self.data_dir}/state-{number}")
        return options
