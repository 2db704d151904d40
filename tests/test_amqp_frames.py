"""The consumer's buffered AMQP frame reads, over a real (green) socket pair."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from amqp.exceptions import UnexpectedFrame

from greenworker.transport.amqp_frames import FrameReader


def frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


@dataclass
class FakeTransport:
    """What FrameReader uses of py-amqp's TCPTransport."""

    sock: socket.socket
    _read_buffer: bytes = b""
    connected: bool = True
    extra: dict[str, object] = field(default_factory=dict)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def test_frames_sent_together_come_out_one_by_one(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader_sock, writer = pair
    frames = [frame(1, 1, b"method"), frame(2, 1, b"header" * 10), frame(3, 1, b"x" * 70000)]
    writer.sendall(b"".join(frames))
    reader = FrameReader(FakeTransport(reader_sock))
    assert reader.read_frame() == (1, 1, b"method")
    assert reader.read_frame() == (2, 1, b"header" * 10)
    assert reader.read_frame() == (3, 1, b"x" * 70000)  # larger than one read


def test_bytes_left_by_the_handshake_are_read_first(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader_sock, writer = pair
    whole = frame(1, 0, b"tune") + frame(8, 0, b"")
    transport = FakeTransport(reader_sock, _read_buffer=whole[:5])
    writer.sendall(whole[5:])
    reader = FrameReader(transport)
    assert transport._read_buffer == b""  # taken over: py-amqp's buffer is not read again
    assert reader.read_frame() == (1, 0, b"tune")
    assert reader.read_frame() == (8, 0, b"")


def test_a_timeout_in_the_middle_of_a_frame_loses_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader_sock, writer = pair
    reader_sock.settimeout(0.05)
    whole = frame(3, 2, b"body" * 100)
    reader = FrameReader(FakeTransport(reader_sock))
    writer.sendall(whole[:3])  # not even the whole header
    with pytest.raises(socket.timeout):
        reader.read_frame()
    writer.sendall(whole[3:200])
    with pytest.raises(socket.timeout):
        reader.read_frame()
    writer.sendall(whole[200:])
    assert reader.read_frame() == (3, 2, b"body" * 100)


def test_a_bad_frame_end_is_an_unexpected_frame(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader_sock, writer = pair
    writer.sendall(frame(1, 1, b"m", end=0x00))
    transport = FakeTransport(reader_sock)
    with pytest.raises(UnexpectedFrame, match="0x00"):
        FrameReader(transport).read_frame()
    assert transport.connected is False


def test_a_closed_connection_is_an_error_not_a_frame(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader_sock, writer = pair
    writer.sendall(frame(1, 1, b"method")[:4])
    writer.close()
    transport = FakeTransport(reader_sock)
    with pytest.raises(OSError, match="closed"):
        FrameReader(transport).read_frame()
    assert transport.connected is False


def test_installed_on_a_broker_connection_it_carries_deliveries(
    amqp_url: str, queue_name: str
) -> None:
    from kombu.connection import Connection
    from kombu.entity import Exchange, Queue
    from kombu.message import Message
    from kombu.messaging import Consumer, Producer

    from greenworker.transport import amqp_frames

    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name, auto_delete=True)
    bodies: list[object] = []

    def on_message(message: Message) -> None:
        bodies.append(message.decode())
        message.ack()

    with Connection(amqp_url) as conn:
        conn.ensure_connection(max_retries=0)
        assert amqp_frames.install(conn.connection)
        channel = conn.channel()
        consumer = Consumer(channel, queues=[queue], on_message=on_message)
        consumer.consume()
        producer = Producer(conn.channel())
        for i in range(300):  # several deliveries per read
            producer.publish(
                {"n": i, "pad": "x" * 500},
                exchange=queue.exchange,
                routing_key=queue_name,
                declare=[queue],
            )
        while len(bodies) < 300:
            conn.drain_events(timeout=5)
        consumer.cancel()
    assert [b["n"] for b in bodies] == list(range(300))  # type: ignore[index]


def test_a_tls_transport_keeps_py_amqps_reads() -> None:
    from greenworker.transport import amqp_frames

    class NotTcp:
        transport = object()

    assert amqp_frames.install(NotTcp()) is None
