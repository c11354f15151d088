"""The embedded broker: the gateway's default when no RabbitMQ URL is configured.

An in-process model of the part of AMQP 0-9-1 that RabbitMQ's STOMP destinations need, for one asyncio
process: the default, ``direct``, ``fanout`` and ``topic`` exchanges (``amq.direct``, ``amq.fanout`` and
``amq.topic`` pre-declared), queues with the ``durable`` / ``exclusive`` / ``auto_delete`` flags and the
``x-message-ttl``, ``x-max-length``, ``x-overflow``, ``x-dead-letter-exchange``,
``x-dead-letter-routing-key`` and ``x-expires`` arguments, competing consumers with a per-consumer
prefetch, acknowledgements by delivery tag (a requeued message goes back to its original place, flagged
``redelivered``), dead-lettering with ``x-death`` headers, and publisher confirms. Errors use RabbitMQ's
reply codes and texts, so a client sees the same ERROR frame whichever broker stands behind the gateway.

Everything lives in memory: ``durable`` is remembered (a redeclare must match it) but nothing survives a
restart of the process, nor :meth:`MemoryBroker.close` followed by :meth:`MemoryBroker.start`.

Where it differs from RabbitMQ, on purpose:

* An exclusive queue is owned by the *channel* that declared it (RabbitMQ: by the connection) and is
  deleted when that channel closes. Another channel that declares, consumes, binds or deletes it gets
  ``405 resource_locked`` (as does a redeclare with the other ``exclusive`` flag, like RabbitMQ).
* Deliveries are handed to consumers from a callback the event loop runs soon after the publish (never
  from inside :meth:`MemoryChannel.publish`); one pass delivers everything pending on every queue.
  ``x-max-length`` / ``x-overflow`` count the messages that wait for that pass only as far as consumers
  cannot take them, which gives RabbitMQ's "deliver straight to a waiting consumer" behaviour.
* Every :class:`~gateway.broker.base.Delivery` of one message shares one
  :class:`~gateway.broker.base.MessageProperties` (a private copy made at publish time): consumers must
  treat it, and its ``headers``, as read-only.
* ``headers`` exchanges, consumer priorities, ``x-max-length-bytes``, ``x-max-priority``, queue types
  and ``basic.get`` are not modelled; unknown ``x-`` arguments are stored and ignored.

Named limits: :data:`MAX_QUEUE_LENGTH` (a queue without ``x-max-length`` keeps at most this many ready
messages, dropping the oldest), :data:`MAX_DISPATCH_BATCH` (deliveries per queue per event-loop pass) and
:data:`ROUTE_CACHE_SIZE` (routing keys remembered per topic exchange).

One module per concept, each using the others through their public methods only:

* :mod:`~gateway.broker.memory.broker`: :class:`MemoryBroker` (users, virtual hosts, open channels);
* :mod:`~gateway.broker.memory.channels`: :class:`MemoryChannel`, the AMQP methods and their error domain;
* :mod:`~gateway.broker.memory.vhosts`: a virtual host's exchanges and queues, and where a message enters;
* :mod:`~gateway.broker.memory.exchanges`: routing keys to queues (default, direct, fanout, topic);
* :mod:`~gateway.broker.memory.queues`: ready messages, limits, TTLs, dead-lettering, the dispatch pass;
* :mod:`~gateway.broker.memory.consumers`: prefetch and the call of a consumer's callback;
* :mod:`~gateway.broker.memory.messages` and :mod:`~gateway.broker.memory.errors`: values and RabbitMQ's texts.

A message's path, one way: :meth:`MemoryChannel.publish` → ``VHost.route`` → ``Exchange.route`` (the
queues) → ``Queue.enqueue`` → ``Dispatcher.add`` (one ``call_soon`` per pass) → ``Queue.dispatch`` →
``Consumer.deliver`` → the callback. Its acknowledgement: :meth:`MemoryChannel.ack` → ``Queue.settle``
(the consumer has room again; the queue asks for a pass if messages wait).
"""

from __future__ import annotations

from gateway.broker.memory.broker import MemoryBroker, MemoryPrincipal
from gateway.broker.memory.channels import MemoryChannel
from gateway.broker.memory.exchanges import EXCHANGE_TYPES, ROUTE_CACHE_SIZE
from gateway.broker.memory.queues import MAX_DISPATCH_BATCH, MAX_QUEUE_LENGTH, OVERFLOW_MODES, QueueInfo

__all__ = [
    "EXCHANGE_TYPES",
    "MAX_DISPATCH_BATCH",
    "MAX_QUEUE_LENGTH",
    "OVERFLOW_MODES",
    "ROUTE_CACHE_SIZE",
    "MemoryBroker",
    "MemoryChannel",
    "MemoryPrincipal",
    "QueueInfo",
]
