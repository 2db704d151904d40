"""The broker ceiling: a bare kombu consumer that acks each message and does nothing else.

    python -m bench.kombu_bare BROKER_URL COUNT [--prefetch 400]

Consumes the ``bench`` queue (declared as greenworker and Celery declare it) with
no_ack=False and basic.qos(prefetch) like greenworker's consumer (concurrency x 4), acks
each message unread, and stops after COUNT.  Prints one JSON line with the time from the
first to the last message and messages/s.
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
    args = parser.parse_args()
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
    with Connection(args.broker) as conn:
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
