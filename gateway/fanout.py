"""Shared subscriptions: one broker consumer per (exchange, binding key), many sessions.

Non-durable, unnamed ``/topic`` and ``/exchange`` subscriptions with ``ack:auto`` carry no per-session
broker state, so sessions that share a broker connection (a :class:`FanoutHub` per
``Broker.shared_key``) also share one auto-delete queue per binding. Each delivery becomes one
:class:`~gateway.stomp.writer.MessageTemplate`, serialized once; every subscribed session only prepends
its ``subscription`` header.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from gateway import metrics
from gateway.broker.base import Broker, BrokerError, Channel, ChannelClosed, ConnectionLostWithNode, Delivery
from gateway.headers import delivery_headers
from gateway.metrics import TALLY
from gateway.stomp.writer import MessageTemplate

__all__ = ["FanoutHub", "FanoutRegistry", "Sink"]

logger = logging.getLogger(__name__)

#: A shared queue nobody consumes (its consumer never started) is deleted by the broker after this long.
QUEUE_EXPIRES_MS = 60_000


class Sink:
    """A session's end of a shared subscription."""

    __slots__ = ("group", "on_error", "on_message")

    def __init__(
        self, on_message: Callable[[MessageTemplate], None], on_error: Callable[[BrokerError], None]
    ) -> None:
        self.on_message = on_message
        self.on_error = on_error
        self.group: _Group | None = None


class _Group:
    """One (exchange, binding key): its queue, its consumer, its sinks."""

    def __init__(self, hub: FanoutHub, exchange: str, binding_key: str) -> None:
        self.hub = hub
        self.exchange = exchange
        self.binding_key = binding_key
        self.sinks: list[Sink] = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.consumer_tag = ""
        self.queue = ""
        self.prefix = f"F_{hub.id}_{next(hub.counter)}@@"
        self.count = 0

    def deliver(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        self.count += 1
        template = MessageTemplate(
            delivery_headers(delivery, f"{self.prefix}{self.count}", self.hub.topic_exchange), delivery.body
        )
        sinks = list(self.sinks)
        for sink in sinks:
            try:
                sink.on_message(template)
            except Exception:  # a broken session must not stop the others
                logger.exception("fan-out delivery to a session failed")
        # Counted once per delivery, not per session: the loop above is the hot path.
        TALLY.messages_delivered += len(sinks)
        TALLY.frames_sent["MESSAGE"] += len(sinks)
        metrics.DELIVERY_LATENCY.observe(time.perf_counter() - started)


class FanoutHub:
    """Shared consumers for the sessions of one broker connection key."""

    def __init__(self, broker: Broker, principal: Any, topic_exchange: str) -> None:
        self.broker = broker
        self.principal = principal
        self.topic_exchange = topic_exchange
        self.id = base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()
        self.counter = itertools.count(1)
        self.groups: dict[tuple[str, str], _Group] = {}
        self._channel: Channel | None = None
        self._channel_lock = asyncio.Lock()

    async def _consumer_channel(self) -> Channel:
        async with self._channel_lock:
            if self._channel is None or not self._channel.is_open:
                channel = await self.broker.open_channel(self.principal)
                channel.on_close = self._channel_closed
                channel.on_cancel = self._consumer_cancelled
                self._channel = channel
            return self._channel

    def _consumer_cancelled(self, consumer_tag: str) -> None:
        """RabbitMQ cancelled a group's consumer: its queue is gone (deleted, or it lived on a node that left
        the cluster). Its sinks hear it as a lost connection, so their sessions may attach again (a new
        group, a new queue on a live node)."""
        for group in list(self.groups.values()):
            if group.consumer_tag == consumer_tag:
                del self.groups[(group.exchange, group.binding_key)]
                error = ConnectionLostWithNode(
                    "the queue of a shared subscription was lost", detail=f"RabbitMQ cancelled fan-out consumer {consumer_tag!r}"
                )
                self._drop([group], error)

    def _channel_closed(self, error: BrokerError) -> None:
        """The shared channel died (connection lost, broker restart): every sink hears it."""
        self._channel = None
        groups = list(self.groups.values())
        self.groups.clear()
        self._drop(groups, error)

    def _drop(self, groups: list[_Group], error: BrokerError) -> None:
        for group in groups:
            if not group.ready.done():
                group.ready.set_exception(error)
                group.ready.exception()  # mark retrieved; waiters re-raise it
            else:
                metrics.FANOUT_GROUPS.dec()
            metrics.FANOUT_SUBSCRIBERS.dec(len(group.sinks))
            for sink in group.sinks:
                sink.group = None
                sink.on_error(error)
            group.sinks.clear()

    async def _declare_and_bind(self, group: _Group) -> None:
        """Declare the group's queue and bind it on a throwaway channel: a missing exchange (404) or a
        refused topic permission (403) closes that channel, not the shared one every sink of this hub
        depends on. The queue is not exclusive (the throwaway channel may be on another connection of the
        pool); it is auto-delete, so it goes with its consumer, and expires if no consumer ever comes."""
        channel = await self.broker.open_channel(self.principal)
        try:
            group.queue = await channel.declare_queue(
                f"stomp-fanout-{self.id}-{next(self.counter)}-{secrets.token_hex(4)}",
                auto_delete=True,
                arguments={"x-expires": QUEUE_EXPIRES_MS},
            )
            await channel.bind_queue(group.queue, group.exchange, group.binding_key)
        finally:
            await channel.close()

    async def attach(self, exchange: str, binding_key: str, sink: Sink) -> None:
        """Add ``sink`` to the group for (exchange, binding_key), creating its queue on first use.

        Raises :class:`BrokerError` (e.g. 404 for a missing exchange) without attaching.
        """
        key = (exchange, binding_key)
        group = self.groups.get(key)
        if group is None:
            group = _Group(self, exchange, binding_key)
            self.groups[key] = group
            try:
                await self._create(group)
            except BaseException as exc:
                if self.groups.get(key) is group:
                    del self.groups[key]
                error = exc if isinstance(exc, BrokerError) else ChannelClosed(str(exc))
                if not group.ready.done():
                    group.ready.set_exception(error)
                    group.ready.exception()
                raise
            group.ready.set_result(None)
            metrics.FANOUT_GROUPS.inc()
        else:
            await asyncio.shield(group.ready)
        if self.groups.get(key) is not group:  # closed while we waited
            raise ChannelClosed("shared subscription closed")
        group.sinks.append(sink)
        sink.group = group
        metrics.FANOUT_SUBSCRIBERS.inc()

    async def _create(self, group: _Group) -> None:
        await self._declare_and_bind(group)
        channel = await self._consumer_channel()
        group.consumer_tag = await channel.consume(group.queue, group.deliver, no_ack=True)

    async def detach(self, sink: Sink) -> None:
        """Remove ``sink``; the last one out cancels the consumer (its auto-delete queue goes with it)."""
        group = sink.group
        sink.group = None
        if group is None:
            return
        with contextlib.suppress(ValueError):
            group.sinks.remove(sink)
            metrics.FANOUT_SUBSCRIBERS.dec()
        if group.sinks or self.groups.get((group.exchange, group.binding_key)) is not group:
            return
        del self.groups[(group.exchange, group.binding_key)]
        metrics.FANOUT_GROUPS.dec()
        channel = self._channel
        if channel is not None and channel.is_open and group.consumer_tag:
            with contextlib.suppress(BrokerError):
                await channel.cancel(group.consumer_tag)
                await channel.delete_queue(group.queue)
        if not self.groups and self._channel is channel and channel is not None:
            # Nothing shared any more: give the channel (and so maybe the connection) back.
            self._channel = None
            await channel.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class FanoutRegistry:
    """One :class:`FanoutHub` per ``Broker.shared_key``."""

    def __init__(self, broker: Broker, topic_exchange: str) -> None:
        self.broker = broker
        self.topic_exchange = topic_exchange
        self.hubs: dict[Any, FanoutHub] = {}

    def hub_for(self, principal: Any) -> FanoutHub:
        key = self.broker.shared_key(principal)
        hub = self.hubs.get(key)
        if hub is None:
            hub = self.hubs[key] = FanoutHub(self.broker, principal, self.topic_exchange)
        return hub

    async def close(self) -> None:
        for hub in self.hubs.values():
            await hub.close()
        self.hubs.clear()
