"""The connection layer on its own: a scripted transport and the embedded broker, no network.

:class:`StompConnection` decides nothing a client can see; it feeds the session bytes and outcomes and runs
the actions it gets back. These tests drive it the way a transport does (``receive_data`` with whole or
split chunks, ``connection_lost``) and read exactly the bytes it wrote, so each outcome the connection
observes (publish confirmed, broker channel closed, login and heart-beat timeouts, outbound buffer over its
bound, temp queue ready) is checked from the client's side.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.broker.base import MessageProperties
from gateway.broker.memory import MemoryBroker
from gateway.connection import YIELD_EVERY, ConnectionSettings, StompConnection, Transport
from gateway.fanout import FanoutRegistry
from gateway.stomp.frames import Frame, FrameParser, Limits
from gateway.stomp.session import SessionSettings

CONNECT = b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\x00"


class ScriptedTransport(Transport):
    """Keeps every write; ``buffered`` is whatever the test says the kernel has not taken."""

    kind = "scripted"

    def __init__(self) -> None:
        self.parser = FrameParser(Limits(1 << 30, 1 << 30, 1 << 20, 1 << 20))
        self.parser.version = "1.2"
        self.parser.authenticated = True
        self.events: list[str] = []  # "frame:COMMAND", "heartbeat", "authenticated", "close", "abort"
        self.frames: list[Frame] = []
        self.text: list[bool] = []
        self.pending = 0
        self.closed = False

    def write(self, data: bytes, text: bool) -> None:
        self.parser.receive_data(data)
        while (frame := self.parser.next_frame()) is not None:
            self.frames.append(frame)
            self.text.append(text)
            self.events.append("frame:" + frame.command)

    def authenticated(self) -> None:
        self.events.append("authenticated")

    def write_heartbeat(self) -> None:
        self.events.append("heartbeat")

    @property
    def buffered(self) -> int:
        return self.pending

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True
        self.events.append("close")

    def abort(self) -> None:
        self.closed = True
        self.events.append("abort")

    def commands(self) -> list[str]:
        return [frame.command for frame in self.frames]

    def of(self, command: str) -> list[Frame]:
        return [frame for frame in self.frames if frame.command == command]


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker()
    await broker.start()
    yield broker
    await broker.close()


class Harness:
    def __init__(self, broker: MemoryBroker, settings: ConnectionSettings) -> None:
        self.broker = broker
        self.registry = FanoutRegistry(broker, "amq.topic")
        self.settings = settings
        self.connections: list[StompConnection] = []

    def open(self) -> tuple[StompConnection, ScriptedTransport]:
        transport = ScriptedTransport()
        connection = StompConnection(transport, self.broker, self.registry, self.settings, peer="test")
        self.connections.append(connection)
        return connection, transport

    async def connected(self) -> tuple[StompConnection, ScriptedTransport]:
        connection, transport = self.open()
        await connection.receive_data(CONNECT)
        assert transport.commands() == ["CONNECTED"]
        return connection, transport

    async def close(self) -> None:
        for connection in self.connections:
            await connection.connection_lost()
        await self.registry.close()


@pytest.fixture
async def harness(broker: MemoryBroker) -> AsyncIterator[Harness]:
    settings = ConnectionSettings(session=SessionSettings(heartbeat_min=50), login_timeout=5.0)
    harness = Harness(broker, settings)
    yield harness
    await harness.close()


def frame(command: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    return Frame(command, tuple(headers.items()), body).serialize("1.2")


# --------------------------------------------------------------------------------------------------------


async def test_connected_after_the_transport_was_told(harness: Harness) -> None:
    """The transport raises its message-size limit before CONNECTED goes out, never after."""
    connection, transport = harness.open()
    await connection.receive_data(CONNECT[:10])
    assert transport.events == []
    await connection.receive_data(CONNECT[10:])
    assert transport.events == ["authenticated", "frame:CONNECTED"]
    assert transport.frames[0].get("version") == "1.2"
    assert connection.session.parser.authenticated


async def test_frames_pipelined_behind_connect_use_the_negotiated_version(harness: Harness) -> None:
    """One chunk: CONNECT (1.2), SUBSCRIBE and SEND whose header is escaped the 1.2 way. The header comes
    back decoded, so the SEND was parsed after the session switched the parser to 1.2."""
    connection, transport = harness.open()
    chunk = (
        CONNECT
        + b"SUBSCRIBE\nid:s\ndestination:/queue/pipelined\nreceipt:r1\n\n\x00"
        + b"SEND\ndestination:/queue/pipelined\nx-note:a\\cb\n\nbody\x00"
    )
    await connection.receive_data(chunk)
    await until(lambda: bool(transport.of("MESSAGE")))
    assert transport.commands() == ["CONNECTED", "RECEIPT", "MESSAGE"]
    message = transport.of("MESSAGE")[0]
    assert message.get("x-note") == "a:b"
    assert message.get("subscription") == "s"
    assert message.body == b"body"


async def test_send_receipt_follows_the_broker_confirm(harness: Harness) -> None:
    connection, transport = await harness.connected()
    await connection.receive_data(frame("SEND", {"destination": "/queue/confirm", "receipt": "s-1"}, b"x"))
    await until(lambda: bool(transport.of("RECEIPT")))
    assert transport.of("RECEIPT")[0].get("receipt-id") == "s-1"
    assert not connection._pending  # the confirm came before the RECEIPT


async def test_bad_frame_after_good_ones(harness: Harness) -> None:
    """The good frames take effect; the bad one gets an ERROR that names the problem, then the close."""
    connection, transport = await harness.connected()
    good = frame("SEND", {"destination": "/queue/kept"}, b"kept")
    await connection.receive_data(good + b"SEND\nno colon here\n\n\x00")
    await until(lambda: transport.closed)
    assert transport.commands() == ["CONNECTED", "ERROR"]
    error = transport.of("ERROR")[0]
    assert error.get("message") == "Invalid frame"
    assert b"Header line without ':'" in error.body
    assert transport.events[-1] == "close"
    # The message before the bad frame reached the broker.
    other, other_transport = await harness.connected()
    await other.receive_data(frame("SUBSCRIBE", {"id": "k", "destination": "/queue/kept"}))
    await until(lambda: bool(other_transport.of("MESSAGE")))
    assert other_transport.of("MESSAGE")[0].body == b"kept"


async def test_slow_consumer(harness: Harness) -> None:
    """Outbound buffer over its bound: the session's ERROR, and the close."""
    harness.settings.max_outbound_buffer = 1000
    connection, transport = await harness.connected()
    await connection.receive_data(frame("SUBSCRIBE", {"id": "s", "destination": "/topic/slow"}))
    transport.pending = 5000  # the kernel takes nothing any more
    publisher, _ = await harness.connected()
    for _ in range(3):
        await publisher.receive_data(frame("SEND", {"destination": "/topic/slow"}, b"x" * 100))
    await until(lambda: transport.closed)
    error = transport.of("ERROR")[0]
    assert error.get("message") == "Slow consumer"
    assert b"--max-outbound-buffer" in error.body
    assert connection.close_reason == "ERROR Slow consumer"


async def test_login_timeout(harness: Harness) -> None:
    harness.settings.login_timeout = 0.05
    connection, transport = harness.open()
    await connection.receive_data(b"CONN")  # a CONNECT that never completes
    await until(lambda: transport.closed)
    assert transport.commands() == ["ERROR"]
    assert transport.of("ERROR")[0].get("message") == "Login timeout"
    assert b"--login-timeout" in transport.of("ERROR")[0].body


async def test_no_login_timeout_after_connected(harness: Harness) -> None:
    harness.settings.login_timeout = 0.05
    _connection, transport = await harness.connected()
    await asyncio.sleep(0.15)
    assert not transport.closed and transport.commands() == ["CONNECTED"]


async def test_heartbeats_out_and_timeout_in(harness: Harness) -> None:
    """heart-beat:60,60: the gateway sends EOLs, and ends the session after two silent intervals."""
    connection, transport = harness.open()
    await connection.receive_data(CONNECT.replace(b"\n\n\x00", b"\nheart-beat:60,60\n\n\x00"))
    assert transport.frames[0].get("heart-beat") == "60,60"
    await until(lambda: transport.closed)
    assert "heartbeat" in transport.events
    error = transport.of("ERROR")[0]
    assert error.get("message") == "Heart-beat timeout"
    assert b"120 ms" in error.body


async def test_broker_channel_closed_is_reported_by_the_session(harness: Harness) -> None:
    """A broker error on the session's channel (a missing /amq/queue) comes back in RabbitMQ's words."""
    connection, transport = await harness.connected()
    await connection.receive_data(
        frame("SUBSCRIBE", {"id": "s", "destination": "/amq/queue/missing", "receipt": "r"})
    )
    await until(lambda: transport.closed)
    assert transport.commands() == ["CONNECTED", "ERROR"]
    error = transport.of("ERROR")[0]
    assert error.get("message") == "not_found"
    assert error.get("receipt-id") == "r"


async def test_temp_queue_reply(harness: Harness) -> None:
    """SEND with reply-to:/temp-queue/r: the reply queue is declared and consumed, reply-to carries its
    broker name, and a reply arrives as a MESSAGE for subscription /temp-queue/r."""
    server, server_transport = await harness.connected()
    await server.receive_data(frame("SUBSCRIBE", {"id": "rpc", "destination": "/queue/rpc", "receipt": "r"}))
    await until(lambda: bool(server_transport.of("RECEIPT")))
    client, client_transport = await harness.connected()
    await client.receive_data(
        frame("SEND", {"destination": "/queue/rpc", "reply-to": "/temp-queue/r"}, b"question")
    )
    await until(lambda: bool(server_transport.of("MESSAGE")))
    reply_to = server_transport.of("MESSAGE")[0].get("reply-to")
    assert reply_to is not None and reply_to.startswith("/reply-queue/")
    await server.receive_data(frame("SEND", {"destination": reply_to}, b"answer"))
    await until(lambda: bool(client_transport.of("MESSAGE")))
    answer = client_transport.of("MESSAGE")[0]
    assert answer.get("subscription") == "/temp-queue/r"
    assert answer.body == b"answer"


async def test_unsubscribe_releases_shared_and_own_subscriptions(harness: Harness) -> None:
    connection, transport = await harness.connected()
    await connection.receive_data(
        frame("SUBSCRIBE", {"id": "t", "destination": "/topic/news"})
        + frame("SUBSCRIBE", {"id": "q", "destination": "/queue/news", "ack": "client"})
        + frame("UNSUBSCRIBE", {"id": "t"})
        + frame("UNSUBSCRIBE", {"id": "q", "receipt": "gone"})
    )
    await until(lambda: bool(transport.of("RECEIPT")))
    assert connection._attachments == {}
    publisher, _ = await harness.connected()
    await publisher.receive_data(
        frame("SEND", {"destination": "/topic/news"}, b"t") + frame("SEND", {"destination": "/queue/news"}, b"q")
    )
    await asyncio.sleep(0.05)
    assert transport.of("MESSAGE") == []


async def test_session_end_releases_the_broker_side(harness: Harness, broker: MemoryBroker) -> None:
    """The client goes away: shared sinks detached, channel closed, unacked messages back in the queue."""
    connection, transport = await harness.connected()
    await connection.receive_data(
        frame("SUBSCRIBE", {"id": "t", "destination": "/topic/end"})
        + frame("SUBSCRIBE", {"id": "q", "destination": "/queue/end", "ack": "client", "receipt": "r"})
    )
    await until(lambda: bool(transport.of("RECEIPT")))
    principal = await broker.authenticate("guest", "guest", "/")
    channel = await broker.open_channel(principal)
    await channel.start_publish("", "end", b"unacked", MessageProperties())
    await until(lambda: bool(transport.of("MESSAGE")))
    await connection.connection_lost()
    assert connection._attachments == {} and connection._channel is None
    hub = harness.registry.hub_for(principal)
    assert all(not group.sinks for group in hub.groups.values())
    # The unacknowledged message went back to its queue: another session gets it, redelivered.
    other, other_transport = await harness.connected()
    await other.receive_data(frame("SUBSCRIBE", {"id": "q", "destination": "/queue/end"}))
    await until(lambda: bool(other_transport.of("MESSAGE")))
    assert other_transport.of("MESSAGE")[0].get("redelivered") == "true"
    await channel.close()


async def test_a_burst_is_handled_a_slice_at_a_time(harness: Harness) -> None:
    """One client's message of 3,000 SENDs lets other work run at least every YIELD_EVERY frames (the embedded
    broker's publish never yields, so without the slicing the whole burst would run in one go)."""
    connection, _ = await harness.connected()
    burst = frame("SEND", {"destination": "/topic/burst"}, b"x") * 3000
    seen: list[int] = []
    done = False

    async def other_work() -> None:
        while not done:
            seen.append(connection.frames_in)
            await asyncio.sleep(0)

    task = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    await connection.receive_data(burst)
    done = True
    await task
    assert connection.frames_in == 3001  # CONNECT and the burst
    steps = [after - before for before, after in itertools.pairwise(seen)]
    assert sum(steps) >= 2900 and max(steps) <= YIELD_EVERY, max(steps)


async def test_a_queue_deleted_under_a_subscription_ends_the_session_with_an_error(
    harness: Harness, broker: MemoryBroker
) -> None:
    """RabbitMQ's plugin keeps such a session open, receiving nothing more; here the ERROR names the
    subscription and the session ends, so the client subscribes again."""
    connection, transport = await harness.connected()
    await connection.receive_data(frame("SUBSCRIBE", {"id": "s1", "destination": "/queue/doomed", "receipt": "r"}))
    await until(lambda: bool(transport.of("RECEIPT")))
    principal = await broker.authenticate("guest", "guest", "/")
    channel = await broker.open_channel(principal)
    await channel.delete_queue("doomed")
    await until(lambda: transport.closed)
    error = transport.of("ERROR")[0]
    assert error.get("message") == "Subscription cancelled"
    assert error.get("subscription") == "s1"
    assert b"/queue/doomed" in error.body
    await channel.close()
