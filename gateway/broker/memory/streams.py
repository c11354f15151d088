"""Stream queues (``x-queue-type: stream``): an append-only log that every consumer reads from its own offset.

What RabbitMQ's streams give an AMQP 0-9-1 consumer, and so what the gateway's ``x-stream-offset`` needs:
messages stay after delivery (an ack only frees the consumer's prefetch); a consumer starts where its
``x-stream-offset`` argument says (``first``, ``last``, ``next`` — the default —, an offset, or a timestamp);
each delivery carries its offset in the ``x-stream-offset`` header; consumers need manual acknowledgement
and a prefetch (RabbitMQ's 406 otherwise). Differs from RabbitMQ: the log keeps at most ``x-max-length``
messages (default :data:`~gateway.broker.memory.queues.MAX_QUEUE_LENGTH`), dropping the oldest;
``x-max-age`` and ``x-max-length-bytes`` are not modelled; ``last`` is the last message (RabbitMQ: the
first of the last chunk).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from gateway.broker.memory.consumers import Consumer
from gateway.broker.memory.errors import precondition_failed
from gateway.broker.memory.messages import Entry, Message
from gateway.broker.memory.queues import MAX_DISPATCH_BATCH, Queue, QueueInfo

__all__ = ["StreamQueue"]


class StreamQueue(Queue):
    """A stream: the log (``entries``, offsets from ``first_offset``), and each consumer's next offset."""

    __slots__ = ("cursors", "entries", "first_offset", "times")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entries: deque[Entry] = deque()
        self.times: deque[float] = deque()  # wall-clock seconds each entry was appended
        self.first_offset = 0
        self.cursors: dict[Consumer, int] = {}

    def info(self) -> QueueInfo:
        return dataclasses.replace(super().info(), messages_ready=len(self.entries))

    def check_consumer(self, no_ack: bool, prefetch: int, arguments: Mapping[str, Any] | None) -> None:
        if no_ack or not prefetch:
            raise precondition_failed(
                f"consumers of the stream {self.resource()} must use manual acknowledgement and a prefetch count"
            )
        if arguments:
            self.start_offset(arguments.get("x-stream-offset", "next"))

    def start_offset(self, spec: object) -> int:
        """Where a consumer with ``x-stream-offset`` = ``spec`` starts."""
        end = self.next_position
        if spec == "first":
            return self.first_offset
        if spec == "last":
            return max(end - 1, self.first_offset)
        if spec == "next":
            return end
        if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
            return min(max(spec, self.first_offset), end)
        if isinstance(spec, datetime.datetime):
            moment = spec.timestamp()
            for index, appended in enumerate(self.times):
                if appended >= moment:
                    return self.first_offset + index
            return end
        raise precondition_failed(f"invalid x-stream-offset {spec!r} for {self.resource()}")

    def add_consumer(self, consumer: Consumer, *, exclusive: bool, arguments: Mapping[str, Any] | None = None) -> None:
        self.cursors[consumer] = self.start_offset((arguments or {}).get("x-stream-offset", "next"))
        super().add_consumer(consumer, exclusive=exclusive)
        self.schedule()

    def remove_consumer(self, consumer: Consumer) -> None:
        self.cursors.pop(consumer, None)
        super().remove_consumer(consumer)

    def enqueue(self, message: Message, now: float) -> bool:
        """Append: the message gets the next offset, carried in its ``x-stream-offset`` header."""
        offset = self.next_position
        self.next_position += 1
        properties = message.properties
        stamped = dataclasses.replace(properties, headers={**properties.headers, "x-stream-offset": offset})
        self.entries.append(Entry(Message(message.exchange, message.routing_key, message.body, stamped, None), None, offset))
        self.times.append(time.time())
        while len(self.entries) > self.max_length:
            self.entries.popleft()
            self.times.popleft()
            self.first_offset += 1
        if self.consumers:
            self.schedule(now)
        return True

    def settle(self, consumer: Consumer, *, wake: bool = True) -> None:
        consumer.settled()
        self.unacked -= 1
        if wake and consumer.active:
            self.schedule()

    def requeue(self, entries: list[Entry]) -> None:
        """Nothing goes back: the messages never left the log."""

    def dead_letter(self, entry: Entry, reason: str) -> None:
        """A rejected stream message stays in the log (RabbitMQ's streams do not dead-letter)."""

    def dispatch(self, now: float) -> None:
        """Each consumer with room gets the messages from its offset on (at most a batch per pass)."""
        self.scheduled = False
        if self.deleted:
            return
        budget = MAX_DISPATCH_BATCH
        for consumer in list(self.consumers):
            offset = max(self.cursors.get(consumer, self.next_position), self.first_offset)
            while offset < self.next_position and consumer.active and consumer.has_room():
                if not budget:
                    self.schedule()
                    return
                budget -= 1
                entry = self.entries[offset - self.first_offset]
                offset += 1
                self.cursors[consumer] = offset
                self.unacked += 1
                consumer.deliver(entry)
