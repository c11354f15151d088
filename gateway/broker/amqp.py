"""RabbitMQ over AMQP 0-9-1: aio-pika opens the connections, aiormq (aio-pika's transport) carries the hot path.

Sessions of the same user, passcode and vhost share AMQP connections (at most
``sessions_per_connection`` channels each); every session gets its own channel, so one session's broker
error closes that channel only. A *monitor* connection made with the configured URL tells ``/healthz``
whether RabbitMQ is reachable and reconnects with back-off while it is not.

Credentials are never trusted from a pool alone: the pool key includes a salted hash of the passcode, so a
wrong passcode always opens a fresh connection, which RabbitMQ then checks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import datetime
import hashlib
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiormq
import aiormq.abc
import aiormq.connection
import pamqp.constants
import pamqp.exceptions
import pamqp.frame
import pamqp.heartbeat
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.common import FieldTable
from pamqp.header import ContentHeader

from gateway.broker.base import (
    AccessRefused,
    Broker,
    BrokerError,
    BrokerUnavailable,
    Channel,
    ChannelClosed,
    DeliverCallback,
    Delivery,
    MessageProperties,
    PublishNacked,
    VhostNotFound,
)

__all__ = ["AmqpBroker", "AmqpChannel", "Principal", "credentials_from_url"]

logger = logging.getLogger(__name__)

_REPLY = re.compile(r"^([A-Z_]+) - (.*)$", re.DOTALL)

# pamqp checks queue and exchange names against the AMQP 0-9-1 grammar ([a-zA-Z0-9-_.:]); RabbitMQ
# accepts any UTF-8 name up to 255 bytes, and so does its STOMP plugin. Check what RabbitMQ checks.
pamqp.constants.DOMAIN_REGEX["queue-name"] = re.compile(r".*", re.DOTALL)
pamqp.constants.DOMAIN_REGEX["exchange-name"] = re.compile(r".*", re.DOTALL)


class _BufferedFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame reader awaits three reads, takes a lock and fills a BytesIO for every frame: a
    quarter of the gateway's time when it relays messages. This one takes whatever the socket has and
    parses every complete frame in it; the frames and errors it yields are the same."""

    READ_SIZE = 256 * 1024

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = bytearray()
        self._frames: collections.deque[Any] = collections.deque()
        #: (channel number, consumer tag) -> callback: deliveries handed over right here, see _intercept
        self.fast: dict[tuple[int, str], DeliverCallback] = {}
        self._assembling: dict[int, _Assembly] = {}
        slot = _RECEIVER_SLOT.get(None)
        if slot is not None:
            slot.append(self)

    async def get_frame(self) -> Any:
        frames = self._frames
        intercepted = False
        while not frames:
            if intercepted:
                # Deliveries were taken by _intercept: report a no-op frame so that aiormq still sees
                # traffic (it declares a connection stuck after three heartbeat intervals without frames).
                return _NO_OP_FRAME
            try:
                data = await self.reader.read(self.READ_SIZE)
            except OSError as exc:
                raise aiormq.exceptions.AMQPConnectionError(f"Server communication error: {exc!r}") from exc
            if not data:
                if not self._buffer:
                    raise StopAsyncIteration
                raise aiormq.exceptions.AMQPConnectionError(
                    f"Server connection unexpectedly closed with {len(self._buffer)} bytes of a frame read"
                )
            self._buffer += data
            intercepted = self._parse() or intercepted
        return frames.popleft()

    def _parse(self) -> bool:
        """Parse every complete frame; True if any delivery frame was taken by :meth:`_intercept`."""
        intercepted = False
        buf = self._buffer
        end_of_data = len(buf)
        pos = 0
        while end_of_data - pos >= 8:  # type, channel, size (7 bytes) ... frame-end (1 byte)
            if not self.started:
                if buf[pos : pos + 4] == b"AMQP":
                    raise aiormq.exceptions.ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
            end = pos + 8 + int.from_bytes(buf[pos + 3 : pos + 7], "big")
            if end > end_of_data:
                break
            try:
                received = pamqp.frame.unmarshal(bytes(buf[pos:end]))
            except pamqp.exceptions.PAMQPException as exc:
                raise aiormq.exceptions.InvalidFrameError(str(exc)) from exc
            pos = end
            if self.fast and self._intercept(received[1], received[2]):
                intercepted = True
            else:
                self._frames.append(received)
        if pos:
            del buf[:pos]
        return intercepted


    def _intercept(self, channel: int, frame: Any) -> bool:
        """Deliveries for a registered consumer go straight to its callback, without aiormq's per-channel
        queue, reader task and task per message (the other half of the relay cost). True if taken."""
        assembly = self._assembling.get(channel)
        if assembly is not None:
            if isinstance(frame, ContentHeader):
                assembly.header = frame
            elif isinstance(frame, ContentBody):
                assembly.parts.append(frame.value)
                assembly.size += len(frame.value)
            else:  # a protocol violation: let aiormq see it
                del self._assembling[channel]
                return False
            if assembly.header is not None and assembly.size >= (assembly.header.body_size or 0):
                del self._assembling[channel]
                assembly.finish()
            return True
        if type(frame) is spec.Basic.Deliver:
            callback = self.fast.get((channel, frame.consumer_tag or ""))
            if callback is not None:
                self._assembling[channel] = _Assembly(frame, callback)
                return True
        return False

    def forget_channel(self, channel: int) -> None:
        self._assembling.pop(channel, None)
        for key in [key for key in self.fast if key[0] == channel]:
            del self.fast[key]


class _Assembly:
    """A delivery whose content frames are still arriving."""

    __slots__ = ("callback", "deliver", "header", "parts", "size")

    def __init__(self, deliver: spec.Basic.Deliver, callback: DeliverCallback) -> None:
        self.deliver = deliver
        self.callback = callback
        self.header: ContentHeader | None = None
        self.parts: list[bytes] = []
        self.size = 0

    def finish(self) -> None:
        deliver = self.deliver
        assert self.header is not None
        parts = self.parts
        try:
            self.callback(
                Delivery(
                    consumer_tag=deliver.consumer_tag or "",
                    delivery_tag=deliver.delivery_tag or 0,
                    exchange=deliver.exchange or "",
                    routing_key=deliver.routing_key or "",
                    redelivered=bool(deliver.redelivered),
                    body=parts[0] if len(parts) == 1 else b"".join(parts),
                    properties=_from_properties(self.header.properties),
                )
            )
        except Exception:  # one consumer's failure must not stop the connection's reader
            logger.exception("delivery callback failed")


_NO_OP_FRAME = (8, 0, pamqp.heartbeat.Heartbeat())

#: Set around a connect so that its frame receiver can be found (aiormq keeps it to itself).
_RECEIVER_SLOT: contextvars.ContextVar[list[_BufferedFrameReceiver]] = contextvars.ContextVar("receiver_slot")

# Installed for every aiormq connection of this process (aiormq is pinned to 7.2.x for this).
aiormq.connection.FrameReceiver = _BufferedFrameReceiver  # type: ignore[misc]


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
    """Map an aiormq exception to a BrokerError with RabbitMQ's reply name and text."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return PublishNacked()
    text = str(exc.args[0]) if exc.args and exc.args[0] is not None else ""
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError | ConnectionError | OSError):
        return BrokerUnavailable(f"connection to RabbitMQ lost: {text or type(exc).__name__}")
    match = _REPLY.match(text)
    if match is None:
        return ChannelClosed(text or type(exc).__name__)
    name, detail = match.group(1), match.group(2)
    codes = {"NOT_FOUND": 404, "ACCESS_REFUSED": 403, "PRECONDITION_FAILED": 406, "RESOURCE_LOCKED": 405}
    return BrokerError(codes.get(name, 541), name.lower(), detail)


def _invalid_value(exc: BaseException) -> BrokerError:
    return BrokerError(406, "precondition_failed", f"invalid AMQP value: {exc}")


def _to_properties(props: MessageProperties) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=props.headers or None,
        delivery_mode=props.delivery_mode,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration,
        message_id=props.message_id,
        timestamp=(
            datetime.datetime.fromtimestamp(props.timestamp, tz=datetime.UTC)
            if props.timestamp is not None
            else None
        ),
        message_type=props.type,
        user_id=props.user_id,
        app_id=props.app_id,
    )


def _from_properties(props: spec.Basic.Properties) -> MessageProperties:
    timestamp = props.timestamp
    return MessageProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=dict(props.headers) if props.headers else {},
        delivery_mode=props.delivery_mode,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration,
        message_id=props.message_id,
        timestamp=int(timestamp.timestamp()) if timestamp is not None else None,
        type=props.message_type,
        user_id=props.user_id,
        app_id=props.app_id,
    )


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated (user, vhost). ``key`` selects the shared connections."""

    login: str
    vhost: str
    key: tuple[str, str, str]
    url: str


class AmqpChannel(Channel):
    """A session's channel: aiormq underneath, publisher confirms on."""

    def __init__(
        self, channel: aiormq.abc.AbstractChannel, on_release: Any, receiver: _BufferedFrameReceiver | None = None
    ) -> None:
        self._channel = channel
        self._receiver = receiver
        self._closed_by_us = False
        self._on_release = on_release
        self._declared_prefetch: int | None = None
        self._backlog: collections.deque[Any] = collections.deque()
        self._pending_frames: list[Any] = []
        self._flush_scheduled = False
        self._confirming = False
        self._flusher: asyncio.Future[None] | None = None
        channel.closing.add_done_callback(self._closing_done)

    def _closing_done(self, future: asyncio.Future[Any]) -> None:
        self._on_release()
        if self._receiver is not None:
            self._receiver.forget_channel(self._channel.number)
        if self._closed_by_us or self.on_close is None:
            return
        exc = None if future.cancelled() else future.exception()
        error = _broker_error(exc) if exc is not None else ChannelClosed("channel closed by the broker")
        self.on_close(error)

    @property
    def is_open(self) -> bool:
        return not self._channel.is_closed

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise _broker_error(exc) from exc
        except (ValueError, TypeError) as exc:  # pamqp refused to encode a value (e.g. a name too long)
            raise _invalid_value(exc) from exc

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
        ok = await self._call(
            self._channel.queue_declare(
                name,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=FieldTable(arguments or {}),
                passive=passive,
            )
        )
        return str(ok.queue)

    async def check_exchange(self, name: str) -> None:
        if name == "":
            return
        await self._call(self._channel.exchange_declare(name, passive=True))

    async def declare_exchange(self, name: str, type: str = "topic", *, durable: bool = True) -> None:
        await self._call(self._channel.exchange_declare(name, exchange_type=type, durable=durable))

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._call(self._channel.queue_bind(queue, exchange, routing_key=routing_key))

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._call(self._channel.queue_unbind(queue, exchange, routing_key=routing_key))

    async def delete_queue(self, name: str) -> None:
        await self._call(self._channel.queue_delete(name))

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
        if prefetch_count is not None and prefetch_count != self._declared_prefetch:
            # RabbitMQ's per-consumer qos: applies to consumers started after it on this channel.
            await self._call(self._channel.basic_qos(prefetch_count=prefetch_count))
            self._declared_prefetch = prefetch_count

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            delivery = message.delivery
            assert isinstance(delivery, spec.Basic.Deliver)
            callback(
                Delivery(
                    consumer_tag=delivery.consumer_tag or "",
                    delivery_tag=delivery.delivery_tag or 0,
                    exchange=delivery.exchange or "",
                    routing_key=delivery.routing_key or "",
                    redelivered=bool(delivery.redelivered),
                    body=message.body,
                    properties=_from_properties(message.header.properties),
                )
            )

        tag = consumer_tag or f"ctag{self._channel.number}.{secrets.token_hex(8)}"
        key = (self._channel.number, tag)
        if self._receiver is not None:
            self._receiver.fast[key] = callback  # before basic.consume: the first delivery already goes there
        try:
            ok = await self._call(
                self._channel.basic_consume(
                    queue,
                    on_message,
                    no_ack=no_ack,
                    exclusive=exclusive,
                    arguments=FieldTable(arguments or {}),
                    consumer_tag=tag,
                )
            )
        except BaseException:
            if self._receiver is not None:
                self._receiver.fast.pop(key, None)
            raise
        return str(ok.consumer_tag)

    async def cancel(self, consumer_tag: str) -> None:
        await self._call(self._channel.basic_cancel(consumer_tag))
        if self._receiver is not None:
            self._receiver.fast.pop((self._channel.number, consumer_tag), None)

    def start_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: MessageProperties
    ) -> asyncio.Future[None]:
        """Hand the message to the connection's writer now (call order is publish order); the future
        resolves on the broker's confirm once :meth:`enable_confirms` ran, at once before that.

        This is aiormq's ``basic_publish`` without its costs for a gateway: an await and a socket write
        per message (publishes of one event-loop pass go out in one write) and a random ``message_id``
        stamped on every message (a STOMP SEND without ``amqp-message-id`` must reach AMQP consumers
        without one, as with RabbitMQ's own STOMP plugin).
        """
        loop = asyncio.get_running_loop()
        result: asyncio.Future[None] = loop.create_future()
        ch = self._channel
        if ch.is_closed:
            result.set_exception(ChannelClosed())
            return result
        if len(exchange.encode()) > 255 or len(routing_key.encode()) > 255:
            result.set_exception(
                BrokerError(406, "precondition_failed", "exchange names and routing keys are limited to 255 bytes")
            )
            return result
        try:
            frames: list[Any] = [
                spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=False),
                ContentHeader(properties=_to_properties(properties), body_size=len(body)),
                *ch._split_body(body),  # type: ignore[attr-defined]
            ]
        except (ValueError, TypeError) as exc:
            result.set_exception(_invalid_value(exc))
            return result
        self._pending_frames.extend(frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_pending)
        if not self._confirming:
            result.set_result(None)
            return result
        ch.delivery_tag += 1  # type: ignore[attr-defined]
        confirmation: asyncio.Future[Any] = ch.create_future()
        ch.confirmations[ch.delivery_tag] = confirmation  # type: ignore[attr-defined]

        def done(confirmed: asyncio.Future[Any]) -> None:
            if result.done():
                return
            if confirmed.cancelled():
                result.set_exception(ChannelClosed())
            elif (exc := confirmed.exception()) is not None:
                result.set_exception(_broker_error(exc))
            elif isinstance(confirmed.result(), spec.Basic.Nack):
                result.set_exception(PublishNacked())
            else:
                result.set_result(None)

        confirmation.add_done_callback(done)
        return result

    def _flush_pending(self) -> None:
        """Marshal this pass's publishes into one payload for the connection's writer."""
        self._flush_scheduled = False
        frames, self._pending_frames = self._pending_frames, []
        if not frames or self._channel.is_closed:
            return
        # aiormq's writer drains the socket after a frame that carries a drain future: so the writer, then
        # the write queue, then this channel's backlog and finally drain() hold publishers back while
        # RabbitMQ is not reading (memory alarm, flow control).
        drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            payload = ChannelFrame.marshall(frames=frames, channel_number=self._channel.number, drain_future=drained)
        except (ValueError, TypeError):  # only values no STOMP header can produce (checked in headers.py)
            logger.exception("dropping %d AMQP frames pamqp cannot encode", len(frames))
            return
        self._enqueue(payload)

    async def drain(self) -> None:
        """Wait while publishes are queued behind a full writer (back-pressure for the client's reader)."""
        if self._backlog and self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])

    async def enable_confirms(self) -> None:
        """Turn publisher confirms on (``confirm.select``), as RabbitMQ's STOMP plugin does at the first
        SEND that asks for a receipt: until then no SEND pays for a confirm."""
        if self._confirming:
            return
        self._flush_pending()
        if self._flusher is not None and not self._flusher.done():
            await self._flusher  # publishes before the select must reach the writer before it
        await self._call(self._channel.rpc(spec.Confirm.Select()))  # type: ignore[attr-defined]
        ch = self._channel
        ch.publisher_confirms = True  # type: ignore[attr-defined]
        ch.delivery_tag = 0  # type: ignore[attr-defined]  # the broker counts from the select
        self._confirming = True

    def _enqueue(self, frame: Any) -> None:
        """Put a frame on the connection's bounded write queue, keeping order when it is full."""
        queue: asyncio.Queue[Any] = self._channel.write_queue  # type: ignore[attr-defined]
        if not self._backlog:
            try:
                queue.put_nowait(frame)
                return
            except asyncio.QueueFull:
                pass
        self._backlog.append(frame)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush(queue))

    async def _flush(self, queue: asyncio.Queue[Any]) -> None:
        while self._backlog:
            await queue.put(self._backlog[0])
            self._backlog.popleft()

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
        if not self._channel.is_closed:
            asyncio.ensure_future(self._channel.basic_ack(delivery_tag, multiple=multiple)).add_done_callback(
                _ignore_result
            )

    def nack(self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True) -> None:
        if not self._channel.is_closed:
            asyncio.ensure_future(
                self._channel.basic_nack(delivery_tag, multiple=multiple, requeue=requeue)
            ).add_done_callback(_ignore_result)

    async def close(self) -> None:
        self._flush_pending()  # publishes of this pass go out before the close
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher], timeout=5)  # and those held in the backlog too
        self._closed_by_us = True
        if not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._channel.close(), 5)


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Pooled:
    """One shared AMQP connection and the number of channels open on it."""

    def __init__(
        self, connection: aio_pika.abc.AbstractConnection, receiver: _BufferedFrameReceiver | None
    ) -> None:
        self.connection = connection
        self.receiver = receiver
        self.channels = 0

    @property
    def underlay(self) -> aiormq.abc.AbstractConnection:
        transport = self.connection.transport
        assert transport is not None
        return transport.connection

    @property
    def is_open(self) -> bool:
        return _alive(self.connection)


class AmqpBroker(Broker):
    """RabbitMQ, reached at ``url``. ``url``'s credentials are the monitor's, not the sessions'."""

    kind = "rabbitmq"
    #: Seconds an AMQP connection without channels stays open for the next session of its user.
    IDLE_CLOSE = 30.0

    def __init__(self, url: str, *, sessions_per_connection: int = 500, heartbeat: int = 15) -> None:
        self.url = url
        self.sessions_per_connection = sessions_per_connection
        self.heartbeat = heartbeat
        self._salt = secrets.token_bytes(16)
        self._pools: dict[tuple[str, str, str], list[_Pooled]] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._monitor: aio_pika.abc.AbstractConnection | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._closing = False
        self._idle_tasks: set[asyncio.Future[None]] = set()

    def _with_params(self, url: str) -> str:
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}heartbeat={self.heartbeat}&name=stomp-ws-gateway"

    @property
    def is_available(self) -> bool:
        return _alive(self._monitor)

    async def _connect(self, url: str) -> aio_pika.abc.AbstractConnection:
        try:
            return await aio_pika.connect(self._with_params(url), timeout=10)
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            login = credentials_from_url(url)[0]
            raise AccessRefused(login) from exc
        except aiormq.exceptions.ConnectionNotAllowed as exc:
            raise VhostNotFound(credentials_from_url(url)[2]) from exc
        except aiormq.exceptions.InvalidFrameError as exc:
            # RabbitMQ answers connection.open on a vhost the user may not use with connection.close
            # (530 NOT_ALLOWED); aiormq reports that as an unexpected frame.
            if "Connection.OpenOk" in str(exc):
                raise VhostNotFound(credentials_from_url(url)[2]) from exc
            raise BrokerUnavailable(f"RabbitMQ at {_redact(url)} refused the connection: {exc}") from exc
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ at {_redact(url)}: {exc or type(exc).__name__}"
            ) from exc

    async def start(self) -> None:
        self._monitor = await self._connect(self.url)
        self._monitor_task = asyncio.create_task(self._watch(), name="amqp-monitor")

    async def _watch(self) -> None:
        """Keep the monitor connection up, reconnecting with back-off (0.5 s doubling to 30 s)."""
        delay = 0.5
        while not self._closing:
            if _alive(self._monitor):
                delay = 0.5
                await asyncio.sleep(0.5)
                continue
            logger.warning("RabbitMQ connection lost; reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)
            try:
                if self._monitor is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._monitor.close(), 1)
                self._monitor = await self._connect(self.url)
                logger.info("RabbitMQ connection restored")
            except BrokerError as exc:
                logger.warning("%s", exc.text)
                delay = min(delay * 2, 30.0)

    def _key(self, login: str, passcode: str, vhost: str) -> tuple[str, str, str]:
        digest = hashlib.sha256(self._salt + passcode.encode()).hexdigest()
        return (login, digest, vhost)

    async def authenticate(self, login: str, passcode: str, vhost: str) -> Principal:
        key = self._key(login, passcode, vhost)
        principal = Principal(login, vhost, key, _url_for(self.url, login, passcode, vhost))
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
                if pooled.channels < self.sessions_per_connection:
                    return pooled
            slot: list[_BufferedFrameReceiver] = []
            token = _RECEIVER_SLOT.set(slot)
            try:
                connection = await self._connect(principal.url)
            finally:
                _RECEIVER_SLOT.reset(token)
            pooled = _Pooled(connection, slot[0] if len(slot) == 1 else None)
            pool.append(pooled)
            return pooled

    async def open_channel(self, principal: Any) -> Channel:
        assert isinstance(principal, Principal)
        pooled = await self._connection_for(principal)
        pooled.channels += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                pooled.channels -= 1
                if pooled.channels == 0:
                    self._schedule_idle_close(principal.key, pooled)

        try:
            channel = await pooled.underlay.channel(publisher_confirms=False)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            release()
            raise _broker_error(exc) from exc
        return AmqpChannel(channel, release, pooled.receiver)

    def _schedule_idle_close(self, key: tuple[str, str, str], pooled: _Pooled) -> None:
        """Close a connection nobody has used for IDLE_CLOSE seconds (a login per token would otherwise
        leave one AMQP connection per token open for ever)."""

        async def close_if_idle() -> None:
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
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pooled.connection.close(), 5)

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
        connections = [p.connection for pool in self._pools.values() for p in pool]
        if self._monitor is not None:
            connections.append(self._monitor)
        self._pools.clear()
        for connection in connections:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)


def _alive(connection: aio_pika.abc.AbstractConnection | None) -> bool:
    """aio-pika marks a connection closed only when close() is called; the transport knows sooner."""
    if connection is None or connection.is_closed:
        return False
    transport = getattr(connection, "transport", None)
    return transport is not None and not transport.connection.is_closed


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":******@", 1)
    return url
