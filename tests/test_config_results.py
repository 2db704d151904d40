"""Settings layers, app loading, and the LMDB / memory result backends."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from greenworker import App
from greenworker.backends import backend_from_url
from greenworker.backends.base import build_meta, exception_from_meta, exception_to_meta
from greenworker.backends.lmdb import LMDBBackend
from greenworker.config import ConfigError, Settings
from greenworker.exceptions import ImproperlyConfigured, TaskError, TimeoutError
from greenworker.loader import load_app

from .conftest import ROOT, run_cli


def test_settings_defaults_follow_celery_names() -> None:
    s = Settings()
    assert s.task_default_queue == "celery"
    assert s.accept_content == ["json"]
    assert s.worker_prefetch_multiplier == 4
    assert s.task_acks_late is True  # greenworker's at-least-once default


def test_layers_dict_then_env_then_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREENWORKER_WORKER_CONCURRENCY", "250")
    monkeypatch.setenv("GREENWORKER_TASK_ACKS_LATE", "false")
    monkeypatch.setenv("GREENWORKER_ACCEPT_CONTENT", "json, msgpack")
    monkeypatch.setenv("GREENWORKER_BROKER_TRANSPORT_OPTIONS", '{"visibility_timeout": 60}')
    monkeypatch.setenv("GREENWORKER_RESULT_EXPIRES", "none")
    app = App("x", config={"worker_concurrency": 10, "task_default_queue": "q1"})
    assert app.conf.worker_concurrency == 250  # env beats the dict
    assert app.conf.task_default_queue == "q1"
    assert app.conf.task_acks_late is False
    assert app.conf.accept_content == ["json", "msgpack"]
    assert app.conf.broker_transport_options == {"visibility_timeout": 60}
    assert app.conf.result_expires is None


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREENWORKER_WORKER_CONCURRENCY", "lots")
    with pytest.raises(ConfigError, match="GREENWORKER_WORKER_CONCURRENCY"):
        App("x")


def test_config_from_module_object_and_strict_dict() -> None:
    module = types.ModuleType("gw_test_settings")
    module.broker_url = "memory://"  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        app = App("x")
        app.config_from_object("gw_test_settings")
        assert app.conf.broker_url == "memory://"
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(ConfigError, match="unknown setting"):
        App("x", config={"colour": "blue"})
    with pytest.raises(ConfigError, match="worker_concurrency must be int"):
        App("x", config={"worker_concurrency": "ten"})
    with pytest.raises(ConfigError, match="cannot import config module"):
        App("x", config="no_such_settings_module")


def test_the_environment_still_wins_over_config_from_object(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://from-env:6379/0")
    monkeypatch.setenv("GREENWORKER_WORKER_CONCURRENCY", "33")
    app = App("x")
    app.config_from_object(
        {"broker_url": "memory://", "worker_concurrency": 5, "task_default_queue": "q"}
    )
    assert app.conf.broker_url == "redis://from-env:6379/0"
    assert app.conf.worker_concurrency == 33
    assert app.conf.task_default_queue == "q"
    app.conf.worker_concurrency = 2  # a direct assignment still has the last word
    assert app.conf.worker_concurrency == 2


def test_config_from_object_reads_a_namespace_as_celery_does() -> None:
    """Django's way: ``config_from_object("django.conf:settings", namespace="CELERY")``."""
    module = types.ModuleType("gw_django_like_settings")
    exec(
        textwrap.dedent(
            """
            DEBUG = True
            broker_url = "redis://not-under-the-namespace"
            CELERY_BROKER_URL = "memory://"
            CELERY_TASK_DEFAULT_QUEUE = "from-django"

            def route(name, *args, **kwargs):
                return "routed"

            CELERY_TASK_ROUTES = route  # a function, and the value of a setting

            class Settings:
                CELERY_WORKER_CONCURRENCY = 7

            settings = Settings()
            """
        ),
        module.__dict__,
    )
    sys.modules[module.__name__] = module
    try:
        app = App("x")
        app.config_from_object(module, namespace="CELERY")
        assert app.conf.broker_url == "memory://"
        assert app.conf.task_default_queue == "from-django"
        assert app.conf.task_routes is module.route
        for path in ("gw_django_like_settings:settings", "gw_django_like_settings.settings"):
            other = App("x")
            other.config_from_object(path, namespace="CELERY", force=True)
            assert other.conf.worker_concurrency == 7
    finally:
        del sys.modules[module.__name__]
    app = App("x")
    app.config_from_object({"CELERY_TASK_ACKS_LATE": False, "other": 1}, namespace="CELERY_")
    assert app.conf.task_acks_late is False
    with pytest.raises(ConfigError, match=r"brokr_url \(did you mean broker_url\?\)"):
        app.config_from_object({"CELERY_BROKR_URL": "x"}, namespace="CELERY")


def test_config_from_object_silent_ignores_a_path_that_does_not_import() -> None:
    app = App("x", config={"worker_concurrency": 3})
    app.config_from_object("no_such_settings_module", silent=True)
    assert app.conf.worker_concurrency == 3
    with pytest.raises(ConfigError, match="cannot import config module 'no_such_settings_module'"):
        app.config_from_object("no_such_settings_module")
    with pytest.raises(ConfigError, match="'os' has no attribute 'no_such_attribute'"):
        app.config_from_object("os:no_such_attribute")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_settings_greenworker_does_not_use_are_warned_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A module's names greenworker does not read are each named once, not dropped."""
    module = types.ModuleType("gw_celery_style_settings")
    exec(
        textwrap.dedent(
            """
            import os
            from datetime import timedelta

            broker_url = "memory://"
            task_routes = {"proj.slow": {"queue": "slow"}}
            result_extended = True
            broker_connection_retry_on_startup = True
            CELERY_BROKER_URL = "redis://elsewhere"
            CELERY_TASK_ROUTES = {}
            CELERYD_CONCURRENCY = 10
            CELERY_SOMETHING_NEW = 1
            BROKER_URL = "redis://elsewhere"
            ENABLE_UTC = True
            base_url = "memory://"  # a helper: not a setting of anyone's
            DEBUG = True  # the module's own constant
            _private = 1

            def helper():
                return timedelta(seconds=1)

            class Router:
                pass
            """
        ),
        module.__dict__,
    )
    with caplog.at_level(logging.WARNING, logger="greenworker.config"):
        app = App("x", config=module)
    assert app.conf.broker_url == "memory://"
    assert sorted(_warnings(caplog)) == [
        "setting BROKER_URL is not used by greenworker, which reads lower-case names: "
        "write broker_url; ignored",
        "setting CELERYD_CONCURRENCY is not used by greenworker, which reads lower-case "
        "names: write worker_concurrency; ignored",
        "setting CELERY_BROKER_URL is not used by greenworker, which reads lower-case "
        "names: write broker_url, or load with namespace='CELERY'; ignored",
        "setting CELERY_SOMETHING_NEW is not used by greenworker; ignored",
        "setting CELERY_TASK_ROUTES is not used by greenworker, which reads lower-case "
        "names: write task_routes, or load with namespace='CELERY'; ignored",
        "setting ENABLE_UTC is not used by greenworker (enable_utc is a Celery setting it "
        "does not implement); ignored",
        "setting base_url is not a greenworker or Celery setting; ignored",
        "setting result_extended is not used by greenworker (a Celery setting); ignored",
    ]
    assert app.conf.task_routes == {"proj.slow": {"queue": "slow"}}
    assert app.conf.broker_connection_retry_on_startup is True  # a Celery setting it honours

    # the same Celery names in a dict or keywords warn too, instead of raising
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="greenworker.config"):
        settings = Settings()
        settings.update({"task_queues": {}, "CELERY_BROKER_URL": "x"}, result_extended=True)
    assert len(_warnings(caplog)) == 3


def test_a_misspelt_setting_raises_with_did_you_mean() -> None:
    module = types.ModuleType("gw_typo_settings")
    module.brokr_url = "memory://"  # type: ignore[attr-defined]
    module.worker_concurency = 5  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as raised:
        App("x", config=module)
    assert str(raised.value) == (
        "unknown setting(s): brokr_url (did you mean broker_url?), "
        "worker_concurency (did you mean worker_concurrency?)"
    )
    with pytest.raises(ConfigError, match=r"task_acks_lat \(did you mean task_acks_late\?\)"):
        App("x", config={"task_acks_lat": True})
    with pytest.raises(ConfigError, match="did you mean timezone"):
        Settings().update(timezon="UTC")
    # nothing applied when anything is wrong
    settings = Settings()
    with pytest.raises(ConfigError):
        settings.update({"worker_concurrency": 7, "brokr_url": "memory://"})
    assert settings.worker_concurrency == 100


def test_celery_environment_names_are_read_after_greenworkers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://celery-broker:6379/0")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://celery-results:6379/1")
    app = App("x", config={"broker_url": "memory://"})
    assert app.conf.broker_url == "redis://celery-broker:6379/0"  # env beats the config
    assert app.conf.result_backend == "redis://celery-results:6379/1"
    assert not app.embedded
    monkeypatch.setenv("GREENWORKER_BROKER_URL", "amqp://ours")
    assert App("x").conf.broker_url == "amqp://ours"  # GREENWORKER_* first
    monkeypatch.setenv("CELERY_BROKER_READ_URL", "redis://reader")
    with caplog.at_level(logging.WARNING, logger="greenworker.config"):
        App("x")
    assert _warnings(caplog) == [
        "environment variable CELERY_BROKER_READ_URL is not used by greenworker, which has "
        "one broker URL (broker_url: GREENWORKER_BROKER_URL or CELERY_BROKER_URL); ignored"
    ]


def test_cli_names_a_misspelt_setting_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "typoapp.py").write_text(
        "from greenworker import App\n"
        "class Config:\n"
        "    brokr_url = 'memory://'\n"
        "app = App('typoapp', config=Config)\n"
    )
    result = run_cli(
        "-A", "typoapp", "status", cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert lines[0].endswith("unknown setting(s): brokr_url (did you mean broker_url?)")


def test_embedded_default_paths(tmp_path: Path) -> None:
    app = App("x", data_dir=str(tmp_path))
    assert app.embedded and app.broker_url == "lmdb://localhost/"
    assert app.result_backend_url == "lmdb://" + str(tmp_path / "results")
    options = app.transport_options()
    assert options["data_dir"] == str(tmp_path)
    other = App("y", broker="redis://127.0.0.1:6379/0")
    assert not other.embedded and other.result_backend_url is None


def test_load_app_forms() -> None:
    assert load_app("tests.cliapp").main == "cliapp"
    assert load_app("tests.cliapp:app").main == "cliapp"
    with pytest.raises(ImproperlyConfigured):
        load_app(":app")


def test_unknown_backend_scheme_is_a_clear_error() -> None:
    with pytest.raises(ImproperlyConfigured, match="unsupported result backend 'mongodb'"):
        backend_from_url("mongodb://x", expires=None)


def test_lmdb_backend_store_get_forget_and_purge(tmp_path: Path) -> None:
    backend = LMDBBackend(str(tmp_path / "r"), expires=60)
    backend.store("a", build_meta("a", "SUCCESS", [1, 2]))
    old = build_meta("b", "SUCCESS", 1)
    old["date_done"] = "2000-01-01T00:00:00+00:00"
    backend.store("b", old)
    meta = backend.get("a")
    assert meta is not None and (meta["status"], meta["result"]) == ("SUCCESS", [1, 2])
    assert backend.purge_expired() == 1
    assert backend.get("b") is None and backend.get("a") is not None
    backend.forget("a")
    assert backend.get("a") is None
    # the same directory opened again in this process shares one environment
    again = LMDBBackend(str(tmp_path / "r"), expires=60)
    again.store("c", build_meta("c", "SUCCESS", None))
    assert backend.get("c") is not None


def test_async_result_timeout_and_pending(tmp_path: Path) -> None:
    app = App("x", data_dir=str(tmp_path))
    result = app.AsyncResult("never-sent")
    assert result.state == "PENDING" and not result.ready()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        result.get(timeout=0.2)
    assert time.monotonic() - started < 1.0


def test_exception_round_trip() -> None:
    class Custom(Exception):
        pass

    assert isinstance(exception_from_meta(exception_to_meta(KeyError("k"))), KeyError)
    rebuilt = exception_from_meta(
        {"exc_type": "Gone", "exc_message": ["x"], "exc_module": "not.imported.here"}
    )
    assert isinstance(rebuilt, TaskError) and type(rebuilt).__name__ == "Gone"
    assert rebuilt.args == ("x",)
    meta = exception_to_meta(Custom(object()))
    assert meta["exc_message"][0].startswith("<object")  # made JSON-safe


def test_lmdb_map_grows_instead_of_failing(tmp_path: Path) -> None:
    from greenworker import lmdbenv

    env = lmdbenv.open_env(str(tmp_path / "small"))
    env.set_mapsize(64 * 1024)
    backend = LMDBBackend(str(tmp_path / "small"), expires=None)
    blob = "x" * 10_000
    for i in range(50):  # ~500 KB into a 64 KB map
        backend.store(f"id-{i}", build_meta(f"id-{i}", "SUCCESS", blob))
    assert env.info()["map_size"] > 64 * 1024
    meta = backend.get("id-49")
    assert meta is not None and meta["result"] == blob


#: Runs greenworker's command as if the redis package were not installed.
WITHOUT_REDIS = "import sys; sys.modules['redis'] = None; from greenworker.cli import main; main()"
MISSING_REDIS = "pip install 'greenworker[redis]'"


@pytest.mark.parametrize(
    "command",
    [
        [],  # the worker
        ["call", "cliapp.add", "--args", "[1, 2]"],
        ["inspect", "ping"],
    ],
)
def test_cli_without_redis_says_which_extra_to_install(hub: str, command: list[str]) -> None:
    options = ["-A", "tests.cliapp", "-P", hub, "-b", "redis://127.0.0.1:6379/0"]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_REDIS, *options, *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: the Redis broker needs the redis package, which is not installed: " + MISSING_REDIS
    ]


def test_app_without_redis_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis: ImportError
    app = App("x", broker="redis://127.0.0.1:6379/0", backend="redis://127.0.0.1:6379/1")
    with pytest.raises(ImproperlyConfigured, match=r"broker and result backend need .*\[redis\]"):
        app.connection()
    with pytest.raises(ImproperlyConfigured, match=r"\[redis\]"):
        app.Worker()
    App("y", broker="memory://").check_client_libraries()  # nothing to need


def test_app_without_packaging_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu's Redis transport imports packaging, which only kombu's redis extra brings."""
    monkeypatch.setitem(sys.modules, "packaging", None)
    app = App("x", broker="redis://127.0.0.1:6379/0", backend="redis://127.0.0.1:6379/1")
    with pytest.raises(ImproperlyConfigured, match=r"broker needs the packaging package"):
        app.connection()
    App("y", broker="memory://", backend="redis://127.0.0.1:6379/1").check_client_libraries()


def test_the_redis_extra_brings_what_kombus_redis_extra_needs() -> None:
    """A fresh ``pip install 'greenworker[redis]'`` must import kombu's Redis transport."""
    import configparser
    import re
    from importlib.metadata import requires

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r.strip(), maxsplit=1)[0].lower() for r in requirements}

    kombu_redis = [r for r in requires("kombu") or [] if re.search(r"extra *== *.redis.", r)]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    ours = setup["options.extras_require"]["redis"].strip().splitlines()
    assert names(kombu_redis) and names(kombu_redis) <= names(ours)
