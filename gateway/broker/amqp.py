"""RabbitMQ over AMQP 0-9-1: aio-pika opens the connections, aiormq (aio-pika's transport) carries the hot path.

Sessions of the same user, passcode and vhost share AMQP connections (at most
``sessions_per_connection`` channels each); every session gets its own channel, so one session's broker
error closes that channel only. A *monitor* connection made with the configured URL tells ``/readyz``
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
from collections.abc import Callable, Mapping
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

from gateway import metrics
from gateway.broker.base import (
    AccessRefused,
    Broker,
    BrokerError,
    BrokerUnavailable,
    Channel,
    ChannelClosed,
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
        #: told about the broker's side of channel close handshakes (set by the broker adapter)
        self.gate: _WriteGate | None = None
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
                kind = type(received[2])
                if (kind is spec.Channel.Close or kind is spec.Channel.CloseOk) and self.gate is not None:
                    self.gate.received(received[1], kind is spec.Channel.Close)
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

# Channel close handshake, as (class id, method id) bytes of a method frame's payload.
_CHANNEL_CLOSE = b"\x00\x14\x00\x28"
_CHANNEL_CLOSE_OK = b"\x00\x14\x00\x29"
# Close handshake progress of one channel number (bits).
_SENT_CLOSE, _GOT_CLOSE, _SENT_CLOSE_OK, _GOT_CLOSE_OK = 1, 2, 4, 8


def _handshake_done(state: int) -> bool:
    return bool((state & _SENT_CLOSE and state & _GOT_CLOSE_OK) or (state & _GOT_CLOSE and state & _SENT_CLOSE_OK))


class _WriteGate:
    """Keeps frames that RabbitMQ answers with a *connection* error off a shared connection.

    RabbitMQ closes the whole connection (504 CHANNEL_ERROR) for any frame on a channel number after its
    close handshake ("expected 'channel.open'") and for a ``channel.open`` before it ended ("second
    'channel.open' seen"), and that would end every session sharing the connection. So every frame a
    channel writes passes :meth:`admit` when the writer takes it (the last moment, so no race with the
    handshake): once either side has sent ``channel.close`` only the ``close-ok`` passes (RabbitMQ ignores
    anything else on a closing channel anyway), and after the handshake nothing does. Channel numbers are
    handed out by :meth:`take`, round-robin, and reused only after both halves of the handshake were seen
    (the broker's half is reported by the frame receiver through :meth:`received`).
    """

    def __init__(self, channel_max: int) -> None:
        self.channel_max = channel_max or 65535  # 0: no limit but the field's
        self._state: dict[int, int] = {}  # numbers ever opened -> handshake bits (0: open)
        self._last = 0

    def take(self, busy: Mapping[int, Any]) -> int | None:
        """A channel number free on both sides, or None when the connection has none left."""
        for step in range(1, self.channel_max + 1):
            number = (self._last + step - 1) % self.channel_max + 1
            state = self._state.get(number)
            if number not in busy and (state is None or _handshake_done(state)):
                self._last = number
                self._state[number] = 0
                return number
        return None

    def received(self, number: int, close: bool) -> None:
        """The broker sent ``channel.close`` (``close``) or ``channel.close-ok`` on ``number``."""
        if number in self._state:
            self._state[number] |= _GOT_CLOSE if close else _GOT_CLOSE_OK

    def admit(self, number: int, payload: bytes) -> bool:
        """Whether a frame of channel ``number`` may go on the wire now (called once, by the writer)."""
        state = self._state.get(number, 0)
        method = payload[7:11] if payload[:1] == b"\x01" else b""
        if state == 0:
            if method == _CHANNEL_CLOSE:
                self._state[number] = _SENT_CLOSE
            elif method == _CHANNEL_CLOSE_OK:  # the answer to the broker's close
                self._state[number] = _GOT_CLOSE | _SENT_CLOSE_OK
            return True
        if _handshake_done(state) or method != _CHANNEL_CLOSE_OK or state & _SENT_CLOSE_OK:
            return False
        self._state[number] = state | _SENT_CLOSE_OK
        return True


class _GatedFrame:
    """A frame for aiormq's writer whose payload is decided by the :class:`_WriteGate` when it is written
    (aiormq's writer reads ``payload``, ``should_close``, ``should_drain`` and calls ``drain()``)."""

    __slots__ = ("_payload", "frame", "gate", "number")

    def __init__(self, frame: ChannelFrame, gate: _WriteGate, number: int) -> None:
        self.frame = frame
        self.gate = gate
        self.number = number
        self._payload: bytes | None = None

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            payload = self.frame.payload
            self._payload = payload if self.gate.admit(self.number, payload) else b""
        return self._payload

    @property
    def should_close(self) -> bool:
        return self.frame.should_close

    @property
    def should_drain(self) -> bool:
        return self.frame.should_drain

    def drain(self) -> None:
        self.frame.drain()

    def __repr__(self) -> str:
        return f"<gated frame of channel {self.number}>"


class _ChannelWrites:
    """Stands in for the connection's write queue on one aiormq channel: every frame of the channel, aiormq's
    own (RPCs, acks, close-ok) and the gateway's publishes, passes the connection's :class:`_WriteGate`."""

    __slots__ = ("gate", "number", "queue")

    def __init__(self, queue: asyncio.Queue[Any], gate: _WriteGate, number: int) -> None:
        self.queue = queue
        self.gate = gate
        self.number = number

    def put_nowait(self, frame: ChannelFrame) -> None:
        self.queue.put_nowait(_GatedFrame(frame, self.gate, self.number))

    async def put(self, frame: ChannelFrame) -> None:
        await self.queue.put(_GatedFrame(frame, self.gate, self.number))

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
        match = _REPLY.match(text)
        if match is not None and match.group(1) in _CONNECTION_REPLY_CODES:
            return BrokerUnavailable(f"RabbitMQ closed the gateway's connection: {_close_reason(exc)}")
        return BrokerUnavailable(
            "the connection to the message broker was lost", detail=f"connection to RabbitMQ lost: {exc!r}"
        )
    match = _REPLY.match(text)
    if match is None:  # not RabbitMQ's words: aiormq's, which name its objects
        return ChannelClosed("the message broker closed the channel")
    name, detail = match.group(1), match.group(2)
    codes = {"NOT_FOUND": 404, "ACCESS_REFUSED": 403, "PRECONDITION_FAILED": 406, "RESOURCE_LOCKED": 405}
    return BrokerError(codes.get(name, 541), name.lower(), detail)


def _header_bound(props: MessageProperties) -> int:
    """An upper bound of the AMQP content-header payload for these properties, without encoding them:
    class, weight, body size and flags (14), every short-string property at its largest (13 x 256), and
    each header at four bytes a character plus its key length, type and value length (6)."""
    bound = 14 + 13 * 256 + 4
    for key, value in props.headers.items():
        if not isinstance(value, str):
            return 2**32  # not from a STOMP header: encode to know
        bound += 6 + 4 * (len(key) + len(value))
    return bound


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
    """RabbitMQ's reply code and text for a closed connection (no address: aiormq's texts carry none)."""
    if exc is None:
        return "closed without a reason"
    text = str(exc.args[0]) if exc.args and exc.args[0] is not None else type(exc).__name__
    match = _REPLY.match(text)
    if match is not None and match.group(1) in _CONNECTION_REPLY_CODES:
        return f"{_CONNECTION_REPLY_CODES[match.group(1)]} {text}"
    return text


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

    def __init__(self, channel: aiormq.abc.AbstractChannel, pooled: _Pooled, owner: str | None) -> None:
        self._channel = channel
        self._pooled = pooled
        self._receiver = pooled.receiver
        #: the session this channel works for: exclusive queues belong to it, errors are logged with it
        self.owner = owner
        self._closed_by_us = False
        self._declared_prefetch: int | None = None
        self._backlog: collections.deque[Any] = collections.deque()
        self._pending_frames: list[Any] = []
        self._flush_scheduled = False
        self._confirming = False
        self._flusher: asyncio.Future[None] | None = None
        self._temporary: list[str] = []
        frame_max = pooled.underlay.connection_tune.frame_max
        #: the largest frame payload RabbitMQ accepts on this connection (frame_max less the 8 octets of
        #: frame type, channel, size and frame-end)
        self.max_payload = (frame_max or 2**32) - 8
        channel.closing.add_done_callback(self._closing_done)

    def _closing_done(self, future: asyncio.Future[Any]) -> None:
        self._pooled.release()
        for queue in self._temporary:
            if self._pooled.exclusive.get(queue, "") == self.owner:
                del self._pooled.exclusive[queue]
        if self._receiver is not None:
            self._receiver.forget_channel(self._channel.number)
        if self._closed_by_us or self.on_close is None:
            return
        exc = None if future.cancelled() else future.exception()
        error = _broker_error(exc) if exc is not None else ChannelClosed("channel closed by the broker")
        if not self._pooled.is_open and not isinstance(error, BrokerUnavailable):
            # The connection went (aiormq closes its channels with a bare Exception): say that, not
            # "channel closed".
            error = BrokerUnavailable(
                "the connection to the message broker was lost", detail=f"AMQP connection lost: {exc!r}"
            )
        self.on_close(error)

    @property
    def is_open(self) -> bool:
        return not self._channel.is_closed

    async def _call(self, coro: Any) -> Any:
        self._pooled.last_owner = self.owner
        try:
            return await coro
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise _broker_error(exc) from exc
        except (ValueError, TypeError) as exc:  # pamqp refused to encode a value (e.g. a name too long)
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
        if arguments:
            self._check_fits(spec.Queue.Declare(queue=name, arguments=table), "The queue arguments")
        ok = await self._call(
            self._channel.queue_declare(
                name,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=table,
                passive=passive,
            )
        )
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
        await self._call(self._channel.exchange_declare(name, passive=True))

    async def declare_exchange(self, name: str, type: str = "topic", *, durable: bool = True) -> None:
        check_names(exchange_name=name)
        await self._call(self._channel.exchange_declare(name, exchange_type=type, durable=durable))

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        check_names(queue_name=queue, exchange_name=exchange, binding_key=routing_key)
        self._pooled.check_exclusive(queue, self.owner)
        await self._call(self._channel.queue_bind(queue, exchange, routing_key=routing_key))

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        check_names(queue_name=queue, exchange_name=exchange, binding_key=routing_key)
        self._pooled.check_exclusive(queue, self.owner)
        await self._call(self._channel.queue_unbind(queue, exchange, routing_key=routing_key))

    async def delete_queue(self, name: str) -> None:
        check_names(queue_name=name)
        self._pooled.check_exclusive(name, self.owner)
        await self._call(self._channel.queue_delete(name))
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
        if arguments:
            self._check_fits(
                spec.Basic.Consume(queue=queue, consumer_tag=consumer_tag, arguments=FieldTable(arguments)),
                "The consumer arguments",
            )
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
        if len(exchange) > 63 or len(routing_key) > 63:  # could be over 255 bytes of UTF-8
            try:
                check_names(exchange_name=exchange, routing_key=routing_key)
            except BrokerError as error:
                result.set_exception(error)
                return result
        self._pooled.last_owner = self.owner
        try:
            header = ContentHeader(properties=_to_properties(properties), body_size=len(body))
            if _header_bound(properties) > self.max_payload and len(header.marshal()) > self.max_payload:
                result.set_exception(FrameTooLarge("The message headers", len(header.marshal()), self.max_payload + 8))
                return result
            frames: list[Any] = [
                spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=False),
                header,
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
        self._pooled.last_owner = self.owner
        if not self._channel.is_closed:
            asyncio.ensure_future(self._channel.basic_ack(delivery_tag, multiple=multiple)).add_done_callback(
                _ignore_result
            )

    def nack(self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True) -> None:
        self._pooled.last_owner = self.owner
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
    """One shared AMQP connection: its channel count and numbers, the exclusive queues of its sessions."""

    def __init__(
        self,
        connection: aio_pika.abc.AbstractConnection,
        receiver: _BufferedFrameReceiver | None,
        principal: Principal,
        on_idle: Callable[[_Pooled], None],
    ) -> None:
        self.connection = connection
        self.receiver = receiver
        self.principal = principal
        self.channels = 0
        underlay = self.underlay
        self.gate = _WriteGate(underlay.connection_tune.channel_max)
        if receiver is not None:
            receiver.gate = self.gate
        #: no channel number left to hand out: new sessions go to another connection
        self.exhausted = False
        #: exclusive queue -> the session (channel owner) that declared it; AMQP ties exclusivity to the
        #: connection, and this connection is shared, so the gateway ties it to the session
        self.exclusive: dict[str, str | None] = {}
        #: the session whose channel wrote last: named in the log if RabbitMQ closes the connection
        self.last_owner: str | None = None
        self.closed_by_us = False
        self._on_idle = on_idle
        underlay.closing.add_done_callback(self._connection_closed)
        metrics.AMQP_CONNECTIONS.inc()

    @property
    def underlay(self) -> aiormq.abc.AbstractConnection:
        transport = self.connection.transport
        assert transport is not None
        return transport.connection

    @property
    def is_open(self) -> bool:
        return _alive(self.connection)

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

    def _connection_closed(self, future: asyncio.Future[Any]) -> None:
        metrics.AMQP_CONNECTIONS.dec()
        if self.closed_by_us:
            return
        exc = None if future.cancelled() else future.exception()
        text = str(exc.args[0]) if exc is not None and exc.args and exc.args[0] is not None else ""
        match = _REPLY.match(text)
        if match is None or match.group(1) not in _CONNECTION_REPLY_CODES:
            logger.warning(
                "lost a shared AMQP connection (user %r, vhost %r, %d session channels on it) without a "
                "connection.close from RabbitMQ: the network or the node went away (%r)",
                self.principal.login,
                self.principal.vhost,
                self.channels,
                exc,
            )
            return
        logger.warning(
            "RabbitMQ closed a shared AMQP connection (user %r, vhost %r, %d session channels on it): %s; "
            "the last frame on it came from %s",
            self.principal.login,
            self.principal.vhost,
            self.channels,
            _close_reason(exc),
            f"session {self.last_owner}" if self.last_owner else "the gateway itself (shared fan-out)",
        )


class AmqpBroker(Broker):
    """RabbitMQ, reached at ``url``. ``url``'s credentials are the monitor's, not the sessions'."""

    kind = "rabbitmq"
    #: Seconds for the TCP connect and the AMQP handshake of one connection.
    CONNECT_TIMEOUT = 10.0
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
            return await aio_pika.connect(self._with_params(url), timeout=self.CONNECT_TIMEOUT)
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
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(
                "the message broker is unreachable",
                detail=f"cannot reach RabbitMQ at {_where(url)}: {exc or type(exc).__name__}",
            ) from exc

    async def start(self) -> None:
        self._monitor = await self._connect(self.url)
        self._monitor_task = asyncio.create_task(self._watch(), name="amqp-monitor")

    #: Longest wait between two reconnect attempts: readiness follows RabbitMQ's return within about this.
    MAX_RECONNECT_DELAY = 1.0

    async def _watch(self) -> None:
        """Keep the monitor connection up, reconnecting with back-off (0.25 s doubling to
        :attr:`MAX_RECONNECT_DELAY`)."""
        delay = 0.25
        down_since: float | None = None
        last_report = 0.0
        loop = asyncio.get_running_loop()
        while not self._closing:
            if _alive(self._monitor):
                delay = 0.25
                await asyncio.sleep(0.25)
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
                self._monitor = await self._connect(self.url)
                logger.warning("RabbitMQ connection restored after %.1f s", loop.time() - lost_at)
                metrics.BROKER_RECONNECTS.inc()
                down_since = None
            except BrokerError as exc:
                if loop.time() - last_report >= 30:  # one line a while, not one per attempt
                    last_report = loop.time()
                    detail = exc.detail if isinstance(exc, BrokerUnavailable) else exc.text
                    logger.warning("RabbitMQ still unreachable after %.0f s: %s", last_report - lost_at, detail)
                delay = min(delay * 2, self.MAX_RECONNECT_DELAY)

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
                if pooled.channels < self.sessions_per_connection and not pooled.exhausted:
                    return pooled
            slot: list[_BufferedFrameReceiver] = []
            token = _RECEIVER_SLOT.set(slot)
            try:
                connection = await self._connect(principal.url)
            finally:
                _RECEIVER_SLOT.reset(token)
            pooled = _Pooled(connection, slot[0] if len(slot) == 1 else None, principal, self._idle)
            pool.append(pooled)
            return pooled

    async def open_channel(self, principal: Any, owner: str | None = None) -> Channel:
        assert isinstance(principal, Principal)
        while True:
            pooled = await self._connection_for(principal)
            number = pooled.gate.take(pooled.underlay.channels)
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
            channel = await pooled.underlay.channel(channel_number=number, publisher_confirms=False)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            pooled.release()
            raise _broker_error(exc) from exc
        # Every later frame of this channel, aiormq's own included, passes the connection's gate.
        channel.write_queue = _ChannelWrites(channel.write_queue, pooled.gate, number)  # type: ignore[attr-defined]
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


def _alive(connection: aio_pika.abc.AbstractConnection | None) -> bool:
    """aio-pika marks a connection closed only when close() is called; the transport knows sooner."""
    if connection is None or connection.is_closed:
        return False
    transport = getattr(connection, "transport", None)
    return transport is not None and not transport.connection.is_closed


def _where(url: str) -> str:
    """Host, port and vhost of an AMQP URL, for the log: never the credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{host}:{port}/{unquote(parts.path[1:]) if len(parts.path) > 1 else ''}"
