"""Heart-beats, named limits, slow clients and the TCP transport (real sockets, both brokers)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gateway.server import Gateway
from tests.stomp_client import StompClient, frame, open_tcp, open_ws


class TestHeartBeating:
    """STOMP 1.2 — Heart-beating"""

    async def test_server_sends_eols_when_idle(self, client: StompClient) -> None:
        connected = await client.connect(heart_beat="0,1000")
        assert connected.get("heart-beat") == "1000,0"
        await asyncio.sleep(2.6)
        assert client.heartbeats >= 2

    @pytest.mark.parametrize("gateway_overrides", [{"heartbeat_min": 200}])
    async def test_server_closes_a_client_whose_heart_beats_stop(self, client: StompClient) -> None:
        connected = await client.connect(heart_beat="200,0")
        assert connected.get("heart-beat") == "0,200"
        started = time.monotonic()
        error = await client.receive_command("ERROR", timeout=3)
        assert error.get("message") == "Heart-beat timeout"
        await client.wait_closed()
        assert time.monotonic() - started >= 0.4  # two intervals

    @pytest.mark.parametrize("gateway_overrides", [{"heartbeat_min": 200}])
    async def test_client_heart_beats_keep_the_session(self, client: StompClient) -> None:
        await client.connect(heart_beat="200,0")
        for _ in range(8):
            await asyncio.sleep(0.15)
            await client.send(b"\n")
        assert not client.closed.is_set()

    async def test_server_minimum_and_maximum(self, client: StompClient) -> None:
        connected = await client.connect(heart_beat="10,5000000")
        # the defaults: at least 1000 ms, at most 600000 ms
        assert connected.get("heart-beat") == "600000,1000"


class TestFrameLimits:
    """Every limit is an ERROR and a close, never unbounded memory."""

    async def test_frame_too_large_before_connect(self, client: StompClient) -> None:
        await client.send(b"CONNECT\nx:" + b"a" * 70_000)
        error = await client.receive_command("ERROR")
        assert error.get("message") == "Frame too large"
        await client.wait_closed()

    async def test_huge_message_before_connect_is_refused_by_the_websocket_layer(self, client: StompClient) -> None:
        await client.send(b"CONNECT\nx:" + b"a" * 500_000)
        await client.wait_closed()
        assert client.ws is not None and client.ws.close_code == 1009

    @pytest.mark.parametrize("gateway_overrides", [{"max_frame_size": 100_000}])
    async def test_frame_too_large_after_connect(self, connected: StompClient) -> None:
        await connected.send(frame("SEND", b"x" * 100_001, destination="/queue/big"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Frame too large"
        assert "100000" in error.body.decode()
        await connected.wait_closed()

    async def test_too_many_headers(self, connected: StompClient) -> None:
        headers = b"".join(b"h%d:v\n" % i for i in range(101))
        await connected.send(b"SEND\ndestination:/queue/x\n" + headers + b"\n\x00")
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Too many headers"

    async def test_header_line_too_long(self, connected: StompClient) -> None:
        await connected.send(b"SEND\ndestination:/queue/x\nlong:" + b"v" * 9000 + b"\n\n\x00")
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Header too long"

    async def test_undefined_escape_in_1_2(self, connected: StompClient) -> None:
        await connected.send(b"SEND\ndestination:/queue/x\nbad:a\\tb\n\n\x00")
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Invalid header"

    @pytest.mark.parametrize("gateway_overrides", [{"max_subscriptions": 2}])
    async def test_subscription_limit(self, connected: StompClient, unique: str) -> None:
        for i in range(2):
            await connected.send(frame("SUBSCRIBE", destination=f"/topic/l{i}-{unique}", id=str(i)))
        await connected.send(frame("SUBSCRIBE", destination=f"/topic/l3-{unique}", id="3"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Too many subscriptions"


class TestSlowClient:
    @pytest.mark.parametrize("gateway_overrides", [{"max_outbound_buffer": 256 * 1024}])
    async def test_a_client_that_stops_reading_is_dropped_and_others_carry_on(
        self, gateway: Gateway, ws_url: str, unique: str
    ) -> None:
        assert gateway.tcp_port is not None
        # A raw TCP STOMP client that subscribes and then never reads.
        slow = socket.create_connection(("127.0.0.1", gateway.tcp_port))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(frame("CONNECT", accept_version="1.2").serialize("1.2"))
        slow.sendall(frame("SUBSCRIBE", destination=f"/topic/slow-{unique}", id="s").serialize("1.2"))
        healthy = await open_ws(ws_url)
        await healthy.connect()
        await healthy.send(frame("SUBSCRIBE", destination=f"/topic/slow-{unique}", id="h", receipt="r"))
        await healthy.receipt("r")
        await asyncio.sleep(0.2)
        publisher = await open_ws(ws_url)
        await publisher.connect()
        body = "x" * 32000
        received = 0
        for n in range(300):
            await publisher.send(frame("SEND", body, destination=f"/topic/slow-{unique}"))
            if n % 20 == 19:
                while not healthy.frames.empty():
                    healthy.frames.get_nowait()
                    received += 1
                await asyncio.sleep(0.01)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(gateway.connections) > 2:
            await asyncio.sleep(0.1)
            while not healthy.frames.empty():
                healthy.frames.get_nowait()
                received += 1
        assert len(gateway.connections) == 2, "the slow client should have been disconnected"
        while received < 300:
            await healthy.receive_command("MESSAGE", timeout=5)
            received += 1
        assert received == 300
        slow.close()
        await healthy.close()
        await publisher.close()


class TestTcpTransport:
    """The same sessions over plain TCP (the sans-I/O design's second transport)."""

    async def test_send_and_receive_over_tcp(self, tcp_client: StompClient, ws_url: str, unique: str) -> None:
        await tcp_client.connect()
        await tcp_client.send(frame("SUBSCRIBE", destination=f"/queue/tcp-{unique}", id="1", receipt="r"))
        await tcp_client.receipt("r")
        ws = await open_ws(ws_url)
        await ws.connect()
        await ws.send(frame("SEND", "over ws, out over tcp", destination=f"/queue/tcp-{unique}"))
        message = await tcp_client.receive_command("MESSAGE")
        assert message.body == b"over ws, out over tcp"
        await ws.close()

    async def test_tcp_error_then_close(self, gateway: Gateway) -> None:
        assert gateway.tcp_port is not None
        c = await open_tcp("127.0.0.1", gateway.tcp_port)
        await c.connect()
        await c.send(b"BOGUS\n\n\x00")
        error = await c.receive_command("ERROR")
        assert error.get("message") == "Bad command"
        await c.wait_closed()


class TestLargeMessages:
    """--max-outbound-buffer bounds what waits behind the message being written: one message larger than the
    bound (up to the frame-size limit) is delivered to a client that reads, not taken for slowness."""

    @pytest.mark.parametrize(
        "gateway_overrides", [{"max_outbound_buffer": 64 * 1024, "max_frame_size": 8 * 1024 * 1024}]
    )
    @pytest.mark.parametrize("transport", ["ws", "tcp"])
    async def test_messages_larger_than_the_bound_reach_two_subscribers(
        self, gateway: Gateway, ws_url: str, unique: str, transport: str
    ) -> None:
        async def subscriber() -> StompClient:
            if transport == "ws":
                c = await open_ws(ws_url, max_size=None)  # the client's own 1 MiB default would refuse them
            else:
                assert gateway.tcp_port is not None
                c = await open_tcp("127.0.0.1", gateway.tcp_port)
            await c.connect()
            await c.send(frame("SUBSCRIBE", destination=f"/topic/big-{unique}", id="1", receipt="r"))
            await c.receipt("r")
            return c

        subscribers = [await subscriber(), await subscriber()]
        publisher = await open_ws(ws_url)
        await publisher.connect()
        bodies = [bytes([65 + n]) * (6 * 1024 * 1024) for n in range(2)]
        try:
            for body in bodies:
                await publisher.send(frame("SEND", body, destination=f"/topic/big-{unique}", receipt="s"))
                await publisher.receipt("s", timeout=20)
                for c in subscribers:
                    message = await c.receive_command("MESSAGE", timeout=20)
                    assert message.body == body
        finally:
            for c in [*subscribers, publisher]:
                await c.close()
