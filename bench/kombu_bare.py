"""The broker ceiling: a bare kombu consumer that acks each message and does nothing else.

    python -m bench.kombu_bare BROKER_URL COUNT [--prefetch 400] [--data-dir DIR]

Consumes the ``bench`` queue (declared as greenworker and Celery declare it) with
no_ack=False and basic.qos(prefetch) like greenworker's consumer (concurrency x 4), acks
each message unread, and stops after COUNT.  Prints one JSON line with the time from the
first to the last message and messages/s.  With --data-dir the broker is greenworker's
embedded one (``lmdb://localhost/``, its store in DIR), through kombu alone as well.
"""

from __future__ import annotations

import argparse
import json
import time

from kombu import Connection, Consumer, Exchange, Message, Queue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("broker")
    parser.add_argument("count", type=int)
    parser.add_argument("--prefetch", type=int, default=400)
    parser.add_argument("--queue", default="bench")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--data-dir", help="the embedded broker's data directory")
    args = parser.parse_args()
    options = {}
    if args.data_dir:
        import greenworker.transport.lmdb_transport  # noqa: F401  (registers lmdb://)

        options["data_dir"] = args.data_dir
    queue = Queue(args.queue, Exchange(args.queue, type="direct"), routing_key=args.queue)
    received = 0
    first: float | None = None
    last: float | None = None

    def on_message(message: Message) -> None:
        nonlocal received, first, last
        message.ack()
        received += 1
        last = time.monotonic()
        if first is None:
            first = last

    deadline = time.monotonic() + args.timeout
    with Connection(args.broker, transport_options=options) as conn:
        channel = conn.channel()
        consumer = Consumer(channel, queues=[queue], on_message=on_message, no_ack=False)
        consumer.qos(prefetch_count=args.prefetch)
        consumer.consume()
        while received < args.count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass
        consumer.cancel()
    seconds = (last - first) if first is not None and last is not None else 0.0
    print(
        json.dumps(
            {
                "messages": received,
                "seconds": round(seconds, 3),
                "messages_per_s": round(received / seconds, 1) if seconds else None,
            }
        )
    )


if __name__ == "__main__":
    main()
