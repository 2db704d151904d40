"""kombu's JSON message envelope, decoded fast.

kombu decodes an envelope with an ``object_hook`` that turns its typed values
(``{"__type__": "datetime", ...}``) back into Python objects; the hook runs in
Python for every JSON object, which is most of the cost of a decode.  An
envelope without a typed value decodes to the same thing without the hook, so
only envelopes that contain the marker pay for it.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Protocol

from kombu.exceptions import DecodeError
from kombu.serialization import loads as kombu_decode
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

_TYPED = b'"__type__"'
_TYPED_TEXT = '"__type__"'


def loads_envelope(raw: bytes | str) -> Any:
    """The envelope ``raw`` (UTF-8 or text) as kombu's transport would decode it."""
    typed = _TYPED_TEXT in raw if isinstance(raw, str) else _TYPED in raw
    if typed:
        return kombu_loads(raw)
    return json.loads(raw)


def decode_body(
    body: bytes | str, content_type: str | None, content_encoding: str | None, accept: Any
) -> Any:
    """A message body deserialised as kombu does (only content types in ``accept``);
    JSON without kombu's per-object hook where the body holds no typed value."""
    if (
        content_type == "application/json"
        and accept is not None
        and "application/json" in accept
        and body
        and (isinstance(body, str) or content_encoding == "utf-8")
    ):
        try:
            return loads_envelope(body)
        except Exception as exc:
            raise DecodeError(exc) from exc
    return kombu_decode(body, content_type, content_encoding, accept=accept)


class Settler(Protocol):
    """What an :class:`EnvelopeMessage` asks of the consumer that delivered it."""

    accept: set[str] | None

    def ack_tag(self, tag: str) -> None: ...

    def settle(self, message: Any, *, requeue: bool) -> None: ...


class EnvelopeMessage:
    """One task message decoded from kombu's JSON envelope, with the part of kombu's
    ``Message`` interface the worker uses (the native consumers deliver these: kombu's
    virtual ``Message``, built for every transport feature, costs more than the task)."""

    __slots__ = (
        "_consumer",
        "acknowledged",
        "body",
        "channel",
        "content_encoding",
        "content_type",
        "delivery_info",
        "delivery_tag",
        "headers",
        "payload",
        "properties",
    )

    def __init__(self, consumer: Settler, payload: dict[str, Any], tag: str | None = None) -> None:
        self._consumer = consumer
        self.channel: Any = consumer  # what refresh_visibility matches messages on
        self.payload = payload
        properties = payload.get("properties")
        self.properties: dict[str, Any] = properties if isinstance(properties, dict) else {}
        headers = payload.get("headers")
        self.headers: dict[str, Any] = headers if isinstance(headers, dict) else {}
        info = self.properties.get("delivery_info")
        self.delivery_info: dict[str, Any] = dict(info) if isinstance(info, dict) else {}
        self.delivery_tag: str = (
            tag if tag is not None else str(self.properties.get("delivery_tag", ""))
        )
        self.content_type = str(payload.get("content-type") or "application/json")
        self.content_encoding = str(payload.get("content-encoding") or "utf-8")
        body = payload.get("body", "")
        if self.properties.get("body_encoding") == "base64" and isinstance(body, str):
            self.body: bytes = base64.b64decode(body)
        elif isinstance(body, str):
            self.body = body.encode(self.content_encoding)
        else:
            self.body = kombu_dumps(body).encode()
        self.acknowledged = False

    def decode(self) -> Any:
        """The body, deserialised (only content types in ``accept_content``)."""
        return decode_body(
            self.body, self.content_type, self.content_encoding, self._consumer.accept
        )

    def ack(self) -> None:
        if not self.acknowledged:
            self.acknowledged = True
            self._consumer.ack_tag(self.delivery_tag)

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged:
            self.acknowledged = True
            self._consumer.settle(self, requeue=requeue)
