"""STOMP over plain TCP (``--tcp-port``, usually 61613): the same session, a second thin transport."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from gateway.connection import Backlog, StompConnection, Transport
from gateway.metrics import TALLY

__all__ = ["TcpTransport", "serve_tcp"]

READ_SIZE = 64 * 1024


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
        peer = "{}:{}".format(*peer_info[:2]) if peer_info else "?"
        connection = StompConnection(
            TcpTransport(writer), gateway.broker, gateway.registry, gateway.connection_settings, peer=peer
        )
        gateway.connection_opened(connection)
        try:
            while not connection.closed.is_set():
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
