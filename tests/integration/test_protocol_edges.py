"""Protocol edges beyond the basic tests (real sockets, both brokers): RabbitMQ's NACK ``requeue`` values
other than false, and RFC 6455 cases a naive implementation gets wrong (UTF-8 across fragments, repeated
handshake headers).

RabbitMQ 3.10.8's own STOMP listener, probed the same way, requeues on ``requeue:True``, ``true``,
absent, and on any unrecognised value such as ``bogus`` (its ``boolean_header`` treats it as absent).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest

from gateway.broker.base import Channel
from gateway.server import Gateway
from tests.stomp_client import StompClient, frame, open_ws


async def connected_client(ws_url: str, clients: list[StompClient], version: str = "1.2") -> StompClient:
    c = await open_ws(ws_url)
    clients.append(c)
    await c.connect(version)
    return c


async def subscribe(c: StompClient, destination: str, sub_id: str, **headers: str) -> None:
    await c.send(frame("SUBSCRIBE", destination=destination, id=sub_id, receipt=f"sub-{sub_id}", **headers))
    await c.receipt(f"sub-{sub_id}")


# --------------------------------------------------------------------------------------------------------
# STOMP 1.2 — NACK; RabbitMQ's boolean headers


class TestNackRequeue:
    """NACK ``requeue``: only false/False dead-letter (tests/integration/test_messaging.py); true, True,
    absent or unrecognised requeue."""

    @pytest.mark.parametrize("value", ["True", "true", "bogus", None])
    async def test_requeue_true_absent_or_unrecognised_redelivers(
        self, ws_url: str, clients: list[StompClient], backdoor: Channel, unique: str, value: str | None
    ) -> None:
        c = await connected_client(ws_url, clients)
        source = f"nack-again-{unique}"
        try:
            await subscribe(c, f"/queue/{source}", "src", ack="client-individual")
            await c.send(frame("SEND", "again", destination=f"/queue/{source}", receipt="s"))
            await c.receipt("s")
            message = await c.receive_command("MESSAGE")
            extra = {} if value is None else {"requeue": value}
            await c.send(frame("NACK", id=message.get("ack") or "", receipt="n", **extra))
            await c.receipt("n")
            again = await c.receive_command("MESSAGE")
            assert (again.body, again.get("redelivered")) == (b"again", "true")
            await c.send(frame("ACK", id=again.get("ack") or "", receipt="a"))
            await c.receipt("a")
        finally:
            await backdoor.delete_queue(source)


# --------------------------------------------------------------------------------------------------------
# RFC 6455 MUSTs, over a raw socket


UPGRADE = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13")


async def raw_upgrade(
    gateway: Gateway, headers: tuple[str, ...] = UPGRADE
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send an upgrade request for ``/ws`` with ``headers`` (plus Host, a key and the STOMP subprotocol);
    return the stream and the response head (through the blank line)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: 127.0.0.1:{gateway.port}",
        *headers,
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Protocol: v12.stomp",
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client-to-server WebSocket frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", (0x80 if fin else 0) | opcode, 0x80 | length)
    else:
        header = struct.pack("!BBH", (0x80 if fin else 0) | opcode, 0x80 | 126, length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next unmasked server frame."""
    first, second = await asyncio.wait_for(reader.readexactly(2), 10)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(length), 10)


async def read_close_code(reader: asyncio.StreamReader) -> int:
    """Skip data frames up to the server's close frame; return its status code."""
    while True:
        opcode, payload = await read_server_frame(reader)
        if opcode == 0x8:
            (code,) = struct.unpack("!H", payload[:2])
            return code


CONNECT = b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00"


async def read_connected(reader: asyncio.StreamReader) -> None:
    opcode, payload = await read_server_frame(reader)
    assert opcode == 0x1 and payload.startswith(b"CONNECTED\n"), (opcode, payload)


class TestRfc6455:
    async def test_a_repeated_version_header_is_426_not_a_server_error(self, gateway: Gateway) -> None:
        """Two Sec-WebSocket-Version lines are no supported version: 426 naming 13 (it used to raise in
        process_request: 500 and a logged traceback per request)."""
        _, writer, head = await raw_upgrade(gateway, (*UPGRADE, "Sec-WebSocket-Version: 8"))
        try:
            status, *lines = head.decode("latin-1").split("\r\n")
            assert status.startswith("HTTP/1.1 426 "), status
            assert "Sec-WebSocket-Version: 13" in lines
        finally:
            writer.close()

    async def test_connection_header_split_over_two_lines_is_accepted(self, gateway: Gateway) -> None:
        """RFC 9110 §5.3: a list header may come as several lines (``keep-alive`` then ``Upgrade``)."""
        headers = (
            "Upgrade: websocket",
            "Connection: keep-alive",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
        )
        reader, writer, head = await raw_upgrade(gateway, headers)
        try:
            assert head.startswith(b"HTTP/1.1 101 "), head
            writer.write(client_frame(0x1, CONNECT))
            await read_connected(reader)
        finally:
            writer.close()

    @pytest.mark.parametrize(
        "payload",
        [b"\xff\xfe", b"SEND\ndestination:/queue/x\n\n\xc3\x28\x00", b"\xed\xa0\x80"],
        ids=["garbage", "in-a-body", "surrogate"],
    )
    async def test_invalid_utf8_text_fails_with_1007(self, gateway: Gateway, payload: bytes) -> None:
        """RFC 6455 §8.1: a text message that is not UTF-8 fails the connection with 1007."""
        reader, writer, head = await raw_upgrade(gateway)
        try:
            assert head.startswith(b"HTTP/1.1 101 ")
            writer.write(client_frame(0x1, CONNECT))
            await read_connected(reader)
            writer.write(client_frame(0x1, payload))
            assert await read_close_code(reader) == 1007
        finally:
            writer.close()

    async def test_invalid_utf8_split_across_fragments_fails_with_1007(self, gateway: Gateway) -> None:
        reader, writer, head = await raw_upgrade(gateway)
        try:
            assert head.startswith(b"HTTP/1.1 101 ")
            writer.write(client_frame(0x1, b"CONNECT\naccept-version:1.2\n\xc3", fin=False))
            writer.write(client_frame(0x0, b"\x28\n\x00"))
            assert await read_close_code(reader) == 1007
        finally:
            writer.close()

    async def test_utf8_split_across_fragments_and_binary_bytes_are_accepted(
        self, gateway: Gateway, unique: str
    ) -> None:
        """Valid UTF-8 cut inside a character is fine; binary messages may carry any bytes."""
        reader, writer, head = await raw_upgrade(gateway)
        try:
            assert head.startswith(b"HTTP/1.1 101 ")
            queue = f"/exchange/amq.direct/utf8-{unique}"
            writer.write(client_frame(0x1, CONNECT))
            await read_connected(reader)
            subscribe = f"SUBSCRIBE\nid:1\ndestination:{queue}\nreceipt:r\n\n\x00".encode()
            writer.write(client_frame(0x1, subscribe))
            assert (await read_server_frame(reader))[1].startswith(b"RECEIPT\nreceipt-id:r\n")
            text = f"SEND\ndestination:{queue}\n\n".encode() + "é".encode() + b"\x00"
            cut = text.index(b"\xc3") + 1
            writer.write(client_frame(0x1, text[:cut], fin=False) + client_frame(0x0, text[cut:]))
            writer.write(client_frame(0x2, f"SEND\ndestination:{queue}\n\n".encode() + b"\xff\xfe\x00"))
            first = (await read_server_frame(reader))[1]
            second = (await read_server_frame(reader))[1]
            assert first.startswith(b"MESSAGE\n") and first.endswith("\n\né".encode() + b"\x00")
            assert second.startswith(b"MESSAGE\n") and second.endswith(b"\n\n\xff\xfe\x00")
        finally:
            writer.close()
