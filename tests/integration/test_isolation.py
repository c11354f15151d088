"""One client never hurts another: sessions of one user share an AMQP connection, so nothing a client sends
may make RabbitMQ close that connection (issue 8). Real RabbitMQ, real WebSockets."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.broker.base import Channel, MessageProperties
from gateway.server import Gateway
from tests.stomp_client import StompClient, frame, open_ws


class Bystander:
    """A session of the same user (so on the same pooled AMQP connection) with one subscription on its own
    channel (``/queue``, client ack) and one on the shared fan-out channel (``/topic``)."""

    def __init__(self, client: StompClient, name: str) -> None:
        self.client = client
        self.queue = f"iso-q-{name}"
        self.topic = f"iso.t.{name}"
        self.seen = 0

    @classmethod
    async def start(cls, url: str, name: str) -> Bystander:
        client = await open_ws(url)
        await client.connect()
        self = cls(client, name)
        await client.send(frame("SUBSCRIBE", destination=f"/queue/{self.queue}", id="q", ack="client-individual",
                                receipt="q"))
        await client.receipt("q")
        await client.send(frame("SUBSCRIBE", destination=f"/topic/{self.topic}", id="t", receipt="t"))
        await client.receipt("t")
        return self

    async def check(self, backdoor: Channel) -> None:
        """Both subscriptions still deliver, and the session still answers."""
        self.seen += 1
        body = f"alive-{self.seen}".encode()
        await backdoor.publish("", self.queue, body, MessageProperties())
        await backdoor.publish("amq.topic", self.topic, body, MessageProperties())
        got: dict[str, bytes] = {}
        for _ in range(2):
            message = await self.client.receive_command("MESSAGE", timeout=10)
            got[message.get("subscription") or ""] = message.body
            if message.get("subscription") == "q":
                await self.client.send(frame("ACK", id=message.get("ack") or ""))
        assert got == {"q": body, "t": body}, got
        receipt = uuid.uuid4().hex
        await self.client.send(frame("SEND", destination=f"/topic/{self.topic}.echo", receipt=receipt))
        await self.client.receipt(receipt, timeout=10)

    async def close(self, backdoor: Channel) -> None:
        await self.client.close()
        await backdoor.delete_queue(self.queue)


@pytest.fixture
async def bystander(ws_url: str, backdoor: Channel, unique: str) -> Bystander:
    b = await Bystander.start(ws_url, unique)
    yield b  # type: ignore[misc]
    await b.close(backdoor)


async def hostile(url: str, *frames_: bytes | frame) -> list[object]:  # type: ignore[valid-type]
    """Connect as the same user, send the frames, return what came back until the close."""
    client = await open_ws(url)
    try:
        await client.connect()
        for f in frames_:
            await client.send(f)  # type: ignore[arg-type]
        received: list[object] = []
        while True:
            try:
                received.append(await client.receive(timeout=5))
            except TimeoutError:
                break
            if received[-1].command == "ERROR":  # type: ignore[attr-defined]
                break
        return received
    finally:
        await client.close()


class TestHeaderBlockLargerThanFrameMax:
    """A header block that cannot fit one AMQP content-header frame is refused by the gateway."""

    @pytest.mark.rabbitmq_only("frame_max is RabbitMQ's negotiated AMQP frame size")
    async def test_headers_too_large_is_an_error_to_that_session_only(
        self, gateway: Gateway, ws_url: str, backdoor: Channel, bystander: Bystander
    ) -> None:
        headers = {f"h{i}": "v" * 8000 for i in range(17)}  # each within the gateway's limits; ~136 KiB in all
        received = await hostile(
            ws_url, frame("SEND", "x", destination=f"/topic/{bystander.topic}.x", receipt="r", **headers)
        )
        error = received[-1]
        assert error.command == "ERROR"  # type: ignore[attr-defined]
        assert error.get("message") == "Invalid header"  # type: ignore[attr-defined]
        assert b"Headers too large" in error.body  # type: ignore[attr-defined]
        assert b"131072" in error.body  # the frame_max RabbitMQ negotiated  # type: ignore[attr-defined]
        await bystander.check(backdoor)

    @pytest.mark.rabbitmq_only("frame_max is RabbitMQ's negotiated AMQP frame size")
    async def test_a_header_block_just_below_frame_max_is_published(
        self, gateway: Gateway, ws_url: str, backdoor: Channel, bystander: Bystander
    ) -> None:
        headers = {f"h{i}": "v" * 8000 for i in range(15)}  # ~120 KiB: fits 131072
        client = await open_ws(ws_url)
        try:
            await client.connect()
            await client.send(frame("SUBSCRIBE", destination=f"/topic/{bystander.topic}.big", id="s", receipt="s"))
            await client.receipt("s")
            await client.send(frame("SEND", "x", destination=f"/topic/{bystander.topic}.big", **headers))
            message = await client.receive_command("MESSAGE")
            assert message.get("h14") == "v" * 8000
        finally:
            await client.close()
        await bystander.check(backdoor)


class TestChannelErrorStorm:
    """Channel errors one after another never make RabbitMQ close the shared connection (channel numbers are
    reused only after the close handshake)."""

    async def test_fifty_failing_sessions_leave_the_bystander_alive(
        self, gateway: Gateway, ws_url: str, backdoor: Channel, bystander: Bystander, unique: str
    ) -> None:
        for _round in range(3):
            results = await asyncio.gather(
                *(
                    hostile(ws_url, frame("SEND", "x", destination=f"/exchange/missing-{unique}-{i}/k", receipt="r"))
                    for i in range(50)
                )
            )
            for received in results:
                assert received and received[-1].command == "ERROR", received  # type: ignore[attr-defined]
                assert received[-1].get("message") == "not_found", received  # type: ignore[attr-defined]
            await bystander.check(backdoor)


class TestExclusivityPerSession:
    """AMQP ties exclusive queues to the connection; sessions share connections, so the gateway ties them to
    the session, and another session of the same user gets RESOURCE_LOCKED as it would on Web-STOMP."""

    async def _locked_error(self, url: str, subscribe: frame) -> object:  # type: ignore[valid-type]
        received = await hostile(url, subscribe)
        assert received and received[-1].command == "ERROR", received  # type: ignore[attr-defined]
        return received[-1]

    async def test_send_with_durable_false_declares_a_queue_only_its_session_may_consume(
        self, gateway: Gateway, ws_url: str, backend: str, unique: str, clients: list[StompClient]
    ) -> None:
        owner = await open_ws(ws_url)
        clients.append(owner)
        await owner.connect()
        queue = f"/queue/excl-{unique}"
        await owner.send(frame("SEND", "mine", destination=queue, durable="false", receipt="s"))
        await owner.receipt("s")

        error = await self._locked_error(ws_url, frame("SUBSCRIBE", destination=queue, id="1", durable="false"))
        assert error.get("message") == "resource_locked"  # type: ignore[attr-defined]
        assert f"exclusive access to locked queue 'excl-{unique}'".encode() in error.body  # type: ignore[attr-defined]

        if backend == "rabbitmq":
            # A session on another AMQP connection (another gateway) gets the very same answer from RabbitMQ.
            from tests.conftest import make_config

            other = Gateway(make_config("rabbitmq"))
            await other.start()
            try:
                theirs = await self._locked_error(
                    f"ws://127.0.0.1:{other.port}/ws", frame("SUBSCRIBE", destination=queue, id="1", durable="false")
                )
            finally:
                await other.stop()
            assert theirs.get("message") == error.get("message")  # type: ignore[attr-defined]
            assert theirs.body == error.body  # type: ignore[attr-defined]

        # The owner itself still consumes it.
        await owner.send(frame("SUBSCRIBE", destination=queue, id="mine", durable="false", receipt="sub"))
        await owner.receipt("sub")
        message = await owner.receive_command("MESSAGE")
        assert message.body == b"mine"

    async def test_exclusive_named_subscription_queue_is_locked_for_other_sessions(
        self, gateway: Gateway, ws_url: str, unique: str, clients: list[StompClient], backdoor: Channel
    ) -> None:
        owner = await open_ws(ws_url)
        clients.append(owner)
        await owner.connect()
        name = f"excl-sub-{unique}"
        await owner.send(
            frame("SUBSCRIBE", destination=f"/topic/x.{unique}", id="1", exclusive="true", x_queue_name=name,
                  receipt="sub")
        )
        await owner.receipt("sub")
        error = await self._locked_error(ws_url, frame("SUBSCRIBE", destination=f"/amq/queue/{name}", id="1"))
        assert error.get("message") == "resource_locked"  # type: ignore[attr-defined]
        # the owner's subscription is untouched
        await backdoor.publish("amq.topic", f"x.{unique}", b"still mine", MessageProperties())
        assert (await owner.receive_command("MESSAGE")).body == b"still mine"

    async def test_the_queue_is_free_again_once_its_session_ended(
        self, gateway: Gateway, ws_url: str, unique: str, clients: list[StompClient]
    ) -> None:
        queue = f"/queue/excl-end-{unique}"
        owner = await open_ws(ws_url)
        await owner.connect()
        await owner.send(frame("SEND", "x", destination=queue, durable="false", receipt="s"))
        await owner.receipt("s")
        await owner.send(frame("DISCONNECT", receipt="bye"))
        await owner.receipt("bye")
        await owner.close()
        later = await open_ws(ws_url)
        clients.append(later)
        await later.connect()
        for attempt in range(50):  # the queue is deleted right after the session's end
            await later.send(frame("SUBSCRIBE", destination=queue, id=str(attempt), durable="false",
                                   receipt=f"r{attempt}"))
            reply = await later.receive()
            if reply.command == "RECEIPT":
                break
            assert reply.get("message") == "resource_locked", reply
            await later.close()
            await asyncio.sleep(0.1)
            later = await open_ws(ws_url)
            clients.append(later)
            await later.connect()
        else:
            raise AssertionError("the exclusive queue stayed locked after its session ended")


class TestWhenRabbitMQClosesASharedConnectionAnyway:
    @pytest.mark.rabbitmq_only("a connection-level error from RabbitMQ")
    async def test_the_reason_is_logged_and_told_to_the_sessions_without_internals(
        self, gateway: Gateway, ws_url: str, unique: str, clients: list[StompClient], caplog: pytest.LogCaptureFixture
    ) -> None:
        import pamqp.frame
        from pamqp import commands as spec

        from gateway.broker.amqp import AmqpBroker

        session = await open_ws(ws_url)
        clients.append(session)
        connected = await session.connect()
        await session.send(frame("SUBSCRIBE", destination=f"/queue/gone-{unique}", id="1", auto_delete="true",
                                 receipt="r"))
        await session.receipt("r")
        assert isinstance(gateway.broker, AmqpBroker)
        (pooled,) = [p for pool in gateway.broker._pools.values() for p in pool if p.channels]
        # Something only a bug could send: a frame on a channel that was never opened (504 CHANNEL_ERROR).
        pooled.connection.write(pamqp.frame.marshal(spec.Basic.Ack(1), 2000))
        error = await session.receive_command("ERROR", timeout=10)
        assert error.get("message") == "connection_forced"
        assert b"RabbitMQ closed the gateway's connection: 504 CHANNEL_ERROR" in error.body
        for internal in (b"127.0.0.1", b"5672", b"guest", b"amqp://"):
            assert internal not in error.body
        warnings = [r for r in caplog.records if r.name == "gateway.broker.amqp" and r.levelname == "WARNING"]
        assert any(
            "504 CHANNEL_ERROR" in r.getMessage() and f"session {connected.get('session')}" in r.getMessage()
            for r in warnings
        ), [r.getMessage() for r in warnings]
        ours = [r.getMessage() for r in caplog.records if r.name.startswith("gateway")]
        assert not any("guest" in m.split("user ")[0] or "amqp://" in m or "127.0.0.1" in m for m in ours), ours


def _send(destination: str, body: str = "x", **headers: str) -> frame:  # type: ignore[valid-type]
    return frame("SEND", body, destination=destination, receipt="r", **headers)


def _subscribe(destination: str, **headers: str) -> frame:  # type: ignore[valid-type]
    headers.setdefault("id", "s")
    return frame("SUBSCRIBE", destination=destination, receipt="r", **headers)


#: Every client-controlled value that reaches the AMQP wire, at or past RabbitMQ's limits: each may fail the
#: session that sent it (at channel level or in the gateway), never the connection it shares.
HOSTILE = {
    "header block over frame_max": _send("/topic/iso.h", **{f"h{i}": "v" * 8000 for i in range(17)}),
    "header name over 128 bytes": _send("/topic/iso.h", **{"n" * 200: "v"}),
    "header name over 255 bytes": _send("/topic/iso.h", **{"n" * 300: "v"}),
    "short-string property over 255 bytes": _send("/topic/iso.h", correlation_id="c" * 300),
    "user-id of another user": _send("/topic/iso.h", user_id="someone-else"),
    "expiration not a number": _send("/topic/iso.h", expiration="soon"),
    "expiration negative": _send("/topic/iso.h", expiration="-5"),
    "priority at the top": _send("/topic/iso.h", priority="255"),
    "routing key over 255 bytes": _send("/topic/" + "k" * 300),
    "exchange name over 255 bytes": _send("/exchange/" + "e" * 300 + "/k"),
    "queue name over 255 bytes": _send("/queue/" + "q" * 300),
    "missing exchange": _send("/exchange/iso-missing-exchange/k"),
    "reserved queue name": _send("/queue/amq.iso"),
    "queue argument of the wrong type": _subscribe("/queue/iso-arg-type", x_max_length="many"),
    "queue argument beyond 64 bits": _subscribe("/queue/iso-arg-big", x_max_length="9" * 30),
    "unknown queue type": _subscribe("/queue/iso-qtype", x_queue_type="bogus"),
    "max priority out of range": _subscribe("/queue/iso-prio", x_max_priority="1000"),
    "overflow behaviour unknown": _subscribe("/queue/iso-overflow", x_overflow="explode"),
    "queue arguments over frame_max": _subscribe(
        "/queue/iso-args", x_dead_letter_exchange="d" * 8000, x_dead_letter_routing_key="r" * 8000,
        x_queue_name="n" * 200, **{f"x-unknown-{i}": "u" * 8000 for i in range(16)},
    ),
    "consumer tag over 255 bytes": _subscribe("/topic/iso.t", id="i" * 300),
    "consumer priority beyond 64 bits": _subscribe("/queue/iso-cprio", x_priority="9" * 30),
    "prefetch beyond a short": _subscribe("/queue/iso-prefetch", prefetch_count="70000", ack="client"),
    "stream consumed without acks": _subscribe("/queue/iso-stream", x_queue_type="stream"),
    "stream offset nonsense": _subscribe("/queue/iso-stream", x_queue_type="stream", ack="client",
                                         prefetch_count="10", x_stream_offset="yesterday"),
    "exclusive queue of another session": _subscribe("/amq/queue/amq.gen-iso"),
    "ack of an unknown message": frame("ACK", id="nothing-here", receipt="r"),
    "nack of an unknown message": frame("NACK", id="nothing-here", requeue="maybe", receipt="r"),
}


class TestEveryValueOnTheWire:
    @pytest.mark.rabbitmq_only("the shared AMQP connection is RabbitMQ's")
    @pytest.mark.parametrize("case", list(HOSTILE))
    async def test_a_hostile_value_fails_at_most_its_own_session(
        self, case: str, gateway: Gateway, ws_url: str, backdoor: Channel, bystander: Bystander
    ) -> None:
        received = await hostile(ws_url, HOSTILE[case])
        for reply in received:
            if reply.command == "ERROR":  # type: ignore[attr-defined]
                assert reply.get("message") != "Internal error", reply  # type: ignore[attr-defined]
        await bystander.check(backdoor)
        for queue in ("iso-arg-type", "iso-arg-big", "iso-qtype", "iso-prio", "iso-overflow", "iso-args",
                      "iso-cprio", "iso-prefetch", "iso-stream"):
            try:
                await backdoor.delete_queue(queue)
            except Exception:  # most were never declared
                break
