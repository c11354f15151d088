"""RabbitMQ over AMQP 0-9-1, on the gateway's own lean AMQP connection (:mod:`gateway.broker.amqp_connection`).

Sessions of the same user, passcode and vhost share AMQP connections (at most
``sessions_per_connection`` channels each); every session gets its own channel, so one session's broker
error closes that channel only. A *monitor* connection made with the configured URL tells ``/readyz``
whether RabbitMQ is reachable and reconnects with back-off while it is not.

Credentials are never trusted from a pool alone: the pool key includes a salted hash of the passcode, so a
wrong passcode always opens a fresh connection, which RabbitMQ then checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pamqp.frame
from pamqp import commands as spec
from pamqp.common import FieldTable

from gateway import metrics
from gateway.broker.amqp_codec import Deliver, HeaderTooLarge, encode_publish
from gateway.broker.amqp_connection import (
    AmqpConnection,
    BasicConsume,
    ChannelClosedByBroker,
    ConnectionParameters,
    ExchangeDeclare,
    HandshakeRefused,
    QueueBind,
    QueueDeclare,
    QueueDelete,
    QueueUnbind,
    WireChannel,
)
from gateway.broker.base import (
    AccessRefused,
    Broker,
    BrokerError,
    BrokerUnavailable,
    Channel,
    ChannelClosed,
    ConnectionLostWithNode,
    DeliverCallback,
    Delivery,
    FrameTooLarge,
    MessageProperties,
    PublishNacked,
    VhostNotFound,
    check_names,
)

__all__ = ["AmqpBroker", "AmqpChannel", "Principal", "credentials_from_url"]

logger = logging.getLogger(__name__)

_REPLY = re.compile(r"^([A-Z_]+) - (.*)$", re.DOTALL)

#: Shown in RabbitMQ's management UI for every connection of the gateway.
CONNECTION_NAME = "stomp-ws-gateway"


def credentials_from_url(url: str) -> tuple[str, str, str]:
    """(login, passcode, vhost) from an AMQP URL; missing parts default to guest/guest and '/'."""
    parts = urlsplit(url)
    login = unquote(parts.username) if parts.username else "guest"
    passcode = unquote(parts.password) if parts.password else "guest"
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) if path else "/"
    return login, passcode, vhost


def _url_for(base: str, login: str, passcode: str, vhost: str) -> str:
    parts = urlsplit(base)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{quote(login, safe='')}:{quote(passcode, safe='')}@{host}{port}/{quote(vhost, safe='')}{query}"


def _broker_error(exc: BaseException) -> BrokerError:
    """Map an error of the AMQP connection to a BrokerError with RabbitMQ's reply name and text."""
    if isinstance(exc, BrokerError):
        return exc
    text = str(exc.args[0]) if exc.args and exc.args[0] is not None else ""
    if isinstance(exc, ConnectionError | OSError):
        match = _REPLY.match(text)
        if match is not None and match.group(1) in _CONNECTION_REPLY_CODES:
            text = f"RabbitMQ closed the gateway's connection: {_close_reason(exc)}"
            if match.group(1) == "CONNECTION_FORCED":  # the node shuts down or restarts (or an operator's close)
                return ConnectionLostWithNode(text)
            return BrokerUnavailable(text)
        return ConnectionLostWithNode(
            "the connection to the message broker was lost", detail=f"connection to RabbitMQ lost: {exc!r}"
        )
    match = _REPLY.match(text) if isinstance(exc, ChannelClosedByBroker) else None
    if match is None:  # not RabbitMQ's words
        return ChannelClosed("the message broker closed the channel")
    name, detail = match.group(1), match.group(2)
    codes = {"NOT_FOUND": 404, "ACCESS_REFUSED": 403, "PRECONDITION_FAILED": 406, "RESOURCE_LOCKED": 405}
    return BrokerError(codes.get(name, 541), name.lower(), detail)


#: AMQP reply codes that close a whole connection, by the name RabbitMQ puts before its reply text.
_CONNECTION_REPLY_CODES = {
    "CONNECTION_FORCED": 320,
    "INVALID_PATH": 402,
    "FRAME_ERROR": 501,
    "SYNTAX_ERROR": 502,
    "COMMAND_INVALID": 503,
    "CHANNEL_ERROR": 504,
    "UNEXPECTED_FRAME": 505,
    "RESOURCE_ERROR": 506,
    "NOT_ALLOWED": 530,
    "NOT_IMPLEMENTED": 540,
    "INTERNAL_ERROR": 541,
}


def _close_reason(exc: BaseException | None) -> str:
    """RabbitMQ's reply code and text for a closed connection (no address: the texts carry none)."""
    if exc is None:
        return "closed without a reason"
    text = str(exc.args[0]) if exc.args and exc.args[0] is not None else type(exc).__name__
    match = _REPLY.match(text)
    if match is not None and match.group(1) in _CONNECTION_REPLY_CODES:
        return f"{_CONNECTION_REPLY_CODES[match.group(1)]} {text}"
    return text


def _invalid_value(exc: BaseException) -> BrokerError:
    return BrokerError(406, "precondition_failed", f"invalid AMQP value: {exc}")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated (user, vhost). ``key`` selects the shared connections; ``urls`` (one per broker node,
    with the passcode: never logged) reach the nodes as this user."""

    login: str
    vhost: str
    key: tuple[str, str, str]
    urls: tuple[str, ...] = field(repr=False)


class AmqpChannel(Channel):
    """A session's channel on a shared :class:`AmqpConnection`."""

    def __init__(self, channel: WireChannel, pooled: _Pooled, owner: str | None) -> None:
        self._channel = channel
        self._pooled = pooled
        #: the session this channel works for: exclusive queues belong to it, errors are logged with it
        self.owner = owner
        self._closed_by_us = False
        self._declared_prefetch: int | None = None
        self._temporary: list[str] = []
        #: the largest frame payload RabbitMQ accepts on this connection (frame_max less the 8 octets of
        #: frame type, channel, size and frame-end)
        self.max_payload = (pooled.connection.frame_max or 2**32) - 8
        channel.on_closed = self._closing_done
        channel.on_cancelled = self._cancelled_by_broker

    def _cancelled_by_broker(self, consumer_tag: str) -> None:
        if self.on_cancel is not None:
            self.on_cancel(consumer_tag)

    def _closing_done(self, exc: BaseException | None) -> None:
        self._pooled.release()
        for queue in self._temporary:
            if self._pooled.exclusive.get(queue, "") == self.owner:
                del self._pooled.exclusive[queue]
        if self._closed_by_us or self.on_close is None:
            return
        error = _broker_error(exc) if exc is not None else ChannelClosed("channel closed by the broker")
        if not self._pooled.is_open and not isinstance(error, BrokerUnavailable):
            # The connection went: say that (and why), not "channel closed".
            reason = self._pooled.connection.error
            error = _broker_error(reason) if reason is not None else ConnectionLostWithNode(
                "the connection to the message broker was lost", detail=f"AMQP connection lost: {exc!r}"
            )
        self.on_close(error)

    @property
    def is_open(self) -> bool:
        return not self._channel.closed

    async def _call(self, method: Any) -> Any:
        """One synchronous AMQP method; its failure as a BrokerError (the channel is closed then)."""
        self._pooled.last_owner = self.owner
        try:
            return await self._channel.rpc(method)
        except (ValueError, TypeError) as exc:  # pamqp refused to encode a value
            raise _invalid_value(exc) from exc
        except Exception as exc:
            raise _broker_error(exc) from exc

    def _method(self, build: Callable[[], Any]) -> Any:
        """A command built by pamqp, or 406 if pamqp refuses to encode a value (e.g. a name too long)."""
        try:
            return build()
        except (ValueError, TypeError) as exc:
            raise _invalid_value(exc) from exc

    def _check_fits(self, method: Any, what: str) -> None:
        """A method frame larger than ``frame_max`` is a connection error (501): refuse it here."""
        try:
            size = len(pamqp.frame.marshal(method, self._channel.number)) - 8
        except (ValueError, TypeError) as exc:
            raise _invalid_value(exc) from exc
        if size > self.max_payload:
            raise FrameTooLarge(what, size, self.max_payload + 8)

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
        check_names(queue_name=name)
        self._pooled.check_exclusive(name, self.owner)
        table = FieldTable(arguments or {})
        method = self._method(
            lambda: QueueDeclare(
                queue=name,
                passive=passive,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=table,
            )
        )
        if arguments:
            self._check_fits(method, "The queue arguments")
        ok = await self._call(method)
        queue = str(ok.queue)
        if exclusive and not passive:
            self._pooled.exclusive[queue] = self.owner
            if not name:  # a temporary reply queue: RabbitMQ deletes it with this channel's consumer
                self._temporary.append(queue)
        return queue

    async def check_exchange(self, name: str) -> None:
        if name == "":
            return
        check_names(exchange_name=name)
        await self._call(self._method(lambda: ExchangeDeclare(exchange=name, passive=True)))

    async def declare_exchange(self, name: str, type: str = "topic", *, durable: bool = True) -> None:
        check_names(exchange_name=name)
        await self._call(self._method(lambda: ExchangeDeclare(exchange=name, exchange_type=type, durable=durable)))

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        check_names(queue_name=queue, exchange_name=exchange, binding_key=routing_key)
        self._pooled.check_exclusive(queue, self.owner)
        await self._call(self._method(lambda: QueueBind(queue=queue, exchange=exchange, routing_key=routing_key)))

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        check_names(queue_name=queue, exchange_name=exchange, binding_key=routing_key)
        self._pooled.check_exclusive(queue, self.owner)
        await self._call(self._method(lambda: QueueUnbind(queue=queue, exchange=exchange, routing_key=routing_key)))

    async def delete_queue(self, name: str) -> None:
        check_names(queue_name=name)
        self._pooled.check_exclusive(name, self.owner)
        await self._call(self._method(lambda: QueueDelete(queue=name)))
        self._pooled.exclusive.pop(name, None)

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
        check_names(queue_name=queue, consumer_tag=consumer_tag)
        self._pooled.check_exclusive(queue, self.owner)
        tag = consumer_tag or f"ctag{self._channel.number}.{secrets.token_hex(8)}"
        method = self._method(
            lambda: BasicConsume(
                queue=queue,
                consumer_tag=tag,
                no_ack=no_ack,
                exclusive=exclusive,
                arguments=FieldTable(arguments or {}),
            )
        )
        if arguments:
            self._check_fits(method, "The consumer arguments")
        if prefetch_count is not None and prefetch_count != self._declared_prefetch:
            # RabbitMQ's per-consumer qos: applies to consumers started after it on this channel.
            await self._call(spec.Basic.Qos(prefetch_count=prefetch_count))
            self._declared_prefetch = prefetch_count

        def on_delivery(deliver: Deliver, properties: MessageProperties, body: bytes) -> None:
            callback(
                Delivery(
                    consumer_tag=deliver.consumer_tag,
                    delivery_tag=deliver.delivery_tag,
                    exchange=deliver.exchange,
                    routing_key=deliver.routing_key,
                    redelivered=deliver.redelivered,
                    body=body,
                    properties=properties,
                )
            )

        self._channel.add_consumer(tag, on_delivery)  # before basic.consume: the first delivery goes there
        try:
            ok = await self._call(method)
        except BaseException:
            self._channel.remove_consumer(tag)
            raise
        return str(ok.consumer_tag)

    async def cancel(self, consumer_tag: str) -> None:
        await self._call(spec.Basic.Cancel(consumer_tag=consumer_tag))
        self._channel.remove_consumer(consumer_tag)

    def start_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: MessageProperties
    ) -> asyncio.Future[None]:
        """Hand the message to the connection now (call order is publish order; publishes of one
        event-loop pass go out in one write); the future resolves on the broker's confirm once
        :meth:`enable_confirms` ran, at once before that. No ``message_id`` is stamped on a message
        that has none (a STOMP SEND without ``amqp-message-id`` reaches AMQP consumers without one, as
        with RabbitMQ's own STOMP plugin)."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[None] = loop.create_future()
        ch = self._channel
        if ch.closed:
            result.set_exception(ChannelClosed())
            return result
        if len(exchange) > 63 or len(routing_key) > 63:  # could be over 255 bytes of UTF-8
            try:
                check_names(exchange_name=exchange, routing_key=routing_key)
            except BrokerError as error:
                result.set_exception(error)
                return result
        self._pooled.last_owner = self.owner
        number = ch.number
        try:
            payload = encode_publish(number, exchange, routing_key, properties, body, ch.max_content, self.max_payload)
        except HeaderTooLarge as exc:
            result.set_exception(FrameTooLarge("The message headers", exc.args[0], self.max_payload + 8))
            return result
        except (ValueError, TypeError) as exc:
            result.set_exception(_invalid_value(exc))
            return result
        confirmation = ch.publish(payload)
        if confirmation is None:
            result.set_result(None)
            return result

        def done(confirmed: asyncio.Future[bool]) -> None:
            if result.done():
                return
            if confirmed.cancelled():
                result.set_exception(ChannelClosed())
            elif (exc := confirmed.exception()) is not None:
                result.set_exception(_broker_error(exc))
            elif not confirmed.result():
                result.set_exception(PublishNacked())
            else:
                result.set_result(None)

        confirmation.add_done_callback(done)
        return result

    @property
    def held_back(self) -> bool:
        return self._pooled.connection.blocked

    async def drain(self) -> None:
        """Wait while RabbitMQ is not reading (flow control, alarms): back-pressure for the client's reader."""
        await self._pooled.connection.writable()

    async def enable_confirms(self) -> None:
        """Turn publisher confirms on (``confirm.select``), as RabbitMQ's STOMP plugin does at the first
        SEND that asks for a receipt: until then no SEND pays for a confirm."""
        if self._channel.confirming:
            return
        self._pooled.last_owner = self.owner
        try:
            await self._channel.select_confirms()  # after this pass's publishes, which it flushes first
        except Exception as exc:
            raise _broker_error(exc) from exc

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties,
        *,
        confirm: bool = False,
    ) -> None:
        if confirm:
            await self.enable_confirms()
        future = self.start_publish(exchange, routing_key, body, properties)
        if confirm:
            await future
        else:
            future.add_done_callback(_ignore_result)

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        self._pooled.last_owner = self.owner
        if not self._channel.closed:
            self._channel.send_soon(
                pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=delivery_tag, multiple=multiple), self._channel.number)
            )

    def nack(self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True) -> None:
        self._pooled.last_owner = self.owner
        if not self._channel.closed:
            frame = spec.Basic.Nack(delivery_tag=delivery_tag, multiple=multiple, requeue=requeue)
            self._channel.send_soon(pamqp.frame.marshal(frame, self._channel.number))

    async def close(self) -> None:
        self._closed_by_us = True
        if not self._channel.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._channel.close(), 5)  # after this pass's publishes


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Pooled:
    """One shared AMQP connection: its channel count and numbers, the exclusive queues of its sessions."""

    def __init__(
        self,
        connection: AmqpConnection,
        principal: Principal,
        on_idle: Callable[[_Pooled], None],
        node: str = "",
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.connection = connection
        self.principal = principal
        #: which node the connection goes to (" node 2/3", "" with one URL: for the log); ``on_lost`` hears of
        #: its loss
        self.node = node
        self._on_lost = on_lost
        self.channels = 0
        #: hands out channel numbers and keeps closing channels' frames off the wire
        self.gate = connection.gate
        #: no channel number left to hand out: new sessions go to another connection
        self.exhausted = False
        #: exclusive queue -> the session (channel owner) that declared it; AMQP ties exclusivity to the
        #: connection, and this connection is shared, so the gateway ties it to the session
        self.exclusive: dict[str, str | None] = {}
        #: the session whose channel wrote last: named in the log if RabbitMQ closes the connection
        self.last_owner: str | None = None
        self.closed_by_us = False
        self._on_idle = on_idle
        metrics.AMQP_CONNECTIONS.inc()
        connection.add_close_callback(self._connection_closed)

    @property
    def is_open(self) -> bool:
        return self.connection.is_open

    def release(self) -> None:
        """One channel of this connection closed."""
        self.channels -= 1
        metrics.AMQP_CHANNELS.dec()
        if self.channels == 0:
            self._on_idle(self)

    def check_exclusive(self, queue: str, owner: str | None) -> None:
        """Raise RESOURCE_LOCKED, in RabbitMQ's words, if another session declared ``queue`` exclusive."""
        if queue and queue in self.exclusive and self.exclusive[queue] != owner:
            raise BrokerError(
                405,
                "resource_locked",
                f"cannot obtain exclusive access to locked queue '{queue}' in vhost '{self.principal.vhost}'. "
                "It could be originally declared on another connection or the exclusive property value does "
                "not match that of the original declaration.",
            )

    async def close(self) -> None:
        self.closed_by_us = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.close(), 5)

    def _connection_closed(self, exc: BaseException) -> None:
        metrics.AMQP_CONNECTIONS.dec()
        if self.closed_by_us:
            return
        if self._on_lost is not None:
            self._on_lost()
        text = str(exc.args[0]) if exc.args and exc.args[0] is not None else ""
        match = _REPLY.match(text)
        if match is None or match.group(1) not in _CONNECTION_REPLY_CODES:
            logger.warning(
                "lost a shared AMQP connection%s (user %r, vhost %r, %d session channels on it) without a "
                "connection.close from RabbitMQ: the network or the node went away (%r)",
                self.node,
                self.principal.login,
                self.principal.vhost,
                self.channels,
                exc,
            )
            return
        logger.warning(
            "RabbitMQ%s closed a shared AMQP connection (user %r, vhost %r, %d session channels on it): %s; "
            "the last frame on it came from %s",
            self.node,
            self.principal.login,
            self.principal.vhost,
            self.channels,
            _close_reason(exc),
            f"session {self.last_owner}" if self.last_owner else "the gateway itself (shared fan-out)",
        )


class AmqpBroker(Broker):
    """RabbitMQ, reached at ``urls``: one URL, or one per node of a cluster. The URLs' credentials are the
    monitor's, not the sessions'.

    Several nodes: each new AMQP connection goes to the next node in turn (nodes that just failed last), so
    the pooled connections spread over the reachable nodes; a connection that cannot be made moves on to the
    next node. The monitor connection moves to another node when its node goes, so ``/readyz`` stays ready
    while any node is reachable. What happens to the sessions of a lost connection is the connection layer's
    business (:meth:`gateway.stomp.session.Session.broker_lost`).
    """

    kind = "rabbitmq"
    #: Seconds for the TCP connect and the AMQP handshake of one connection.
    CONNECT_TIMEOUT = 10.0
    #: Seconds an AMQP connection without channels stays open for the next session of its user.
    IDLE_CLOSE = 30.0
    #: Seconds a node whose connection failed or was lost is tried only after the others.
    NODE_BACKOFF = 5.0

    def __init__(self, urls: str | Sequence[str], *, sessions_per_connection: int = 500, heartbeat: int = 15) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("AmqpBroker needs at least one AMQP URL")
        self.sessions_per_connection = sessions_per_connection
        self.heartbeat = heartbeat
        self._salt = secrets.token_bytes(16)
        self._pools: dict[tuple[str, str, str], list[_Pooled]] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._monitor: AmqpConnection | None = None
        self._monitor_lost = asyncio.Event()
        self._monitor_task: asyncio.Task[None] | None = None
        self._closing = False
        self._idle_tasks: set[asyncio.Future[None]] = set()
        #: round-robin position of the next connection, and per node the time before which it goes last
        self._next_node = 0
        self._backoff_until = [0.0] * len(self.urls)

    @property
    def url(self) -> str:
        """The first node's URL (with the monitor's credentials)."""
        return self.urls[0]

    @property
    def is_available(self) -> bool:
        return _alive(self._monitor)

    async def _connect(self, url: str) -> AmqpConnection:
        parameters = ConnectionParameters.from_url(url, heartbeat=self.heartbeat, name=CONNECTION_NAME)
        try:
            return await AmqpConnection.connect(parameters, timeout=self.CONNECT_TIMEOUT)
        except HandshakeRefused as exc:
            if exc.reply_code == 403:
                raise AccessRefused(parameters.login) from exc
            if exc.reply_code == 530:  # connection.open on a vhost that is missing or not the user's
                raise VhostNotFound(parameters.vhost) from exc
            raise BrokerUnavailable(
                "the message broker refused the connection",
                detail=f"RabbitMQ at {_where(url)} refused the connection: {exc}",
            ) from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(
                "the message broker is unreachable",
                detail=f"RabbitMQ at {_where(url)} did not complete the AMQP handshake within "
                f"{self.CONNECT_TIMEOUT:g} s (is something else listening there?)",
            ) from exc
        except OSError as exc:  # ConnectionLost included: the socket closed during the handshake
            raise BrokerUnavailable(
                "the message broker is unreachable",
                detail=f"cannot reach RabbitMQ at {_where(url)}: {exc or type(exc).__name__}",
            ) from exc

    def _node_order(self) -> list[int]:
        """The nodes to try for the next connection: round-robin from the next one, nodes that failed in the
        last :attr:`NODE_BACKOFF` seconds last."""
        count = len(self.urls)
        first, self._next_node = self._next_node, (self._next_node + 1) % count
        order = [(first + step) % count for step in range(count)]
        now = asyncio.get_running_loop().time()
        return sorted(order, key=lambda index: self._backoff_until[index] > now)

    def _node_name(self, index: int) -> str:
        """" node 2/3" for the log (the URL's position in --amqp-url, not its address), "" with one URL."""
        return f" node {index + 1}/{len(self.urls)}" if len(self.urls) > 1 else ""

    def _node_failed(self, index: int) -> None:
        self._backoff_until[index] = asyncio.get_running_loop().time() + self.NODE_BACKOFF

    async def _connect_spread(self, urls: Sequence[str]) -> tuple[AmqpConnection, int]:
        """A connection to the first node of :meth:`_node_order` that takes one (``urls[i]`` reaches node i),
        and that node's index. Wrong credentials fail at once (they are the cluster's); if no node can be
        reached, the last node's :class:`BrokerUnavailable` is raised."""
        failure: BrokerUnavailable | None = None
        for index in self._node_order():
            try:
                connection = await self._connect(urls[index])
            except BrokerUnavailable as exc:
                if len(urls) > 1:
                    logger.warning("cannot use RabbitMQ%s: %s", self._node_name(index), exc.detail)
                self._node_failed(index)
                failure = exc
                continue
            self._backoff_until[index] = 0.0
            return connection, index
        assert failure is not None
        raise failure

    async def start(self) -> None:
        await self._open_monitor()
        self._monitor_task = asyncio.create_task(self._watch(), name="amqp-monitor")

    async def _open_monitor(self) -> None:
        connection, index = await self._connect_spread(self.urls)
        self._monitor = connection
        self._monitor_lost.clear()
        connection.add_close_callback(lambda _exc: self._monitor_ended(index))
        if len(self.urls) > 1:
            logger.info("RabbitMQ monitor connection on%s", self._node_name(index))

    def _monitor_ended(self, index: int) -> None:
        if not self._closing:
            self._node_failed(index)
        self._monitor_lost.set()

    #: Longest wait between two reconnect attempts: readiness follows RabbitMQ's return within about this.
    MAX_RECONNECT_DELAY = 1.0

    async def _watch(self) -> None:
        """Keep the monitor connection up: when it goes, connect again at once (another node, if there is
        one), then with back-off (0.25 s doubling to :attr:`MAX_RECONNECT_DELAY`)."""
        delay = 0.0
        down_since: float | None = None
        last_report = 0.0
        loop = asyncio.get_running_loop()
        while not self._closing:
            if _alive(self._monitor):
                delay = 0.0
                await self._monitor_lost.wait()
                continue
            if down_since is None:
                down_since = last_report = loop.time()
                logger.warning("RabbitMQ connection lost; reconnecting every %.1f s at most", self.MAX_RECONNECT_DELAY)
            lost_at = down_since
            await asyncio.sleep(delay)
            try:
                if self._monitor is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._monitor.close(), 1)
                await self._open_monitor()
                logger.warning("RabbitMQ connection restored after %.1f s", loop.time() - lost_at)
                metrics.BROKER_RECONNECTS.inc()
                down_since = None
            except BrokerError as exc:
                if loop.time() - last_report >= 30:  # one line a while, not one per attempt
                    last_report = loop.time()
                    detail = exc.detail if isinstance(exc, BrokerUnavailable) else exc.text
                    logger.warning("RabbitMQ still unreachable after %.0f s: %s", last_report - lost_at, detail)
                delay = min(max(delay * 2, 0.25), self.MAX_RECONNECT_DELAY)

    def _key(self, login: str, passcode: str, vhost: str) -> tuple[str, str, str]:
        digest = hashlib.sha256(self._salt + passcode.encode()).hexdigest()
        return (login, digest, vhost)

    async def authenticate(self, login: str, passcode: str, vhost: str) -> Principal:
        key = self._key(login, passcode, vhost)
        principal = Principal(login, vhost, key, tuple(_url_for(url, login, passcode, vhost) for url in self.urls))
        pool = self._pools.get(key)
        if pool and any(p.is_open for p in pool):
            return principal
        await self._connection_for(principal)
        return principal

    async def _connection_for(self, principal: Principal) -> _Pooled:
        lock = self._locks.setdefault(principal.key, asyncio.Lock())
        async with lock:
            pool = [p for p in self._pools.get(principal.key, []) if p.is_open]
            self._pools[principal.key] = pool
            for pooled in pool:
                if pooled.channels < self.sessions_per_connection and not pooled.exhausted:
                    return pooled
            connection, index = await self._connect_spread(principal.urls)
            pooled = _Pooled(
                connection, principal, self._idle, self._node_name(index), lambda: self._node_failed(index)
            )
            pool.append(pooled)
            if len(self.urls) > 1:
                logger.info("AMQP connection for user %r opened on%s", principal.login, self._node_name(index))
            return pooled

    async def open_channel(self, principal: Any, owner: str | None = None) -> Channel:
        assert isinstance(principal, Principal)
        while True:
            pooled = await self._connection_for(principal)
            number = pooled.gate.take(pooled.connection.channels)
            if number is not None:
                break
            # Every number is in use or still in its close handshake (or its close-ok was lost).
            logger.info("an AMQP connection has no channel number left; opening another")
            pooled.exhausted = True
            if pooled.channels == 0:
                self._idle(pooled)
        pooled.channels += 1
        metrics.AMQP_CHANNELS.inc()
        try:
            channel = await pooled.connection.open_channel(number)
        except Exception as exc:
            pooled.release()
            raise _broker_error(exc) from exc
        return AmqpChannel(channel, pooled, owner)

    def _idle(self, pooled: _Pooled) -> None:
        self._schedule_idle_close(pooled.principal.key, pooled)

    def _schedule_idle_close(self, key: tuple[str, str, str], pooled: _Pooled) -> None:
        """Close a connection nobody has used for IDLE_CLOSE seconds (a login per token would otherwise
        leave one AMQP connection per token open for ever)."""

        async def close_if_idle() -> None:
            if not pooled.exhausted:
                await asyncio.sleep(self.IDLE_CLOSE)
            if pooled.channels or self._closing:
                return
            pool = self._pools.get(key, [])
            if pooled in pool:
                pool.remove(pooled)
            if not pool:
                self._pools.pop(key, None)
                lock = self._locks.get(key)
                if lock is not None and not lock.locked():
                    del self._locks[key]
            await pooled.close()

        task = asyncio.ensure_future(close_if_idle())
        self._idle_tasks.add(task)
        task.add_done_callback(self._idle_tasks.discard)

    def shared_key(self, principal: Any) -> Any:
        assert isinstance(principal, Principal)
        return principal.key

    async def close(self) -> None:
        self._closing = True
        for task in list(self._idle_tasks):
            task.cancel()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        for pool in self._pools.values():
            for pooled in pool:
                pooled.closed_by_us = True
        connections = [p.connection for pool in self._pools.values() for p in pool]
        if self._monitor is not None:
            connections.append(self._monitor)
        self._pools.clear()
        for connection in connections:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)


def _alive(connection: AmqpConnection | None) -> bool:
    return connection is not None and connection.is_open


def _where(url: str) -> str:
    """Host, port and vhost of an AMQP URL, for the log: never the credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{host}:{port}/{unquote(parts.path[1:]) if len(parts.path) > 1 else ''}"
