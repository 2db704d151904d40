"""A greenworker App's failing task under sentry-sdk initialised with its defaults; prints
the events a local ``before_send`` recorded, as JSON (a process of its own: sentry-sdk
patches logging for the rest of the process).

python tests/sentry_app.py gevent|eventlet
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any


def main() -> int:
    from greenworker import green

    green.patch("gevent" if sys.argv[1] == "gevent" else "eventlet")
    import sentry_sdk

    from greenworker import App

    events: list[dict[str, Any]] = []

    def keep_here(event: Any, hint: dict[str, Any]) -> None:
        events.append(event)
        return None  # recorded locally; nothing is sent

    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        before_send=keep_here,
        send_client_reports=False,
        auto_session_tracking=False,
    )
    app = App(
        "sentryapp",
        broker="memory://",
        backend=f"memory://{uuid.uuid4().hex}",
        config={"task_default_queue": f"sentry-{uuid.uuid4().hex[:8]}"},
    )

    @app.task(name="sentryapp.fail")
    def fail() -> None:
        raise ValueError("boom")

    worker = app.Worker(concurrency=2)
    worker.start()
    try:
        result = fail.delay()
        result.get(timeout=10, propagate=False)
    finally:
        worker.stop(timeout=5)
        app.close()
    print(
        json.dumps(
            [
                {
                    "exception": event.get("exception", {}).get("values", []),
                    "logger": event.get("logger"),
                    "message": (event.get("logentry") or {}).get("formatted")
                    or (event.get("logentry") or {}).get("message"),
                }
                for event in events
            ],
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
