"""A virtual host: the namespace of exchanges and queues, and where a published message enters.

Channels look names up here (with RabbitMQ's errors), declare through it, and publish through
:meth:`VHost.route`, which asks the exchange for the queues and appends the message to each. Queues come
back here to dead-letter (:meth:`VHost.find_exchange`, :meth:`VHost.route`) and when they are deleted
(:meth:`VHost.forget_queue`).
"""

from __future__ import annotations

import base64
import logging
import os
from typing import TYPE_CHECKING, Any

from gateway.broker.base import BrokerError
from gateway.broker.memory.errors import (
    access_refused,
    default_exchange_refused,
    flag,
    inequivalent,
    not_found,
    resource,
)
from gateway.broker.memory.exchanges import (
    EXCHANGE_TYPES,
    DefaultExchange,
    DirectExchange,
    Exchange,
    FanoutExchange,
    TopicExchange,
    create_exchange,
)
from gateway.broker.memory.messages import Message, is_cycle
from gateway.broker.memory.queues import Dispatcher, Queue

if TYPE_CHECKING:
    from gateway.broker.memory.channels import MemoryChannel

__all__ = ["VHost", "random_name"]

logger = logging.getLogger("gateway.broker.memory")


def random_name(prefix: str) -> str:
    """A server-chosen name (``amq.gen-...`` queues, ``amq.ctag-...`` consumer tags), as RabbitMQ makes them."""
    return prefix + base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")


class VHost:
    """One virtual host, with AMQP's pre-declared exchanges (the default one, ``amq.direct``,
    ``amq.fanout``, ``amq.topic``). Its tables are read-only for others: use the methods."""

    __slots__ = ("dispatcher", "exchanges", "name", "queues")

    def __init__(self, name: str, dispatcher: Dispatcher) -> None:
        self.name = name
        self.dispatcher = dispatcher
        self.queues: dict[str, Queue] = {}
        self.exchanges: dict[str, Exchange] = {
            "": DefaultExchange(self.queues),
            "amq.direct": DirectExchange("amq.direct", True),
            "amq.fanout": FanoutExchange("amq.fanout", True),
            "amq.topic": TopicExchange("amq.topic", True),
        }

    # -- Lookups (raise the BrokerError RabbitMQ would)

    def exchange(self, name: str) -> Exchange:
        exchange = self.exchanges.get(name)
        if exchange is None:
            raise not_found("exchange", name, self.name)
        return exchange

    def find_exchange(self, name: str) -> Exchange | None:
        return self.exchanges.get(name)

    def queue(self, name: str, channel: MemoryChannel) -> Queue:
        """Queue ``name`` as ``channel`` may use it: 404 if missing, 405 if another channel's exclusive."""
        queue = self.queues.get(name)
        if queue is None:
            raise not_found("queue", name, self.name)
        queue.check_access(channel)
        return queue

    def find_queue(self, name: str) -> Queue | None:
        return self.queues.get(name)

    # -- Declarations

    def declare_exchange(self, name: str, type: str, durable: bool) -> None:
        """Create exchange ``name`` or check that it matches (RabbitMQ's errors otherwise)."""
        if type not in EXCHANGE_TYPES:
            raise BrokerError(503, "command_invalid", f"unknown exchange type '{type}'")
        if name == "":
            raise default_exchange_refused()
        exchange = self.exchanges.get(name)
        if exchange is None:
            if name.startswith("amq."):
                raise access_refused(f"exchange name '{name}' contains reserved prefix 'amq.*'")
            self.exchanges[name] = create_exchange(name, type, durable)
            return
        where = resource("exchange", name, self.name)
        if exchange.type != type:
            raise inequivalent("type", where, f"'{type}'", f"'{exchange.type}'")
        if exchange.durable != durable:
            raise inequivalent("durable", where, flag(durable), flag(exchange.durable))

    def declare_queue(
        self,
        name: str,
        *,
        owner: MemoryChannel | None,
        durable: bool,
        auto_delete: bool,
        arguments: dict[str, Any],
        default_max_length: int,
    ) -> tuple[Queue, bool]:
        """Create queue ``name`` (a fresh ``amq.gen-`` name if empty) or check that the existing one
        matches; either way restart its ``x-expires`` countdown. Return it and whether it is new.

        ``owner`` is the declaring channel for an exclusive queue, else None; ``default_max_length`` is the
        limit for a queue declared without ``x-max-length``.
        """
        if name:
            if name.startswith("amq."):
                raise access_refused(f"queue name '{name}' contains reserved prefix 'amq.*'")
            existing = self.queues.get(name)
            if existing is not None:
                existing.check_equivalent(owner, durable, auto_delete, arguments)
                existing.start_unused_countdown()  # a redeclare counts as use
                return existing, False
        else:
            name = random_name("amq.gen-")
            while name in self.queues:
                name = random_name("amq.gen-")
        queue = Queue(
            self,
            name,
            durable=durable,
            auto_delete=auto_delete,
            owner=owner,
            arguments=arguments,
            default_max_length=default_max_length,
            dispatcher=self.dispatcher,
        )
        self.queues[name] = queue
        queue.start_unused_countdown()
        if self.dispatcher.debug:
            logger.debug("declared %s", queue.resource())
        return queue, True

    def forget_queue(self, queue: Queue) -> None:
        """Called by :meth:`Queue.delete`: the name is free again."""
        self.queues.pop(queue.name, None)

    def delete_queues(self) -> None:
        """Delete every queue (the broker is stopping)."""
        for queue in list(self.queues.values()):
            queue.delete()

    # -- Publishing

    def route(
        self, exchange: Exchange, routing_key: str, message: Message, deaths: list[Any] | None = None
    ) -> Queue | None:
        """Put ``message`` on every queue ``exchange`` routes it to; return a queue that refused it.

        ``deaths`` (a dead-lettered message's ``x-death``) skips the queues it would cycle back to.
        """
        now = self.dispatcher.loop.time()
        refused = None
        for queue in exchange.route(routing_key):
            if deaths is not None and is_cycle(queue.name, deaths):
                continue
            if not queue.enqueue(message, now):
                refused = queue
        return refused
