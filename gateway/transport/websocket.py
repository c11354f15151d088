"""STOMP over WebSocket: ``ws://HOST:PORT/ws`` with the v10/v11/v12.stomp subprotocols.

Plain HTTP GETs on the same port are answered by :mod:`gateway.transport.http` (the page, ``/healthz``,
``/metrics``). Frames are written synchronously into the connection's write buffer (no await per
message); :class:`StompConnection` watches that buffer and disconnects a client that falls too far behind.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from gateway.connection import Backlog, Handshake, StompConnection, Transport
from gateway.metrics import TALLY
from gateway.stomp.writer import MessageTemplate
from gateway.transport.http import HttpResponder

__all__ = ["SUBPROTOCOLS", "WebSocketTransport", "select_subprotocol", "serve_websocket", "websocket_frame"]

logger = logging.getLogger(__name__)

#: Highest first: the highest version the client offers wins.
SUBPROTOCOLS = (Subprotocol("v12.stomp"), Subprotocol("v11.stomp"), Subprotocol("v10.stomp"))
WS_PATH = "/ws"
_EOL = b"\n"


def select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """The highest STOMP subprotocol offered; a client offering none is accepted too (as Web-STOMP does)."""
    for subprotocol in SUBPROTOCOLS:
        if subprotocol in offered:
            return subprotocol
    return None


def websocket_frame(payload: bytes, text: bool) -> bytes:
    """One unfragmented, unmasked server-to-client WebSocket frame (RFC 6455 §5.2)."""
    first = 0x81 if text else 0x82
    length = len(payload)
    if length < 126:
        header = bytes((first, length))
    elif length < 65536:
        header = bytes((first, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + length.to_bytes(8, "big")
    return header + payload


_WROTE: list[bytes] = []  # sentinel, never appended to

#: The template framed last, and its frames by (version family, subscription id)
_framed_template: MessageTemplate | None = None
_framed: dict[tuple[str, str | None], bytes] = {}


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


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = weakref.WeakKeyDictionary()


def _flusher_for(loop: asyncio.AbstractEventLoop) -> _Flusher:
    flusher = _FLUSHERS.get(loop)
    if flusher is None:
        flusher = _FLUSHERS[loop] = _Flusher(loop)
    return flusher


class WebSocketTransport(Transport):
    """Writes frames as WebSocket messages: text when the frame is UTF-8, binary otherwise.

    Without extensions (compression off, the default) a server frame is the same bytes for every
    connection, so a fanned-out MESSAGE is framed once, and the frames written to one connection during
    one pass of the event loop go out in one ``send()``. With permessage-deflate each connection
    compresses through websockets itself, one message at a time.
    """

    __slots__ = ("_backlog", "_loop", "_pending", "max_message_size", "raw", "ws")

    kind = "websocket"

    def __init__(self, ws: ServerConnection, max_unauthenticated: int, max_message_size: int) -> None:
        self.ws = ws
        self.raw = not ws.protocol.extensions
        self._loop = asyncio.get_running_loop()
        self._backlog = Backlog(self._buffer_size)
        #: None: nothing written in this pass of the loop; _WROTE: one frame written, none waiting
        self._pending: list[bytes] | None = None
        # A WebSocket message may hold one frame plus 4 KiB of slack (as Web-STOMP), with a smaller cap
        # until CONNECT succeeded. Before CONNECT the cap is twice the frame limit, so that a frame a
        # little too large still gets the parser's ERROR frame; far beyond it websockets closes with 1009.
        self.max_message_size = max_message_size + 4096
        ws.protocol.max_message_size = 2 * max_unauthenticated + 4096

    def authenticated(self) -> None:
        self.ws.protocol.max_message_size = self.max_message_size

    def _queue(self, wire: bytes) -> None:
        pending = self._pending
        if pending is None:
            # The first frame of this pass goes out at once (no added latency); later ones of the same
            # pass are batched and written together when the pass ends.
            self._pending = _WROTE
            _flusher_for(self._loop).add(self)
            transport = self.ws.transport
            if transport is not None:
                transport.write(wire)
                self._backlog.wrote(len(wire))
                TALLY.bytes_sent += len(wire)
        elif pending is _WROTE:
            self._pending = [wire]
        else:
            pending.append(wire)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        ws = self.ws
        if not pending or ws.protocol.state is not State.OPEN or ws.transport is None:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        ws.transport.write(data)
        self._backlog.wrote(len(data))
        TALLY.bytes_sent += len(data)

    def write(self, data: bytes, text: bool) -> None:
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            return
        if self.raw:
            self._queue(websocket_frame(data, text))
            return
        before = self._buffer_size()
        if text:
            ws.protocol.send_text(data)
        else:
            ws.protocol.send_binary(data)
        ws.send_data()
        # Compressed, the size is known only from the buffer: what the kernel did not take at once.
        self._backlog.wrote(self._buffer_size() - before)
        TALLY.bytes_sent += len(data)  # before compression

    def write_message(self, template: MessageTemplate, version: str, subscription: str | None) -> None:
        if not self.raw:
            self.write(template.render(version, subscription), template.is_text)
            return
        if self.ws.protocol.state is not State.OPEN:
            return
        # The fan-out hands one template to every session of its group in a row: one framing each.
        global _framed_template, _framed
        if template is not _framed_template:
            _framed_template, _framed = template, {}
        key = ("1.0" if version == "1.0" else "1.2", subscription)
        wire = _framed.get(key)
        if wire is None:
            wire = _framed[key] = websocket_frame(template.render(version, subscription), template.is_text)
        self._queue(wire)

    def write_heartbeat(self) -> None:
        self.write(_EOL, True)

    @property
    def buffered(self) -> int:
        """What the kernel has not taken yet; this pass's batch (flushed right after it) does not count."""
        return self._buffer_size()

    def _buffer_size(self) -> int:
        transport = self.ws.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    @property
    def backlog(self) -> int:
        return self._backlog.behind_head()

    async def drain(self) -> None:
        self._flush()
        if self.ws.protocol.state is State.OPEN:
            await self.ws.drain()

    async def close(self) -> None:
        self._flush()  # queued frames (an ERROR, a RECEIPT) go out before the close frame
        await self.ws.close()

    def abort(self) -> None:
        if self.ws.transport is not None:
            self.ws.transport.abort()


async def serve_websocket(gateway: Any, http: HttpResponder) -> Server:
    """Start the WebSocket + HTTP listener of ``gateway`` (a :class:`gateway.server.Gateway`)."""
    config = gateway.config

    #: what the upgrade request told of each client (address, token), from process_request to the handler
    handshakes: weakref.WeakKeyDictionary[ServerConnection, Handshake] = weakref.WeakKeyDictionary()

    async def handler(ws: ServerConnection) -> None:
        handshake = handshakes.pop(ws, None) or gateway.handshake(ws.remote_address)
        transport = WebSocketTransport(ws, config.max_frame_size_unauthenticated, config.max_frame_size)
        connection = StompConnection(
            transport, gateway.broker, gateway.registry, gateway.connection_settings, handshake=handshake
        )
        gateway.connection_opened(connection)
        try:
            while True:
                # Text messages are decoded, so invalid UTF-8 fails the connection with 1007 (RFC 6455
                # §8.1); the codec takes bytes.
                message = await ws.recv()
                await connection.receive_data(message.encode() if isinstance(message, str) else message)
        except ConnectionClosed:
            pass
        finally:
            await connection.connection_lost()
            gateway.connection_closed(connection)

    def process_request(ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        # get_all(): a header sent twice must not raise here (that would be a 500 and a logged traceback
        # per request); Connection may legitimately be split over several lines (RFC 9110 §5.3).
        connection = ", ".join(request.headers.get_all("Connection")).lower()
        if path == WS_PATH and "upgrade" in connection:
            if request.headers.get_all("Sec-WebSocket-Version") != ["13"]:
                # RFC 6455 §4.4: name the version this server speaks.
                response = ws.respond(HTTPStatus.UPGRADE_REQUIRED, "Only WebSocket version 13 is supported\n")
                response.headers["Sec-WebSocket-Version"] = "13"
                return response
            # The door: who the client is (behind trusted proxies), its token, and whether it may come in.
            query = request.path.split("?", 1)[1] if "?" in request.path else ""
            handshake = gateway.handshake(ws.remote_address, query=query, headers=request.headers.get_all)
            refusal = gateway.refusal(handshake.address)
            if refusal is not None:
                response = ws.respond(HTTPStatus(refusal.status), refusal.text)
                response.headers["Retry-After"] = str(refusal.retry_after)
                return response
            handshakes[ws] = handshake
            return None
        return http.respond(request)

    ssl_context = None
    if config.certfile:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(config.certfile, config.keyfile)
    origins: list[str | None] | None = None
    if config.allowed_origins:
        origins = [*config.allowed_origins, None]
    extensions = None
    compression: str | None = None
    if config.compression:
        extensions = [
            ServerPerMessageDeflateFactory(
                server_max_window_bits=12, client_max_window_bits=12, compress_settings={"memLevel": 5}
            )
        ]
    return await serve(
        handler,
        config.host,
        config.port,
        origins=origins,  # type: ignore[arg-type]
        subprotocols=list(SUBPROTOCOLS),
        select_subprotocol=select_subprotocol,
        compression=compression,
        extensions=extensions,
        process_request=process_request,
        server_header=None,
        max_size=config.max_frame_size + 4096,
        ping_interval=None,  # STOMP heart-beats do this job; browsers can't see WebSocket pings anyway
        max_queue=16,
        write_limit=2**16,
        ssl=ssl_context,
        reuse_port=config.workers > 1 or None,
    )
