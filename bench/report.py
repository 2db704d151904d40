"""The markdown report: a machine line, then one table per scenario (median and range)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from bench.systems import BROKERS, REDIS_URL

PACKAGES = ("greenworker", "celery", "kombu", "dramatiq", "huey", "gevent", "redis", "pika")
TITLES = {
    "A": "A: noop throughput (first to last completion)",
    "B": "B: I/O tasks, 50 ms each (first request to last completion)",
    "C": "C: publish-to-start latency while publishing at a steady rate",
    "D": "D: broker ceiling, a bare kombu consumer acking pre-published Celery messages "
    "(and greenworker's worker on tasks that do nothing)",
    "E": "E: startup (process start to first task done), idle CPU, idle shutdown (SIGTERM)",
    "F": "F: I/O tasks, 1 s each, all at once in one process",
    "G": "G: scale-out, noop throughput of N worker processes on one broker",
    "L": "L: the log's cost, noop throughput at -l info beside -l warning (-f to a file)",
}


@dataclass(frozen=True)
class Column:
    title: str
    key: str
    digits: int = 0
    fixed: bool = False  # the same in every round: shown once, no range


COLUMNS: dict[str, list[Column]] = {
    "A": [
        Column("tasks", "tasks", fixed=True),
        Column("c", "concurrency", fixed=True),
        Column("tasks/s", "tasks_per_s"),
        Column("peak RSS MB", "peak_rss_mb", 1),
    ],
    "B": [
        Column("tasks", "tasks", fixed=True),
        Column("c", "concurrency", fixed=True),
        Column("run s", "run_s", 2),
        Column("ideal s", "ideal_s", 2, fixed=True),
        Column("peak concurrent", "peak_concurrent"),
        Column("peak RSS MB", "peak_rss_mb", 1),
    ],
    "C": [
        Column("tasks", "tasks", fixed=True),
        Column("rate/s", "rate", fixed=True),
        Column("p50 ms", "p50_ms", 1),
        Column("p99 ms", "p99_ms", 1),
    ],
    "D": [
        Column("messages", "messages", fixed=True),
        Column("prefetch", "prefetch", fixed=True),
        Column("messages/s", "messages_per_s"),
    ],
    "E": [
        Column("startup s", "startup_s", 2),
        Column("idle CPU %", "idle_cpu_pct", 2),
        Column("idle RSS MB", "idle_rss_mb", 1),
        Column("shutdown s", "shutdown_s", 2),
    ],
    "F": [
        Column("tasks", "tasks", fixed=True),
        Column("c", "concurrency", fixed=True),
        Column("run s", "run_s", 2),
        Column("peak concurrent", "peak_concurrent"),
        Column("peak RSS MB", "peak_rss_mb", 1),
    ],
    "G": [
        Column("tasks", "tasks", fixed=True),
        Column("c each", "concurrency", fixed=True),
        Column("N=1 tasks/s", "n1_tasks_per_s"),
        Column("N=2 tasks/s", "n2_tasks_per_s"),
        Column("N=2 / N=1", "scale_ratio", 2),
    ],
    "L": [
        Column("tasks", "tasks", fixed=True),
        Column("c", "concurrency", fixed=True),
        Column("WARNING tasks/s", "warning_tasks_per_s"),
        Column("INFO tasks/s", "info_tasks_per_s"),
        Column("INFO / WARNING", "log_ratio", 3),
    ],
}


def _num(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def spread(values: Sequence[float], digits: int) -> str:
    """``median (min-max)``; one value alone; a dash for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return _num(values[0], digits)
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{_num(mid, digits)} ({_num(low, digits)}-{_num(high, digits)})"


def status_of(rows: Sequence[dict[str, Any]]) -> str:
    counts = Counter(str(row.get("status", "?")) for row in rows)
    errors = sum(int(row.get("log_errors") or 0) for row in rows)
    logged = f"; {errors} error line(s) in worker logs" if errors else ""
    if set(counts) == {"ok"}:
        return ("ok" if len(rows) == 1 else f"ok x{len(rows)}") + logged
    parts = []
    for status, n in counts.items():
        short = status if len(status) <= 140 else status[:137] + "..."
        parts.append(short if n == 1 else f"{short} (x{n})")
    return "; ".join(parts) + logged


def table(scenario: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    """One markdown table: a line per (variant, broker, system), in the order first run."""
    columns = COLUMNS[scenario]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        key = (str(row.get("variant", "")), row["broker"], row["system"])
        groups.setdefault(key, []).append(row)
    lines = [
        f"{TITLES[scenario]}",
        "",
        "| broker | system | " + " | ".join(c.title for c in columns) + " | status |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |",
    ]
    for (_variant, broker, system), mine in groups.items():
        cells = []
        for column in columns:
            values = [float(r[column.key]) for r in mine if r.get(column.key) is not None]
            if column.fixed:
                cells.append(_num(values[0], column.digits) if values else "-")
            else:
                cells.append(spread(values, column.digits))
        lines.append(f"| {broker} | {system} | " + " | ".join(cells) + f" | {status_of(mine)} |")
    return lines


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _server_versions() -> str:
    found = []
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(REDIS_URL)
        found.append(f"Redis {client.info('server')['redis_version']}")
        client.close()
    with contextlib.suppress(Exception):
        from kombu import Connection

        with Connection(BROKERS["amqp"], connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
            props = conn.connection.server_properties
            version = props.get("version", "?")
            found.append(f"RabbitMQ {version.decode() if isinstance(version, bytes) else version}")
    return " and ".join(found) or "no broker answered"


def machine_line(rounds: int, quick: bool) -> str:
    ram = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 1024 / 1024
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    size = "--quick smoke counts (not comparable to full runs)" if quick else "full counts"
    return (
        f"Machine: {os.cpu_count()} cores, {ram:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; {versions}; "
        f"{_server_versions()} on 127.0.0.1; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{rounds} interleaved round(s); {size}."
    )


def render(
    rows: Sequence[dict[str, Any]],
    scenarios: Sequence[str],
    header: str,
    notes: Callable[[str], list[str]] | None = None,
) -> str:
    out = [header, ""]
    for scenario in scenarios:
        mine = [r for r in rows if r["scenario"] == scenario]
        if not mine:
            continue
        out += table(scenario, mine)
        if notes is not None:
            out += notes(scenario)
        out.append("")
    return "\n".join(out).rstrip() + "\n"
