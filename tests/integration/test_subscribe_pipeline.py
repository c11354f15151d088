"""SUBSCRIBEs of one session overlap their broker round trips; RECEIPTs stay in order and each comes once its
subscription is in place (issue 8). Real RabbitMQ and the embedded broker."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.broker.base import BrokerError, Channel, MessageProperties
from gateway.fanout import Sink
from gateway.server import Gateway
from tests.stomp_client import StompClient, frame


async def subscribe_many(client: StompClient, destinations: list[str], **headers: str) -> float:
    started = time.perf_counter()
    await client.send(
        b"".join(
            frame("SUBSCRIBE", destination=d, id=str(i), receipt=str(i), **headers).serialize("1.2")
            for i, d in enumerate(destinations)
        )
    )
    for i in range(len(destinations)):
        receipt = await client.receive_command("RECEIPT", timeout=60)
        assert receipt.get("receipt-id") == str(i)  # in the order of the SUBSCRIBEs
    return time.perf_counter() - started


async def test_a_thousand_topic_subscribes(connected: StompClient, unique: str, backdoor: Channel) -> None:
    keys = [f"pipe.{unique}.{i}" for i in range(1000)]
    elapsed = await subscribe_many(connected, [f"/topic/{k}" for k in keys])
    # 16.7 s before the pipelining on the project's machine, 3.5 s after (0.1 s on the embedded broker).
    assert elapsed < 15, f"{elapsed:.1f} s"
    for key in keys:  # every RECEIPT meant the binding was in place
        await backdoor.publish("amq.topic", key, key.encode(), MessageProperties())
    bodies = {(await connected.receive_command("MESSAGE", timeout=10)).body for _ in keys}
    assert bodies == {k.encode() for k in keys}


@pytest.mark.parametrize("gateway_overrides", [{"shared_fanout": False}])
async def test_subscribes_on_the_sessions_own_channel(connected: StompClient, unique: str, backdoor: Channel) -> None:
    queues = [f"pipe-{unique}-{i}" for i in range(100)]
    await subscribe_many(connected, [f"/queue/{q}" for q in queues], prefetch_count="5", ack="client")
    for q in queues:
        await backdoor.publish("", q, q.encode(), MessageProperties())
    bodies = {(await connected.receive_command("MESSAGE", timeout=10)).body for _ in queues}
    assert bodies == {q.encode() for q in queues}
    for q in queues:
        await backdoor.delete_queue(q)


async def test_a_frame_after_subscribes_waits_for_them(connected: StompClient, unique: str) -> None:
    """A SEND right behind SUBSCRIBEs (no receipts awaited) reaches them, as on RabbitMQ's plugin."""
    data = b"".join(
        frame("SUBSCRIBE", destination=f"/topic/after.{unique}.{i}", id=str(i)).serialize("1.2") for i in range(20)
    )
    data += frame("SEND", "hello", destination=f"/topic/after.{unique}.19", receipt="s").serialize("1.2")
    await connected.send(data)
    await connected.receipt("s")
    assert (await connected.receive_command("MESSAGE")).body == b"hello"


async def test_a_failing_subscribe_in_the_middle(connected: StompClient, unique: str) -> None:
    """The RECEIPTs before it, then its ERROR; nothing after it."""
    destinations = [f"/topic/fail.{unique}.{i}" for i in range(10)]
    destinations[5] = f"/exchange/missing-{unique}/k"
    await connected.send(
        b"".join(
            frame("SUBSCRIBE", destination=d, id=str(i), receipt=str(i)).serialize("1.2")
            for i, d in enumerate(destinations)
        )
    )
    for i in range(5):
        assert (await connected.receive_command("RECEIPT")).get("receipt-id") == str(i)
    error = await connected.receive_command("ERROR")
    assert error.get("message") == "not_found" and error.get("receipt-id") == "5"
    await connected.wait_closed()


async def test_no_message_before_its_subscribes_receipt(
    connected: StompClient, unique: str, backdoor: Channel
) -> None:
    """While pipelined SUBSCRIBEs wait for earlier RECEIPTs, their messages wait too."""
    topics = [f"order.{unique}.{i}" for i in range(40)]
    stop = asyncio.Event()

    async def publish() -> None:
        while not stop.is_set():
            for key in topics:
                await backdoor.publish("amq.topic", key, b"tick", MessageProperties())
            await asyncio.sleep(0.001)

    publisher = asyncio.create_task(publish())
    try:
        await asyncio.sleep(0.05)
        frames_ = []
        for i, key in enumerate(topics):  # own-channel /queue SUBSCRIBEs in between slow the chain down
            frames_.append(frame("SUBSCRIBE", destination=f"/queue/order-{unique}-{i}", id=f"q{i}", receipt=f"q{i}"))
            frames_.append(frame("SUBSCRIBE", destination=f"/topic/{key}", id=f"t{i}", receipt=f"t{i}"))
        await connected.send(b"".join(f.serialize("1.2") for f in frames_))
        receipted: set[str] = set()
        while len(receipted) < len(frames_):
            f = await connected.receive(timeout=30)
            if f.command == "RECEIPT":
                receipted.add(f.get("receipt-id") or "")
            else:
                assert f.command == "MESSAGE", f
                assert f.get("subscription") in receipted, f"MESSAGE for {f.get('subscription')} before its RECEIPT"
    finally:
        stop.set()
        await publisher
        for i in range(len(topics)):
            await backdoor.delete_queue(f"order-{unique}-{i}")


async def test_a_shared_subscription_abandoned_before_its_consumer_started_leaves_no_queue(
    gateway: Gateway, unique: str
) -> None:
    """A shared group's queue is declared and bound before its consumer starts. A SUBSCRIBE abandoned in between
    (the session went, the consume was refused) must not leave the queue taking its messages until it expires:
    attached and cancelled at several points of its start, no group leaves a queue behind."""
    principal = await gateway.broker.authenticate("guest", "guest", "/")
    hub = gateway.registry.hub_for(principal)
    names: list[str] = []
    for i, delay in enumerate((0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016)):
        key = f"abandoned.{unique}.{i}"
        sink = Sink(lambda template: None, lambda error: None)
        task = asyncio.ensure_future(hub.attach("amq.topic", key, sink))
        await asyncio.sleep(delay)
        group = hub.groups.get(("amq.topic", key))
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:  # it finished first: the last one out takes the queue with it
            await hub.detach(sink)
        if group is not None and group.queue:
            names.append(group.queue)
    assert names, "no group got as far as naming its queue"
    for name in names:
        deadline = time.monotonic() + 5
        while True:
            channel = await gateway.broker.open_channel(principal)
            try:
                await channel.declare_queue(name, passive=True)
            except BrokerError as gone:
                assert gone.code == 404, gone
                break
            finally:
                await channel.close()
            assert time.monotonic() < deadline, f"{name} is still there"
            await asyncio.sleep(0.1)
