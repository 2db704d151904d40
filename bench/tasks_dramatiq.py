"""The benchmark contract for Dramatiq (bodies in bench/contract.py).

Dramatiq acks after the actor returns (acks late) and its default middleware stores no
results.  Its own queue name: on RabbitMQ Dramatiq declares queues with dead-letter
arguments, which would clash with the ``bench`` queue kombu declares for the others.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import redis
from dramatiq.broker import Broker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from bench import contract

QUEUE = "bench_dq"  # bench/systems.py purges it and its .DQ and .XQ


def pika_url(url: str) -> str:
    """kombu's ``amqp://host//`` (vhost ``/``) in pika's spelling, ``amqp://host/%2F``."""
    parts = urlsplit(url)
    vhost = parts.path[1:] or "/"
    return urlunsplit(parts._replace(path="/" + vhost.replace("/", "%2F")))


def make_broker(url: str) -> Broker:
    if url.startswith("redis://"):
        # worker threads ack on the broker's pool: one connection per thread at most
        pool = redis.ConnectionPool.from_url(url, max_connections=contract.broker_pool_size())
        return RedisBroker(connection_pool=pool)
    if url.startswith("amqp://"):
        return RabbitmqBroker(url=pika_url(url))
    raise ValueError(f"Dramatiq has no broker for {url}")


broker = make_broker(os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"))
dramatiq.set_broker(broker)

noop = dramatiq.actor(contract.noop, actor_name="bench.noop", queue_name=QUEUE, max_retries=0)
io = dramatiq.actor(contract.io, actor_name="bench.io", queue_name=QUEUE, max_retries=0)
latency = dramatiq.actor(
    contract.latency, actor_name="bench.latency", queue_name=QUEUE, max_retries=0
)
