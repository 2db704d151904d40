"""Huey's consumer on gevent, the way Huey's docs prescribe for ``-k greenlet``.

    python -m bench.huey_gevent bench.tasks_huey.huey -k greenlet -w 100

The process is monkeypatched before huey (or the task module) is imported.
"""

from gevent import monkey

monkey.patch_all()

from huey.bin.huey_consumer import consumer_main  # noqa: E402

if __name__ == "__main__":
    consumer_main()
