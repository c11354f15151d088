"""Limits at the door and the client's address behind a load balancer, over real sockets (issue 13):
--max-connections, --max-connections-per-ip, PROXY protocol v1/v2 and X-Forwarded-For from --trusted-proxy
networks only."""

from __future__ import annotations

import asyncio
import struct

import pytest
from websockets.exceptions import InvalidStatus

from gateway.proxy import PROXY_V2
from gateway.server import Gateway
from tests.integration.test_tokens import sample
from tests.stomp_client import StompClient, open_tcp, open_ws

pytestmark = pytest.mark.rabbitmq_only("the door is the same for both brokers; one is enough")


async def wait_for(predicate: object, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def addresses(gateway: Gateway) -> set[str]:
    return {connection.handshake.address for connection in gateway.connections}


async def closed_without_a_frame(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(100), 3) == b""


class TestTcp:
    @pytest.mark.parametrize("gateway_overrides", [{"max_connections": 2}])
    async def test_max_connections(self, gateway: Gateway, clients: list[StompClient]) -> None:
        assert gateway.tcp_port is not None
        for _ in range(2):
            clients.append(await open_tcp("127.0.0.1", gateway.tcp_port))
        await wait_for(lambda: len(gateway.connections) == 2)
        before = sample('stomp_gateway_connections_refused_total{reason="max_connections"}')
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.tcp_port)
        assert await closed_without_a_frame(reader)
        writer.close()
        assert sample('stomp_gateway_connections_refused_total{reason="max_connections"}') == before + 1
        assert sample('stomp_gateway_limit{name="max_connections"}') == 2
        # one leaves, one more may come
        await clients.pop().close()
        await wait_for(lambda: len(gateway.connections) == 1)
        c = await open_tcp("127.0.0.1", gateway.tcp_port)
        clients.append(c)
        await c.connect()

    @pytest.mark.parametrize("gateway_overrides", [{"max_connections_per_ip": 1, "trusted_proxies": ["127.0.0.0/8"]}])
    async def test_per_ip_counts_the_address_the_proxy_names(self, gateway: Gateway) -> None:
        assert gateway.tcp_port is not None
        opened = []
        for header in (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 61613\r\n",
            PROXY_V2 + bytes((0x21, 0x11)) + struct.pack(">H", 12) + bytes([198, 51, 100, 9, 10, 0, 0, 1]) + struct.pack(">HH", 4000, 61613),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.tcp_port)
            writer.write(header + b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00")
            assert (await asyncio.wait_for(reader.readuntil(b"\x00"), 5)).startswith(b"CONNECTED")
            opened.append(writer)
        assert addresses(gateway) == {"203.0.113.7", "198.51.100.9"}
        # a second connection from 203.0.113.7 is over its limit; from another address it is not
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.tcp_port)
        writer.write(b"PROXY TCP4 203.0.113.7 10.0.0.1 51001 61613\r\n")
        assert await closed_without_a_frame(reader)
        for w in opened:
            w.close()

    @pytest.mark.parametrize("gateway_overrides", [{"trusted_proxies": ["10.0.0.0/8"]}])
    async def test_an_untrusted_peer_cannot_claim_an_address(self, gateway: Gateway) -> None:
        assert gateway.tcp_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.tcp_port)
        writer.write(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 61613\r\n\n\x00")
        # not a trusted proxy: the header is STOMP input, and a bad one (a frame whose command is "PROXY ...")
        assert b"ERROR" in await asyncio.wait_for(reader.read(1000), 5)
        writer.close()

    @pytest.mark.parametrize("gateway_overrides", [{"trusted_proxies": ["127.0.0.0/8"]}])
    async def test_a_trusted_proxy_may_send_no_header(self, gateway: Gateway, clients: list[StompClient]) -> None:
        assert gateway.tcp_port is not None
        c = await open_tcp("127.0.0.1", gateway.tcp_port)
        clients.append(c)
        await c.connect()
        assert addresses(gateway) == {"127.0.0.1"}


class TestWebSocket:
    @pytest.mark.parametrize("gateway_overrides", [{"max_connections": 1}])
    async def test_max_connections_is_503_with_retry_after(
        self, gateway: Gateway, ws_url: str, clients: list[StompClient]
    ) -> None:
        clients.append(await open_ws(ws_url))
        await wait_for(lambda: len(gateway.connections) == 1)
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(ws_url)
        response = refused.value.response
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert b"limit of 1 connections" in response.body

    @pytest.mark.parametrize(
        "gateway_overrides", [{"max_connections_per_ip": 1, "trusted_proxies": ["127.0.0.1/32"]}]
    )
    async def test_per_ip_behind_a_trusted_proxy_is_429_per_forwarded_address(
        self, gateway: Gateway, ws_url: str, clients: list[StompClient]
    ) -> None:
        def forwarded(address: str) -> dict[str, object]:
            return {"additional_headers": {"X-Forwarded-For": f"10.9.9.9, {address}"}}

        clients.append(await open_ws(ws_url, **forwarded("203.0.113.7")))
        clients.append(await open_ws(ws_url, **forwarded("198.51.100.9")))
        await wait_for(lambda: addresses(gateway) == {"203.0.113.7", "198.51.100.9"})
        before = sample('stomp_gateway_connections_refused_total{reason="max_connections_per_ip"}')
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(ws_url, **forwarded("203.0.113.7"))
        assert refused.value.response.status_code == 429
        assert refused.value.response.headers["Retry-After"] == "5"
        assert sample('stomp_gateway_connections_refused_total{reason="max_connections_per_ip"}') == before + 1

    @pytest.mark.parametrize("gateway_overrides", [{"max_connections_per_ip": 1, "trusted_proxies": ["10.0.0.0/8"]}])
    async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
        self, gateway: Gateway, ws_url: str, clients: list[StompClient]
    ) -> None:
        clients.append(await open_ws(ws_url, additional_headers={"X-Forwarded-For": "203.0.113.7"}))
        await wait_for(lambda: addresses(gateway) == {"127.0.0.1"})
        with pytest.raises(InvalidStatus):  # a made-up header does not buy a second slot
            await open_ws(ws_url, additional_headers={"X-Forwarded-For": "198.51.100.9"})

    @pytest.mark.parametrize("gateway_overrides", [{"max_connections_per_ip": 1, "trusted_proxies": ["127.0.0.1/32"]}])
    async def test_proxy_protocol_before_the_upgrade(self, gateway: Gateway) -> None:
        upgrade = (
            b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        v2 = PROXY_V2 + bytes((0x21, 0x11)) + struct.pack(">H", 12) + bytes([198, 51, 100, 9, 10, 0, 0, 1])
        v2 += struct.pack(">HH", 4000, 443)
        writers = []
        for header, status in (
            (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n", b"101"),
            (v2, b"101"),
            (b"PROXY TCP4 203.0.113.7 10.0.0.1 51001 443\r\n", b"429"),  # the same client again
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writers.append(writer)
            for byte in range(0, len(header), 7):  # the header may come in pieces
                writer.write(header[byte : byte + 7])
                await writer.drain()
            writer.write(upgrade)
            response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert response.split(b" ")[1] == status, response
        await wait_for(lambda: addresses(gateway) == {"203.0.113.7", "198.51.100.9"})
        for writer in writers:
            writer.close()
