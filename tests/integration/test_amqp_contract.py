"""The contract between the gateway's AMQP connection (gateway/broker/amqp_connection.py) and what it is built
on: pamqp's public frame codec, and RabbitMQ.

The connection reaches into no package's private members and changes nothing in any module. What it relies
on is named here, so that a pamqp release that changes it fails this test by name rather than the gateway at
run time:

* ``pamqp.frame.marshal(frame, channel) -> bytes`` and ``pamqp.frame.unmarshal(bytes) -> (size, channel,
  frame)`` for method, content header, content body and heartbeat frames; ``ProtocolHeader().marshal()``.
* pamqp's command classes check names in ``validate()`` (called by ``__init__`` and ``marshal()``), and
  marshal the attributes their class lists; the gateway's subclasses override ``validate()`` only.
* ``pamqp.encode.field_table`` and ``pamqp.decode.field_table`` for header tables with values other than
  strings: the frames every message crosses (``basic.publish``, ``basic.deliver`` and their content) are
  written and read by ``gateway/broker/amqp_codec.py``, checked against pamqp in
  ``tests/unit/test_amqp_codec.py`` and against RabbitMQ here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from gateway.broker import amqp  # noqa: F401 - imported for the check that importing it changes nothing
from gateway.broker.amqp_codec import encode_publish
from gateway.broker.amqp_connection import (
    AmqpConnection,
    BasicConsume,
    BasicPublish,
    ConnectionParameters,
    ExchangeDeclare,
    QueueBind,
    QueueDeclare,
    QueueDelete,
    QueueUnbind,
)
from gateway.broker.base import MessageProperties
from tests.conftest import AMQP_URL, rabbitmq_running

UTF8 = "ünïcødé a!b(c)~d$e"

#: the gateway's command, pamqp's, and arguments naming a queue and/or an exchange
COMMANDS: list[tuple[type[Any], type[Any], dict[str, Any]]] = [
    (QueueDeclare, spec.Queue.Declare, {"queue": "q", "durable": True, "arguments": {"x-max-length": 5}}),
    (QueueBind, spec.Queue.Bind, {"queue": "q", "exchange": "x", "routing_key": "k"}),
    (QueueUnbind, spec.Queue.Unbind, {"queue": "q", "exchange": "x", "routing_key": "k"}),
    (QueueDelete, spec.Queue.Delete, {"queue": "q"}),
    (ExchangeDeclare, spec.Exchange.Declare, {"exchange": "x", "exchange_type": "topic", "passive": True}),
    (BasicConsume, spec.Basic.Consume, {"queue": "q", "consumer_tag": "t", "no_ack": True}),
    (BasicPublish, spec.Basic.Publish, {"exchange": "x", "routing_key": "k"}),
]


def test_importing_the_gateway_leaves_pamqps_name_check_as_it_was() -> None:
    with pytest.raises(ValueError, match="Invalid value for queue"):
        spec.Queue.Declare(queue=UTF8)
    with pytest.raises(ValueError, match="Invalid value for exchange"):
        spec.Basic.Publish(exchange=UTF8)


@pytest.mark.parametrize(("ours", "theirs", "arguments"), COMMANDS, ids=[c[1].name for c in COMMANDS])
class TestCommandSubclasses:
    def test_a_grammar_name_marshals_to_pamqps_own_bytes(self, ours: type, theirs: type, arguments: dict[str, Any]) -> None:
        assert pamqp.frame.marshal(ours(**arguments), 3) == pamqp.frame.marshal(theirs(**arguments), 3)

    def test_any_utf8_name_round_trips(self, ours: type, theirs: type, arguments: dict[str, Any]) -> None:
        names = {key: UTF8 for key in ("queue", "exchange") if key in arguments}
        data = pamqp.frame.marshal(ours(**{**arguments, **names}), 3)
        size, channel, frame = pamqp.frame.unmarshal(data)
        assert (size, channel, type(frame)) == (len(data), 3, theirs)
        assert {key: getattr(frame, key) for key in names} == names

    def test_pamqps_length_limits_still_hold(self, ours: type, theirs: type, arguments: dict[str, Any]) -> None:
        for key, limit in (("queue", 256), ("exchange", 127)):
            if key in arguments:
                with pytest.raises(ValueError, match=f"Max length exceeded for {key}"):
                    ours(**{**arguments, key: "n" * (limit + 1)})


def test_the_frame_codec_the_connection_reads_and_writes() -> None:
    assert ProtocolHeader().marshal() == b"AMQP\x00\x00\x09\x01"
    assert pamqp.frame.marshal(Heartbeat(), 0) == b"\x08\x00\x00\x00\x00\x00\x00\xce"
    for frame in (
        spec.Basic.Deliver(consumer_tag="t", delivery_tag=1, exchange="x", routing_key="k"),
        ContentHeader(body_size=3, properties=spec.Basic.Properties(content_type="text/plain", headers={"h": "v"})),
        ContentBody(b"abc"),
        Heartbeat(),
    ):
        data = pamqp.frame.marshal(frame, 5 if not isinstance(frame, Heartbeat) else 0)
        assert int.from_bytes(data[3:7], "big") == len(data) - 8 and data[-1] == 0xCE  # the framing it parses
        size, _, back = pamqp.frame.unmarshal(data)
        assert size == len(data) and type(back) is type(frame)
    assert pamqp.frame.unmarshal(pamqp.frame.marshal(ContentBody(b"abc"), 5))[2].value == b"abc"


@pytest.mark.skipif(not rabbitmq_running(), reason="RabbitMQ is not running on 127.0.0.1:5672")
async def test_a_round_trip_through_rabbitmq() -> None:
    connection = await AmqpConnection.connect(ConnectionParameters.from_url(AMQP_URL, heartbeat=15), timeout=10)
    try:
        assert connection.frame_max > 0 and connection.channel_max > 0
        number = connection.gate.take(connection.channels)
        assert number == 1
        channel = await connection.open_channel(number)
        assert connection.channels[number] is channel
        ok = await channel.rpc(QueueDeclare(queue=f"contract-{UTF8}", exclusive=True, auto_delete=True))
        assert ok.queue == f"contract-{UTF8}"
        got: asyncio.Future[tuple[Any, Any, bytes]] = asyncio.get_running_loop().create_future()
        channel.add_consumer("c", lambda deliver, props, body: got.set_result((deliver, props, body)))
        await channel.rpc(BasicConsume(queue=ok.queue, consumer_tag="c", no_ack=True))
        await channel.select_confirms()
        sent = MessageProperties(
            content_type="text/plain",
            headers={"h": "v", UTF8: UTF8, "n": 7, "flag": True, "nested": {"a": "b"}},
            delivery_mode=2,
            priority=3,
            correlation_id="c-1",
            reply_to="r",
            expiration="60000",
            message_id="m-1",
            timestamp=1_767_225_600,
            type="t",
            user_id="guest",
            app_id="contract",
        )
        body = bytes(range(256)) * (connection.frame_max // 256 + 1)  # two body frames
        confirmed = channel.publish(
            encode_publish(number, "", ok.queue, sent, body, channel.max_content, connection.frame_max - 8)
        )
        assert confirmed is not None and await asyncio.wait_for(confirmed, 5) is True
        deliver, props, received = await asyncio.wait_for(got, 5)
        assert (deliver.consumer_tag, deliver.exchange, deliver.routing_key, deliver.redelivered) == ("c", "", ok.queue, False)
        assert received == body and props == sent
        await asyncio.wait_for(channel.close(), 5)
        assert channel.closed and number not in connection.channels
        assert connection.gate.take(connection.channels) == 2  # round-robin, never the number just closed
    finally:
        await asyncio.wait_for(connection.close(), 5)
    assert not connection.is_open
