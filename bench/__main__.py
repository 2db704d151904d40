"""Side by side: greenworker, Celery 5 (-P gevent), Dramatiq 2 (gevent), Huey 3 (greenlet).

    python -m bench [--scenarios A,B,C,D,E,F,G] [--systems greenworker,celery,dramatiq,huey]
                    [--brokers redis,amqp,embedded] [--repeat 3] [--quick]
                    [--tasks 20000] [--concurrency 100,1000] [--timeout S]

Brokers: Redis, RabbitMQ, and ``embedded``: greenworker's embedded default (its own LMDB
broker; the App gets no broker and a fresh data directory per run, GREENWORKER_DATA_DIR).
Only greenworker runs on embedded; the other systems get a "skipped: ..." row.

Scenarios (each on every broker the system supports):

A  20,000 noop at concurrency 100 and 1000: tasks/s (first to last completion), peak RSS
B  5,000 io(50 ms) at concurrency 500: run time (ideal 0.5 s)
C  publish-to-start latency while publishing 200 tasks/s for 10 s: p50 and p99
D  broker ceiling: a bare kombu consumer draining 20,000 Celery messages: messages/s;
   beside it greenworker's worker on 20,000 tasks that do nothing
E  startup (start to first task done), idle CPU % over 5 s, idle shutdown (SIGTERM)
F  10,000 io(1 s) at concurrency 10,000 in one process: run time, peak RSS
G  scale-out: 20,000 noop on 1 and on 2 greenworker processes (-c 100 each) on one
   broker: tasks/s (first to last completion) of each, and the ratio
L  the log's cost: 20,000 noop on greenworker at -l warning and at -l info (Celery's task
   lines, two per task), each with -f to a file: tasks/s of each, and the ratio

Each system pre-publishes with its own client.  Runs are interleaved (each round runs
every system for a scenario) and repeated; the tables show median (min-max).  Rows are
appended to bench/results/results.jsonl; the tables are printed and written to
docs/bench-latest.txt.  Worker logs go to bench/results/logs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from bench import report, systems
from bench.proc import raise_nofile
from bench.scenarios import QUICK, Runner, Sizes
from bench.systems import ROOT

SCENARIOS = ("A", "B", "C", "D", "E", "F", "G", "L")
RESULTS = ROOT / "bench" / "results"
LATEST = ROOT / "docs" / "bench-latest.txt"


@dataclass
class Case:
    scenario: str
    variant: str
    system: str
    broker: str
    run: Callable[[], dict[str, Any]] | None  # None: unsupported, ``skip`` says why
    skip: str | None = None


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="default: all")
    parser.add_argument("--systems", default=",".join(systems.SYSTEMS))
    parser.add_argument("--brokers", default=",".join(systems.BROKERS))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--tasks", type=int, help="A's, G's and L's noop tasks and D's messages")
    parser.add_argument(
        "--concurrency",
        help="A's concurrencies, comma-separated (the first one is used by C and E)",
    )
    parser.add_argument("--timeout", type=float, help="per-run timeout in seconds")
    args = parser.parse_args(argv)
    args.scenarios = [s.upper() for s in _csv(args.scenarios)]
    args.systems = _csv(args.systems)
    args.brokers = _csv(args.brokers)
    for name, values, known in (
        ("scenario", args.scenarios, SCENARIOS),
        ("broker", args.brokers, tuple(systems.BROKERS)),
        (
            "system",
            args.systems,
            (*systems.SYSTEMS, "greenworker-E", "greenworker-base", "greenworker-celery"),
        ),
    ):
        for value in values:
            if value not in known:
                parser.error(f"unknown {name} {value!r} (known: {', '.join(known)})")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    if args.tasks:
        sizes = dataclasses.replace(
            sizes, a_tasks=args.tasks, d_messages=args.tasks, g_tasks=args.tasks, l_tasks=args.tasks
        )
    if args.concurrency:
        levels = tuple(int(c) for c in _csv(args.concurrency))
        sizes = dataclasses.replace(
            sizes, a_concurrency=levels, c_concurrency=levels[0], d_prefetch=levels[0] * 4
        )
    return sizes


def cases(scenario: str, args: argparse.Namespace, runner: Runner) -> list[Case]:
    sizes = runner.sizes
    found: list[Case] = []

    def each(
        variant: str, run: Callable[[str, str], dict[str, Any]], only: tuple[str, ...] = ()
    ) -> None:
        for broker in args.brokers:
            for system in args.systems:
                if only and system not in only:
                    continue
                why = systems.unsupported(system.removesuffix("-E"), broker)
                bound = None if why else functools.partial(run, system, broker)
                found.append(Case(scenario, variant, system, broker, bound, why))

    if scenario == "A":
        for c in sizes.a_concurrency:
            each(f"c={c}", functools.partial(_run_a, runner, c))
    elif scenario == "B":
        each("", functools.partial(_run_io, runner, "B"))
    elif scenario == "C":
        each("", runner.run_c)
    elif scenario == "D":
        for broker in args.brokers:
            found.append(
                Case("D", "", "kombu-bare", broker, functools.partial(runner.run_d, broker))
            )
        # beside it, greenworker's worker with tasks that do nothing: its own ceiling
        each("", runner.run_d_worker, only=("greenworker",))
    elif scenario == "E":
        each("", functools.partial(_run_e, runner))
    elif scenario == "F":
        each("", functools.partial(_run_io, runner, "F"))
    elif scenario == "G":  # greenworker's own scale-out: its worker commands only
        each("", runner.run_g, only=systems.GREENWORKER_SYSTEMS)
    elif scenario == "L":  # greenworker's own log lines
        each("", runner.run_l, only=systems.GREENWORKER_SYSTEMS)
    return found


def _run_a(runner: Runner, concurrency: int, system: str, broker: str) -> dict[str, Any]:
    return runner.run_a(system, broker, runner.sizes.a_tasks, concurrency)


def _run_io(runner: Runner, scenario: str, system: str, broker: str) -> dict[str, Any]:
    sizes = runner.sizes
    if scenario == "B":
        return runner.run_io("B", system, broker, sizes.b_tasks, sizes.b_concurrency, sizes.b_ms)
    return runner.run_io("F", system, broker, sizes.f_tasks, sizes.f_concurrency, sizes.f_ms)


def _run_e(runner: Runner, system: str, broker: str) -> dict[str, Any]:
    return runner.run_e(system, broker, runner.sizes.c_concurrency)


def notes(sizes: Sizes) -> Callable[[str], list[str]]:
    def for_scenario(scenario: str) -> list[str]:
        text = {
            "B": f"Ideal: {sizes.b_tasks} / {sizes.b_concurrency} x {sizes.b_ms} ms.",
            "C": f"Concurrency {sizes.c_concurrency}; {sizes.c_seconds:g} s of publishing.",
            "D": "kombu-bare: no worker, kombu alone, no_ack=False, an ack per message. "
            "greenworker: its worker on tasks that do nothing (-c 100, acks late).",
            "E": f"Concurrency {sizes.c_concurrency}; idle CPU over {sizes.e_idle:g} s.",
            "F": "Target for greenworker at full size: <= 3 s and <= 250 MB.",
            "G": (
                f"{sizes.g_tasks} noop; each process -c {sizes.g_concurrency}, its own -n "
                "(and -S on embedded); greenworker systems only. Ratio: N=2 / N=1 per round."
            ),
            "L": (
                f"{sizes.l_tasks} noop at -c {sizes.l_concurrency}, -f to a file at each "
                "level; greenworker systems only. Ratio: INFO / WARNING per round "
                "(the goal: at least 0.85)."
            ),
        }.get(scenario)
        return ["", text] if text else []

    return for_scenario


def _on_sigterm(_signum: int, _frame: Any) -> NoReturn:
    raise SystemExit(143)  # run the finally blocks: the workers' groups are killed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    raise_nofile()  # inherited by the slow server and the workers (which also raise it)
    sizes = sizes_from(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "logs"
    shutil.rmtree(logs, ignore_errors=True)  # the logs of this run only
    runner = Runner(sizes, logs, timeout=args.timeout)
    rows: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        for scenario in args.scenarios:
            todo = cases(scenario, args, runner)
            for round_no in range(1, args.repeat + 1):
                for case in todo:  # interleaved: each round runs every system
                    if case.run is None:
                        if round_no == 1:  # one row says why
                            rows.append(record(case, {"status": case.skip}, 0, args, started))
                        continue
                    try:
                        result = case.run()
                    except Exception as exc:
                        result = {"status": f"error: {type(exc).__name__}: {exc}"}
                    rows.append(record(case, result, round_no, args, started))
    except KeyboardInterrupt:
        print("interrupted: reporting what finished", file=sys.stderr)
    finally:
        runner.stop_slow_server()
    text = report.render(
        rows, args.scenarios, report.machine_line(args.repeat, args.quick), notes(sizes)
    )
    print()
    print(text, end="")
    LATEST.write_text(text)


def record(
    case: Case, result: dict[str, Any], round_no: int, args: argparse.Namespace, started: str
) -> dict[str, Any]:
    row = {
        "scenario": case.scenario,
        "variant": case.variant,
        "system": case.system,
        "broker": case.broker,
        "round": round_no,
        "quick": args.quick,
        "run": started,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **result,
    }
    print(json.dumps(row), flush=True)
    with (RESULTS / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
