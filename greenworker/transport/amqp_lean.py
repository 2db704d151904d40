"""A lean delivery path for the task consumer's channel on a py-amqp connection.

py-amqp turns each delivery into a ``basic_message.Message`` through its generic
method dispatch (argument decoding by signature string, listener lookup) and a
generic property decoder, and kombu then wraps that message in one of its own:
about a quarter of the worker's CPU at full load on RabbitMQ.  :class:`LeanDelivery`
sits in front of py-amqp's frame handler: the ``basic.deliver`` frames of the
consumer's channel, with their content header and body frames, are decoded here
(struct-based, the same values as py-amqp's decoders) into one light
:class:`LeanMessage` handed straight to the consumer.  Every other frame (other
methods, other channels, heartbeats, ``basic.return``) goes to py-amqp unchanged,
so QoS, cancels, channel and connection closes keep py-amqp's handling.

:meth:`LeanDelivery.drain` handles every whole frame already buffered by the
:class:`~.amqp_frames.FrameReader` before it returns, and sets a socket timeout
only when it must wait for the socket: one wake-up of the consumer loop for a
batch of deliveries rather than one per frame.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from kombu.compression import decompress

from .amqp_frames import FrameReader
from .envelope import decode_body

log = logging.getLogger("greenworker.consumer")

#: basic.deliver: class 60, method 60.
_DELIVER = b"\x00\x3c\x00\x3c"
_BASIC_CLASS = 60
_ACK_STATES = frozenset({"ACK", "REJECTED", "REQUEUED"})

_U8 = struct.Struct(">B").unpack_from
_I8 = struct.Struct(">b").unpack_from
_U16 = struct.Struct(">H").unpack_from
_I16 = struct.Struct(">h").unpack_from
_U32 = struct.Struct(">I").unpack_from
_I32 = struct.Struct(">i").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_I64 = struct.Struct(">q").unpack_from
_F32 = struct.Struct(">f").unpack_from
_F64 = struct.Struct(">d").unpack_from
_DECIMAL = struct.Struct(">Bi").unpack_from
_HEADER = struct.Struct(">HxxQH").unpack_from  # class id, weight, body size, flags
_DELIVER_TAG = struct.Struct(">QB").unpack_from  # delivery tag, the redelivered bit


def _syntax_error(text: str) -> Exception:
    """py-amqp's ``FrameSyntaxError`` (imported late, as the consumer imports py-amqp)."""
    from amqp.exceptions import FrameSyntaxError

    error: Exception = FrameSyntaxError(text)
    return error


def _text(raw: bytes) -> str | bytes:
    """A table key or long string: text, or the bytes when not UTF-8 (as py-amqp)."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw


def decode_table(buf: bytes, offset: int) -> tuple[dict[Any, Any], int]:
    """The field table at ``offset`` (its 32-bit size first) and the offset after it."""
    (size,) = _U32(buf, offset)
    offset += 4
    limit = offset + size
    table: dict[Any, Any] = {}
    while offset < limit:
        keylen = buf[offset]
        offset += 1
        end = offset + keylen
        raw = buf[offset:end]
        try:
            key: Any = raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            key = raw
        kind = buf[end]
        offset = end + 1
        if kind == 83:  # 'S': the common case of Celery's headers, inline
            (slen,) = _U32(buf, offset)
            offset += 4
            end = offset + slen
            raw = buf[offset:end]
            try:
                table[key] = raw.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                table[key] = raw
            offset = end
        elif kind == 86:  # 'V'
            table[key] = None
        else:
            table[key], offset = _read_value(kind, buf, offset)
    return table, offset


def _read_value(kind: int, buf: bytes, offset: int) -> tuple[Any, int]:
    """The value of type letter ``kind`` at ``offset`` (after the letter), as py-amqp's
    ``serialization._read_item`` reads it, and the offset after it."""
    if kind == 83:  # 'S' long string
        (slen,) = _U32(buf, offset)
        offset += 4
        return _text(buf[offset : offset + slen]), offset + slen
    if kind == 86:  # 'V' void
        return None, offset
    if kind == 116:  # 't' boolean
        return bool(buf[offset]), offset + 1
    if kind == 73:  # 'I' signed 32
        return _I32(buf, offset)[0], offset + 4
    if kind in (76, 108):  # 'L', 'l' signed 64 (as py-amqp reads both)
        return _I64(buf, offset)[0], offset + 8
    if kind == 70:  # 'F' table
        return decode_table(buf, offset)
    if kind == 65:  # 'A' array
        (alen,) = _U32(buf, offset)
        offset += 4
        limit = offset + alen
        array: list[Any] = []
        while offset < limit:
            value, offset = _read_value(buf[offset], buf, offset + 1)
            array.append(value)
        return array, offset
    if kind == 84:  # 'T' timestamp: a naive UTC datetime
        (seconds,) = _U64(buf, offset)
        stamp = datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)
        return stamp, offset + 8
    if kind == 100:  # 'd' double
        return _F64(buf, offset)[0], offset + 8
    if kind == 68:  # 'D' decimal
        places, number = _DECIMAL(buf, offset)
        return Decimal(number) / Decimal(10**places), offset + 5
    if kind == 120:  # 'x' byte array
        (blen,) = _U32(buf, offset)
        offset += 4
        return buf[offset : offset + blen], offset + blen
    if kind == 98:  # 'b' signed 8
        return _I8(buf, offset)[0], offset + 1
    if kind == 66:  # 'B' unsigned 8
        return buf[offset], offset + 1
    if kind in (85, 115):  # 'U' and RabbitMQ's 's': signed 16
        return _I16(buf, offset)[0], offset + 2
    if kind == 117:  # 'u' unsigned 16
        return _U16(buf, offset)[0], offset + 2
    if kind == 105:  # 'i' unsigned 32
        return _U32(buf, offset)[0], offset + 4
    if kind == 102:  # 'f' float
        return _F32(buf, offset)[0], offset + 4
    letter = chr(kind)
    raise _syntax_error(f"Unknown value in table: {letter!r} ({type(letter)!r})")


#: The basic class's properties after the headers: (flag, name, kind), kind 0 a short
#: string, 1 an octet, 2 a 64-bit timestamp (an int, as py-amqp leaves it).
_AFTER_HEADERS = (
    (0x1000, "delivery_mode", 1),
    (0x0800, "priority", 1),
    (0x0400, "correlation_id", 0),
    (0x0200, "reply_to", 0),
    (0x0100, "expiration", 0),
    (0x0080, "message_id", 0),
    (0x0040, "timestamp", 2),
    (0x0020, "type", 0),
    (0x0010, "user_id", 0),
    (0x0008, "app_id", 0),
    (0x0004, "cluster_id", 0),
)


def decode_properties(flags: int, buf: bytes, offset: int) -> dict[str, Any]:
    """The basic class's content properties (``flags`` read already, the list at
    ``offset``): the dictionary py-amqp's ``decode_properties_basic`` makes."""
    properties: dict[str, Any] = {}
    if flags & 0x8000:
        slen = buf[offset]
        offset += 1
        properties["content_type"] = buf[offset : offset + slen].decode("utf-8", "surrogatepass")
        offset += slen
    if flags & 0x4000:
        slen = buf[offset]
        offset += 1
        properties["content_encoding"] = buf[offset : offset + slen].decode(
            "utf-8", "surrogatepass"
        )
        offset += slen
    if flags & 0x2000:
        properties["application_headers"], offset = decode_table(buf, offset)
    if flags & 0x1FFC:
        for flag, name, kind in _AFTER_HEADERS:
            if flags & flag:
                if kind == 0:
                    slen = buf[offset]
                    offset += 1
                    properties[name] = buf[offset : offset + slen].decode("utf-8", "surrogatepass")
                    offset += slen
                elif kind == 1:
                    properties[name] = buf[offset]
                    offset += 1
                else:
                    properties[name] = _U64(buf, offset)[0]
                    offset += 8
    return properties


class LeanMessage:
    """One delivery of the consumer's channel, with the part of kombu's ``Message``
    interface the worker uses (and the same values as kombu's pyamqp message: a body
    with a ``content_encoding`` is text where py-amqp's channel decodes it)."""

    __slots__ = (
        "_state",
        "accept",
        "body",
        "channel",
        "content_encoding",
        "content_type",
        "delivery_info",
        "delivery_tag",
        "errors",
        "headers",
        "properties",
    )

    def __init__(
        self,
        channel: Any,
        delivery_info: dict[str, Any],
        properties: dict[str, Any],
        body: bytes | str,
        accept: Any,
    ) -> None:
        self.channel = channel
        self.delivery_info = delivery_info
        self.delivery_tag: int = delivery_info["delivery_tag"]
        self.properties = properties
        self.headers: dict[Any, Any] = properties.get("application_headers") or {}
        self.content_type: str | None = properties.get("content_type")
        self.content_encoding: str | None = properties.get("content_encoding")
        self.accept = accept
        self.errors: list[Any] = []
        self._state = "RECEIVED"
        compression = self.headers.get("compression")
        if compression:
            try:
                body = decompress(body, compression)
            except Exception:
                self.errors.append(sys.exc_info())
        self.body = body

    @property
    def acknowledged(self) -> bool:
        return self._state in _ACK_STATES

    def decode(self) -> Any:
        """The body, deserialised (only content types in ``accept``), as kombu does."""
        if self.errors:
            from kombu.exceptions import DecodeError

            raise DecodeError(f"cannot decompress the body: {self.errors[0][1]}")
        return decode_body(self.body, self.content_type, self.content_encoding, self.accept)

    def ack(self, multiple: bool = False) -> None:
        if self.acknowledged:
            from kombu.exceptions import MessageStateError

            raise MessageStateError(f"Message already acknowledged with state: {self._state}")
        self.channel.basic_ack(self.delivery_tag, multiple=multiple)
        self._state = "ACK"

    def reject(self, requeue: bool = False) -> None:
        if self.acknowledged:
            from kombu.exceptions import MessageStateError

            raise MessageStateError(f"Message already acknowledged with state: {self._state}")
        self.channel.basic_reject(self.delivery_tag, requeue=requeue)
        self._state = "REQUEUED" if requeue else "REJECTED"

    def requeue(self) -> None:
        self.reject(requeue=True)


class LeanDelivery:
    """The frame handler of one py-amqp ``connection``: the deliveries of ``channel``
    become :class:`LeanMessage` for ``deliver``; everything else is py-amqp's.

    ``lock`` is the consumer's write lock, held for the one write made here: the
    requeue of a delivery for a consumer tag the channel no longer has (as py-amqp
    does with such a delivery).
    """

    def __init__(
        self,
        connection: Any,
        channel: Any,
        deliver: Callable[[LeanMessage], None],
        accept: Any,
        lock: Any,
        reader: FrameReader | None,
    ) -> None:
        self._connection = connection
        self._amqp_on_frame: Callable[[tuple[int, int, bytes]], bool] = connection.on_inbound_frame
        self._channel = channel
        self._channel_id: int = channel.channel_id
        self._auto_decode = bool(getattr(channel, "auto_decode", False))
        self._deliver = deliver
        self._accept = accept
        self._lock = lock
        self._reader = reader
        # the delivery being read: its info, properties, body size and chunks so far
        self._info: dict[str, Any] | None = None
        self._properties: dict[str, Any] | None = None
        self._size = 0
        self._chunks: list[bytes] = []
        self._received = 0
        #: Deliveries decoded here (the tests look).
        self.delivered = 0

    def on_frame(self, frame: tuple[int, int, bytes]) -> bool:
        """py-amqp's ``on_inbound_frame``: True when a whole method was handled."""
        frame_type, channel_id, payload = frame
        if channel_id != self._channel_id:
            return self._amqp_on_frame(frame)
        info = self._info
        if info is None:
            if frame_type == 1 and payload[:4] == _DELIVER:
                self._connection.bytes_recv += 1
                self._info = self._deliver_info(payload)
                return False
            return self._amqp_on_frame(frame)  # what py-amqp expects, or says is unexpected
        self._connection.bytes_recv += 1
        if frame_type == 8:
            return False
        if self._properties is None:
            if frame_type != 2:
                self._unexpected(frame_type, 2)
            class_id, size, flags = _HEADER(payload, 0)
            if class_id != _BASIC_CLASS:
                raise _syntax_error(f"content header of class {class_id} on a basic.deliver")
            self._properties = decode_properties(flags, payload, 14)
            if size:
                self._size = size
                return False
            body = b""
        else:
            if frame_type != 3:
                self._unexpected(frame_type, 3)
            self._received += len(payload)
            if self._received < self._size:
                self._chunks.append(payload)
                return False
            if self._chunks:
                self._chunks.append(payload)
                body = b"".join(self._chunks)
            else:
                body = payload
        properties = self._properties
        self._info = self._properties = None
        self._chunks = []
        self._size = self._received = 0
        self._handle(info, properties, body)
        return True

    def _deliver_info(self, payload: bytes) -> dict[str, Any]:
        """basic.deliver's arguments: consumer tag, delivery tag, redelivered, exchange,
        routing key."""
        offset = 5 + payload[4]
        consumer_tag = payload[5:offset].decode("utf-8", "surrogatepass")
        delivery_tag, bits = _DELIVER_TAG(payload, offset)
        offset += 9
        end = offset + 1 + payload[offset]
        exchange = payload[offset + 1 : end].decode("utf-8", "surrogatepass")
        routing_key = payload[end + 1 : end + 1 + payload[end]].decode("utf-8", "surrogatepass")
        return {
            "consumer_tag": consumer_tag,
            "delivery_tag": delivery_tag,
            "redelivered": bool(bits & 1),
            "exchange": exchange,
            "routing_key": routing_key,
        }

    def _handle(self, info: dict[str, Any], properties: dict[str, Any], body: bytes) -> None:
        self.delivered += 1
        channel = self._channel
        if channel.is_closing:  # as py-amqp: after channel.close only the close counts
            log.warning("ignoring basic.deliver on channel %s: it is closing", self._channel_id)
            return
        if info["consumer_tag"] not in channel.callbacks:
            # cancelled meanwhile: back to the queue, as py-amqp does
            log.warning(
                "Rejecting message with delivery tag %r for reason of having no "
                "callbacks. consumer_tag=%r exchange=%r routing_key=%r.",
                info["delivery_tag"],
                info["consumer_tag"],
                info["exchange"],
                info["routing_key"],
            )
            with self._lock:
                channel.basic_reject(info["delivery_tag"], requeue=True)
            return
        encoding = properties.get("content_encoding")
        if self._auto_decode and encoding is not None:
            # py-amqp's channels give a body with an encoding as text when it decodes
            try:
                body = body.decode(encoding)  # type: ignore[assignment]
            except Exception:
                pass
        self._deliver(LeanMessage(channel, info, properties, body, self._accept))

    def _unexpected(self, got: int, expected: int) -> None:
        from amqp.exceptions import UnexpectedFrame

        raise UnexpectedFrame(f"Received frame {got} while expecting type: {expected}")

    def drain(self, timeout: float | None) -> None:
        """Handle frames until at least one method is whole and no whole frame is left
        buffered; ``TimeoutError`` if the socket stays silent for ``timeout``."""
        reader = self._reader
        if reader is None:  # py-amqp's own reads (TLS): its loop, this frame handler
            self._connection.drain_events(timeout=timeout)
            return
        transport = self._connection.transport
        on_frame = self.on_frame
        done = False
        while True:
            if reader.has_frame():
                frame = reader.read_frame()
            elif done:
                return
            else:
                with transport.having_timeout(timeout):
                    frame = reader.read_frame()
            if on_frame(frame):
                done = True


_ACK = (60, 80)
_ACK_ARGS = struct.Struct(">QB").pack  # delivery tag, the multiple bit


def send_ack(channel: Any, delivery_tag: int, multiple: bool = False) -> None:
    """``channel.basic_ack``: the same frame through py-amqp's frame writer, without its
    generic argument encoding and promise (the acks are most of the consumer's writes)."""
    connection = channel.connection
    if connection is None:
        from amqp.exceptions import RecoverableConnectionError

        raise RecoverableConnectionError("connection already closed")
    connection.frame_writer(1, channel.channel_id, _ACK, _ACK_ARGS(delivery_tag, multiple), None)


def install(
    connection: Any,
    channel: Any,
    deliver: Callable[[LeanMessage], None],
    accept: Any,
    lock: Any,
    reader: FrameReader | None,
) -> LeanDelivery:
    """Put a :class:`LeanDelivery` for ``channel`` in front of py-amqp's frame handler
    of the connected ``connection``."""
    lean = LeanDelivery(connection, channel, deliver, accept, lock, reader)
    connection.on_inbound_frame = lean.on_frame
    return lean
