from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery

from greenworker.protocol import MalformedMessage, build_task_message, decode_task_message


def test_v2_round_trip_keeps_every_field() -> None:
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    body, headers, props = build_task_message(
        "proj.add",
        [1, 2],
        {"z": 3},
        task_id="abc",
        eta=eta,
        expires=60,
        retries=2,
        soft_time_limit=5,
        time_limit=10,
        parent_id="p",
        root_id="r",
        group="g",
        origin="me",
    )
    assert headers["lang"] == "py" and headers["task"] == "proj.add" and headers["id"] == "abc"
    assert props["correlation_id"] == "abc"
    assert body[2] == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    msg = decode_task_message(list(body), headers, props)
    assert (msg.id, msg.task, msg.args, msg.kwargs) == ("abc", "proj.add", [1, 2], {"z": 3})
    assert msg.eta == eta
    assert msg.expires is not None and msg.expires > datetime.now(UTC) + timedelta(seconds=50)
    assert (msg.retries, msg.soft_time_limit, msg.time_limit) == (2, 5.0, 10.0)
    assert (msg.parent_id, msg.root_id, msg.group, msg.origin) == ("p", "r", "g", "me")
    assert msg.protocol == 2


def test_timelimit_is_hard_then_soft_as_celery_writes_it() -> None:
    celery_amqp = Celery("limits", set_as_current=False).amqp
    for build in (celery_amqp.as_task_v2, celery_amqp.as_task_v1):
        sent = build("cid", "proj.add", args=(1, 2), time_limit=10, soft_time_limit=5)
        msg = decode_task_message(sent.body, sent.headers, sent.properties)
        assert (msg.time_limit, msg.soft_time_limit) == (10.0, 5.0), build.__name__
    v2 = celery_amqp.as_task_v2("cid", "proj.add", time_limit=10, soft_time_limit=5)
    _, headers, _ = build_task_message("proj.add", soft_time_limit=5, time_limit=10)
    assert list(headers["timelimit"]) == list(v2.headers["timelimit"]) == [10, 5]


def test_root_id_defaults_to_own_id() -> None:
    _, headers, _ = build_task_message("t", task_id="x")
    assert headers["root_id"] == "x"


def test_countdown_sets_eta() -> None:
    _, headers, _ = build_task_message("t", countdown=30)
    eta = datetime.fromisoformat(headers["eta"])
    assert timedelta(seconds=29) < eta - datetime.now(UTC) <= timedelta(seconds=30)


def test_v1_message_is_converted_to_v2() -> None:
    body = {
        "task": "proj.mul",
        "id": "v1-id",
        "args": [3, 4],
        "kwargs": {},
        "retries": 1,
        "eta": "2030-01-01T00:00:00",
        "expires": None,
        "taskset": "grp",
        "utc": True,
        "callbacks": None,
        "errbacks": None,
        "timelimit": [30, None],  # Celery's order: [hard, soft]
    }
    msg = decode_task_message(body, {}, {"correlation_id": "v1-id"})
    assert msg.protocol == 1
    assert (msg.task, msg.id, msg.args, msg.retries, msg.group) == (
        "proj.mul",
        "v1-id",
        [3, 4],
        1,
        "grp",
    )
    assert msg.eta == datetime(2030, 1, 1, tzinfo=UTC)
    assert msg.time_limit == 30.0 and msg.soft_time_limit is None
    assert msg.headers["task"] == "proj.mul" and msg.headers["root_id"] == "v1-id"


@pytest.mark.parametrize(
    ("body", "headers", "fragment"),
    [
        ([[], {}, {}], {"id": "x"}, "no 'task' header"),
        ([[], {}, {}], {"task": "", "id": "x"}, "'task' must be a non-empty string"),
        ([[], {}, {}], {"task": "t"}, "'id' must be a non-empty string"),
        ({"a": 1}, {"task": "t", "id": "x"}, "body must be a list"),
        ([[], {}], {"task": "t", "id": "x"}, "body must be a list"),
        (["notalist", {}, {}], {"task": "t", "id": "x"}, "args must be a list"),
        ([[], [1], {}], {"task": "t", "id": "x"}, "kwargs must be an object"),
        ([[], {}, 5], {"task": "t", "id": "x"}, "embed must be"),
        ([[], {}, {}], {"task": "t", "id": "x", "retries": -1}, "retries"),
        ([[], {}, {}], {"task": "t", "id": "x", "eta": "tomorrow"}, "'eta' is not an ISO 8601"),
        ([[], {}, {}], {"task": "t", "id": "x", "expires": 5}, "'expires' must be an ISO"),
        ([[], {}, {}], {"task": "t", "id": "x", "timelimit": [1]}, "timelimit"),
        ([[], {}, {}], {"task": "t", "id": "x", "timelimit": ["a", 1]}, "timelimit"),
        ([[], {}, {}], {"task": "t", "id": "x", "parent_id": 7}, "'parent_id' must be"),
    ],
)
def test_malformed_messages_name_the_field(
    body: object, headers: dict[str, object], fragment: str
) -> None:
    with pytest.raises(MalformedMessage, match=fragment):
        decode_task_message(body, headers, {})


def test_an_envelope_decodes_as_kombu_decodes_it_typed_values_or_not() -> None:
    from kombu.utils.json import dumps as kombu_dumps
    from kombu.utils.json import loads as kombu_loads

    from greenworker.transport.envelope import loads_envelope

    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    plain = kombu_dumps({"body": "e30=", "headers": {"id": "a", "eta": None}}).encode()
    typed = kombu_dumps({"body": "e30=", "headers": {"id": "a", "eta": when}}).encode()
    assert b"__type__" in typed
    for raw in (plain, typed):
        assert loads_envelope(raw) == kombu_loads(raw)
    assert loads_envelope(typed)["headers"]["eta"] == when
