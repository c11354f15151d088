"""Shared fixtures: a real gateway on loopback, in front of the embedded broker or a real RabbitMQ."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.broker.base import Channel
from gateway.config import Config
from gateway.server import Gateway
from tests.stomp_client import StompClient, open_tcp, open_ws

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BACKENDS = ("memory", "rabbitmq")


def rabbitmq_running() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def make_config(backend: str, **overrides: object) -> Config:
    config = Config(
        host="127.0.0.1",
        port=0,
        tcp_port=0,
        broker=backend,
        amqp_urls=[AMQP_URL] if backend == "rabbitmq" else [],
        web_root=None,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    marker = request.node.get_closest_marker("rabbitmq_only")
    if marker is not None and kind != "rabbitmq":
        pytest.skip("RabbitMQ only: " + (marker.args[0] if marker.args else ""))
    if kind == "rabbitmq" and not rabbitmq_running():
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ is not running on 127.0.0.1:5672 (make test starts it)")
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    return kind


@pytest.fixture
def gateway_overrides() -> dict[str, object]:
    """Override in a test module (or parametrize) to change settings."""
    return {}


@pytest.fixture
async def gateway(backend: str, gateway_overrides: dict[str, object]) -> AsyncIterator[Gateway]:
    gw = Gateway(make_config(backend, **gateway_overrides))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
def ws_url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/ws"


@pytest.fixture
async def client(ws_url: str) -> AsyncIterator[StompClient]:
    c = await open_ws(ws_url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def connected(client: StompClient) -> StompClient:
    await client.connect()
    return client


@pytest.fixture
async def clients(ws_url: str) -> AsyncIterator[list[StompClient]]:
    """A factory list: append with ``await new_client(...)``; all are closed at the end."""
    opened: list[StompClient] = []
    yield opened
    for c in opened:
        await c.close()


@pytest.fixture
async def backdoor(gateway: Gateway) -> AsyncIterator[Channel]:
    """A broker channel beside the gateway (a real AMQP channel for RabbitMQ)."""
    principal = await gateway.broker.authenticate("guest", "guest", "/")
    channel = await gateway.broker.open_channel(principal)
    try:
        yield channel
    finally:
        await channel.close()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def tcp_client(gateway: Gateway) -> AsyncIterator[StompClient]:
    assert gateway.tcp_port is not None
    c = await open_tcp("127.0.0.1", gateway.tcp_port)
    try:
        yield c
    finally:
        await c.close()
