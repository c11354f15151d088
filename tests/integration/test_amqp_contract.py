"""The contract between gateway/broker/amqp.py and the aiormq/aio-pika members outside their documented API.

Every such member the adapter uses is named here and checked on a real connection to RabbitMQ, so that a
release that renames or drops one fails this test by name instead of failing the gateway at run time.
"""

from __future__ import annotations

import asyncio
import inspect

import aio_pika
import aiormq
import aiormq.connection
import pytest
from aiormq.abc import ChannelFrame

from tests.conftest import AMQP_URL, rabbitmq_running

pytestmark = pytest.mark.skipif(not rabbitmq_running(), reason="RabbitMQ is not running on 127.0.0.1:5672")


async def test_the_frame_receiver_the_adapter_replaces() -> None:
    receiver = aiormq.connection.FrameReceiver
    # _BufferedFrameReceiver subclasses it: constructed with the stream reader, read by get_frame() and
    # async iteration; it uses the reader and the started flag of the base class.
    assert list(inspect.signature(receiver.__init__).parameters) == ["self", "reader"]
    assert inspect.iscoroutinefunction(receiver.get_frame)
    instance = receiver(asyncio.StreamReader())
    assert hasattr(instance, "reader") and instance.started is False


def test_channel_frames_as_the_writer_reads_them() -> None:
    # _GatedFrame stands in for a ChannelFrame: the writer reads payload, should_close, should_drain, drain().
    frame = ChannelFrame.marshall(channel_number=1, frames=[])
    for member in ("payload", "should_close", "should_drain", "drain"):
        assert hasattr(frame, member), member


async def test_connection_and_channel_members_on_a_real_connection() -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        underlay = connection.transport.connection  # type: ignore[union-attr]  # aio-pika's aiormq connection
        assert isinstance(underlay, aiormq.Connection)
        assert underlay.connection_tune.frame_max > 0 and underlay.connection_tune.channel_max > 0
        assert isinstance(underlay.channels, dict)
        channel = await underlay.channel(channel_number=7, publisher_confirms=False)
        assert channel.number == 7 and underlay.channels[7] is channel
        # Replaced per channel by _ChannelWrites: aiormq writes every frame of the channel through it.
        assert isinstance(channel.write_queue, asyncio.Queue)  # type: ignore[attr-defined]
        assert channel.write_queue is underlay.write_queue  # type: ignore[attr-defined]
        # The publish path: body split by frame_max, confirmations keyed by delivery tag after confirm.select.
        assert [part.value for part in channel._split_body(b"abc")] == [b"abc"]  # type: ignore[attr-defined]
        assert channel.delivery_tag == 0  # type: ignore[attr-defined]
        assert isinstance(channel.confirmations, dict)  # type: ignore[attr-defined]
        assert channel.publisher_confirms is False  # type: ignore[attr-defined]
        assert inspect.iscoroutinefunction(inspect.unwrap(channel.rpc))
        assert isinstance(channel.closing, asyncio.Future)
        await channel.close()
        assert 7 not in underlay.channels  # the number is free once the broker's close-ok arrived
    finally:
        await connection.close()
