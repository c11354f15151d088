"""Continuity (issue 14): last value on subscribe, recovery after reconnect, conflation, ack:auto streams.

Real WebSockets against a real gateway, in front of the embedded broker and a real RabbitMQ. The retained
exchange is ``amq.topic`` (it exists on both brokers from the start); every test uses routing keys of its own.
Ticks are published beside the gateway (the ``backdoor`` channel), as the stock daemon does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator

import pytest

from gateway.broker.amqp_connection import (
    AmqpConnection,
    ChannelClosedByBroker,
    ConnectionParameters,
    QueueDeclare,
)
from gateway.broker.base import Channel, MessageProperties
from gateway.server import Gateway
from tests.conftest import AMQP_URL, make_config, rabbitmq_running
from tests.stomp_client import StompClient, frame, open_ws

RETAINED = "amq.topic"
BASE = {"retain": [RETAINED], "history_size": 50, "history_ttl": 5.0}


@pytest.fixture
def gateway_overrides() -> dict[str, object]:
    return dict(BASE)


async def until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def retaining(gateway: Gateway) -> None:
    """The gateway's feed of the retained exchange is consuming."""
    await until(lambda: gateway.registry.retainers[RETAINED].ready)


async def publish(backdoor: Channel, key: str, body: str, exchange: str = RETAINED) -> None:
    await backdoor.publish(exchange, key, body.encode(), MessageProperties())


async def retained_body(gateway: Gateway, key: str) -> bytes | None:
    delivery = gateway.registry.retainers[RETAINED].retained.get(key)
    return None if delivery is None else delivery.body


async def client_of(gateway: Gateway) -> StompClient:
    c = await open_ws(f"ws://127.0.0.1:{gateway.port}/ws")
    await c.connect()
    return c


async def subscribe(c: StompClient, destination: str, sub_id: str = "s", **headers: str) -> dict[str, str]:
    await c.send(frame("SUBSCRIBE", destination=destination, id=sub_id, receipt="r-" + sub_id, **headers))
    receipt = await c.receive_command("RECEIPT")
    assert receipt.get("receipt-id") == "r-" + sub_id
    return dict(receipt.headers)


async def bodies(c: StompClient, n: int, timeout: float = 5.0) -> list[str]:
    return [(await c.receive_command("MESSAGE", timeout)).body.decode() for _ in range(n)]


# --- last value on subscribe -------------------------------------------------------------------------------


async def test_last_value_first_then_live(gateway: Gateway, backdoor: Channel, unique: str) -> None:
    await retaining(gateway)
    for key, body in ((f"{unique}.A", "a1"), (f"{unique}.A", "a2"), (f"{unique}.B", "b1")):
        await publish(backdoor, key, body)
    await until(lambda: gateway.registry.retainers[RETAINED].retained.get(f"{unique}.B") is not None)
    c = await client_of(gateway)
    try:
        receipt = await subscribe(c, f"/topic/{unique}.*", x_last_value="true")
        assert receipt["x-last-value"] == "true"
        first = [await c.receive_command("MESSAGE") for _ in range(2)]
        assert [m.body for m in first] == [b"a2", b"b1"]  # the newest per key, least recently updated first
        assert all(m.get("x-last-value") == "true" for m in first)
        assert [m.get("destination") for m in first] == [f"/topic/{unique}.A", f"/topic/{unique}.B"]
        await publish(backdoor, f"{unique}.A", "a3")
        live = await c.receive_command("MESSAGE")
        assert live.body == b"a3" and live.get("x-last-value") is None
        await c.nothing(0.2)
    finally:
        await c.close()


async def test_last_value_through_exchange_destination_and_without_a_retained_exchange(
    gateway: Gateway, backdoor: Channel, unique: str
) -> None:
    await retaining(gateway)
    await publish(backdoor, f"{unique}.x", "x1")
    await until(lambda: gateway.registry.retainers[RETAINED].retained.get(f"{unique}.x") is not None)
    c = await client_of(gateway)
    try:
        receipt = await subscribe(c, f"/exchange/{RETAINED}/{unique}.#", "e", x_last_value="true")
        assert receipt["x-last-value"] == "true"
        assert (await c.receive_command("MESSAGE")).body == b"x1"
        # amq.direct is not retained: the RECEIPT says so, and the subscription is live only.
        receipt = await subscribe(c, f"/exchange/amq.direct/{unique}", "d", x_last_value="true")
        assert receipt["x-last-value"] == "false"
        await c.nothing(0.2)
    finally:
        await c.close()


async def _publish_sequence(backdoor: Channel, key: str, count: int, pause_every: int = 20) -> None:
    for i in range(1, count + 1):
        await publish(backdoor, key, str(i))
        if i % pause_every == 0:
            await asyncio.sleep(0.005)


async def _received_until(c: StompClient, last: str, timeout: float = 10.0) -> list[int]:
    got: list[int] = []
    while not got or got[-1] != int(last):
        got.append(int((await c.receive_command("MESSAGE", timeout)).body))
    return got


async def test_last_value_hand_over_while_ticks_flow_has_no_duplicate_and_no_gap(
    gateway: Gateway, backdoor: Channel, unique: str
) -> None:
    await retaining(gateway)
    key = f"{unique}.race"
    await publish(backdoor, key, "0")
    await until(lambda: gateway.registry.retainers[RETAINED].retained.get(key) is not None)
    count = 600
    clients = [await client_of(gateway) for _ in range(6)]
    try:
        publisher = asyncio.create_task(_publish_sequence(backdoor, key, count))
        receipts = []
        for i, c in enumerate(clients):  # joining at different moments of the stream
            await asyncio.sleep(0.01 * i)
            receipts.append(await subscribe(c, f"/topic/{key}", x_last_value="true"))
        await publisher
        for c in clients:
            got = await _received_until(c, str(count))
            assert got == list(range(got[0], count + 1)), got[:10]  # the last value, then every later one
        assert all(r["x-last-value"] == "true" for r in receipts)
    finally:
        for c in clients:
            await c.close()


@pytest.mark.parametrize(
    "gateway_overrides", [{**BASE, "retain_max_keys": 3, "retain_max_bytes": 1000}], indirect=False
)
async def test_the_retained_map_is_bounded_in_keys_and_bytes(gateway: Gateway, backdoor: Channel, unique: str) -> None:
    """On RabbitMQ other tests publish to amq.topic too: the bounds are checked on this test's own keys."""
    await retaining(gateway)
    retained = gateway.registry.retainers[RETAINED].retained
    for i in range(4):
        await publish(backdoor, f"{unique}.k{i}", f"v{i}")
    await until(lambda: retained.get(f"{unique}.k3") is not None)
    assert retained.get(f"{unique}.k0") is None  # 4 keys > 3: the least recently updated went
    assert len(retained) <= 3
    await publish(backdoor, f"{unique}.big", "x" * 2000)  # larger than the 1000 bytes allowed: not kept
    await publish(backdoor, f"{unique}.after", "y")
    await until(lambda: retained.get(f"{unique}.after") is not None)
    assert retained.get(f"{unique}.big") is None
    assert retained.bytes <= 1000


# --- recovery after reconnect --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exchange", "topic"])
async def test_recovery_after_reconnect_gets_every_missed_message_in_order(
    gateway: Gateway, backdoor: Channel, unique: str, kind: str
) -> None:
    """``/exchange/amq.direct`` is served by a group with a queue of its own, ``/topic`` by the retained feed."""
    exchange, destination = (
        ("amq.direct", f"/exchange/amq.direct/{unique}") if kind == "exchange" else (RETAINED, f"/topic/{unique}")
    )
    await retaining(gateway)
    c = await client_of(gateway)
    await subscribe(c, destination)
    for i in range(1, 4):
        await publish(backdoor, unique, f"m{i}", exchange)
    seen = [await c.receive_command("MESSAGE") for _ in range(3)]
    positions = [m.get("x-recovery-position") for m in seen]
    assert all(p is not None for p in positions)
    epoch = positions[0].rpartition(":")[0]  # type: ignore[union-attr]
    assert positions == [f"{epoch}:1", f"{epoch}:2", f"{epoch}:3"]
    await c.close()  # the network blip: the only subscriber is gone, the binding stays (history-ttl)
    for i in range(4, 8):
        await publish(backdoor, unique, f"m{i}", exchange)
    await asyncio.sleep(0.1)
    c = await client_of(gateway)
    try:
        receipt = await subscribe(c, destination, x_recover_from=positions[-1])
        assert receipt["x-recovered"] == "true"
        recovered = [await c.receive_command("MESSAGE") for _ in range(4)]
        assert [m.body for m in recovered] == [b"m4", b"m5", b"m6", b"m7"]
        assert recovered[-1].get("x-recovery-position") == f"{epoch}:7"
        await publish(backdoor, unique, "m8", exchange)
        assert (await c.receive_command("MESSAGE")).body == b"m8"
        await c.nothing(0.2)
    finally:
        await c.close()


@pytest.mark.parametrize("gateway_overrides", [{**BASE, "history_size": 1000}])
async def test_recovery_hand_over_while_ticks_flow_has_no_duplicate_and_no_gap(
    gateway: Gateway, backdoor: Channel, unique: str
) -> None:
    await retaining(gateway)
    key = f"{unique}.rec"
    watcher = await client_of(gateway)
    await subscribe(watcher, f"/topic/{key}")
    count = 400
    clients = [await client_of(gateway) for _ in range(4)]
    try:
        publisher = asyncio.create_task(_publish_sequence(backdoor, key, count))
        positions: dict[int, str] = {}
        receipts = []
        for c in clients:
            # A position a few messages back, while the ticks keep coming.
            message = await watcher.receive_command("MESSAGE")
            positions[id(c)] = message.get("x-recovery-position") or ""
            start = int(message.body)
            for _ in range(3):
                await watcher.receive_command("MESSAGE")
            receipts.append(await subscribe(c, f"/topic/{key}", x_recover_from=positions[id(c)]))
            assert receipts[-1]["x-recovered"] == "true"
            got = await _received_until(c, str(start + 5))
            assert got == list(range(start + 1, start + 6)), got
        await publisher
        for c in clients:
            rest = await _received_until(c, str(count))
            assert rest == list(range(rest[0], count + 1))
        assert all(r["x-recovered"] == "true" for r in receipts)
    finally:
        await watcher.close()
        for c in clients:
            await c.close()


async def test_a_position_not_covered_gives_live_messages_and_says_so(
    gateway: Gateway, backdoor: Channel, unique: str
) -> None:
    c = await client_of(gateway)
    try:
        await subscribe(c, f"/exchange/amq.direct/{unique}", "a")
        await publish(backdoor, unique, "one", "amq.direct")
        position = (await c.receive_command("MESSAGE")).get("x-recovery-position") or ""
        epoch = position.rpartition(":")[0]
        for header, name in ((f"other:{1}", "b"), (f"{epoch}:99", "c")):  # another epoch; a future offset
            receipt = await subscribe(c, f"/exchange/amq.direct/{unique}", name, x_recover_from=header)
            assert receipt["x-recovered"] == "false"
        await c.nothing(0.2)  # nothing recovered
        await publish(backdoor, unique, "two", "amq.direct")
        assert sorted([(await c.receive_command("MESSAGE")).get("subscription") or "" for _ in range(3)]) == [
            "a",
            "b",
            "c",
        ]
    finally:
        await c.close()


@pytest.mark.parametrize("gateway_overrides", [{**BASE, "history_size": 5}])
async def test_recovery_bounded_in_count(gateway: Gateway, backdoor: Channel, unique: str) -> None:
    c = await client_of(gateway)
    try:
        await subscribe(c, f"/exchange/amq.direct/{unique}", "a")
        await publish(backdoor, unique, "0", "amq.direct")
        position = (await c.receive_command("MESSAGE")).get("x-recovery-position") or ""
        for i in range(1, 6):
            await publish(backdoor, unique, str(i), "amq.direct")
        await bodies(c, 5)
        receipt = await subscribe(c, f"/exchange/amq.direct/{unique}", "b", x_recover_from=position)
        assert receipt["x-recovered"] == "true"  # exactly the 5 kept
        assert await bodies(c, 5) == ["1", "2", "3", "4", "5"]
        await publish(backdoor, unique, "6", "amq.direct")
        await bodies(c, 2)
        receipt = await subscribe(c, f"/exchange/amq.direct/{unique}", "c", x_recover_from=position)
        assert receipt["x-recovered"] == "false"  # "1" is gone: a hole, so not covered
        await c.nothing(0.2)
    finally:
        await c.close()


@pytest.mark.parametrize("gateway_overrides", [{**BASE, "history_max_bytes": 700}])
async def test_recovery_bounded_in_bytes(gateway: Gateway, backdoor: Channel, unique: str) -> None:
    c = await client_of(gateway)
    try:
        await subscribe(c, f"/exchange/amq.direct/{unique}", "a")
        await publish(backdoor, unique, "0", "amq.direct")
        position = (await c.receive_command("MESSAGE")).get("x-recovery-position") or ""
        for i in range(1, 4):
            await publish(backdoor, unique, str(i) * 200, "amq.direct")  # ~300 bytes each with the headers
        await bodies(c, 3)
        receipt = await subscribe(c, f"/exchange/amq.direct/{unique}", "b", x_recover_from=position)
        assert receipt["x-recovered"] == "false"
    finally:
        await c.close()


@pytest.mark.parametrize("gateway_overrides", [{**BASE, "history_ttl": 0.4}])
async def test_recovery_bounded_in_time_and_the_binding_lingers_that_long(
    gateway: Gateway, backdoor: Channel, unique: str
) -> None:
    c = await client_of(gateway)
    await subscribe(c, f"/exchange/amq.direct/{unique}", "a")
    await publish(backdoor, unique, "0", "amq.direct")
    position = (await c.receive_command("MESSAGE")).get("x-recovery-position") or ""
    await c.close()
    await publish(backdoor, unique, "1", "amq.direct")
    await asyncio.sleep(0.1)
    c = await client_of(gateway)
    try:
        receipt = await subscribe(c, f"/exchange/amq.direct/{unique}", "b", x_recover_from=position)
        assert receipt["x-recovered"] == "true"
        assert await bodies(c, 1) == ["1"]
        await asyncio.sleep(0.6)  # "1" is older than the ttl now
        receipt = await subscribe(c, f"/exchange/amq.direct/{unique}", "c", x_recover_from=position)
        assert receipt["x-recovered"] == "false"
    finally:
        await c.close()
    await asyncio.sleep(0.6)  # nobody subscribed for longer than the ttl: the binding is gone
    assert not any(hub.groups for hub in gateway.registry.hubs.values())


async def test_a_restarted_gateway_has_a_new_epoch(backend: str, unique: str) -> None:
    config = make_config(backend, **BASE)
    first = Gateway(config)
    await first.start()
    try:
        c = await client_of(first)
        await subscribe(c, f"/topic/{unique}")
        await c.send(frame("SEND", "m1", destination=f"/topic/{unique}", receipt="p"))
        # The RECEIPT follows RabbitMQ's publisher confirm, which may come before or after the delivery.
        await c.receipt("p")
        position = (await c.receive_command("MESSAGE")).get("x-recovery-position") or ""
        await c.close()
    finally:
        await first.stop()
    second = Gateway(make_config(backend, **BASE))
    await second.start()
    try:
        c = await client_of(second)
        receipt = await subscribe(c, f"/topic/{unique}", x_recover_from=position)
        assert receipt["x-recovered"] == "false"
        await c.close()
    finally:
        await second.stop()


@contextlib.asynccontextmanager
async def two_gateways(backend: str) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateways in front of one broker (one embedded broker shared in process, or RabbitMQ)."""
    one = Gateway(make_config(backend, **BASE))
    other = Gateway(make_config(backend, **BASE), broker=one.broker if backend == "memory" else None)
    await one.start()
    await other.start()
    try:
        yield one, other
    finally:
        await other.stop()
        await one.stop()


async def test_two_gateways_each_retain_and_positions_are_their_own(backend: str, unique: str) -> None:
    async with two_gateways(backend) as (one, other):
        await retaining(one)
        await retaining(other)
        publisher = await client_of(one)
        await publisher.send(frame("SEND", "v1", destination=f"/topic/{unique}", receipt="p"))
        await publisher.receipt("p")
        await until(lambda: all(g.registry.retainers[RETAINED].retained.get(unique) for g in (one, other)))
        a, b = await client_of(one), await client_of(other)
        try:
            for c in (a, b):
                receipt = await subscribe(c, f"/topic/{unique}", x_last_value="true")
                assert receipt["x-last-value"] == "true"
                assert await bodies(c, 1) == ["v1"]
            await publisher.send(frame("SEND", "v2", destination=f"/topic/{unique}"))
            positions = [(await c.receive_command("MESSAGE")).get("x-recovery-position") for c in (a, b)]
            assert positions[0] != positions[1]
            # A position of one gateway means nothing to the other: live only, and the client is told.
            receipt = await subscribe(b, f"/topic/{unique}", "again", x_recover_from=positions[0] or "")
            assert receipt["x-recovered"] == "false"
        finally:
            for c in (a, b, publisher):
                await c.close()


async def test_last_value_when_the_position_is_not_covered(gateway: Gateway, backdoor: Channel, unique: str) -> None:
    """Both headers: recovery if it can, else the last values (what a page sends on every reconnect)."""
    await retaining(gateway)
    await publish(backdoor, unique, "v1")
    await until(lambda: gateway.registry.retainers[RETAINED].retained.get(unique) is not None)
    c = await client_of(gateway)
    try:
        receipt = await subscribe(c, f"/topic/{unique}", x_recover_from="gone:3", x_last_value="true")
        assert receipt["x-recovered"] == "false" and receipt["x-last-value"] == "true"
        message = await c.receive_command("MESSAGE")
        assert message.body == b"v1"
        position = message.get("x-recovery-position") or ""
        await publish(backdoor, unique, "v2")
        assert await bodies(c, 1) == ["v2"]
        # The retained message stood for everything up to then: recovering from it gives v2, no v1 again.
        receipt = await subscribe(c, f"/topic/{unique}", "t", x_recover_from=position, x_last_value="true")
        assert receipt["x-recovered"] == "true" and "x-last-value" not in receipt
        assert await bodies(c, 1) == ["v2"]
    finally:
        await c.close()


# --- conflation ----------------------------------------------------------------------------------------------


async def test_conflation_sends_at_most_one_per_key_per_interval_and_always_the_last(
    gateway: Gateway, backdoor: Channel, unique: str
) -> None:
    c = await client_of(gateway)
    try:
        await subscribe(c, f"/topic/{unique}.*", x_conflate="300")
        started = time.monotonic()
        for i in range(1, 41):
            await publish(backdoor, f"{unique}.A", f"A{i}")
            await publish(backdoor, f"{unique}.B", f"B{i}")
        publishing = time.monotonic() - started
        got: dict[str, list[str]] = {"A": [], "B": []}
        while got["A"][-1:] != ["A40"] or got["B"][-1:] != ["B40"]:
            body = (await c.receive_command("MESSAGE", timeout=3)).body.decode()
            got[body[0]].append(body)
        elapsed = time.monotonic() - started
        # One per 300 ms interval while the burst lasted, plus the first and the last; in order.
        most = int(publishing / 0.3) + 2
        for key in "AB":
            assert 1 <= len(got[key]) <= min(most, 20), (publishing, got)
            assert got[key] == sorted(got[key], key=lambda body: int(body[1:]))
        assert elapsed < publishing + 1.0  # the last of the burst came at the end of its interval
        await c.nothing(0.4)
    finally:
        await c.close()


def _tcp_frame(command: str, **headers: str) -> bytes:
    return frame(command, **headers).serialize("1.2")


@pytest.mark.parametrize(
    "gateway_overrides", [{**BASE, "max_outbound_buffer": 64 * 1024, "max_conflate_interval": 2.0}]
)
async def test_a_lagging_conflating_subscriber_is_slowed_down_not_disconnected(
    gateway: Gateway, backdoor: Channel, unique: str
) -> None:
    """A client that stops reading (a throttled background tab): its conflating subscription holds back;
    a plain subscription on another client in the same state is disconnected as slow."""
    assert gateway.tcp_port is not None

    def slow_socket() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window throughout
        sock.connect(("127.0.0.1", gateway.tcp_port))
        sock.sendall(_tcp_frame("CONNECT", accept_version="1.2", host="/"))
        return sock

    conflating, plain = slow_socket(), slow_socket()
    try:
        conflating.sendall(_tcp_frame("SUBSCRIBE", destination=f"/topic/{unique}.*", id="c", x_conflate="20"))
        plain.sendall(_tcp_frame("SUBSCRIBE", destination=f"/topic/{unique}.*", id="p"))
        await asyncio.sleep(0.3)
        body = "x" * 32768  # the kernel's buffers take a few MiB before the gateway's own fills
        for i in range(300):
            await publish(backdoor, f"{unique}.k{i % 10}", f"{i:04d}{body}")
            if i % 10 == 0:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        # Now read everything the conflating client was sent: no ERROR, and the newest of each key arrives.
        conflating.setblocking(False)
        data = b""
        deadline = time.monotonic() + 8
        newest = {f"{i:04d}" for i in range(290, 300)}
        while time.monotonic() < deadline:
            try:
                chunk = conflating.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.02)
                continue
            assert chunk, "the conflating client was disconnected"
            data += chunk
            if all(f"\n\n{n}".encode() in data for n in newest):
                break
        assert b"ERROR" not in data
        assert all(f"\n\n{n}".encode() in data for n in newest)
        assert data.count(b"MESSAGE\n") < 300  # conflated
        plain.setblocking(False)
        received = b""
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                chunk = plain.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.02)
                continue
            if not chunk:
                break
            received += chunk
        assert b"message:Slow consumer" in received  # then the connection closed
    finally:
        conflating.close()
        plain.close()


# --- streams without the client's bookkeeping ----------------------------------------------------------------


@pytest.mark.parametrize("gateway_overrides", [{**BASE, "stream_prefetch": 10}])
async def test_a_stream_with_ack_auto_and_every_offset_form(
    gateway: Gateway, backdoor: Channel, unique: str
) -> None:
    stream = f"stream-{unique}"
    await backdoor.declare_queue(stream, durable=True, arguments={"x-queue-type": "stream"})
    try:
        for i in range(30):  # more than the prefetch: the gateway must ack as it writes
            await backdoor.publish("", stream, f"m{i}".encode(), MessageProperties(), confirm=True)
        c = await client_of(gateway)
        try:
            await subscribe(c, f"/amq/queue/{stream}", "first", x_stream_offset="first")
            messages = [await c.receive_command("MESSAGE") for _ in range(30)]
            assert [m.body.decode() for m in messages] == [f"m{i}" for i in range(30)]
            offsets = [int(m.get("x-stream-offset") or -1) for m in messages]
            assert offsets == sorted(offsets) and len(set(offsets)) == 30
            assert all(m.get("ack") is None for m in messages)
            await subscribe(c, f"/amq/queue/{stream}", "resume", x_stream_offset=f"offset={offsets[27]}")
            assert await bodies(c, 3) == ["m27", "m28", "m29"]
            await subscribe(c, f"/amq/queue/{stream}", "next", x_stream_offset="next")
            await subscribe(c, f"/amq/queue/{stream}", "ts", x_stream_offset=f"timestamp={int(time.time()) - 3600}")
            assert len(await bodies(c, 30)) == 30  # the whole stream is younger than an hour
            await backdoor.publish("", stream, b"live", MessageProperties(), confirm=True)
            live = [await c.receive_command("MESSAGE") for _ in range(4)]
            assert {m.get("subscription") for m in live} == {"first", "resume", "next", "ts"}
            assert {m.body for m in live} == {b"live"}
        finally:
            await c.close()
    finally:
        await backdoor.delete_queue(stream)


async def test_a_stream_declared_by_the_subscribe_needs_no_ack_from_the_client(
    connected: StompClient, backdoor: Channel, unique: str
) -> None:
    stream = f"stream-{unique}"
    try:
        await subscribe(connected, f"/queue/{stream}", x_queue_type="stream")  # from "next" on
        for i in range(3):
            await connected.send(frame("SEND", f"m{i}", destination=f"/queue/{stream}", x_queue_type="stream"))
        messages = [await connected.receive_command("MESSAGE") for _ in range(3)]
        assert [m.body for m in messages] == [b"m0", b"m1", b"m2"]
        assert [m.get("x-stream-offset") for m in messages] == ["0", "1", "2"]
    finally:
        await backdoor.delete_queue(stream)


# --- what the session refuses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "headers", "text"),
    [
        ("/queue/q", {"x_last_value": "true"}, "apply to ack:auto subscriptions"),
        ("/topic/t", {"x_last_value": "true", "ack": "client"}, "apply to ack:auto subscriptions"),
        ("/topic/t", {"x_last_value": "maybe"}, "'x-last-value' must be true or false"),
        ("/topic/t", {"x_recover_from": "nocolon"}, "'x-recover-from' must be <epoch>:<offset>"),
        ("/topic/t", {"x_conflate": "0"}, "'x-conflate' must be an interval of 1..30000 ms"),
        ("/topic/t", {"x_conflate": "fast"}, "'x-conflate' must be an interval"),
        ("/queue/q", {"x_stream_offset": "offset=-1"}, "'x-stream-offset' must be first, last, next"),
    ],
)
async def test_bad_continuity_headers_are_an_error(
    connected: StompClient, destination: str, headers: dict[str, str], text: str
) -> None:
    await connected.send(frame("SUBSCRIBE", destination=destination, id="x", receipt="r", **headers))
    error = await connected.receive_command("ERROR")
    assert error.get("message") == "Invalid header" and error.get("receipt-id") == "r"
    assert text in error.body.decode()


# --- liveness for background tabs: WebSocket pings, pongs count -------------------------------------------

PINGS = {"ws_ping_interval": 1, "heartbeat_min": 200}


@pytest.mark.parametrize("gateway_overrides", [PINGS])
async def test_a_client_whose_heart_beats_stop_but_whose_socket_answers_pings_is_kept(client: StompClient) -> None:
    """A throttled tab: its STOMP heart-beats stop, its WebSocket (the browser, not the page) answers pings."""
    connected = await client.connect(heart_beat="1500,0")  # the gateway expects one every 1.5 s (3 s deadline)
    assert connected.get("heart-beat") == "0,1500"
    await asyncio.sleep(5)  # silent at the STOMP level all along
    assert not client.closed.is_set()
    await client.send(frame("DISCONNECT", receipt="bye"))
    await client.receipt("bye")


async def _raw_websocket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client by hand, which answers nothing (no pong): a dead peer behind a live TCP socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: v12.stomp\r\n\r\n"
    )
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def _client_frame(data: bytes) -> bytes:
    """One masked text frame (mask key 0: the payload stays as it is)."""
    assert len(data) < 126
    return bytes((0x81, 0x80 | len(data))) + b"\0\0\0\0" + data


@pytest.mark.parametrize("gateway_overrides", [PINGS])
async def test_a_client_that_answers_no_ping_still_times_out(gateway: Gateway) -> None:
    assert gateway.port is not None
    reader, writer = await _raw_websocket(gateway.port)
    try:
        writer.write(_client_frame(_tcp_frame("CONNECT", accept_version="1.2", host="/", heart_beat="1500,0")))
        started = time.monotonic()
        data = b""
        while b"Heart-beat timeout" not in data:
            chunk = await asyncio.wait_for(reader.read(65536), 8)
            assert chunk, data
            data += chunk
        assert b"\x89" in data  # it was pinged (opcode 9) before it was given up
        assert 2.9 <= time.monotonic() - started < 6
    finally:
        writer.close()


@pytest.mark.skipif(not rabbitmq_running(), reason="RabbitMQ is not running on 127.0.0.1:5672")
async def test_a_gateway_stopped_before_its_feed_consumes_leaves_no_queue_behind() -> None:
    """The retained feed's queue is bound to "#": one left behind by a gateway stopped between declaring and
    consuming it would take every message of the exchange until it expires (60 s). Stopped at several
    points of its start, the gateway leaves none."""
    names: list[str] = []
    for delay in (0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05):
        gateway = Gateway(make_config("rabbitmq", retain=[RETAINED]))
        await gateway.start()
        await asyncio.sleep(delay)
        retainer = gateway.registry.retainers[RETAINED]
        await gateway.stop()
        names += retainer.queues
    assert names, "no feed got as far as declaring its queue"
    await _all_gone(names)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(
    not rabbitmq_running() or shutil.which("rabbitmqctl") is None or os.geteuid() != 0,
    reason="needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl as root (a user with limited permissions)",
)
async def test_a_feed_refused_its_consume_leaves_no_queue_behind(unique: str) -> None:
    """The feed's user may declare and bind its queue but not read from it: each attempt's queue, bound to "#",
    is deleted when the consume is refused, not left to take the exchange's messages for 60 s."""
    user = f"feed-{unique}"
    _rabbitmqctl("add_user", user, user)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", r"^amq\.topic$")  # read: the exchange only
        gateway = Gateway(make_config("rabbitmq", retain=[RETAINED], default_login=user, default_passcode=user))
        await gateway.start()
        try:
            retainer = gateway.registry.retainers[RETAINED]
            await until(lambda: len(retainer.queues) >= 2, timeout=10)  # refused, and tried again
            assert not retainer.ready
        finally:
            await gateway.stop()
        names = list(retainer.queues)
    finally:
        _rabbitmqctl("delete_user", user)
    await _all_gone(names)


async def _all_gone(names: list[str]) -> None:
    connection = await AmqpConnection.connect(ConnectionParameters.from_url(AMQP_URL, heartbeat=0), timeout=10)
    try:
        for name in names:
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                channel = await connection.open_channel(connection.gate.take(connection.channels) or 0)
                try:
                    await channel.rpc(QueueDeclare(queue=name, passive=True))
                except ChannelClosedByBroker as gone:
                    assert "NOT_FOUND" in str(gone)
                    break
                await channel.close()
                assert asyncio.get_running_loop().time() < deadline, f"{name} is still there"
                await asyncio.sleep(0.1)
    finally:
        await connection.close()
