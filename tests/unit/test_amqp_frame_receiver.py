"""The buffered AMQP frame receiver: bulk parsing, deliveries handed straight to registered consumers, and
the no-op frame that keeps aiormq's stuck-connection check fed while it does so."""

from __future__ import annotations

import asyncio

from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from gateway.broker.amqp import _BufferedFrameReceiver
from gateway.broker.base import Delivery


def wire(channel: int, *frames: object) -> bytes:
    return b"".join(amqp_frame.marshal(f, channel) for f in frames)  # type: ignore[arg-type]


def delivery(tag: str, n: int, body: bytes) -> bytes:
    frames: list[object] = [
        spec.Basic.Deliver(consumer_tag=tag, delivery_tag=n, exchange="x", routing_key="k"),
        ContentHeader(body_size=len(body), properties=spec.Basic.Properties(content_type="text/plain")),
    ]
    if body:  # RabbitMQ sends no body frame for an empty body
        frames.append(ContentBody(body))
    return wire(1, *frames)


async def test_frames_are_parsed_in_bulk_and_in_order() -> None:
    reader = asyncio.StreamReader()
    receiver = _BufferedFrameReceiver(reader)
    receiver.started = True
    data = wire(0, Heartbeat()) + wire(2, spec.Basic.QosOk()) + delivery("other", 1, b"abc")
    for i in range(0, len(data), 5):  # any split of the stream
        reader.feed_data(data[i : i + 5])
    got = [await receiver.get_frame() for _ in range(5)]
    assert [type(f[2]).__name__ for f in got] == [
        "Heartbeat",
        "QosOk",
        "Deliver",
        "ContentHeader",
        "ContentBody",
    ]


async def test_registered_deliveries_go_straight_to_the_consumer() -> None:
    reader = asyncio.StreamReader()
    receiver = _BufferedFrameReceiver(reader)
    receiver.started = True
    seen: list[Delivery] = []
    receiver.fast[(1, "mine")] = seen.append
    reader.feed_data(delivery("mine", 7, b"hello") + delivery("mine", 8, b""))
    frame = await receiver.get_frame()
    # aiormq sees a no-op frame (traffic for its heartbeat check), not the deliveries
    assert isinstance(frame[2], Heartbeat) and frame[1] == 0
    assert [(d.delivery_tag, d.body, d.properties.content_type) for d in seen] == [
        (7, b"hello", "text/plain"),
        (8, b"", "text/plain"),
    ]
    assert seen[0].exchange == "x" and seen[0].routing_key == "k" and seen[0].consumer_tag == "mine"


async def test_a_failing_consumer_does_not_stop_the_reader() -> None:
    reader = asyncio.StreamReader()
    receiver = _BufferedFrameReceiver(reader)
    receiver.started = True

    def broken(_: Delivery) -> None:
        raise RuntimeError("boom")

    receiver.fast[(1, "mine")] = broken
    reader.feed_data(delivery("mine", 1, b"x") + wire(2, spec.Basic.QosOk()))
    frames = [await receiver.get_frame()]
    while not isinstance(frames[-1][2], spec.Basic.QosOk):
        frames.append(await receiver.get_frame())
    assert isinstance(frames[-1][2], spec.Basic.QosOk)
