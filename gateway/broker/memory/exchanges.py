"""Exchanges: each turns a routing key into the queues it reaches.

An exchange knows its bindings and nothing else: it never touches a queue's messages or consumers. The
virtual host (:mod:`gateway.broker.memory.vhosts`) asks :meth:`Exchange.route` where a message goes and
hands it to those queues; a queue asks its exchanges to :meth:`~Exchange.bind` / :meth:`~Exchange.unbind`
it.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from gateway.broker.memory.errors import default_exchange_refused

if TYPE_CHECKING:
    from gateway.broker.memory.queues import Queue

__all__ = [
    "EXCHANGE_TYPES",
    "ROUTE_CACHE_SIZE",
    "DefaultExchange",
    "DirectExchange",
    "Exchange",
    "FanoutExchange",
    "TopicExchange",
    "create_exchange",
]

#: Routing keys whose matching bindings a topic exchange remembers; the oldest is forgotten first.
ROUTE_CACHE_SIZE: Final = 4096

EXCHANGE_TYPES: Final = frozenset({"direct", "fanout", "topic"})


class Exchange(abc.ABC):
    __slots__ = ("durable", "name", "type")

    def __init__(self, name: str, type: str, durable: bool) -> None:
        self.name = name
        self.type = type
        self.durable = durable

    @abc.abstractmethod
    def route(self, routing_key: str) -> Iterable[Queue]:
        """The queues a message with ``routing_key`` goes to, each once. Do not bind while iterating."""

    @abc.abstractmethod
    def bind(self, queue: Queue, binding_key: str) -> None: ...

    @abc.abstractmethod
    def unbind(self, queue: Queue, binding_key: str) -> None: ...


class DefaultExchange(Exchange):
    """The nameless exchange: every queue is implicitly bound to it under its own name.

    ``queues`` is the virtual host's own name-to-queue table, read at each publish (never written here).
    """

    __slots__ = ("_queues",)

    def __init__(self, queues: dict[str, Queue]) -> None:
        super().__init__("", "direct", True)
        self._queues = queues

    def route(self, routing_key: str) -> Iterable[Queue]:
        queue = self._queues.get(routing_key)
        return () if queue is None else (queue,)

    def bind(self, queue: Queue, binding_key: str) -> None:
        raise default_exchange_refused()

    unbind = bind


class DirectExchange(Exchange):
    __slots__ = ("_routes",)

    def __init__(self, name: str, durable: bool) -> None:
        super().__init__(name, "direct", durable)
        self._routes: dict[str, dict[Queue, None]] = {}

    def route(self, routing_key: str) -> Iterable[Queue]:
        return self._routes.get(routing_key, ())

    def bind(self, queue: Queue, binding_key: str) -> None:
        self._routes.setdefault(binding_key, {})[queue] = None

    def unbind(self, queue: Queue, binding_key: str) -> None:
        queues = self._routes.get(binding_key)
        if queues is not None:
            queues.pop(queue, None)
            if not queues:
                del self._routes[binding_key]


class FanoutExchange(Exchange):
    __slots__ = ("_queues",)

    def __init__(self, name: str, durable: bool) -> None:
        super().__init__(name, "fanout", durable)
        self._queues: dict[Queue, set[str]] = {}  # queue -> its binding keys (one copy each message)

    def route(self, routing_key: str) -> Iterable[Queue]:
        return self._queues

    def bind(self, queue: Queue, binding_key: str) -> None:
        self._queues.setdefault(queue, set()).add(binding_key)

    def unbind(self, queue: Queue, binding_key: str) -> None:
        keys = self._queues.get(queue)
        if keys is not None:
            keys.discard(binding_key)
            if not keys:
                del self._queues[queue]


def split_topic(key: str) -> list[str]:
    """RabbitMQ's split: ``""`` is zero words, ``"a."`` is ``["a", ""]``."""
    return key.split(".") if key else []


class TopicNode:
    """One word of a binding key in a topic exchange's trie."""

    __slots__ = ("children", "queues")

    def __init__(self) -> None:
        self.children: dict[str, TopicNode] = {}
        self.queues: dict[Queue, None] = {}  # queues whose binding key ends at this node


class TopicExchange(Exchange):
    """Binding keys live in a trie of words (``*`` and ``#`` are children like any other word).

    A routing key's match is the set of trie nodes it reaches; it is cached per routing key and the cache
    is cleared whenever a binding changes. Publishing to a cached key costs a dict lookup.
    """

    __slots__ = ("_cache", "_root")

    def __init__(self, name: str, durable: bool) -> None:
        super().__init__(name, "topic", durable)
        self._root = TopicNode()
        # routing key -> (nodes matched, whether their queue sets are disjoint)
        self._cache: dict[str, tuple[tuple[TopicNode, ...], bool]] = {}

    def route(self, routing_key: str) -> Iterable[Queue]:
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

    def _remember(self, routing_key: str) -> tuple[tuple[TopicNode, ...], bool]:
        nodes = self._match(split_topic(routing_key))
        disjoint = True
        if len(nodes) > 1:
            sizes = sum(len(node.queues) for node in nodes)
            disjoint = sizes == len({queue for node in nodes for queue in node.queues})
        cache = self._cache
        if len(cache) >= ROUTE_CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[routing_key] = hit = (nodes, disjoint)
        return hit

    def _match(self, words: list[str]) -> tuple[TopicNode, ...]:
        found: dict[TopicNode, None] = {}
        end = len(words)
        seen: set[tuple[TopicNode, int]] = set()
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

    def bind(self, queue: Queue, binding_key: str) -> None:
        node = self._root
        for word in split_topic(binding_key):
            child = node.children.get(word)
            if child is None:
                child = node.children[word] = TopicNode()
            node = child
        node.queues[queue] = None
        self._cache.clear()

    def unbind(self, queue: Queue, binding_key: str) -> None:
        path: list[tuple[TopicNode, str]] = []
        node = self._root
        for word in split_topic(binding_key):
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


_EXCHANGE_CLASSES: Final[dict[str, Callable[[str, bool], Exchange]]] = {
    "direct": DirectExchange,
    "fanout": FanoutExchange,
    "topic": TopicExchange,
}


def create_exchange(name: str, type: str, durable: bool) -> Exchange:
    """A new, unbound exchange; ``type`` is one of :data:`EXCHANGE_TYPES` (the caller checked it)."""
    return _EXCHANGE_CLASSES[type](name, durable)
