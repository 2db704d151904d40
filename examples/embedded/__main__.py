"""A WSGI service with a worker embedded: requests and tasks on one hub, one process.

    python -m examples.embedded [--hub gevent|eventlet] [--port 8000] [--data-dir DIR]

The program patches itself, configures its own logging and installs its own
SIGTERM/SIGINT handler -- as a real service does.  It starts the worker in
background greenlets on the embedded default (no broker server), serves HTTP,
and on its own shutdown stops the server and then the worker (warm).

    GET  /enqueue?url=...&n=3   send n tasks that fetch url; returns their ids
    GET  /result?id=...         a task's state and result
    GET  /stats                 the worker's stats (pool, counters)
    GET  /healthz               "ok"

Try it: ``curl 'localhost:8000/enqueue?url=http://localhost:8000/healthz&n=3'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.embedded",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hub", choices=("gevent", "eventlet"), default="gevent")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--data-dir", default=".greenworker-embedded")
    return parser.parse_args()


def make_wsgi_app(app: Any, worker: Any) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    from examples.embedded.tasks import fetch

    def respond(start: StartResponse, status: str, body: Any) -> list[bytes]:
        data = json.dumps(body).encode()
        start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    def wsgi(environ: Environ, start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if path == "/healthz":
            return respond(start, "200 OK", "ok")
        if path == "/enqueue":
            url, count = query.get("url"), query.get("n", "1")
            if not url or not count.isdigit() or not 1 <= int(count) <= 1000:
                return respond(start, "400 Bad Request", {"error": "need url and n in 1..1000"})
            ids = [fetch.delay(url).id for _ in range(int(count))]
            return respond(start, "202 Accepted", {"ids": ids})
        if path == "/result":
            task_id = query.get("id")
            if not task_id:
                return respond(start, "400 Bad Request", {"error": "need id"})
            result = app.AsyncResult(task_id)
            state = result.state
            value = result.result if state == "SUCCESS" else None
            return respond(start, "200 OK", {"id": task_id, "state": state, "result": value})
        if path == "/stats":
            return respond(start, "200 OK", worker.stats())
        return respond(start, "404 Not Found", {"error": f"no route {path}"})

    return wsgi


def serve(hub: str, wsgi: Any, port: int) -> tuple[Any, int, Callable[[], None]]:
    """Start the hub's own WSGI server in the background; return (server, port, stop)."""
    if hub == "gevent":
        from gevent.pywsgi import WSGIServer

        server = WSGIServer(("127.0.0.1", port), wsgi, log=None)
        server.start()
        return server, server.server_port, server.stop
    import eventlet
    import eventlet.wsgi

    sock = eventlet.listen(("127.0.0.1", port))
    thread = eventlet.spawn(eventlet.wsgi.server, sock, wsgi, log_output=False)

    def stop() -> None:
        thread.kill()
        sock.close()

    return thread, sock.getsockname()[1], stop


def main() -> int:
    args = parse_args()
    # 1. The program patches itself, first -- the worker never does.
    if args.hub == "gevent":
        from gevent import monkey

        monkey.patch_all()
        from gevent.event import Event
    else:
        import eventlet

        eventlet.monkey_patch()
        from eventlet.event import Event as _OneShot

        class Event:  # type: ignore[no-redef]  # the tiny subset used below
            def __init__(self) -> None:
                self._ev = _OneShot()

            def set(self) -> None:
                if not self._ev.ready():
                    self._ev.send(True)

            def wait(self) -> None:
                self._ev.wait()

    # 2. Its own logging: the worker logs to greenworker.* and leaves this alone.
    logging.basicConfig(level=logging.INFO, format="service %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("service")

    from examples.embedded.tasks import app

    app.conf.data_dir = args.data_dir
    worker = app.Worker(concurrency=100)
    worker.start()  # background greenlets; no signal handlers, no logging changes

    _server, port, stop_server = serve(args.hub, make_wsgi_app(app, worker), args.port)
    log.info("serving on http://127.0.0.1:%d (hub %s, pid %d)", port, args.hub, os.getpid())

    # 3. Its own shutdown: a handler that only sets an event.
    shutdown = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: shutdown.set())
    shutdown.wait()

    log.info("shutting down: server first, then the worker")
    stop_server()
    worker.stop(timeout=10)
    app.close()
    log.info("stopped; the worker ran %d task(s)", sum(worker.state.total.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
