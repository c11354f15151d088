"""STOMP over WebSocket: ``ws://HOST:PORT/ws`` with the v10/v11/v12.stomp subprotocols.

:class:`WebSocketProtocol` is the :class:`asyncio.Protocol` of one TCP (or TLS) connection. It drives
websockets' public sans-I/O :class:`~websockets.server.ServerProtocol`: bytes in with ``receive_data``,
events out with ``events_received``, bytes to write from ``data_to_send``. The first event is the HTTP
request: ``/ws`` with an upgrade becomes a WebSocket connection and a :class:`StompConnection`; anything
else is answered by :mod:`gateway.transport.http` (the page, ``/healthz``, ``/metrics``) and closed.

Reading: complete messages queue up for the connection, whose ``receive_data`` is awaited with all the
messages waiting at once; reading pauses while more than :data:`READ_AHEAD_HIGH` messages wait, until the
connection takes them. Writing (:class:`WebSocketTransport`): frames are written synchronously (no await
per message); the first frame of a pass of the event loop goes out at once, later ones of the same pass in
one write when the pass ends; :class:`StompConnection` watches the write buffer and disconnects a client that falls too far behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, Protocol, cast

from websockets.extensions import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Origin, Subprotocol

from gateway.connection import Backlog, Handshake, StompConnection, Transport
from gateway.metrics import TALLY
from gateway.proxy import ProxyHeaderError, is_proxy_header, parse_proxy_header
from gateway.transport.http import HttpResponder
from gateway.transport.websocket_frames import (
    FRAME_FOR_WEBSOCKETS,
    ClientFrameReader,
    MessageSizeGuard,
    websocket_frame,
)

__all__ = [
    "SUBPROTOCOLS",
    "WebSocketProtocol",
    "WebSocketServer",
    "WebSocketTransport",
    "select_subprotocol",
    "serve_websocket",
    "websocket_frame",
]

logger = logging.getLogger(__name__)

#: Highest first: the highest version the client offers wins.
SUBPROTOCOLS = (Subprotocol("v12.stomp"), Subprotocol("v11.stomp"), Subprotocol("v10.stomp"))
WS_PATH = "/ws"
#: What a WebSocket message may carry beyond the STOMP frame-size limit (as Web-STOMP)
MESSAGE_SLACK = 4096
#: Bytes the kernel may leave unsent before :meth:`WebSocketTransport.drain` waits (it resumes at a quarter)
WRITE_LIMIT = 2**16
#: Complete messages read ahead of the connection before reading pauses (it resumes when they are taken)
READ_AHEAD_HIGH = 16
#: Fragments one message may come in (websockets' own default for its message assembler)
MAX_FRAGMENTS = 4096
#: Seconds for a client to complete the opening handshake (after TLS), and to close the TCP connection
#: once the closing handshake started or an HTTP response was sent
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0
_EOL = b"\n"
_OPEN = State.OPEN
_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_CONT = Opcode.CONT
_TEXT_KIND = int(Opcode.TEXT)


def select_subprotocol(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """The highest STOMP subprotocol offered; a client offering none is accepted too (as Web-STOMP does)."""
    for subprotocol in SUBPROTOCOLS:
        if subprotocol in offered:
            return subprotocol
    return None


class SharedMessage(Protocol):
    """What :meth:`WebSocketTransport.write_message` needs of a fanned-out MESSAGE."""

    @property
    def is_text(self) -> bool: ...

    def render(self, version: str, subscription: str | None) -> bytes: ...


_WROTE: list[bytes] = []  # sentinel, never appended to


class _Flusher:
    """Flushes, once per pass of the event loop, every connection written to during it (one callback
    for all of them: 10,000 connections must not mean 10,000 callbacks per broadcast)."""

    __slots__ = ("dirty", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[WebSocketTransport] = []

    def add(self, transport: WebSocketTransport) -> None:
        if not self.dirty:
            self.loop.call_soon(self.flush)
        self.dirty.append(transport)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for transport in dirty:
            transport._flush()


class _FrameCache:
    """The WebSocket frames of the last fanned-out MESSAGE, by (version, subscription id).

    The fan-out hands one template to all of its sinks in a row, so one entry is enough: a fanned-out
    MESSAGE is framed once for every connection with the same version and subscription id. The template is
    held (not just its id) so that a new template can never be taken for the old one.
    """

    __slots__ = ("frames", "template")

    def __init__(self) -> None:
        self.template: SharedMessage | None = None
        self.frames: dict[tuple[str, str | None], bytes] = {}

    def frame(self, template: SharedMessage, version: str, subscription: str | None) -> bytes:
        if template is not self.template:
            self.template = template
            self.frames = {}
        key = (version, subscription)
        wire = self.frames.get(key)
        if wire is None:
            wire = self.frames[key] = websocket_frame(template.render(version, subscription), template.is_text)
        return wire


class _PerLoop:
    __slots__ = ("cache", "flusher")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.flusher = _Flusher(loop)
        self.cache = _FrameCache()


_PER_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _PerLoop] = weakref.WeakKeyDictionary()


def _per_loop(loop: asyncio.AbstractEventLoop) -> _PerLoop:
    shared = _PER_LOOP.get(loop)
    if shared is None:
        shared = _PER_LOOP[loop] = _PerLoop(loop)
    return shared


class WebSocketTransport(Transport):
    """Writes frames as WebSocket messages: text when the frame is UTF-8, binary otherwise.

    Without extensions (compression off, the default) a server frame is the same bytes for every
    connection, so a fanned-out MESSAGE is framed once (:class:`_FrameCache`). With permessage-deflate
    each connection compresses through websockets, one message at a time. Either way the frames written to
    one connection during one pass of the event loop after the first go out in one ``write()``.
    """

    __slots__ = ("_backlog", "_cache", "_flusher", "_pending", "io", "open", "raw", "transport", "ws")

    kind = "websocket"

    def __init__(self, io: WebSocketProtocol, transport: asyncio.Transport, compressed: bool) -> None:
        self.io = io
        self.ws = io.ws
        self.transport = transport
        #: False once the WebSocket is no longer OPEN (closing, closed or aborted): writes are dropped
        self.open = True
        #: no extension negotiated (the only one offered is permessage-deflate): frames are ours to build
        self.raw = not compressed
        shared = _per_loop(io.loop)
        self._flusher = shared.flusher
        self._cache = shared.cache
        self._backlog = Backlog(transport.get_write_buffer_size)
        #: None: nothing written in this pass of the loop; _WROTE: one frame written, none waiting
        self._pending: list[bytes] | None = None

    def authenticated(self) -> None:
        self.io.authenticated()

    def _queue(self, wire: bytes) -> None:
        pending = self._pending
        if pending is None:
            # The first frame of this pass goes out at once (no added latency); later ones of the same
            # pass are batched and written together when the pass ends.
            self._pending = _WROTE
            self._flusher.add(self)
            self.transport.write(wire)
            self._backlog.wrote(len(wire))
        elif pending is _WROTE:
            self._pending = [wire]
        else:
            pending.append(wire)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if not pending or not self.open:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self.transport.write(data)
        self._backlog.wrote(len(data))

    def write(self, data: bytes, text: bool) -> None:
        if not self.open:
            return
        if self.raw:
            wire = websocket_frame(data, text)
            TALLY.bytes_sent += len(wire)
            self._queue(wire)
            return
        if text:
            self.ws.send_text(data)
        else:
            self.ws.send_binary(data)
        for wire in self.ws.data_to_send():
            self._queue(wire)
        TALLY.bytes_sent += len(data)  # before compression

    def write_message(self, template: SharedMessage, version: str, subscription: str | None) -> None:
        if not self.raw:
            self.write(template.render(version, subscription), template.is_text)
            return
        if not self.open:
            return
        wire = self._cache.frame(template, version, subscription)
        TALLY.bytes_sent += len(wire)
        self._queue(wire)

    def write_heartbeat(self) -> None:
        self.write(_EOL, True)

    def wrote(self, size: int) -> None:
        """The protocol wrote ``size`` bytes of its own (a pong, a close frame) behind our frames."""
        self._backlog.wrote(size)

    @property
    def buffered(self) -> int:
        """What the kernel has not taken yet; this pass's batch (flushed right after it) does not count."""
        return self.transport.get_write_buffer_size()

    @property
    def backlog(self) -> int:
        return self._backlog.behind_head()

    async def drain(self) -> None:
        self._flush()
        if self.open:
            await self.io.drained()

    async def close(self) -> None:
        """Queued frames (an ERROR, a RECEIPT), then the close frame; returns when the TCP connection is
        closed (at most :data:`CLOSE_TIMEOUT` later: then it is aborted)."""
        self._flush()
        if self.open:
            self.ws.send_close(CloseCode.NORMAL_CLOSURE)
            self.io.send_data()
        await asyncio.shield(self.io.lost)

    def abort(self) -> None:
        self.open = False
        self.transport.abort()


class WebSocketProtocol(asyncio.Protocol):
    """One client's TCP (or TLS) connection: the opening handshake or a plain HTTP answer, then messages
    in order to a :class:`StompConnection`, control frames and the closing handshake through websockets.

    Every call into ``self.ws`` that may produce output is followed by :meth:`send_data`.
    """

    # Slots: a gateway holds tens of thousands of these.
    __slots__ = (
        "_drain_waiters", "_failed", "_fragments", "_fragments_text", "_guard", "_message_waiter", "_messages",
        "_proxied", "_proxy_bytes", "_reader", "_reading_paused", "_request_bytes", "_timer", "_writing_paused",
        "connection", "handshake", "heard", "loop", "lost", "server", "stomp", "transport", "ws",
    )

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.loop = server.loop
        self.ws = ServerProtocol(
            origins=server.origins,
            extensions=server.extensions,
            subprotocols=SUBPROTOCOLS,
            select_subprotocol=select_subprotocol,
            max_size=server.max_message_size,
        )
        self.transport: asyncio.Transport | None = None
        #: the STOMP side's transport, from the upgrade on
        self.stomp: WebSocketTransport | None = None
        #: done when the TCP connection is gone
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self._request_bytes: bytearray | None = bytearray()  # until the request is parsed
        self._guard: MessageSizeGuard | None = None
        #: reads the common client frames itself once the connection is upgraded (None: websockets reads all)
        self._reader: ClientFrameReader | None = None
        self._failed = False
        self._fragments: list[bytes] | None = None
        self._fragments_text = False
        # At most READ_AHEAD_HIGH (+ one read's worth): a list (an empty deque is 600 bytes)
        self._messages: list[tuple[bool, bytes]] = []
        self._message_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        #: the STOMP connection, from the upgrade on (told of any inbound traffic: it is life)
        self.connection: StompConnection | None = None
        #: something arrived since the last ping round (see WebSocketServer._ping)
        self.heard = True
        #: a trusted proxy's connection: the bytes read while looking for its PROXY header (None: done)
        self._proxy_bytes: bytes | None = None
        #: the client address a PROXY header named
        self._proxied: tuple[str, int] | None = None
        #: who the client is and the token it brought (set when the upgrade request is answered)
        self.handshake: Handshake | None = None

    # -- asyncio callbacks ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_LIMIT)
        self.server.protocols.add(self)
        self._timer = self.loop.call_later(OPEN_TIMEOUT, self._timed_out)
        peer = transport.get_extra_info("peername")
        if peer and self.server.gateway.trusted_proxies.trusts(peer[0]):
            self._proxy_bytes = b""  # it may send a PROXY header first

    def data_received(self, data: bytes) -> None:
        if self._proxy_bytes is not None:
            data = self._proxy_header(data)
            if not data:
                return
        self.heard = True
        if self.connection is not None:
            self.connection.client_alive()
        guard = self._guard
        if guard is not None:
            too_large = guard.exceeds(data)
            if too_large is not None:
                self._too_large(too_large, guard.limit)
                return
        ws = self.ws
        reader = self._reader
        if reader is not None:
            if ws.state is not _OPEN:
                reader.fast = False
            reader.receive_data(data)
            while (item := reader.next_frame()) is not None:
                kind, payload = item
                if kind != FRAME_FOR_WEBSOCKETS:
                    self._message(kind == _TEXT_KIND, payload)
                    continue
                ws.receive_data(payload)
                for frame in cast(list[Frame], ws.events_received()):
                    self._frame(frame)
                if ws.state is not _OPEN:
                    reader.fast = False
            self.send_data()
            return
        if self._request_bytes is not None:
            self._request_bytes += data
        ws.receive_data(data)
        events = ws.events_received()
        if self._request_bytes is not None:
            if events:
                events = self._handshake(events)
            elif ws.close_expected():  # websockets refused the request (too long, not HTTP)
                self._request_bytes = None
        for frame in cast(list[Frame], events):  # after the request, only frames
            self._frame(frame)
        self.send_data()

    def _proxy_header(self, data: bytes) -> bytes:
        """Strip a trusted proxy's PROXY header (v1 or v2) and note the client it names; return the bytes
        after it (nothing while the header is incomplete). A malformed one closes the connection."""
        assert self._proxy_bytes is not None
        data = self._proxy_bytes + data
        try:
            if is_proxy_header(data) is False:
                self._proxy_bytes = None
                return data
            parsed = parse_proxy_header(data)
        except ProxyHeaderError:
            parsed = None
            self._proxy_bytes = None
            if self.transport is not None:
                self.transport.close()
            return b""
        if parsed is None:
            self._proxy_bytes = data
            return b""
        self._proxy_bytes = None
        consumed, self._proxied = parsed
        return data[consumed:]

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self.send_data()
        return None  # WebSocket closes after its own closing handshake: nothing left to write

    def connection_lost(self, exc: Exception | None) -> None:
        self.ws.receive_eof()  # idempotent: the WebSocket state becomes CLOSED
        self.ws.data_to_send()
        if self.stomp is not None:
            self.stomp.open = False
        self._cancel_timer()
        self.lost.set_result(None)
        self._wake_reader()
        self._writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.server.protocols.discard(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- output -----------------------------------------------------------------------------------------

    def send_data(self) -> None:
        """Write what websockets has to send (handshake response, pong, close frame, end of stream) after
        the frames the connection queued in this pass, so that a close frame never overtakes them."""
        ws = self.ws
        writes = ws.data_to_send()
        if writes:
            transport = self.transport
            assert transport is not None
            stomp = self.stomp
            if stomp is not None:
                stomp._flush()
            for data in writes:
                if data:
                    transport.write(data)
                    if stomp is not None:
                        stomp.wrote(len(data))
                elif transport.can_write_eof():
                    with contextlib.suppress(Exception):  # OSError, or RuntimeError from uvloop
                        transport.write_eof()
                else:  # TLS: no half-close
                    transport.close()
        if ws.state is not _OPEN:
            if self.stomp is not None:
                self.stomp.open = False
            if ws.close_expected() and self._timer is None:
                self._timer = self.loop.call_later(CLOSE_TIMEOUT, self._timed_out)

    async def drained(self) -> None:
        """Return when the kernel has taken the write buffer down to the low-water mark."""
        if self._writing_paused:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            try:
                await waiter
            finally:
                self._drain_waiters.remove(waiter)

    def going_away(self) -> None:
        """The server is closing: close an open WebSocket with 1001 (the queued frames go first)."""
        if self.stomp is not None and self.stomp.open:
            self.stomp._flush()
            self.ws.send_close(CloseCode.GOING_AWAY)
            self.send_data()

    def _fail(self, code: CloseCode, reason: str) -> None:
        """Fail the WebSocket connection (RFC 6455 §7.1.7): close frame, end of stream, no more messages."""
        self._failed = True
        self._messages.clear()
        if self.lost.done():
            return
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False  # so that the client's end of stream is seen
            self.transport.resume_reading()
        self.ws.fail(code, reason)
        self.send_data()

    def _too_large(self, size: int, limit: int) -> None:
        self._guard = None
        self._fail(CloseCode.MESSAGE_TOO_BIG, f"frame with {size} bytes exceeds limit of {limit} bytes")

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the opening handshake --------------------------------------------------------------------------

    def _handshake(self, events: list[Request | Response | Frame]) -> list[Request | Response | Frame]:
        """Answer the request (the first event); return the frames that came right behind it."""
        request_bytes, self._request_bytes = self._request_bytes, None
        request = events[0]
        assert isinstance(request, Request) and request_bytes is not None
        response = self._respond(request)
        self._cancel_timer()
        self.ws.send_response(response)
        # websockets' parser keeps the request for the connection's life: keep its headers, read once,
        # from costing 2 KiB a connection.
        request.headers.clear()
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            return []
        self._upgrade(compressed="Sec-WebSocket-Extensions" in response.headers)
        # Frames sent right behind the request were parsed with it: the guard starts after the request.
        rest = bytes(request_bytes[request_bytes.find(b"\r\n\r\n") + 4 :])
        guard = self._guard
        if guard is not None and rest:
            too_large = guard.exceeds(rest)
            if too_large is not None:
                self._too_large(too_large, guard.limit)
                return []
        if self.stomp is not None and self.stomp.raw:
            # Without extensions the common frames are read here from now on, provided websockets' parser
            # stands between frames (a client that sent part of a frame behind its request keeps websockets).
            reader = ClientFrameReader(self.server.max_message_size)
            reader.fast = False
            reader.receive_data(rest)
            while reader.next_frame() is not None:
                pass
            if reader.at_frame_boundary():
                self._reader = ClientFrameReader(self.server.max_message_size)
        return events[1:]

    def _respond(self, request: Request) -> Response:
        ws = self.ws
        path = request.path.split("?", 1)[0]
        # get_all(): a header sent twice must not raise here (that would be a 500 and a logged traceback
        # per request); Connection may legitimately be split over several lines (RFC 9110 §5.3).
        connection = ", ".join(request.headers.get_all("Connection")).lower()
        try:
            if path != WS_PATH or "upgrade" not in connection:
                return self.server.http.respond(request)
            if request.headers.get_all("Sec-WebSocket-Version") != ["13"]:
                # RFC 6455 §4.4: name the version this server speaks.
                response = ws.reject(HTTPStatus.UPGRADE_REQUIRED, "Only WebSocket version 13 is supported\n")
                response.headers["Sec-WebSocket-Version"] = "13"
                return response
            # The door: who the client is (behind trusted proxies), its token, and whether it may come in.
            transport = self.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            query = request.path.split("?", 1)[1] if "?" in request.path else ""
            gateway = self.server.gateway
            self.handshake = gateway.handshake(peer, proxied=self._proxied, query=query, headers=request.headers.get_all)
            refusal = gateway.refusal(self.handshake.address)
            if refusal is not None:
                response = ws.reject(HTTPStatus(refusal.status), refusal.text)
                response.headers["Retry-After"] = str(refusal.retry_after)
                return response
            response = ws.accept(request)
        except Exception:
            logger.exception("answering an HTTP request for %s failed", path)
            return ws.reject(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "Failed to open a WebSocket connection.\nSee server log for more information.\n",
            )
        if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS and not self.server.is_serving():
            return ws.reject(HTTPStatus.SERVICE_UNAVAILABLE, "Server is shutting down.\n")
        return response

    def _upgrade(self, compressed: bool) -> None:
        """The 101 is on its way: start the STOMP connection and the task that feeds it."""
        server = self.server
        transport = self.transport
        assert transport is not None
        self.stomp = WebSocketTransport(self, transport, compressed)
        if server.unauthenticated_message_size != server.authenticated_message_size:
            # Follows the stream from its first frame on, so that it can take over at CONNECT.
            self._guard = MessageSizeGuard(server.unauthenticated_message_size)
        gateway = server.gateway
        handshake = self.handshake or gateway.handshake(transport.get_extra_info("peername"), proxied=self._proxied)
        peer = handshake.peer
        connection = StompConnection(
            self.stomp, gateway.broker, gateway.registry, gateway.connection_settings, handshake=handshake
        )
        gateway.connection_opened(connection)
        self.connection = connection
        server.track(self.loop.create_task(self._feed(connection), name=f"websocket-{peer}"))

    def ping(self) -> None:
        """A WebSocket ping, if the connection is open; the browser answers it whatever its timers do."""
        if self.stomp is not None and self.stomp.open:
            self.ws.send_ping(b"")
            self.send_data()

    def authenticated(self) -> None:
        """CONNECT succeeded: messages up to the authenticated limit (websockets' own ``max_size``)."""
        limit = self.server.authenticated_message_size
        if self._guard is not None:
            if limit < self.server.max_message_size:
                self._guard.limit = limit
            else:
                self._guard = None

    # -- input ------------------------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        """Reassemble messages; websockets itself answers pings and closes."""
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if frame.fin:
                self._message(opcode is _TEXT, bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
                self._fragments_text = opcode is _TEXT
        elif opcode is _CONT:
            fragments = self._fragments
            assert fragments is not None  # websockets fails a continuation with no message
            if len(fragments) >= MAX_FRAGMENTS:
                self._fragments = None
                self._fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
                return
            fragments.append(bytes(frame.data))
            if frame.fin:
                self._fragments = None
                self._message(self._fragments_text, b"".join(fragments))

    def _message(self, text: bool, data: bytes) -> None:
        if self._failed:
            return
        guard = self._guard
        if guard is not None and len(data) > guard.limit:  # compressed: the guard saw the wire size only
            self._too_large(len(data), guard.limit)
            return
        messages = self._messages
        messages.append((text, data))
        if len(messages) > READ_AHEAD_HIGH and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._message_waiter
        if waiter is not None:
            self._message_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _feed(self, connection: StompConnection) -> None:
        """Hand each message to the connection, awaiting it before the next; end when the TCP connection
        is gone (the messages that arrived before the close are still handled, as websockets does)."""
        messages = self._messages
        try:
            while True:
                while messages:
                    # Every message waiting goes to the connection in one call: STOMP frames may span
                    # WebSocket messages anyway, so the joined bytes are the same stream (and a burst of
                    # small messages costs one hand-over, not one per message).
                    batch = messages[:]
                    messages.clear()
                    if self._reading_paused and not self.lost.done():
                        self._reading_paused = False
                        assert self.transport is not None
                        self.transport.resume_reading()
                    error = None
                    for index, (text, data) in enumerate(batch):
                        # RFC 6455 §8.1: a text message that is not UTF-8 fails the connection with 1007,
                        # after the messages before it were handled.
                        if text and (error := _utf8_error(data)) is not None:
                            batch = batch[:index]
                            break
                    if batch:
                        await connection.receive_data(
                            batch[0][1] if len(batch) == 1 else b"".join(data for _, data in batch)
                        )
                    if error is not None:
                        self._fail(CloseCode.INVALID_DATA, error)
                        break
                if self.lost.done():
                    break
                waiter = self._message_waiter = self.loop.create_future()
                await waiter
        except Exception:
            logger.exception("WebSocket connection %s failed", connection.peer)
            if self.stomp is not None:
                with contextlib.suppress(Exception):
                    await self.stomp.close()
        finally:
            await connection.connection_lost()
            self.server.gateway.connection_closed(connection)



def _utf8_error(data: bytes) -> str | None:
    """Why ``data`` is not UTF-8 (the close reason), or None."""
    try:
        data.decode()
    except UnicodeDecodeError as error:
        return f"{error.reason} at position {error.start}"
    return None


class WebSocketServer:
    """The listener of :func:`serve_websocket` and the connections it accepted.

    Offers what :class:`gateway.server.Gateway` uses of an :class:`asyncio.Server`; :meth:`close` also
    closes open WebSockets with 1001 (going away) and :meth:`wait_closed` waits for every connection.
    """

    def __init__(self, gateway: Any, http: HttpResponder) -> None:
        config = gateway.config
        self.gateway = gateway
        self.http = http
        self.loop = asyncio.get_running_loop()
        self.origins: list[Origin | None] | None = None
        if config.allowed_origins:
            self.origins = [*(Origin(origin) for origin in config.allowed_origins), None]
        self.extensions: list[ServerExtensionFactory] | None = None
        if config.compression:
            self.extensions = [
                ServerPerMessageDeflateFactory(
                    server_max_window_bits=12, client_max_window_bits=12, compress_settings={"memLevel": 5}
                )
            ]
        # A WebSocket message may hold one frame plus some slack, with a smaller cap until CONNECT
        # succeeded. Before CONNECT the cap is twice the frame limit, so that a frame a little too large
        # still gets the parser's ERROR frame; far beyond it the connection is closed with 1009.
        self.unauthenticated_message_size = 2 * config.max_frame_size_unauthenticated + MESSAGE_SLACK
        self.authenticated_message_size = config.max_frame_size + MESSAGE_SLACK
        self.max_message_size = max(self.unauthenticated_message_size, self.authenticated_message_size)
        self.protocols: set[WebSocketProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.ping_interval: int = config.ws_ping_interval
        self._pinger: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = self.gateway.config
        ssl_context = None
        if config.certfile:
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.load_cert_chain(config.certfile, config.keyfile)
        self.server = await self.loop.create_server(
            lambda: WebSocketProtocol(self),
            config.host,
            config.port,
            ssl=ssl_context,
            reuse_port=config.workers > 1 or None,
            ssl_handshake_timeout=OPEN_TIMEOUT if ssl_context else None,
            ssl_shutdown_timeout=CLOSE_TIMEOUT if ssl_context else None,
        )
        if self.ping_interval > 0:
            self._pinger = self.loop.create_task(self._ping(), name="websocket-pings")

    async def _ping(self) -> None:
        """Every ``--ws-ping-interval`` seconds, ping each WebSocket that sent nothing since the last round
        (one task for all connections; a busy client is never pinged)."""
        while True:
            await asyncio.sleep(self.ping_interval)
            for protocol in list(self.protocols):
                if not protocol.heard:
                    protocol.ping()
                protocol.heard = False

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self.server.sockets) if self.server is not None else ()

    def is_serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    def close(self) -> None:
        """Stop listening; close open WebSockets with 1001 (a handshake still to come is answered 503)."""
        if self.server is not None:
            self.server.close()
        if self._pinger is not None:
            self._pinger.cancel()
        for protocol in list(self.protocols):
            protocol.going_away()

    async def wait_closed(self) -> None:
        """Return when every connection is closed and handled to its end."""
        lost = [protocol.lost for protocol in self.protocols]
        if lost:
            await asyncio.wait(lost)
        if self.tasks:
            await asyncio.wait(list(self.tasks))
        if self.server is not None:
            await self.server.wait_closed()


async def serve_websocket(gateway: Any, http: HttpResponder) -> WebSocketServer:
    """Start the WebSocket + HTTP listener of ``gateway`` (a :class:`gateway.server.Gateway`)."""
    server = WebSocketServer(gateway, http)
    await server.start()
    return server
