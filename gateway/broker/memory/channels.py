"""Channels: the AMQP methods a client calls, and the error domain they fail in.

A channel checks each call, hands it to its virtual host or a queue, and closes itself on the first
:class:`BrokerError` (except a publish nack). It owns what dies with it: its consumers, its deliveries
awaiting acknowledgement (numbered by its delivery-tag sequence) and its exclusive queues.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from gateway.broker.base import (
    BrokerError,
    Channel,
    ChannelClosed,
    DeliverCallback,
    MessageProperties,
    PublishNacked,
    check_names,
)
from gateway.broker.memory.consumers import Consumer
from gateway.broker.memory.errors import default_exchange_refused, precondition_failed
from gateway.broker.memory.messages import Entry, Message, parse_expiration
from gateway.broker.memory.queues import Queue, requeue_all
from gateway.broker.memory.vhosts import VHost, random_name

if TYPE_CHECKING:
    from gateway.broker.memory.broker import MemoryBroker, MemoryPrincipal
    from gateway.broker.memory.exchanges import Exchange

__all__ = ["MemoryChannel"]

#: A delivery awaiting ack/nack: who received it, and its entry (the consumer's queue holds its place).
_Unacked: TypeAlias = tuple[Consumer, Entry]


class MemoryChannel(Channel):
    """A channel of :class:`~gateway.broker.memory.broker.MemoryBroker`. Every :class:`BrokerError` a
    method raises (except :class:`PublishNacked`) has closed the channel: its unacknowledged deliveries went
    back to their queues, its consumers were cancelled, its exclusive queues deleted, and ``on_close`` is
    called soon after (from the event loop, never from inside the failing call). On a closed channel the
    ``async`` methods raise :class:`ChannelClosed`, while :meth:`ack`, :meth:`nack` and :meth:`cancel` do
    nothing: closing already requeued and cancelled everything. Consumer callbacks may call :meth:`ack` /
    :meth:`nack`.
    """

    def __init__(self, broker: MemoryBroker, vhost: VHost, principal: MemoryPrincipal) -> None:
        self.principal = principal
        self.on_close = None
        #: Called with the consumer tag when the broker cancels a consumer because its queue was deleted
        #: (AMQP's server-sent ``basic.cancel``; an extension: :class:`Channel` has no such hook).
        self.on_cancel: Callable[[str], None] | None = None
        self._broker = broker
        self._vhost = vhost
        self._open = True
        self._delivery_tags = itertools.count(1)
        self._unacked: dict[int, _Unacked] = {}
        self._consumers: dict[str, Consumer] = {}
        self._exclusive: dict[Queue, None] = {}

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<MemoryChannel {self.principal.login}@{self._vhost.name} {state}>"

    @property
    def is_open(self) -> bool:
        return self._open

    # -- Queues, exchanges, bindings

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
        passive: bool = False,
    ) -> str:
        try:
            self._check_open()
            check_names(queue_name=name)
            if passive:
                self._vhost.queue(name, self)
                return name
            queue, created = self._vhost.declare_queue(
                name,
                owner=self if exclusive else None,
                durable=durable,
                auto_delete=auto_delete,
                arguments=dict(arguments or {}),
                default_max_length=self._broker.max_queue_length,
            )
        except BrokerError as error:
            raise self.fail(error) from None
        if created and exclusive:
            self._exclusive[queue] = None
        return queue.name

    async def check_exchange(self, name: str) -> None:
        try:
            self._check_open()
            check_names(exchange_name=name)
            self._vhost.exchange(name)
        except BrokerError as error:
            raise self.fail(error) from None

    async def declare_exchange(self, name: str, type: str = "topic", *, durable: bool = True) -> None:
        """Declare an exchange of type ``direct``, ``fanout`` or ``topic`` (RabbitMQ's errors otherwise)."""
        try:
            self._check_open()
            check_names(exchange_name=name)
            self._vhost.declare_exchange(name, type, durable)
        except BrokerError as error:
            raise self.fail(error) from None

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        try:
            self._check_open()
            check_names(queue_name=queue, exchange_name=exchange, binding_key=routing_key)
            target, source = self._binding_ends(queue, exchange)
            target.bind(source, routing_key)
        except BrokerError as error:
            raise self.fail(error) from None

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        try:
            self._check_open()
            check_names(queue_name=queue, exchange_name=exchange, binding_key=routing_key)
            target, source = self._binding_ends(queue, exchange)
            target.unbind(source, routing_key)
        except BrokerError as error:
            raise self.fail(error) from None

    def _binding_ends(self, queue: str, exchange: str) -> tuple[Queue, Exchange]:
        if exchange == "":
            raise default_exchange_refused()
        source = self._vhost.exchange(exchange)
        return self._vhost.queue(queue, self), source

    async def delete_queue(self, name: str) -> None:
        """Delete a queue and its ready messages; deleting a missing queue succeeds (RabbitMQ 3.x)."""
        try:
            self._check_open()
            check_names(queue_name=name)
            if self._vhost.find_queue(name) is not None:
                self._vhost.queue(name, self).delete()
        except BrokerError as error:
            raise self.fail(error) from None

    # -- Consumers

    async def consume(
        self,
        queue: str,
        callback: DeliverCallback,
        *,
        no_ack: bool,
        prefetch_count: int | None = None,
        consumer_tag: str = "",
        exclusive: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        """Start a consumer; deliveries begin in a later event-loop pass. ``arguments`` are ignored."""
        try:
            self._check_open()
            check_names(queue_name=queue, consumer_tag=consumer_tag)
            if consumer_tag in self._consumers:
                raise BrokerError(530, "not_allowed", f"attempt to reuse consumer tag '{consumer_tag}'")
            source = self._vhost.queue(queue, self)
            source.check_consumable(exclusive)
        except BrokerError as error:
            raise self.fail(error) from None
        tag = consumer_tag or random_name("amq.ctag-")
        consumer = Consumer(
            tag,
            self,
            source,
            callback,
            no_ack=no_ack,
            prefetch=max(prefetch_count or 0, 0),
            delivery_tags=self._delivery_tags,
        )
        self._consumers[tag] = consumer
        source.add_consumer(consumer, exclusive=exclusive)
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer (an unknown tag is ignored, as RabbitMQ does). Its unacknowledged deliveries
        stay on this channel until ack/nack or close; an auto-delete queue losing its last consumer goes.
        On a closed channel it does nothing: closing cancelled every consumer."""
        consumer = self._consumers.pop(consumer_tag, None)
        if consumer is not None:
            consumer.queue.remove_consumer(consumer)

    # -- Publishing

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties,
        *,
        confirm: bool = False,
    ) -> None:
        """Route the message now. A missing exchange raises 404 (and closes the channel, as RabbitMQ
        does). An unroutable message is dropped and still confirmed; ``confirm=True`` raises
        :class:`PublishNacked` (the channel stays open) if an ``x-overflow: reject-publish`` queue
        refused it. ``properties`` is copied: the caller may reuse it."""
        try:
            self._check_open()
            check_names(exchange_name=exchange, routing_key=routing_key)
            if exchange == "amq.default":
                exchange = ""
            target = self._vhost.exchange(exchange)
            ttl = None if properties.expiration is None else parse_expiration(properties.expiration)
        except BrokerError as error:
            raise self.fail(error) from None
        message = Message(
            exchange,
            routing_key,
            body,
            dataclasses.replace(properties, headers=dict(properties.headers)),
            ttl,
        )
        refused = self._vhost.route(target, routing_key, message)
        if refused is not None and confirm:
            raise PublishNacked(f"{refused.resource()} is full (x-overflow '{refused.overflow}')")

    # -- Acknowledgements

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Acknowledge; ``multiple`` covers every earlier tag too, and tag 0 with ``multiple`` all of
        them. An unknown tag closes the channel with ``406 precondition_failed`` (``on_close``)."""
        for consumer, _ in self._settle(delivery_tag, multiple):
            consumer.queue.settle(consumer)

    def nack(self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True) -> None:
        """As :meth:`ack`, but the messages go back to the head of their queues (redelivered) or, with
        ``requeue=False``, to their queue's dead-letter exchange (``reason: rejected``) or nowhere."""
        settled = self._settle(delivery_tag, multiple)
        for consumer, _ in settled:
            consumer.queue.settle(consumer)
        if requeue:
            requeue_all((consumer.queue, entry) for consumer, entry in settled)
        else:
            for consumer, entry in settled:
                consumer.queue.dead_letter(entry, "rejected")

    def _settle(self, delivery_tag: int, multiple: bool) -> list[_Unacked]:
        if not self._open:
            return []  # already requeued when the channel closed
        unacked = self._unacked
        if multiple and delivery_tag == 0:
            settled = list(unacked.values())
            unacked.clear()
            return settled
        last = unacked.pop(delivery_tag, None)
        if last is None:
            self.fail(precondition_failed(f"unknown delivery tag {delivery_tag}"))
            return []
        if not multiple:
            return [last]
        earlier = list(itertools.takewhile(lambda tag: tag < delivery_tag, unacked))
        settled = [unacked.pop(tag) for tag in earlier]
        settled.append(last)
        return settled

    # -- Called by consumers and queues

    def track(self, delivery_tag: int, consumer: Consumer, entry: Entry) -> None:
        """``consumer`` is being given ``entry`` under ``delivery_tag`` and must ack or nack it."""
        self._unacked[delivery_tag] = (consumer, entry)

    def consumer_cancelled(self, consumer_tag: str) -> None:
        """The broker cancelled a consumer of this channel (its queue was deleted): tell ``on_cancel``
        soon, if the channel is still open."""
        self._consumers.pop(consumer_tag, None)
        if self.on_cancel is not None and self._open:
            self._broker.loop.call_soon(self.on_cancel, consumer_tag)

    def exclusive_queue_deleted(self, queue: Queue) -> None:
        self._exclusive.pop(queue, None)

    # -- Closing

    async def close(self) -> None:
        self._shutdown()

    def fail(self, error: BrokerError) -> BrokerError:
        """Close because of ``error`` and tell ``on_close`` soon; return ``error`` for the caller to raise.
        The broker calls it too, when it stops. Does nothing more on a closed channel."""
        if self._open:
            self._shutdown()
            if self.on_close is not None:
                self._broker.loop.call_soon(self.on_close, error)
        return error

    def _check_open(self) -> None:
        if not self._open:
            raise ChannelClosed()

    def _shutdown(self) -> None:
        if not self._open:
            return
        self._open = False
        self._broker.forget_channel(self)
        settled = list(self._unacked.values())
        self._unacked.clear()
        for consumer, _ in settled:
            consumer.queue.settle(consumer, wake=False)
        requeue_all((consumer.queue, entry) for consumer, entry in settled)
        for consumer in list(self._consumers.values()):
            self._consumers.pop(consumer.tag, None)
            consumer.queue.remove_consumer(consumer)
        for queue in list(self._exclusive):
            queue.delete()
