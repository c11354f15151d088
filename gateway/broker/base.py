"""The broker interface that sessions, destinations and fan-out see.

Two implementations stand behind it: :mod:`gateway.broker.amqp` (RabbitMQ, over the gateway's own AMQP connection) and
:mod:`gateway.broker.memory` (the embedded broker). Nothing above this module knows which one it talks to.

The model is AMQP 0-9-1's: exchanges, queues, bindings, consumers with a prefetch, acknowledgements by
delivery tag, publisher confirms. A :class:`Broker` authenticates a user on a virtual host and hands out
:class:`Channel` objects; a channel is one error domain (a broker error closes that channel only, and
the channel's unacknowledged deliveries go back to their queues).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AccessRefused",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Channel",
    "ChannelClosed",
    "ConnectionLostWithNode",
    "DeliverCallback",
    "Delivery",
    "FrameTooLarge",
    "MessageProperties",
    "PublishNacked",
    "VhostNotFound",
    "check_names",
]


@dataclass(slots=True)
class MessageProperties:
    """AMQP basic properties. ``None`` means "not set".

    ``headers`` holds the application headers table with native Python values (str, int, float, bool,
    bytes, datetime, Decimal, list, dict), exactly as the broker delivered or will publish them.
    ``expiration`` is the AMQP string (milliseconds); ``timestamp`` is whole seconds since the epoch.
    """

    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: int | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer.

    ``delivery_tag`` is unique per channel; pass it back to :meth:`Channel.ack` / :meth:`Channel.nack`
    when the consumer was started with ``no_ack=False``.
    """

    consumer_tag: str
    delivery_tag: int
    exchange: str
    routing_key: str
    redelivered: bool
    body: bytes
    properties: MessageProperties


DeliverCallback = Callable[[Delivery], None]
"""Called synchronously, in delivery order, for every message of a consumer. Must not block."""


class BrokerError(Exception):
    """A broker refused an operation.

    ``code`` is the AMQP reply code (404, 403, 406, 405, ...), ``name`` the AMQP reply name in lower case
    (``not_found``, ``access_refused``, ``precondition_failed``, ``resource_locked``) and ``text`` the
    broker's explanation without the name prefix, e.g. ``no exchange 'x' in vhost '/'``. After a
    BrokerError raised by a channel operation, that channel is closed (except :class:`PublishNacked`:
    a nack leaves the channel open). On a closed channel ack/nack/cancel do nothing and the other
    methods raise :class:`ChannelClosed`.
    """

    def __init__(self, code: int, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.code = code
        self.name = name
        self.text = text


class AccessRefused(BrokerError):
    """Wrong login or passcode."""

    def __init__(self, login: str) -> None:
        super().__init__(403, "access_refused", f"Access refused for user '{login}'")
        self.login = login


class VhostNotFound(BrokerError):
    """The virtual host does not exist or the user may not use it."""

    def __init__(self, vhost: str) -> None:
        super().__init__(530, "not_allowed", f"Virtual host '{vhost}' access denied")
        self.vhost = vhost


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached right now (not started, restarting, connection lost).

    ``text`` goes to clients and says nothing of the broker's address or credentials; ``detail`` is for
    the gateway's own log (where the broker is, what the network said), never for clients.
    """

    def __init__(self, text: str = "the message broker is not available", detail: str | None = None) -> None:
        super().__init__(320, "connection_forced", text)
        self.detail = detail or text


class ConnectionLostWithNode(BrokerUnavailable):
    """The AMQP connection went away with its node or the network (the node shut down or restarted:
    ``connection_forced``; the socket broke; heartbeats stopped), not over anything the gateway sent: a session
    on it may move to another node. A connection RabbitMQ closes over a frame it refused (5xx) is a plain
    :class:`BrokerUnavailable`: moving would hide the gateway's bug, so those sessions end."""


class ChannelClosed(BrokerError):
    """The channel was closed, by the broker or by the connection going away."""

    def __init__(self, text: str = "channel closed") -> None:
        super().__init__(504, "channel_error", text)


class FrameTooLarge(BrokerError):
    """An operation the broker could only take as an oversized frame, which it would answer by closing the
    whole connection (AMQP 501 FRAME_ERROR): refused before it is sent. ``frame_max`` is the size the broker
    negotiated for this connection."""

    def __init__(self, what: str, size: int, frame_max: int) -> None:
        super().__init__(
            501,
            "frame_error",
            f"{what} take {size} bytes in AMQP, more than the broker's frame size of {frame_max} bytes allows",
        )
        self.frame_max = frame_max


class PublishNacked(BrokerError):
    """The broker answered a publish with basic.nack (or returned it, when mandatory)."""

    def __init__(self, text: str = "the broker rejected the message") -> None:
        super().__init__(406, "nacked", text)


#: AMQP carries queue and exchange names, routing and binding keys as short strings: at most 255 bytes.
MAX_NAME_BYTES = 255


def check_names(**names: str) -> None:
    """Raise ``precondition_failed`` (406) for a name or key longer than AMQP allows, the same on every
    broker (keyword: what the value is, e.g. ``routing_key``)."""
    for what, value in names.items():
        if len(value) > MAX_NAME_BYTES // 4 and len(value.encode()) > MAX_NAME_BYTES:
            raise BrokerError(
                406,
                "precondition_failed",
                f"{what.replace('_', ' ')} '{value[:32]}...' is longer than the {MAX_NAME_BYTES} bytes AMQP allows",
            )


class Channel(abc.ABC):
    """One AMQP channel: the unit of isolation. Methods raise :class:`BrokerError`."""

    #: Called once when the channel closes for any reason other than :meth:`close`; the argument says why.
    on_close: Callable[[BrokerError], None] | None = None
    #: Called with a consumer's tag when the broker cancels that consumer on its own (its queue was deleted,
    #: or the queue's node left the cluster); the channel stays open.
    on_cancel: Callable[[str], None] | None = None

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @abc.abstractmethod
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
        """Declare a queue and return its name. ``name=""`` asks the broker to choose one."""

    @abc.abstractmethod
    async def check_exchange(self, name: str) -> None:
        """Raise ``BrokerError(404, 'not_found', "no exchange 'X' in vhost 'V'")`` if ``name`` is missing."""

    @abc.abstractmethod
    async def declare_exchange(self, name: str, type: str = "topic", *, durable: bool = True) -> None:
        """Declare an exchange (used by the stock daemon and tests)."""

    @abc.abstractmethod
    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None: ...

    @abc.abstractmethod
    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None: ...

    @abc.abstractmethod
    async def delete_queue(self, name: str) -> None: ...

    @abc.abstractmethod
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
        """Start a consumer and return its tag. ``prefetch_count`` applies to this consumer only."""

    @abc.abstractmethod
    async def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer. Its unacknowledged deliveries stay unacknowledged until ack/nack or close."""

    @abc.abstractmethod
    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties,
        *,
        confirm: bool = False,
    ) -> None:
        """Publish. With ``confirm=True`` return only after the broker confirmed it (raise
        :class:`PublishNacked` on a nack). Without, return as soon as it is handed over."""

    async def enable_confirms(self) -> None:  # noqa: B027 - a no-op where confirms cost nothing
        """Make later :meth:`start_publish` futures wait for the broker's confirm. Before this call they
        may resolve as soon as the message is handed over (RabbitMQ's STOMP plugin also turns confirms on
        at the first SEND that asks for a receipt). Idempotent."""

    async def drain(self) -> None:  # noqa: B027 - a no-op for brokers that never hold publishes back
        """Wait while this channel's publishes are held back by the broker (flow control)."""

    @property
    def held_back(self) -> bool:
        """True while :meth:`drain` would wait: callers on the data path await it only then."""
        return False

    def start_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: MessageProperties
    ) -> asyncio.Future[None]:
        """Hand the message over now, so that call order is publish order, and return a future that
        resolves at the broker's confirm (or fails with :class:`BrokerError`). Must be called from a
        running event loop. Implementations may override it with something cheaper."""
        return asyncio.ensure_future(self.publish(exchange, routing_key, body, properties, confirm=True))

    @abc.abstractmethod
    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Acknowledge (fire and forget: a failure closes the channel and calls ``on_close``)."""

    @abc.abstractmethod
    def nack(self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True) -> None:
        """Negatively acknowledge (fire and forget, as :meth:`ack`)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the channel; unacknowledged deliveries are requeued. Never raises."""


ChannelFactory = Callable[[], Awaitable[Channel]]


class Broker(abc.ABC):
    """A source of channels for authenticated users."""

    #: Short name for logs and ``CONNECTED``'s ``server`` header ("rabbitmq" or "memory").
    kind: str = "broker"

    @property
    @abc.abstractmethod
    def is_available(self) -> bool:
        """True while the broker can be reached (``/readyz`` answers 200 then)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect (or start). Raise :class:`BrokerUnavailable` with one clear line if impossible."""

    @abc.abstractmethod
    async def authenticate(self, login: str, passcode: str, vhost: str) -> Any:
        """Check credentials and vhost; return an opaque *principal* for :meth:`open_channel`.

        Raises :class:`AccessRefused`, :class:`VhostNotFound` or :class:`BrokerUnavailable`.
        """

    @abc.abstractmethod
    async def open_channel(self, principal: Any, owner: str | None = None) -> Channel:
        """A new channel for that principal. Several principals of the same user may share a connection.

        ``owner`` names the session the channel works for: a queue it declares exclusive can be used only by
        channels of the same owner (RESOURCE_LOCKED for others, as RabbitMQ answers another connection),
        and the broker's log names it when something goes wrong.
        """

    @abc.abstractmethod
    async def close(self) -> None: ...

    def shared_key(self, principal: Any) -> Any:
        """Sessions whose principals share this key may share fan-out consumers (same AMQP connection)."""
        return principal
