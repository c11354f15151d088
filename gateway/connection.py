"""One client connection: drives its session, runs the session's actions against the broker, writes frames out.

The transport adapters (:mod:`gateway.transport.websocket`, :mod:`gateway.transport.tcp`) feed bytes in
with :meth:`StompConnection.receive_data` and call :meth:`StompConnection.connection_lost` at the end;
they give this class a :class:`Transport` to write to. Here live the timers (login timeout, heart-beats),
the bound on the outbound buffer, the per-session broker channel and the attachment to shared fan-out.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import metrics
from gateway.broker.base import (
    Broker,
    BrokerError,
    BrokerUnavailable,
    Channel,
    ChannelClosed,
    ConnectionLostWithNode,
    Delivery,
)
from gateway.continuity import Conflator, HandOver
from gateway.destinations import QueueDeclaration
from gateway.fanout import FanoutRegistry, Sink
from gateway.limits import TokenBucket
from gateway.metrics import TALLY
from gateway.settings import DEFAULTS
from gateway.stomp.frames import Frame, Limits, ProtocolError
from gateway.stomp.session import (
    Ack,
    Action,
    Authenticate,
    Barrier,
    Close,
    Connected,
    Disconnect,
    ExpireAt,
    Publish,
    Reattach,
    SendFrame,
    Session,
    SessionSettings,
    State,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from gateway.stomp.writer import MessageTemplate, is_text, serialize

__all__ = ["Backlog", "ConnectionSettings", "Handshake", "StompConnection", "Transport"]

#: Frames parsed and handled from one read before the reader lets other connections run.
YIELD_EVERY = 32
#: Seconds a session keeps trying to move to another broker node when the node it moves to is lost too, and
#: the pause between tries.
REATTACH_PATIENCE = 5.0
REATTACH_RETRY_DELAY = 0.05
#: SUBSCRIBEs of one session whose broker work runs at the same time (their RECEIPTs stay in order).
MAX_SUBSCRIBES_IN_FLIGHT = 64

logger = logging.getLogger(__name__)


class Transport(abc.ABC):
    """What a connection needs from its byte pipe."""

    #: what the metrics call this transport
    kind = "?"

    @abc.abstractmethod
    def write(self, data: bytes, text: bool) -> None:
        """Queue one serialized frame for sending (never blocks). ``text`` says the frame is valid UTF-8."""

    def write_message(self, template: MessageTemplate, version: str, subscription: str | None) -> None:
        """Write a fanned-out MESSAGE (the same template goes to every session of the group in a row;
        a transport may keep its own cache of how it framed it)."""
        self.write(template.render(version, subscription), template.is_text)

    def authenticated(self) -> None:  # noqa: B027 - only transports with their own size limits care
        """CONNECT succeeded: the transport may now accept messages up to the authenticated frame size."""

    @abc.abstractmethod
    def write_heartbeat(self) -> None:
        """Send one EOL."""

    @property
    @abc.abstractmethod
    def buffered(self) -> int:
        """Bytes written but not yet handed to the kernel."""

    @property
    def backlog(self) -> int:
        """What waits behind the write the kernel is taking now: the measure of a slow client, so that one
        message larger than the bound (up to the frame-size limit) is delivered, not taken for slowness."""
        return self.buffered

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until everything written so far has been handed to the kernel."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection after the queued data (callers bound the wait)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the connection now."""


class Backlog:
    """Where each write to an OS transport ended, so that a transport can tell what waits behind the write
    the kernel is taking now (:attr:`Transport.backlog`). ``buffered`` reads the OS transport's buffer size."""

    __slots__ = ("buffered", "ends", "head", "written")

    #: ends kept before the consumed ones are dropped (bounds the memory of a client that is slow for long)
    TRIM_AT = 64

    def __init__(self, buffered: Callable[[], int]) -> None:
        self.buffered = buffered
        self.written = 0
        # A list and the index of its oldest live entry (an empty deque is 600 bytes; a gateway holds
        # tens of thousands of these).
        self.ends: list[int] = []
        self.head = 0

    def wrote(self, size: int) -> None:
        self.written += size
        self.ends.append(self.written)
        if len(self.ends) - self.head > self.TRIM_AT:
            self.behind_head()

    def behind_head(self) -> int:
        """Bytes of the writes after the oldest one still (partly) in the buffer."""
        taken = self.written - self.buffered()
        ends = self.ends
        head = self.head
        count = len(ends)
        while head < count and ends[head] <= taken:
            head += 1
        if head == count:
            ends.clear()
            self.head = 0
            return 0
        if head > self.TRIM_AT:
            del ends[:head]
            head = 0
        self.head = head
        return self.written - ends[head]


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the transport learnt of the client before the first STOMP byte: its ``address`` (the one a
    trusted proxy named, else the socket's peer) and ``port``, and the ``token`` its upgrade request carried
    (``access_token`` query parameter, ``Authorization: Bearer`` or the ``--jwt-cookie`` cookie)."""

    address: str = "?"
    port: int | None = None
    token: str | None = None

    @property
    def peer(self) -> str:
        """``address:port`` as logs show it."""
        if self.port is None:
            return self.address
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(kw_only=True, slots=True)
class ConnectionSettings:
    """Limits and timers of the connection layer: the parser's :class:`Limits`, the session's
    :class:`SessionSettings`, and the two :class:`gateway.settings.Config` settings of the same names.

    ``derive(ConnectionSettings, config)`` builds the whole tree from a configuration; the defaults are
    the settings' own (defined once, in :mod:`gateway.settings`). ``close_timeout`` is no setting: the
    seconds a closing connection waits for its last writes and broker operations.
    """

    limits: Limits = field(default_factory=Limits)
    session: SessionSettings = field(default_factory=SessionSettings)
    login_timeout: float = DEFAULTS.login_timeout
    max_outbound_buffer: int = DEFAULTS.max_outbound_buffer
    max_conflate_interval: float = DEFAULTS.max_conflate_interval
    max_frames_per_second: float | None = DEFAULTS.max_frames_per_second
    close_timeout: float = 5.0
    #: the broker login of sessions under a token policy (the gateway's own: from --amqp-url, or the
    #: default login for the embedded broker); no setting of its own
    gateway_credentials: tuple[str, str] = (DEFAULTS.default_login, DEFAULTS.default_passcode)


class StompConnection:
    """Drives one :class:`Session` over one :class:`Transport`: feeds it the client's bytes and what the
    broker, the timers and the transport report, and runs the actions it returns. It decides nothing a
    client can see: every frame it writes comes from the session (or is a delivery the session rendered).

    Its own state is the broker side: the session's channel, the typed record of each subscription's
    attachment (:class:`_Consumer` or :class:`_Shared`), the reply queues behind ``/temp-queue`` names, the
    publishes waiting for confirms, the timers.
    """

    # Slots: a gateway holds tens of thousands of these (an instance dict would be 1.5 KiB of each).
    __slots__ = (
        "_attachments",
        "_background",
        "_bucket",
        "_channel",
        "_closing",
        "_confirming",
        "_declared",
        "_exclusive_queues",
        "_expiry",
        "_last_subscribe",
        "_login_timer",
        "_lost_again",
        "_own_channel_lock",
        "_own_subscribe_lock",
        "_pending",
        "_principal",
        "_reattaching",
        "_receiving",
        "_reply_queues",
        "_republish",
        "_session_gauge",
        "_subscribing",
        "_tasks",
        "broker",
        "close_reason",
        "debug",
        "ended",
        "frames_in",
        "frames_out",
        "handshake",
        "last_received",
        "last_sent",
        "loop",
        "messages_out",
        "peer",
        "registry",
        "session",
        "settings",
        "started",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        broker: Broker,
        registry: FanoutRegistry,
        settings: ConnectionSettings,
        *,
        peer: str = "?",
        handshake: Handshake | None = None,
    ) -> None:
        self.transport = transport
        self.broker = broker
        self.registry = registry
        self.settings = settings
        self.handshake = handshake or Handshake(peer)
        self.peer = self.handshake.peer if handshake is not None else peer
        self.session = Session(settings.session, limits=settings.limits, token=self.handshake.token)
        self.loop = asyncio.get_running_loop()
        self.last_received = self.last_sent = self.loop.time()
        #: the cleanup ran: the connection is over
        self.ended = False
        self.debug = logger.isEnabledFor(logging.DEBUG)
        self.started = self.loop.time()
        #: what the session-end log line reports
        self.frames_in = 0
        self.frames_out = 0  # frames other than MESSAGE
        self.messages_out = 0
        self.close_reason = "open"
        self._session_gauge = metrics.SESSIONS.labels("connecting", "")
        self._session_gauge.inc()
        self._closing = False
        self._principal: Any = None
        self._channel: Channel | None = None
        # Dicts used as ordered sets: an empty set is 216 bytes, an empty dict 64, and most connections
        # never use most of these.
        self._declared: dict[str, None] = {}
        self._exclusive_queues: dict[str, None] = {}
        self._receiving = False
        self._confirming = False
        #: id(subscription) -> how its broker side is attached (the attachment keeps the subscription alive)
        self._attachments: dict[int, _Consumer | _Shared] = {}
        #: ``/temp-queue/...`` name -> the broker's name of its reply queue (on the current channel)
        self._reply_queues: dict[str, str] = {}
        self._subscribing: dict[asyncio.Future[None], None] = {}
        self._last_subscribe: asyncio.Future[None] | None = None
        self._own_subscribe_lock = asyncio.Lock()
        self._own_channel_lock = asyncio.Lock()
        self._pending: dict[asyncio.Future[None], None] = {}
        self._background: dict[asyncio.Future[Any], None] = {}
        self._expiry: asyncio.TimerHandle | None = None
        rate = settings.max_frames_per_second
        self._bucket = TokenBucket(rate, max(rate, 1.0)) if rate else None
        self._login_timer: asyncio.TimerHandle | None = self.loop.call_later(
            settings.login_timeout, self._login_timed_out
        )
        self._tasks: list[asyncio.Task[None]] = []
        #: set while the session moves to another broker node (:meth:`_reattach`); ``_lost_again``: another
        #: attachment was lost meanwhile; ``_republish``: publishes whose confirm went with the connection
        self._reattaching: asyncio.Future[None] | None = None
        self._lost_again = False
        self._republish: list[tuple[Publish, asyncio.Future[None]]] = []

    # -- input ------------------------------------------------------------------------------------------

    async def receive_data(self, data: bytes) -> None:
        """Hand bytes from the client to the session and handle the frames they complete, in order.

        Returns when their broker operations have been started (publishes are not awaited: confirms
        run in the background), so the transport reads no further while the broker is behind.
        """
        if self._closing:
            return
        self.last_received = self.loop.time()
        TALLY.bytes_received += len(data)
        session = self.session
        session.receive_data(data)
        self._receiving = True  # the client is not silent while its frames wait for the broker
        handled = 0
        try:
            while not self._closing:
                try:
                    frame = session.next_frame()
                except ProtocolError as error:  # after the good frames before the bad input
                    await self._run(session.fail(error))
                    return
                if frame is None:
                    return
                if handled == YIELD_EVERY:
                    # One client's burst (thousands of frames in one message) is handled a slice at a
                    # time, and other connections run in between. A message of a few frames costs no extra
                    # pass of the event loop: that would split the deliveries it causes into more, smaller
                    # writes to every subscriber.
                    handled = 0
                    await asyncio.sleep(0)
                    if self._closing:
                        return
                handled += 1
                if self._bucket is not None:
                    await self._pace()
                    if self._closing:
                        return
                self.frames_in += 1
                TALLY.frames_received[frame.command] += 1
                if self.debug:
                    logger.debug("%s > %s %s", self.peer, frame.command, frame.headers)
                actions = session.receive_frame(frame)
                if len(actions) == 1 and not self._subscribing:
                    # The common SEND, handed over without the two awaits of _run and _publish.
                    action = actions[0]
                    if type(action) is Publish and self._publish_now(action):
                        channel = self._channel
                        if channel is not None and channel.held_back:
                            await channel.drain()
                        continue
                await self._run(actions)
        except Exception:
            logger.exception("session %s failed", session.id)
            await self._run(session.internal_error())
        finally:
            self._receiving = False
            self.last_received = self.loop.time()

    def client_alive(self) -> None:
        """Something arrived from the client below STOMP (a WebSocket pong, any read): it is alive, whatever
        its STOMP heart-beats (a background tab's timers may be throttled to once a minute)."""
        self.last_received = self.loop.time()
    async def _pace(self) -> None:
        """Wait for the frame rate limit: the transport reads nothing more meanwhile (nothing is dropped)."""
        assert self._bucket is not None
        delay = self._bucket.take(self.loop.time())
        if delay > 0:
            metrics.FRAME_RATE_PAUSES.inc()
            metrics.FRAME_RATE_PAUSED.inc(delay)
            await asyncio.sleep(delay)

    async def connection_lost(self) -> None:
        """The client went away (or we closed): release everything."""
        if self.close_reason == "open":
            self.close_reason = "connection closed by the client"
        if not self._closing:
            self._closing = True
            self.session.connection_lost()
        await self._cleanup()

    # -- processing -------------------------------------------------------------------------------------

    async def _run(self, actions: list[Action], *, in_order: bool = True) -> None:
        """Run ``actions``. SUBSCRIBEs start at once and overlap (their broker round trips are most of their
        cost); any other action first waits until those before it are done and receipted, so the client
        sees everything in the order it asked (``in_order=False`` only from a SUBSCRIBE's own task)."""
        for action in actions:
            if isinstance(action, Subscribe):
                await self._start_subscribe(action)
                continue
            if in_order and self._subscribing:
                await self._subscribes_done()
                if self._closing:
                    return
            if isinstance(action, SendFrame):
                self.send_frame(action.frame)
            elif isinstance(action, Publish):
                await self._publish(action)
            elif isinstance(action, Ack):
                self._ack(action)
            elif isinstance(action, Unsubscribe):
                await self._unsubscribe(action)
            elif isinstance(action, Authenticate):
                await self._authenticate(action)
            elif isinstance(action, Connected):
                self._connected(action)
            elif isinstance(action, ExpireAt):
                self._arm_expiry(action.deadline)
            elif isinstance(action, Barrier):
                self._spawn(self._barrier(action.receipt, list(self._pending)))
            elif isinstance(action, Disconnect):
                await self._disconnect(action)
            elif isinstance(action, Close):
                await self._close(action.error)
            elif isinstance(action, Reattach):
                await self._reattach(action)
            if self._closing:
                return

    def _react(self, actions: list[Action]) -> None:
        """Run the session's answer to an outcome observed in a callback: frames go out now, anything else
        (a close) in the background, in order behind earlier actions."""
        if all(type(action) is SendFrame for action in actions):
            for action in actions:
                self.send_frame(action.frame)  # type: ignore[union-attr]
        else:
            self._spawn(self._run(actions))

    async def _fail(self, error: BrokerError, receipt: Frame | None = None, *, in_order: bool = True) -> None:
        await self._run(self.session.broker_failed(error, receipt), in_order=in_order)

    # -- output -----------------------------------------------------------------------------------------

    def send_frame(self, frame: Frame) -> None:
        self.frames_out += 1
        TALLY.frames_sent[frame.command] += 1
        data = serialize(frame, self.session.version)
        self._write(data, is_text(data))

    def _write(self, data: bytes, text: bool) -> None:
        if self._closing:
            return
        self.transport.write(data, text)
        self.last_sent = self.loop.time()
        limit = self.settings.max_outbound_buffer
        if self.transport.buffered > limit and self.transport.backlog > limit:
            self._slow_client()

    def _slow_client(self) -> None:
        actions = self.session.slow_consumer(self.settings.max_outbound_buffer)
        if not actions:
            return  # already on its way out
        metrics.SLOW_CLIENTS.inc()
        logger.warning(
            "%s: disconnecting slow client (%d bytes buffered)", self.peer, self.transport.buffered
        )
        self._spawn(self._run(actions))

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._background[task] = None
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.pop(task, None)

    def _subscribe_done(self, task: asyncio.Future[None]) -> None:
        self._subscribing.pop(task, None)
        if self._last_subscribe is task:
            self._last_subscribe = None  # nothing to wait for: no need to keep the task

    # -- timers -----------------------------------------------------------------------------------------

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if not self._closing:
            self._spawn(self._run(self.session.login_timed_out(self.settings.login_timeout)))

    def _arm_expiry(self, deadline: float) -> None:
        """Tell the session when its token's deadline (wall-clock seconds) comes; a later deadline replaces it."""
        if self._expiry is not None:
            self._expiry.cancel()
            metrics.TOKEN_REFRESHES.inc()  # the first deadline comes with CONNECTED, later ones with refreshes
        self._expiry = self.loop.call_later(max(0.0, deadline - time.time()), self._token_expired)

    def _token_expired(self) -> None:
        if self._closing:
            return
        actions = self.session.token_expired(time.time())
        if any(isinstance(action, Close) for action in actions):
            metrics.TOKENS_EXPIRED.inc()
        self._spawn(self._run(actions))

    async def _heartbeats(self, send_every: int, expect_every: int) -> None:
        intervals = [i for i in (send_every, expect_every) if i]
        tick = min(intervals) / 2000
        while not self._closing:
            await asyncio.sleep(tick)
            now = self.loop.time()
            if send_every and now - self.last_sent >= send_every / 1000 - tick / 2:
                self.transport.write_heartbeat()
                self.last_sent = now
            if expect_every and not self._receiving and now - self.last_received > 2 * expect_every / 1000:
                await self._run(self.session.heartbeat_timed_out())
                return

    # -- CONNECT ----------------------------------------------------------------------------------------

    async def _authenticate(self, action: Authenticate) -> None:
        login, passcode = action.login, action.passcode
        if action.as_gateway:
            login, passcode = self.settings.gateway_credentials
        try:
            self._principal = await self.broker.authenticate(login, passcode, action.vhost)
        except BrokerError as error:
            metrics.LOGIN_FAILURES.inc()
            await self._fail(error)
            return
        if not self._closing:
            await self._run(self.session.authenticated())

    def _connected(self, action: Connected) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self.transport.authenticated()
        self._session_gauge.dec()
        self._session_gauge = metrics.SESSIONS.labels("connected", action.version)
        self._session_gauge.inc()
        if action.send_every or action.expect_every:
            self._tasks.append(asyncio.create_task(self._heartbeats(action.send_every, action.expect_every)))

    async def _own_channel(self) -> Channel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        async with self._own_channel_lock:
            if self._channel is None or not self._channel.is_open:
                channel = await self.broker.open_channel(self._principal, self.session.id)
                if self._closing:  # the session ended while the channel was opening
                    await channel.close()
                    raise ChannelClosed("session closed")
                self._channel = channel
                self._channel.on_close = self._channel_closed
                self._channel.on_cancel = self._consumer_cancelled
                self._declared.clear()
                self._reply_queues.clear()
                self._confirming = False
            return self._channel

    def _channel_closed(self, error: BrokerError) -> None:
        if not self._closing:
            self._broker_failed_or_lost(error)

    def _consumer_cancelled(self, consumer_tag: str) -> None:
        """RabbitMQ cancelled one of the session's own consumers (its queue was deleted, or lived on a node
        that left): the session says so and ends, where RabbitMQ's plugin leaves a silent subscription."""
        if self._closing:
            return
        for attachment in self._attachments.values():
            if isinstance(attachment, _Consumer) and attachment.consumer_tag == consumer_tag:
                self._react(self.session.consumer_cancelled(attachment.subscription))
                return

    def _broker_failed_or_lost(self, error: BrokerError) -> None:
        """A channel or shared subscription of this session ended: a connection lost with its node
        (:class:`ConnectionLostWithNode`) may move the session to another node, anything else ends it."""
        if not isinstance(error, ConnectionLostWithNode):
            self._react(self.session.broker_failed(error))
        elif self._reattaching is not None:  # one decision per loss, however many attachments report it
            self._lost_again = True
        else:
            actions = self.session.broker_lost(error)
            if any(isinstance(action, Reattach) for action in actions):
                self._reattaching = self.loop.create_future()
            self._spawn(self._run(actions, in_order=False))

    # -- SEND -------------------------------------------------------------------------------------------

    def _publish_now(self, action: Publish) -> bool:
        """The common SEND, with nothing to prepare (channel open, queue declared, confirms as needed): hand
        it over now, without an await, and return True; False when :meth:`_publish` must prepare it."""
        channel = self._channel
        if (
            channel is None
            or not channel.is_open
            or not (self._confirming or (action.receipt is None and not action.confirm))
            or action.temp_queue is not None
            or (action.declare is not None and action.declare.name not in self._declared)
        ):
            return False
        future = channel.start_publish(action.exchange, action.routing_key, action.body, action.properties)
        self._published(channel, action, future)
        return True

    async def _publish(self, action: Publish) -> None:
        if self._publish_now(action):
            channel = self._channel
            if channel is not None and channel.held_back:
                await channel.drain()
            return
        confirm = action.receipt is not None or action.confirm
        try:
            channel = await self._own_channel()
            future = await self._hand_over(channel, action, confirm)
        except BrokerError as error:
            if not self._moving_on(error):
                await self._fail(error, action.receipt)
                return
            future = self.loop.create_future()  # the connection went under it: again on the next node
            self._retry_publish(action, future)
            TALLY.messages_published += 1
            self._pending[future] = None
            future.add_done_callback(lambda f: self._confirmed(f, action.receipt))
            return
        self._published(channel, action, future)
        if channel.held_back:
            await channel.drain()

    def _published(self, channel: Channel, action: Publish, future: asyncio.Future[None]) -> None:
        """Bookkeeping of a publish handed to ``channel``: a confirm or a RECEIPT to wait for, or a refusal
        to report."""
        if self._confirming and not future.done():
            future = self._settled_or_retried(future, action)
        TALLY.messages_published += 1
        if not (action.receipt is None and future.done() and not future.cancelled() and future.exception() is None):
            self._pending[future] = None
            future.add_done_callback(lambda f: self._confirmed(f, action.receipt))

    async def _hand_over(self, channel: Channel, action: Publish, confirm: bool) -> asyncio.Future[None]:
        """Declare what the publish needs (once per channel), then publish; the future resolves at the
        broker's confirm once ``confirm`` turned confirms on for the channel."""
        declaration = action.declare
        if declaration is not None and declaration.name not in self._declared:
            await _declare(channel, declaration)
            self._declared[declaration.name] = None
            if declaration.exclusive:
                self._exclusive_queues[declaration.name] = None
        if action.temp_queue is not None and action.reply_subscription is not None:
            action.properties.reply_to = await self._reply_queue(channel, action.reply_subscription)
        if confirm and not self._confirming:
            await channel.enable_confirms()
            self._confirming = True
        return channel.start_publish(action.exchange, action.routing_key, action.body, action.properties)

    # -- moving to another broker node --------------------------------------------------------------------

    def _moving_on(self, error: BaseException) -> bool:
        """``error`` is the loss of a connection under the session, and the session chose to move to another
        node (:meth:`Session.broker_lost` was told of the loss first and left the session open)."""
        return isinstance(error, ConnectionLostWithNode) and not self._closing and self.session.state is State.CONNECTED

    def _settled_or_retried(self, first: asyncio.Future[None], action: Publish) -> asyncio.Future[None]:
        """A future of the publish's outcome that survives a move to another node: if the connection is
        lost before the confirm while the session moves (:meth:`_reattach`), the message is published again
        there (at least once: it may have reached the queue before the loss)."""
        outcome: asyncio.Future[None] = self.loop.create_future()
        first.add_done_callback(lambda f: self._publish_settled(f, action, outcome))
        return outcome

    def _publish_settled(self, future: asyncio.Future[None], action: Publish, outcome: asyncio.Future[None]) -> None:
        if outcome.done():  # given up (the session ended)
            if not future.cancelled():
                future.exception()
            return
        if future.cancelled():
            outcome.cancel()
            return
        error = future.exception()
        if error is None:
            outcome.set_result(None)
        elif self._moving_on(error):
            self._retry_publish(action, outcome)
        else:
            outcome.set_exception(error)

    def _retry_publish(self, action: Publish, outcome: asyncio.Future[None]) -> None:
        self._republish.append((action, outcome))
        if len(self._republish) == 1:
            self._spawn(self._republish_all())

    async def _republish_all(self) -> None:
        """Publish again, in their order, the messages whose confirm the lost connection took with it."""
        await asyncio.sleep(0)  # the other failures of the same loss join this batch
        while self._republish and not self._closing:
            batch, self._republish = self._republish, []
            for action, outcome in batch:
                try:
                    channel = await self._own_channel()
                    future = await self._hand_over(channel, action, True)
                except BrokerError as error:
                    if not outcome.done():
                        outcome.set_exception(error)
                    continue
                metrics.REPUBLISHED.inc()
                future.add_done_callback(functools.partial(self._publish_settled, action=action, outcome=outcome))
        for _action, outcome in self._republish:
            if not outcome.done():
                outcome.set_exception(ChannelClosed("session closed"))
        self._republish.clear()

    async def _reattach(self, action: Reattach) -> None:
        """Move the session's broker side to another node: a new channel with the consumers of its own
        subscriptions (their queues declared and bound again), its shared subscriptions joined again (the
        fan-out group is re-created on first use). Runs again if a connection is lost meanwhile; a failure
        ends the session as any broker failure does."""
        started = self.loop.time()
        moved = 0
        try:
            while not self._closing:
                self._lost_again = False
                try:
                    moved += await self._reattach_once()
                except ConnectionLostWithNode:
                    # The connection it was moving to went as well (a second node, or a connection that
                    # failed with the first): try the next node, for a while.
                    if self.loop.time() - started >= REATTACH_PATIENCE:
                        raise
                    self._lost_again = True
                    await asyncio.sleep(REATTACH_RETRY_DELAY)
                if not self._lost_again:
                    break
        except BrokerError as error:
            self._finish_reattach()
            logger.warning("session %s could not move to another node: %s", self.session.id, error)
            await self._fail(error, in_order=False)
            return
        self._finish_reattach()
        metrics.SESSIONS_MOVED.inc()
        logger.info(
            "session %s moved to another broker node in %.0f ms (%d subscriptions re-attached) after: %s",
            self.session.id,
            (self.loop.time() - started) * 1000,
            moved,
            action.error.detail if isinstance(action.error, BrokerUnavailable) else action.error.text,
            extra={"fields": {"session": self.session.id, "peer": self.peer}},
        )

    def _finish_reattach(self) -> None:
        done, self._reattaching = self._reattaching, None
        if done is not None and not done.done():
            done.set_result(None)

    async def _reattach_once(self) -> int:
        """Re-attach what the loss took: every own consumer if the session's channel went, every shared
        subscription whose group went. Returns how many were re-attached."""
        own_lost = self._channel is not None and not self._channel.is_open
        if own_lost:
            self._channel = None
        moved = 0
        for key, attachment in list(self._attachments.items()):
            if self._closing or self._attachments.get(key) is not attachment:
                continue
            subscription = attachment.subscription
            if isinstance(attachment, _Shared):
                if attachment.sink.group is not None:
                    continue
                plan = subscription.plan
                assert plan.exchange is not None
                hub = self.registry.hub_for(self._principal)
                await hub.attach(plan.exchange, plan.binding_key, attachment.sink)
                if self._attachments.get(key) is not attachment:  # unsubscribed meanwhile
                    await hub.detach(attachment.sink)
                    continue
            else:
                if not own_lost:
                    continue
                consumer = await self._attach(subscription)
                if consumer is None:
                    continue
                if self.session.subscriptions.get(subscription.key) is not subscription:
                    self._attachments.pop(key, None)  # unsubscribed meanwhile
                    continue
                consumer.start()
            moved += 1
        return moved

    def _confirmed(self, future: asyncio.Future[None], receipt: Frame | None) -> None:
        self._pending.pop(future, None)
        if self._closing:
            if not future.cancelled():
                future.exception()
            return
        error = future.exception() if not future.cancelled() else ChannelClosed()
        if error is None:
            self._react(self.session.publish_confirmed(receipt))
        elif isinstance(error, BrokerError):
            self._react(self.session.publish_failed(error, receipt))

    async def _reply_queue(self, channel: Channel, subscription: Subscription) -> str:
        """The broker queue behind a ``/temp-queue`` name: declared and consumed on first use."""
        queue = self._reply_queues.get(subscription.key)
        if queue is not None:
            return queue
        declaration = subscription.plan.declaration
        assert declaration is not None  # temp_queue_plan() declares a server-named queue
        queue = await _declare(channel, declaration)
        deliverer = _Deliverer(self, subscription)
        await channel.consume(queue, deliverer, no_ack=True, consumer_tag=subscription.consumer_tag)
        deliverer.start()
        self._reply_queues[subscription.key] = queue
        return queue

    # -- SUBSCRIBE / UNSUBSCRIBE ------------------------------------------------------------------------

    def _shared_sink(self, subscription: Subscription) -> tuple[Sink, Callable[[], None]]:
        """A session's end of a shared subscription, and the call that releases the messages that arrive
        before the SUBSCRIBE's RECEIPT went out (RECEIPTs of pipelined SUBSCRIBEs go out in order, so this
        one may wait for an earlier, slower one)."""
        request = subscription.continuity
        if request is not None and request.conflate_ms is not None:
            return self._conflating_sink(subscription, request.conflate_ms / 1000)
        version = self.session.version
        sub_id = subscription.id
        transport = self.transport
        loop = self.loop
        limit = self.settings.max_outbound_buffer
        held: list[MessageTemplate] | None = []

        def on_message(template: MessageTemplate) -> None:
            if self._closing:
                return
            if held is not None:
                held.append(template)
                return
            transport.write_message(template, version, sub_id)
            self.messages_out += 1
            self.last_sent = loop.time()
            if transport.buffered > limit and transport.backlog > limit:
                self._slow_client()

        def release() -> None:
            nonlocal held
            waiting, held = held, None
            for template in waiting or ():
                on_message(template)

        return Sink(on_message, self._sink_failed), release

    def _sink_failed(self, error: BrokerError) -> None:
        """A shared subscription's group ended (its channel, its consumer or its connection went): what any
        broker attachment of the session losing its broker does, moving to another node included."""
        if not self._closing:
            self._broker_failed_or_lost(error)

    def _conflating_sink(self, subscription: Subscription, interval: float) -> tuple[Sink, Callable[[], None]]:
        """A shared subscription's end that conflates (``x-conflate``): at most one message per destination
        per interval, the newest, the last of a burst sent when its interval ends. A client that lags (half
        of ``--max-outbound-buffer`` waiting) is not disconnected as slow: its interval doubles instead, up
        to ``--max-conflate-interval``, and halves back as it keeps up."""
        version = self.session.version
        sub_id = subscription.id
        transport = self.transport
        loop = self.loop
        lagging_at = self.settings.max_outbound_buffer // 2
        conflator: Conflator[MessageTemplate] = Conflator(interval, self.settings.max_conflate_interval)
        held: list[MessageTemplate] | None = []
        timer: asyncio.TimerHandle | None = None

        def write(template: MessageTemplate) -> bool:
            if transport.buffered > lagging_at and transport.backlog > lagging_at:
                return False
            transport.write_message(template, version, sub_id)
            self.messages_out += 1
            self.last_sent = loop.time()
            return True

        def schedule() -> None:
            nonlocal timer
            due = conflator.next_due()
            if due is None or (timer is not None and timer.when() <= due):
                return
            if timer is not None:
                timer.cancel()
            timer = loop.call_at(due, flush)

        def flush() -> None:
            nonlocal timer
            timer = None
            if self._closing or sink.group is None:
                return
            lagging = False
            due = conflator.take_due(loop.time())
            for key, template in due:
                if lagging or not write(template):
                    conflator.hold(key, template)
                    lagging = True
            if lagging:
                conflator.lagging()
            elif due:
                conflator.keeping_up()
            schedule()

        def on_message(template: MessageTemplate) -> None:
            if self._closing:
                return
            if held is not None:
                held.append(template)
                return
            key = template.headers[0][1]  # the destination: one per routing key
            if conflator.offer(key, template, loop.time()):
                if write(template):
                    conflator.keeping_up()
                else:
                    conflator.hold(key, template)
                    conflator.lagging()
            schedule()

        def release() -> None:
            nonlocal held
            waiting, held = held, None
            for template in waiting or ():
                on_message(template)

        sink = Sink(on_message, self._sink_failed)
        return sink, release

    async def _start_subscribe(self, action: Subscribe) -> None:
        """Start a SUBSCRIBE's broker work now; its RECEIPT follows the RECEIPTs before it."""
        if len(self._subscribing) >= MAX_SUBSCRIBES_IN_FLIGHT:
            await asyncio.wait(self._subscribing, return_when=asyncio.FIRST_COMPLETED)
        if self._closing:
            return
        task = asyncio.ensure_future(self._subscribe(action, self._last_subscribe))
        self._last_subscribe = task
        self._subscribing[task] = None
        task.add_done_callback(self._subscribe_done)

    async def _subscribes_done(self) -> None:
        while self._subscribing:
            await asyncio.wait(list(self._subscribing))

    async def _subscribe(self, action: Subscribe, previous: asyncio.Future[None] | None) -> None:
        subscription = action.subscription
        attachment: _Consumer | _Shared | None = None
        failure: BrokerError | None = None
        try:
            attachment = await self._attach(subscription)
        except BrokerError as error:
            failure = error
        if failure is not None and self._moving_on(failure):
            # the connection went under the SUBSCRIBE and the session moves: once more, on the next node
            if self._reattaching is not None:
                await asyncio.wait([self._reattaching])
            failure = None
            try:
                attachment = await self._attach(subscription)
            except BrokerError as error:
                failure = error
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # the RECEIPTs go out in the order of the SUBSCRIBEs
        if self._closing:
            return
        if failure is not None:
            await self._fail(failure, action.receipt, in_order=False)
            return
        receipt = action.receipt
        if isinstance(attachment, _Shared) and attachment.hand_over is not None:
            receipt = self.session.subscription_receipt(receipt, attachment.hand_over)
        if receipt is not None:
            self.send_frame(receipt)
        if attachment is not None:
            attachment.start()  # messages that raced the receipt go out after it

    async def _attach(self, subscription: Subscription) -> _Consumer | _Shared | None:
        """The broker side of a subscription: a shared fan-out group, or a consumer on the session's own
        channel (one at a time: the channel's prefetch setting applies to the next consumer). Recorded at
        once, so that a session ending meanwhile releases it."""
        plan = subscription.plan
        if subscription.shared and plan.exchange is not None:
            sink, release = self._shared_sink(subscription)
            hub = self.registry.hub_for(self._principal)
            hand_over = await hub.attach(plan.exchange, plan.binding_key, sink, subscription.continuity)
            if self._closing:
                await hub.detach(sink)
                return None
            shared = self._attachments[id(subscription)] = _Shared(subscription, sink, release)
            if subscription.continuity is not None:
                shared.hand_over = hand_over
            return shared
        async with self._own_subscribe_lock:
            channel = await self._own_channel()
            queue = plan.queue
            declaration = plan.declaration
            if declaration is not None:
                queue = await _declare(channel, declaration)
                if declaration.exclusive:
                    # AMQP ties exclusive queues to the (shared) connection: delete it when the
                    # session ends, or now if the bind or consume fails (as RabbitMQ's plugin does).
                    self._exclusive_queues[queue] = None
            if plan.exchange is not None:
                await channel.bind_queue(queue, plan.exchange, plan.binding_key)
            deliverer = _Deliverer(self, subscription)
            tag = await channel.consume(
                queue,
                deliverer,
                no_ack=subscription.broker_no_ack,
                prefetch_count=subscription.prefetch_count,
                consumer_tag=subscription.consumer_tag,
                arguments=subscription.consumer_arguments,
            )
            consumer = self._attachments[id(subscription)] = _Consumer(subscription, tag, deliverer)
            return consumer

    async def _unsubscribe(self, action: Unsubscribe) -> None:
        subscription = action.subscription
        attachment = self._attachments.pop(id(subscription), None)
        try:
            if isinstance(attachment, _Shared):
                await self.registry.hub_for(self._principal).detach(attachment.sink)
            elif isinstance(attachment, _Consumer) and self._channel is not None:
                attachment.deliverer.active = False  # what still arrives goes back (client modes)
                await self._channel.cancel(attachment.consumer_tag)
                for tag in subscription.pending.values():
                    self._channel.nack(tag, requeue=True)
                subscription.pending.clear()
            if action.delete_queue is not None:
                channel = await self._own_channel()
                await channel.delete_queue(action.delete_queue)
        except BrokerError as error:
            await self._fail(error, action.receipt)
            return
        if action.receipt is not None:
            self.send_frame(action.receipt)

    # -- ACK / NACK ---------------------------------------------------------------------------------------

    def _ack(self, action: Ack) -> None:
        channel = self._channel
        if channel is not None:
            for tag in action.delivery_tags:
                if action.nack:
                    channel.nack(tag, requeue=action.requeue)
                else:
                    channel.ack(tag)
        if action.receipt is not None:
            self.send_frame(action.receipt)

    # -- closing ------------------------------------------------------------------------------------------

    async def _barrier(self, receipt: Frame, pending: list[asyncio.Future[None]]) -> None:
        if pending:
            await asyncio.wait(pending)
        if not self._closing and all(not f.cancelled() and f.exception() is None for f in pending):
            self._react(self.session.publish_confirmed(receipt))  # a failed one was reported with an ERROR

    def _log_end(self) -> None:
        session = self.session
        duration = self.loop.time() - self.started
        logger.info(
            "session %s ended after %.1f s: %s",
            session.id,
            duration,
            self.close_reason,
            extra={
                "fields": {
                    "session": session.id,
                    "peer": self.peer,
                    "user": session.login or None,
                    "vhost": session.vhost or None,
                    "version": session.version if session.login else None,
                    "duration_s": round(duration, 3),
                    "frames_in": self.frames_in,
                    "frames_out": self.frames_out + self.messages_out,
                    "messages_out": self.messages_out,
                    "reason": self.close_reason,
                }
            },
        )

    async def _disconnect(self, action: Disconnect) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=self.settings.close_timeout)
        if action.receipt is not None:
            self.send_frame(action.receipt)
        self.close_reason = "DISCONNECT"
        await self._close(None)

    async def _close(self, error: Frame | None) -> None:
        """Write ``error`` out completely, then close; the cleanup runs once."""
        if self._closing:
            return
        if error is not None:
            self.send_frame(error)
            self.close_reason = "ERROR " + (error.get("message") or "")
            metrics.error_sent(error.get("message") or "")
            logger.info(
                "session %s: ERROR %s: %s",
                self.session.id,
                error.get("message"),
                error.body.decode("utf-8", "replace").strip(),
                extra={"fields": {"session": self.session.id, "peer": self.peer}},
            )
        elif self.close_reason == "open":
            self.close_reason = "closed by the gateway"
        self._closing = True
        self.session.connection_lost()
        try:
            await asyncio.wait_for(self.transport.drain(), self.settings.close_timeout)
            await asyncio.wait_for(self.transport.close(), self.settings.close_timeout)
        except (TimeoutError, ConnectionError, OSError):
            self.transport.abort()
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self._session_gauge.dec()
        self._log_end()
        if self._expiry is not None:
            self._expiry.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        attachments = list(self._attachments.values())
        self._attachments.clear()
        for attachment in attachments:
            if isinstance(attachment, _Shared):
                with contextlib.suppress(BrokerError):
                    await self.registry.hub_for(self._principal).detach(attachment.sink)
        for future in list(self._pending):
            future.cancel()
        if self._channel is not None:
            await self._channel.close()  # unacknowledged deliveries go back to their queues
            self._channel = None
        if self._exclusive_queues and self._principal is not None:
            await self._delete_exclusive_queues()

    async def _delete_exclusive_queues(self) -> None:
        """The AMQP connection outlives the session: its exclusive queues must go explicitly."""
        queues, self._exclusive_queues = list(self._exclusive_queues), {}
        try:
            channel = await self.broker.open_channel(self._principal, self.session.id)
        except BrokerError:
            return  # the connection is gone, and its exclusive queues with it
        try:
            for queue in queues:
                await channel.delete_queue(queue)
        except BrokerError as error:
            logger.warning("%s: could not delete exclusive queue: %s", self.peer, error)
        finally:
            await channel.close()


async def _declare(channel: Channel, declaration: QueueDeclaration) -> str:
    """``queue.declare`` as the destination mapping planned it; the queue's name (the broker's, for ``""``)."""
    return await channel.declare_queue(
        declaration.name,
        durable=declaration.durable,
        exclusive=declaration.exclusive,
        auto_delete=declaration.auto_delete,
        arguments=declaration.arguments,
    )


class _Consumer:
    """A subscription attached as a consumer on the session's own channel."""

    __slots__ = ("consumer_tag", "deliverer", "subscription")

    def __init__(self, subscription: Subscription, consumer_tag: str, deliverer: _Deliverer) -> None:
        self.subscription = subscription
        self.consumer_tag = consumer_tag
        self.deliverer = deliverer

    def start(self) -> None:
        self.deliverer.start()


class _Shared:
    """A subscription attached to a shared fan-out group through ``sink``; ``start`` releases the messages
    held until its RECEIPT went out."""

    __slots__ = ("hand_over", "sink", "start", "subscription")

    def __init__(self, subscription: Subscription, sink: Sink, start: Callable[[], None]) -> None:
        self.subscription = subscription
        self.sink = sink
        self.start = start
        #: what the subscription got when it joined (its RECEIPT says so), if it asked for continuity
        self.hand_over: HandOver | None = None


class _Deliverer:
    """Delivery callback of a session's own consumer. Holds deliveries back until :meth:`start` (after the
    SUBSCRIBE's RECEIPT went out), so a client never sees a MESSAGE before the RECEIPT of its SUBSCRIBE.
    Once the subscription is cancelled (``active`` False), client-mode deliveries still arriving go back
    to their queue."""

    __slots__ = ("active", "connection", "held", "subscription")

    def __init__(self, connection: StompConnection, subscription: Subscription) -> None:
        self.connection = connection
        self.subscription = subscription
        self.held: list[Delivery] | None = []
        self.active = True

    def start(self) -> None:
        held, self.held = self.held, None
        for delivery in held or ():
            self(delivery)

    def __call__(self, delivery: Delivery) -> None:
        connection = self.connection
        if connection._closing:
            return
        if self.held is not None:
            self.held.append(delivery)
            return
        subscription = self.subscription
        if not self.active:
            if subscription.ack != "auto" and connection._channel is not None:
                connection._channel.nack(delivery.delivery_tag, requeue=True)
            return
        session = connection.session
        template = session.deliver(subscription, delivery)
        connection.messages_out += 1
        TALLY.messages_delivered += 1
        TALLY.frames_sent["MESSAGE"] += 1
        connection._write(session.render(subscription, template), template.is_text)
        if subscription.gateway_acks and connection._channel is not None:
            connection._channel.ack(delivery.delivery_tag)  # an ack:auto stream subscription: written, so done
