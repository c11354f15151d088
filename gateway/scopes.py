"""Permissions from OAuth 2.0 scopes, read as RabbitMQ's OAuth 2.0 plugin reads them (pure).

A scope ``<resource-server-id>.<read|write|configure>:<vhost-pattern>/<name-pattern>[/<routing-key-pattern>]``
grants one permission on the resources whose vhost and name match the patterns; with a routing-key pattern it
also grants the *topic* permission on the routing keys that match it. ``*`` matches any run of characters;
each part between ``*`` is percent-decoded (``%2F`` is ``/``, so the vhost ``/`` is written ``%2F``).
Scopes of other resource servers, and scopes that are not of this form, are ignored. This is RabbitMQ's
``rabbit_oauth2_scope`` and ``wildcard`` modules, matching quirk included (:func:`wildcard_match`), so one
token means the same to the gateway and to RabbitMQ.

What each STOMP operation needs (:func:`send_needs`, :func:`subscribe_needs`, :func:`unsubscribe_needs`)
is what RabbitMQ checks for the AMQP operations the operation becomes; the README's "Tokens and
permissions" table is this module written out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote_to_bytes

from gateway.destinations import (
    AMQQUEUE,
    EXCHANGE,
    QUEUE,
    REPLY_QUEUE,
    TOPIC,
    Destination,
    SubscriptionPlan,
)

__all__ = [
    "DEFAULT_EXCHANGE",
    "PERMISSIONS",
    "REPLY_QUEUE_PREFIX",
    "Need",
    "Scopes",
    "scopes_from_claim",
    "send_needs",
    "subscribe_needs",
    "unsubscribe_needs",
    "wildcard_match",
]

PERMISSIONS = ("read", "write", "configure")
#: What RabbitMQ calls the default exchange ("") when it checks a permission on it.
DEFAULT_EXCHANGE = "amq.default"
#: The prefix of the server-named queue behind a ``/temp-queue`` reply-to (its full name is made by the broker).
REPLY_QUEUE_PREFIX = "amq.gen-"


def _decode(part: str) -> str | None:
    """cowlib's ``cow_qs:urldecode``: ``%XX`` and ``+`` as a space; None where a ``%`` is not followed by two
    hex digits (RabbitMQ then treats the whole pattern as matching nothing)."""
    text = part.replace("+", " ")
    index = text.find("%")
    while index != -1:
        pair = text[index + 1 : index + 3]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            return None
        index = text.find("%", index + 3)
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        return None


@lru_cache(maxsize=1024)
def _pattern(pattern: str) -> tuple[str, ...] | None:
    parts = [_decode(part) for part in pattern.split("*")]
    if any(part is None for part in parts):
        return None
    return tuple(part for part in parts if part is not None)


def wildcard_match(subject: str, pattern: str) -> bool:
    """RabbitMQ's ``wildcard:match/2``: ``*`` matches any run of characters.

    The scan is RabbitMQ's, without backtracking: each literal part after a ``*`` is matched at its first
    occurrence, so ``*a`` does not match ``aa`` (the first ``a`` is taken, and a character is left over).
    """
    parts = _pattern(pattern)
    if parts is None:
        return False
    first, rest = parts[0], parts[1:]
    if not subject.startswith(first):
        return False
    position = len(first)
    for index, part in enumerate(rest):
        if part == "":
            if index == len(rest) - 1:
                return True  # the pattern ends with a wildcard
            continue  # a repeated wildcard
        found = subject.find(part, position)
        if found == -1:
            return False
        position = found + len(part)
    return position == len(subject)


@dataclass(frozen=True, slots=True)
class _Grant:
    permission: str
    vhost: str
    name: str
    routing_key: str | None


@dataclass(frozen=True, slots=True)
class Need:
    """One permission an operation needs: ``permission`` on the ``kind`` (``exchange``, ``queue`` or
    ``topic``) resource ``name``; for ``topic``, on ``routing_key`` of exchange ``name``."""

    permission: str
    kind: str
    name: str
    routing_key: str = ""

    def describe(self, vhost: str) -> str:
        """The missing permission in words, with a scope that would grant it."""
        scope_vhost = vhost.replace("%", "%25").replace("/", "%2F").replace("*", "%2A")
        name = self.name.replace("%", "%25").replace("/", "%2F").replace("*", "%2A")
        if self.kind == "topic":
            key = self.routing_key.replace("%", "%25").replace("/", "%2F").replace("*", "%2A")
            return (
                f"{self.permission} on routing key '{self.routing_key}' of exchange '{self.name}' in vhost "
                f"'{vhost}' (a scope like <id>.{self.permission}:{scope_vhost}/{name}/{key})"
            )
        return (
            f"{self.permission} on {self.kind} '{self.name}' in vhost '{vhost}' "
            f"(a scope like <id>.{self.permission}:{scope_vhost}/{name})"
        )


class Scopes:
    """The permissions granted by a set of scopes, for one resource server."""

    __slots__ = ("_grants", "scopes")

    def __init__(self, scopes: Iterable[str], resource_server_id: str = "rabbitmq") -> None:
        prefix = resource_server_id + "."
        self.scopes: tuple[str, ...] = tuple(scopes)
        grants: list[_Grant] = []
        for scope in self.scopes:
            if not scope.startswith(prefix):
                continue
            permission, colon, resource = scope[len(prefix) :].partition(":")
            if not colon or permission not in PERMISSIONS:
                continue
            parts = resource.split("/")
            if len(parts) == 2:
                grants.append(_Grant(permission, parts[0], parts[1], None))
            elif len(parts) == 3:
                grants.append(_Grant(permission, parts[0], parts[1], parts[2]))
        self._grants = tuple(grants)

    def __bool__(self) -> bool:
        return bool(self._grants)

    def vhost_access(self, vhost: str) -> bool:
        """Any permission in ``vhost`` (RabbitMQ's check when a connection opens the vhost)."""
        return any(wildcard_match(vhost, grant.vhost) for grant in self._grants)

    def allows(self, vhost: str, need: Need) -> bool:
        for grant in self._grants:
            if grant.permission != need.permission or not wildcard_match(vhost, grant.vhost):
                continue
            if not wildcard_match(need.name, grant.name):
                continue
            if need.kind != "topic":
                return True
            if grant.routing_key is not None and wildcard_match(need.routing_key, grant.routing_key):
                return True
        return False

    def missing(self, vhost: str, needs: Iterable[Need]) -> Need | None:
        """The first of ``needs`` these scopes do not grant, or None."""
        for need in needs:
            if not self.allows(vhost, need):
                return need
        return None


def scopes_from_claim(claim: object) -> list[str]:
    """The ``scope`` claim as a list: a space-separated string or a list of strings (anything else: none)."""
    if isinstance(claim, str):
        return claim.split()
    if isinstance(claim, list):
        return [item for item in claim if isinstance(item, str)]
    return []


# ---------------------------------------------------------------------------------------- the table


def _exchange_of(destination: Destination, topic_exchange: str) -> tuple[str, str] | None:
    """``(exchange, routing key)`` for destinations that go through a named exchange."""
    if destination.kind == EXCHANGE:
        return destination.name, destination.pattern or ""
    if destination.kind == TOPIC:
        return topic_exchange, destination.name
    return None


def send_needs(destination: Destination, topic_exchange: str, *, temp_reply: bool = False) -> list[Need]:
    """A SEND's permissions. ``/exchange/X/k`` and ``/topic/k``: write on the exchange and topic write on
    the routing key (the gateway cannot know an exchange's type, so the topic check is made for every
    exchange; RabbitMQ makes it for topic exchanges only). ``/queue/N``: configure on queue N (the SEND
    declares it) and write on the default exchange; ``/amq/queue/N`` and ``/reply-queue/N``: write on the
    default exchange. A ``reply-to:/temp-queue/..`` (``temp_reply``) also declares and consumes a
    server-named reply queue: configure and read on ``amq.gen-*``."""
    needs: list[Need] = []
    routed = _exchange_of(destination, topic_exchange)
    if routed is not None:
        exchange, key = routed
        needs += [Need("write", "exchange", exchange), Need("write", "topic", exchange, key)]
    else:
        if destination.kind == QUEUE:
            needs.append(Need("configure", "queue", destination.name))
        needs.append(Need("write", "exchange", DEFAULT_EXCHANGE))
    if temp_reply:
        needs += [Need("configure", "queue", REPLY_QUEUE_PREFIX), Need("read", "queue", REPLY_QUEUE_PREFIX)]
    return needs


def subscribe_needs(
    destination: Destination, plan: SubscriptionPlan, headers: Mapping[str, str], topic_exchange: str
) -> list[Need]:
    """A SUBSCRIBE's permissions. ``/exchange/X/k`` and ``/topic/k``: read on the exchange and topic read on
    the routing key (the binding); a named (``x-queue-name``) or durable subscription queue is a resource
    of its own: configure, write (the binding) and read (the consumer) on it, as RabbitMQ checks; the
    gateway's own unnamed per-session queue (or the shared fan-out) needs nothing more.
    ``/queue/N``: configure (declare) and read (consume) on queue N. ``/amq/queue/N``, ``/reply-queue/N``:
    read on the queue."""
    routed = _exchange_of(destination, topic_exchange)
    if routed is not None:
        exchange, key = routed
        needs = [Need("read", "exchange", exchange), Need("read", "topic", exchange, key)]
        if "x-queue-name" in headers or (plan.declaration is not None and plan.declaration.durable):
            queue = plan.queue
            needs += [Need("configure", "queue", queue), Need("write", "queue", queue), Need("read", "queue", queue)]
        return needs
    if destination.kind == QUEUE:
        return [Need("configure", "queue", destination.name), Need("read", "queue", destination.name)]
    if destination.kind in (AMQQUEUE, REPLY_QUEUE):
        return [Need("read", "queue", destination.name)]
    return []


def unsubscribe_needs(queue: str | None) -> list[Need]:
    """An UNSUBSCRIBE that deletes a durable subscription's queue: configure on it (``queue.delete``)."""
    return [Need("configure", "queue", queue)] if queue is not None else []

