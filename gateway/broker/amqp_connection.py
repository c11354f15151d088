"""A lean AMQP 0-9-1 client connection for the gateway's data path, on pamqp's public frame codec.

Why not aiormq: the gateway relays every message through this layer, and aiormq's reader (three awaits, a
lock and a BytesIO per frame, then a queue and a task per delivery) cost two thirds of the fan-out rate;
beating it took a process-wide replacement of aiormq's frame reader and writes into aiormq's channel
internals. This module owns the socket instead: an :class:`asyncio.Protocol` that parses every complete
frame of each read with ``pamqp.frame.unmarshal``, hands deliveries to their consumer's callback in the
same call, and writes with ``pamqp.frame.marshal`` straight to the transport. Nothing of another package
is replaced or reached into.

What the caller (:mod:`gateway.broker.amqp`) must know:

* :meth:`AmqpConnection.connect` returns an open connection or raises :class:`HandshakeRefused` (RabbitMQ
  closed the handshake: wrong credentials, vhost), :class:`ConnectionLost`/:class:`OSError` (network) or
  :class:`TimeoutError`.
* Channel numbers come from the connection's :class:`WriteGate`, which also keeps every frame RabbitMQ
  would answer with a *connection* error off the wire (see its docstring).
* A channel fails its waiters with :class:`ChannelClosedByBroker` (RabbitMQ's reply code and text), or
  with the connection's error (:class:`ConnectionClosedByBroker`, :class:`ConnectionLost`), and reports
  its end once through ``on_closed``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import platform
import ssl
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import pamqp.exceptions
import pamqp.frame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from gateway.broker.amqp_codec import (
    DELIVER_ID,
    Deliver,
    decode_content_header,
    decode_deliver,
    properties_from_pamqp,
)
from gateway.broker.base import MessageProperties

__all__ = [
    "AmqpConnection",
    "BasicConsume",
    "BasicPublish",
    "ChannelClosedByBroker",
    "ChannelGone",
    "ConnectionClosedByBroker",
    "ConnectionLost",
    "ConnectionParameters",
    "ExchangeDeclare",
    "HandshakeRefused",
    "QueueBind",
    "QueueDeclare",
    "QueueDelete",
    "QueueUnbind",
    "WireChannel",
    "WriteGate",
]

logger = logging.getLogger(__name__)

marshal = pamqp.frame.marshal


# --- names: RabbitMQ's rule, not the AMQP grammar ---------------------------------------------------------


class _AnyName:
    """pamqp checks queue and exchange names against the AMQP 0-9-1 grammar ([a-zA-Z0-9-_.:]); RabbitMQ
    accepts any UTF-8 name up to 255 bytes, and so does its STOMP plugin. These commands keep pamqp's other
    checks (ticket, its length limits) and check what RabbitMQ checks. No ``__slots__`` here: pamqp marshals
    the attributes its own class lists there."""

    _LIMITS: ClassVar[tuple[tuple[str, int], ...]] = (("queue", 256), ("exchange", 127))

    def validate(self) -> None:
        ticket = getattr(self, "ticket", None)
        if ticket is not None and ticket != 0:
            raise ValueError("ticket must be 0")
        for field, limit in self._LIMITS:
            value = getattr(self, field, None)
            if value is not None and len(value) > limit:
                raise ValueError(f"Max length exceeded for {field}")


class QueueDeclare(_AnyName, spec.Queue.Declare):
    """``queue.declare`` for any UTF-8 queue name."""


class QueueBind(_AnyName, spec.Queue.Bind):
    """``queue.bind`` for any UTF-8 queue and exchange name."""


class QueueUnbind(_AnyName, spec.Queue.Unbind):
    """``queue.unbind`` for any UTF-8 queue and exchange name."""


class QueueDelete(_AnyName, spec.Queue.Delete):
    """``queue.delete`` for any UTF-8 queue name."""


class ExchangeDeclare(_AnyName, spec.Exchange.Declare):
    """``exchange.declare`` for any UTF-8 exchange name."""


class BasicConsume(_AnyName, spec.Basic.Consume):
    """``basic.consume`` for any UTF-8 queue name."""


class BasicPublish(_AnyName, spec.Basic.Publish):
    """``basic.publish`` for any UTF-8 exchange name."""


# --- errors -----------------------------------------------------------------------------------------------


class ConnectionClosedByBroker(ConnectionError):
    """RabbitMQ sent ``connection.close``; ``args[0]`` is its reply text ("CHANNEL_ERROR - ...")."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(reply_text)
        self.reply_code = reply_code
        self.reply_text = reply_text


class ConnectionLost(ConnectionError):
    """The connection ended without a ``connection.close`` from RabbitMQ (network, node gone, no heartbeat),
    or was closed by the gateway."""


class HandshakeRefused(Exception):
    """RabbitMQ closed the connection during the handshake (403 wrong credentials, 530 vhost)."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"{reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


class ChannelClosedByBroker(Exception):
    """RabbitMQ closed the channel; ``args[0]`` is its reply text ("NOT_FOUND - no queue 'q' in vhost '/'")."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(reply_text)
        self.reply_code = reply_code
        self.reply_text = reply_text


class ChannelGone(Exception):
    """An operation on a channel that is already closed (its reason was reported when it closed)."""

    def __init__(self) -> None:
        super().__init__("channel closed")


# --- the write gate ---------------------------------------------------------------------------------------

# Channel close handshake, as (class id, method id) bytes of a method frame's payload.
_CHANNEL_CLOSE = b"\x00\x14\x00\x28"
_CHANNEL_CLOSE_OK = b"\x00\x14\x00\x29"
# Close handshake progress of one channel number (bits).
_SENT_CLOSE, _GOT_CLOSE, _SENT_CLOSE_OK, _GOT_CLOSE_OK = 1, 2, 4, 8


def _handshake_done(state: int) -> bool:
    return bool((state & _SENT_CLOSE and state & _GOT_CLOSE_OK) or (state & _GOT_CLOSE and state & _SENT_CLOSE_OK))


class WriteGate:
    """Keeps frames that RabbitMQ answers with a *connection* error off a shared connection.

    RabbitMQ closes the whole connection (504 CHANNEL_ERROR) for any frame on a channel number after its
    close handshake ("expected 'channel.open'") and for a ``channel.open`` before it ended ("second
    'channel.open' seen"), and that would end every session sharing the connection. So every frame a
    channel writes passes :meth:`admit` when it is written: once either side has sent ``channel.close`` only
    the ``close-ok`` passes (RabbitMQ ignores anything else on a closing channel anyway), and after the
    handshake nothing does. Channel numbers are handed out by :meth:`take`, round-robin, and reused only
    after both halves of the handshake were seen (the broker's half is reported by the connection's reader
    through :meth:`received`).
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


# --- connection parameters --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionParameters:
    """Where and as whom to connect, from an ``amqp://`` or ``amqps://`` URL.

    The URL's query may set ``heartbeat`` (seconds; it wins over the caller's default), ``name`` (shown in
    RabbitMQ's management UI) and, for amqps, ``cafile``, ``capath``, ``certfile``, ``keyfile`` and
    ``no_verify_ssl=1`` (the parameters aiormq and aio-pika take).
    """

    host: str
    port: int
    login: str
    password: str
    vhost: str
    heartbeat: int
    name: str | None
    tls: ssl.SSLContext | None

    @classmethod
    def from_url(cls, url: str, *, heartbeat: int, name: str | None = None) -> ConnectionParameters:
        parts = urlsplit(url)
        query: dict[str, str] = {}
        for key, value in parse_qsl(parts.query):
            query.setdefault(key, value)  # the first occurrence wins
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        tls = _tls_context(query) if parts.scheme == "amqps" else None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (5671 if tls is not None else 5672),
            login=unquote(parts.username) if parts.username else "guest",
            password=unquote(parts.password) if parts.password else "guest",
            vhost=unquote(path) if path else "/",
            heartbeat=int(query["heartbeat"]) if "heartbeat" in query else heartbeat,
            name=query.get("name", name),
            tls=tls,
        )


def _tls_context(query: Mapping[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=query.get("cafile"), capath=query.get("capath"))
    if "certfile" in query:
        context.load_cert_chain(query["certfile"], query.get("keyfile"))
    if query.get("no_verify_ssl", "0") != "0":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# --- the connection ---------------------------------------------------------------------------------------

_FRAME_METHOD = 1
_FRAME_HEADER = 2
_FRAME_BODY = 3
_FRAME_END = 0xCE
_HEARTBEAT_FRAME = marshal(Heartbeat(), 0)
#: Missed heartbeat intervals (plus one) before a silent connection counts as lost (aiormq's rule).
_HEARTBEAT_GRACE = 3

CloseCallback = Callable[[BaseException], None]


class AmqpConnection(asyncio.Protocol):
    """One AMQP connection: handshake, heartbeats, the frame reader and writer, its channels."""

    def __init__(self, parameters: ConnectionParameters) -> None:
        self.parameters = parameters
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._need = 8  # bytes the buffer must hold before the next frame can be complete
        self._started = False  # the broker's first frame arrived
        self._open = False
        #: why the connection ended (set once); None while it is up
        self.error: BaseException | None = None
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._close_callbacks: list[CloseCallback] = []
        self._writable: asyncio.Future[None] | None = None  # set while the transport's buffer is full
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._received = False
        self._last_received = self._loop.time()
        self.channels: dict[int, WireChannel] = {}
        self.frame_max = 0
        self.channel_max = 0
        self.heartbeat = parameters.heartbeat
        self.server_properties: dict[str, Any] = {}
        self.gate = WriteGate(0)

    # -- opening

    @classmethod
    async def connect(cls, parameters: ConnectionParameters, *, timeout: float) -> AmqpConnection:
        """TCP (or TLS) connect and the AMQP handshake, within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        protocol: AmqpConnection | None = None
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    lambda: cls(parameters),
                    parameters.host,
                    parameters.port,
                    ssl=parameters.tls,
                    server_hostname=parameters.host if parameters.tls is not None else None,
                )
                await asyncio.shield(protocol._handshake)
        except BaseException:
            if protocol is not None:
                protocol._end(ConnectionLost("the handshake did not complete"), abort=True)
            raise
        return protocol

    @property
    def is_open(self) -> bool:
        return self._open and self.error is None

    def add_close_callback(self, callback: CloseCallback) -> None:
        """``callback(reason)`` once the connection has ended (at once if it already has)."""
        if self.error is not None:
            callback(self.error)
        else:
            self._close_callbacks.append(callback)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        self._transport.write(ProtocolHeader().marshal())

    def _client_properties(self) -> dict[str, Any]:
        properties: dict[str, Any] = {
            "product": "stomp-ws-gateway",
            "platform": f"Python {platform.python_version()}",
            "capabilities": {
                "authentication_failure_close": True,  # a 403 connection.close rather than a dropped socket
                "basic.nack": True,
                "connection.blocked": True,
                "consumer_cancel_notify": True,
                "publisher_confirms": True,
            },
        }
        if self.parameters.name:
            properties["connection_name"] = self.parameters.name
        return properties

    def _handshake_frame(self, frame: Any) -> None:
        kind = type(frame)
        p = self.parameters
        if kind is spec.Connection.Start:
            self.server_properties = dict(frame.server_properties or {})
            if "PLAIN" not in str(frame.mechanisms).split():
                self._end(ConnectionLost(f"RabbitMQ offers no PLAIN login (only {frame.mechanisms})"))
                return
            self.write(
                marshal(
                    spec.Connection.StartOk(
                        client_properties=self._client_properties(),
                        mechanism="PLAIN",
                        response=f"\0{p.login}\0{p.password}",
                    ),
                    0,
                )
            )
        elif kind is spec.Connection.Tune:
            self.channel_max = frame.channel_max or 0
            self.frame_max = frame.frame_max or 0
            self.gate = WriteGate(self.channel_max)
            tune_ok = spec.Connection.TuneOk(
                channel_max=self.channel_max, frame_max=self.frame_max, heartbeat=self.heartbeat
            )
            self.write(marshal(tune_ok, 0) + marshal(spec.Connection.Open(virtual_host=p.vhost), 0))
        elif kind is spec.Connection.OpenOk:
            self._open = True
            if self.heartbeat > 0:
                self._schedule_heartbeat()
            self._handshake.set_result(None)
        elif kind is spec.Connection.Close:
            self.write(marshal(spec.Connection.CloseOk(), 0))
            self._end(HandshakeRefused(frame.reply_code or 0, frame.reply_text or ""))
        else:
            self._end(ConnectionLost(f"unexpected {frame.name} during the AMQP handshake"))

    # -- reading

    def data_received(self, data: bytes) -> None:
        self._received = True
        # Frames are read from bytes: ``data`` itself when no frame was left unfinished (the common case),
        # else the unfinished part joined with it once it can be complete. A frame's payload is then one
        # slice (one copy), and what is left unfinished goes back into the buffer.
        buffer = self._buffer
        if buffer or len(data) < self._need:
            buffer += data
            if len(buffer) < self._need:
                return  # a frame still arriving: parse it once, when complete
            data = bytes(buffer)
            buffer.clear()
        if not self._started:
            if data[:4] == b"AMQP":  # the broker's protocol header: it speaks another version
                self._end(ConnectionLost("RabbitMQ does not accept AMQP 0-9-1 (it answered with its protocol header)"))
                return
            self._started = True
        end_of_data = len(data)
        pos = 0
        need = 8
        while end_of_data - pos >= 8:  # type, channel, size (7 bytes) ... frame-end (1 byte)
            end = pos + 8 + int.from_bytes(data[pos + 3 : pos + 7], "big")
            if end > end_of_data:
                need = end - pos
                break
            kind = data[pos]
            if data[end - 1] == _FRAME_END and (
                kind in (_FRAME_BODY, _FRAME_HEADER)
                or (kind == _FRAME_METHOD and data[pos + 7 : pos + 11] == DELIVER_ID)
            ):
                # A delivery's method, content header and body parts: read here, without pamqp (a body part is
                # the payload itself; amqp_codec for the others), unless they are not what they seem; then pamqp
                # reads (and reports) them below.
                ch = self.channels.get(int.from_bytes(data[pos + 1 : pos + 3], "big"))
                payload = data[pos + 7 : end - 1]
                try:
                    if kind == _FRAME_METHOD and ch is not None:
                        whole = _whole_delivery(data, pos, end, end_of_data)
                        if whole is not None:
                            # The common delivery: its method, content header and one body frame all read,
                            # handed to the consumer in one call.
                            end, body_size, properties, body = whole
                            ch.delivery_received(decode_deliver(payload), properties, body)
                            pos = end
                            continue
                    if kind == _FRAME_BODY:
                        if ch is not None:
                            ch.body_received(payload)
                    elif kind == _FRAME_HEADER:
                        body_size, properties = decode_content_header(payload)
                        if ch is not None:
                            ch.header_received(body_size, properties)
                    else:
                        deliver = decode_deliver(payload)
                        if ch is not None:
                            ch.deliver_received(deliver)
                except (ValueError, IndexError, struct.error):
                    pass
                else:
                    pos = end
                    continue
            try:
                _, channel, frame = pamqp.frame.unmarshal(data[pos:end])
            except pamqp.exceptions.PAMQPException as exc:
                self._end(ConnectionLost(f"RabbitMQ sent a frame pamqp cannot read: {exc}"))
                return
            pos = end
            if channel:
                method = type(frame)
                if method is spec.Channel.Close or method is spec.Channel.CloseOk:
                    self.gate.received(channel, method is spec.Channel.Close)
                ch = self.channels.get(channel)
                if ch is not None:
                    ch.frame_received(frame)
            elif self._open:
                self._connection_frame(frame)
            else:
                self._handshake_frame(frame)
            if self.error is not None:
                return
        if pos < end_of_data:
            buffer += memoryview(data)[pos:]
        self._need = need

    def _connection_frame(self, frame: Any) -> None:
        kind = type(frame)
        if kind is Heartbeat:
            return
        if kind is spec.Connection.Close:
            self.write(marshal(spec.Connection.CloseOk(), 0))
            self._end(ConnectionClosedByBroker(frame.reply_code or 0, frame.reply_text or ""))
        elif kind is spec.Connection.CloseOk:
            self._end(ConnectionLost("the connection was closed by the gateway"))
        elif kind is spec.Connection.Blocked:
            logger.warning("RabbitMQ blocked an AMQP connection's publishers: %s", frame.reason)
        elif kind is spec.Connection.Unblocked:
            logger.warning("RabbitMQ unblocked an AMQP connection's publishers")
        else:
            logger.error("unexpected %s on AMQP channel 0", frame.name)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self.error is None:
            reason = f": {exc}" if exc else ""
            self._end(ConnectionLost(f"the network connection to RabbitMQ closed{reason}"))

    # -- writing

    def write(self, payload: bytes) -> None:
        """Put marshalled frames on the wire (they are buffered by the transport while it is full)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(payload)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    @property
    def blocked(self) -> bool:
        """:meth:`writable` would wait."""
        return self._writable is not None and self.error is None

    async def writable(self) -> None:
        """Wait while the transport's buffer is full (RabbitMQ is not reading: flow control, alarms)."""
        while self._writable is not None and self.error is None:
            await asyncio.shield(self._writable)

    # -- heartbeats

    def _schedule_heartbeat(self) -> None:
        self._heartbeat_timer = self._loop.call_later(max(1, self.heartbeat // 2), self._heartbeat)

    def _heartbeat(self) -> None:
        now = self._loop.time()
        if self._received:
            self._received = False
            self._last_received = now
        grace = (self.heartbeat + 1) * _HEARTBEAT_GRACE
        if now - self._last_received > grace:
            self._end(ConnectionLost(f"no frame from RabbitMQ in {grace} s"), abort=True)
            return
        self.write(_HEARTBEAT_FRAME)
        self._schedule_heartbeat()

    # -- channels

    async def open_channel(self, number: int) -> WireChannel:
        """Open channel ``number`` (from :attr:`gate`); raises the connection's error if it has ended."""
        if self.error is not None:
            raise self.error
        channel = WireChannel(self, number)
        self.channels[number] = channel
        try:
            await channel.rpc(spec.Channel.Open())
        except BaseException:
            channel.abandon()
            raise
        return channel

    # -- closing

    async def close(self) -> None:
        """``connection.close`` and wait for RabbitMQ's close-ok (the caller bounds the wait)."""
        if self.error is not None:
            return
        if self._open:
            self.write(marshal(spec.Connection.Close(reply_code=200, reply_text="normally closed", class_id=0, method_id=0), 0))
            try:
                await asyncio.shield(self._closed)
            finally:
                self._end(ConnectionLost("the connection was closed by the gateway"))
        else:
            self._end(ConnectionLost("the connection was closed by the gateway"))

    def _end(self, error: BaseException, *, abort: bool = False) -> None:
        """The connection is over: fail the handshake, end every channel, close the socket, tell listeners."""
        if self.error is not None:
            return
        self.error = error
        self._open = False
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        if not self._handshake.done():
            self._handshake.set_exception(error)
            self._handshake.exception()  # retrieved here: connect() re-raises it
        for channel in list(self.channels.values()):
            channel.ended(error)
        self.channels.clear()
        self.resume_writing()
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()  # after the buffered frames (a close-ok) went out
        if not self._closed.done():
            self._closed.set_result(None)
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback(error)
            except Exception:
                logger.exception("AMQP connection close callback failed")


# --- channels ---------------------------------------------------------------------------------------------

DeliveryCallback = Callable[[Deliver, MessageProperties, bytes], None]


def _whole_delivery(
    data: bytes, pos: int, end: int, end_of_data: int
) -> tuple[int, int, MessageProperties, bytes] | None:
    """For the ``basic.deliver`` method frame at ``data[pos:end]``: when its content header and its whole body
    (no body, or one body frame) follow complete on the same channel, the end of the last of them, the body
    size, the properties and the body; else None (the frames are then read one by one)."""
    channel = data[pos + 1 : pos + 3]
    if end_of_data - end < 8 or data[end] != _FRAME_HEADER or data[end + 1 : end + 3] != channel:
        return None
    header_end = end + 8 + int.from_bytes(data[end + 3 : end + 7], "big")
    if header_end > end_of_data or data[header_end - 1] != _FRAME_END:
        return None
    body_size, properties = decode_content_header(data[end + 7 : header_end - 1])
    if body_size == 0:
        return header_end, 0, properties, b""
    if (
        end_of_data - header_end < 8
        or data[header_end] != _FRAME_BODY
        or data[header_end + 1 : header_end + 3] != channel
        or int.from_bytes(data[header_end + 3 : header_end + 7], "big") != body_size
    ):
        return None
    body_end = header_end + 8 + body_size
    if body_end > end_of_data or data[body_end - 1] != _FRAME_END:
        return None
    return body_end, body_size, properties, data[header_end + 7 : body_end - 1]


class _Content:
    """A delivery (or a returned message) whose content frames are still arriving."""

    __slots__ = ("body_size", "callback", "deliver", "parts", "properties", "size")

    def __init__(self, deliver: Deliver | None, callback: DeliveryCallback | None) -> None:
        self.deliver = deliver
        self.callback = callback
        self.properties: MessageProperties | None = None  # the content header's, once it arrived
        self.body_size = 0
        self.parts: list[bytes] = []
        self.size = 0


class WireChannel:
    """One AMQP channel: synchronous methods one at a time, publishes batched per event-loop pass, publisher
    confirms, and deliveries assembled and handed to their consumer's callback as they are read.

    Every frame it writes passes the connection's :class:`WriteGate`. It ends once, by :meth:`close`, by the
    broker's ``channel.close`` or with its connection, and then calls :attr:`on_closed` with the reason
    (``None`` when the gateway closed it).
    """

    def __init__(self, connection: AmqpConnection, number: int) -> None:
        self.connection = connection
        self.number = number
        #: the largest body part one frame carries (frame_max less 8 octets of framing)
        self.max_content = (connection.frame_max or 2**32) - 8
        self.on_closed: Callable[[BaseException | None], None] | None = None
        #: called with the tag of a consumer the broker cancelled (``basic.cancel`` from RabbitMQ)
        self.on_cancelled: Callable[[str], None] | None = None
        self.error: BaseException | None = None  # why it ended; set with ``closed``
        self.closed = False
        self._closing: asyncio.Future[None] | None = None  # our channel.close awaits the close-ok
        self._lock = asyncio.Lock()
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._consumers: dict[str, DeliveryCallback] = {}
        self._content: _Content | None = None
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self.confirming = False
        self._delivery_tag = 0
        self._confirms: collections.OrderedDict[int, asyncio.Future[bool]] = collections.OrderedDict()

    # -- writing

    def _write(self, payload: bytes) -> None:
        if self.connection.gate.admit(self.number, payload):
            self.connection.write(payload)

    def send_soon(self, payload: bytes) -> None:
        """Write ``payload`` (marshalled frames) with the others of this event-loop pass, in call order."""
        self._pending.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.connection._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write this pass's frames now, in one write."""
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self.closed:
            self._write(pending[0] if len(pending) == 1 else b"".join(pending))

    def publish(self, payload: bytes) -> asyncio.Future[bool] | None:
        """Send a marshalled ``basic.publish`` with its content. With confirms on, return a future of the
        broker's answer (True: ack, False: nack); it fails with the channel's error if the channel ends."""
        self.send_soon(payload)
        if not self.confirming:
            return None
        self._delivery_tag += 1
        confirmation: asyncio.Future[bool] = self.connection._loop.create_future()
        self._confirms[self._delivery_tag] = confirmation
        return confirmation

    async def rpc(self, method: Any) -> Any:
        """Send a synchronous method and return the broker's reply; raises the channel's error if it ends
        first (RabbitMQ's ``channel.close`` for a refused method)."""
        payload = marshal(method, self.number)  # a value pamqp cannot encode fails here, before the wire
        if self.closed:
            raise ChannelGone()
        async with self._lock:
            if self.closed:
                raise ChannelGone()
            self.flush()  # publishes and acks of this pass go first, in call order
            waiter: asyncio.Future[Any] = self.connection._loop.create_future()
            self._waiters.append(waiter)
            self._write(payload)
            return await waiter

    async def select_confirms(self) -> None:
        """``confirm.select``: later publishes get a confirm future (delivery tags count from here)."""
        await self.rpc(spec.Confirm.Select())
        self.confirming = True
        self._delivery_tag = 0

    # -- consumers

    def add_consumer(self, tag: str, callback: DeliveryCallback) -> None:
        """Deliveries for ``tag`` go to ``callback`` from now on (register before ``basic.consume``)."""
        self._consumers[tag] = callback

    def remove_consumer(self, tag: str) -> None:
        self._consumers.pop(tag, None)

    # -- reading (called by the connection for every frame of this channel)

    def frame_received(self, frame: Any) -> None:
        """A frame read by pamqp (the connection reads deliveries, their headers and bodies itself)."""
        kind = type(frame)
        if kind is ContentHeader:
            self.header_received(frame.body_size or 0, properties_from_pamqp(frame.properties))
        elif kind is ContentBody:
            self.body_received(frame.value)
        elif kind is spec.Basic.Deliver:  # one the connection's own reader could not read
            deliver = Deliver(
                frame.consumer_tag or "",
                frame.delivery_tag or 0,
                bool(frame.redelivered),
                frame.exchange or "",
                frame.routing_key or "",
            )
            self.deliver_received(deliver)
        else:
            if self._content is not None:  # content cut short (a protocol violation): forget it
                self._content = None
            self._method_received(frame)

    def delivery_received(self, deliver: Deliver, properties: MessageProperties, body: bytes) -> None:
        """A whole delivery (method, content header and body read at once)."""
        self._content = None
        callback = self._consumers.get(deliver.consumer_tag)
        if callback is not None and not self.closed and self._closing is None:
            try:
                callback(deliver, properties, body)
            except Exception:  # one consumer's failure must not stop the connection's reader
                logger.exception("delivery callback failed")

    def deliver_received(self, deliver: Deliver) -> None:
        """A ``basic.deliver``: its content frames follow."""
        self._content = _Content(deliver, self._consumers.get(deliver.consumer_tag))

    def header_received(self, body_size: int, properties: MessageProperties) -> None:
        content = self._content
        if content is None:
            logger.error("a content header frame without a method on AMQP channel %d", self.number)
            return
        content.properties = properties
        content.body_size = body_size
        self._content_progress(content)

    def body_received(self, part: bytes) -> None:
        """A content body frame's payload (the connection reads these without pamqp)."""
        content = self._content
        if content is None:
            logger.error("a content body frame without a method on AMQP channel %d", self.number)
            return
        content.parts.append(part)
        content.size += len(part)
        self._content_progress(content)

    def _content_progress(self, content: _Content) -> None:
        if content.properties is None or content.size < content.body_size:
            return
        self._content = None
        if content.callback is not None and content.deliver is not None and not self.closed and self._closing is None:
            parts = content.parts
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            try:
                content.callback(content.deliver, content.properties, body)
            except Exception:  # one consumer's failure must not stop the connection's reader
                logger.exception("delivery callback failed")

    def _method_received(self, frame: Any) -> None:
        kind = type(frame)
        if kind is spec.Basic.Ack or kind is spec.Basic.Nack:
            self._confirmed(frame.delivery_tag or 0, bool(frame.multiple), kind is spec.Basic.Ack)
        elif kind is spec.Channel.Close:
            # Answer, then end: after its close RabbitMQ takes nothing but the close-ok on this channel.
            self._pending.clear()
            self._write(marshal(spec.Channel.CloseOk(), self.number))
            self.ended(ChannelClosedByBroker(frame.reply_code or 0, frame.reply_text or ""))
        elif kind is spec.Channel.CloseOk:
            self.ended(None)
        elif kind is spec.Basic.Cancel:
            self._cancelled_by_broker(frame)
        elif kind is spec.Basic.Return:  # not asked for (no mandatory publishes): skip its content
            self._content = _Content(None, None)
        elif self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # its caller may have given up waiting
                waiter.set_result(frame)
        else:
            logger.error("unexpected %s on AMQP channel %d", frame.name, self.number)

    def _confirmed(self, tag: int, multiple: bool, ack: bool) -> None:
        confirms = self._confirms
        if multiple:
            while confirms:
                first = next(iter(confirms))
                if first > tag:
                    break
                future = confirms.pop(first)
                if not future.done():
                    future.set_result(ack)
        else:
            single = confirms.get(tag)
            if single is not None:
                del confirms[tag]
                if not single.done():
                    single.set_result(ack)

    def _cancelled_by_broker(self, frame: spec.Basic.Cancel) -> None:
        tag = frame.consumer_tag or ""
        was_consuming = self._consumers.pop(tag, None) is not None
        capabilities = self.connection.server_properties.get("capabilities") or {}
        if was_consuming and capabilities.get("accept_consumer_cancel_ok"):
            # RabbitMQ 4.3.7 and later keep the tag until the client answers; older ones close the channel
            # on an unexpected cancel-ok, so only the capability decides.
            self.send_soon(marshal(spec.Basic.CancelOk(consumer_tag=tag), self.number))
        logger.warning("RabbitMQ cancelled consumer %r on channel %d (its queue was deleted?)", tag, self.number)
        if was_consuming and self.on_cancelled is not None:
            try:
                self.on_cancelled(tag)
            except Exception:
                logger.exception("AMQP consumer cancel callback failed")

    # -- closing

    async def close(self) -> None:
        """``channel.close`` after this pass's frames, and wait for the close-ok (the caller bounds the
        wait; if it gives up, the channel counts as closed here and its number stays unused until the
        broker's close-ok arrives)."""
        if self.closed:
            return
        self.flush()
        if self._closing is None:
            self._closing = self.connection._loop.create_future()
            self._write(marshal(spec.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), self.number))
        try:
            await asyncio.shield(self._closing)
        finally:
            self.ended(None)

    def abandon(self) -> None:
        """Forget a channel whose ``channel.open`` failed or was given up."""
        self.ended(ChannelGone())

    def ended(self, error: BaseException | None) -> None:
        """The channel is over: fail whoever waits, forget it on the connection, report the reason once."""
        if self.closed:
            return
        self.closed = True
        self.error = error
        self._pending.clear()
        self._consumers.clear()
        self._content = None
        if self.connection.channels.get(self.number) is self:
            del self.connection.channels[self.number]
        failure = error if error is not None else ChannelGone()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(failure)
        confirms, self._confirms = self._confirms, collections.OrderedDict()
        for future in confirms.values():
            if not future.done():
                future.set_exception(failure)
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        callback, self.on_closed = self.on_closed, None
        if callback is not None:
            try:
                callback(error)
            except Exception:
                logger.exception("AMQP channel close callback failed")
