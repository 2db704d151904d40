"""A native consumer (and publisher) for Redis that keep kombu's exact key layout.

kombu's Redis transport takes a message with ``BRPOP`` and then, in a second
round trip, records it in the ``unacked`` hash and ``unacked_index`` sorted
set; each ack is one more transaction, and each operation builds a new
redis-py client.  That costs more than most task bodies, and a connection lost
between the pop and the record loses the message.

This consumer reads and writes the same keys, so Celery producers, Celery
workers and kombu's visibility-timeout restore keep working on the same
queues, but:

* a Lua script pops up to N messages and records them in ``unacked`` and
  ``unacked_index`` in one atomic step -- nothing is lost between the two;
* acks are batched (one pipeline for every ack that arrives within a few
  milliseconds);
* when the queues are empty it waits with ``BLMOVE q q RIGHT RIGHT`` (which
  blocks until the list has an element and leaves it where it was) instead of
  polling; ``BLMOVE`` needs Redis 6.2, and on an older server it says so once
  and polls instead;
* a sweep on its own timer puts the messages of dead consumers (in
  ``unacked`` longer than the visibility timeout) back on their queues, all
  of them each time, however long the queues are.

Messages are delivered as :class:`RedisMessage`, the part of kombu's
``Message`` interface the worker uses.

:class:`NativeRedisPublisher` sends a task message in one round trip where
kombu takes two (its exchange lookup, then the push, each on a new redis-py
client): a Lua script reads the exchange's bindings and pushes kombu's exact
envelope to every queue bound with the routing key.

``broker_native_redis = False`` turns both off (kombu's transport is used
instead); so does a transport option that changes kombu's key layout
(:data:`greenworker.config.REDIS_LAYOUT_OPTIONS`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis
from kombu.utils import json  # kombu's envelope codec (typed values), as its transport
from kombu.utils.url import maybe_sanitize_url

from .. import green
from .envelope import EnvelopeMessage, loads_envelope
from .native import NativeConsumer
from .redis_layout import (
    BINDING_KEY,
    PRIORITY_SEP,
    PRIORITY_STEPS,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    _priority_list,
    _priority_lists,
    broker_client,
    server_has_blmove,
)

if TYPE_CHECKING:
    from ..client.app import App

log = logging.getLogger("greenworker.consumer")

# KEYS: unacked, unacked_index, list...   ARGV: max messages, now
# Returns a flat list: tag, raw payload, list name for each message ('' tag: malformed).
_POP_SCRIPT = """
local out = {}
local limit = tonumber(ARGV[1])
local taken = 0
for i = 3, #KEYS do
  while taken < limit do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    taken = taken + 1
    local ok, msg = pcall(cjson.decode, raw)
    local tag = nil
    local exchange, routing_key = '', ''
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      tag = msg['properties']['delivery_tag']
      local info = msg['properties']['delivery_info']
      if type(info) == 'table' then
        if type(info['exchange']) == 'string' then exchange = info['exchange'] end
        if type(info['routing_key']) == 'string' then routing_key = info['routing_key'] end
      end
    end
    if type(tag) == 'string' and tag ~= '' then
      redis.call('HSET', KEYS[1], tag,
        '[' .. raw .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
      redis.call('ZADD', KEYS[2], ARGV[2], tag)
    else
      tag = ''
    end
    out[#out + 1] = tag
    out[#out + 1] = raw
    out[#out + 1] = KEYS[i]
  end
end
return out
"""

# KEYS: unacked, unacked_index   ARGV: ceiling score, then for each message: tag, SHA1
# of the unacked entry read ('' if there was none: only the index is cleaned), number of
# lists N, the payload to push, N list names.
# A message is moved only if it is still unacked, unchanged and older than the ceiling
# (acked, renewed or restored by another consumer since it was read: left alone), so
# concurrent sweeps, kombu's included, never restore one twice.  Returns how many moved.
_RESTORE_SCRIPT = """
local ceiling = tonumber(ARGV[1])
local moved = 0
local i = 2
while i <= #ARGV do
  local tag, digest, lists, payload = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local score = redis.call('ZSCORE', KEYS[2], tag)
  if score and tonumber(score) <= ceiling then
    local entry = redis.call('HGET', KEYS[1], tag)
    if (digest == '' and not entry) or (entry and redis.sha1hex(entry) == digest) then
      for j = 1, lists do
        redis.call('RPUSH', ARGV[i + 3 + j], payload)
      end
      redis.call('ZREM', KEYS[2], tag)
      redis.call('HDEL', KEYS[1], tag)
      if entry then moved = moved + 1 end
    end
  end
  i = i + 4 + lists
end
return moved
"""


class RedisMessage(EnvelopeMessage):
    """One task message from Redis, and the list it came from."""

    __slots__ = ("source",)

    def __init__(self, consumer: NativeRedisConsumer, payload: dict[str, Any], source: str) -> None:
        super().__init__(consumer, payload)
        self.source = source  # the list it came from (priority lists included)


class NativeRedisConsumer(NativeConsumer):
    """Consumes ``queues`` on Redis natively; same interface as :class:`~.consumer.Consumer`."""

    ACK_BATCH = 256
    POP_BATCH = 64
    #: Messages restored per script call (the sweep repeats until none is left).
    RESTORE_BATCH = 500
    #: How often an idle consumer looks at its queues where it cannot block on them
    #: (several queues, or no ``BLMOVE``).
    POLL_INTERVAL = 0.05

    def __init__(
        self,
        app: App,
        queues: Sequence[str],
        on_message: Callable[[Any], None],
        prefetch_count: Callable[[], int],
    ) -> None:
        super().__init__(app, queues, on_message, prefetch_count)
        self._client: redis.Redis | None = None
        self._flush_lock = green.new_semaphore(1)
        self._acks_held_back = False  # a flush failed: said once, until one succeeds
        self._pop: Any = None
        self._waiting = False  # in BLMOVE: nothing popped, safe to end at once
        self._restorer: green.Greenlet | None = None
        self._restore_client: redis.Redis | None = None
        self._restore_script: Any = None
        #: False when the server has no BLMOVE (Redis < 6.2): an idle consumer polls.
        self.blocking_wait = True
        self._polling_noted = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stopping = False
        self._greenlet = green.spawn(self._run)
        self._acker = green.spawn(self._ack_loop)
        self._restorer = green.spawn(self._restore_loop)

    def stop_consuming(self, timeout: float = 5.0) -> None:
        """Stop taking new messages; acks and requeues keep working."""
        self._stopping = True
        self._capacity.set()
        self._stop_restorer()
        if self._greenlet is not None:
            # waiting in BLMOVE, it holds nothing unrecorded (the move leaves the message
            # where it was, and redis-py drops a connection cut mid-reply): end it now
            # rather than after up to a drain interval
            if self._waiting or not self._greenlet.join(timeout):
                self._greenlet.kill()
            self._greenlet = None

    def close(self) -> None:
        """Flush acks, give back every message still held (like kombu at channel close).

        An ack flush already under way (the ack loop's, or a full batch's) ends first:
        killed mid-pipeline, it would drop the acks it had taken, and their tasks would
        run again after a restart."""
        self._stopping = True
        with self._flush_lock:
            if self._acker is not None:
                self._acker.kill()  # not in a flush: that holds the lock
                self._acker = None
            sent = self._flush_acks_now()
        if not sent:
            log.warning("%d ack(s) not sent: redelivered later", len(self._pending_acks))
        for message in list(self._held.values()):
            if not message.acknowledged:
                message.acknowledged = True
                self.settle(message, requeue=True, leftmost=False)
        self._held.clear()
        self._stop_restorer()
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------ acks

    def _flush_acks(self) -> bool:
        """Send the pending acks in one pipeline; on failure keep them for the next try.
        One flush at a time: a second waits for the first (see :meth:`close`)."""
        with self._flush_lock:
            return self._flush_acks_now()

    def _flush_acks_now(self) -> bool:
        if not self._pending_acks:
            return True
        tags, self._pending_acks = self._pending_acks, []
        try:
            pipe = self._connection().pipeline(transaction=False)
            pipe.zrem(UNACKED_INDEX_KEY, *tags)
            pipe.hdel(UNACKED_KEY, *tags)
            pipe.execute()
        except Exception as exc:
            self._pending_acks[:0] = tags
            if not self._acks_held_back:  # one line an outage, not one every retry
                self._acks_held_back = True
                log.warning(
                    "could not ack %d message(s) yet: %s; they are kept and sent once the "
                    "broker answers",
                    len(tags),
                    exc,
                )
            return False
        if self._acks_held_back:
            self._acks_held_back = False
            log.info("sent %d ack(s) held back while the broker was away", len(tags))
        return True

    def settle(self, message: RedisMessage, *, requeue: bool, leftmost: bool = True) -> None:
        """Remove ``message`` from unacked; with ``requeue`` put it back on its list first."""
        self._held.pop(message.delivery_tag, None)
        self._capacity.set()
        pipe = self._connection().pipeline(transaction=True)
        if requeue:
            payload = message.payload
            try:
                payload["headers"]["redelivered"] = True
                payload["properties"]["delivery_info"]["redelivered"] = True
            except (KeyError, TypeError):
                pass
            push = pipe.lpush if leftmost else pipe.rpush
            push(message.source, json.dumps(payload))
        pipe.zrem(UNACKED_INDEX_KEY, message.delivery_tag)
        pipe.hdel(UNACKED_KEY, message.delivery_tag)
        pipe.execute()

    # ------------------------------------------------------------ visibility

    def refresh_visibility(self, messages: Sequence[Any]) -> int:
        tags = [m.delivery_tag for m in messages if m.channel is self and not m.acknowledged]
        if not tags:
            return 0
        try:
            self._connection().zadd(UNACKED_INDEX_KEY, dict.fromkeys(tags, time.time()), xx=True)
        except Exception as exc:
            log.warning("could not renew the visibility of %d message(s): %s", len(tags), exc)
            return 0
        return len(tags)

    def restore_interval(self) -> float:
        """Seconds between two sweeps: a tenth of the visibility timeout, 0.25 to 10 s, so
        a dead consumer's message is back at most that long after its timeout."""
        return min(10.0, max(0.25, self.visibility_timeout / 10))

    def _restore_loop(self) -> None:
        while True:
            try:
                self.restore_visible()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # the broker is away: the consumer loop reports that; try at the next sweep
                log.debug("visibility restore sweep failed: %s", exc)
                self._close_restore_client()
            except Exception as exc:
                log.warning("visibility restore sweep failed: %s: %s", type(exc).__name__, exc)
                self._close_restore_client()
            green.sleep(self.restore_interval())

    def restore_visible(self) -> int:
        """Put back on their queues every message in ``unacked`` for longer than the
        visibility timeout (its consumer died), as kombu's restore does; return how many.

        It reads a batch of them, works out each one's payload and lists here, and moves
        the batch in one script that skips any message acked, renewed or restored since
        it was read; then the next batch, until none is left.  (kombu's sweep restores
        10 messages per turn, one transaction each.)"""
        client = self._restorer_connection()
        restored = 0
        while True:
            ceiling = time.time() - self.visibility_timeout
            tags = cast(
                "list[bytes]",
                client.zrangebyscore(
                    UNACKED_INDEX_KEY, "-inf", ceiling, start=0, num=self.RESTORE_BATCH
                ),
            )
            if not tags:
                break
            entries = cast("list[bytes | None]", client.hmget(UNACKED_KEY, tags))
            args: list[Any] = [repr(ceiling)]
            bindings: dict[str, list[list[str]]] = {}
            for raw_tag, entry in zip(tags, entries, strict=True):
                args.extend(self._restore_args(client, raw_tag.decode(), entry, bindings))
            moved = int(
                self._restore_script(
                    keys=[UNACKED_KEY, UNACKED_INDEX_KEY], args=args, client=client
                )
            )
            restored += moved
            if len(tags) < self.RESTORE_BATCH or not moved:
                break
            green.sleep(0)  # a long backlog of orphans: let the tasks run between batches
        if restored:
            log.info(
                "restored %d message(s) unacked for over the visibility timeout (%gs) to "
                "their queues",
                restored,
                self.visibility_timeout,
            )
        return restored

    def _restore_args(
        self,
        client: redis.Redis,
        tag: str,
        entry: bytes | None,
        bindings: dict[str, list[list[str]]],
    ) -> list[Any]:
        """The restore script's arguments for one message (see ``_RESTORE_SCRIPT``)."""
        if entry is None:
            return [tag, "", 0, ""]  # only in the index (kombu leaves such): clean it
        digest = hashlib.sha1(entry).hexdigest()
        try:
            payload, exchange, routing_key = json.loads(entry)
            if not isinstance(payload, dict):
                raise ValueError("the envelope is not an object")
        except (ValueError, TypeError) as exc:
            log.error(
                "Dropped unacked message %s: not kombu's [envelope, exchange, routing key] (%s)",
                tag,
                exc,
            )
            return [tag, digest, 0, ""]
        for part, key in ((payload, "headers"), (payload.get("properties"), "delivery_info")):
            try:
                part[key]["redelivered"] = True  # type: ignore[index]
            except (KeyError, TypeError):
                pass
        queues = _bound_queues(client, str(exchange or ""), str(routing_key or ""), bindings)
        if not queues:
            log.error(
                "Dropped unacked message %s: no exchange and no routing key to restore it by",
                tag,
            )
        lists = [_priority_list(queue, payload) for queue in queues]
        return [tag, digest, len(lists), json.dumps(payload), *lists]

    def _restorer_connection(self) -> redis.Redis:
        if self._restore_client is None:
            self._restore_client = broker_client(self.app)
            self._restore_script = self._restore_client.register_script(_RESTORE_SCRIPT)
        return self._restore_client

    def _close_restore_client(self) -> None:
        if self._restore_client is not None:
            self._restore_client.close()
            self._restore_client = None

    def _stop_restorer(self) -> None:
        if self._restorer is not None:
            self._restorer.kill()
            self._restorer = None
        self._close_restore_client()

    # ------------------------------------------------------------ the loop

    def queue_sizes(self) -> dict[str, int]:
        client = self._connection()
        pipe = client.pipeline(transaction=False)
        for name in self.queue_names:
            for key in _priority_lists(name):
                pipe.llen(key)
        counts = iter(pipe.execute())
        return {name: sum(next(counts) for _ in PRIORITY_STEPS) for name in self.queue_names}

    def _connection(self) -> redis.Redis:
        if self._client is None:
            self._client = broker_client(self.app)
            self._pop = self._client.register_script(_POP_SCRIPT)
        return self._client

    def _connection_lost(self) -> None:
        # What this worker holds stays recorded in unacked on the server, so nothing is
        # dropped here: acks and requeues resume on the new connection.
        if self._client is not None:
            self._client.close()
            self._client = None

    def _consume(self) -> None:
        client = self._connection()
        client.ping()
        version = self.server_version(client)
        if server_has_blmove(version) is False:
            self._poll_instead(f"Redis {version} is older than 6.2")
        self.connection_generation += 1
        log.info(
            "consuming from %s on %s (native Redis consumer)",
            ", ".join(self.queue_names),
            maybe_sanitize_url(self.app.broker_url),
        )
        self._ready.set()
        interval = self.app.conf.worker_drain_interval
        while not self._stopping:
            prefetch = max(self._prefetch_count(), 1)
            self._applied_prefetch = prefetch
            room = prefetch - len(self._held)
            if room <= 0:
                self._capacity.clear()
                self._capacity.wait(interval)
                continue
            asked = min(room, self.POP_BATCH)
            if self._deliver(client, asked) == asked:
                continue  # maybe more: pop again at once
            # the lists ran dry in that pop: let the tasks just handed over start before
            # the wait (no second, empty pop first); BLMOVE returns at once if one came
            green.sleep(0)
            self._wait_for_messages(client, interval)

    def server_version(self, client: redis.Redis) -> str:
        """The server's ``redis_version`` (``INFO server``), '' if it does not say."""
        try:
            return str(client.info("server").get("redis_version") or "")
        except redis.ResponseError:  # INFO not allowed (an ACL): BLMOVE tells
            return ""

    def _deliver(self, client: redis.Redis, limit: int) -> int:
        """Pop up to ``limit`` messages and hand each over; return how many were popped
        (malformed ones included)."""
        keys = [UNACKED_KEY, UNACKED_INDEX_KEY]
        for name in list(self.queue_names):
            keys.extend(_priority_lists(name))
        # popped on the server but not yet handed over: join() must not call this idle
        self.receiving = True
        try:
            reply = self._pop(keys=keys, args=[limit, time.time()], client=client)
        finally:
            self.receiving = False
        for i in range(0, len(reply), 3):
            tag, raw, source = reply[i].decode(), reply[i + 1], reply[i + 2].decode()
            try:
                payload = loads_envelope(raw)
                if not isinstance(payload, dict) or not tag:
                    raise ValueError("not a kombu message envelope")
                message = RedisMessage(self, payload, source)
            except Exception as exc:
                log.error(
                    "Rejected malformed message on %s (not kombu's JSON envelope): %s",
                    source,
                    exc,
                )
                if tag:
                    pipe = client.pipeline()
                    pipe.zrem(UNACKED_INDEX_KEY, tag)
                    pipe.hdel(UNACKED_KEY, tag)
                    pipe.execute()
                continue
            self._held[tag] = message
            self._on_message(message)
        return len(reply) // 3

    def _wait_for_messages(self, client: redis.Redis, interval: float) -> None:
        """Block until the first queue has a message (leaving it there), or ``interval``."""
        self._waiting = True
        try:
            if len(self.queue_names) == 1 and self.blocking_wait:
                name = self.queue_names[0]
                try:
                    # Redis takes fractional seconds here; redis-py's hint says int
                    client.blmove(name, name, interval, "RIGHT", "RIGHT")  # type: ignore[arg-type]
                except redis.ResponseError as exc:
                    if "unknown command" not in str(exc).lower():
                        raise
                    self._poll_instead("the server does not know BLMOVE")
            else:
                green.sleep(min(interval, self.POLL_INTERVAL))
        finally:
            self._waiting = False

    def _poll_instead(self, why: str) -> None:
        """No ``BLMOVE`` on this server: wait by polling, and say so once."""
        self.blocking_wait = False
        if not self._polling_noted:
            self._polling_noted = True
            log.warning(
                "%s (at %s): no BLMOVE, so the native Redis consumer polls its queue every "
                "%gs instead of blocking on it; kombu 5.7's own visibility restore "
                "(broker_native_redis = False, Celery workers) fails there too. Use Redis "
                "6.2 or later",
                why,
                maybe_sanitize_url(self.app.broker_url),
                self.POLL_INTERVAL,
            )


def _bound_queues(
    client: redis.Redis, exchange: str, routing_key: str, cache: dict[str, list[list[str]]]
) -> list[str]:
    """The queues a message sent to ``exchange`` with ``routing_key`` goes to: kombu's
    direct-exchange lookup (an empty exchange means the queue named by the key).  When
    nothing is bound any more, the queue named by the routing key (Celery's default
    binding), where kombu would drop the message."""
    if not exchange:
        return [routing_key] if routing_key else []
    members = cache.get(exchange)
    if members is None:
        raw = client.smembers(BINDING_KEY.format(exchange))
        members = cache[exchange] = [m.decode().split(PRIORITY_SEP) for m in raw]  # type: ignore[union-attr]
    queues = sorted({m[2] for m in members if len(m) == 3 and m[0] == routing_key})
    if not queues and routing_key:
        unbound = f"{exchange}{PRIORITY_SEP}{routing_key}"
        if unbound not in cache:  # once per sweep, not once per message
            cache[unbound] = []
            log.warning(
                "no queue is bound to exchange %r with routing key %r: restoring its "
                "messages to the queue %r",
                exchange,
                routing_key,
                routing_key,
            )
        queues = [routing_key]
    return queues
