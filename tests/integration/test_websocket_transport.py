"""The WebSocket adapter (``gateway/transport/websocket.py``) over a raw socket: what it owns beside
websockets' sans-I/O protocol — message-size limits that change at CONNECT, frames that arrive with the
upgrade request, fragments, control frames, the closing handshake, shutdown, compression."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest
from websockets.frames import Close, CloseCode, Frame, Opcode

from gateway.server import Gateway
from tests.conftest import make_config
from tests.integration.test_protocol_edges import CONNECT, read_close_code, read_connected, read_server_frame
from tests.stomp_client import StompClient, frame, open_ws


def client_frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame of any length, serialized by websockets."""
    return Frame(opcode, payload, fin).serialize(mask=True)


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Protocol: v12.stomp",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def upgraded(port: int, behind: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """An upgraded raw connection; ``behind`` goes out in the same write as the request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request(port) + behind)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer, head


async def http_head(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


def port_of(gateway: Gateway) -> int:
    assert gateway.port is not None
    return gateway.port


class TestHandshake:
    async def test_no_server_header_on_the_upgrade_or_on_plain_http(self, gateway: Gateway) -> None:
        port = port_of(gateway)
        _, writer, head = await upgraded(port)
        writer.close()
        assert b"\r\nserver:" not in head.lower()
        http = await http_head(port, "/healthz")
        assert http.startswith(b"HTTP/1.1 200 ") and b"\r\nserver:" not in http.lower()

    async def test_frames_in_the_same_write_as_the_request_are_handled(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway), client_frame(Opcode.TEXT, CONNECT))
        try:
            await read_connected(reader)
        finally:
            writer.close()

    @pytest.mark.parametrize("cut", [0, 1, 2, 5, 30], ids=["whole", "1-byte", "before-mask", "header", "payload"])
    async def test_a_frame_cut_anywhere_behind_the_request_is_read_whole(self, gateway: Gateway, cut: int) -> None:
        """The adapter reads the common frames itself once websockets' parser stands between frames; a frame
        begun behind the request and finished in a later write must still come out whole, and so must the
        frames after it. The masking key looks like the start of a frame (final, text, masked, empty), so
        that reading the rest of the cut frame as a new one could not go unnoticed."""
        mask = b"\x81\x80\x00\x00"
        connect = bytes((0x81, 0x80 | len(CONNECT))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(CONNECT))
        send = client_frame(Opcode.TEXT, b"SUBSCRIBE\ndestination:/topic/cut\nid:0\nreceipt:r\n\n\x00")
        behind, later = (connect, send) if cut == 0 else (connect[:cut], connect[cut:] + send)
        reader, writer, _ = await upgraded(port_of(gateway), behind)
        try:
            await asyncio.sleep(0.05)
            writer.write(later)
            await read_connected(reader)
            opcode, receipt = await read_server_frame(reader)
            assert opcode == 0x1 and receipt.startswith(b"RECEIPT\nreceipt-id:r\n"), receipt
        finally:
            writer.close()

    async def test_a_huge_frame_right_behind_the_request_is_refused(self, gateway: Gateway) -> None:
        huge = bytes((0x81, 0x80 | 127)) + (2**20).to_bytes(8, "big") + os.urandom(4)  # a 1 MiB frame's header
        reader, writer, _ = await upgraded(port_of(gateway), huge)
        try:
            assert await read_close_code(reader) == CloseCode.MESSAGE_TOO_BIG
        finally:
            writer.close()

    async def test_a_handshake_that_arrives_during_shutdown_is_503(self, backend: str) -> None:
        gw = Gateway(make_config(backend))
        await gw.start()
        port = port_of(gw)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stopping = asyncio.create_task(gw.stop())
        try:
            await asyncio.sleep(0.1)  # the listener is closed; this connection was accepted before
            writer.write(upgrade_request(port))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 503 "), head
        finally:
            writer.close()
            await stopping


class TestMessageSize:
    """Before CONNECT a message may be 2 x --max-frame-size-unauthenticated + 4 KiB, after it
    --max-frame-size + 4 KiB; beyond that the connection closes with 1009."""

    async def test_before_connect_a_huge_frame_is_refused_from_its_header(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway))
        try:
            # Only the header of a 1 MiB frame: refused at once, without waiting for (or buffering) it.
            writer.write(bytes((0x81, 0x80 | 127)) + (2**20).to_bytes(8, "big") + os.urandom(4) + b"CONN")
            assert await read_close_code(reader) == CloseCode.MESSAGE_TOO_BIG
        finally:
            writer.close()

    async def test_before_connect_a_fragmented_message_counts_whole(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway))
        try:
            writer.write(client_frame(Opcode.TEXT, b"CONNECT\nx:" + b"a" * 100_000, fin=False))
            writer.write(client_frame(Opcode.CONT, b"a" * 100_000))
            assert await read_close_code(reader) == CloseCode.MESSAGE_TOO_BIG
        finally:
            writer.close()

    async def test_after_connect_larger_messages_pass(self, connected: StompClient, unique: str) -> None:
        body = "x" * 300_000  # over the cap before CONNECT, within --max-frame-size (4 MiB)
        await connected.send(frame("SEND", body, destination=f"/queue/big-{unique}", receipt="big"))
        await connected.receipt("big")
        await connected.send(frame("SUBSCRIBE", destination=f"/queue/big-{unique}", id="1"))
        message = await connected.receive_command("MESSAGE")
        assert message.body == body.encode()

    async def test_after_connect_far_over_max_frame_size_is_1009(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway))
        try:
            writer.write(client_frame(Opcode.TEXT, CONNECT))
            await read_connected(reader)
            size = 4 * 1024 * 1024 + 4096 + 1  # --max-frame-size (4 MiB) + 4 KiB + 1: only its header
            writer.write(bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big") + os.urandom(4) + b"SEND")
            assert await read_close_code(reader) == CloseCode.MESSAGE_TOO_BIG
        finally:
            writer.close()

    @pytest.mark.parametrize("gateway_overrides", [{"max_frame_size": 100_000}])
    async def test_after_connect_the_limit_may_also_be_lower(self, connected: StompClient) -> None:
        """--max-frame-size 100000: 104,096 after CONNECT, below the 135,168 allowed before it."""
        assert connected.ws is not None
        await connected.ws.send(b"SEND\ndestination:/queue/x\n\n" + b"x" * 120_000 + b"\x00")
        await connected.wait_closed()
        assert connected.ws.close_code == CloseCode.MESSAGE_TOO_BIG

    @pytest.mark.parametrize("gateway_overrides", [{"compression": True}])
    async def test_compressed_the_limit_applies_to_the_inflated_size(self, ws_url: str) -> None:
        client = await open_ws(ws_url)  # websockets' client compresses: 500 KB of "a" is a few hundred bytes
        try:
            assert client.ws is not None
            await client.ws.send("CONNECT\nx:" + "a" * 500_000)
            await client.wait_closed()
            assert client.ws.close_code == CloseCode.MESSAGE_TOO_BIG
        finally:
            await client.close()


class TestFramesAndControl:
    async def test_a_ping_is_answered_with_its_payload(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway))
        try:
            writer.write(client_frame(Opcode.PING, b"are you there"))
            assert await read_server_frame(reader) == (Opcode.PONG, b"are you there")
        finally:
            writer.close()

    async def test_a_binary_message_in_fragments_with_a_ping_between(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway))
        try:
            cut = len(CONNECT) // 2
            writer.write(client_frame(Opcode.BINARY, CONNECT[:cut], fin=False))
            writer.write(client_frame(Opcode.PING, b"p"))
            writer.write(client_frame(Opcode.CONT, CONNECT[cut:]))
            assert await read_server_frame(reader) == (Opcode.PONG, b"p")
            await read_connected(reader)
        finally:
            writer.close()

    async def test_more_than_4096_fragments_is_1009(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway))
        try:
            pieces = [client_frame(Opcode.TEXT, b"C", fin=False)]
            pieces += [client_frame(Opcode.CONT, b"\n", fin=False)] * 4096
            writer.write(b"".join(pieces))
            assert await read_close_code(reader) == CloseCode.MESSAGE_TOO_BIG
        finally:
            writer.close()

    async def test_the_client_closes_the_server_echoes_then_ends_the_stream(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway))
        try:
            writer.write(client_frame(Opcode.TEXT, CONNECT))
            await read_connected(reader)
            writer.write(client_frame(Opcode.CLOSE, Close(CloseCode.NORMAL_CLOSURE, "bye").serialize()))
            opcode, payload = await read_server_frame(reader)
            assert (opcode, Close.parse(payload)) == (Opcode.CLOSE, Close(CloseCode.NORMAL_CLOSURE, "bye"))
            assert await asyncio.wait_for(reader.read(), 10) == b""  # the server ended the stream
        finally:
            writer.close()

    async def test_the_server_sends_no_websocket_pings(self, gateway: Gateway) -> None:
        reader, writer, _ = await upgraded(port_of(gateway))
        try:
            writer.write(client_frame(Opcode.TEXT, CONNECT))
            await read_connected(reader)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 1.5)
        finally:
            writer.close()

    async def test_shutdown_closes_open_websockets_with_1001(self, backend: str) -> None:
        gw = Gateway(make_config(backend))
        await gw.start()
        reader, writer, _ = await upgraded(port_of(gw))
        try:
            writer.write(client_frame(Opcode.TEXT, CONNECT))
            await read_connected(reader)
            stopping = asyncio.create_task(gw.stop())
            opcode, payload = await read_server_frame(reader)
            assert (opcode, struct.unpack("!H", payload[:2])[0]) == (Opcode.CLOSE, CloseCode.GOING_AWAY)
            writer.write(client_frame(Opcode.CLOSE, payload))
            await asyncio.wait_for(stopping, 10)
        finally:
            writer.close()


class TestCompression:
    @pytest.mark.parametrize("gateway_overrides", [{"compression": True}])
    async def test_a_fanned_out_message_reaches_every_compressed_connection(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        for _ in range(3):
            c = await open_ws(ws_url)
            clients.append(c)
            await c.connect()
            await c.send(frame("SUBSCRIBE", destination=f"/topic/z-{unique}", id="sub-0", receipt="r"))
            await c.receipt("r")
        body = "compressible " * 1000
        await clients[0].send(frame("SEND", body, destination=f"/topic/z-{unique}"))
        for c in clients:
            message = await c.receive_command("MESSAGE")
            assert message.body == body.encode()
        assert clients[0].ws is not None
        assert any(ext.name == "permessage-deflate" for ext in clients[0].ws.protocol.extensions)
