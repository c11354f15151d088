"""Consumers: a callback subscribed to one queue through one channel, with its own prefetch.

The queue picks a consumer with room (:meth:`Consumer.has_room`) and hands it an entry
(:meth:`Consumer.deliver`); the consumer numbers the delivery from its channel's sequence, has the channel
remember it when it awaits an acknowledgement, and calls the callback. Nothing else calls the callback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from gateway.broker.base import DeliverCallback, Delivery
from gateway.broker.memory.messages import Entry

if TYPE_CHECKING:
    from gateway.broker.memory.channels import MemoryChannel
    from gateway.broker.memory.queues import Queue

__all__ = ["UNLIMITED", "Consumer"]

logger = logging.getLogger("gateway.broker.memory")

#: What :meth:`Consumer.room` answers for a consumer without a prefetch limit.
UNLIMITED: Final = sys.maxsize


class Consumer:
    """One ``basic.consume``. ``active`` turns False for good when it is cancelled (by its channel or by
    its queue's deletion); ``unacked`` counts its deliveries still awaiting ack/nack, which outlive it."""

    __slots__ = (
        "_delivery_tags",
        "active",
        "callback",
        "channel",
        "no_ack",
        "prefetch",
        "queue",
        "tag",
        "unacked",
    )

    def __init__(
        self,
        tag: str,
        channel: MemoryChannel,
        queue: Queue,
        callback: DeliverCallback,
        *,
        no_ack: bool,
        prefetch: int,
        delivery_tags: Iterator[int],
    ) -> None:
        """``delivery_tags`` is the channel's sequence of delivery tags (shared by all its consumers, so
        tags are unique per channel)."""
        self.tag = tag
        self.channel = channel
        self.queue = queue
        self.callback = callback
        self.no_ack = no_ack
        self.prefetch = prefetch  # 0 = unlimited
        self.unacked = 0
        self.active = True
        self._delivery_tags = delivery_tags

    def has_room(self) -> bool:
        """Whether it may be given one more message now."""
        return self.no_ack or not self.prefetch or self.unacked < self.prefetch

    def room(self) -> int:
        """How many more messages it may be given now (:data:`UNLIMITED` without a prefetch)."""
        if self.no_ack or not self.prefetch:
            return UNLIMITED
        return max(self.prefetch - self.unacked, 0)

    def deliver(self, entry: Entry) -> None:
        """Hand ``entry`` to the callback (the queue has already taken it off its ready list and counted it
        as unacknowledged if it must be). A callback that raises is logged; delivery goes on."""
        delivery_tag = next(self._delivery_tags)
        if not self.no_ack:
            self.unacked += 1
            self.channel.track(delivery_tag, self, entry)
        message = entry.message
        delivery = Delivery(
            self.tag,
            delivery_tag,
            message.exchange,
            message.routing_key,
            entry.redelivered,
            message.body,
            message.properties,
        )
        try:
            self.callback(delivery)
        except Exception:
            logger.exception("consumer %s on %s raised; delivery continues", self.tag, self.queue.resource())

    def settled(self) -> None:
        """One of its deliveries was acked, nacked or requeued by its channel's closing."""
        self.unacked -= 1

    def stop(self) -> None:
        """Cancelled by its channel: take nothing more."""
        self.active = False

    def cancelled_by_broker(self) -> None:
        """Its queue was deleted: take nothing more, and let the channel tell its owner (AMQP's
        server-sent ``basic.cancel``)."""
        self.active = False
        self.channel.consumer_cancelled(self.tag)
