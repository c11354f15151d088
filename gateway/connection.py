"""One client connection: runs its session's actions against the broker and writes frames out.

The transport adapters (:mod:`gateway.transport.websocket`, :mod:`gateway.transport.tcp`) feed bytes in
with :meth:`StompConnection.receive_data` and call :meth:`StompConnection.connection_lost` at the end;
they give this class a :class:`Transport` to write to. Here live the timers (login timeout, heart-beats),
the bound on the outbound buffer, the per-session broker channel and the attachment to shared fan-out.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import metrics
from gateway.broker.base import Broker, BrokerError, Channel, ChannelClosed, Delivery, PublishNacked
from gateway.fanout import FanoutRegistry, Sink
from gateway.metrics import TALLY
from gateway.settings import DEFAULTS
from gateway.stomp.frames import Frame, FrameParser, Limits, ProtocolError
from gateway.stomp.session import (
    Ack,
    Action,
    Authenticate,
    Barrier,
    Close,
    Disconnect,
    MessageTemplate,
    Publish,
    SendFrame,
    Session,
    SessionSettings,
    State,
    Subscribe,
    Subscription,
    Unsubscribe,
)

__all__ = ["Backlog", "ConnectionSettings", "StompConnection", "Transport"]

#: Frames parsed and handled from one read before the reader lets other connections run.
YIELD_EVERY = 32
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
        """Write a fanned-out MESSAGE; transports may cache their framing of it in ``template.wire``."""
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

    __slots__ = ("buffered", "ends", "written")

    #: ends kept before the consumed ones are dropped (bounds the memory of a client that is slow for long)
    TRIM_AT = 64

    def __init__(self, buffered: Callable[[], int]) -> None:
        self.buffered = buffered
        self.written = 0
        self.ends: collections.deque[int] = collections.deque()

    def wrote(self, size: int) -> None:
        self.written += size
        self.ends.append(self.written)
        if len(self.ends) > self.TRIM_AT:
            self.behind_head()

    def behind_head(self) -> int:
        """Bytes of the writes after the oldest one still (partly) in the buffer."""
        taken = self.written - self.buffered()
        ends = self.ends
        while ends and ends[0] <= taken:
            ends.popleft()
        return self.written - ends[0] if ends else 0


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
    close_timeout: float = 5.0


class StompConnection:
    """Drives one :class:`Session` over one :class:`Transport`."""

    def __init__(
        self,
        transport: Transport,
        broker: Broker,
        registry: FanoutRegistry,
        settings: ConnectionSettings,
        *,
        peer: str = "?",
    ) -> None:
        self.transport = transport
        self.broker = broker
        self.registry = registry
        self.settings = settings
        self.peer = peer
        self.session = Session(settings.session)
        self.parser = FrameParser(settings.limits)
        self.loop = asyncio.get_running_loop()
        self.last_received = self.last_sent = self.loop.time()
        self.closed = asyncio.Event()
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
        self._declared: set[str] = set()
        self._exclusive_queues: set[str] = set()
        self._receiving = False
        self._confirming = False
        self._temp_queues: dict[str, str] = {}
        self._subscribing: set[asyncio.Future[None]] = set()
        self._last_subscribe: asyncio.Future[None] | None = None
        self._own_subscribe_lock = asyncio.Lock()
        #: subscription key -> releases a shared subscription's messages once its RECEIPT is out
        self._held_shared: dict[str, Callable[[], None]] = {}
        self._own_channel_lock = asyncio.Lock()
        self._pending: set[asyncio.Future[None]] = set()
        self._background: set[asyncio.Future[Any]] = set()
        self._login_task = asyncio.create_task(self._login_timer(), name=f"stomp-login-{peer}")
        self._tasks = [self._login_task]

    # -- input ------------------------------------------------------------------------------------------

    async def receive_data(self, data: bytes) -> None:
        """Parse bytes from the client and handle the frames, in order.

        Returns when their broker operations have been started (publishes are not awaited: confirms
        run in the background), so the transport reads no further while the broker is behind.
        """
        if self._closing:
            return
        self.last_received = self.loop.time()
        TALLY.bytes_received += len(data)
        try:
            frames = self.parser.receive_data(data, YIELD_EVERY)
        except ProtocolError as error:
            await self._run(self.session.fail(error))
            return
        self._receiving = True  # the client is not silent while its frames wait for the broker
        try:
            while frames:
                self.frames_in += len(frames)
                received = TALLY.frames_received
                for frame in frames:
                    received[frame.command] += 1
                    if self._closing:
                        return
                    if self.debug:
                        logger.debug("%s > %s %s", self.peer, frame.command, frame.headers)
                    await self._run(self.session.receive_frame(frame))
                if self.parser.error is not None or self._closing or len(frames) < YIELD_EVERY:
                    break  # (a short slice: nothing complete is left in the parser)
                # One client's burst (thousands of frames in one message) is parsed and handled a slice
                # at a time, and other connections run in between. A message of a few frames costs no
                # extra pass of the event loop: that would split the deliveries it causes into more,
                # smaller writes to every subscriber.
                await asyncio.sleep(0)
                try:
                    frames = self.parser.receive_data(b"", YIELD_EVERY)
                except ProtocolError as error:
                    await self._run(self.session.fail(error))
                    return
            if self.parser.error is not None and not self._closing:  # after the good frames before it
                await self._run(self.session.fail(self.parser.error))
        except Exception:
            logger.exception("session %s failed", self.session.id)
            await self._run(
                self.session.fail(ProtocolError("Internal error", "The gateway failed; see its log.\n"))
            )
        finally:
            self._receiving = False
            self.last_received = self.loop.time()

    async def connection_lost(self) -> None:
        """The client went away (or we closed): release everything."""
        if self.close_reason == "open":
            self.close_reason = "connection closed by the client"
        if not self._closing:
            self._closing = True
            self.session.state = State.CLOSED
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
            elif isinstance(action, Barrier):
                self._spawn(self._barrier(action.receipt, list(self._pending)))
            elif isinstance(action, Disconnect):
                await self._disconnect(action)
            elif isinstance(action, Close):
                await self._close(action.error)
            if self._closing:
                return

    async def _fail(self, error: BrokerError, receipt: Frame | None = None, *, in_order: bool = True) -> None:
        await self._run(self.session.broker_failed(error, receipt), in_order=in_order)

    # -- output -----------------------------------------------------------------------------------------

    def send_frame(self, frame: Frame) -> None:
        self.frames_out += 1
        TALLY.frames_sent[frame.command] += 1
        data = frame.serialize(self.session.version)
        try:
            data.decode("utf-8")
            text = True
        except UnicodeDecodeError:
            text = False
        self._write(data, text)

    def _write(self, data: bytes, text: bool) -> None:
        if self._closing:
            return
        self.transport.write(data, text)
        self.last_sent = self.loop.time()
        limit = self.settings.max_outbound_buffer
        if self.transport.buffered > limit and self.transport.backlog > limit:
            self._slow_client()

    def _slow_client(self) -> None:
        if self.session.state is State.CLOSED:
            return  # already on its way out
        metrics.SLOW_CLIENTS.inc()
        limit = self.settings.max_outbound_buffer
        error = ProtocolError(
            "Slow consumer",
            f"The client fell more than {limit} bytes behind the message it is receiving (setting "
            "--max-outbound-buffer); "
            "unacknowledged messages go back to their queues.\n",
        )
        logger.warning(
            "%s: disconnecting slow client (%d bytes buffered)", self.peer, self.transport.buffered
        )
        self._spawn(self._run(self.session.fail(error)))

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- timers -----------------------------------------------------------------------------------------

    async def _login_timer(self) -> None:
        await asyncio.sleep(self.settings.login_timeout)
        if self.session.state in (State.CONNECTING, State.AUTHENTICATING) and not self._closing:
            await self._run(
                self.session.fail(
                    ProtocolError(
                        "Login timeout",
                        f"No successful CONNECT within {self.settings.login_timeout:g} s (setting --login-timeout)\n",
                    )
                )
            )

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
                await self._run(
                    self.session.fail(
                        ProtocolError(
                            "Heart-beat timeout",
                            f"Nothing received for {2 * expect_every} ms (two heart-beat intervals)\n",
                        )
                    )
                )
                return

    # -- CONNECT ----------------------------------------------------------------------------------------

    async def _authenticate(self, action: Authenticate) -> None:
        try:
            self._principal = await self.broker.authenticate(action.login, action.passcode, action.vhost)
        except BrokerError as error:
            metrics.LOGIN_FAILURES.inc()
            await self._fail(error)
            return
        if self._closing:
            return
        if self._login_task is not asyncio.current_task():
            self._login_task.cancel()
        self.parser.version = self.session.version
        self.parser.authenticated = True
        self.transport.authenticated()
        # The parser held back whatever the client pipelined behind CONNECT; decode it now, for the
        # negotiated version, before any later bytes.
        try:
            pipelined = self.parser.receive_data(b"")
        except ProtocolError as error:
            await self._run(self.session.fail(error))
            return
        await self._run(self.session.authenticated())
        if self.session.state is State.CONNECTED:
            self._session_gauge.dec()
            self._session_gauge = metrics.SESSIONS.labels("connected", self.session.version)
            self._session_gauge.inc()
        send_every, expect_every = self.session.heartbeat
        if send_every or expect_every:
            self._tasks.append(asyncio.create_task(self._heartbeats(send_every, expect_every)))
        for frame in pipelined:
            if self._closing:
                return
            await self._run(self.session.receive_frame(frame))

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
                self._declared.clear()
                self._temp_queues.clear()
                self._confirming = False
            return self._channel

    def _channel_closed(self, error: BrokerError) -> None:
        if not self._closing:
            self._spawn(self._fail(error))

    # -- SEND -------------------------------------------------------------------------------------------

    async def _publish(self, action: Publish) -> None:
        try:
            channel = await self._own_channel()
            declaration = action.declare
            if declaration is not None and declaration.name not in self._declared:
                await channel.declare_queue(
                    declaration.name,
                    durable=declaration.durable,
                    exclusive=declaration.exclusive,
                    auto_delete=declaration.auto_delete,
                    arguments=declaration.arguments,
                )
                self._declared.add(declaration.name)
                if declaration.exclusive:
                    self._exclusive_queues.add(declaration.name)
            if action.temp_queue is not None:
                action.properties.reply_to = await self._temp_queue(channel, action.temp_queue)
            if (action.receipt is not None or action.confirm) and not self._confirming:
                await channel.enable_confirms()
                self._confirming = True
            future = channel.start_publish(
                action.exchange, action.routing_key, action.body, action.properties
            )
        except BrokerError as error:
            await self._fail(error, action.receipt)
            return
        TALLY.messages_published += 1
        self._pending.add(future)
        future.add_done_callback(lambda f: self._confirmed(f, action.receipt))
        await channel.drain()

    def _confirmed(self, future: asyncio.Future[None], receipt: Frame | None) -> None:
        self._pending.discard(future)
        if self._closing:
            if not future.cancelled():
                future.exception()
            return
        error = future.exception() if not future.cancelled() else ChannelClosed()
        if error is None:
            if receipt is not None:
                self.send_frame(receipt)
            return
        if isinstance(error, PublishNacked):
            receipt_id = receipt.get("receipt-id") if receipt is not None else None
            detail = "The broker did not accept a message (basic.nack)"
            if receipt_id is not None:
                detail += f" sent with receipt '{receipt_id}'"
            self._spawn(
                self._run(
                    self.session.fail(ProtocolError("Message rejected", detail + "\n", receipt_id=receipt_id))
                )
            )
        elif isinstance(error, BrokerError):
            self._spawn(self._fail(error, receipt))

    async def _temp_queue(self, channel: Channel, name: str) -> str:
        queue = self._temp_queues.get(name)
        if queue is not None:
            return queue
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        subscription = Subscription(
            key=name,
            id=name,
            destination=None,  # type: ignore[arg-type]
            ack="auto",
            plan=None,  # type: ignore[arg-type]
            prefetch_count=None,
            consumer_tag="T_" + name,
        )
        deliverer = _Deliverer(self, subscription)
        await channel.consume(queue, deliverer, no_ack=True, consumer_tag="T_" + name)
        deliverer.start()
        self._temp_queues[name] = queue
        return queue

    # -- SUBSCRIBE / UNSUBSCRIBE ------------------------------------------------------------------------

    def _shared_deliverer(self, subscription: Subscription) -> Sink:
        session = self.session
        version = session.version
        sub_id = subscription.id

        transport = self.transport
        loop = self.loop
        limit = self.settings.max_outbound_buffer
        # Messages that arrive before the SUBSCRIBE's RECEIPT went out wait (RECEIPTs of pipelined
        # SUBSCRIBEs go out in order, so this one may wait for an earlier, slower one).
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

        def on_error(error: BrokerError) -> None:
            if not self._closing:
                self._spawn(self._fail(error))

        def start() -> None:
            nonlocal held
            waiting, held = held, None
            for template in waiting or ():
                on_message(template)

        self._held_shared[subscription.key] = start
        return Sink(on_message, on_error)

    async def _start_subscribe(self, action: Subscribe) -> None:
        """Start a SUBSCRIBE's broker work now; its RECEIPT follows the RECEIPTs before it."""
        if len(self._subscribing) >= MAX_SUBSCRIBES_IN_FLIGHT:
            await asyncio.wait(self._subscribing, return_when=asyncio.FIRST_COMPLETED)
        if self._closing:
            return
        task = asyncio.ensure_future(self._subscribe(action, self._last_subscribe))
        self._last_subscribe = task
        self._subscribing.add(task)
        task.add_done_callback(self._subscribing.discard)

    async def _subscribes_done(self) -> None:
        while self._subscribing:
            await asyncio.wait(list(self._subscribing))

    async def _subscribe(self, action: Subscribe, previous: asyncio.Future[None] | None) -> None:
        subscription = action.subscription
        deliverer: _Deliverer | None = None
        failure: BrokerError | None = None
        try:
            await self._attach(subscription)
        except BrokerError as error:
            failure = error
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # the RECEIPTs go out in the order of the SUBSCRIBEs
        if self._closing:
            return
        if failure is not None:
            await self._fail(failure, action.receipt, in_order=False)
            return
        if isinstance(subscription.handle, _Attached):
            deliverer = subscription.handle.deliverer
            subscription.handle = subscription.handle.consumer_tag
        start_shared = self._held_shared.pop(subscription.key, None)
        if action.receipt is not None:
            self.send_frame(action.receipt)
        if deliverer is not None:
            deliverer.start()  # messages that raced the receipt go out after it
        if start_shared is not None:
            start_shared()

    async def _attach(self, subscription: Subscription) -> None:
        """The broker side of a subscription: a shared fan-out group, or a consumer on the session's own
        channel (one at a time: the channel's prefetch setting applies to the next consumer)."""
        plan = subscription.plan
        if subscription.shared and plan.exchange is not None:
            sink = self._shared_deliverer(subscription)
            await self.registry.hub_for(self._principal).attach(plan.exchange, plan.binding_key, sink)
            subscription.handle = sink
            if self._closing or subscription.key not in self.session.subscriptions:
                await self.registry.hub_for(self._principal).detach(sink)
            return
        async with self._own_subscribe_lock:
            channel = await self._own_channel()
            queue = plan.queue
            declaration = plan.declaration
            if declaration is not None:
                queue = await channel.declare_queue(
                    declaration.name,
                    durable=declaration.durable,
                    exclusive=declaration.exclusive,
                    auto_delete=declaration.auto_delete,
                    arguments=declaration.arguments,
                )
                if declaration.exclusive:
                    # AMQP ties exclusive queues to the (shared) connection: delete it when the
                    # session ends, or now if the bind or consume fails (as RabbitMQ's plugin does).
                    self._exclusive_queues.add(queue)
            if plan.exchange is not None:
                await channel.bind_queue(queue, plan.exchange, plan.binding_key)
            deliverer = _Deliverer(self, subscription)
            tag = await channel.consume(
                queue,
                deliverer,
                no_ack=subscription.ack == "auto",
                prefetch_count=subscription.prefetch_count,
                consumer_tag=subscription.consumer_tag,
                arguments=subscription.consumer_arguments,
            )
            subscription.handle = _Attached(tag, deliverer)

    async def _unsubscribe(self, action: Unsubscribe) -> None:
        subscription = action.subscription
        handle = subscription.handle
        subscription.handle = False
        try:
            if isinstance(handle, Sink):
                await self.registry.hub_for(self._principal).detach(handle)
            elif isinstance(handle, str) and self._channel is not None:
                await self._channel.cancel(handle)
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
            self.send_frame(receipt)  # a failed publish was reported with an ERROR instead

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
        self.session.state = State.CLOSED
        try:
            await asyncio.wait_for(self.transport.drain(), self.settings.close_timeout)
            await asyncio.wait_for(self.transport.close(), self.settings.close_timeout)
        except (TimeoutError, ConnectionError, OSError):
            self.transport.abort()
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._session_gauge.dec()
        self._log_end()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for subscription in list(self.session.subscriptions.values()):
            if isinstance(subscription.handle, Sink):
                with contextlib.suppress(BrokerError):
                    await self.registry.hub_for(self._principal).detach(subscription.handle)
        self.session.subscriptions.clear()
        for future in list(self._pending):
            future.cancel()
        if self._channel is not None:
            await self._channel.close()  # unacknowledged deliveries go back to their queues
            self._channel = None
        if self._exclusive_queues and self._principal is not None:
            await self._delete_exclusive_queues()

    async def _delete_exclusive_queues(self) -> None:
        """The AMQP connection outlives the session: its exclusive queues must go explicitly."""
        queues, self._exclusive_queues = self._exclusive_queues, set()
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


class _Attached:
    """A consumer of the session's own channel whose SUBSCRIBE is not receipted yet."""

    __slots__ = ("consumer_tag", "deliverer")

    def __init__(self, consumer_tag: str, deliverer: _Deliverer) -> None:
        self.consumer_tag = consumer_tag
        self.deliverer = deliverer


class _Deliverer:
    """Delivery callback of a session's own consumer. Holds deliveries back until :meth:`start` (after the
    SUBSCRIBE's RECEIPT went out), so a client never sees a MESSAGE before the RECEIPT of its SUBSCRIBE."""

    __slots__ = ("connection", "held", "subscription")

    def __init__(self, connection: StompConnection, subscription: Subscription) -> None:
        self.connection = connection
        self.subscription = subscription
        self.held: list[Delivery] | None = []

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
        if subscription.handle is False:  # unsubscribed: give client-mode messages back
            if subscription.ack != "auto" and connection._channel is not None:
                connection._channel.nack(delivery.delivery_tag, requeue=True)
            return
        session = connection.session
        template = session.deliver(subscription, delivery)
        connection.messages_out += 1
        TALLY.messages_delivered += 1
        TALLY.frames_sent["MESSAGE"] += 1
        connection._write(session.render(subscription, template), template.is_text)
