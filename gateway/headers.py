"""STOMP headers ↔ AMQP 0-9-1 basic properties, both ways (``rabbitmq-stomp.md`` c.1 and c.3).

:func:`properties_from_send` turns a SEND frame's headers into the :class:`MessageProperties` to publish;
:func:`message_headers` turns a delivery's properties into the property and custom-header part of a MESSAGE
(the caller puts ``subscription``, ``destination``, ``message-id``, ``redelivered`` and ``ack`` first).
Pure: no I/O.

Where this differs from RabbitMQ (better, and documented where it happens):

* SEND: the gateway's control headers ``destination``, ``receipt``, ``transaction`` and ``content-length``
  do not leak into the AMQP headers table (RabbitMQ leaks all but ``destination``). A non-integer
  ``priority`` or ``timestamp`` gives an "Invalid header" ERROR instead of RabbitMQ's "Processing error".
* MESSAGE: every AMQP header value reaches the client, not only strings and integers (RabbitMQ silently
  drops booleans, floats, timestamps, tables, arrays and bytes): see :func:`header_text`.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from gateway.broker.base import Delivery, MessageProperties
from gateway.destinations import format_destination
from gateway.stomp.frames import ProtocolError

__all__ = [
    "DELIVERY_HEADERS",
    "NOT_FORWARDED_ON_SEND",
    "delivery_headers",
    "header_text",
    "message_headers",
    "properties_from_send",
]

#: SEND headers that steer the gateway and are not copied into the AMQP headers table (RabbitMQ copies
#: all of them except ``destination``).
NOT_FORWARDED_ON_SEND = frozenset({"destination", "receipt", "transaction", "content-length"})

#: MESSAGE headers the delivery part owns; a custom AMQP header with one of these names is not emitted
#: (``content-length`` in particular would corrupt the frame).
DELIVERY_HEADERS = frozenset(
    {"subscription", "message-id", "destination", "redelivered", "ack", "content-length"}
)

# SEND header → MessageProperties attribute, for the plain string properties.
_STRING_PROPERTIES = {
    "content-type": "content_type",
    "content-encoding": "content_encoding",
    "correlation-id": "correlation_id",
    "expiration": "expiration",
    "amqp-message-id": "message_id",
    "type": "type",
    "user-id": "user_id",
    "app-id": "app_id",
}
# Headers that become properties (or are consumed here) and so never go into the headers table.
_PROPERTY_HEADERS = frozenset(_STRING_PROPERTIES) | {"persistent", "priority", "timestamp", "reply-to"}
_NOT_CUSTOM_ON_SEND = _PROPERTY_HEADERS | NOT_FORWARDED_ON_SEND

# Erlang's list_to_integer after stripping: an optional sign and ASCII digits.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_INTEGER_RANGES = {"priority": (0, 255), "timestamp": (0, 2**64 - 1)}

#: ``reply_to`` values starting with one of these are shown as they are; others get ``/reply-queue/``
#: in front (RabbitMQ ``headers_post_process`` with ``rabbit_routing_util:dest_prefixes()``).
_REPLY_TO_PREFIXES = ("/exchange", "/topic", "/queue", "/amq/queue", "/reply-queue/")

#: Deeper nesting in a header table or array is cut off (``null``) rather than blowing the stack.
MAX_NESTING = 64


# -- SEND → AMQP ---------------------------------------------------------------------------------------------


def _integer(name: str, value: str) -> int:
    low, high = _INTEGER_RANGES[name]
    text = value.strip()
    number = int(text) if _INTEGER.fullmatch(text) else None
    if number is None or not low <= number <= high:
        raise ProtocolError(
            "Invalid header", f"'{name}' must be an integer from {low} to {high}, got '{value}'\n"
        )
    return number


def properties_from_send(
    frame_headers: Sequence[tuple[str, str]], *, reply_to: str | None = None
) -> MessageProperties:
    """The AMQP properties for a SEND with these headers (in frame order; the first occurrence wins).

    ``content-type``, ``content-encoding``, ``correlation-id``, ``expiration``, ``type``, ``user-id`` and
    ``app-id`` map to the properties of the same name, ``amqp-message-id`` to ``message_id``;
    ``persistent:true`` (or ``True``) sets ``delivery_mode=2``; ``priority`` (0-255) and ``timestamp``
    (seconds) must be integers. ``reply-to`` is copied verbatim unless ``reply_to`` is given: the session
    passes the generated queue name there when the header named a ``/temp-queue/``. Every other header goes
    into the headers table as a string, except ``destination``, ``receipt``, ``transaction`` and
    ``content-length``, which are the gateway's own business.

    Raises :class:`ProtocolError` "Invalid header" for a ``message-id`` header (RabbitMQ's wording), for
    a malformed ``priority`` or ``timestamp``, for a property longer than an AMQP short string and for a
    custom header name longer than an AMQP field name (128 bytes).
    """
    props = MessageProperties()
    seen: set[str] = set()
    custom = props.headers
    for name, value in frame_headers:
        if name in seen:
            continue
        seen.add(name)
        if name not in _NOT_CUSTOM_ON_SEND:
            if name == "message-id":
                raise ProtocolError("Invalid header", "'message-id' is not allowed on 'SEND'.\n")
            if len(name) > MAX_FIELD_NAME // 4 and len(name.encode()) > MAX_FIELD_NAME:
                raise ProtocolError(
                    "Invalid header",
                    f"Header names are limited to {MAX_FIELD_NAME} bytes of UTF-8 in AMQP; "
                    f"'{name[:32]}...' is longer\n",
                )
            custom[name] = value
            continue
        attribute = _STRING_PROPERTIES.get(name)
        if attribute is not None:
            setattr(props, attribute, _short_string(name, value))
        elif name == "persistent":
            if value == "true" or value == "True":
                props.delivery_mode = 2
        elif name == "priority":
            props.priority = _integer(name, value)
        elif name == "timestamp":
            props.timestamp = _integer(name, value)
        elif name == "reply-to":
            props.reply_to = _short_string(name, value)
    if reply_to is not None:
        props.reply_to = reply_to
    return props


# -- AMQP → MESSAGE ------------------------------------------------------------------------------------------


_EPOCH = datetime.datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=datetime.UTC)
_SECOND = datetime.timedelta(seconds=1)


#: AMQP carries these properties as short strings: at most 255 bytes of UTF-8.
MAX_SHORT_STRING = 255
#: AMQP field-table names (the headers table) are at most 128 bytes; pamqp would cut a longer one silently.
MAX_FIELD_NAME = 128


def _short_string(name: str, value: str) -> str:
    if len(value) > MAX_SHORT_STRING // 4 and len(value.encode()) > MAX_SHORT_STRING:
        raise ProtocolError(
            "Invalid header", f"'{name}' is longer than AMQP allows ({MAX_SHORT_STRING} bytes of UTF-8)\n"
        )
    return value


def _seconds(moment: datetime.datetime) -> int:
    # Naive datetimes are UTC (the AMQP timestamp has no zone); aware ones are converted. Timedelta
    # arithmetic cannot overflow where utctimetuple() would (year 1 with a positive offset).
    epoch = _EPOCH if moment.utcoffset() is None else _EPOCH_UTC
    return (moment - epoch) // _SECOND


def _float_text(number: float) -> str:
    if math.isfinite(number):
        return repr(number)
    return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")


def _bytes_text(data: bytes | bytearray | memoryview) -> str:
    raw = bytes(data)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii")


def _json_value(value: object, depth: int) -> Any:
    """A JSON-ready copy of ``value`` with the scalar rules of :func:`header_text`."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _float_text(value)
    if isinstance(value, datetime.datetime):
        return _seconds(value)
    if depth >= MAX_NESTING:
        return None
    if isinstance(value, dict):
        return {str(key): _json_value(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item, depth + 1) for item in value]
    return header_text(value)


def header_text(value: object) -> str:
    """One AMQP header value as STOMP header text (never raises).

    str as is; bool → ``true``/``false``; int and Decimal → decimal text; float → shortest round-trip text
    (``NaN``, ``Infinity``, ``-Infinity`` when not finite); datetime → whole seconds since the epoch (naive
    means UTC); bytes → the text if it is valid UTF-8, else its base64 (the two cannot be told apart from
    the header alone); dict and list (e.g. ``x-death``) → compact JSON using the same rules for the values
    inside (bytes and Decimal become JSON strings, timestamps numbers, non-finite floats the strings above,
    keys strings) and nesting deeper than :data:`MAX_NESTING` cut to ``null``; None (AMQP void) → ``""``.
    Anything else → ``str(value)``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime.datetime):
        return str(_seconds(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return _bytes_text(value)
    if isinstance(value, dict | list | tuple):
        try:
            return json.dumps(_json_value(value, 0), separators=(",", ":"), ensure_ascii=False)
        except (ValueError, RecursionError):  # pragma: no cover - _json_value bounds the depth
            return ""
    if value is None:
        return ""
    try:
        return str(value)
    except Exception:  # pragma: no cover - a broken __str__ must not kill a delivery
        return ""


def message_headers(props: MessageProperties) -> list[tuple[str, str]]:
    """The property and custom-header part of a MESSAGE for a delivery with ``props`` (c.3).

    First the properties that are set, in RabbitMQ's order: ``content-type``, ``content-encoding``,
    ``persistent`` (``true`` for ``delivery_mode=2``, nothing otherwise), ``priority``, ``correlation-id``,
    ``reply-to`` (with ``/reply-queue/`` in front unless it starts with ``/exchange``, ``/topic``,
    ``/queue``, ``/amq/queue`` or ``/reply-queue/``), ``expiration``, ``amqp-message-id``, ``timestamp``,
    ``type``, ``user-id``, ``app-id``. Then one header per AMQP header entry, its value made text by
    :func:`header_text` (RabbitMQ drops all but strings and integers). An entry is skipped when its name is
    empty, is one of :data:`DELIVERY_HEADERS`, or was already emitted as a property, so no name appears
    twice. Called once per broker delivery, however many sessions receive it. Never raises.
    """
    out: list[tuple[str, str]] = []
    append = out.append
    if props.content_type is not None:
        append(("content-type", props.content_type))
    if props.content_encoding is not None:
        append(("content-encoding", props.content_encoding))
    if props.delivery_mode == 2:
        append(("persistent", "true"))
    if props.priority is not None:
        append(("priority", header_text(props.priority)))
    if props.correlation_id is not None:
        append(("correlation-id", props.correlation_id))
    reply_to = props.reply_to
    if reply_to is not None:
        if not reply_to.startswith(_REPLY_TO_PREFIXES):
            reply_to = "/reply-queue/" + reply_to
        append(("reply-to", reply_to))
    if props.expiration is not None:
        append(("expiration", header_text(props.expiration)))
    if props.message_id is not None:
        append(("amqp-message-id", props.message_id))
    if props.timestamp is not None:
        append(("timestamp", header_text(props.timestamp)))
    if props.type is not None:
        append(("type", props.type))
    if props.user_id is not None:
        append(("user-id", props.user_id))
    if props.app_id is not None:
        append(("app-id", props.app_id))
    table = props.headers
    if table:
        emitted = {name for name, _ in out}
        for name, value in table.items():
            if type(name) is not str:
                name = str(name)
            if not name or name in DELIVERY_HEADERS or name in emitted:
                continue
            append((name, value if type(value) is str else header_text(value)))
    return out


def delivery_headers(delivery: Delivery, message_id: str, topic_exchange: str) -> list[tuple[str, str]]:
    """Every header of the MESSAGE for ``delivery`` but ``subscription`` and ``ack`` (which are per session):
    ``destination``, ``message-id``, ``redelivered``, then :func:`message_headers`."""
    headers = [
        ("destination", format_destination(delivery.exchange, delivery.routing_key, topic_exchange)),
        ("message-id", message_id),
        ("redelivered", "true" if delivery.redelivered else "false"),
    ]
    headers.extend(message_headers(delivery.properties))
    return headers
