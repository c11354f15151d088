"""STOMP over plain TCP (``--tcp-port``, usually 61613): the same session, a second thin transport."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from gateway.connection import Backlog, StompConnection, Transport
from gateway.metrics import TALLY
from gateway.proxy import ProxyHeaderError, is_proxy_header, parse_proxy_header

__all__ = ["TcpTransport", "serve_tcp"]

READ_SIZE = 64 * 1024
#: seconds a trusted proxy has to send its PROXY header (or the first bytes that show it sends none)
PROXY_HEADER_TIMEOUT = 10.0


async def read_proxy_header(reader: asyncio.StreamReader) -> tuple[tuple[str, int] | None, bytes]:
    """From a trusted proxy's connection: the client address of its PROXY header (None: no header, or
    UNKNOWN/LOCAL) and the bytes read past it. Raises :class:`ProxyHeaderError` for a malformed header."""
    data = b""
    while True:
        chunk = await reader.read(READ_SIZE)
        if not chunk:
            raise ProxyHeaderError("connection closed in the PROXY header")
        data += chunk
        starts = is_proxy_header(data)
        if starts is False:
            return None, data
        if starts is None:
            continue
        parsed = parse_proxy_header(data)
        if parsed is not None:
            consumed, address = parsed
            return address, data[consumed:]


class TcpTransport(Transport):
    __slots__ = ("_backlog", "writer")

    kind = "tcp"

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._backlog = Backlog(writer.transport.get_write_buffer_size)

    def write(self, data: bytes, text: bool) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)
            self._backlog.wrote(len(data))
            TALLY.bytes_sent += len(data)

    def write_heartbeat(self) -> None:
        self.write(b"\n", True)

    @property
    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    @property
    def backlog(self) -> int:
        return self._backlog.behind_head()

    async def drain(self) -> None:
        if not self.writer.is_closing():
            await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    def abort(self) -> None:
        self.writer.transport.abort()


async def serve_tcp(gateway: Any) -> asyncio.Server:
    config = gateway.config

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername")
        proxied, first = None, b""
        if peer_info and gateway.trusted_proxies.trusts(peer_info[0]):
            try:
                proxied, first = await asyncio.wait_for(read_proxy_header(reader), PROXY_HEADER_TIMEOUT)
            except (ProxyHeaderError, TimeoutError, ConnectionError, OSError):
                writer.close()
                return
        handshake = gateway.handshake(peer_info, proxied=proxied)
        if gateway.refusal(handshake.address) is not None:
            writer.close()  # STOMP has no refusal before CONNECT; the metric and the log say why
            return
        connection = StompConnection(
            TcpTransport(writer), gateway.broker, gateway.registry, gateway.connection_settings, handshake=handshake
        )
        gateway.connection_opened(connection)
        try:
            if first:
                await connection.receive_data(first)
            while not connection.ended:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                await connection.receive_data(data)
        except (ConnectionError, OSError):
            pass
        finally:
            await connection.connection_lost()
            gateway.connection_closed(connection)
            writer.close()

    ssl_context = None
    if config.certfile:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(config.certfile, config.keyfile)
    return await asyncio.start_server(
        handle, config.host, config.tcp_port, ssl=ssl_context, limit=READ_SIZE, reuse_port=config.workers > 1 or None
    )
