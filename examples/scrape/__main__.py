"""The demo: crawl a local site with greenworker on the embedded default.

    python -m examples.scrape [--pages 200] [--concurrency 100] [--embedded]

Starts the site on 127.0.0.1, starts a worker (``greenworker -A
examples.scrape`` in a subprocess, or in this process with ``--embedded``),
sends the root page, follows the result tree (each result names the tasks it
queued), prints progress and a summary, and stops the worker with SIGTERM.
Exits 0 only if every page was fetched exactly once, every broken link the
site has on purpose was met as a 404 (expected, and counted apart), and
nothing else failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.scrape",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pages", type=int, default=200, help="pages on the local site")
    parser.add_argument("--concurrency", type=int, default=100, help="worker concurrency")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per response")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="run the worker inside this process instead of a subprocess",
    )
    parser.add_argument("--data-dir", help="embedded default's data directory [a fresh temp dir]")
    parser.add_argument(
        "--hub",
        choices=("gevent", "eventlet"),
        default=os.environ.get("GREENWORKER_TEST_HUB", "gevent"),
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from greenworker import green

    green.patch(args.hub)  # before anything below opens a socket

    from examples.scrape import tasks
    from examples.scrape.site import Site, missing_pages

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="greenworker-scrape-")
    tasks.app.conf.data_dir = data_dir
    print(f"data dir {data_dir} · hub {args.hub} · concurrency {args.concurrency}")
    print(
        f"every tenth page links to a page that does not exist: "
        f"{missing_pages(args.pages)} 404s are expected"
    )
    worker = None
    proc = None
    with Site(pages=args.pages, latency=args.latency) as site:
        if args.embedded:
            worker = tasks.app.Worker(concurrency=args.concurrency)
            worker.start()
        else:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "greenworker",
                    "-A",
                    "examples.scrape",
                    "-P",
                    args.hub,
                    "-c",
                    str(args.concurrency),
                    "--data-dir",
                    data_dir,
                    "-l",
                    "warning",
                ],
            )
        started = time.monotonic()
        summary = walk(tasks.app, tasks.crawl.delay(site.url).id, args.pages)
        elapsed = time.monotonic() - started
        hits = site.hits
    exit_code = 0
    if worker is not None:
        worker.stop()
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(30)
        print(f"worker exited with status {exit_code}")
    tasks.app.close()
    if not args.data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
    pages, not_found, errors, total = summary
    broken = missing_pages(args.pages)
    print(
        f"summary: {pages} pages, {not_found} not found (expected: the site has {broken} "
        f"broken links on purpose), {errors} errors, {total} tasks in {elapsed:.2f}s "
        f"({total / elapsed:.0f} tasks/s; site served {hits} requests)"
    )
    ok = pages == args.pages and not_found == broken and errors == 0 and exit_code == 0
    print("OK" if ok else "FAILED: the crawl missed pages or the worker did not stop cleanly")
    return 0 if ok else 1


def walk(app: object, root_id: str, expected: int) -> tuple[int, int, int, int]:
    """Follow the result tree from ``root_id``; return (pages, 404s, other errors, tasks)."""
    from greenworker import App

    assert isinstance(app, App)
    pending = [root_id]
    pages = not_found = errors = done = 0
    step = max(expected // 5, 1)
    while pending:
        result = app.AsyncResult(pending.pop()).get(timeout=60)
        done += 1
        if result.get("error") == "HTTP 404":
            not_found += 1  # a broken link the site has on purpose
        elif "error" in result:
            errors += 1
            print(f"  error: {result['url']}: {result['error']}")
        else:
            pages += 1
            if pages % step == 0:
                print(f"  {pages:5d} pages  {not_found:4d} not found (expected)  {done:5d} tasks")
        pending.extend(result["children"])
    return pages, not_found, errors, done


if __name__ == "__main__":
    sys.exit(main())
