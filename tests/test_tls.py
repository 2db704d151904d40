"""TLS to the broker and the result backend (``amqps://``, ``rediss://``, Celery's
``broker_use_ssl`` and ``redis_backend_use_ssl``), against servers that speak only TLS
with a certificate from a CA the test makes: a redis-server of the test's own and a TLS
front to the local RabbitMQ."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from greenworker.config import ConfigError, redis_tls_options

from .conftest import IN_CI, ROOT, _need_broker, run_cli, run_python, start_cli, wait_for_output
from .tls import Certificates, TLSFront, TLSRedis

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Servers:
    certificates: Certificates
    redis_url: str  # rediss://, only TLS
    amqp_url: str  # amqps:// in front of the local RabbitMQ


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    missing = [tool for tool in ("openssl", "redis-server") if shutil.which(tool) is None]
    if missing:
        message = f"{' and '.join(missing)} not installed"
        if IN_CI:
            pytest.fail(message + " (CI=true: integration tests must run)")
        pytest.skip(message)
    _need_broker(5672, "RabbitMQ")
    directory = tmp_path_factory.mktemp("tls")
    certificates = Certificates.make(directory / "certs")
    redis_server = TLSRedis(directory / "redis", certificates)
    front = TLSFront(5672, certificates)
    redis_server.start()
    front.start()
    try:
        yield Servers(
            certificates, redis_server.url, f"amqps://guest:guest@127.0.0.1:{front.port}//"
        )
    finally:
        front.stop()
        redis_server.stop()


def environment(
    servers: Servers, broker: str, queue: str, ca: Path | None = None
) -> dict[str, str]:
    return {
        "TLS_BROKER": broker,
        "TLS_BACKEND": servers.redis_url,
        "TLS_CA": str(ca or servers.certificates.ca),
        "TLS_QUEUE": queue,
    }


def run_client(code: str, env: dict[str, str]) -> str:
    done = run_python(code, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def stop(worker: subprocess.Popen[str]) -> str:
    worker.terminate()
    out = worker.communicate(timeout=30)[0]
    assert worker.returncode == 0, out
    return out


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_greenworker_app_over_tls(hub: str, servers: Servers, broker: str) -> None:
    url = servers.redis_url if broker == "redis" else servers.amqp_url
    env = environment(servers, url, f"gwtest.tls.{uuid.uuid4().hex[:8]}")
    worker = start_cli("-A", "tests.tlsapp", "worker", "-P", hub, "-n", "tls@test", env=env)
    try:
        seen = wait_for_output(worker, "ready")
        scheme = "rediss" if broker == "redis" else "amqps"
        assert f"on {scheme}://" in seen, seen
        if broker == "redis":
            assert "(native Redis consumer)" in seen, seen
        out = run_client(
            "from tests.tlsapp import add; print(add.delay(2, 3).get(timeout=20))", env
        )
        assert out.strip() == "5"  # the result came back through the TLS Redis
        pinged = run_cli("-A", "tests.tlsapp", "inspect", "ping", env=env)
        assert pinged.returncode == 0 and "tls@test: OK" in pinged.stdout, pinged.stderr
    finally:
        stop(worker)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_celery_project_over_tls(hub: str, servers: Servers, broker: str) -> None:
    url = servers.redis_url if broker == "redis" else servers.amqp_url
    env = environment(servers, url, f"gwtest.tls.{uuid.uuid4().hex[:8]}")
    worker = start_cli(
        "-A", "tests.tlsapp:celery", "worker", "-P", hub, "-n", "tlscelery@test", env=env
    )
    try:
        wait_for_output(worker, "ready")
        out = run_client(
            "from tests.tlsapp import mul; print(mul.delay(2, 3).get(timeout=20))", env
        )
        assert out.strip() == "6"  # sent by Celery's client, result read by Celery's backend
        pinged = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.tlsapp:celery", "inspect", "ping"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert "tlscelery@test: OK" in pinged.stdout, pinged.stdout + pinged.stderr
    finally:
        stop(worker)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_broker_certificate_the_ca_does_not_sign_is_one_line(
    servers: Servers, broker: str, tmp_path: Path
) -> None:
    other = Certificates.make(tmp_path / "other")
    url = servers.redis_url if broker == "redis" else servers.amqp_url
    env = environment(servers, url, "gwtest.tls.refused", ca=other.ca)
    status = run_cli("-A", "tests.tlsapp", "status", env=env)
    assert status.returncode == 1
    lines = status.stderr.strip().splitlines()
    assert len(lines) == 1 and "CERTIFICATE_VERIFY_FAILED" in lines[0], status.stderr
    assert "Traceback" not in status.stderr


def test_tls_settings_as_celery_names_them() -> None:
    from greenworker import App

    assert redis_tls_options(None) is None and redis_tls_options(False) is None
    assert redis_tls_options(True) == {}
    assert redis_tls_options({"ssl_cert_reqs": "required"}) == {"ssl_cert_reqs": "required"}
    app = App("tlsconf", broker="redis://127.0.0.1:1/0", config={"broker_use_ssl": True})
    try:
        from greenworker.transport.redis_layout import broker_client

        client = broker_client(app)  # redis:// with the setting on: TLS, as kombu does
        assert client.connection_pool.connection_class.__name__ == "SSLConnection"
        client.close()
    finally:
        app.close()
    with pytest.raises(ConfigError, match="broker_use_ssl"):
        App("tlsbad", broker="memory://", config={"broker_use_ssl": "yes"})
