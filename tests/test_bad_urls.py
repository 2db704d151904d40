"""A broker or result backend URL that cannot be used -- a scheme no transport or backend
has, a malformed host or port -- is one line on stderr naming the setting and the URL
(its password masked) and exit status 2, before anything connects: for the worker
(both URLs) and the client commands (the broker's only), for a greenworker App and a
Celery app alike (:meth:`greenworker.App.check_urls`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from greenworker import App
from greenworker.celery.app import CeleryApp
from greenworker.config import ConfigError

from .conftest import ROOT

# (URL, what the line says after "bad SETTING 'MASKED URL': ")
BAD_BROKERS = [
    ("nosuch://user:s3cret@x/0", "No such transport: nosuch"),
    ("redis://user:s3cret@host:notaport/0", "Port could not be cast to integer value"),
    ("amqp://guest:s3cret@[::1//", "Invalid IPv6 URL"),
]
BAD_BACKENDS = [
    ("nosuch://user:s3cret@x/0", "nosuch"),
    ("redis://:s3cret@host:99999/0", "Port out of range 0-65535"),
]
# the greenworker App takes -b; the Celery app has the URL in its own configuration
APPS = {"gw": "tests.retryapp:gw_app", "celery": "tests.retryapp:celery_app"}
CLIENT_COMMANDS = [
    ["status"],
    ["inspect", "ping"],
    ["call", "retryapp.add"],
    ["purge", "-f"],
    ["control", "shutdown"],
    ["beat"],
]


def _masked(url: str) -> str:
    return url.replace("s3cret", "**")


def _start(
    kind: str, args: list[str], broker: str, backend: str | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, "RETRYAPP_BROKER": "memory://"}
    cli = ["-A", APPS[kind]]
    if kind == "gw":
        cli += ["-b", broker] + (["--result-backend", backend] if backend else [])
    else:
        env["RETRYAPP_BROKER"] = broker
        if backend:
            env["RETRYAPP_BACKEND"] = backend
    return subprocess.Popen(
        [sys.executable, "-m", "greenworker", *cli, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _one_line_exit_2(proc: subprocess.Popen[str], line: str, fragment: str) -> None:
    out, err = proc.communicate(timeout=50)
    assert proc.returncode == 2, (proc.args, out, err)
    assert err.startswith(line) and fragment in err, (proc.args, err)
    assert len(err.splitlines()) == 1, (proc.args, err)  # no traceback, no retry
    assert "s3cret" not in err + out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", APPS)
def test_a_bad_broker_url_is_one_line_and_exit_2_for_the_worker_and_every_client_command(
    kind: str, hub: str, tmp_path: Path
) -> None:
    runs = []
    for url, fragment in BAD_BROKERS:
        for args in [["worker", "-P", hub], *CLIENT_COMMANDS]:
            runs.append((_start(kind, args, url), url, fragment))
    for proc, url, fragment in runs:
        _one_line_exit_2(proc, f"Error: bad broker_url {_masked(url)!r}: ", fragment)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", APPS)
def test_a_bad_result_backend_url_stops_the_worker_not_the_client_commands(
    kind: str, hub: str
) -> None:
    workers = [
        (_start(kind, ["worker", "-P", hub], "memory://", url), url, fragment)
        for url, fragment in BAD_BACKENDS
    ]
    # a client command needs no result backend: purge runs
    purges = [_start(kind, ["purge", "-f"], "memory://", url) for url, _ in BAD_BACKENDS]
    for proc, url, fragment in workers:
        _one_line_exit_2(proc, f"Error: bad result_backend {_masked(url)!r}: ", fragment)
    for proc in purges:
        out, err = proc.communicate(timeout=50)
        assert proc.returncode == 0, (proc.args, out, err)
        assert out.startswith("purged 0 message(s)"), out


def test_check_urls_in_process_and_at_worker_build() -> None:
    """The one check behind the command line: ``check_urls`` and ``app.Worker()``."""
    app = App("bad", broker="nosuch://x", backend="memory://", set_as_current=False)
    with pytest.raises(ConfigError, match=r"^bad broker_url 'nosuch://x': No such transport"):
        app.check_urls(backend=False)
    with pytest.raises(ConfigError, match="bad broker_url"):
        app.Worker()
    fine = App("ok", broker="memory://", backend="rpc://", set_as_current=False)
    fine.check_urls(backend=False)  # a client: the backend is not its concern
    with pytest.raises(ConfigError, match=r"^bad result_backend 'rpc://': unsupported result"):
        fine.check_urls()
    App("embedded", set_as_current=False).check_urls()  # the embedded default: nothing to check
    celery_app = Celery("bad", broker="redis://h:x/0", backend="nosuch://", set_as_current=False)
    wrapped = CeleryApp(celery_app)
    with pytest.raises(ConfigError, match=r"^bad broker_url 'redis://h:x/0': Port could not"):
        wrapped.check_urls(backend=False)
    celery_app.conf.broker_url = "memory://"
    wrapped.conf.broker_url = None
    wrapped.check_urls(backend=False)
    with pytest.raises(ConfigError, match=r"^bad result_backend 'nosuch://': Celery has no"):
        wrapped.check_urls()
