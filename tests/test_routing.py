"""task_routes (Celery's semantics), queue types and where a message goes: on memory://
for what publishing shows, on Redis and RabbitMQ for routed tasks a worker consumes."""

from __future__ import annotations

import re
import sys
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.entity import Exchange, Queue
from kombu.message import Message

from greenworker import App, Task
from greenworker.client.canvas import chain
from greenworker.client.routes import Router
from greenworker.config import ConfigError, Settings

from .conftest import delete_queues_and_close, take


def task_of(message: Message | None) -> str | None:
    return None if message is None else str(message.headers["task"])


@pytest.fixture
def routed(queue_name: str) -> str:
    """A second queue of the test's own, for routes to name."""
    return f"{queue_name}.routed"


def memory(queue_name: str, **config: Any) -> App:
    return App(
        "routing",
        broker="memory://",
        backend=f"memory://{uuid.uuid4().hex}",
        config={"task_default_queue": queue_name, **config},
    )


# ---------------------------------------------------------------- the router alone


def route_of(setting: Any, name: str, **options: Any) -> dict[str, Any] | None:
    return Router(setting).route(name, (), {}, options, None)


def test_a_dict_routes_exact_names_globs_and_regexes() -> None:
    routes = {
        "feed.fetch": "exact",
        "feed.*": {"queue": "feeds", "routing_key": "feed.rk"},
        re.compile(r"^img\.(resize|crop)$"): {"queue": "images", "priority": 3},
    }
    assert route_of(routes, "feed.fetch") == {"queue": "exact"}  # exact before a glob
    assert route_of(routes, "feed.parse") == {"queue": "feeds", "routing_key": "feed.rk"}
    assert route_of(routes, "img.crop") == {"queue": "images", "priority": 3}
    assert route_of(routes, "img.rotate") is None
    assert route_of(None, "feed.fetch") is None


def test_a_list_asks_each_router_in_order_and_the_first_route_wins() -> None:
    seen: list[tuple[Any, ...]] = []

    def by_argument(
        name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> str | None:
        seen.append((name, tuple(args), dict(kwargs), dict(options), task))
        return "big" if kwargs.get("size", 0) > 10 else None

    class OldStyle:
        def route_for_task(self, name: str, args: Any = None, kwargs: Any = None) -> Any:
            return {"queue": "old"} if name.startswith("old.") else None

    router = Router(
        [
            [("a.*", "first"), ("a.b*", "never: the patterns keep their order")],
            by_argument,
            OldStyle,  # a class is instantiated
            OldStyle(),
            {"*": "catch-all"},
        ]
    )
    assert router.route("a.b", (), {}, {}, None) == {"queue": "first"}
    assert router.route("x", (1,), {"size": 11}, {"queue": None}, None) == {"queue": "big"}
    assert seen[-1] == ("x", (1,), {"size": 11}, {"queue": None}, None)
    assert router.route("old.one", (), {}, {}, None) == {"queue": "old"}
    assert router.route("anything", (), {}, {}, None) == {"queue": "catch-all"}


def test_a_router_named_by_its_path_is_imported_at_first_use() -> None:
    router = Router(["gw_test_lazy_routers:route", "gw_test_lazy_routers.Routes"])
    module = types.ModuleType("gw_test_lazy_routers")  # exists only after the Router

    def route(name: str, *args: Any, **kwargs: Any) -> str | None:
        return "by-function" if name == "f" else None

    class Routes:
        def route_for_task(self, name: str, *args: Any) -> str:
            return "by-class"

    module.route = route  # type: ignore[attr-defined]
    module.Routes = Routes  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        assert router.route("f", (), {}, {}, None) == {"queue": "by-function"}
        assert router.route("g", (), {}, {}, None) == {"queue": "by-class"}
    finally:
        del sys.modules[module.__name__]
    missing = Router("no_such_module_of_routers.route")
    with pytest.raises(ConfigError, match="cannot import router 'no_such_module_of_routers"):
        missing.route("f", (), {}, {}, None)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"t": 5}, r"the route for 't' gave int 5: a route is a queue name or a dict"),
        ({"t.*": {"queue": "q", "colour": "red"}}, r"the route for 't.\*' has colour"),
        ({"t": {"queue": 7}}, r"queue must be a name \(str\), not int"),
        ({"t": {"queue": "q", "priority": 300}}, "priority must be an int from 0 to 255"),
        ([42], r"an entry is int 42: expected a dict"),
        ({3: "q"}, r"key 3 is not a task name"),
        (lambda *a, **k: 1.5, r"router <lambda> for 't' gave float 1.5"),
    ],
)
def test_a_bad_route_is_a_config_error_naming_it(setting: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        route_of(setting, "t")


def test_task_routes_from_the_environment_is_json_or_a_routers_path() -> None:
    settings = Settings()
    settings.update_from_env({"GREENWORKER_TASK_ROUTES": '{"feed.*": "feeds"}'})
    assert settings.task_routes == {"feed.*": "feeds"}
    settings.update_from_env({"GREENWORKER_TASK_ROUTES": "proj.routers:route"})
    assert settings.task_routes == "proj.routers:route"
    with pytest.raises(ConfigError, match="GREENWORKER_TASK_ROUTES"):
        settings.update_from_env({"GREENWORKER_TASK_ROUTES": "{not json"})


# ---------------------------------------------------------------- where messages go


def test_precedence_is_celerys_call_then_task_then_route_then_default(
    queue_name: str, routed: str
) -> None:
    app = memory(queue_name, task_routes={"prec.*": routed})
    own = f"{queue_name}.own"

    @app.task(name="prec.routed")
    def by_route() -> None: ...

    @app.task(name="prec.own", queue=own)
    def with_queue() -> None: ...

    @app.task(name="unrouted")
    def unrouted() -> None: ...

    try:
        by_route.delay()
        assert task_of(take(app, routed)) == "prec.routed"
        with_queue.delay()  # the task's own queue beats the route, as in Celery
        assert task_of(take(app, own)) == "prec.own"
        app.send_task("prec.own")  # by name: the registered task's options still apply
        assert task_of(take(app, own)) == "prec.own"
        by_route.apply_async(queue=f"{queue_name}.call")  # the call beats both
        with_queue.apply_async(queue=f"{queue_name}.call")
        assert task_of(take(app, f"{queue_name}.call")) == "prec.routed"
        assert task_of(take(app, f"{queue_name}.call")) == "prec.own"
        unrouted.delay()
        app.send_task("prec.not_registered_here")
        assert task_of(take(app, queue_name)) == "unrouted"
        assert task_of(take(app, routed)) == "prec.not_registered_here"
        assert take(app, queue_name) is None
    finally:
        app.close()


def test_exchange_and_routing_key_publish_there_with_the_queue_bound(
    queue_name: str, routed: str
) -> None:
    exchange = f"{queue_name}.media"
    app = memory(
        queue_name,
        task_routes={
            "media.video": {"queue": routed, "exchange": exchange, "routing_key": "media.video"},
            "media.*": {"routing_key": "media.other"},  # a key alone: the default queue's
        },
    )
    try:
        app.send_task("media.video")
        message = take(app, routed)
        assert message is not None
        assert message.delivery_info == {"exchange": exchange, "routing_key": "media.video"}
        app.send_task("media.audio")
        message = take(app, queue_name)
        assert task_of(message) == "media.audio"
        assert message is not None and message.delivery_info["routing_key"] == "media.other"
    finally:
        app.close()


def test_a_route_naming_only_an_exchange_publishes_to_it(queue_name: str) -> None:
    """Celery's topic-exchange routing: the message goes to whatever is bound there."""
    app = memory(
        queue_name,
        task_routes={
            "event.*": {
                "exchange": f"{queue_name}.events",
                "exchange_type": "topic",
                "routing_key": "event.user",
            }
        },
    )
    bound = Queue(
        f"{queue_name}.listener",
        Exchange(f"{queue_name}.events", type="topic", durable=True),
        routing_key="event.#",
    )
    try:
        with app.connection() as conn:
            bound(conn.default_channel).declare()
        app.send_task("event.signup")
        message = take(app, bound.name)
        assert task_of(message) == "event.signup"
        assert take(app, queue_name) is None  # no default queue for an exchange's route
    finally:
        app.close()


def test_priorities_follow_the_same_precedence(queue_name: str) -> None:
    app = memory(queue_name, task_routes={"pri.routed": {"priority": 4}}, task_default_priority=1)

    @app.task(name="pri.routed")
    def routed_task() -> None: ...

    @app.task(name="pri.own", priority=7)
    def own() -> None: ...

    @app.task(name="pri.plain")
    def plain() -> None: ...

    def sent_priority() -> Any:
        message = take(app, queue_name)
        assert message is not None
        return message.properties["priority"]

    try:
        routed_task.delay()
        assert sent_priority() == 4
        own.delay()
        assert sent_priority() == 7
        own.apply_async(priority=9)
        assert sent_priority() == 9
        plain.delay()
        assert sent_priority() == 1  # task_default_priority
        with pytest.raises(ConfigError, match="priority must be an int from 0 to 255"):
            plain.apply_async(priority=256)
    finally:
        app.close()


def test_a_route_set_after_sending_is_used_for_the_next_message(
    queue_name: str, routed: str
) -> None:
    app = memory(queue_name)
    try:
        app.send_task("late.route")
        app.conf.task_routes = {"late.*": routed}
        app.send_task("late.route")
        assert task_of(take(app, queue_name)) == task_of(take(app, routed)) == "late.route"
    finally:
        app.close()


def test_canvas_steps_links_and_retries_are_routed(queue_name: str, routed: str) -> None:
    """The worker sends chain steps, callbacks and retries through send_task: routed too."""
    app = memory(queue_name, task_routes={"canvas.routed_*": routed})

    @app.task(name="canvas.first")
    def first(x: int) -> int:
        return x + 1

    @app.task(name="canvas.routed_step", bind=True)
    def routed_step(self: Task, x: int) -> list[Any]:
        return [x, self.request.delivery_info.get("routing_key")]

    @app.task(name="canvas.routed_retry", bind=True, default_retry_delay=0)
    def routed_retry(self: Task) -> list[Any]:
        if self.request.retries == 0:
            raise self.retry()
        return [self.request.retries, self.request.delivery_info.get("routing_key")]

    worker = app.Worker(concurrency=5, queues=[queue_name, routed])
    worker.start()
    try:
        assert chain(first.s(1), routed_step.s()).apply_async().get(timeout=10) == [2, routed]
        callback = routed_step.s()
        callback_id = callback.freeze()
        head = first.s(10)
        head.link(callback)
        head.apply_async()
        assert app.AsyncResult(callback_id).get(timeout=10) == [11, routed]
        assert routed_retry.delay().get(timeout=10) == [1, routed]
    finally:
        worker.stop(timeout=5)
        app.close()


# ---------------------------------------------------------------- queue types


def arguments(queue: Queue) -> Any:
    return queue.as_dict()["queue_arguments"]


def test_queue_types_are_declared_as_celery_declares_them(queue_name: str) -> None:
    app = memory(queue_name, task_default_queue_type="quorum", task_queue_max_priority=10)
    assert arguments(app.queue()) == {"x-queue-type": "quorum", "x-max-priority": 10}
    # other queues follow task_create_missing_queue_type, as Celery's missing queues do
    assert arguments(app.queue("other")) == {"x-max-priority": 10}
    app.conf.task_create_missing_queue_type = "quorum"
    assert arguments(app.queue("other")) == {"x-queue-type": "quorum", "x-max-priority": 10}
    assert arguments(memory(queue_name).queue()) is None
    with pytest.raises(ConfigError, match="task_default_queue_type must be 'classic' or 'quorum'"):
        memory(queue_name, task_default_queue_type="stream")
    with pytest.raises(ConfigError, match="GREENWORKER_TASK_CREATE_MISSING_QUEUE_TYPE"):
        Settings().update_from_env({"GREENWORKER_TASK_CREATE_MISSING_QUEUE_TYPE": "lazy"})


# ---------------------------------------------------------------- real brokers


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    return redis_url if request.param == "redis" else str(request.getfixturevalue("amqp_url"))


@pytest.fixture
def routed_app(broker_url: str, redis_url: str, queue_name: str, routed: str) -> Iterator[App]:
    exchange = f"{queue_name}.ex"
    app = App(
        "routing",
        broker=broker_url,
        backend=redis_url,
        config={
            "task_default_queue": queue_name,
            "worker_hostname": f"{queue_name}@test",
            "task_routes": [
                {"routed.plain": routed},
                {"routed.keyed": {"queue": routed, "exchange": exchange, "routing_key": "k.1"}},
            ],
        },
    )
    yield app
    with app.connection() as conn:
        channel = conn.default_channel
        if broker_url.startswith("amqp"):
            channel.exchange_delete(exchange)
        else:
            channel.client.delete(f"_kombu.binding.{exchange}")
    delete_queues_and_close(app, queue_name, routed)


def test_routed_tasks_reach_a_worker_on_that_queue_only(routed_app: App, routed: str) -> None:
    app = routed_app

    @app.task(name="routed.plain", bind=True)
    def plain(self: Task, x: int) -> list[Any]:
        return [x, self.request.delivery_info.get("routing_key")]

    @app.task(name="routed.keyed", bind=True, default_retry_delay=0)
    def keyed(self: Task, x: int) -> list[Any]:
        if self.request.retries == 0:
            raise self.retry()  # back through the exchange it came by
        return [x, self.request.retries, self.request.delivery_info.get("routing_key")]

    worker = app.Worker(concurrency=5, queues=[routed])  # not the default queue
    worker.start()
    try:
        assert plain.delay(1).get(timeout=20) == [1, routed]
        assert keyed.delay(2).get(timeout=20) == [2, 1, "k.1"]
        assert [plain.delay(n).get(timeout=20)[0] for n in range(3)] == [0, 1, 2]  # native path
    finally:
        worker.stop(timeout=10)


def test_quorum_queues_greenworker_declares_take_celerys_messages(
    amqp_url: str, queue_name: str
) -> None:
    """A greenworker client and a Celery client with the same queue type publish to the
    queues greenworker declared (no PRECONDITION_FAILED); a classic declaration is
    refused, so the queues are quorum ones."""
    from amqp.exceptions import PreconditionFailed
    from celery import Celery

    other = f"{queue_name}.other"
    settings = {
        "task_default_queue": queue_name,
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
    }
    app = App("quorum", broker=amqp_url, config=settings)
    celery_app = Celery("quorum", broker=amqp_url, set_as_current=False)
    celery_app.conf.update(settings)
    try:
        app.send_task("q.one")
        app.send_task("q.two", queue=other)
        celery_app.send_task("q.three")
        celery_app.send_task("q.four", queue=other)
        app.send_task("q.five")
        with app.connection() as conn:
            channel = conn.default_channel
            assert channel.queue_declare(queue=queue_name, passive=True).message_count == 3
            assert channel.queue_declare(queue=other, passive=True).message_count == 2
            with pytest.raises(PreconditionFailed, match="x-queue-type"):
                Queue(queue_name, Exchange(queue_name), queue_name)(conn.channel()).declare()
    finally:
        celery_app.close()
        delete_queues_and_close(app, queue_name, other)
