"""A small STOMP test client over a real WebSocket (or TCP), built on the project's codec."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.stomp.frames import Frame, FrameParser, Limits

__all__ = ["StompClient", "frame", "open_ws"]


def frame(command: str, body: bytes | str = b"", **headers: str) -> Frame:
    """Build a frame; header names use ``_`` for ``-`` (``content_type`` → ``content-type``)."""
    if isinstance(body, str):
        body = body.encode()
    return Frame(command, tuple((k.replace("_", "-"), v) for k, v in headers.items()), body)


class StompClient:
    """Sends frames, receives frames; every receive has a timeout so a test can never hang."""

    def __init__(
        self,
        ws: ClientConnection | None = None,
        *,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
    ) -> None:
        self.ws = ws
        self.reader = reader
        self.writer = writer
        self.parser = FrameParser(
            Limits(max_frame_size_unauthenticated=64 * 1024 * 1024, max_frame_size=64 * 1024 * 1024)
        )
        self.parser.version = "1.2"
        self.parser.authenticated = True
        self.version = "1.2"
        self.frames: asyncio.Queue[Frame] = asyncio.Queue()
        self.raw_messages: list[bytes | str] = []
        self.heartbeats = 0
        self.closed = asyncio.Event()
        self._stash: list[Frame] = []
        self._reader_task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                if self.ws is not None:
                    message = await self.ws.recv()
                    self.raw_messages.append(message)
                    data = message.encode() if isinstance(message, str) else message
                else:
                    assert self.reader is not None
                    data = await self.reader.read(65536)
                    if not data:
                        break
                if data.strip(b"\r\n") == b"":
                    self.heartbeats += 1
                    continue
                self.parser.receive_data(data)
                while (parsed := self.parser.next_frame()) is not None:
                    await self.frames.put(parsed)
        except (ConnectionClosed, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()

    async def send(self, f: Frame | bytes | str) -> None:
        data = f.serialize(self.version) if isinstance(f, Frame) else f
        if self.ws is not None:
            await self.ws.send(data)
        else:
            assert self.writer is not None
            self.writer.write(data.encode() if isinstance(data, str) else data)
            await self.writer.drain()

    async def receive(self, timeout: float = 5.0) -> Frame:
        if self._stash:
            return self._stash.pop(0)
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def receipt(self, receipt_id: str, timeout: float = 5.0) -> Frame:
        """Wait for RECEIPT ``receipt_id``; frames that arrive first stay queued for :meth:`receive`."""
        skipped: list[Frame] = []
        try:
            while True:
                f = await asyncio.wait_for(self.frames.get(), timeout)
                if f.command == "RECEIPT" and f.get("receipt-id") == receipt_id:
                    return f
                assert f.command != "ERROR", (
                    f"ERROR while waiting for receipt {receipt_id}: {f.headers} {f.body!r}"
                )
                skipped.append(f)
        finally:
            self._stash.extend(skipped)

    async def receive_command(self, command: str, timeout: float = 5.0) -> Frame:
        f = await self.receive(timeout)
        assert f.command == command, f"expected {command}, got {f.command} {f.headers} {f.body[:200]!r}"
        return f

    async def nothing(self, wait: float = 0.3) -> None:
        """Assert that no frame arrives within ``wait`` seconds."""
        if self._stash:
            raise AssertionError(f"unexpected frame {self._stash[0]}")
        try:
            f = await asyncio.wait_for(self.frames.get(), wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {f.command} {f.headers} {f.body[:200]!r}")

    async def connect(self, version: str = "1.2", **headers: str) -> Frame:
        headers.setdefault("accept_version", version)
        headers.setdefault("host", "/")
        await self.send(frame("CONNECT", **headers))
        connected = await self.receive_command("CONNECTED")
        self.version = connected.get("version") or "1.0"
        self.parser.version = self.version
        return connected

    async def wait_closed(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.closed.wait(), timeout)

    async def close(self) -> None:
        self._reader_task.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.writer is not None:
            self.writer.close()


async def open_ws(
    url: str, subprotocols: Sequence[str] | None = ("v12.stomp", "v11.stomp", "v10.stomp"), **kwargs: object
) -> StompClient:
    ws = await connect(url, subprotocols=list(subprotocols) if subprotocols else None, **kwargs)  # type: ignore[arg-type]
    return StompClient(ws)


async def open_tcp(host: str, port: int) -> StompClient:
    reader, writer = await asyncio.open_connection(host, port)
    return StompClient(reader=reader, writer=writer)
