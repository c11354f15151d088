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
"""

from __future__ import annotations

import abc
import asyncio
import base64
import dataclasses
import heapq
import hmac
import itertools
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

from gateway.broker.base import (
    AccessRefused,
    Broker,
    BrokerError,
    BrokerUnavailable,
    Channel,
    ChannelClosed,
    DeliverCallback,
    Delivery,
    MessageProperties,
    PublishNacked,
    VhostNotFound,
    check_names,
)

__all__ = [
    "MAX_DISPATCH_BATCH",
    "MAX_QUEUE_LENGTH",
    "ROUTE_CACHE_SIZE",
    "MemoryBroker",
    "MemoryChannel",
    "MemoryPrincipal",
    "QueueInfo",
]

logger = logging.getLogger(__name__)

#: Ready messages a queue keeps when it has no ``x-max-length`` of its own; past it the oldest is dropped
#: (or dead-lettered), RabbitMQ's ``drop-head`` overflow. Bounds the memory of a queue nobody consumes.
MAX_QUEUE_LENGTH: Final = 100_000

#: Deliveries one queue makes in one event-loop pass before it yields to other work (I/O, other tasks).
MAX_DISPATCH_BATCH: Final = 10_000

#: Routing keys whose matching bindings a topic exchange remembers; the oldest is forgotten first.
ROUTE_CACHE_SIZE: Final = 4096

EXCHANGE_TYPES: Final = frozenset({"direct", "fanout", "topic"})
OVERFLOW_MODES: Final = ("drop-head", "reject-publish", "reject-publish-dlx")

#: Queue arguments a redeclare must repeat with the same value (RabbitMQ's list, less queue types).
_EQUIVALENT_ARGS: Final = (
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

_UNLIMITED: Final = sys.maxsize
_SHUTDOWN_TEXT: Final = "broker forced connection closure with reason 'shutdown'"


# --------------------------------------------------------------------------------------------------------
# RabbitMQ's error texts


def _resource(kind: str, name: str, vhost: str) -> str:
    return f"{kind} '{name}' in vhost '{vhost}'"


def _not_found(kind: str, name: str, vhost: str) -> BrokerError:
    return BrokerError(404, "not_found", f"no {_resource(kind, name, vhost)}")


def _precondition_failed(text: str) -> BrokerError:
    return BrokerError(406, "precondition_failed", text)


def _access_refused(text: str) -> BrokerError:
    return BrokerError(403, "access_refused", text)


def _locked(name: str, vhost: str) -> BrokerError:
    return BrokerError(
        405,
        "resource_locked",
        f"cannot obtain exclusive access to locked {_resource('queue', name, vhost)}. It could be originally"
        " declared on another connection or the exclusive property value does not match that of the"
        " original declaration.",
    )


def _inequivalent(key: str, resource: str, received: str, current: str) -> BrokerError:
    return _precondition_failed(
        f"inequivalent arg '{key}' for {resource}: received {received} but current is {current}"
    )


def _flag(value: bool) -> str:
    return "'true'" if value else "'false'"


def _type_name(value: object) -> str:
    """The AMQP field-table type RabbitMQ would name for ``value``."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str | bytes):
        return "longstr"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _arg_value(value: object) -> str:
    if value is _MISSING:
        return "none"
    return f"the value '{value}' of type '{_type_name(value)}'"


_MISSING: Final = object()


def _random_name(prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class MemoryPrincipal:
    """Who a channel acts for: what :meth:`MemoryBroker.authenticate` returns."""

    login: str
    vhost: str


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


class _Message:
    """One published message; shared by every queue it was routed to."""

    __slots__ = ("body", "exchange", "properties", "routing_key", "ttl")

    def __init__(
        self, exchange: str, routing_key: str, body: bytes, properties: MessageProperties, ttl: int | None
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties
        self.ttl = ttl  # per-message TTL in ms, from the ``expiration`` property


class _Entry:
    """A message's place in one queue."""

    __slots__ = ("expires_at", "message", "position", "redelivered")

    def __init__(self, message: _Message, expires_at: float | None, position: int) -> None:
        self.message = message
        self.expires_at = expires_at  # loop time
        self.position = position  # enqueue order in its queue: a requeue puts it back there
        self.redelivered = False


class _Consumer:
    __slots__ = ("active", "callback", "channel", "no_ack", "prefetch", "queue", "tag", "unacked")

    def __init__(
        self,
        tag: str,
        channel: MemoryChannel,
        queue: _Queue,
        callback: DeliverCallback,
        no_ack: bool,
        prefetch: int,
    ) -> None:
        self.tag = tag
        self.channel = channel
        self.queue = queue
        self.callback = callback
        self.no_ack = no_ack
        self.prefetch = prefetch  # 0 = unlimited
        self.unacked = 0
        self.active = True

    def has_room(self) -> bool:
        return self.no_ack or not self.prefetch or self.unacked < self.prefetch


def _position(entry: _Entry) -> int:
    return entry.position


_Unacked: TypeAlias = "tuple[_Queue, _Entry, _Consumer]"


class _Queue:
    __slots__ = (
        "arguments",
        "auto_delete",
        "bindings",
        "consumers",
        "dead_letter_exchange",
        "dead_letter_routing_key",
        "deleted",
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
        vhost: _VHost,
        name: str,
        *,
        durable: bool,
        auto_delete: bool,
        owner: MemoryChannel | None,
        arguments: dict[str, Any],
        default_max_length: int,
    ) -> None:
        self.vhost = vhost
        self.name = name
        self.durable = durable
        self.auto_delete = auto_delete
        self.owner = owner
        self.arguments = arguments
        resource = _resource("queue", name, vhost.name)
        self.message_ttl = _int_argument(arguments, "x-message-ttl", resource)
        max_length = _int_argument(arguments, "x-max-length", resource)
        self.max_length = default_max_length if max_length is None else max_length
        self.expires = _int_argument(arguments, "x-expires", resource, zero_ok=False)
        self.dead_letter_exchange = _str_argument(arguments, "x-dead-letter-exchange", resource)
        self.dead_letter_routing_key = _str_argument(arguments, "x-dead-letter-routing-key", resource)
        if self.dead_letter_routing_key is not None and self.dead_letter_exchange is None:
            raise _precondition_failed(
                f"invalid arg 'x-dead-letter-routing-key' for {resource}: routing_key_but_no_dlx_defined"
            )
        overflow = _str_argument(arguments, "x-overflow", resource)
        if overflow is not None and overflow not in OVERFLOW_MODES:
            raise _precondition_failed(
                f"invalid arg 'x-overflow' for {resource}: {{invalid_overflow_value,<<\"{overflow}\">>}}"
            )
        self.overflow = overflow or "drop-head"
        self.ready: deque[_Entry] = deque()  # ordered by position
        self.next_position = 0
        self.consumers: list[_Consumer] = []
        self.exclusive_consumer: _Consumer | None = None
        self.round_robin = 0
        self.unacked = 0
        self.bindings: dict[tuple[_Exchange, str], None] = {}
        self.deleted = False
        self.scheduled = False
        self.expiry_handle: asyncio.TimerHandle | None = None
        self.expiry_at = 0.0
        self.unused_handle: asyncio.TimerHandle | None = None

    def resource(self) -> str:
        return _resource("queue", self.name, self.vhost.name)

    def free_capacity(self) -> int:
        """How many more messages the consumers can take right now."""
        total = 0
        for consumer in self.consumers:
            if consumer.no_ack or not consumer.prefetch:
                return _UNLIMITED
            total += max(consumer.prefetch - consumer.unacked, 0)
        return total

    def next_consumer(self) -> _Consumer | None:
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


def _int_argument(
    arguments: Mapping[str, Any], key: str, resource: str, *, zero_ok: bool = True
) -> int | None:
    if key not in arguments:
        return None
    value = arguments[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _precondition_failed(
            f"invalid arg '{key}' for {resource}: {{unacceptable_type,{_type_name(value)}}}"
        )
    if value < 0:
        raise _precondition_failed(f"invalid arg '{key}' for {resource}: {{value_negative,{value}}}")
    if value == 0 and not zero_ok:
        raise _precondition_failed(f"invalid arg '{key}' for {resource}: {{value_zero,0}}")
    return value


def _str_argument(arguments: Mapping[str, Any], key: str, resource: str) -> str | None:
    if key not in arguments:
        return None
    value = arguments[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise _precondition_failed(
            f"invalid arg '{key}' for {resource}: {{unacceptable_type,{_type_name(value)}}}"
        )
    return value


def _parse_expiration(expiration: str) -> int:
    try:
        ttl = int(expiration)
    except ValueError:
        raise _precondition_failed(f"invalid expiration '{expiration}': no_integer") from None
    if ttl < 0:
        raise _precondition_failed(f"invalid expiration '{expiration}': {{value_negative,{ttl}}}")
    return ttl


# --------------------------------------------------------------------------------------------------------
# Exchanges: each turns a routing key into the queues it reaches


class _Exchange(abc.ABC):
    __slots__ = ("durable", "name", "type")

    def __init__(self, name: str, type: str, durable: bool) -> None:
        self.name = name
        self.type = type
        self.durable = durable

    @abc.abstractmethod
    def route(self, routing_key: str) -> Iterable[_Queue]:
        """The queues a message with ``routing_key`` goes to, each once. Do not bind while iterating."""

    @abc.abstractmethod
    def bind(self, queue: _Queue, binding_key: str) -> None: ...

    @abc.abstractmethod
    def unbind(self, queue: _Queue, binding_key: str) -> None: ...


class _DefaultExchange(_Exchange):
    """The nameless exchange: every queue is implicitly bound to it under its own name."""

    __slots__ = ("_queues",)

    def __init__(self, queues: dict[str, _Queue]) -> None:
        super().__init__("", "direct", True)
        self._queues = queues

    def route(self, routing_key: str) -> Iterable[_Queue]:
        queue = self._queues.get(routing_key)
        return () if queue is None else (queue,)

    def bind(self, queue: _Queue, binding_key: str) -> None:
        raise BrokerError(403, "access_refused", "operation not permitted on the default exchange")

    unbind = bind


class _DirectExchange(_Exchange):
    __slots__ = ("_routes",)

    def __init__(self, name: str, durable: bool) -> None:
        super().__init__(name, "direct", durable)
        self._routes: dict[str, dict[_Queue, None]] = {}

    def route(self, routing_key: str) -> Iterable[_Queue]:
        return self._routes.get(routing_key, ())

    def bind(self, queue: _Queue, binding_key: str) -> None:
        self._routes.setdefault(binding_key, {})[queue] = None

    def unbind(self, queue: _Queue, binding_key: str) -> None:
        queues = self._routes.get(binding_key)
        if queues is not None:
            queues.pop(queue, None)
            if not queues:
                del self._routes[binding_key]


class _FanoutExchange(_Exchange):
    __slots__ = ("_queues",)

    def __init__(self, name: str, durable: bool) -> None:
        super().__init__(name, "fanout", durable)
        self._queues: dict[_Queue, set[str]] = {}  # queue -> its binding keys (one copy each message)

    def route(self, routing_key: str) -> Iterable[_Queue]:
        return self._queues

    def bind(self, queue: _Queue, binding_key: str) -> None:
        self._queues.setdefault(queue, set()).add(binding_key)

    def unbind(self, queue: _Queue, binding_key: str) -> None:
        keys = self._queues.get(queue)
        if keys is not None:
            keys.discard(binding_key)
            if not keys:
                del self._queues[queue]


def _split_topic(key: str) -> list[str]:
    """RabbitMQ's split: ``""`` is zero words, ``"a."`` is ``["a", ""]``."""
    return key.split(".") if key else []


class _TopicNode:
    __slots__ = ("children", "queues")

    def __init__(self) -> None:
        self.children: dict[str, _TopicNode] = {}
        self.queues: dict[_Queue, None] = {}  # queues whose binding key ends at this node


class _TopicExchange(_Exchange):
    """Binding keys live in a trie of words (``*`` and ``#`` are children like any other word).

    A routing key's match is the set of trie nodes it reaches; it is cached per routing key and the cache
    is cleared whenever a binding changes. Publishing to a cached key costs a dict lookup.
    """

    __slots__ = ("_cache", "_root")

    def __init__(self, name: str, durable: bool) -> None:
        super().__init__(name, "topic", durable)
        self._root = _TopicNode()
        # routing key -> (nodes matched, whether their queue sets are disjoint)
        self._cache: dict[str, tuple[tuple[_TopicNode, ...], bool]] = {}

    def route(self, routing_key: str) -> Iterable[_Queue]:
        hit = self._cache.get(routing_key)
        if hit is None:
            hit = self._remember(routing_key)
        nodes, disjoint = hit
        if len(nodes) == 1:
            return nodes[0].queues
        if not nodes:
            return ()
        queues = itertools.chain.from_iterable(node.queues for node in nodes)
        return queues if disjoint else dict.fromkeys(queues)

    def _remember(self, routing_key: str) -> tuple[tuple[_TopicNode, ...], bool]:
        nodes = self._match(_split_topic(routing_key))
        disjoint = True
        if len(nodes) > 1:
            sizes = sum(len(node.queues) for node in nodes)
            disjoint = sizes == len({queue for node in nodes for queue in node.queues})
        cache = self._cache
        if len(cache) >= ROUTE_CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[routing_key] = hit = (nodes, disjoint)
        return hit

    def _match(self, words: list[str]) -> tuple[_TopicNode, ...]:
        found: dict[_TopicNode, None] = {}
        end = len(words)
        seen: set[tuple[_TopicNode, int]] = set()
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if (node, index) in seen:
                continue
            seen.add((node, index))
            children = node.children
            hash_child = children.get("#")
            if hash_child is not None:  # "#" eats zero or more words
                stack.extend((hash_child, later) for later in range(index, end + 1))
            if index == end:
                if node.queues:
                    found[node] = None
                continue
            word = words[index]
            if word != "*" and word != "#":
                child = children.get(word)
                if child is not None:
                    stack.append((child, index + 1))
            star_child = children.get("*")
            if star_child is not None:
                stack.append((star_child, index + 1))
        return tuple(found)

    def bind(self, queue: _Queue, binding_key: str) -> None:
        node = self._root
        for word in _split_topic(binding_key):
            child = node.children.get(word)
            if child is None:
                child = node.children[word] = _TopicNode()
            node = child
        node.queues[queue] = None
        self._cache.clear()

    def unbind(self, queue: _Queue, binding_key: str) -> None:
        path: list[tuple[_TopicNode, str]] = []
        node = self._root
        for word in _split_topic(binding_key):
            child = node.children.get(word)
            if child is None:
                return
            path.append((node, word))
            node = child
        node.queues.pop(queue, None)
        while path and not node.queues and not node.children:  # prune dead branches
            parent, word = path.pop()
            del parent.children[word]
            node = parent
        self._cache.clear()


_EXCHANGE_CLASSES: Final[dict[str, Callable[[str, bool], _Exchange]]] = {
    "direct": _DirectExchange,
    "fanout": _FanoutExchange,
    "topic": _TopicExchange,
}


class _VHost:
    __slots__ = ("exchanges", "name", "queues")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[str, _Queue] = {}
        self.exchanges: dict[str, _Exchange] = {
            "": _DefaultExchange(self.queues),
            "amq.direct": _DirectExchange("amq.direct", True),
            "amq.fanout": _FanoutExchange("amq.fanout", True),
            "amq.topic": _TopicExchange("amq.topic", True),
        }


# --------------------------------------------------------------------------------------------------------
# Dead-lettering


def _record_death(properties: MessageProperties, queue: _Queue, message: _Message, reason: str) -> list[Any]:
    """Add this death to ``properties.headers`` (a private copy) as RabbitMQ does; return ``x-death``."""
    headers = properties.headers
    previous = headers.get("x-death")
    deaths: list[Any] = list(previous) if isinstance(previous, list) else []
    for index, death in enumerate(deaths):
        if isinstance(death, dict) and death.get("queue") == queue.name and death.get("reason") == reason:
            death = dict(death)
            count = death.get("count")
            death["count"] = count + 1 if isinstance(count, int) else 1
            del deaths[index]
            break
    else:
        death = {
            "count": 1,
            "reason": reason,
            "queue": queue.name,
            "time": datetime.now(UTC).replace(microsecond=0),
            "exchange": message.exchange,
            "routing-keys": [message.routing_key],
        }
        if message.properties.expiration is not None:
            death["original-expiration"] = message.properties.expiration
    deaths.insert(0, death)
    headers["x-death"] = deaths
    for prefix in ("x-first-death", "x-last-death"):
        if prefix == "x-last-death" or f"{prefix}-reason" not in headers:
            headers[f"{prefix}-reason"] = reason
            headers[f"{prefix}-queue"] = queue.name
            headers[f"{prefix}-exchange"] = message.exchange
    return deaths


def _is_cycle(queue_name: str, deaths: list[Any]) -> bool:
    """A dead-lettered message would come back to a queue it died in with no rejection since."""
    for death in deaths:  # newest first
        if not isinstance(death, dict) or death.get("reason") == "rejected":
            return False
        if death.get("queue") == queue_name:
            return True
    return False


# --------------------------------------------------------------------------------------------------------
# The broker


class MemoryBroker(Broker):
    """The embedded broker. Use it from one event loop; :meth:`start` binds it to the running loop.

    ``users`` maps login to passcode (default ``{"guest": "guest"}``), ``vhosts`` names the virtual hosts
    (each has its own exchanges and queues), ``max_queue_length`` is the per-queue default of
    :data:`MAX_QUEUE_LENGTH` for queues declared without ``x-max-length``.
    """

    kind = "memory"

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        vhosts: Iterable[str] = ("/",),
        *,
        max_queue_length: int = MAX_QUEUE_LENGTH,
    ) -> None:
        self._users = dict({"guest": "guest"} if users is None else users)
        self._vhost_names = frozenset(vhosts)
        self.max_queue_length = max_queue_length
        self.debug = False
        self._vhosts: dict[str, _VHost] = {}
        self._channels: dict[MemoryChannel, None] = {}
        self._available = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty: list[_Queue] = []
        self._dispatch_handle: asyncio.Handle | None = None
        self._dispatch_time = 0.0

    # -- Broker interface

    @property
    def is_available(self) -> bool:
        return self._available

    async def start(self) -> None:
        """Start with empty vhosts (only the pre-declared exchanges). Idempotent while started."""
        if self._available:
            return
        self._loop = asyncio.get_running_loop()
        self.debug = logger.isEnabledFor(logging.DEBUG)
        self._vhosts = {name: _VHost(name) for name in self._vhost_names}
        self._available = True

    async def authenticate(self, login: str, passcode: str, vhost: str) -> MemoryPrincipal:
        if not self._available:
            raise BrokerUnavailable()
        expected = self._users.get(login)
        if expected is None or not hmac.compare_digest(expected.encode(), passcode.encode()):
            raise AccessRefused(login)
        if vhost not in self._vhosts:
            raise VhostNotFound(vhost)
        return MemoryPrincipal(login, vhost)

    async def open_channel(self, principal: Any, owner: str | None = None) -> MemoryChannel:
        if not self._available:
            raise BrokerUnavailable()
        if not isinstance(principal, MemoryPrincipal):
            raise TypeError(f"not a principal of this broker: {principal!r}")
        vhost = self._vhosts.get(principal.vhost)
        if vhost is None:
            raise VhostNotFound(principal.vhost)
        channel = MemoryChannel(self, vhost, principal)
        self._channels[channel] = None
        return channel

    async def close(self) -> None:
        """Stop: every open channel closes (its ``on_close`` gets :class:`BrokerUnavailable`), all
        exchanges, queues and messages are dropped."""
        if not self._available:
            return
        self._available = False
        error = BrokerUnavailable(_SHUTDOWN_TEXT)
        for channel in list(self._channels):
            channel._fail(error)
        for vhost in self._vhosts.values():
            for queue in list(vhost.queues.values()):
                self._delete_queue(queue)
        self._vhosts = {}
        if self._dispatch_handle is not None:
            self._dispatch_handle.cancel()
            self._dispatch_handle = None
        self._dirty = []

    def shared_key(self, principal: Any) -> tuple[str, str]:
        return (principal.login, principal.vhost)

    # -- Introspection

    def queue_info(self, name: str, vhost: str = "/") -> QueueInfo | None:
        """A snapshot of queue ``name``, or None if it does not exist."""
        host = self._vhosts.get(vhost)
        queue = None if host is None else host.queues.get(name)
        if queue is None:
            return None
        return QueueInfo(
            name=queue.name,
            durable=queue.durable,
            exclusive=queue.owner is not None,
            auto_delete=queue.auto_delete,
            arguments=dict(queue.arguments),
            messages_ready=len(queue.ready),
            messages_unacknowledged=queue.unacked,
            consumers=len(queue.consumers),
        )

    # -- The engine: routing, queueing, dispatch

    @property
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "MemoryBroker.start() was not called"
        return self._loop

    def _route(
        self,
        exchange: _Exchange,
        routing_key: str,
        message: _Message,
        deaths: list[Any] | None = None,
    ) -> _Queue | None:
        """Put ``message`` on every queue ``exchange`` routes it to; return a queue that refused it."""
        now = self._running_loop.time()
        refused = None
        for queue in exchange.route(routing_key):
            if deaths is not None and _is_cycle(queue.name, deaths):
                continue
            if not self._enqueue(queue, message, now):
                refused = queue
        return refused

    def _enqueue(self, queue: _Queue, message: _Message, now: float) -> bool:
        """Append to ``queue``; False if its ``x-overflow`` rejects the message."""
        ready = queue.ready
        if (
            len(ready) >= queue.max_length
            and queue.overflow != "drop-head"
            and len(ready) >= queue.max_length + queue.free_capacity()
        ):
            if queue.overflow == "reject-publish-dlx":
                self._dead_letter(queue, _Entry(message, None, -1), "maxlen")
            return False
        ttl = message.ttl
        queue_ttl = queue.message_ttl
        if queue_ttl is not None and (ttl is None or queue_ttl < ttl):
            ttl = queue_ttl
        entry = _Entry(message, None if ttl is None else now + ttl / 1000, queue.next_position)
        queue.next_position += 1
        ready.append(entry)
        if queue.consumers and not queue.scheduled:
            self._schedule(queue, now)
        if len(ready) > queue.max_length and queue.overflow == "drop-head":
            self._drop_head(queue)
        if ttl is not None and queue.expiry_handle is None:
            self._arm_expiry(queue)
        return True

    def _drop_head(self, queue: _Queue) -> None:
        """Drop (or dead-letter) the oldest ready messages past the queue's length limit.

        The first messages, as many as consumers can take now, are not counted: they go to those consumers
        in the next dispatch pass (RabbitMQ would have handed them over at once).
        """
        ready = queue.ready
        limit = queue.max_length
        if len(ready) <= limit:
            return
        spared = min(queue.free_capacity(), len(ready))
        while len(ready) > limit + spared:
            if spared:
                entry = ready[spared]
                del ready[spared]
            else:
                entry = ready.popleft()
            self._dead_letter(queue, entry, "maxlen")

    def _schedule(self, queue: _Queue, now: float | None = None) -> None:
        """Have ``queue`` dispatched in the next dispatch pass (one ``call_soon`` for all queues).

        ``now`` is the loop time of the enqueue that asks for it, if that is the reason.
        """
        if queue.scheduled:
            return
        queue.scheduled = True
        self._dirty.append(queue)
        if self._dispatch_handle is None:
            loop = self._running_loop
            self._dispatch_time = loop.time() if now is None else now
            self._dispatch_handle = loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_handle = None
        # Expiry is judged as of when the pass was asked for, not when it runs: the delay is ours, and a
        # message with a TTL of 0 still reaches a consumer that was waiting for it.
        now = self._dispatch_time
        dirty, self._dirty = self._dirty, []
        for queue in dirty:
            queue.scheduled = False
            if not queue.deleted:
                self._dispatch_queue(queue, now)

    def _dispatch_queue(self, queue: _Queue, now: float) -> None:
        ready = queue.ready
        consumers = queue.consumers
        budget = MAX_DISPATCH_BATCH
        while ready and consumers and not queue.deleted:
            entry = ready[0]
            if entry.expires_at is not None and entry.expires_at < now:
                ready.popleft()
                self._dead_letter(queue, entry, "expired")
                continue
            consumer = queue.next_consumer()
            if consumer is None:
                break
            if not budget:
                self._schedule(queue)
                break
            budget -= 1
            ready.popleft()
            consumer.channel._deliver(consumer, queue, entry)
        if not queue.deleted:
            if queue.overflow == "drop-head":
                self._drop_head(queue)
            if queue.expiry_handle is None:
                self._arm_expiry(queue)

    def _arm_expiry(self, queue: _Queue) -> None:
        """Make sure a timer fires when the head of ``queue`` expires (RabbitMQ expires at the head)."""
        if not queue.ready or queue.deleted:
            return
        expires_at = queue.ready[0].expires_at
        if expires_at is None:
            return
        handle = queue.expiry_handle
        if handle is not None:
            if queue.expiry_at <= expires_at:
                return
            handle.cancel()
        queue.expiry_at = expires_at
        queue.expiry_handle = self._running_loop.call_at(expires_at, self._expire, queue)

    def _expire(self, queue: _Queue) -> None:
        queue.expiry_handle = None
        if queue.deleted:
            return
        now = self._running_loop.time()
        ready = queue.ready
        while ready and (expires_at := ready[0].expires_at) is not None and expires_at <= now:
            self._dead_letter(queue, ready.popleft(), "expired")
        self._arm_expiry(queue)

    def _arm_unused(self, queue: _Queue) -> None:
        """Start the ``x-expires`` countdown of a queue that has no consumers."""
        if queue.expires is None or queue.consumers or queue.deleted:
            return
        if queue.unused_handle is not None:
            queue.unused_handle.cancel()
        queue.unused_handle = self._running_loop.call_later(queue.expires / 1000, self._unused, queue)

    def _unused(self, queue: _Queue) -> None:
        queue.unused_handle = None
        if not queue.deleted and not queue.consumers:
            self._delete_queue(queue)

    def _dead_letter(self, queue: _Queue, entry: _Entry, reason: str) -> None:
        """Republish a dropped message to the queue's dead-letter exchange, if it has one."""
        exchange_name = queue.dead_letter_exchange
        if exchange_name is None or queue.deleted:
            return
        exchange = queue.vhost.exchanges.get(exchange_name)
        if exchange is None:  # RabbitMQ drops it too
            return
        message = entry.message
        properties = dataclasses.replace(
            message.properties, headers=dict(message.properties.headers), expiration=None
        )
        deaths = _record_death(properties, queue, message, reason)
        routing_key = queue.dead_letter_routing_key
        if routing_key is None:
            routing_key = message.routing_key
        dead = _Message(exchange_name, routing_key, message.body, properties, None)
        self._route(exchange, routing_key, dead, None if reason == "rejected" else deaths)

    def _requeue(self, settled: list[_Unacked]) -> None:
        """Put messages back where they were in their queues (RabbitMQ does too), as redelivered."""
        by_queue: dict[_Queue, list[_Entry]] = {}
        for queue, entry, _ in settled:
            if not queue.deleted:
                entry.redelivered = True
                by_queue.setdefault(queue, []).append(entry)
        for queue, entries in by_queue.items():
            entries.sort(key=_position)
            ready = queue.ready
            last = entries[-1].position
            older: list[_Entry] = []  # ready messages that were enqueued before some requeued one
            while ready and ready[0].position < last:
                older.append(ready.popleft())
            if older:
                entries = list(heapq.merge(older, entries, key=_position))
            ready.extendleft(reversed(entries))
            if queue.consumers:
                self._schedule(queue)
            self._arm_expiry(queue)

    def _remove_consumer(self, consumer: _Consumer) -> None:
        consumer.active = False
        consumer.channel._consumers.pop(consumer.tag, None)
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        if queue.exclusive_consumer is consumer:
            queue.exclusive_consumer = None
        if not queue.consumers and not queue.deleted:
            if queue.auto_delete:  # it had a consumer: this one
                self._delete_queue(queue)
            else:
                self._arm_unused(queue)

    def _delete_queue(self, queue: _Queue) -> None:
        """Delete ``queue`` with its ready messages; its consumers elsewhere hear of it by ``on_cancel``."""
        if queue.deleted:
            return
        queue.deleted = True
        if self.debug:
            logger.debug("deleting %s", queue.resource())
        queue.vhost.queues.pop(queue.name, None)
        for exchange, binding_key in queue.bindings:
            exchange.unbind(queue, binding_key)
        queue.bindings.clear()
        for consumer in queue.consumers:
            consumer.active = False
            channel = consumer.channel
            channel._consumers.pop(consumer.tag, None)
            if channel.on_cancel is not None and channel.is_open:
                self._running_loop.call_soon(channel.on_cancel, consumer.tag)
        queue.consumers.clear()
        queue.exclusive_consumer = None
        queue.ready.clear()
        for handle in (queue.expiry_handle, queue.unused_handle):
            if handle is not None:
                handle.cancel()
        queue.expiry_handle = queue.unused_handle = None
        if queue.owner is not None:
            queue.owner._exclusive.pop(queue, None)


# --------------------------------------------------------------------------------------------------------
# Channels


class MemoryChannel(Channel):
    """A channel of :class:`MemoryBroker`. Every :class:`BrokerError` a method raises (except
    :class:`PublishNacked`) has closed the channel: its unacknowledged deliveries went back to their queues,
    its consumers were cancelled, its exclusive queues deleted, and ``on_close`` is called soon after
    (from the event loop, never from inside the failing call). On a closed channel the ``async`` methods
    raise :class:`ChannelClosed`, while :meth:`ack`, :meth:`nack` and :meth:`cancel` do nothing: closing
    already requeued and cancelled everything. Consumer callbacks may call :meth:`ack` / :meth:`nack`.
    """

    def __init__(self, broker: MemoryBroker, vhost: _VHost, principal: MemoryPrincipal) -> None:
        self.principal = principal
        self.on_close = None
        #: Called with the consumer tag when the broker cancels a consumer because its queue was deleted
        #: (AMQP's server-sent ``basic.cancel``; an extension: :class:`Channel` has no such hook).
        self.on_cancel: Callable[[str], None] | None = None
        self._broker = broker
        self._vhost = vhost
        self._open = True
        self._next_tag = 1
        self._unacked: dict[int, _Unacked] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._exclusive: dict[_Queue, None] = {}

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
            vhost = self._vhost
            if passive:
                self._accessible_queue(name)
                return name
            requested = dict(arguments or {})
            if name:
                if name.startswith("amq."):
                    raise _access_refused(f"queue name '{name}' contains reserved prefix 'amq.*'")
                queue = vhost.queues.get(name)
                if queue is not None:
                    self._assert_equivalent(queue, durable, exclusive, auto_delete, requested)
                    self._broker._arm_unused(queue)  # a redeclare counts as use
                    return name
            else:
                name = _random_name("amq.gen-")
                while name in vhost.queues:
                    name = _random_name("amq.gen-")
            queue = _Queue(
                vhost,
                name,
                durable=durable,
                auto_delete=auto_delete,
                owner=self if exclusive else None,
                arguments=requested,
                default_max_length=self._broker.max_queue_length,
            )
        except BrokerError as error:
            raise self._fail(error) from None
        vhost.queues[name] = queue
        if exclusive:
            self._exclusive[queue] = None
        self._broker._arm_unused(queue)
        if self._broker.debug:
            logger.debug("declared %s", queue.resource())
        return name

    def _assert_equivalent(
        self, queue: _Queue, durable: bool, exclusive: bool, auto_delete: bool, arguments: Mapping[str, Any]
    ) -> None:
        if queue.owner is not (self if exclusive else None):
            raise _locked(queue.name, queue.vhost.name)
        resource = queue.resource()
        if queue.durable != durable:
            raise _inequivalent("durable", resource, _flag(durable), _flag(queue.durable))
        if queue.auto_delete != auto_delete:
            raise _inequivalent("auto_delete", resource, _flag(auto_delete), _flag(queue.auto_delete))
        for key in _EQUIVALENT_ARGS:
            current = queue.arguments.get(key, _MISSING)
            received = arguments.get(key, _MISSING)
            if current is received:
                continue
            if _type_name(current) != _type_name(received) or current != received:
                raise _inequivalent(key, resource, _arg_value(received), _arg_value(current))

    async def check_exchange(self, name: str) -> None:
        try:
            self._check_open()
            check_names(exchange_name=name)
            self._exchange(name)
        except BrokerError as error:
            raise self._fail(error) from None

    async def declare_exchange(self, name: str, type: str = "topic", *, durable: bool = True) -> None:
        """Declare an exchange of type ``direct``, ``fanout`` or ``topic`` (RabbitMQ's errors otherwise)."""
        try:
            self._check_open()
            check_names(exchange_name=name)
            if type not in EXCHANGE_TYPES:
                raise BrokerError(503, "command_invalid", f"unknown exchange type '{type}'")
            if name == "":
                raise _access_refused("operation not permitted on the default exchange")
            exchanges = self._vhost.exchanges
            exchange = exchanges.get(name)
            if exchange is None:
                if name.startswith("amq."):
                    raise _access_refused(f"exchange name '{name}' contains reserved prefix 'amq.*'")
                exchanges[name] = _EXCHANGE_CLASSES[type](name, durable)
                return
            resource = _resource("exchange", name, self._vhost.name)
            if exchange.type != type:
                raise _inequivalent("type", resource, f"'{type}'", f"'{exchange.type}'")
            if exchange.durable != durable:
                raise _inequivalent("durable", resource, _flag(durable), _flag(exchange.durable))
        except BrokerError as error:
            raise self._fail(error) from None

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        try:
            self._check_open()
            check_names(queue_name=queue, exchange_name=exchange, binding_key=routing_key)
            target, source = self._binding_ends(queue, exchange)
            if (source, routing_key) not in target.bindings:
                source.bind(target, routing_key)
                target.bindings[(source, routing_key)] = None
        except BrokerError as error:
            raise self._fail(error) from None

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        try:
            self._check_open()
            check_names(queue_name=queue, exchange_name=exchange, binding_key=routing_key)
            target, source = self._binding_ends(queue, exchange)
            if (source, routing_key) in target.bindings:
                source.unbind(target, routing_key)
                del target.bindings[(source, routing_key)]
        except BrokerError as error:
            raise self._fail(error) from None

    def _binding_ends(self, queue: str, exchange: str) -> tuple[_Queue, _Exchange]:
        if exchange == "":
            raise _access_refused("operation not permitted on the default exchange")
        source = self._exchange(exchange)
        return self._accessible_queue(queue), source

    async def delete_queue(self, name: str) -> None:
        """Delete a queue and its ready messages; deleting a missing queue succeeds (RabbitMQ 3.x)."""
        try:
            self._check_open()
            check_names(queue_name=name)
            if name in self._vhost.queues:
                self._broker._delete_queue(self._accessible_queue(name))
        except BrokerError as error:
            raise self._fail(error) from None

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
            source = self._accessible_queue(queue)
            if source.exclusive_consumer is not None or (exclusive and source.consumers):
                raise _access_refused(f"{source.resource()} in exclusive use")
        except BrokerError as error:
            raise self._fail(error) from None
        tag = consumer_tag or _random_name("amq.ctag-")
        consumer = _Consumer(tag, self, source, callback, no_ack, max(prefetch_count or 0, 0))
        source.consumers.append(consumer)
        if exclusive:
            source.exclusive_consumer = consumer
        if source.unused_handle is not None:
            source.unused_handle.cancel()
            source.unused_handle = None
        self._consumers[tag] = consumer
        if source.ready:
            self._broker._schedule(source)
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer (an unknown tag is ignored, as RabbitMQ does). Its unacknowledged deliveries
        stay on this channel until ack/nack or close; an auto-delete queue losing its last consumer goes.
        On a closed channel it does nothing: closing cancelled every consumer."""
        consumer = self._consumers.get(consumer_tag)
        if consumer is not None:
            self._broker._remove_consumer(consumer)

    def _deliver(self, consumer: _Consumer, queue: _Queue, entry: _Entry) -> None:
        tag = self._next_tag
        self._next_tag = tag + 1
        if not consumer.no_ack:
            self._unacked[tag] = (queue, entry, consumer)
            consumer.unacked += 1
            queue.unacked += 1
        message = entry.message
        delivery = Delivery(
            consumer.tag,
            tag,
            message.exchange,
            message.routing_key,
            entry.redelivered,
            message.body,
            message.properties,
        )
        try:
            consumer.callback(delivery)
        except Exception:
            logger.exception("consumer %s on %s raised; delivery continues", consumer.tag, queue.resource())

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
            target = self._exchange(exchange)
            ttl = None if properties.expiration is None else _parse_expiration(properties.expiration)
        except BrokerError as error:
            raise self._fail(error) from None
        message = _Message(
            exchange,
            routing_key,
            body,
            dataclasses.replace(properties, headers=dict(properties.headers)),
            ttl,
        )
        refused = self._broker._route(target, routing_key, message)
        if refused is not None and confirm:
            raise PublishNacked(f"{refused.resource()} is full (x-overflow '{refused.overflow}')")

    # -- Acknowledgements

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Acknowledge; ``multiple`` covers every earlier tag too, and tag 0 with ``multiple`` all of
        them. An unknown tag closes the channel with ``406 precondition_failed`` (``on_close``)."""
        settled = self._settle(delivery_tag, multiple)
        for queue, _, consumer in settled:
            self._release(queue, consumer)

    def nack(self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True) -> None:
        """As :meth:`ack`, but the messages go back to the head of their queues (redelivered) or, with
        ``requeue=False``, to their queue's dead-letter exchange (``reason: rejected``) or nowhere."""
        settled = self._settle(delivery_tag, multiple)
        for queue, _, consumer in settled:
            self._release(queue, consumer)
        if requeue:
            self._broker._requeue(settled)
        else:
            for queue, entry, _ in settled:
                self._broker._dead_letter(queue, entry, "rejected")

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
            self._fail(_precondition_failed(f"unknown delivery tag {delivery_tag}"))
            return []
        if not multiple:
            return [last]
        earlier = list(itertools.takewhile(lambda tag: tag < delivery_tag, unacked))
        settled = [unacked.pop(tag) for tag in earlier]
        settled.append(last)
        return settled

    def _release(self, queue: _Queue, consumer: _Consumer) -> None:
        consumer.unacked -= 1
        queue.unacked -= 1
        if consumer.active and queue.ready:
            self._broker._schedule(queue)

    # -- Closing

    async def close(self) -> None:
        self._shutdown()

    def _check_open(self) -> None:
        if not self._open:
            raise ChannelClosed()

    def _fail(self, error: BrokerError) -> BrokerError:
        """Close because of ``error`` and tell ``on_close`` soon; return ``error`` for the caller to raise."""
        if self._open:
            self._shutdown()
            if self.on_close is not None:
                self._broker._running_loop.call_soon(self.on_close, error)
        return error

    def _shutdown(self) -> None:
        if not self._open:
            return
        self._open = False
        broker = self._broker
        broker._channels.pop(self, None)
        settled = list(self._unacked.values())
        self._unacked.clear()
        for queue, _, consumer in settled:
            consumer.unacked -= 1
            queue.unacked -= 1
        broker._requeue(settled)
        for consumer in list(self._consumers.values()):
            broker._remove_consumer(consumer)
        for queue in list(self._exclusive):
            broker._delete_queue(queue)

    # -- Lookups (raise the BrokerError RabbitMQ would)

    def _exchange(self, name: str) -> _Exchange:
        exchange = self._vhost.exchanges.get(name)
        if exchange is None:
            raise _not_found("exchange", name, self._vhost.name)
        return exchange

    def _accessible_queue(self, name: str) -> _Queue:
        queue = self._vhost.queues.get(name)
        if queue is None:
            raise _not_found("queue", name, self._vhost.name)
        if queue.owner is not None and queue.owner is not self:
            raise _locked(name, self._vhost.name)
        return queue
