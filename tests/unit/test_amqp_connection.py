"""The gateway's AMQP 0-9-1 connection against a scripted broker on a real local socket: the handshake,
frames read in any split, deliveries handed straight to their consumer, RabbitMQ's channel and connection
closes, and a silent broker found by the heartbeat check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from gateway.broker.amqp_connection import (
    AmqpConnection,
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    ConnectionLost,
    ConnectionParameters,
    HandshakeRefused,
)

FRAME_MAX = 4096


class ScriptedBroker:
    """RabbitMQ's side of one connection, written by the test: ``receive()`` the client's next frame,
    ``send()`` frames (``chunk`` splits the bytes into writes of that many)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def receive(self) -> tuple[int, Any]:
        head = await self.reader.readexactly(7)
        rest = await self.reader.readexactly(int.from_bytes(head[3:7], "big") + 1)
        _, channel, frame = pamqp.frame.unmarshal(head + rest)
        return channel, frame

    async def receive_method(self, kind: type) -> tuple[int, Any]:
        while True:
            channel, frame = await self.receive()
            if isinstance(frame, kind):
                return channel, frame

    async def send(self, channel: int, *frames: Any, chunk: int | None = None) -> None:
        data = b"".join(pamqp.frame.marshal(f, channel) for f in frames)
        step = chunk or len(data)
        for i in range(0, len(data), step):
            self.writer.write(data[i : i + step])
            await self.writer.drain()

    async def handshake(self, *, heartbeat: int = 0) -> list[Any]:
        assert await self.reader.readexactly(8) == b"AMQP\x00\x00\x09\x01"
        await self.send(0, spec.Connection.Start(server_properties={"product": "scripted"}, mechanisms="PLAIN"))
        seen = [(await self.receive())[1]]
        await self.send(0, spec.Connection.Tune(channel_max=16, frame_max=FRAME_MAX, heartbeat=heartbeat))
        seen += [(await self.receive())[1], (await self.receive())[1]]
        await self.send(0, spec.Connection.OpenOk())
        return seen


Script = Callable[[ScriptedBroker], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[ConnectionParameters]]]:
    servers: list[asyncio.Server] = []
    tasks: list[asyncio.Task[None]] = []

    async def start(script: Script) -> ConnectionParameters:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tasks.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await script(ScriptedBroker(reader, writer))
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return ConnectionParameters.from_url(f"amqp://ann:s%40cret@127.0.0.1:{port}/v%2Fh?name=test", heartbeat=0)

    yield start
    for task in tasks:
        task.cancel()
    for server in servers:
        server.close()


def delivery(tag: str, n: int, body: bytes) -> list[Any]:
    frames: list[Any] = [
        spec.Basic.Deliver(consumer_tag=tag, delivery_tag=n, exchange="x", routing_key="k"),
        ContentHeader(body_size=len(body), properties=spec.Basic.Properties(content_type="text/plain")),
    ]
    frames += [ContentBody(body[i : i + FRAME_MAX - 8]) for i in range(0, len(body), FRAME_MAX - 8)]
    return frames  # RabbitMQ sends no body frame for an empty body


async def test_the_handshake_says_who_and_where(serve: Callable[[Script], Awaitable[ConnectionParameters]]) -> None:
    seen: list[Any] = []

    async def script(broker: ScriptedBroker) -> None:
        seen.extend(await broker.handshake())
        await broker.receive_method(spec.Connection.Close)
        await broker.send(0, spec.Connection.CloseOk())

    connection = await AmqpConnection.connect(await serve(script), timeout=5)
    assert connection.is_open and connection.frame_max == FRAME_MAX and connection.channel_max == 16
    start_ok, tune_ok, open_ = seen
    assert start_ok.mechanism == "PLAIN" and start_ok.response == "\0ann\0s@cret"
    assert start_ok.client_properties["connection_name"] == "test"
    assert start_ok.client_properties["capabilities"]["authentication_failure_close"] is True
    assert (tune_ok.channel_max, tune_ok.frame_max, tune_ok.heartbeat) == (16, FRAME_MAX, 0)
    assert open_.virtual_host == "v/h"
    await asyncio.wait_for(connection.close(), 5)
    assert not connection.is_open


async def test_a_refused_login_is_the_brokers_reply(serve: Callable[[Script], Awaitable[ConnectionParameters]]) -> None:
    async def script(broker: ScriptedBroker) -> None:
        await broker.reader.readexactly(8)
        await broker.send(0, spec.Connection.Start(mechanisms="PLAIN"))
        await broker.receive()
        await broker.send(0, spec.Connection.Close(reply_code=403, reply_text="ACCESS_REFUSED - Login was refused", class_id=0, method_id=0))
        await broker.receive_method(spec.Connection.CloseOk)

    with pytest.raises(HandshakeRefused) as refused:
        await AmqpConnection.connect(await serve(script), timeout=5)
    assert refused.value.reply_code == 403


class TestReading:
    """Frames arrive in whatever pieces TCP makes of them; the reader parses each complete one once."""

    @pytest.mark.parametrize("chunk", [None, 1, 5, 4099])
    async def test_deliveries_reach_their_consumer_whole_and_in_order(
        self, serve: Callable[[Script], Awaitable[ConnectionParameters]], chunk: int | None
    ) -> None:
        big = bytes(range(256)) * 40  # three body frames at this frame_max

        async def script(broker: ScriptedBroker) -> None:
            await broker.handshake()
            channel, _ = await broker.receive_method(spec.Channel.Open)
            await broker.send(channel, spec.Channel.OpenOk())
            await broker.receive_method(spec.Basic.Consume)
            frames = [spec.Basic.ConsumeOk(consumer_tag="mine")]
            frames += delivery("mine", 1, b"hello") + delivery("other", 2, b"not mine") + delivery("mine", 3, b"")
            frames += delivery("mine", 4, big)
            await broker.send(channel, *frames, chunk=chunk)
            await broker.receive_method(spec.Basic.Qos)
            await broker.send(channel, spec.Basic.QosOk())
            await asyncio.sleep(5)

        connection = await AmqpConnection.connect(await serve(script), timeout=5)
        channel = await connection.open_channel(connection.gate.take(connection.channels) or 0)
        seen: list[tuple[int, bytes, str | None]] = []
        channel.add_consumer("mine", lambda d, h, body: seen.append((d.delivery_tag or 0, body, h.content_type)))
        ok = await channel.rpc(spec.Basic.Consume(queue="q", consumer_tag="mine"))
        assert ok.consumer_tag == "mine"
        await channel.rpc(spec.Basic.Qos(prefetch_count=1))  # answered after every delivery frame was read
        assert seen == [(1, b"hello", "text/plain"), (3, b"", "text/plain"), (4, big, "text/plain")]
        connection._end(ConnectionLost("test over"))

    async def test_a_failing_consumer_does_not_stop_the_reader(
        self, serve: Callable[[Script], Awaitable[ConnectionParameters]]
    ) -> None:
        async def script(broker: ScriptedBroker) -> None:
            await broker.handshake()
            channel, _ = await broker.receive_method(spec.Channel.Open)
            await broker.send(channel, spec.Channel.OpenOk())
            await broker.receive_method(spec.Basic.Qos)
            await broker.send(channel, *delivery("mine", 1, b"x"), spec.Basic.QosOk())
            await asyncio.sleep(5)

        def broken(*_: object) -> None:
            raise RuntimeError("boom")

        connection = await AmqpConnection.connect(await serve(script), timeout=5)
        channel = await connection.open_channel(1)
        channel.add_consumer("mine", broken)
        assert isinstance(await asyncio.wait_for(channel.rpc(spec.Basic.Qos(prefetch_count=1)), 5), spec.Basic.QosOk)
        connection._end(ConnectionLost("test over"))


class TestClosesByTheBroker:
    async def test_a_channel_close_fails_the_waiting_method_with_rabbitmqs_words(
        self, serve: Callable[[Script], Awaitable[ConnectionParameters]]
    ) -> None:
        after: list[Any] = []

        async def script(broker: ScriptedBroker) -> None:
            await broker.handshake()
            channel, _ = await broker.receive_method(spec.Channel.Open)
            await broker.send(channel, spec.Channel.OpenOk())
            await broker.receive_method(spec.Queue.Declare)
            text = "NOT_FOUND - no queue 'q' in vhost '/'"
            await broker.send(channel, spec.Channel.Close(reply_code=404, reply_text=text, class_id=50, method_id=10))
            after.append(await broker.receive())  # the close-ok, and nothing of the channel after it
            after.append(await broker.receive())

        connection = await AmqpConnection.connect(await serve(script), timeout=5)
        channel = await connection.open_channel(connection.gate.take(connection.channels) or 0)
        reasons: list[BaseException | None] = []
        channel.on_closed = reasons.append
        with pytest.raises(ChannelClosedByBroker) as closed:
            await channel.rpc(spec.Queue.Declare(queue="q", passive=True))
        assert closed.value.reply_code == 404 and closed.value.args[0] == "NOT_FOUND - no queue 'q' in vhost '/'"
        assert reasons == [closed.value] and channel.closed and 1 not in connection.channels
        channel.send_soon(pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=1), 1))  # a straggler: dropped
        connection.write(pamqp.frame.marshal(spec.Basic.Qos(), 2))  # the marker the broker sees next
        await asyncio.sleep(0.2)
        assert [(number, type(frame)) for number, frame in after] == [(1, spec.Channel.CloseOk), (2, spec.Basic.Qos)]
        connection._end(ConnectionLost("test over"))

    async def test_a_connection_close_ends_every_channel_with_its_reason(
        self, serve: Callable[[Script], Awaitable[ConnectionParameters]]
    ) -> None:
        async def script(broker: ScriptedBroker) -> None:
            await broker.handshake()
            channel, _ = await broker.receive_method(spec.Channel.Open)
            await broker.send(channel, spec.Channel.OpenOk())
            await broker.receive_method(spec.Queue.Declare)
            text = "CHANNEL_ERROR - expected 'channel.open'"
            await broker.send(0, spec.Connection.Close(reply_code=504, reply_text=text, class_id=0, method_id=0))
            await broker.receive_method(spec.Connection.CloseOk)

        connection = await AmqpConnection.connect(await serve(script), timeout=5)
        ended: list[BaseException] = []
        connection.add_close_callback(ended.append)
        channel = await connection.open_channel(1)
        with pytest.raises(ConnectionClosedByBroker) as closed:
            await channel.rpc(spec.Queue.Declare(queue="q"))
        assert closed.value.reply_code == 504 and ended == [closed.value] and not connection.is_open


async def test_a_silent_broker_is_found_by_the_heartbeat_check(
    serve: Callable[[Script], Awaitable[ConnectionParameters]],
) -> None:
    async def script(broker: ScriptedBroker) -> None:
        await broker.handshake()
        await asyncio.sleep(30)  # reads nothing more, sends nothing more

    parameters = await serve(script)
    connection = await AmqpConnection.connect(
        ConnectionParameters.from_url(f"amqp://127.0.0.1:{parameters.port}/?heartbeat=1", heartbeat=0), timeout=5
    )
    ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    connection.add_close_callback(ended.set_result)
    reason = await asyncio.wait_for(ended, 10)  # (1 + 1) x 3 s without a frame
    assert isinstance(reason, ConnectionLost) and "no frame from RabbitMQ in 6 s" in str(reason)
