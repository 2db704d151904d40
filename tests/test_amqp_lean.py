"""The lean AMQP delivery path: its decoders against py-amqp's, its frame handling,
and deliveries from a real RabbitMQ against what py-amqp and kombu make of them."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from amqp.exceptions import FrameSyntaxError, UnexpectedFrame
from amqp.serialization import decode_properties_basic, loads

from greenworker.transport.amqp_lean import (
    LeanDelivery,
    LeanMessage,
    decode_properties,
    decode_table,
)

# ---------------------------------------------------------------- generated tables


def _short(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def _long(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def _text(rng: random.Random) -> bytes:
    """Text, sometimes not UTF-8 (py-amqp falls back to bytes), sometimes a lone
    surrogate (which ``surrogatepass`` lets through)."""
    pick = rng.random()
    if pick < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    if pick < 0.15:
        return "a\ud800b".encode("utf-8", "surrogatepass")
    alphabet = "abcxyz_-.:é€😀 "
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20))).encode()


def _value(rng: random.Random, depth: int) -> bytes:
    kinds = "StVIlLFAdfDxbBUusiT"
    if depth > 3:
        kinds = "StVIlLdfDxbBUusiT"
    kind = rng.choice(kinds)
    letter = kind.encode()
    if kind == "S":
        return letter + _long(_text(rng))
    if kind == "t":
        return letter + bytes([rng.choice([0, 1, 2, 255])])
    if kind == "V":
        return letter
    if kind == "I":
        return letter + struct.pack(">i", rng.randrange(-(2**31), 2**31))
    if kind in "lL":
        return letter + struct.pack(">q", rng.randrange(-(2**63), 2**63))
    if kind == "F":
        return letter + _table(rng, depth + 1)
    if kind == "A":
        return letter + _long(b"".join(_value(rng, depth + 1) for _ in range(rng.randrange(5))))
    if kind == "d":
        return letter + struct.pack(">d", rng.choice([rng.uniform(-1e300, 1e300), 0.5, -0.0]))
    if kind == "f":
        return letter + struct.pack(">f", rng.uniform(-1e30, 1e30))
    if kind == "D":
        return letter + struct.pack(">Bi", rng.randrange(0, 12), rng.randrange(-(2**31), 2**31))
    if kind == "x":
        return letter + _long(bytes(rng.randrange(256) for _ in range(rng.randrange(10))))
    if kind == "b":
        return letter + struct.pack(">b", rng.randrange(-128, 128))
    if kind == "B":
        return letter + struct.pack(">B", rng.randrange(256))
    if kind in "Us":
        return letter + struct.pack(">h", rng.randrange(-(2**15), 2**15))
    if kind == "u":
        return letter + struct.pack(">H", rng.randrange(2**16))
    if kind == "i":
        return letter + struct.pack(">I", rng.randrange(2**32))
    assert kind == "T"
    return letter + struct.pack(">Q", rng.randrange(0, 253402300799))  # up to year 9999


def _table(rng: random.Random, depth: int = 0) -> bytes:
    entries = b"".join(
        _short(_text(rng)[:255]) + _value(rng, depth) for _ in range(rng.randrange(0, 8))
    )
    return _long(entries)


def _same(ours: Any, theirs: Any) -> bool:
    """Equal values of equal types (repr tells bytes from str and NaN from NaN)."""
    return repr(ours) == repr(theirs)


def _outcome(decode: Callable[[], Any]) -> str:
    """What ``decode`` returns, or the type of what it raises (a short string that is
    not UTF-8 is an error for both decoders)."""
    try:
        return repr(decode())
    except Exception as exc:
        return type(exc).__name__


def test_generated_tables_decode_as_py_amqp_decodes_them() -> None:
    rng = random.Random(17)
    for _ in range(3000):
        raw = b"\x01\x02" + _table(rng) + b"tail"
        ours, end = decode_table(raw, 2)
        (theirs,), their_end = loads("F", raw, 2)
        assert _same(ours, theirs), raw
        assert end == their_end == len(raw) - 4


def test_celery_headers_written_by_py_amqp_decode_as_py_amqp_decodes_them() -> None:
    from amqp.serialization import dumps

    headers = {
        "lang": "py",
        "task": "proj.tasks.add",
        "id": "1d2c0a3e-0b7e-4c4a-9a8f-0e6e9e6c1a11",
        "shadow": None,
        "eta": "2026-12-02T13:00:00+00:00",
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 3,
        "timelimit": [None, 30],
        "root_id": "1d2c0a3e",
        "parent_id": None,
        "argsrepr": "(1, 2)",
        "kwargsrepr": "{}",
        "origin": "gen1@host",
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {"a": [1, "b", True]},
        "big": 2**40,
        "price": Decimal("12.345"),
        "when": datetime(2026, 12, 2, 13, 0, 1),
        "ratio": 0.25,
    }
    raw = dumps("F", [headers])
    ours, _ = decode_table(raw, 0)
    (theirs,), _ = loads("F", raw, 0)
    assert _same(ours, theirs)
    assert ours["timelimit"] == [None, 30] and ours["price"] == Decimal("12.345")


def test_an_unknown_field_type_is_py_amqps_frame_syntax_error() -> None:
    raw = _long(_short(b"k") + b"Z")
    with pytest.raises(FrameSyntaxError, match="Unknown value in table: 'Z'"):
        decode_table(raw, 0)
    with pytest.raises(FrameSyntaxError, match="Unknown value in table: 'Z'"):
        loads("F", raw, 0)


_SHORTS = ("content_type", "content_encoding")
_AFTER = (
    ("delivery_mode", "o"),
    ("priority", "o"),
    ("correlation_id", "s"),
    ("reply_to", "s"),
    ("expiration", "s"),
    ("message_id", "s"),
    ("timestamp", "T"),
    ("type", "s"),
    ("user_id", "s"),
    ("app_id", "s"),
    ("cluster_id", "s"),
)


def _properties(rng: random.Random) -> bytes:
    flags = 0
    parts = []
    for bit, _name in zip((0x8000, 0x4000), _SHORTS, strict=True):
        if rng.random() < 0.6:
            flags |= bit
            parts.append(_short("application/jsön".encode()[: rng.randrange(20)]))
    if rng.random() < 0.6:
        flags |= 0x2000
        parts.append(_table(rng))
    for bit, (_name, kind) in zip(range(12, 1, -1), _AFTER, strict=True):
        if rng.random() < 0.5:
            flags |= 1 << bit
            if kind == "o":
                parts.append(bytes([rng.randrange(256)]))
            elif kind == "T":
                parts.append(struct.pack(">Q", rng.randrange(2**64)))
            else:
                parts.append(_short("x-é".encode() * rng.randrange(5)))
    return struct.pack(">H", flags) + b"".join(parts)


def test_generated_properties_decode_as_py_amqp_decodes_them() -> None:
    rng = random.Random(60)
    for _ in range(3000):
        raw = _properties(rng)
        (flags,) = struct.unpack_from(">H", raw, 0)
        theirs = _outcome(lambda: decode_properties_basic(raw, 0)[0])  # noqa: B023
        assert _outcome(lambda: decode_properties(flags, raw, 2)) == theirs, raw  # noqa: B023


# ---------------------------------------------------------------- frame handling


@dataclass
class FakeChannel:
    channel_id: int = 1
    is_closing: bool = False
    auto_decode: bool = True  # py-amqp's default: a body with an encoding becomes text
    callbacks: dict[str, Any] = field(default_factory=lambda: {"ctag": object()})
    rejected: list[tuple[int, bool]] = field(default_factory=list)

    def basic_reject(self, tag: int, requeue: bool) -> None:
        self.rejected.append((tag, requeue))


class FakeConnection:
    """What LeanDelivery uses of a py-amqp connection: its frame handler and counter."""

    def __init__(self) -> None:
        self.bytes_recv = 0
        self.passed: list[tuple[int, int, bytes]] = []

    def on_inbound_frame(self, frame: tuple[int, int, bytes]) -> bool:
        self.passed.append(frame)
        return True


class NoLock:
    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


def deliver_frame(tag: int, redelivered: bool, ctag: str = "ctag") -> bytes:
    return (
        b"\x00\x3c\x00\x3c"
        + _short(ctag.encode())
        + struct.pack(">QB", tag, int(redelivered))
        + _short(b"ex")
        + _short(b"rk")
    )


def header_frame(size: int, properties: bytes) -> bytes:
    return struct.pack(">HHQ", 60, 0, size) + properties


def _lean(
    channel: FakeChannel | None = None,
) -> tuple[LeanDelivery, FakeConnection, list[LeanMessage], FakeChannel]:
    connection = FakeConnection()
    channel = channel or FakeChannel()
    got: list[LeanMessage] = []
    lean = LeanDelivery(connection, channel, got.append, {"application/json"}, NoLock(), None)
    return lean, connection, got, channel


def _props(priority: int) -> bytes:
    from amqp.serialization import dumps

    headers: bytes = dumps("F", [{"id": "t1", "task": "x"}])
    return (
        struct.pack(">H", 0x8000 | 0x4000 | 0x2000 | 0x0800)
        + _short(b"application/json")
        + _short(b"utf-8")
        + headers
        + bytes([priority])
    )


def test_a_delivery_becomes_one_message_with_kombus_values() -> None:
    lean, connection, got, channel = _lean()
    assert lean.on_frame((1, 1, deliver_frame(7, True))) is False
    assert lean.on_frame((2, 1, header_frame(2, _props(priority=9)))) is False
    assert lean.on_frame((3, 1, b"{}")) is True
    (message,) = got
    assert message.delivery_info == {
        "consumer_tag": "ctag",
        "delivery_tag": 7,
        "redelivered": True,
        "exchange": "ex",
        "routing_key": "rk",
    }
    assert message.delivery_tag == 7
    assert message.properties["priority"] == 9
    assert message.headers == {"id": "t1", "task": "x"}
    assert (message.content_type, message.content_encoding) == ("application/json", "utf-8")
    assert message.decode() == {}
    assert message.channel is channel and not message.acknowledged
    assert connection.passed == [] and connection.bytes_recv == 3


def test_a_body_split_across_frames_is_joined() -> None:
    lean, _, got, _ = _lean()
    body = b'{"n": "' + b"x" * 300000 + b'"}'
    lean.on_frame((1, 1, deliver_frame(1, False)))
    lean.on_frame((2, 1, header_frame(len(body), _props(priority=0))))
    for start in range(0, len(body), 131064):
        lean.on_frame((3, 1, body[start : start + 131064]))
    (message,) = got
    assert message.body == body.decode()  # utf-8, as py-amqp's channel gives it
    assert message.delivery_info["redelivered"] is False


def test_an_empty_body_ends_with_its_header() -> None:
    lean, _, got, _ = _lean()
    lean.on_frame((1, 1, deliver_frame(1, False)))
    assert lean.on_frame((2, 1, header_frame(0, struct.pack(">H", 0)))) is True
    assert got[0].body == b"" and got[0].properties == {} and got[0].headers == {}


def test_other_channels_and_methods_are_py_amqps() -> None:
    lean, connection, got, _ = _lean()
    close = (1, 1, b"\x00\x14\x00\x28" + b"rest")  # channel.close on our channel
    other = (1, 2, deliver_frame(1, False))  # a delivery on another channel
    heartbeat = (8, 0, b"")
    for frame in (close, other, heartbeat):
        assert lean.on_frame(frame) is True
    assert connection.passed == [close, other, heartbeat] and got == []


def test_a_delivery_on_a_closing_channel_is_ignored_as_py_amqp_ignores_it() -> None:
    lean, _, got, _ = _lean(FakeChannel(is_closing=True))
    lean.on_frame((1, 1, deliver_frame(5, False)))
    assert lean.on_frame((2, 1, header_frame(0, struct.pack(">H", 0)))) is True
    assert got == []


def test_a_delivery_for_a_cancelled_consumer_is_requeued() -> None:
    lean, _, got, channel = _lean(FakeChannel(callbacks={}))
    lean.on_frame((1, 1, deliver_frame(5, False)))
    lean.on_frame((2, 1, header_frame(0, struct.pack(">H", 0))))
    assert got == [] and channel.rejected == [(5, True)]


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([(3, 1, b"body")], 2),  # a body where the header belongs
        ([(2, 1, header_frame(4, struct.pack(">H", 0))), (1, 1, deliver_frame(2, False))], 3),
    ],
)
def test_a_frame_out_of_order_is_an_unexpected_frame(
    frames: list[tuple[int, int, bytes]], expected: int
) -> None:
    lean, _, _, _ = _lean()
    lean.on_frame((1, 1, deliver_frame(1, False)))
    with pytest.raises(UnexpectedFrame, match=f"expecting type: {expected}"):
        for frame in frames:
            lean.on_frame(frame)


def test_a_compressed_body_is_decompressed_and_a_bad_one_is_a_decode_error() -> None:
    import zlib

    from kombu.exceptions import DecodeError

    channel = FakeChannel()
    info = {"delivery_tag": 1}
    good = LeanMessage(
        channel,
        info,
        {
            "application_headers": {"compression": "application/x-gzip"},
            "content_type": "application/json",
        },
        zlib.compress(b"[1]"),
        None,
    )
    assert good.body == b"[1]" and good.decode() == [1]
    bad = LeanMessage(
        channel, info, {"application_headers": {"compression": "application/x-gzip"}}, b"no", None
    )
    with pytest.raises(DecodeError):
        bad.decode()


def test_content_not_accepted_is_refused_as_kombu_refuses_it() -> None:
    from kombu.exceptions import ContentDisallowed

    message = LeanMessage(
        FakeChannel(),
        {"delivery_tag": 1},
        {"content_type": "application/x-python-serialize"},
        b"x",
        {"application/json"},
    )
    with pytest.raises(ContentDisallowed):
        message.decode()


# ---------------------------------------------------------------- a real broker


def _consume_both_ways(
    amqp_url: str, queue_name: str, publish: Callable[[Any, Any], None], count: int
) -> tuple[list[Any], list[Any]]:
    """The same messages consumed through kombu (py-amqp's path) and the lean path."""
    from kombu.connection import Connection
    from kombu.entity import Exchange, Queue
    from kombu.messaging import Consumer, Producer
    from kombu.serialization import prepare_accept_content

    from greenworker import green
    from greenworker.transport import amqp_frames, amqp_lean

    queue = Queue(
        queue_name,
        Exchange(queue_name),
        routing_key=queue_name,
        auto_delete=True,
        queue_arguments={"x-max-priority": 10},
    )
    results: list[list[Any]] = []
    for lean in (False, True):
        got: list[Any] = []
        with Connection(amqp_url) as conn:
            conn.ensure_connection(max_retries=0)
            reader = amqp_frames.install(conn.connection)
            channel = conn.channel()
            producer = Producer(conn.channel())
            publish(producer, queue)
            consumer = Consumer(channel, queues=[queue], on_message=got.append, accept=["json"])
            handler = None
            if lean:
                handler = amqp_lean.install(
                    conn.connection,
                    channel,
                    got.append,
                    prepare_accept_content(["json"]),
                    green.new_semaphore(1),
                    reader,
                )
            consumer.qos(prefetch_count=count)
            consumer.consume()
            while len(got) < count:
                if handler is not None:
                    handler.drain(5)
                else:
                    conn.drain_events(timeout=5)
            for message in got:
                message.ack()
            consumer.cancel()
        results.append(got)
    return results[0], results[1]


def _view(message: Any) -> Any:
    info = dict(message.delivery_info)
    info.pop("consumer_tag")
    info.pop("delivery_tag")
    return (
        repr(message.properties),
        repr(message.headers),
        info,
        message.content_type,
        message.content_encoding,
        message.body,
        message.decode(),
    )


def test_real_deliveries_match_kombus_messages(amqp_url: str, queue_name: str) -> None:
    headers = {
        "id": "abc",
        "task": "t",
        "timelimit": [None, 5],
        "retries": 2,
        "ignore_result": True,
        "price": Decimal("1.50"),
        "when": datetime(2026, 1, 2, 3, 4, 5),
        "stamps": {"k": ["v", 1]},
    }
    big = "y" * 400000  # over RabbitMQ's frame_max: several body frames

    def publish(producer: Any, queue: Any) -> None:
        for priority, body in ((1, {"n": 1}), (9, {"n": 2, "pad": big})):
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                headers=headers,
                priority=priority,
                correlation_id="abc",
                reply_to="rq",
            )

    kombus, leans = _consume_both_ways(amqp_url, queue_name, publish, 2)
    assert [_view(m) for m in leans] == [_view(m) for m in kombus]
    assert [m.properties["priority"] for m in leans] == [9, 1]  # the priority queue's order
    assert leans[0].decode()["pad"] == big


def test_a_requeued_delivery_comes_back_redelivered(amqp_url: str, queue_name: str) -> None:
    from kombu.connection import Connection
    from kombu.entity import Exchange, Queue
    from kombu.messaging import Consumer, Producer
    from kombu.serialization import prepare_accept_content

    from greenworker import green
    from greenworker.transport import amqp_frames, amqp_lean

    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name, auto_delete=True)
    got: list[LeanMessage] = []
    with Connection(amqp_url) as conn:
        conn.ensure_connection(max_retries=0)
        reader = amqp_frames.install(conn.connection)
        channel = conn.channel()
        Producer(conn.channel()).publish(
            {"a": 1}, exchange=queue.exchange, routing_key=queue_name, declare=[queue]
        )
        lock = green.new_semaphore(1)
        lean = amqp_lean.install(
            conn.connection, channel, got.append, prepare_accept_content(["json"]), lock, reader
        )
        consumer = Consumer(channel, queues=[queue], on_message=got.append)
        consumer.consume()
        while not got:
            lean.drain(5)
        assert got[0].delivery_info["redelivered"] is False
        got[0].reject(requeue=True)
        assert got[0].acknowledged
        while len(got) < 2:
            lean.drain(5)
        assert got[1].delivery_info["redelivered"] is True
        assert got[1].decode() == {"a": 1}
        got[1].ack()
        consumer.cancel()


def test_a_channel_closed_by_the_broker_is_py_amqps_channel_error(
    amqp_url: str, queue_name: str
) -> None:
    from amqp.exceptions import PreconditionFailed
    from kombu.connection import Connection
    from kombu.entity import Exchange, Queue
    from kombu.messaging import Consumer

    from greenworker import green
    from greenworker.transport import amqp_frames, amqp_lean

    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name, auto_delete=True)
    with Connection(amqp_url) as conn:
        conn.ensure_connection(max_retries=0)
        reader = amqp_frames.install(conn.connection)
        channel = conn.channel()
        lean = amqp_lean.install(
            conn.connection, channel, print, None, green.new_semaphore(1), reader
        )
        Consumer(channel, queues=[queue], on_message=print).consume()
        channel.basic_ack(999)  # an unknown delivery tag: the broker closes the channel
        with pytest.raises(PreconditionFailed) as raised:
            for _ in range(10):
                lean.drain(5)
        assert raised.value.reply_code == 406


def test_send_ack_writes_the_frame_basic_ack_writes() -> None:
    from amqp import spec
    from amqp.serialization import dumps

    from greenworker.transport.amqp_lean import send_ack

    class Writer:
        def __init__(self) -> None:
            self.frames: list[tuple[Any, ...]] = []

        def frame_writer(self, *frame: Any) -> None:
            self.frames.append(frame)

    @dataclass
    class Chan:
        connection: Any
        channel_id: int = 3

    writer = Writer()
    send_ack(Chan(writer), 2**40 + 5, multiple=True)
    send_ack(Chan(writer), 7)
    assert writer.frames == [
        (1, 3, spec.Basic.Ack, dumps("Lb", (2**40 + 5, True)), None),
        (1, 3, spec.Basic.Ack, dumps("Lb", (7, False)), None),
    ]
    from amqp.exceptions import RecoverableConnectionError

    with pytest.raises(RecoverableConnectionError, match="already closed"):
        send_ack(Chan(None), 1)


def test_typed_json_values_decode_as_kombu_decodes_them() -> None:
    from kombu.utils.json import dumps as kombu_dumps

    body = kombu_dumps([[1], {"when": datetime(2026, 1, 1, 1, 1)}, {}])
    properties = {"content_type": "application/json", "content_encoding": "utf-8"}
    for raw in (body, body.encode()):
        accept = {"application/json"}
        message = LeanMessage(FakeChannel(), {"delivery_tag": 1}, properties, raw, accept)
        assert message.decode() == [[1], {"when": datetime(2026, 1, 1, 1, 1)}, {}]
