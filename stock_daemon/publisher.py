"""Ticks to the ``stocks`` exchange, through a :class:`gateway.broker.base.Channel`.

Topology: one **durable topic exchange** (``stocks`` by default). Each tick is published to it with
routing key = the symbol (``AAPL``), so a STOMP client reads one symbol with
``SUBSCRIBE destination:/exchange/stocks/AAPL`` or all of them with ``/exchange/stocks/#``.

Message: body is the quote's JSON object (see :meth:`stock_daemon.quotes.Quote.as_json`), encoded as
UTF-8, ``content_type`` ``application/json``, ``delivery_mode`` 1 (transient: a tick is stale a second
later, so it is not worth a disk write; the exchange itself is durable so subscriptions survive a broker
restart).
"""

from __future__ import annotations

import json

from gateway.broker.base import Channel, MessageProperties

from .quotes import Quote

__all__ = ["CONTENT_TYPE", "DEFAULT_EXCHANGE", "TickPublisher", "encode_json"]

DEFAULT_EXCHANGE = "stocks"
CONTENT_TYPE = "application/json"
#: AMQP delivery mode 1 = transient.
TRANSIENT = 1


def encode_json(value: object) -> bytes:
    """Compact UTF-8 JSON, the encoding of every body the daemon sends."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class TickPublisher:
    """Publishes quotes to one exchange over one channel.

    Call :meth:`declare` once per channel before :meth:`publish`. Both raise
    :class:`gateway.broker.base.BrokerError` (the channel is then closed: open a new one and make a new
    publisher).
    """

    def __init__(self, channel: Channel, exchange: str = DEFAULT_EXCHANGE) -> None:
        self.channel = channel
        self.exchange = exchange

    async def declare(self) -> None:
        """Declare the durable topic exchange (idempotent)."""
        await self.channel.declare_exchange(self.exchange, "topic", durable=True)

    async def publish(self, quote: Quote) -> None:
        """Publish one tick, routing key = symbol. Returns once handed to the broker (no confirm)."""
        properties = MessageProperties(content_type=CONTENT_TYPE, delivery_mode=TRANSIENT)
        await self.channel.publish(self.exchange, quote.symbol, encode_json(quote.as_json()), properties)
