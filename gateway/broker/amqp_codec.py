"""The AMQP 0-9-1 frames every relayed message crosses, encoded and decoded without pamqp's generic codec.

A message through the gateway costs one ``basic.publish`` (method, content header, body frames) on the way
in and one ``basic.deliver`` (the same three) on the way out. pamqp encodes and decodes any frame from its
spec tables, argument by argument, building a command object and a properties object per frame: about
18 µs for a publish and 18 µs for a delivery of a small message on the machine of ``bench/RESULTS.md``,
half of the gateway's CPU per relayed message. These functions write and read just these frames, straight
from and into the gateway's own :class:`~gateway.broker.base.MessageProperties`, in a few microseconds.

Pure functions, no I/O. What they do not handle themselves they hand to pamqp's public codec: field
tables holding anything but strings (``pamqp.encode.field_table`` and ``pamqp.decode.field_table``),
and, on the reading side, any frame they cannot read (the caller then unmarshals it with pamqp, which
reports it as before). ``tests/unit/test_amqp_codec.py`` checks them byte for byte and value for value
against pamqp.
"""

from __future__ import annotations

import datetime
import struct
from typing import Any

from pamqp import decode as amqp_decode
from pamqp import encode as amqp_encode

from gateway.broker.base import MessageProperties

__all__ = [
    "Deliver",
    "HeaderTooLarge",
    "decode_content_header",
    "decode_deliver",
    "encode_properties",
    "encode_publish",
    "properties_from_pamqp",
]

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = b"\xce"

#: class 60 (basic), method 60 (deliver): the first four payload octets of a ``basic.deliver``
DELIVER_ID = b"\x00\x3c\x00\x3c"

_FRAME = struct.Struct(">BHI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
#: 10000-01-01T00:00:00Z: the first timestamp (seconds) the gateway does not publish
MAX_TIMESTAMP = 253_402_300_800
_HEADER_START = struct.Struct(">HHQH")  # class, weight, body size, property flags
_PUBLISH_START = b"\x00\x3c\x00\x28\x00\x00"  # class 60, method 40 (publish), ticket 0

# Basic.Properties flags, in property order (AMQP 0-9-1, 4.2.6.1).
_CONTENT_TYPE = 1 << 15
_CONTENT_ENCODING = 1 << 14
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_PRIORITY = 1 << 11
_CORRELATION_ID = 1 << 10
_REPLY_TO = 1 << 9
_EXPIRATION = 1 << 8
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
_TYPE = 1 << 5
_USER_ID = 1 << 4
_APP_ID = 1 << 3
_CLUSTER_ID = 1 << 2


class Deliver:
    """The arguments of a ``basic.deliver``."""

    __slots__ = ("consumer_tag", "delivery_tag", "exchange", "redelivered", "routing_key")

    def __init__(self, consumer_tag: str, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str):
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key


# --- encoding ---------------------------------------------------------------------------------------------


def _short(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"str required, received {type(value)}")
    data = value.encode()
    if len(data) > 255:
        raise ValueError("string exceeds maximum length of 255 bytes")
    return bytes((len(data),)) + data


def _octet(name: str, value: Any) -> bytes:
    if not isinstance(value, int):
        raise TypeError(f"{name}: int required, received {type(value)}")
    if not 0 <= value <= 255:
        raise ValueError(f"{name} must be 0-255, got {value}")
    return bytes((value,))


def _table(headers: dict[str, Any]) -> bytes:
    """A field table: string values by hand (as ``S`` long strings, keys sorted, as pamqp writes them),
    anything else by pamqp."""
    parts = []
    for key, value in sorted(headers.items()):
        if type(value) is not str or type(key) is not str:
            return amqp_encode.field_table(headers)
        name = key.encode()
        if len(name) > 128:  # pamqp shortens such keys (with a warning): leave that to it
            return amqp_encode.field_table(headers)
        data = value.encode()
        parts.append(bytes((len(name),)) + name + b"S" + _U32.pack(len(data)) + data)
    table = b"".join(parts)
    return _U32.pack(len(table)) + table


def encode_properties(props: MessageProperties) -> tuple[int, bytes]:
    """The property flags and property list of a content header (empty strings and an empty headers table
    are left out, as pamqp does). Raises :class:`ValueError` or :class:`TypeError` for a value AMQP
    cannot carry."""
    flags = 0
    out = []
    if props.content_type:
        flags |= _CONTENT_TYPE
        out.append(_short(props.content_type))
    if props.content_encoding:
        flags |= _CONTENT_ENCODING
        out.append(_short(props.content_encoding))
    if props.headers:
        flags |= _HEADERS
        out.append(_table(props.headers))
    if props.delivery_mode is not None:
        if props.delivery_mode not in (1, 2):
            raise ValueError(f"Invalid delivery_mode value: {props.delivery_mode}")
        flags |= _DELIVERY_MODE
        out.append(bytes((props.delivery_mode,)))
    if props.priority is not None:
        flags |= _PRIORITY
        out.append(_octet("priority", props.priority))
    if props.correlation_id:
        flags |= _CORRELATION_ID
        out.append(_short(props.correlation_id))
    if props.reply_to:
        flags |= _REPLY_TO
        out.append(_short(props.reply_to))
    if props.expiration:
        flags |= _EXPIRATION
        out.append(_short(props.expiration))
    if props.message_id:
        flags |= _MESSAGE_ID
        out.append(_short(props.message_id))
    if props.timestamp is not None:
        if not isinstance(props.timestamp, int) or not 0 <= props.timestamp < MAX_TIMESTAMP:
            # Beyond the year 9999 most AMQP clients (pamqp among them) cannot read the message back.
            raise ValueError(f"timestamp must be 0 to {MAX_TIMESTAMP - 1} seconds, got {props.timestamp!r}")
        flags |= _TIMESTAMP
        out.append(_U64.pack(props.timestamp))
    if props.type:
        flags |= _TYPE
        out.append(_short(props.type))
    if props.user_id:
        flags |= _USER_ID
        out.append(_short(props.user_id))
    if props.app_id:
        flags |= _APP_ID
        out.append(_short(props.app_id))
    return flags, b"".join(out)


class HeaderTooLarge(ValueError):
    """A content header larger than one frame may carry; ``args[0]`` is its payload size."""


def encode_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    props: MessageProperties,
    body: bytes,
    max_content: int,
    max_header: int,
) -> bytes:
    """``basic.publish`` (not mandatory, not immediate), its content header and body frames on ``channel``,
    the body cut into frames of at most ``max_content`` octets.

    Raises :class:`ValueError`/:class:`TypeError` for a value AMQP cannot carry and
    :class:`HeaderTooLarge` when the content header's payload exceeds ``max_header`` octets.
    """
    method = _PUBLISH_START + _short(exchange) + _short(routing_key) + b"\x00"
    flags, properties = encode_properties(props)
    header_size = 14 + len(properties)
    if header_size > max_header:
        raise HeaderTooLarge(header_size)
    size = len(body)
    frames = [
        _FRAME.pack(FRAME_METHOD, channel, len(method)),
        method,
        FRAME_END,
        _FRAME.pack(FRAME_HEADER, channel, header_size),
        _HEADER_START.pack(60, 0, size, flags),
        properties,
        FRAME_END,
    ]
    if size <= max_content:
        if size:
            frames += (_FRAME.pack(FRAME_BODY, channel, size), body, FRAME_END)
    else:
        for i in range(0, size, max_content):
            part = body[i : i + max_content]
            frames += (_FRAME.pack(FRAME_BODY, channel, len(part)), part, FRAME_END)
    return b"".join(frames)


# --- decoding ---------------------------------------------------------------------------------------------


def decode_deliver(payload: bytes) -> Deliver:
    """The ``basic.deliver`` of this method frame payload (class and method ids first). Raises on a frame it
    cannot read (:class:`ValueError`, :class:`IndexError`, ``struct.error``)."""
    pos = 4
    n = payload[pos]
    consumer_tag = payload[pos + 1 : pos + 1 + n].decode()
    pos += 1 + n
    (delivery_tag,) = _U64.unpack_from(payload, pos)
    redelivered = bool(payload[pos + 8] & 1)
    pos += 9
    n = payload[pos]
    exchange = payload[pos + 1 : pos + 1 + n].decode()
    pos += 1 + n
    n = payload[pos]
    routing_key = payload[pos + 1 : pos + 1 + n].decode()
    if pos + 1 + n != len(payload):
        raise ValueError("basic.deliver cut short")
    return Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)


def _read_short(data: bytes, pos: int) -> tuple[str, int]:
    n = data[pos]
    end = pos + 1 + n
    if end > len(data):
        raise ValueError("short string cut short")
    return data[pos + 1 : end].decode(), end


def _read_table(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """A field table of string values by hand; any other table by ``pamqp.decode.field_table``."""
    (length,) = _U32.unpack_from(data, pos)
    end = pos + 4 + length
    if end > len(data):
        raise ValueError("field table cut short")
    table: dict[str, Any] = {}
    i = pos + 4
    while i < end:
        n = data[i]
        key = data[i + 1 : i + 1 + n].decode()
        i += 1 + n
        if data[i] != 0x53:  # "S": a long string; anything else goes to pamqp
            _, table = amqp_decode.field_table(data[pos:end])
            return table, end
        (size,) = _U32.unpack_from(data, i + 1)
        raw = data[i + 5 : i + 5 + size]
        try:
            table[key] = raw.decode()
        except UnicodeDecodeError:  # as pamqp: bytes when not UTF-8
            table[key] = raw
        i += 5 + size
    if i != end:
        raise ValueError("field table overruns its length")
    return table, end


def properties_from_pamqp(props: Any) -> MessageProperties:
    """The gateway's properties from pamqp's ``Basic.Properties`` (a header pamqp read)."""
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


def _timestamp(value: int) -> int:
    if value > 0xFFFFFFFF:  # as pamqp reads it: past the year 2106 it is taken for milliseconds
        try:
            return int(datetime.datetime.fromtimestamp(value / 1000.0, tz=datetime.UTC).timestamp())
        except (ValueError, OverflowError, OSError):  # past the year 9999 even so: pamqp fails, the gateway reads on
            return value // 1000
    return value


def decode_content_header(data: bytes) -> tuple[int, MessageProperties]:
    """The body size and properties of this content header frame payload. Raises on a header it cannot
    read (the caller then has pamqp read it)."""
    class_id, _, body_size, flags = _HEADER_START.unpack_from(data, 0)
    if flags & 1 or class_id != 60:  # a second flags word: no such properties in AMQP 0-9-1
        raise ValueError("not a basic content header")
    pos = 14
    props = MessageProperties()
    if flags & _CONTENT_TYPE:
        props.content_type, pos = _read_short(data, pos)
    if flags & _CONTENT_ENCODING:
        props.content_encoding, pos = _read_short(data, pos)
    if flags & _HEADERS:
        props.headers, pos = _read_table(data, pos)
    if flags & _DELIVERY_MODE:
        props.delivery_mode = data[pos]
        pos += 1
    if flags & _PRIORITY:
        props.priority = data[pos]
        pos += 1
    if flags & _CORRELATION_ID:
        props.correlation_id, pos = _read_short(data, pos)
    if flags & _REPLY_TO:
        props.reply_to, pos = _read_short(data, pos)
    if flags & _EXPIRATION:
        props.expiration, pos = _read_short(data, pos)
    if flags & _MESSAGE_ID:
        props.message_id, pos = _read_short(data, pos)
    if flags & _TIMESTAMP:
        (stamp,) = _U64.unpack_from(data, pos)
        props.timestamp = _timestamp(stamp)
        pos += 8
    if flags & _TYPE:
        props.type, pos = _read_short(data, pos)
    if flags & _USER_ID:
        props.user_id, pos = _read_short(data, pos)
    if flags & _APP_ID:
        props.app_id, pos = _read_short(data, pos)
    if flags & _CLUSTER_ID:
        _, pos = _read_short(data, pos)
    if pos != len(data):
        raise ValueError("content header of the wrong length")
    return body_size, props
