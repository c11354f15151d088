"""Queues: ready messages in order, the consumers that compete for them, and what drops messages (TTL,
length limits, ``x-expires``, dead-lettering).

A queue is told of new messages by its virtual host (:meth:`Queue.enqueue`), of settled deliveries by the
channel that holds them (:meth:`Queue.settle`, :meth:`Queue.requeue`, :meth:`Queue.dead_letter`) and of
consumers coming and going (:meth:`Queue.add_consumer`, :meth:`Queue.remove_consumer`). It never delivers
from inside those calls: it asks the :class:`Dispatcher` for a pass, and in that pass
(:meth:`Queue.dispatch`) hands its ready messages to consumers with room (:meth:`Consumer.deliver
<gateway.broker.memory.consumers.Consumer.deliver>`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from gateway.broker.memory.consumers import UNLIMITED, Consumer
from gateway.broker.memory.errors import (
    MISSING,
    access_refused,
    arg_value,
    flag,
    inequivalent,
    locked,
    precondition_failed,
    resource,
    type_name,
)
from gateway.broker.memory.messages import Entry, Message, position, record_death

if TYPE_CHECKING:
    from gateway.broker.memory.channels import MemoryChannel
    from gateway.broker.memory.exchanges import Exchange
    from gateway.broker.memory.vhosts import VHost

__all__ = [
    "MAX_DISPATCH_BATCH",
    "MAX_QUEUE_LENGTH",
    "OVERFLOW_MODES",
    "Dispatcher",
    "Queue",
    "QueueInfo",
]

logger = logging.getLogger("gateway.broker.memory")

#: Ready messages a queue keeps when it has no ``x-max-length`` of its own; past it the oldest is dropped
#: (or dead-lettered), RabbitMQ's ``drop-head`` overflow. Bounds the memory of a queue nobody consumes.
MAX_QUEUE_LENGTH: Final = 100_000

#: Deliveries one queue makes in one event-loop pass before it yields to other work (I/O, other tasks).
MAX_DISPATCH_BATCH: Final = 10_000

OVERFLOW_MODES: Final = ("drop-head", "reject-publish", "reject-publish-dlx")

#: Queue arguments a redeclare must repeat with the same value (RabbitMQ's list, less queue types).
EQUIVALENT_ARGS: Final = (
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-message-ttl",
    "x-overflow",
    "x-queue-mode",
    "x-single-active-consumer",
)


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """A snapshot of one queue, for metrics and tests (AMQP's ``queue.declare-ok`` counts and more)."""

    name: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    arguments: Mapping[str, Any]
    messages_ready: int
    messages_unacknowledged: int
    consumers: int


# --------------------------------------------------------------------------------------------------------
# The dispatch pass


class Dispatcher:
    """One event-loop callback that dispatches every queue with work, however many asked for it.

    Bound to the broker's loop by :meth:`start`; queues use :attr:`loop` for their timers too. ``debug``
    is decided once, at start, so the hot path tests a flag rather than the logging configuration.
    """

    __slots__ = ("_dirty", "_handle", "_loop", "_time", "debug")

    def __init__(self) -> None:
        self.debug = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty: list[Queue] = []
        self._handle: asyncio.Handle | None = None
        self._time = 0.0

    def start(self, loop: asyncio.AbstractEventLoop, *, debug: bool) -> None:
        self._loop = loop
        self.debug = debug

    def stop(self) -> None:
        """Forget the pending pass (the broker has deleted every queue)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._dirty = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "MemoryBroker.start() was not called"
        return self._loop

    def add(self, queue: Queue, now: float | None = None) -> None:
        """Dispatch ``queue`` in the next pass; called by :meth:`Queue.schedule` once per pass at most.

        ``now`` is the loop time of the enqueue that asks for it, if that is the reason.
        """
        self._dirty.append(queue)
        if self._handle is None:
            loop = self.loop
            self._time = loop.time() if now is None else now
            self._handle = loop.call_soon(self._run)

    def _run(self) -> None:
        self._handle = None
        # Expiry is judged as of when the pass was asked for, not when it runs: the delay is ours, and a
        # message with a TTL of 0 still reaches a consumer that was waiting for it.
        now = self._time
        dirty, self._dirty = self._dirty, []
        for queue in dirty:
            queue.dispatch(now)


# --------------------------------------------------------------------------------------------------------
# Queue arguments


def _int_argument(
    arguments: Mapping[str, Any], key: str, resource: str, *, zero_ok: bool = True
) -> int | None:
    if key not in arguments:
        return None
    value = arguments[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise precondition_failed(
            f"invalid arg '{key}' for {resource}: {{unacceptable_type,{type_name(value)}}}"
        )
    if value < 0:
        raise precondition_failed(f"invalid arg '{key}' for {resource}: {{value_negative,{value}}}")
    if value == 0 and not zero_ok:
        raise precondition_failed(f"invalid arg '{key}' for {resource}: {{value_zero,0}}")
    return value


def _str_argument(arguments: Mapping[str, Any], key: str, resource: str) -> str | None:
    if key not in arguments:
        return None
    value = arguments[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise precondition_failed(
            f"invalid arg '{key}' for {resource}: {{unacceptable_type,{type_name(value)}}}"
        )
    return value


# --------------------------------------------------------------------------------------------------------
# The queue


class Queue:
    """One queue of a virtual host. ``owner`` is the channel of an exclusive queue (None otherwise).

    Read-only for others: ``name``, ``vhost``, ``durable``, ``auto_delete``, ``owner``, ``arguments``,
    ``overflow``, ``deleted``. Everything else changes through the methods.
    """

    __slots__ = (
        "arguments",
        "auto_delete",
        "bindings",
        "consumers",
        "dead_letter_exchange",
        "dead_letter_routing_key",
        "deleted",
        "dispatcher",
        "durable",
        "exclusive_consumer",
        "expires",
        "expiry_at",
        "expiry_handle",
        "max_length",
        "message_ttl",
        "name",
        "next_position",
        "overflow",
        "owner",
        "ready",
        "round_robin",
        "scheduled",
        "unacked",
        "unused_handle",
        "vhost",
    )

    def __init__(
        self,
        vhost: VHost,
        name: str,
        *,
        durable: bool,
        auto_delete: bool,
        owner: MemoryChannel | None,
        arguments: dict[str, Any],
        default_max_length: int,
        dispatcher: Dispatcher,
    ) -> None:
        """Raise ``precondition_failed`` for an argument RabbitMQ would refuse."""
        self.vhost = vhost
        self.name = name
        self.durable = durable
        self.auto_delete = auto_delete
        self.owner = owner
        self.arguments = arguments
        self.dispatcher = dispatcher
        where = resource("queue", name, vhost.name)
        self.message_ttl = _int_argument(arguments, "x-message-ttl", where)
        max_length = _int_argument(arguments, "x-max-length", where)
        self.max_length = default_max_length if max_length is None else max_length
        self.expires = _int_argument(arguments, "x-expires", where, zero_ok=False)
        self.dead_letter_exchange = _str_argument(arguments, "x-dead-letter-exchange", where)
        self.dead_letter_routing_key = _str_argument(arguments, "x-dead-letter-routing-key", where)
        if self.dead_letter_routing_key is not None and self.dead_letter_exchange is None:
            raise precondition_failed(
                f"invalid arg 'x-dead-letter-routing-key' for {where}: routing_key_but_no_dlx_defined"
            )
        overflow = _str_argument(arguments, "x-overflow", where)
        if overflow is not None and overflow not in OVERFLOW_MODES:
            raise precondition_failed(
                f"invalid arg 'x-overflow' for {where}: {{invalid_overflow_value,<<\"{overflow}\">>}}"
            )
        self.overflow = overflow or "drop-head"
        self.ready: deque[Entry] = deque()  # ordered by position
        self.next_position = 0
        self.consumers: list[Consumer] = []
        self.exclusive_consumer: Consumer | None = None
        self.round_robin = 0
        self.unacked = 0
        self.bindings: dict[tuple[Exchange, str], None] = {}
        self.deleted = False
        self.scheduled = False
        self.expiry_handle: asyncio.TimerHandle | None = None
        self.expiry_at = 0.0
        self.unused_handle: asyncio.TimerHandle | None = None

    def resource(self) -> str:
        return resource("queue", self.name, self.vhost.name)

    def info(self) -> QueueInfo:
        return QueueInfo(
            name=self.name,
            durable=self.durable,
            exclusive=self.owner is not None,
            auto_delete=self.auto_delete,
            arguments=dict(self.arguments),
            messages_ready=len(self.ready),
            messages_unacknowledged=self.unacked,
            consumers=len(self.consumers),
        )

    # -- Declaration and access (raise the BrokerError RabbitMQ would)

    def check_equivalent(
        self, owner: MemoryChannel | None, durable: bool, auto_delete: bool, arguments: Mapping[str, Any]
    ) -> None:
        """A redeclare by ``owner`` (the channel, if it declares it exclusive) must match this queue."""
        if self.owner is not owner:
            raise locked(self.name, self.vhost.name)
        where = self.resource()
        if self.durable != durable:
            raise inequivalent("durable", where, flag(durable), flag(self.durable))
        if self.auto_delete != auto_delete:
            raise inequivalent("auto_delete", where, flag(auto_delete), flag(self.auto_delete))
        for key in EQUIVALENT_ARGS:
            current = self.arguments.get(key, MISSING)
            received = arguments.get(key, MISSING)
            if current is received:
                continue
            if type_name(current) != type_name(received) or current != received:
                raise inequivalent(key, where, arg_value(received), arg_value(current))

    def check_access(self, channel: MemoryChannel) -> None:
        """Only its owner may use an exclusive queue."""
        if self.owner is not None and self.owner is not channel:
            raise locked(self.name, self.vhost.name)

    def check_consumable(self, exclusive: bool) -> None:
        """An exclusive consumer wants the queue to itself, and keeps it so."""
        if self.exclusive_consumer is not None or (exclusive and self.consumers):
            raise access_refused(f"{self.resource()} in exclusive use")

    # -- Bindings

    def bind(self, exchange: Exchange, binding_key: str) -> None:
        """Bind to ``exchange`` (once per key; remembered so that deleting the queue unbinds it)."""
        if (exchange, binding_key) not in self.bindings:
            exchange.bind(self, binding_key)
            self.bindings[(exchange, binding_key)] = None

    def unbind(self, exchange: Exchange, binding_key: str) -> None:
        if (exchange, binding_key) in self.bindings:
            exchange.unbind(self, binding_key)
            del self.bindings[(exchange, binding_key)]

    # -- Consumers

    def add_consumer(self, consumer: Consumer, *, exclusive: bool) -> None:
        """Deliveries to it begin in the next dispatch pass (after :meth:`check_consumable`)."""
        self.consumers.append(consumer)
        if exclusive:
            self.exclusive_consumer = consumer
        if self.unused_handle is not None:
            self.unused_handle.cancel()
            self.unused_handle = None
        if self.ready:
            self.schedule()

    def remove_consumer(self, consumer: Consumer) -> None:
        """Its channel cancelled it (idempotent). An auto-delete queue losing its last consumer goes."""
        consumer.stop()
        if consumer in self.consumers:
            self.consumers.remove(consumer)
        if self.exclusive_consumer is consumer:
            self.exclusive_consumer = None
        if not self.consumers and not self.deleted:
            if self.auto_delete:  # it had a consumer: this one
                self.delete()
            else:
                self.start_unused_countdown()

    def free_capacity(self) -> int:
        """How many more messages the consumers can take right now."""
        total = 0
        for consumer in self.consumers:
            room = consumer.room()
            if room == UNLIMITED:
                return UNLIMITED
            total += room
        return total

    def next_consumer(self) -> Consumer | None:
        """The next consumer with room, round-robin; None when all are at their prefetch."""
        consumers = self.consumers
        count = len(consumers)
        start = self.round_robin
        for offset in range(count):
            index = (start + offset) % count
            consumer = consumers[index]
            if consumer.has_room():
                self.round_robin = index + 1
                return consumer
        return None

    # -- Messages in

    def enqueue(self, message: Message, now: float) -> bool:
        """Append ``message`` (routed at loop time ``now``); False if ``x-overflow`` rejects it."""
        ready = self.ready
        if (
            len(ready) >= self.max_length
            and self.overflow != "drop-head"
            and len(ready) >= self.max_length + self.free_capacity()
        ):
            if self.overflow == "reject-publish-dlx":
                self.dead_letter(Entry(message, None, -1), "maxlen")
            return False
        ttl = message.ttl
        queue_ttl = self.message_ttl
        if queue_ttl is not None and (ttl is None or queue_ttl < ttl):
            ttl = queue_ttl
        entry = Entry(message, None if ttl is None else now + ttl / 1000, self.next_position)
        self.next_position += 1
        ready.append(entry)
        if self.consumers and not self.scheduled:
            self.scheduled = True
            self.dispatcher.add(self, now)
        if len(ready) > self.max_length and self.overflow == "drop-head":
            self.drop_head()
        if ttl is not None and self.expiry_handle is None:
            self.arm_expiry()
        return True

    def settle(self, consumer: Consumer, *, wake: bool = True) -> None:
        """One of ``consumer``'s deliveries from this queue was acked or nacked (``wake``: its room may let
        the next message go) or is being requeued by its channel's closing (``wake=False``)."""
        consumer.settled()
        self.unacked -= 1
        if wake and consumer.active and self.ready:
            self.schedule()

    def requeue(self, entries: list[Entry]) -> None:
        """Put settled entries back where they were (RabbitMQ does too), as redelivered."""
        if self.deleted:
            return
        for entry in entries:
            entry.redelivered = True
        entries = sorted(entries, key=position)
        ready = self.ready
        last = entries[-1].position
        older: list[Entry] = []  # ready messages that were enqueued before some requeued one
        while ready and ready[0].position < last:
            older.append(ready.popleft())
        if older:
            entries = list(heapq.merge(older, entries, key=position))
        ready.extendleft(reversed(entries))
        if self.consumers:
            self.schedule()
        self.arm_expiry()

    # -- Dispatch

    def schedule(self, now: float | None = None) -> None:
        """Be dispatched in the next pass (once, however often asked)."""
        if self.scheduled:
            return
        self.scheduled = True
        self.dispatcher.add(self, now)

    def dispatch(self, now: float) -> None:
        """The dispatcher's pass: hand ready messages to consumers with room, at most
        :data:`MAX_DISPATCH_BATCH` (then ask for another pass); drop those expired as of ``now``."""
        self.scheduled = False
        if self.deleted:
            return
        ready = self.ready
        consumers = self.consumers
        budget = MAX_DISPATCH_BATCH
        while ready and consumers and not self.deleted:
            entry = ready[0]
            if entry.expires_at is not None and entry.expires_at < now:
                ready.popleft()
                self.dead_letter(entry, "expired")
                continue
            consumer = self.next_consumer()
            if consumer is None:
                break
            if not budget:
                self.schedule()
                break
            budget -= 1
            ready.popleft()
            if not consumer.no_ack:
                self.unacked += 1
            consumer.deliver(entry)
        if not self.deleted:
            if self.overflow == "drop-head":
                self.drop_head()
            if self.expiry_handle is None:
                self.arm_expiry()

    # -- Dropping messages: length limit, TTL, x-expires, dead-lettering

    def drop_head(self) -> None:
        """Drop (or dead-letter) the oldest ready messages past the queue's length limit.

        The first messages, as many as consumers can take now, are not counted: they go to those consumers
        in the next dispatch pass (RabbitMQ would have handed them over at once).
        """
        ready = self.ready
        limit = self.max_length
        if len(ready) <= limit:
            return
        spared = min(self.free_capacity(), len(ready))
        while len(ready) > limit + spared:
            if spared:
                entry = ready[spared]
                del ready[spared]
            else:
                entry = ready.popleft()
            self.dead_letter(entry, "maxlen")

    def arm_expiry(self) -> None:
        """Make sure a timer fires when the head of the queue expires (RabbitMQ expires at the head)."""
        if not self.ready or self.deleted:
            return
        expires_at = self.ready[0].expires_at
        if expires_at is None:
            return
        handle = self.expiry_handle
        if handle is not None:
            if self.expiry_at <= expires_at:
                return
            handle.cancel()
        self.expiry_at = expires_at
        self.expiry_handle = self.dispatcher.loop.call_at(expires_at, self._expire)

    def _expire(self) -> None:
        self.expiry_handle = None
        if self.deleted:
            return
        now = self.dispatcher.loop.time()
        ready = self.ready
        while ready and (expires_at := ready[0].expires_at) is not None and expires_at <= now:
            self.dead_letter(ready.popleft(), "expired")
        self.arm_expiry()

    def start_unused_countdown(self) -> None:
        """(Re)start the ``x-expires`` countdown of a queue without consumers: declaring counts as use."""
        if self.expires is None or self.consumers or self.deleted:
            return
        if self.unused_handle is not None:
            self.unused_handle.cancel()
        self.unused_handle = self.dispatcher.loop.call_later(self.expires / 1000, self._unused)

    def _unused(self) -> None:
        self.unused_handle = None
        if not self.deleted and not self.consumers:
            self.delete()

    def dead_letter(self, entry: Entry, reason: str) -> None:
        """Republish a dropped message to the queue's dead-letter exchange, if it has one."""
        exchange_name = self.dead_letter_exchange
        if exchange_name is None or self.deleted:
            return
        exchange = self.vhost.find_exchange(exchange_name)
        if exchange is None:  # RabbitMQ drops it too
            return
        message = entry.message
        properties = dataclasses.replace(
            message.properties, headers=dict(message.properties.headers), expiration=None
        )
        deaths = record_death(properties, self.name, message, reason)
        routing_key = self.dead_letter_routing_key
        if routing_key is None:
            routing_key = message.routing_key
        dead = Message(exchange_name, routing_key, message.body, properties, None)
        self.vhost.route(exchange, routing_key, dead, None if reason == "rejected" else deaths)

    # -- Deletion

    def delete(self) -> None:
        """Delete with the ready messages (idempotent); its consumers' channels hear of it
        (:meth:`Consumer.cancelled_by_broker <gateway.broker.memory.consumers.Consumer.cancelled_by_broker>`)."""
        if self.deleted:
            return
        self.deleted = True
        if self.dispatcher.debug:
            logger.debug("deleting %s", self.resource())
        self.vhost.forget_queue(self)
        for exchange, binding_key in self.bindings:
            exchange.unbind(self, binding_key)
        self.bindings.clear()
        for consumer in self.consumers:
            consumer.cancelled_by_broker()
        self.consumers.clear()
        self.exclusive_consumer = None
        self.ready.clear()
        for handle in (self.expiry_handle, self.unused_handle):
            if handle is not None:
                handle.cancel()
        self.expiry_handle = self.unused_handle = None
        if self.owner is not None:
            self.owner.exclusive_queue_deleted(self)


def requeue_all(settled: Iterable[tuple[Queue, Entry]]) -> None:
    """Requeue deliveries of several queues, each queue once, in the order the queues first appear."""
    by_queue: dict[Queue, list[Entry]] = {}
    for queue, entry in settled:
        by_queue.setdefault(queue, []).append(entry)
    for queue, entries in by_queue.items():
        queue.requeue(entries)
