"""Buffered frame reads for the consumer's py-amqp connection.

py-amqp reads each frame with three exact-size ``recv`` calls (header, payload,
frame end), so one task message (method, header and body frames) costs nine
system calls, each through the green socket's wrapper: a third of the worker's
CPU at full load.  :class:`FrameReader` takes whatever the socket has, up to
64 KiB, and cuts frames out of that buffer: one ``recv`` for a whole batch of
deliveries.  Frame parsing and dispatch stay py-amqp's own.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

#: Bytes asked of the socket at a time: a prefetch window of small task messages.
CHUNK = 65536
FRAME_END = 0xCE
_HEADER = struct.Struct(">BHI")  # type, channel, payload size


class FrameReader:
    """``read_frame`` for one connected py-amqp ``TCPTransport``.

    A frame is taken out of the buffer only once it is whole, so a timeout (or an
    interrupted ``recv``) in the middle of one loses nothing: the next call goes on
    from the bytes already read.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._recv = transport.sock.recv
        # what py-amqp had read past the last frame of the handshake
        self._buffer: bytes = bytes(transport._read_buffer)
        self._pos = 0
        transport._read_buffer = b""

    def read_frame(self) -> tuple[int, int, bytes]:
        self._fill(_HEADER.size)
        frame_type, channel, size = _HEADER.unpack_from(self._buffer, self._pos)
        whole = _HEADER.size + size + 1
        self._fill(whole)
        start = self._pos + _HEADER.size
        end = start + size
        buffer = self._buffer
        if buffer[end] != FRAME_END:
            from amqp.exceptions import UnexpectedFrame

            self._transport.connected = False
            raise UnexpectedFrame(f"Received frame_end {buffer[end]:#04x} while expecting 0xce")
        self._pos = end + 1
        return frame_type, channel, buffer[start:end]

    def has_frame(self) -> bool:
        """Whether a whole frame is buffered: ``read_frame`` returns it without a read."""
        available = len(self._buffer) - self._pos
        if available < _HEADER.size:
            return False
        size: int = _HEADER.unpack_from(self._buffer, self._pos)[2]
        return available > _HEADER.size + size

    def _fill(self, needed: int) -> None:
        """Read until ``needed`` unread bytes are buffered."""
        while len(self._buffer) - self._pos < needed:
            missing = needed - (len(self._buffer) - self._pos)
            try:
                data = self._recv(max(CHUNK, missing))
            except TimeoutError:
                raise
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise TimeoutError() from exc
                self._transport.connected = False
                raise
            if not data:
                self._transport.connected = False
                raise OSError("Server unexpectedly closed connection")
            self._buffer = self._buffer[self._pos :] + data
            self._pos = 0


def install(connection: Any) -> FrameReader | None:
    """Give a connected py-amqp ``connection`` buffered frame reads: the reader.  None
    (and nothing changed) for a transport this does not know, such as TLS: py-amqp's
    own reads stay."""
    from amqp.transport import TCPTransport

    transport: Any = getattr(connection, "transport", None)
    if type(transport) is not TCPTransport or transport.sock is None:
        return None
    reader = FrameReader(transport)
    transport.read_frame = reader.read_frame
    return reader
