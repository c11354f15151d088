"""Shared subscriptions: one broker consumer per (exchange, binding key), many sessions.

Non-durable, unnamed ``/topic`` and ``/exchange`` subscriptions with ``ack:auto`` carry no per-session
broker state, so sessions that share a broker connection (a :class:`FanoutHub` per
``Broker.shared_key``) also share one auto-delete queue per binding. Each delivery becomes one
:class:`~gateway.stomp.writer.MessageTemplate`, serialized once; every subscribed session only prepends
its ``subscription`` header.

Continuity (see :mod:`gateway.continuity` for the data structures) lives here too, because a shared binding
is where a message stream has one order:

* With ``--history-size`` each group numbers its messages under an epoch of its own, stamps
  ``x-recovery-position`` into the shared template (so still one serialization per delivery) and keeps a
  :class:`~gateway.continuity.History`. A group nobody subscribes to any more stays (and records) for
  ``--history-ttl`` seconds, so that a client that reconnects finds it.
* With ``--retain X`` a :class:`Retainer` consumes exchange ``X`` once (``#``, as the default login on the
  default vhost), keeps the newest message per routing key, and feeds every group bound to ``X`` itself:
  those groups consume no queue of their own (they check the session's right to bind with a throwaway
  queue). Retained values and live messages then come from one stream, so a joining subscriber gets the
  retained ones and every later one, with no duplicate and no gap.
* A subscriber joins a group in one synchronous step (:meth:`_Group.join`): the messages it asked for
  (recovered or retained) go to its sink, then it is added, before any other delivery can run.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import metrics
from gateway.broker.base import Broker, BrokerError, Channel, ChannelClosed, ConnectionLostWithNode, Delivery
from gateway.continuity import ContinuityRequest, HandOver, History, RetainedMap, is_literal, topic_matcher
from gateway.headers import delivery_headers
from gateway.metrics import TALLY
from gateway.settings import DEFAULTS
from gateway.stomp.writer import MessageTemplate

__all__ = ["ContinuitySettings", "FanoutHub", "FanoutRegistry", "Retainer", "Sink"]

logger = logging.getLogger(__name__)

#: One delivery of a group in ``LATENCY_SAMPLE_MASK + 1`` is timed for the delivery-latency histogram (a
#: Prometheus observation costs about 2 µs, the whole relay of a message about 45 µs).
LATENCY_SAMPLE_MASK = 7
#: A shared queue nobody consumes (its consumer never started) is deleted by the broker after this long.
QUEUE_EXPIRES_MS = 60_000
#: Seconds between attempts to consume a retained exchange (it may not exist yet, the broker may be away):
#: the first wait, doubled after each failure up to the second.
RETAIN_RETRY_SECONDS = (0.1, 2.0)


@dataclass(kw_only=True, slots=True)
class ContinuitySettings:
    """The :class:`gateway.settings.Config` settings of the same names that shared bindings need."""

    retain: list[str] = field(default_factory=list)
    retain_max_keys: int = DEFAULTS.retain_max_keys
    retain_max_bytes: int = DEFAULTS.retain_max_bytes
    history_size: int = DEFAULTS.history_size
    history_ttl: float = DEFAULTS.history_ttl
    history_max_bytes: int = DEFAULTS.history_max_bytes
    default_login: str = DEFAULTS.default_login
    default_passcode: str = DEFAULTS.default_passcode
    default_vhost: str = DEFAULTS.default_vhost


def _template_size(template: MessageTemplate) -> int:
    return len(template.body) + sum(len(name) + len(value) for name, value in template.headers)


def _delivery_size(delivery: Delivery) -> int:
    table = delivery.properties.headers
    return len(delivery.body) + len(delivery.routing_key) + sum(len(str(k)) + len(str(v)) for k, v in table.items())


async def _discard_queue(broker: Broker, principal: Any, queue: str) -> None:
    """Delete ``queue`` on a channel of its own, if it is there (best effort: a broker that is gone took it
    with it, or expires it)."""
    with contextlib.suppress(BrokerError):
        channel = await broker.open_channel(principal)
        try:
            await channel.delete_queue(queue)
        finally:
            await channel.close()


async def _to_the_end(operation: Awaitable[None]) -> None:
    """Await ``operation`` to its end even when the caller is cancelled meanwhile, then let the cancellation
    through. (``asyncio.shield`` alone lets the caller end at once while the operation goes on: a gateway
    stopping then closes the broker connection under a queue's deletion, and the queue stays behind.)"""
    task = asyncio.ensure_future(operation)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.shield(task)
        raise


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
    """One (exchange, binding key): its queue and consumer (or its :class:`Retainer`), its sinks, its history."""

    def __init__(self, hub: FanoutHub, exchange: str, binding_key: str, retainer: Retainer | None) -> None:
        self.hub = hub
        self.exchange = exchange
        self.binding_key = binding_key
        self.retainer = retainer  # set: fed by it, no queue of its own
        self.matches = topic_matcher(binding_key)
        self.sinks: list[Sink] = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.consumer_tag = ""
        self.queue = ""
        self.prefix = f"F_{hub.id}_{next(hub.counter)}@@"
        self.count = 0
        settings = hub.settings
        self.history: History[MessageTemplate] | None = None
        if settings.history_size > 0:
            self.history = History(settings.history_size, settings.history_max_bytes, settings.history_ttl)
        #: while nobody subscribes: the timer that removes the group (see FanoutHub.detach)
        self.linger: asyncio.TimerHandle | None = None

    def deliver(self, delivery: Delivery) -> None:
        self.count += 1
        timed = not self.count & LATENCY_SAMPLE_MASK
        started = time.perf_counter() if timed else 0.0
        headers = delivery_headers(delivery, f"{self.prefix}{self.count}", self.hub.topic_exchange)
        history = self.history
        if history is None:
            template = MessageTemplate(headers, delivery.body)
        else:
            headers.append(("x-recovery-position", f"{history.epoch}:{history.next_offset()}"))
            template = MessageTemplate(headers, delivery.body)
            history.append(template, _template_size(template), time.monotonic())
        sinks = list(self.sinks)
        for sink in sinks:
            try:
                sink.on_message(template)
            except Exception:  # a broken session must not stop the others
                logger.exception("fan-out delivery to a session failed")
        # Counted once per delivery, not per session: the loop above is the hot path.
        TALLY.messages_delivered += len(sinks)
        TALLY.frames_sent["MESSAGE"] += len(sinks)
        if timed:
            metrics.DELIVERY_LATENCY.observe(time.perf_counter() - started)

    def join(self, sink: Sink, request: ContinuityRequest | None) -> HandOver:
        """Add ``sink``, first handing it what ``request`` asks for: the messages after its recovery position
        (if this history still covers it), else the retained message of each matching routing key. One
        synchronous step, so the next delivery is the first live message: nothing twice, nothing missed."""
        hand_over = HandOver()
        if request is not None:
            first: list[MessageTemplate] = []
            recovered = None
            if request.recover_from is not None:
                epoch, offset = request.recover_from
                found = None if self.history is None else self.history.since(epoch, offset, time.monotonic())
                recovered = found is not None
                first = found or []
            last_value = None
            if request.last_value and not recovered:
                last_value = self.retainer is not None
                if self.retainer is not None:
                    first = self._retained()
            hand_over = HandOver(recovered, last_value)
            for template in first:
                sink.on_message(template)
        self.sinks.append(sink)
        sink.group = self
        return hand_over

    def _retained(self) -> list[MessageTemplate]:
        """The retained messages for this binding, marked ``x-last-value:true`` and stamped with the current
        position: they stand for everything up to now, so recovering from them misses nothing later."""
        assert self.retainer is not None
        templates = []
        history = self.history
        for delivery in self.retainer.retained.matching(self.binding_key):
            self.count += 1
            headers = delivery_headers(delivery, f"{self.prefix}{self.count}", self.hub.topic_exchange)
            headers.append(("x-last-value", "true"))
            if history is not None:
                headers.append(("x-recovery-position", history.position()))
            templates.append(MessageTemplate(headers, delivery.body))
        return templates


class Retainer:
    """The newest message per routing key of one exchange (``--retain``), and the feed of every group bound
    to it. One consumer (binding ``#``) per gateway, as the default login on the default vhost; it
    reconnects by itself, and while it is away groups for its exchange consume queues of their own."""

    def __init__(self, registry: FanoutRegistry, exchange: str) -> None:
        self.registry = registry
        self.exchange = exchange
        settings = registry.settings
        self.retained: RetainedMap[Delivery] = RetainedMap(settings.retain_max_keys, settings.retain_max_bytes)
        self.literal: dict[str, list[_Group]] = {}
        self.wildcard: list[_Group] = []
        self.ready = False
        #: the names of the feed's latest queues, newest last (one more each time the feed is lost and comes back)
        self.queues: collections.deque[str] = collections.deque(maxlen=8)
        self._task: asyncio.Task[None] | None = None
        self._channel: Channel | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"retain-{self.exchange}")

    def deliver(self, delivery: Delivery) -> None:
        self.retained.put(delivery.routing_key, delivery, _delivery_size(delivery))
        for group in self.literal.get(delivery.routing_key, ()):
            group.deliver(delivery)
        for group in self.wildcard:
            if group.matches(delivery.routing_key):
                group.deliver(delivery)

    def register(self, group: _Group) -> None:
        if not self.ready:
            raise ChannelClosed("the retained feed is not available")
        if is_literal(group.binding_key):
            self.literal.setdefault(group.binding_key, []).append(group)
        else:
            self.wildcard.append(group)

    def unregister(self, group: _Group) -> None:
        with contextlib.suppress(ValueError):
            if is_literal(group.binding_key):
                groups = self.literal.get(group.binding_key, [])
                groups.remove(group)
                if not groups:
                    del self.literal[group.binding_key]
            else:
                self.wildcard.remove(group)

    async def _run(self) -> None:
        settings = self.registry.settings
        broker = self.registry.broker
        warned = False
        delay = RETAIN_RETRY_SECONDS[0]
        while True:
            channel: Channel | None = None
            queue: str | None = None
            consuming = False
            try:
                principal = await broker.authenticate(
                    settings.default_login, settings.default_passcode, settings.default_vhost
                )
                channel = await broker.open_channel(principal, f"retain-{self.exchange}")
                closed: asyncio.Future[BrokerError] = asyncio.get_running_loop().create_future()

                def on_close(error: BrokerError, closed: asyncio.Future[BrokerError] = closed) -> None:
                    if not closed.done():
                        closed.set_result(error)

                channel.on_close = on_close
                queue = f"stomp-retain-{self.registry.id}-{secrets.token_hex(4)}"
                self.queues.append(queue)
                queue = await channel.declare_queue(
                    queue,
                    auto_delete=True,
                    arguments={"x-expires": QUEUE_EXPIRES_MS},
                )
                await channel.bind_queue(queue, self.exchange, "#")
                await channel.consume(queue, self.deliver, no_ack=True)
                consuming = True  # from here on the queue goes with its consumer (auto-delete)
                self._channel = channel
                self.ready = True
                warned = False
                delay = RETAIN_RETRY_SECONDS[0]
                logger.info("retaining the newest message per routing key of exchange %r", self.exchange)
                error = await closed
                self._lost(error)
            except (asyncio.CancelledError, BrokerError) as error:
                if channel is not None:
                    with contextlib.suppress(BrokerError):
                        await _to_the_end(channel.close())
                if queue is not None and not consuming:
                    # Stopped or refused before its consumer started: the queue, bound to "#", would take every
                    # message of the exchange until it expires (a consumed one goes with its consumer).
                    await _to_the_end(_discard_queue(broker, principal, queue))
                if isinstance(error, asyncio.CancelledError):
                    raise
                if not warned:
                    logger.warning("--retain %s: not consuming it yet (%s); retrying", self.exchange, error.text)
                    warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETAIN_RETRY_SECONDS[1])

    def _lost(self, error: BrokerError) -> None:
        """The feed stopped: its groups end (their sessions hear why); the map is kept (it is still the last
        value anyone has seen), and refreshed once the feed is back."""
        self.ready = False
        self._channel = None
        logger.warning("--retain %s: the feed stopped (%s); reconnecting", self.exchange, error.text)
        groups = [g for groups in self.literal.values() for g in groups] + self.wildcard
        self.literal.clear()
        self.wildcard.clear()
        for group in groups:
            group.hub._group_lost(group, error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self.ready = False


class FanoutHub:
    """Shared consumers for the sessions of one broker connection key."""

    def __init__(
        self,
        broker: Broker,
        principal: Any,
        topic_exchange: str,
        settings: ContinuitySettings | None = None,
        retainers: dict[str, Retainer] | None = None,
    ) -> None:
        self.broker = broker
        self.principal = principal
        self.topic_exchange = topic_exchange
        self.settings = settings or ContinuitySettings()
        #: retained exchanges this hub's principal may be fed from (same vhost as the retainers)
        self.retainers = retainers or {}
        self.id = base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()
        self.counter = itertools.count(1)
        self.groups: dict[tuple[str, str], _Group] = {}
        self._channel: Channel | None = None
        self._channel_lock = asyncio.Lock()
        self._removing: set[asyncio.Future[None]] = set()

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
                error = ConnectionLostWithNode(
                    "the queue of a shared subscription was lost", detail=f"RabbitMQ cancelled fan-out consumer {consumer_tag!r}"
                )
                self._group_lost(group, error)

    def _channel_closed(self, error: BrokerError) -> None:
        """The shared channel died (connection lost, broker restart): every sink of a group consuming on it
        hears it."""
        self._channel = None
        for group in [g for g in self.groups.values() if g.retainer is None]:
            self._group_lost(group, error)

    def _group_lost(self, group: _Group, error: BrokerError) -> None:
        """``group`` can deliver no more: it goes, and each of its sinks hears why."""
        if self.groups.get((group.exchange, group.binding_key)) is group:
            del self.groups[(group.exchange, group.binding_key)]
        if group.linger is not None:
            group.linger.cancel()
            group.linger = None
        if not group.ready.done():
            group.ready.set_exception(error)
            group.ready.exception()  # mark retrieved; waiters re-raise it
        else:
            metrics.FANOUT_GROUPS.dec()
        metrics.FANOUT_SUBSCRIBERS.dec(len(group.sinks))
        sinks, group.sinks = group.sinks, []
        for sink in sinks:
            sink.group = None
            sink.on_error(error)

    async def _declare_and_bind(self, group: _Group) -> None:
        """Declare the group's queue and bind it on a throwaway channel: a missing exchange (404) or a
        refused topic permission (403) closes that channel, not the shared one every sink of this hub
        depends on. The queue is not exclusive (the throwaway channel may be on another connection of the
        pool); it is auto-delete, so it goes with its consumer, and expires if no consumer ever comes."""
        channel = await self.broker.open_channel(self.principal)
        try:
            group.queue = f"stomp-fanout-{self.id}-{next(self.counter)}-{secrets.token_hex(4)}"
            group.queue = await channel.declare_queue(
                group.queue,
                auto_delete=True,
                arguments={"x-expires": QUEUE_EXPIRES_MS},
            )
            await channel.bind_queue(group.queue, group.exchange, group.binding_key)
        finally:
            await channel.close()

    async def attach(
        self, exchange: str, binding_key: str, sink: Sink, request: ContinuityRequest | None = None
    ) -> HandOver:
        """Add ``sink`` to the group for (exchange, binding_key), creating its queue on first use; first
        hand it what ``request`` asks for (see :meth:`_Group.join`), and say what it got.

        Raises :class:`BrokerError` (e.g. 404 for a missing exchange) without attaching.
        """
        key = (exchange, binding_key)
        group = self.groups.get(key)
        if group is None:
            retainer = self.retainers.get(exchange)
            group = _Group(self, exchange, binding_key, retainer if retainer is not None and retainer.ready else None)
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
                if group.queue and not group.consumer_tag:
                    # Declared and bound, never consumed (refused, or the session went meanwhile): it would take
                    # its messages until it expires (QUEUE_EXPIRES_MS).
                    await _to_the_end(_discard_queue(self.broker, self.principal, group.queue))
                raise
            group.ready.set_result(None)
            metrics.FANOUT_GROUPS.inc()
        else:
            await asyncio.shield(group.ready)
        if self.groups.get(key) is not group:  # closed while we waited
            raise ChannelClosed("shared subscription closed")
        if group.linger is not None:
            group.linger.cancel()
            group.linger = None
        metrics.FANOUT_SUBSCRIBERS.inc()
        return group.join(sink, request)

    async def _create(self, group: _Group) -> None:
        await self._declare_and_bind(group)
        if group.retainer is not None:
            # The queue only proved that this principal may bind there; the retainer feeds the group.
            channel = await self.broker.open_channel(self.principal)
            try:
                await channel.delete_queue(group.queue)
            finally:
                await channel.close()
            group.queue = ""
            group.retainer.register(group)
            return
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
        if group.history is not None:
            # Kept (and recording) a while, so that a client reconnecting after a blip can recover from it.
            group.linger = asyncio.get_running_loop().call_later(
                self.settings.history_ttl, self._linger_ended, group
            )
            return
        await self._remove(group)

    def _linger_ended(self, group: _Group) -> None:
        group.linger = None
        if not group.sinks:
            task = asyncio.ensure_future(self._remove(group))
            self._removing.add(task)
            task.add_done_callback(self._removing.discard)

    async def _remove(self, group: _Group) -> None:
        if group.sinks or self.groups.get((group.exchange, group.binding_key)) is not group:
            return
        del self.groups[(group.exchange, group.binding_key)]
        metrics.FANOUT_GROUPS.dec()
        if group.retainer is not None:
            group.retainer.unregister(group)
            return
        channel = self._channel
        if channel is not None and channel.is_open and group.consumer_tag:
            with contextlib.suppress(BrokerError):
                await channel.cancel(group.consumer_tag)
                await channel.delete_queue(group.queue)
        consuming = any(g.retainer is None for g in self.groups.values())
        if not consuming and self._channel is channel and channel is not None:
            # Nothing shared any more: give the channel (and so maybe the connection) back.
            self._channel = None
            await channel.close()

    async def close(self) -> None:
        for task in list(self._removing):
            task.cancel()
        for group in list(self.groups.values()):
            if group.linger is not None:
                group.linger.cancel()
                group.linger = None
            if group.retainer is not None:
                group.retainer.unregister(group)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class FanoutRegistry:
    """One :class:`FanoutHub` per ``Broker.shared_key``, and the gateway's :class:`Retainer` per ``--retain``
    exchange (started by :meth:`start`)."""

    def __init__(self, broker: Broker, topic_exchange: str, settings: ContinuitySettings | None = None) -> None:
        self.broker = broker
        self.topic_exchange = topic_exchange
        self.settings = settings or ContinuitySettings()
        self.id = base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()
        self.hubs: dict[Any, FanoutHub] = {}
        self.retainers = {exchange: Retainer(self, exchange) for exchange in dict.fromkeys(self.settings.retain)}

    def start(self) -> None:
        """Start consuming the retained exchanges (in the background: they may not exist yet)."""
        for retainer in self.retainers.values():
            retainer.start()

    def hub_for(self, principal: Any) -> FanoutHub:
        key = self.broker.shared_key(principal)
        hub = self.hubs.get(key)
        if hub is None:
            # Retained exchanges are the default vhost's: other vhosts' exchanges of that name are others.
            same_vhost = getattr(principal, "vhost", None) == self.settings.default_vhost
            hub = self.hubs[key] = FanoutHub(
                self.broker, principal, self.topic_exchange, self.settings, self.retainers if same_vhost else {}
            )
        return hub

    async def close(self) -> None:
        for retainer in self.retainers.values():
            await retainer.close()
        for hub in self.hubs.values():
            await hub.close()
        self.hubs.clear()
