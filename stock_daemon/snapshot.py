"""Answers ``stocks.snapshot`` requests with every current quote.

A client that has just connected asks for the whole table at once instead of waiting for each symbol's
next tick (the page does ``SEND destination:/queue/stocks.snapshot`` with ``reply-to:/temp-queue/snapshot``).

The queue: ``stocks.snapshot``, declared **durable, not exclusive, not auto-delete, no arguments**. Those
are exactly the properties the gateway uses when a STOMP client sends to ``/queue/stocks.snapshot``; any
other combination would make one of the two declarations fail with ``PRECONDITION_FAILED``. Requests are
transient messages, so a durable queue holds no stale requests across a broker restart anyway.

The request body is ignored. The answer goes to the default exchange ``""`` with routing key = the
request's ``reply_to``, ``correlation_id`` copied, ``content_type`` ``application/json``, body a JSON
list of every current quote (the same objects as the ticks). A request without ``reply_to`` is dropped.
Requests are acknowledged after they are answered, so a request caught by a channel failure is requeued
and answered on the next channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.broker.base import Channel, Delivery, MessageProperties

from .publisher import CONTENT_TYPE, TRANSIENT, encode_json
from .quotes import PriceWalk, Quote

__all__ = ["SNAPSHOT_QUEUE", "Reply", "SnapshotService", "reply_for"]

logger = logging.getLogger(__name__)

SNAPSHOT_QUEUE = "stocks.snapshot"
#: Requests in flight per channel; more wait in the broker's queue.
PREFETCH = 32


@dataclass(frozen=True, slots=True)
class Reply:
    """What to publish in answer to one request: to exchange ``""``, routing key ``routing_key``."""

    routing_key: str
    body: bytes
    properties: MessageProperties


def reply_for(request: Delivery, quotes: Iterable[Quote]) -> Reply | None:
    """The answer to ``request``, or ``None`` if it has no ``reply_to`` (nowhere to answer)."""
    reply_to = request.properties.reply_to
    if not reply_to:
        return None
    properties = MessageProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=TRANSIENT,
        correlation_id=request.properties.correlation_id,
    )
    return Reply(reply_to, encode_json([quote.as_json() for quote in quotes]), properties)


class SnapshotService:
    """Serves snapshot requests on one channel from one :class:`PriceWalk`.

    Call :meth:`declare`, then :meth:`start` (begins consuming), then await :meth:`serve`, which runs
    until cancelled or until a channel operation raises :class:`gateway.broker.base.BrokerError`.
    """

    def __init__(self, channel: Channel, walk: PriceWalk, queue: str = SNAPSHOT_QUEUE) -> None:
        self.channel = channel
        self.walk = walk
        self.queue = queue
        self._requests: asyncio.Queue[Delivery] = asyncio.Queue()

    async def declare(self) -> None:
        """Declare the request queue with the gateway-compatible properties (see the module docstring)."""
        await self.channel.declare_queue(self.queue, durable=True, exclusive=False, auto_delete=False)

    async def start(self) -> str:
        """Start consuming requests; returns the consumer tag."""
        return await self.channel.consume(
            self.queue, self._requests.put_nowait, no_ack=False, prefetch_count=PREFETCH
        )

    async def serve(self) -> None:
        """Answer requests as they arrive, forever."""
        while True:
            request = await self._requests.get()
            await self.answer(request)

    async def answer(self, request: Delivery) -> None:
        """Publish the reply to one request (if it wants one), then acknowledge it."""
        reply = reply_for(request, self.walk.quotes())
        if reply is None:
            logger.debug("dropping a snapshot request without reply_to")
        else:
            await self.channel.publish("", reply.routing_key, reply.body, reply.properties)
        self.channel.ack(request.delivery_tag)
