"""The STOMP session state machine (sans-I/O).

A :class:`Session` takes client frames in (:meth:`Session.receive_frame`) and gives *actions* out: frames
to write and broker operations to run. The connection layer runs the actions in order and reports their
outcome back as events (:meth:`Session.authenticated`, :meth:`Session.broker_failed`, ...), which again
yield actions. Deliveries become MESSAGE frames through :class:`~gateway.stomp.writer.MessageTemplate`,
which serializes the shared part of a frame once however many sessions receive it.

Every state and the commands it accepts live in :data:`ACCEPTS`; nothing else decides what a state allows.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import enum
import functools
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.auth import Token, TokenPolicy, TokenRejected
from gateway.broker.base import (
    AccessRefused,
    BrokerError,
    Delivery,
    FrameTooLarge,
    MessageProperties,
    PublishNacked,
    VhostNotFound,
)
from gateway.continuity import ContinuityRequest, HandOver, parse_position
from gateway.destinations import (
    AMQQUEUE,
    EXCHANGE,
    QUEUE,
    TEMP_QUEUE,
    TOPIC,
    Destination,
    QueueDeclaration,
    SubscriptionPlan,
    check_send_destination,
    durable_unsubscribe_queue,
    parse_bool,
    parse_destination,
    routing_pair,
    send_declaration,
    subscription_plan,
    temp_queue_plan,
)
from gateway.headers import delivery_headers, properties_from_send
from gateway.scopes import Need, Scopes, send_needs, subscribe_needs, unsubscribe_needs
from gateway.settings import DEFAULTS
from gateway.stomp.frames import (
    DEFAULT_LIMITS,
    SUPPORTED_VERSIONS_TEXT,
    VERSIONS,
    Frame,
    FrameParser,
    Limits,
    ProtocolError,
)
from gateway.stomp.writer import MessageTemplate

__all__ = [
    "ACCEPTS",
    "TOKEN_DESTINATION",
    "Ack",
    "Action",
    "Authenticate",
    "Barrier",
    "Close",
    "Connected",
    "Disconnect",
    "ExpireAt",
    "Publish",
    "Reattach",
    "SendFrame",
    "Session",
    "SessionSettings",
    "State",
    "Subscribe",
    "Subscription",
    "Unsubscribe",
    "negotiate_heartbeat",
    "negotiate_version",
]


class State(enum.Enum):
    CONNECTING = "connecting"  # waiting for CONNECT / STOMP
    AUTHENTICATING = "authenticating"  # CONNECT received, the broker is checking the credentials
    CONNECTED = "connected"
    CLOSED = "closed"  # DISCONNECT or ERROR sent: nothing more is accepted


CLIENT_COMMANDS = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)

#: The commands each state accepts. Anything else: "Illegal command" before CONNECT, "Bad command" for an
#: unknown command. A frame in CLOSED is ignored (the connection is going away).
ACCEPTS: dict[State, frozenset[str]] = {
    State.CONNECTING: frozenset({"CONNECT", "STOMP"}),
    State.AUTHENTICATING: frozenset(),
    State.CONNECTED: CLIENT_COMMANDS - {"CONNECT", "STOMP"},
    State.CLOSED: frozenset(),
}

#: Commands that may carry a ``transaction`` header and are then buffered until COMMIT.
TRANSACTIONAL = frozenset({"SEND", "ACK", "NACK"})

ACK_MODES = ("auto", "client", "client-individual")

#: SEND a new token here (the body) to replace the session's token and scopes (sessions with tokens only).
TOKEN_DESTINATION = "/gateway/token"


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Write this frame to the client."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these credentials with the broker, then call :meth:`Session.authenticated` or
    :meth:`Session.broker_failed`."""

    login: str
    passcode: str
    vhost: str
    #: log in with the gateway's own broker credentials (a token or anonymous session; ``login`` and
    #: ``passcode`` are then empty): the session itself checks what the client may do
    as_gateway: bool = False


@dataclass(slots=True)
class Subscription:
    """One client subscription, or the consumer of a ``/temp-queue`` reply queue. ``key`` is its consumer tag:
    ``T_<id>``, or ``Q_<destination>`` without an id (a temp queue: its name). Pure session state: how the
    broker side is attached is the connection layer's own record."""

    key: str
    id: str | None
    destination: Destination
    ack: str
    plan: SubscriptionPlan
    prefetch_count: int | None
    consumer_tag: str
    consumer_arguments: dict[str, object] = field(default_factory=dict)
    #: the permissions it needs (checked again when a refreshed token replaces the scopes)
    needs: tuple[Need, ...] = ()
    #: ack id -> delivery tag, in delivery order (client modes only)
    pending: dict[str, int] = field(default_factory=dict)
    #: last value, recovery, conflation asked for (a shared /exchange or /topic subscription only)
    continuity: ContinuityRequest | None = None
    #: an ack:auto stream subscription (x-stream-offset): the gateway consumes with acks and acks each message
    #: once written
    gateway_acks: bool = False

    @property
    def shared(self) -> bool:
        return self.plan.shareable and self.ack == "auto"

    @property
    def broker_no_ack(self) -> bool:
        """Whether the broker consumer runs without acknowledgements."""
        return self.ack == "auto" and not self.gateway_acks


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Start consuming for ``subscription``; on success send ``receipt`` (if any); on failure call
    :meth:`Session.broker_failed`."""

    subscription: Subscription
    receipt: Frame | None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop the subscription's consumer; delete ``delete_queue`` if set; then send ``receipt``."""

    subscription: Subscription
    delete_queue: str | None
    receipt: Frame | None


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish a message. ``declare`` is declared first (once per session per name is enough);
    ``temp_queue`` names a ``/temp-queue/T`` whose real queue name must be put in ``properties.reply_to``
    (on first use, declaring it and consuming it for ``reply_subscription``, which the session made).
    Report the confirm with :meth:`Session.publish_confirmed` or :meth:`Session.publish_failed` when
    ``receipt`` is set or ``confirm`` asks for one (a later :class:`Barrier` waits for it)."""

    exchange: str
    routing_key: str
    body: bytes
    properties: MessageProperties
    declare: QueueDeclaration | None
    temp_queue: str | None
    receipt: Frame | None
    confirm: bool = False
    reply_subscription: Subscription | None = None


@dataclass(frozen=True, slots=True)
class Barrier:
    """Send ``receipt`` once every publish started before it has been confirmed by the broker."""

    receipt: Frame


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge (or, with ``nack``, reject) these delivery tags, then send ``receipt``."""

    subscription: Subscription
    delivery_tags: tuple[int, ...]
    nack: bool
    requeue: bool
    receipt: Frame | None


@dataclass(frozen=True, slots=True)
class Connected:
    """The broker accepted the login: the transport may take full-size frames, the login timer stops, and
    heart-beats run every ``send_every`` ms out and are expected every ``expect_every`` ms in (0: off).
    Comes before the CONNECTED frame, so the client can never send a frame the transport would refuse."""

    version: str
    send_every: int
    expect_every: int


@dataclass(frozen=True, slots=True)
class ExpireAt:
    """The session's token expires at ``deadline`` (seconds since the epoch, leeway included): call
    :meth:`Session.token_expired` then. Replaces any earlier deadline (a refreshed token)."""

    deadline: float


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Wait for every earlier action (confirms included), send ``receipt`` if any, then close."""

    receipt: Frame | None


@dataclass(frozen=True, slots=True)
class Close:
    """Write ``error`` (if any) completely, then close the connection."""

    error: Frame | None


@dataclass(frozen=True, slots=True)
class Reattach:
    """The AMQP connection under this session was lost (a node stopped, the network broke) and the session
    holds nothing that goes with it: open a channel on another node, re-create the queue declarations,
    bindings and consumers of its subscriptions there, and keep the STOMP session open. If that fails, report
    it with :meth:`Session.broker_failed`. ``error`` is what was lost, for the log."""

    error: BrokerError


Action = (
    SendFrame
    | Authenticate
    | Connected
    | Subscribe
    | Unsubscribe
    | Publish
    | Ack
    | Barrier
    | ExpireAt
    | Disconnect
    | Close
    | Reattach
)


# ---------------------------------------------------------------------------------------------- negotiation


def negotiate_version(accept_version: str | None) -> str:
    """The highest version both sides speak; no header means 1.0 (STOMP 1.2, "Protocol Negotiation")."""
    if accept_version is None:
        return "1.0"
    offered = {v.strip() for v in accept_version.split(",")}
    for version in reversed(VERSIONS):
        if version in offered:
            return version
    raise ProtocolError("Version mismatch", f"Supported versions are {SUPPORTED_VERSIONS_TEXT}\n")


def negotiate_heartbeat(value: str | None, minimum: int, maximum: int) -> tuple[int, int]:
    """Return ``(send_every, expect_every)`` in ms for the server, from the client's ``heart-beat:cx,cy``.

    The server sends only if the client wants heart-beats (cy > 0), and never more often than
    ``minimum`` nor less often than ``maximum``; likewise for what it expects. 0 means off.
    """
    if not value:
        return 0, 0
    try:
        cx_text, cy_text = value.split(",")
        cx, cy = _int(cx_text.strip()), _int(cy_text.strip())
    except ValueError:
        raise ProtocolError(
            "Invalid header", f"'heart-beat' must be two comma-separated integers, got {value!r}\n"
        ) from None
    if cx < 0 or cy < 0:
        raise ProtocolError("Invalid header", f"'heart-beat' values must not be negative, got {value!r}\n")
    # The server may send more often than the client asks (the maximum caps that), but it can never
    # expect heart-beats more often than the client promised (effective = max(cx, sy), STOMP 1.2).
    send_every = min(max(cy, minimum), maximum) if cy > 0 else 0
    expect_every = max(cx, minimum) if cx > 0 else 0
    return send_every, expect_every


# ---------------------------------------------------------------------------------------------- messages


# ---------------------------------------------------------------------------------------------- session


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """The slice of the configuration a session needs (pure values).

    Each field is the :class:`gateway.settings.Config` setting of the same name, whose definition (flag,
    variable, help, default) is the only one; ``derive(SessionSettings, config)`` fills them from a configuration.
    """

    default_login: str = DEFAULTS.default_login
    default_passcode: str = DEFAULTS.default_passcode
    default_vhost: str = DEFAULTS.default_vhost
    heartbeat_min: int = DEFAULTS.heartbeat_min
    heartbeat_max: int = DEFAULTS.heartbeat_max
    topic_exchange: str = DEFAULTS.topic_exchange
    max_subscriptions: int = DEFAULTS.max_subscriptions
    max_transactions: int = DEFAULTS.max_transactions
    max_transaction_frames: int = DEFAULTS.max_transaction_frames
    max_transaction_bytes: int = DEFAULTS.max_transaction_bytes
    server_name: str = DEFAULTS.server_name
    shared_fanout: bool = DEFAULTS.shared_fanout
    max_conflate_interval: float = DEFAULTS.max_conflate_interval
    stream_prefetch: int = DEFAULTS.stream_prefetch
    #: tokens and scopes (:func:`gateway.auth.load_policy`); None: the broker's own logins decide
    tokens: TokenPolicy | None = None
    queue_type: str = DEFAULTS.queue_type


def _uint(text: str) -> int:
    """A non-negative decimal integer of ASCII digits only (``int()`` also takes ``+5``, ``1_0`` and non-ASCII digits)."""
    if not text or not text.isascii() or not text.isdigit():
        raise ValueError(text)
    return int(text)


def _check_consumer_tag(tag: str) -> None:
    """AMQP consumer tags are short strings: the subscription id (or destination) must fit."""
    if len(tag.encode()) > 255:
        raise ProtocolError(
            "Invalid header", "The subscription id (or destination, without an id) is longer than AMQP allows\n"
        )


def _int(text: str) -> int:
    """A decimal integer of ASCII digits with an optional leading minus."""
    return -_uint(text[1:]) if text.startswith("-") else _uint(text)


#: ``x-stream-offset`` values that RabbitMQ takes as they are
_STREAM_OFFSET_WORDS = ("first", "last", "next")


def _stream_offset(value: str) -> object:
    """A SUBSCRIBE's ``x-stream-offset`` as RabbitMQ's consumer argument: ``first``, ``last``, ``next``,
    ``offset=N`` (an integer) or ``timestamp=T`` (seconds since the epoch, an AMQP timestamp)."""
    if value in _STREAM_OFFSET_WORDS:
        return value
    name, _, number = value.partition("=")
    try:
        if name == "offset":
            return _uint(number)
        if name == "timestamp":
            return datetime.datetime.fromtimestamp(_uint(number), datetime.UTC)
    except (ValueError, OverflowError, OSError):
        pass
    raise ProtocolError(
        "Invalid header",
        f"'x-stream-offset' must be first, last, next, offset=N or timestamp=T (seconds), got {value!r}\n",
    )


def _send_route(raw: str, topic_exchange: str) -> tuple[Destination, str, str]:
    """A SEND destination parsed and checked, with the exchange and routing key it publishes to (raises
    "Invalid destination")."""
    destination = parse_destination(raw)
    check_send_destination(destination)
    return (destination, *routing_pair(destination, topic_exchange))


#: The same for every SEND to a destination, so worked out once for the (short) destinations in use; a
#: refused one is not kept and raises each time. At most 512 of at most 256 characters are kept.
_cached_send_route = functools.lru_cache(maxsize=512)(_send_route)


def _receipt(frame: Frame) -> Frame | None:
    receipt_id = frame.get("receipt")
    if receipt_id is None:
        return None
    return Frame("RECEIPT", (("receipt-id", receipt_id),))


def _new_session_id() -> str:
    return "session-" + base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


class Session:
    """One client's STOMP session, free of I/O: it decides, the connection layer drives.

    Bytes from the client go in with :meth:`receive_data`; :meth:`next_frame` pulls the next whole frame
    (the session owns the parser, and switches its version and frame-size limit when the login succeeds,
    so a frame pipelined behind CONNECT is decoded as it must be); :meth:`receive_frame` handles it and
    returns the actions to run, in order. What the connection layer observes while running them comes back
    as an event (:meth:`authenticated`, :meth:`broker_failed`, :meth:`publish_confirmed`,
    :meth:`publish_failed`, :meth:`slow_consumer`, :meth:`login_timed_out`, :meth:`heartbeat_timed_out`,
    :meth:`internal_error`, :meth:`connection_lost`), which again yields actions. Every ERROR text the
    gateway sends is written here or in the codec. A :class:`ProtocolError` never escapes
    :meth:`receive_frame`: it becomes a :class:`Close` action carrying the ERROR frame.
    """

    def __init__(
        self,
        settings: SessionSettings | None = None,
        session_id: str | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        token: str | None = None,
    ) -> None:
        self.settings = settings or SessionSettings()
        self.id = session_id or _new_session_id()
        self.state = State.CONNECTING
        self.version = "1.2"
        self.heartbeat: tuple[int, int] = (0, 0)
        self.login = ""
        self.vhost = ""
        self.parser = FrameParser(limits)
        self.subscriptions: dict[str, Subscription] = {}
        self.transactions: dict[str, list[Frame]] = {}
        self._transaction_bytes = 0  # bodies buffered in all open transactions
        #: ``/temp-queue/...`` names used in reply-to: each is a broker queue consumed for its subscription
        self.temp_queues: dict[str, Subscription] = {}
        #: ack id -> subscription key, for client ack modes
        self._ack_index: dict[str, str] = {}
        self._tag_counter = 0
        #: the token the upgrade request carried (query parameter, Authorization header or cookie)
        self._handshake_token = token
        #: the verified token (None: anonymous, or no token policy)
        self.token: Token | None = None
        #: what the client may do (None: no token policy, the broker's permissions decide)
        self.scopes: Scopes | None = None
        #: exclusive queues declared by SENDs: they go with the AMQP connection, so the session cannot move
        self._exclusive_sends: dict[str, None] = {}  # an ordered set (an empty set is 216 bytes a session)

    # -- input ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client, in any split. Nothing is parsed until :meth:`next_frame`."""
        self.parser.receive_data(data)

    def next_frame(self) -> Frame | None:
        """The next whole frame from the client, or None until more bytes arrive. Raises
        :class:`ProtocolError` for malformed input (after the good frames before it); report it with
        :meth:`fail`."""
        return self.parser.next_frame()

    def receive_frame(self, frame: Frame) -> list[Action]:
        """Handle one client frame. Returns the actions to run, in order."""
        if self.state is State.CLOSED:
            return []
        try:
            return self._dispatch(frame)
        except ProtocolError as error:
            if error.receipt_id is None and frame.get("receipt") is not None:
                error.receipt_id = frame.get("receipt")
            return self.fail(error)

    def fail(self, error: ProtocolError) -> list[Action]:
        """Close the session with this error (the ERROR frame is written before the close)."""
        self.state = State.CLOSED
        return [Close(error.to_frame())]

    def _fail_if_open(self, error: ProtocolError) -> list[Action]:
        """An outcome that ends a live session; nothing once it is closing already."""
        if self.state is State.CLOSED:
            return []
        return self.fail(error)

    def _dispatch(self, frame: Frame) -> list[Action]:
        command = frame.command
        if command not in ACCEPTS[self.state]:
            if self.state is State.CONNECTING:
                raise ProtocolError("Illegal command", "You must log in using CONNECT first")
            if command not in CLIENT_COMMANDS:
                raise ProtocolError("Bad command", f'Could not interpret command "{command}"\n')
            raise ProtocolError(
                "Illegal command", f"'{command}' is not allowed once the session is connected"
            )
        transaction = frame.get("transaction") if command in TRANSACTIONAL else None
        if transaction is not None:
            return self._buffer(transaction, frame)
        handler = getattr(self, "_on_" + command.lower())
        actions: list[Action] = handler(frame)
        return actions

    # -- CONNECT ----------------------------------------------------------------------------------

    def _on_connect(self, frame: Frame) -> list[Action]:
        version = negotiate_version(frame.get("accept-version"))
        if version == "1.0":
            # RabbitMQ trims leading whitespace of 1.0 header values (RS-proc frame_transformer).
            frame = Frame(frame.command, tuple((k, v.lstrip()) for k, v in frame.headers), frame.body)
        self.version = version
        self.heartbeat = negotiate_heartbeat(
            frame.get("heart-beat"), self.settings.heartbeat_min, self.settings.heartbeat_max
        )
        login = frame.get("login")
        passcode = frame.get("passcode")
        if self.settings.tokens is not None:
            return self._connect_with_token(self.settings.tokens, passcode, frame.get("host"))
        if login is None:
            login, passcode = self.settings.default_login, self.settings.default_passcode
        self.login = login
        self.vhost = frame.get("host") or self.settings.default_vhost
        self.state = State.AUTHENTICATING
        return [Authenticate(login, passcode or "", self.vhost)]

    _on_stomp = _on_connect

    def _connect_with_token(self, policy: TokenPolicy, passcode: str | None, host: str | None) -> list[Action]:
        """CONNECT under a token policy: the token is the ``passcode`` (any ``login``), else the one the
        upgrade request carried; without one, the anonymous scopes if there are any. The broker login is the
        gateway's own; the scopes decide what the client may do."""
        raw = passcode if passcode else self._handshake_token
        self.vhost = host or self.settings.default_vhost
        if raw:
            if policy.verifier is None:
                raise ProtocolError("Bad CONNECT", "This gateway takes no tokens (no key is configured)\n")
            try:
                self.token = policy.verifier.verify(raw)
            except TokenRejected as rejected:
                raise ProtocolError("Bad CONNECT", f"Token rejected: {rejected}\n") from None
            self.scopes = self.token.scopes
            self.login = self.token.subject or "(token without sub)"
        elif policy.anonymous is not None:
            self.scopes = policy.anonymous
            self.login = "anonymous"
        else:
            raise ProtocolError(
                "Bad CONNECT",
                "A token is required: give it as the passcode, as the access_token query parameter of the "
                "WebSocket URL, or in an Authorization: Bearer header\n",
            )
        if not self.scopes.vhost_access(self.vhost):
            who = "the token" if self.token is not None else "an anonymous session"
            raise ProtocolError("Bad CONNECT", f"Virtual host '{self.vhost}' access denied: {who} has no scope in it\n")
        self.state = State.AUTHENTICATING
        return [Authenticate("", "", self.vhost, as_gateway=True)]

    def _check(self, command: str, destination: str, needs: Iterable[Need]) -> None:
        """Raise ``access_refused`` naming the destination and the first permission the scopes lack."""
        scopes = self.scopes
        if scopes is None:
            return
        missing = scopes.missing(self.vhost, needs)
        if missing is not None:
            who = "the token" if self.token is not None else "an anonymous session"
            raise ProtocolError(
                "access_refused",
                f"{command} to '{destination}' needs {missing.describe(self.vhost)}, which {who} does not grant\n",
            )

    def _expiry(self) -> list[Action]:
        if self.token is None or self.settings.tokens is None:
            return []
        return [ExpireAt(self.token.expires_at + self.settings.tokens.leeway)]

    def authenticated(self) -> list[Action]:
        """The broker accepted the credentials: switch the parser to the negotiated version and the
        full frame-size limit, and answer CONNECTED (nothing if the session closed meanwhile)."""
        if self.state is not State.AUTHENTICATING:
            return []
        self.state = State.CONNECTED
        self.parser.version = self.version
        self.parser.authenticated = True
        send_every, expect_every = self.heartbeat
        connected = Frame(
            "CONNECTED",
            (
                ("version", self.version),
                ("session", self.id),
                ("server", self.settings.server_name),
                ("heart-beat", f"{send_every},{expect_every}"),
            ),
        )
        return [Connected(self.version, send_every, expect_every), *self._expiry(), SendFrame(connected)]

    # -- outcomes the connection layer observes ----------------------------------------------------------

    def broker_failed(self, error: BrokerError, receipt: Frame | None = None) -> list[Action]:
        """A broker operation failed (or the session's broker channel closed): report it with RabbitMQ's
        wording and close."""
        receipt_id = receipt.get("receipt-id") if receipt is not None else None
        if isinstance(error, AccessRefused) and self.scopes is not None:
            # the gateway's own login: its user name is nobody else's business
            detail = "The gateway's own login to the message broker was refused; see the gateway's log\n"
            return self.fail(ProtocolError("Bad CONNECT", detail, receipt_id=receipt_id))
        if isinstance(error, AccessRefused | VhostNotFound):
            return self.fail(ProtocolError("Bad CONNECT", error.text, receipt_id=receipt_id))
        if isinstance(error, FrameTooLarge):
            # RabbitMQ's wording for headers it cannot carry; the gateway refuses them before the broker
            # would close the (shared) connection over them.
            return self.fail(ProtocolError("Invalid header", f"Headers too large: {error.text}\n", receipt_id=receipt_id))
        return self.fail(ProtocolError(error.name, error.text, receipt_id=receipt_id))

    def broker_lost(self, error: BrokerError) -> list[Action]:
        """The AMQP connection under this session went away (``error``, a :class:`BrokerUnavailable`): move
        the session to another node (:class:`Reattach`) when that loses nothing, else ERROR naming what would
        be lost, and close (what RabbitMQ's Web-STOMP does to every session)."""
        if self.state is State.CLOSED:
            return []
        if self.state is not State.CONNECTED:
            return self.broker_failed(error)
        obstacle = self.reattach_obstacle()
        if obstacle is None:
            return [Reattach(error)]
        return self.fail(
            ProtocolError(error.name, f"{error.text}\nThe session could not move to another node: {obstacle}.\n")
        )

    def reattach_obstacle(self) -> str | None:
        """What a move to another broker node would lose, or None: unacknowledged messages (they go back
        to their queue, and the client could no longer ACK them), an open transaction, a queue that lived
        only as long as the AMQP connection (exclusive, or a ``/temp-queue``, whose name the client gave away)."""
        if self.transactions:
            return f"transaction '{next(iter(self.transactions))}' is open"
        for subscription in self.subscriptions.values():
            name = subscription.id if subscription.id is not None else subscription.destination.raw
            if subscription.pending:
                return (
                    f"subscription '{name}' holds {len(subscription.pending)} unacknowledged message(s), "
                    "which go back to their queue"
                )
            declaration = subscription.plan.declaration
            if declaration is not None and declaration.exclusive and subscription.plan.exchange is None:
                return f"subscription '{name}' consumes the exclusive queue '{declaration.name}', which was deleted"
        if self.temp_queues:
            return f"the temporary queue behind '{next(iter(self.temp_queues))}' was deleted"
        if self._exclusive_sends:
            return f"the exclusive queue '{next(iter(self._exclusive_sends))}' was deleted"
        return None

    def publish_confirmed(self, receipt: Frame | None) -> list[Action]:
        """The broker confirmed a publish: its RECEIPT (if it asked for one) may go out now."""
        if receipt is None or self.state is State.CLOSED:
            return []
        return [SendFrame(receipt)]

    def publish_failed(self, error: BrokerError, receipt: Frame | None) -> list[Action]:
        """A publish was refused: ``basic.nack`` (``PublishNacked``) or a broker error."""
        if self.state is State.CLOSED:
            return []
        if isinstance(error, PublishNacked):
            receipt_id = receipt.get("receipt-id") if receipt is not None else None
            detail = "The broker did not accept a message (basic.nack)"
            if receipt_id is not None:
                detail += f" sent with receipt '{receipt_id}'"
            return self.fail(ProtocolError("Message rejected", detail + "\n", receipt_id=receipt_id))
        return self.broker_failed(error, receipt)

    def slow_consumer(self, limit: int) -> list[Action]:
        """The client fell more than ``limit`` bytes behind the message it is receiving."""
        return self._fail_if_open(
            ProtocolError(
                "Slow consumer",
                f"The client fell more than {limit} bytes behind the message it is receiving (setting "
                "--max-outbound-buffer); "
                "unacknowledged messages go back to their queues.\n",
            )
        )

    def login_timed_out(self, seconds: float) -> list[Action]:
        """The login timer ran out: an error unless CONNECT succeeded in time."""
        if self.state not in (State.CONNECTING, State.AUTHENTICATING):
            return []
        return self.fail(
            ProtocolError(
                "Login timeout",
                f"No successful CONNECT within {seconds:g} s (setting --login-timeout)\n",
            )
        )

    def heartbeat_timed_out(self) -> list[Action]:
        """Nothing came from the client for two of the heart-beat intervals it promised."""
        expect_every = self.heartbeat[1]
        return self._fail_if_open(
            ProtocolError(
                "Heart-beat timeout",
                f"Nothing received for {2 * expect_every} ms (two heart-beat intervals)\n",
            )
        )

    def token_expired(self, now: float) -> list[Action]:
        """The deadline of the last :class:`ExpireAt` came (``now``: seconds since the epoch): ERROR and close."""
        if self.token is None or self.state is State.CLOSED:
            return []
        deadline = self.token.expires_at + (self.settings.tokens.leeway if self.settings.tokens else 0.0)
        if now < deadline - 0.001:
            return self._expiry()  # a timer armed for an earlier token: wait for this one's
        return self.fail(
            ProtocolError(
                "Token expired",
                "The session's token expired; CONNECT again with a new one (or, before it expires, SEND a new "
                f"token to {TOKEN_DESTINATION})\n",
            )
        )

    def internal_error(self) -> list[Action]:
        """The gateway failed while handling this session (the log has the traceback)."""
        return self._fail_if_open(ProtocolError("Internal error", "The gateway failed; see its log.\n"))

    def consumer_cancelled(self, subscription: Subscription) -> list[Action]:
        """The broker cancelled the consumer of ``subscription``: its queue was deleted, or lived on a node
        that left the cluster. RabbitMQ's STOMP plugin sends an ERROR and keeps the connection open, a
        subscription that silently receives nothing more (rabbitmq-server #2410); here the ERROR names the
        subscription and the session ends, so the client reconnects and subscribes again."""
        headers: tuple[tuple[str, str], ...] = ()
        if subscription.id is not None:
            headers = (("subscription", subscription.id),)
        what = subscription.destination.raw or subscription.key
        return self._fail_if_open(
            ProtocolError(
                "Subscription cancelled",
                f"The broker cancelled the subscription to {what}: its queue was deleted, or its node left "
                "the cluster. Subscribe again to go on.\n",
                headers=headers,
            )
        )

    def connection_lost(self) -> None:
        """The connection is gone (or closing): nothing more is accepted or delivered."""
        self.state = State.CLOSED
        self.transactions.clear()

    # -- SEND ---------------------------------------------------------------------------------------

    def _on_send(self, frame: Frame) -> list[Action]:
        raw = frame.get("destination")
        if raw is None:
            raise ProtocolError("Missing destination", "\"SEND\" must include a 'destination' header\n")
        if raw == TOKEN_DESTINATION and self.settings.tokens is not None:
            return self._refresh(frame)
        route = _cached_send_route if len(raw) <= 256 else _send_route
        destination, exchange, routing_key = route(raw, self.settings.topic_exchange)
        reply_to = frame.get("reply-to")
        temp_reply = reply_to is not None and reply_to.startswith("/temp-queue/")
        if self.scopes is not None:
            self._check("SEND", raw, send_needs(destination, self.settings.topic_exchange, temp_reply=temp_reply))
        temp_queue = None
        reply_subscription = None
        if reply_to is not None and reply_to.startswith("/temp-queue/"):
            temp_queue = reply_to
            reply_subscription = self.temp_queues.get(reply_to)
            if reply_subscription is None:
                reply_subscription = self._temp_queue(reply_to)
        properties = properties_from_send(frame.headers)
        declare = None
        if destination.kind == QUEUE:
            declare = self._with_queue_type(send_declaration(destination, dict(self._first_headers(frame))))
            if declare is not None and declare.exclusive:
                self._exclusive_sends[declare.name] = None
        return [
            Publish(
                exchange,
                routing_key,
                frame.body,
                properties,
                declare,
                temp_queue,
                _receipt(frame),
                reply_subscription=reply_subscription,
            )
        ]

    def _refresh(self, frame: Frame) -> list[Action]:
        """A SEND to :data:`TOKEN_DESTINATION`: its body is a new token for the same ``sub``. It replaces the
        token and the scopes; the subscriptions the new scopes no longer allow end, each with an ERROR
        naming it (the session stays open); the RECEIPT, if asked, comes last."""
        policy = self.settings.tokens
        assert policy is not None
        if self.token is None or policy.verifier is None:
            raise ProtocolError(
                "access_refused", "Only a session opened with a token can refresh it; CONNECT with a token\n"
            )
        try:
            token = policy.verifier.verify(frame.body.decode("utf-8", "replace").strip())
        except TokenRejected as rejected:
            raise ProtocolError("access_refused", f"Token refresh refused: {rejected}\n") from None
        if token.subject is None or token.subject != self.token.subject:
            raise ProtocolError(
                "access_refused", "Token refresh refused: the new token is for another subject (sub)\n"
            )
        self.token = token
        self.scopes = token.scopes
        actions: list[Action] = [*self._expiry()]
        for key, subscription in list(self.subscriptions.items()):
            missing = token.scopes.missing(self.vhost, subscription.needs)
            if missing is None:
                continue
            del self.subscriptions[key]
            for ack_id in subscription.pending:
                self._ack_index.pop(ack_id, None)
            raw = subscription.destination.raw
            named = (("subscription", subscription.id),) if subscription.id is not None else ()
            ended = ProtocolError(
                "access_refused",
                f"Subscription to '{raw}' ended: it needs {missing.describe(self.vhost)}, which the refreshed "
                "token does not grant\n",
                headers=(*named, ("destination", raw)),
            )
            actions += [Unsubscribe(subscription, None, None), SendFrame(ended.to_frame())]
        receipt = _receipt(frame)
        if receipt is not None:
            actions.append(SendFrame(receipt))
        return actions

    def _temp_queue(self, name: str) -> Subscription:
        """The consumer of the reply queue behind ``/temp-queue/...`` ``name``: its MESSAGEs carry
        ``subscription:<name>`` and need no ACK."""
        _check_consumer_tag("T_" + name)
        self._check_subscription_room()
        subscription = Subscription(
            key=name,
            id=name,
            destination=Destination(TEMP_QUEUE, name[len("/temp-queue/") :], raw=name),
            ack="auto",
            plan=temp_queue_plan(),
            prefetch_count=None,
            consumer_tag="T_" + name,
        )
        self.temp_queues[name] = subscription
        return subscription

    @staticmethod
    def _first_headers(frame: Frame) -> Iterable[tuple[str, str]]:
        # dict() keeps the last duplicate; STOMP says the first wins.
        return reversed(frame.headers)

    # -- SUBSCRIBE / UNSUBSCRIBE ------------------------------------------------------------------------

    def _on_subscribe(self, frame: Frame) -> list[Action]:
        raw = frame.get("destination")
        if raw is None:
            raise ProtocolError("Missing destination", "\"SUBSCRIBE\" must include a 'destination' header\n")
        sub_id = frame.get("id")
        if sub_id is not None and sub_id.startswith("/temp-queue/"):
            raise ProtocolError(
                "Invalid header", f"Subscription id '{sub_id}' may not start with '/temp-queue/'\n"
            )
        # Keyed by consumer tag, as RabbitMQ does: an id "Q_/queue/a" and an id-less /queue/a differ.
        key = "T_" + sub_id if sub_id is not None else "Q_" + raw
        if key in self.subscriptions:
            raise ProtocolError(
                "Duplicated subscription identifier", f"A subscription identified by '{key}' already exists."
            )
        _check_consumer_tag(key)
        self._check_subscription_room()
        ack = frame.get("ack", "auto") or "auto"
        if ack not in ACK_MODES:
            raise ProtocolError(
                "Invalid header", f"'ack' must be auto, client or client-individual, got {ack!r}\n"
            )
        headers = dict(self._first_headers(frame))
        destination = parse_destination(raw)
        plan = subscription_plan(destination, headers, sub_id, self.settings.topic_exchange)
        if destination.kind == QUEUE:
            plan = dataclasses.replace(plan, declaration=self._with_queue_type(plan.declaration))
        needs = tuple(subscribe_needs(destination, plan, headers, self.settings.topic_exchange))
        self._check("SUBSCRIBE", raw, needs)
        prefetch = headers.get("prefetch-count")
        prefetch_count = None
        if prefetch is not None:
            try:
                prefetch_count = _uint(prefetch)
            except ValueError:
                prefetch_count = -1
            if prefetch_count < 0 or prefetch_count > 65535:
                raise ProtocolError(
                    "Invalid header", f"'prefetch-count' must be an integer 0..65535, got {prefetch!r}\n"
                )
        consumer_arguments: dict[str, object] = {}
        if "x-priority" in headers:
            try:
                priority = headers["x-priority"]
                consumer_arguments["x-priority"] = _int(priority)
            except ValueError:
                raise ProtocolError(
                    "Invalid header", f"'x-priority' must be an integer, got {headers['x-priority']!r}\n"
                ) from None
        continuity = self._continuity_request(headers, destination, plan, ack)
        gateway_acks = False
        stream = "x-stream-offset" in headers or headers.get("x-queue-type") == "stream"
        if stream and destination.kind in (QUEUE, AMQQUEUE):
            if "x-stream-offset" in headers:
                consumer_arguments["x-stream-offset"] = _stream_offset(headers["x-stream-offset"])
            if ack == "auto":
                gateway_acks = True
                if prefetch_count is None or prefetch_count == 0:
                    prefetch_count = self.settings.stream_prefetch
        if not self.settings.shared_fanout and continuity is None:
            plan = SubscriptionPlan(
                plan.declaration,
                plan.queue,
                plan.exchange,
                plan.binding_key,
                plan.durable_subscription,
                False,
            )
        subscription = Subscription(
            key=key,
            id=sub_id,
            destination=destination,
            ack=ack,
            plan=plan,
            prefetch_count=prefetch_count,
            consumer_tag=key,
            consumer_arguments=consumer_arguments,
            continuity=continuity,
            gateway_acks=gateway_acks,
            needs=needs,
        )
        self.subscriptions[key] = subscription
        return [Subscribe(subscription, _receipt(frame))]

    def _continuity_request(
        self, headers: dict[str, str], destination: Destination, plan: SubscriptionPlan, ack: str
    ) -> ContinuityRequest | None:
        """``x-last-value``, ``x-recover-from`` and ``x-conflate`` checked, or None if none is given. They
        apply to what a shared binding serves: an ``ack:auto``, non-durable ``/exchange`` or ``/topic``
        subscription without a queue name or queue arguments."""
        last_text = headers.get("x-last-value")
        recover_text = headers.get("x-recover-from")
        conflate_text = headers.get("x-conflate")
        if last_text is None and recover_text is None and conflate_text is None:
            return None
        if destination.kind not in (EXCHANGE, TOPIC) or not plan.shareable or ack != "auto":
            raise ProtocolError(
                "Invalid header",
                "'x-last-value', 'x-recover-from' and 'x-conflate' apply to ack:auto subscriptions to /exchange "
                "or /topic without durable, x-queue-name or queue arguments\n",
            )
        last_value = False
        if last_text is not None:
            parsed = parse_bool(last_text)
            if parsed is None:
                raise ProtocolError("Invalid header", f"'x-last-value' must be true or false, got {last_text!r}\n")
            last_value = parsed
        recover_from = None
        if recover_text is not None:
            try:
                recover_from = parse_position(recover_text)
            except ValueError:
                raise ProtocolError(
                    "Invalid header",
                    f"'x-recover-from' must be <epoch>:<offset> as in a MESSAGE's x-recovery-position, got "
                    f"{recover_text!r}\n",
                ) from None
        conflate_ms = None
        if conflate_text is not None:
            longest = int(self.settings.max_conflate_interval * 1000)
            try:
                conflate_ms = _uint(conflate_text)
            except ValueError:
                conflate_ms = 0
            if not 1 <= conflate_ms <= longest:
                raise ProtocolError(
                    "Invalid header",
                    f"'x-conflate' must be an interval of 1..{longest} ms (setting --max-conflate-interval), "
                    f"got {conflate_text!r}\n",
                )
        return ContinuityRequest(last_value, recover_from, conflate_ms)

    def subscription_receipt(self, receipt: Frame | None, hand_over: HandOver) -> Frame | None:
        """A SUBSCRIBE's RECEIPT once its subscription joined its binding: ``x-recovered`` says whether the
        messages after its ``x-recover-from`` position came first (false: live messages only, the position
        is no longer covered), ``x-last-value`` whether the retained messages did (false: the exchange is
        not retained by this gateway)."""
        if receipt is None:
            return None
        extra = []
        if hand_over.recovered is not None:
            extra.append(("x-recovered", "true" if hand_over.recovered else "false"))
        if hand_over.last_value is not None:
            extra.append(("x-last-value", "true" if hand_over.last_value else "false"))
        if not extra:
            return receipt
        return Frame(receipt.command, (*receipt.headers, *extra), receipt.body)
    def _with_queue_type(self, declaration: QueueDeclaration | None) -> QueueDeclaration | None:
        """A ``/queue`` declaration with the ``--queue-type`` default, when it names no ``x-queue-type`` and a
        queue of that type can be what it asks for (quorum queues are durable, never exclusive or auto-delete)."""
        queue_type = self.settings.queue_type
        if (
            declaration is None
            or queue_type == "classic"
            or "x-queue-type" in declaration.arguments
            or not declaration.durable
            or declaration.exclusive
            or declaration.auto_delete
        ):
            return declaration
        return dataclasses.replace(declaration, arguments={**declaration.arguments, "x-queue-type": queue_type})

    def _check_subscription_room(self) -> None:
        if len(self.subscriptions) + len(self.temp_queues) >= self.settings.max_subscriptions:
            raise ProtocolError(
                "Too many subscriptions",
                f"A session may hold at most {self.settings.max_subscriptions} subscriptions, temporary "
                "reply queues included (setting --max-subscriptions)\n",
            )

    def _on_unsubscribe(self, frame: Frame) -> list[Action]:
        sub_id = frame.get("id")
        raw = frame.get("destination")
        if sub_id is None and raw is None:
            raise ProtocolError(
                "Missing destination or id", "UNSUBSCRIBE must include a 'destination' or 'id' header"
            )
        key = "T_" + sub_id if sub_id is not None else "Q_" + (raw or "")
        subscription = self.subscriptions.pop(key, None)
        if subscription is None:
            what = f"id='{sub_id}'" if sub_id is not None else f"destination='{raw}'"
            raise ProtocolError(
                "No subscription found",
                f'UNSUBSCRIBE must refer to an existing subscription.\nSubscription to "{what}" not found.\n',
            )
        for ack_id in subscription.pending:
            self._ack_index.pop(ack_id, None)
        delete_queue = None
        if sub_id is not None:
            delete_queue = durable_unsubscribe_queue(
                subscription.destination, dict(self._first_headers(frame)), sub_id
            )
            self._check("UNSUBSCRIBE", subscription.destination.raw, unsubscribe_needs(delete_queue))
        return [Unsubscribe(subscription, delete_queue, _receipt(frame))]

    # -- ACK / NACK -----------------------------------------------------------------------------------

    def _on_ack(self, frame: Frame) -> list[Action]:
        return self._acknowledge(frame, nack=False)

    def _on_nack(self, frame: Frame) -> list[Action]:
        return self._acknowledge(frame, nack=True)

    def _acknowledge(self, frame: Frame, *, nack: bool) -> list[Action]:
        header = "id" if self.version == "1.2" else "message-id"
        ack_id = frame.get(header)
        if ack_id is None:
            raise ProtocolError("Missing header", f'"{frame.command}" must include the "{header}" header\n')
        key = self._ack_index.get(ack_id)
        subscription = self.subscriptions.get(key) if key is not None else None
        if subscription is None or ack_id not in subscription.pending:
            raise ProtocolError(
                "Invalid header", f'"{frame.command}" must include a valid "{header}" header\n'
            )
        if subscription.ack == "client":
            # Cumulative: this message and every earlier one of the same subscription.
            tags = []
            for pending_id in list(subscription.pending):
                tags.append(subscription.pending.pop(pending_id))
                self._ack_index.pop(pending_id, None)
                if pending_id == ack_id:
                    break
        else:
            tags = [subscription.pending.pop(ack_id)]
            self._ack_index.pop(ack_id, None)
        # RabbitMQ's boolean header: true/false, or the True/False of Python clients; anything else (or
        # none) is the default, which is to requeue (stomp.default_nack_requeue).
        requeue = parse_bool(frame.get("requeue"))
        if requeue is None:
            requeue = True
        return [Ack(subscription, tuple(tags), nack, requeue, _receipt(frame))]

    # -- transactions -----------------------------------------------------------------------------------

    def _transaction_id(self, frame: Frame) -> str:
        transaction = frame.get("transaction")
        if transaction is None:
            raise ProtocolError(
                "Missing transaction", f"\"{frame.command}\" must include a 'transaction' header\n"
            )
        return transaction

    def _on_begin(self, frame: Frame) -> list[Action]:
        transaction = self._transaction_id(frame)
        if transaction in self.transactions:
            raise ProtocolError("Bad transaction", f'Transaction "{transaction}" has already begun\n')
        if len(self.transactions) >= self.settings.max_transactions:
            raise ProtocolError(
                "Too many transactions",
                f"A session may hold at most {self.settings.max_transactions} open transactions "
                "(setting --max-transactions)\n",
            )
        self.transactions[transaction] = []
        return self._receipt_only(frame)

    def _buffer(self, transaction: str, frame: Frame) -> list[Action]:
        buffered = self.transactions.get(transaction)
        if buffered is None:
            raise ProtocolError("Bad transaction", f'Invalid transaction identifier: "{transaction}"\n')
        size = len(frame.body)
        if self._transaction_bytes + size > self.settings.max_transaction_bytes:
            raise ProtocolError(
                "Transaction too large",
                f"Open transactions may buffer at most {self.settings.max_transaction_bytes} bytes of bodies "
                "(setting --max-transaction-bytes)\n",
            )
        if len(buffered) >= self.settings.max_transaction_frames:
            raise ProtocolError(
                "Transaction too large",
                f"A transaction may buffer at most {self.settings.max_transaction_frames} frames "
                "(setting --max-transaction-frames)\n",
            )
        # Validate now, so that a bad frame fails where the client sent it, not at COMMIT.
        if frame.command == "SEND":
            raw = frame.get("destination")
            if raw is None:
                raise ProtocolError("Missing destination", "\"SEND\" must include a 'destination' header\n")
            if raw == TOKEN_DESTINATION and self.settings.tokens is not None:
                raise ProtocolError("Invalid destination", f"'{raw}' is not valid in a transaction\n")
            check_send_destination(parse_destination(raw))
            reply_to = frame.get("reply-to")
            temp_reply = reply_to is not None and reply_to.startswith("/temp-queue/")
            self._check(
                "SEND",
                raw,
                send_needs(parse_destination(raw), self.settings.topic_exchange, temp_reply=temp_reply),
            )
            properties_from_send(frame.headers)
            send_declaration(parse_destination(raw), dict(self._first_headers(frame)))
        # The frame keeps its ``receipt``: the RECEIPT promises the frame took effect, so it is sent when
        # the transaction commits (for a SEND, after the broker's confirm), never for an aborted one.
        buffered.append(
            Frame(frame.command, tuple((k, v) for k, v in frame.headers if k != "transaction"), frame.body)
        )
        self._transaction_bytes += size
        return []

    def _release(self, buffered: list[Frame]) -> None:
        self._transaction_bytes -= sum(len(held.body) for held in buffered)

    def _on_commit(self, frame: Frame) -> list[Action]:
        transaction = self._transaction_id(frame)
        buffered = self.transactions.pop(transaction, None)
        if buffered is None:
            raise ProtocolError("Bad transaction", f'Invalid transaction identifier: "{transaction}"\n')
        self._release(buffered)
        actions: list[Action] = []
        for held in buffered:
            actions.extend(self._dispatch(held))
        receipt = _receipt(frame)
        if receipt is not None:
            if any(isinstance(action, Publish) for action in actions):
                # COMMIT's RECEIPT promises the transaction's messages reached the broker: wait for the
                # confirms of its publishes, as a SEND's RECEIPT does.
                actions = [dataclasses.replace(a, confirm=True) if isinstance(a, Publish) else a for a in actions]
                actions.append(Barrier(receipt))
            else:
                actions.append(SendFrame(receipt))
        return actions

    def _on_abort(self, frame: Frame) -> list[Action]:
        transaction = self._transaction_id(frame)
        buffered = self.transactions.pop(transaction, None)
        if buffered is None:
            raise ProtocolError("Bad transaction", f'Invalid transaction identifier: "{transaction}"\n')
        self._release(buffered)
        return self._receipt_only(frame)

    @staticmethod
    def _receipt_only(frame: Frame) -> list[Action]:
        receipt = _receipt(frame)
        return [SendFrame(receipt)] if receipt is not None else []

    # -- DISCONNECT -------------------------------------------------------------------------------------

    def _on_disconnect(self, frame: Frame) -> list[Action]:
        self.state = State.CLOSED
        self.transactions.clear()
        return [Disconnect(_receipt(frame))]

    # -- deliveries -------------------------------------------------------------------------------------

    def message_id(self, subscription: Subscription, delivery_tag: int) -> str:
        return f"{subscription.consumer_tag}@@{self.id}@@{delivery_tag}"

    def deliver(self, subscription: Subscription, delivery: Delivery) -> MessageTemplate:
        """Turn a delivery of this session's own consumer into a template; record what an ACK must name.

        Render it with :meth:`render`.
        """
        message_id = self.message_id(subscription, delivery.delivery_tag)
        if subscription.ack != "auto":
            subscription.pending[message_id] = delivery.delivery_tag
            self._ack_index[message_id] = subscription.key
        return MessageTemplate(
            delivery_headers(delivery, message_id, self.settings.topic_exchange), delivery.body
        )

    def render(self, subscription: Subscription, template: MessageTemplate) -> bytes:
        """The MESSAGE frame for this session; ``ack`` is added for 1.2 client ack modes."""
        ack = None
        if subscription.ack != "auto" and self.version == "1.2":
            ack = template.message_id
        return template.render(self.version, subscription.id, ack)
