"""The apps of the TLS tests: a greenworker App and a Celery app whose broker and result
backend are the URLs in ``TLS_BROKER`` and ``TLS_BACKEND``, trusting only the test's CA
(``TLS_CA``)."""

from __future__ import annotations

import os
import ssl
from typing import Any

from celery import Celery

from greenworker import App

BROKER = os.environ.get("TLS_BROKER", "rediss://127.0.0.1:6380/0")
BACKEND = os.environ.get("TLS_BACKEND", "rediss://127.0.0.1:6380/0")
CA = os.environ.get("TLS_CA", "ca.pem")


def broker_tls(url: str) -> dict[str, Any]:
    """``broker_use_ssl`` as Celery's docs give it: py-amqp's keys for RabbitMQ,
    redis-py's for Redis."""
    if url.startswith("amqps://"):
        return {"ca_certs": CA, "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "127.0.0.1"}
    return {"ssl_ca_certs": CA, "ssl_cert_reqs": ssl.CERT_REQUIRED}


BACKEND_TLS = {"ssl_ca_certs": CA, "ssl_cert_reqs": ssl.CERT_REQUIRED}

app = App(
    "tlsapp",
    broker=BROKER,
    backend=BACKEND,
    config={
        "broker_use_ssl": broker_tls(BROKER),
        "redis_backend_use_ssl": BACKEND_TLS,
        "task_default_queue": os.environ.get("TLS_QUEUE", "tls"),
    },
)


@app.task(name="tls.add")
def add(x: int, y: int) -> int:
    return x + y


celery = Celery("tlscelery", broker=BROKER, backend=BACKEND, set_as_current=False)
celery.conf.broker_use_ssl = broker_tls(BROKER)
celery.conf.redis_backend_use_ssl = BACKEND_TLS
celery.conf.task_default_queue = os.environ.get("TLS_QUEUE", "tls")


@celery.task(name="tls.mul", shared=False)  # type: ignore[untyped-decorator]
def mul(x: int, y: int) -> int:
    return x * y
