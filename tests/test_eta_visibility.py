"""ETA tasks held longer than Redis' visibility_timeout run exactly once (two workers)."""

from __future__ import annotations

from collections import Counter

import pytest

from greenworker import App, Worker, green


def _run_two_workers(redis_url: str, queue_name: str, refresh: bool) -> Counter[str]:
    app = App(
        "eta",
        broker=redis_url,
        backend=redis_url,
        config={
            "task_default_queue": queue_name,
            "broker_transport_options": {"visibility_timeout": 1.5},
        },
    )
    runs: Counter[str] = Counter()
    done = green.new_event()

    @app.task(name="eta.mark")
    def mark(tag: str) -> None:
        runs[tag] += 1
        if tag == "long":
            green.sleep(3.5)  # longer than the visibility timeout too
        if sum(runs.values()) >= 2:
            done.set()

    workers: list[Worker] = [app.Worker(concurrency=5, hostname=f"w{i}@test") for i in (1, 2)]
    if not refresh:
        for w in workers:
            w.consumer.refresh_visibility = lambda messages: 0  # type: ignore[method-assign]
    for w in workers:
        w.start()
    sweeping = True

    def sweep() -> None:
        # What every kombu Redis consumer (a Celery worker too) does now and then:
        # put back unacked messages older than the visibility timeout.
        with app.connection() as conn:
            channel = conn.default_channel
            while sweeping:
                channel.qos.restore_visible(num=1000, interval=1)
                green.sleep(0.25)

    sweeper = green.spawn(sweep)
    try:
        mark.apply_async(("eta",), countdown=4.0)
        mark.delay("long")
        assert done.wait(20)
        green.sleep(2.0)  # room for a duplicate to show up, had one been delivered
        for w in workers:
            w.join(timeout=20, fail_fast=True)
    finally:
        sweeping = False
        sweeper.join(5)
        for w in workers:
            w.stop(timeout=10)
        with app.connection() as conn:
            app.queue(queue_name)(conn.default_channel).delete()
            conn.default_channel.client.delete("unacked", "unacked_index")
        app.close()
    return runs


@pytest.mark.timeout(90)
def test_held_eta_and_long_task_run_exactly_once(redis_url: str, queue_name: str) -> None:
    assert _run_two_workers(redis_url, queue_name, refresh=True) == {"eta": 1, "long": 1}


@pytest.mark.timeout(90)
def test_control_without_refresh_kombu_redelivers(redis_url: str, queue_name: str) -> None:
    """The failure the refresh prevents, shown on the same setup (Celery's known duplicate)."""
    runs = _run_two_workers(redis_url, queue_name, refresh=False)
    assert runs["eta"] + runs["long"] > 2
