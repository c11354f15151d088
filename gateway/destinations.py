"""STOMP destinations and their AMQP 0-9-1 mapping, exactly as RabbitMQ's STOMP plugin does it.

The data path is: the ``destination`` header → :func:`parse_destination` → a :class:`Destination` value →
:func:`routing_pair` (where a SEND publishes), :func:`send_declaration` (the queue a SEND declares first) or
:func:`subscription_plan` (what a SUBSCRIBE declares, binds and consumes). The way back, from a delivery's
exchange and routing key to a MESSAGE ``destination``, is :func:`format_destination`.

Everything here is pure: no I/O, no broker. Invalid input raises :class:`~gateway.stomp.frames.ProtocolError`
carrying RabbitMQ's own ERROR ``message`` and body, so clients and test suites written against RabbitMQ see
the texts they expect. Reference: ``rabbitmq-stomp.md`` sections (b), (c.1), (c.2) and (g); the RabbitMQ
modules are ``rabbit_routing_parser``/``rabbit_routing_util`` (parsing), ``rabbit_stomp_util`` (defaults,
arguments, names, formatting) and ``rabbit_stomp_processor``.

Where this module deliberately differs from RabbitMQ (each is marked "Differs from RabbitMQ" below):

* ``/reply-queue/REST`` keeps ``REST`` verbatim; RabbitMQ also turns ``%2F`` into ``/`` there, which breaks
  the round trip of a ``reply-to`` that contains ``%2F``.
* A durable ``/exchange`` subscription is declared like a durable ``/topic`` one (``exclusive=False``);
  RabbitMQ keeps its ``exclusive=True`` default, so the "durable" queue dies with the connection.
* The ``id`` header is required only where the queue name is derived from it (durable ``/topic`` and
  ``/exchange``); RabbitMQ also rejects ``durable:true`` without ``id`` on ``/queue`` subscriptions.
* On SEND only ``durable`` chooses the declared queue's durability; ``persistent`` there means
  ``delivery_mode=2``. RabbitMQ lets ``persistent:false`` on a SEND declare an exclusive, auto-delete queue.
* Integer queue arguments that are not integers give an "Invalid header" ERROR instead of a crash, and
  ``x-overflow``, ``x-single-active-consumer`` and ``x-delivery-limit`` are understood as well.
* :func:`format_destination` shows ``/topic/RK`` for the *configured* topic exchange (the default is
  ``amq.topic``, which is RabbitMQ's behaviour); with another topic exchange, RabbitMQ shows
  ``/exchange/X/RK`` there and ``/topic/RK`` for ``amq.topic``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from gateway.stomp.frames import ProtocolError

__all__ = [
    "AMQQUEUE",
    "DEFAULT_TOPIC_EXCHANGE",
    "EXCHANGE",
    "QUEUE",
    "QUEUE_ARGUMENTS",
    "REPLY_QUEUE",
    "SUBSCRIPTION_QUEUE_PREFIX",
    "TEMP_QUEUE",
    "TOPIC",
    "Destination",
    "QueueDeclaration",
    "SubscriptionPlan",
    "check_send_destination",
    "durable_subscription_queue_name",
    "durable_unsubscribe_queue",
    "format_destination",
    "parse_bool",
    "parse_destination",
    "queue_arguments",
    "queue_declaration",
    "routing_pair",
    "send_declaration",
    "subscription_plan",
    "temp_queue_plan",
]

# Destination kinds: RabbitMQ's endpoint atoms, so error bodies read the same
# ("... is not a valid amqqueue destination").
EXCHANGE = "exchange"
TOPIC = "topic"
QUEUE = "queue"
AMQQUEUE = "amqqueue"
TEMP_QUEUE = "temp_queue"
REPLY_QUEUE = "reply_queue"

DEFAULT_TOPIC_EXCHANGE = "amq.topic"

#: Prefix of generated subscription queue names (RabbitMQ ``rabbit_stomp_util:subscription_queue_name``).
SUBSCRIPTION_QUEUE_PREFIX = "stomp-subscription-"

_REPLY_QUEUE_PREFIX = "/reply-queue/"
_VALID_DESTINATION_TYPES = "/temp-queue, /exchange, /topic, /queue, /amq/queue, /reply-queue/"
_SIMPLE_KINDS = {"queue": QUEUE, "topic": TOPIC, "temp-queue": TEMP_QUEUE}

#: Queue-declare arguments taken from SEND/SUBSCRIBE headers, by AMQP type. RabbitMQ's list (RS-hdr
#: ``HEADER_ARGUMENTS``) plus, as extensions, x-overflow (listed in RabbitMQ's docs but not in its code),
#: x-single-active-consumer and x-delivery-limit.
_STRING_ARGUMENTS = (
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-queue-type",
    "x-max-age",
    "x-overflow",
)
_INTEGER_ARGUMENTS = (
    "x-expires",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-stream-max-segment-size-bytes",
    "x-stream-filter-size-bytes",
    "x-delivery-limit",
)
_BOOLEAN_ARGUMENTS = ("x-single-active-consumer",)
QUEUE_ARGUMENTS: frozenset[str] = frozenset(_STRING_ARGUMENTS + _INTEGER_ARGUMENTS + _BOOLEAN_ARGUMENTS)

_ARGUMENT_TYPE: dict[str, type] = {
    **dict.fromkeys(_STRING_ARGUMENTS, str),
    **dict.fromkeys(_INTEGER_ARGUMENTS, int),
    **dict.fromkeys(_BOOLEAN_ARGUMENTS, bool),
}

# Erlang's list_to_integer after string:strip: an optional sign and ASCII digits only.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1

# Queue types that RabbitMQ 4.3 always declares durable and non-exclusive.
_REPLICATED_QUEUE_TYPES = frozenset({"quorum", "stream"})


# -- Destination values ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed ``destination`` (or ``reply-to``) header.

    ``kind`` is one of ``exchange``, ``topic``, ``queue``, ``amqqueue``, ``temp_queue``, ``reply_queue``.
    ``name`` is the exchange name, the topic routing key or pattern, the queue name, the temp-queue name or
    the reply-queue rest, with ``%2F`` already turned into ``/`` (except for ``reply_queue``).
    ``pattern`` is set only for ``/exchange/X/PATTERN`` (it may be ``""``); ``raw`` is the header as given.
    """

    kind: str
    name: str
    pattern: str | None = None
    raw: str = ""


def _unescape(segment: str) -> str:
    # Only the exact upper-case "%2F" is decoded (RabbitMQ parity): not "%2f", not "%25".
    return segment.replace("%2F", "/") if "%2F" in segment else segment


def _invalid(kind: str, rest: list[str]) -> ProtocolError:
    content = "/" + "/".join(rest) if rest else ""
    return ProtocolError("Invalid destination", f"'{content}' is not a valid {kind} destination\n")


def parse_destination(raw: str) -> Destination:
    """Parse a ``destination`` header the way RabbitMQ's ``parse_endpoint/1`` does.

    The value is split on ``/`` first; only then is ``%2F`` decoded inside each segment, so a literal
    ``/`` in a name must be written ``%2F``. A value without any ``/`` means ``/queue/<value>``.
    Raises :class:`ProtocolError` (and nothing else) for every value that RabbitMQ refuses, with its
    ``message`` and body: "Invalid destination", "Unknown destination". The caller still has to reject
    ``/temp-queue/...`` where it is not allowed (:func:`check_send_destination`, :func:`subscription_plan`).
    """
    if raw == "":
        # RabbitMQ parses "" as the queue "" and then refuses it in ensure_endpoint.
        raise ProtocolError("Invalid destination", "Destination cannot be blank")
    parts = raw.split("/")
    if len(parts) == 1:
        return Destination(QUEUE, _unescape(raw), None, raw)
    if parts[0] == "":
        prefix = parts[1]
        if prefix == "exchange":
            rest = parts[2:]
            if not rest or rest[0] == "" or len(rest) > 2:
                raise _invalid(EXCHANGE, rest)
            pattern = _unescape(rest[1]) if len(rest) == 2 else None
            return Destination(EXCHANGE, _unescape(rest[0]), pattern, raw)
        kind = _SIMPLE_KINDS.get(prefix)
        rest = parts[2:]
        if kind is None and prefix == "amq" and len(parts) >= 3 and parts[2] == "queue":
            kind, rest = AMQQUEUE, parts[3:]
        if kind is not None:
            if len(rest) != 1 or rest[0] == "":
                raise _invalid(kind, rest)
            return Destination(kind, _unescape(rest[0]), None, raw)
        if prefix == "reply-queue" and len(parts) >= 3:
            # Differs from RabbitMQ: the rest is kept verbatim (no %2F decoding), so that the reply-to a
            # MESSAGE shows ("/reply-queue/" + the AMQP reply_to) always routes back to that same queue.
            name = raw[len(_REPLY_QUEUE_PREFIX) :]
            if name == "":
                raise _invalid(REPLY_QUEUE, [""])
            return Destination(REPLY_QUEUE, name, None, raw)
    raise ProtocolError(
        "Unknown destination",
        f"'{raw}' is not a valid destination.\nValid destination types are: {_VALID_DESTINATION_TYPES}.\n",
    )


def _raw(dest: Destination) -> str:
    if dest.raw:
        return dest.raw
    return "/temp-queue/" + dest.name if dest.kind == TEMP_QUEUE else dest.name


def _not_valid_for(dest: Destination, command: str) -> ProtocolError:
    return ProtocolError(
        "Invalid destination", f"'{_raw(dest)}' is not a valid destination for '{command}'\n"
    )


def check_send_destination(dest: Destination) -> None:
    """Raise RabbitMQ's "Invalid destination" ERROR if a SEND may not go to ``dest`` (``/temp-queue/...``:
    a temp queue is only valid in ``reply-to``)."""
    if dest.kind == TEMP_QUEUE:
        raise _not_valid_for(dest, "SEND")


def routing_pair(dest: Destination, topic_exchange: str = DEFAULT_TOPIC_EXCHANGE) -> tuple[str, str]:
    """``(exchange, routing_key)`` to publish a SEND to ``dest`` with.

    ``/exchange/X[/K]`` → ``(X, K or "")``; ``/topic/K`` → ``(topic_exchange, K)``; ``/queue/N``,
    ``/amq/queue/N`` and ``/reply-queue/N`` → ``("", N)`` (the default exchange). A ``temp_queue``
    raises the SEND "Invalid destination" error: the caller rewrites temp queues itself.
    """
    kind = dest.kind
    if kind == EXCHANGE:
        return dest.name, dest.pattern or ""
    if kind == TOPIC:
        return topic_exchange, dest.name
    if kind == TEMP_QUEUE:
        raise _not_valid_for(dest, "SEND")
    return "", dest.name


# -- MESSAGE destination (AMQP → STOMP) ---------------------------------------------------------------------

# Per byte of UTF-8: "/" → %2F, "%" → %25, below 32 or above 127 → %XX (upper-case hex). 127 (DEL) passes
# through unchanged, as in RabbitMQ's escape_dest.
_ESCAPED_BYTE = [f"%{b:02X}" if b < 32 or b > 127 or b in (0x2F, 0x25) else chr(b) for b in range(256)]


def _escape(name: str) -> str:
    if name.isascii() and name.isprintable() and "/" not in name and "%" not in name:
        return name
    table = _ESCAPED_BYTE
    return "".join([table[b] for b in name.encode("utf-8", "surrogatepass")])


@lru_cache(maxsize=4096)
def format_destination(exchange: str, routing_key: str, topic_exchange: str = DEFAULT_TOPIC_EXCHANGE) -> str:
    """The MESSAGE ``destination`` for a delivery via ``exchange`` with ``routing_key`` (RabbitMQ
    ``format_destination``): as if the message had come from a SEND.

    ``""`` → ``/queue/RK``; ``topic_exchange`` → ``/topic/RK``; other ``X`` → ``/exchange/X`` (empty key)
    or ``/exchange/X/RK``. Names are escaped: ``/`` → ``%2F``, ``%`` → ``%25``, and every UTF-8 byte
    below 32 or above 127 → ``%XX``; since the parser only decodes ``%2F``, names with ``%`` or non-ASCII
    characters do not round-trip (neither do they in RabbitMQ). Results are cached (one call per delivery).

    Differs from RabbitMQ only when ``topic_exchange`` is not ``amq.topic``: RabbitMQ shows ``/topic/`` for
    the literal ``amq.topic`` whatever the setting; here the configured exchange is the one shown as
    ``/topic/``, so the destination is the one a SEND would use to publish there again.
    """
    if exchange == "":
        return "/queue/" + _escape(routing_key)
    if exchange == topic_exchange:
        return "/topic/" + _escape(routing_key)
    if routing_key == "":
        return "/exchange/" + _escape(exchange)
    return "/exchange/" + _escape(exchange) + "/" + _escape(routing_key)


# -- Queue declarations ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueDeclaration:
    """The ``queue.declare`` a SEND or SUBSCRIBE needs. ``name=""`` lets the broker name the queue.

    ``arguments`` holds typed x-arguments (str, int or bool values), in header order. It is a fresh dict for
    every declaration; treat it as read-only. It is left out of the hash.
    """

    name: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    arguments: dict[str, object] = field(default_factory=dict, hash=False)


def parse_bool(value: str | None) -> bool | None:
    """RabbitMQ's header booleans: ``true``/``True`` → True, ``false``/``False`` → False, anything else
    (including ``None`` and ``TRUE``) → None, which means "not set"."""
    if value == "true" or value == "True":
        return True
    if value == "false" or value == "False":
        return False
    return None


def _durable_header(headers: Mapping[str, str], *, persistent_counts: bool = True) -> bool | None:
    """``durable`` (alias ``persistent``): True if either says true, False if either says false, else None."""
    durable = parse_bool(headers.get("durable"))
    persistent = parse_bool(headers.get("persistent")) if persistent_counts else None
    if durable or persistent:
        return True
    if durable is False or persistent is False:
        return False
    return None


def queue_arguments(headers: Mapping[str, str]) -> dict[str, object]:
    """The typed queue-declare x-arguments found in ``headers`` (c.1), in header order.

    ``x-dead-letter-exchange``, ``x-dead-letter-routing-key``, ``x-queue-type``, ``x-max-age`` and
    ``x-overflow`` stay strings; ``x-expires``, ``x-message-ttl``, ``x-max-length``, ``x-max-length-bytes``,
    ``x-max-priority``, ``x-stream-max-segment-size-bytes``, ``x-stream-filter-size-bytes`` and
    ``x-delivery-limit`` become signed 64-bit integers; ``x-single-active-consumer`` a boolean. Values are
    stripped of surrounding whitespace first, as RabbitMQ does. A value of the wrong type raises
    :class:`ProtocolError` "Invalid header" naming the header and the value (RabbitMQ crashes instead).
    """
    arguments: dict[str, object] = {}
    for name, value in headers.items():
        kind = _ARGUMENT_TYPE.get(name)
        if kind is None:
            continue
        text = value.strip()
        if kind is str:
            arguments[name] = text
        elif kind is int:
            number = int(text) if _INTEGER.fullmatch(text) else None
            if number is None or not _LONG_MIN <= number <= _LONG_MAX:
                raise ProtocolError(
                    "Invalid header", f"'{name}' must be a signed 64-bit integer, got '{value}'\n"
                )
            arguments[name] = number
        else:
            flag = parse_bool(text)
            if flag is None:
                raise ProtocolError("Invalid header", f"'{name}' must be true or false, got '{value}'\n")
            arguments[name] = flag
    return arguments


def queue_declaration(
    headers: Mapping[str, str],
    *,
    name: str,
    default_durable: bool,
    durable_exclusive: bool = False,
    durable_auto_delete: bool = False,
    persistent_counts: bool = True,
) -> QueueDeclaration:
    """Build a ``queue.declare`` from SEND/SUBSCRIBE headers with RabbitMQ's defaults (b.2).

    1. ``durable`` (or its alias ``persistent``) is the header's value, else ``default_durable``.
    2. Not durable: ``exclusive=True, auto_delete=True``. Durable: ``exclusive=durable_exclusive,
       auto_delete=durable_auto_delete`` (both False for a plain queue; a durable subscription queue passes
       ``durable_auto_delete=True``).
    3. Explicit ``exclusive`` and ``auto-delete`` headers override that; then the x-arguments
       (:func:`queue_arguments`) are added.
    4. ``x-queue-type`` ``quorum`` or ``stream`` forces ``durable=True, exclusive=False`` (RabbitMQ 4.3).
       The vhost's default queue type is not known here; a caller that knows it is quorum or stream must
       apply the same rule.

    ``persistent_counts=False`` ignores ``persistent`` (a SEND, where it means ``delivery_mode=2``).
    Raises :class:`ProtocolError` for a malformed x-argument.
    """
    flag = _durable_header(headers, persistent_counts=persistent_counts)
    durable = default_durable if flag is None else flag
    if durable:
        exclusive, auto_delete = durable_exclusive, durable_auto_delete
    else:
        exclusive, auto_delete = True, True
    explicit = parse_bool(headers.get("exclusive"))
    if explicit is not None:
        exclusive = explicit
    explicit = parse_bool(headers.get("auto-delete"))
    if explicit is not None:
        auto_delete = explicit
    arguments = queue_arguments(headers)
    if arguments.get("x-queue-type") in _REPLICATED_QUEUE_TYPES:
        durable, exclusive = True, False
    return QueueDeclaration(name, durable, exclusive, auto_delete, arguments)


def send_declaration(dest: Destination, headers: Mapping[str, str]) -> QueueDeclaration | None:
    """The queue a SEND must declare before publishing (RabbitMQ does it once per session per name):
    ``/queue/N`` → ``N``, durable unless ``durable:false``, with the header overrides and x-arguments.
    Other destinations → None (no declare).

    Differs from RabbitMQ: ``persistent`` is not read as ``durable`` here; on a SEND it asks for a
    persistent message, and ``persistent:false`` must not turn the queue into an exclusive one.
    """
    if dest.kind != QUEUE:
        return None
    return queue_declaration(headers, name=dest.name, default_durable=True, persistent_counts=False)


# -- Subscriptions ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionPlan:
    """What a SUBSCRIBE does on the broker, in order: declare, bind, consume.

    ``declaration``: the queue to declare first, or None to consume an existing queue without declaring
    (``/amq/queue``, ``/reply-queue``). ``queue``: the queue to consume; ``""`` only when
    ``declaration.name`` is ``""``, and then the caller consumes the name the broker gave. ``exchange``:
    bind the queue to it with ``binding_key`` (None: no binding). ``durable_subscription``: a durable
    ``/topic`` subscription, whose queue an UNSUBSCRIBE with ``durable:true`` deletes.
    ``shareable``: a non-durable, unnamed ``/topic`` or ``/exchange`` subscription without queue
    arguments, whose queue several sessions could share (the caller also requires ``ack:auto``).
    """

    declaration: QueueDeclaration | None
    queue: str
    exchange: str | None
    binding_key: str
    durable_subscription: bool
    shareable: bool


def _base64url(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _erlang_string(text: str) -> bytes:
    # Erlang's external term format for a string (a list of bytes): how RabbitMQ 3.x holds header values.
    data = text.encode("utf-8", "surrogatepass")
    if not data:
        return b"j"  # NIL_EXT
    if len(data) < 65536:
        return b"k" + struct.pack(">H", len(data)) + data  # STRING_EXT
    # LIST_EXT of SMALL_INTEGER_EXT elements, then NIL_EXT
    return b"l" + struct.pack(">I", len(data)) + b"".join(b"a" + bytes((byte,)) for byte in data) + b"j"


def durable_subscription_queue_name(key: str, sub_id: str) -> str:
    """The deterministic queue name of a durable subscription with routing key or pattern ``key`` and id
    ``sub_id``: ``stomp-subscription-`` + base64url (no padding) of the MD5 of ``{key, sub_id}`` in Erlang's
    term format. This is byte-for-byte RabbitMQ 3.10's name, so a durable subscription made through
    RabbitMQ's own STOMP plugin is found again. The exchange is not part of the name."""
    term = b"\x83h\x02" + _erlang_string(key) + _erlang_string(sub_id)  # SMALL_TUPLE_EXT, arity 2
    return SUBSCRIPTION_QUEUE_PREFIX + _base64url(hashlib.md5(term, usedforsecurity=False).digest())


def _random_subscription_queue_name() -> str:
    return SUBSCRIPTION_QUEUE_PREFIX + _base64url(secrets.token_bytes(16))


def subscription_plan(
    dest: Destination,
    headers: Mapping[str, str],
    sub_id: str | None,
    topic_exchange: str = DEFAULT_TOPIC_EXCHANGE,
) -> SubscriptionPlan:
    """Plan a SUBSCRIBE to ``dest`` with the frame's (first-wins) ``headers`` and ``id`` (b.2, notes 1-3).

    * ``/topic/K`` and ``/exchange/X[/K]``: declare ``x-queue-name`` or a generated
      ``stomp-subscription-...`` queue, bind it to the topic exchange (or ``X``) with ``K`` (or ``""``) and
      consume it. Non-durable: a random name, ``exclusive`` and ``auto_delete`` (RabbitMQ 4.3). Durable
      (``durable:true`` or ``persistent:true``): the name comes from ``(K, id)``
      (:func:`durable_subscription_queue_name`); ``durable=True, exclusive=False``, ``auto_delete`` unless
      ``auto-delete:false``; ``id`` is required ("Missing Header" otherwise).
    * ``/queue/N``: declare ``N`` (durable unless ``durable:false``, with the header overrides) and
      consume it.
    * ``/amq/queue/N`` and ``/reply-queue/N``: consume ``N`` without declaring anything.
    * ``/temp-queue/...``: "Invalid destination" (only valid in ``reply-to``).

    Raises :class:`ProtocolError`; headers must have been checked for nothing else.
    """
    kind = dest.kind
    if kind in (TOPIC, EXCHANGE):
        exchange, key = routing_pair(dest, topic_exchange)
        durable = _durable_header(headers) is True
        if durable and sub_id is None:
            raise ProtocolError("Missing Header", "Header 'id' is required for durable subscriptions")
        named = headers.get("x-queue-name")
        if named is not None:
            name = named
        elif durable:
            assert sub_id is not None
            name = durable_subscription_queue_name(key, sub_id)
        else:
            name = _random_subscription_queue_name()
        # Differs from RabbitMQ for /exchange: a durable subscription queue is never exclusive by default.
        declaration = queue_declaration(headers, name=name, default_durable=False, durable_auto_delete=True)
        shareable = not declaration.durable and named is None and not declaration.arguments
        return SubscriptionPlan(declaration, name, exchange, key, kind == TOPIC and durable, shareable)
    if kind == QUEUE:
        declaration = queue_declaration(headers, name=dest.name, default_durable=True)
        return SubscriptionPlan(declaration, dest.name, None, "", False, False)
    if kind in (AMQQUEUE, REPLY_QUEUE):
        return SubscriptionPlan(None, dest.name, None, "", False, False)
    raise _not_valid_for(dest, "SUBSCRIBE")


def temp_queue_plan() -> SubscriptionPlan:
    """The queue behind a ``/temp-queue/T`` used in ``reply-to`` (b.2): a server-named, exclusive,
    auto-delete queue, consumed by the session that named it, bound to nothing (replies come through the
    default exchange)."""
    declaration = QueueDeclaration("", durable=False, exclusive=True, auto_delete=True)
    return SubscriptionPlan(declaration, "", None, "", False, False)


def durable_unsubscribe_queue(dest: Destination, headers: Mapping[str, str], sub_id: str) -> str | None:
    """The queue to delete after an UNSUBSCRIBE (note 4): for a ``/topic`` subscription when the UNSUBSCRIBE
    says ``durable:true`` (or ``persistent:true``), the UNSUBSCRIBE's ``x-queue-name`` or the durable
    queue name computed from ``(K, sub_id)``; otherwise None."""
    if dest.kind != TOPIC or _durable_header(headers) is not True:
        return None
    named = headers.get("x-queue-name")
    return named if named is not None else durable_subscription_queue_name(dest.name, sub_id)
