"""The native Redis publisher used by :class:`~greenworker.client.app.App`: one round
trip per task message where kombu takes two, with kombu's exact envelope.
"""

from __future__ import annotations

import base64
import logging
import uuid
from typing import TYPE_CHECKING, Any

import redis
from kombu.serialization import dumps as kombu_dumps
from kombu.utils import json  # kombu's envelope codec (typed values), as its transport

from .redis_layout import BINDING_KEY, PRIORITY_SEP, broker_client

if TYPE_CHECKING:
    from ..client.app import App

log = logging.getLogger("greenworker.consumer")


# KEYS: the exchange's binding set   ARGV: routing key, envelope
# kombu's direct-exchange lookup (every queue bound with this routing key, once each),
# then its push; returns how many queues got the message.
_PUBLISH_SCRIPT = """
local sep = '\\6\\22'
local seen = {}
local sent = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local first = string.find(member, sep, 1, true)
  if first and string.sub(member, 1, first - 1) == ARGV[1] then
    local second = string.find(member, sep, first + 2, true)
    if second then
      local queue = string.sub(member, second + 2)
      if not seen[queue] then
        seen[queue] = true
        redis.call('LPUSH', queue, ARGV[2])
        sent = sent + 1
      end
    end
  end
end
return sent
"""


class NativeRedisPublisher:
    """Publishes task messages to Redis exactly as kombu's transport would, in one round
    trip.  Handles direct exchanges without a priority; :meth:`send` says when a message
    must take kombu's path instead."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._client: redis.Redis | None = None
        self._script: Any = None

    def send(
        self,
        body: Any,
        headers: dict[str, Any],
        properties: dict[str, Any],
        exchange: str,
        routing_key: str,
        queue: str,
    ) -> bool:
        """Push the message to every queue bound to ``exchange`` with ``routing_key``; if
        nothing is bound (the bindings were deleted), bind ``queue`` first, in kombu's
        format.  False if the connection failed: the caller publishes through kombu, which
        retries."""
        conf = self.app.conf
        content_type, content_encoding, data = kombu_dumps(body, serializer=conf.task_serializer)
        raw = data.encode(content_encoding) if isinstance(data, str) else data
        envelope = {
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": conf.task_default_delivery_mode,
                "delivery_info": {"exchange": exchange, "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        if self._client is None:
            self._client = broker_client(self.app)
            self._script = self._client.register_script(_PUBLISH_SCRIPT)
        binding_key = BINDING_KEY.format(exchange)
        payload = json.dumps(envelope)
        try:
            if not self._script(keys=[binding_key], args=[routing_key, payload]):
                # kombu would drop this message (its in-process state says "declared")
                self._client.sadd(binding_key, PRIORITY_SEP.join([routing_key, "", queue]))
                self._script(keys=[binding_key], args=[routing_key, payload])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.debug("native publish failed, kombu's path retries: %s", exc)
            self.close()
            return False
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
