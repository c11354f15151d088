"""Messages and their places in queues; what dead-lettering writes into a message's headers.

A :class:`Message` is shared by every queue it was routed to; each queue holds its own :class:`Entry` for
it (its position, its expiry, whether it was redelivered).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.broker.base import MessageProperties
from gateway.broker.memory.errors import precondition_failed


class Message:
    """One published message; shared by every queue it was routed to. Read-only once published."""

    __slots__ = ("body", "exchange", "properties", "routing_key", "ttl")

    def __init__(
        self, exchange: str, routing_key: str, body: bytes, properties: MessageProperties, ttl: int | None
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties
        self.ttl = ttl  # per-message TTL in ms, from the ``expiration`` property


class Entry:
    """A message's place in one queue."""

    __slots__ = ("expires_at", "message", "position", "redelivered")

    def __init__(self, message: Message, expires_at: float | None, position: int) -> None:
        self.message = message
        self.expires_at = expires_at  # loop time
        self.position = position  # enqueue order in its queue: a requeue puts it back there
        self.redelivered = False


def position(entry: Entry) -> int:
    """Sort key: enqueue order within the entry's queue."""
    return entry.position


def parse_expiration(expiration: str) -> int:
    """The ``expiration`` property as a TTL in milliseconds; RabbitMQ's 406 if it is not one."""
    try:
        ttl = int(expiration)
    except ValueError:
        raise precondition_failed(f"invalid expiration '{expiration}': no_integer") from None
    if ttl < 0:
        raise precondition_failed(f"invalid expiration '{expiration}': {{value_negative,{ttl}}}")
    return ttl


def record_death(properties: MessageProperties, queue_name: str, message: Message, reason: str) -> list[Any]:
    """Add this death to ``properties.headers`` (a private copy) as RabbitMQ does; return ``x-death``."""
    headers = properties.headers
    previous = headers.get("x-death")
    deaths: list[Any] = list(previous) if isinstance(previous, list) else []
    for index, death in enumerate(deaths):
        if isinstance(death, dict) and death.get("queue") == queue_name and death.get("reason") == reason:
            death = dict(death)
            count = death.get("count")
            death["count"] = count + 1 if isinstance(count, int) else 1
            del deaths[index]
            break
    else:
        death = {
            "count": 1,
            "reason": reason,
            "queue": queue_name,
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
            headers[f"{prefix}-queue"] = queue_name
            headers[f"{prefix}-exchange"] = message.exchange
    return deaths


def is_cycle(queue_name: str, deaths: list[Any]) -> bool:
    """A dead-lettered message would come back to a queue it died in with no rejection since."""
    for death in deaths:  # newest first
        if not isinstance(death, dict) or death.get("reason") == "rejected":
            return False
        if death.get("queue") == queue_name:
            return True
    return False
