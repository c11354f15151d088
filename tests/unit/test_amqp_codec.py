"""The hand-written AMQP frames of the data path (gateway.broker.amqp_codec) against pamqp, byte for byte and
value for value: what the gateway writes is what pamqp would have written, what it reads is what pamqp reads."""

from __future__ import annotations

import datetime
import decimal
import string
import struct

import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from gateway.broker.amqp_codec import (
    HeaderTooLarge,
    decode_content_header,
    decode_deliver,
    encode_publish,
    properties_from_pamqp,
)
from gateway.broker.base import MessageProperties

MAX = 131072 - 8


def pamqp_properties(props: MessageProperties) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=props.headers or None,
        delivery_mode=props.delivery_mode,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration,
        message_id=props.message_id,
        timestamp=(
            datetime.datetime.fromtimestamp(props.timestamp, tz=datetime.UTC) if props.timestamp is not None else None
        ),
        message_type=props.type,
        user_id=props.user_id,
        app_id=props.app_id,
    )


def pamqp_publish(channel: int, exchange: str, routing_key: str, props: MessageProperties, body: bytes, size: int) -> bytes:
    frames = [
        pamqp.frame.marshal(spec.Basic.Publish(exchange=exchange, routing_key=routing_key), channel),
        pamqp.frame.marshal(ContentHeader(properties=pamqp_properties(props), body_size=len(body)), channel),
    ]
    frames += [pamqp.frame.marshal(ContentBody(body[i : i + size]), channel) for i in range(0, len(body), size)]
    return b"".join(frames)


def frames_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, channel, payload) of each frame."""
    out = []
    while data:
        size = int.from_bytes(data[3:7], "big")
        assert data[7 + size] == 0xCE
        out.append((data[0], int.from_bytes(data[1:3], "big"), data[7 : 7 + size]))
        data = data[8 + size :]
    return out


names = st.text(alphabet=string.ascii_letters + string.digits + "-_.:", max_size=40)
short = st.text(max_size=60)  # UTF-8 up to 240 octets: always an AMQP short string
maybe_short = st.one_of(st.none(), st.text(min_size=1, max_size=60))  # an empty one is left out
string_headers = st.dictionaries(st.text(min_size=1, max_size=30), st.text(max_size=200), max_size=8)
properties = st.builds(
    MessageProperties,
    content_type=maybe_short,
    content_encoding=maybe_short,
    headers=string_headers,
    delivery_mode=st.one_of(st.none(), st.sampled_from([1, 2])),
    priority=st.one_of(st.none(), st.integers(0, 255)),
    correlation_id=maybe_short,
    reply_to=maybe_short,
    expiration=maybe_short,
    message_id=maybe_short,
    timestamp=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    type=maybe_short,
    user_id=maybe_short,
    app_id=maybe_short,
)


@settings(max_examples=300, deadline=None)
@given(
    channel=st.integers(1, 2047),
    exchange=names,
    routing_key=short,
    props=properties,
    body=st.binary(max_size=300),
    size=st.sampled_from([1, 7, 100, MAX]),
)
def test_publish_is_what_pamqp_writes(
    channel: int, exchange: str, routing_key: str, props: MessageProperties, body: bytes, size: int
) -> None:
    ours = encode_publish(channel, exchange, routing_key, props, body, size, MAX)
    assert ours == pamqp_publish(channel, exchange, routing_key, props, body, size)


@settings(max_examples=300, deadline=None)
@given(props=properties, body_size=st.integers(0, 2**40))
def test_content_header_reads_as_pamqp_reads_it(props: MessageProperties, body_size: int) -> None:
    wire = pamqp.frame.marshal(ContentHeader(properties=pamqp_properties(props), body_size=body_size), 5)
    (_, _, payload), = frames_of(wire)
    size, ours = decode_content_header(payload)
    _, _, theirs = pamqp.frame.unmarshal(wire)
    assert size == body_size == theirs.body_size
    assert ours == properties_from_pamqp(theirs.properties)
    assert ours == props  # and the round trip is exact


@settings(max_examples=200, deadline=None)
@given(tag=short, delivery_tag=st.integers(0, 2**63 - 1), redelivered=st.booleans(), exchange=names, routing_key=short)
def test_deliver_reads_as_pamqp_reads_it(tag: str, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str) -> None:
    method = spec.Basic.Deliver(
        consumer_tag=tag, delivery_tag=delivery_tag, redelivered=redelivered, exchange=exchange, routing_key=routing_key
    )
    wire = pamqp.frame.marshal(method, 3)
    (_, _, payload), = frames_of(wire)
    ours = decode_deliver(payload)
    _, _, theirs = pamqp.frame.unmarshal(wire)
    assert (theirs.consumer_tag, theirs.delivery_tag, theirs.exchange) == (tag, delivery_tag, exchange)
    assert (ours.consumer_tag, ours.delivery_tag, ours.redelivered, ours.exchange, ours.routing_key) == (
        tag,
        delivery_tag,
        redelivered,
        exchange,
        routing_key,
    )


def test_headers_of_other_types_go_through_pamqp_both_ways() -> None:
    headers = {
        "b": True,
        "i": 7,
        "big": 2**40,
        "f": 1.5,
        "d": decimal.Decimal("1.25"),
        "t": datetime.datetime(2026, 12, 4, tzinfo=datetime.UTC),
        "nested": {"x": "y"},
        "list": [1, "two"],
        "s": "text",
    }
    props = MessageProperties(headers=headers)
    ours = encode_publish(1, "", "q", props, b"", MAX, MAX)
    assert ours == pamqp_publish(1, "", "q", props, b"", MAX)
    (_, _, header), = [f for f in frames_of(ours) if f[0] == 2]
    _, back = decode_content_header(header)
    _, _, theirs = pamqp.frame.unmarshal(pamqp.frame.marshal(ContentHeader(properties=pamqp_properties(props)), 1))
    assert back.headers == properties_from_pamqp(theirs.properties).headers
    assert back.headers["s"] == "text" and back.headers["nested"] == {"x": "y"}


def test_a_long_string_that_is_not_utf8_reads_as_bytes_as_with_pamqp() -> None:
    table = b"\x01kS\x00\x00\x00\x02\xff\xfe"
    payload = b"\x00\x3c\x00\x00" + (0).to_bytes(8, "big") + (1 << 13).to_bytes(2, "big") + len(table).to_bytes(4, "big") + table
    _, props = decode_content_header(payload)
    assert props.headers == {"k": b"\xff\xfe"}
    _, _, theirs = pamqp.frame.unmarshal(b"\x02\x00\x01" + len(payload).to_bytes(4, "big") + payload + b"\xce")
    assert properties_from_pamqp(theirs.properties).headers == props.headers


def test_a_millisecond_timestamp_reads_as_pamqp_reads_it() -> None:
    props = MessageProperties()
    wire = pamqp.frame.marshal(ContentHeader(properties=spec.Basic.Properties(timestamp=datetime.datetime(2026, 1, 1))), 1)
    (_, _, payload), = frames_of(wire)
    millis = payload[:-8] + (1_767_225_600_123).to_bytes(8, "big")
    _, props = decode_content_header(millis)
    _, _, theirs = pamqp.frame.unmarshal(b"\x02\x00\x01" + len(millis).to_bytes(4, "big") + millis + b"\xce")
    assert props.timestamp == properties_from_pamqp(theirs.properties).timestamp == 1_767_225_600


@pytest.mark.parametrize(
    ("props", "error"),
    [
        (MessageProperties(delivery_mode=3), ValueError),
        (MessageProperties(priority=256), ValueError),
        (MessageProperties(priority=-1), ValueError),
        (MessageProperties(timestamp=-1), ValueError),
        (MessageProperties(timestamp=2**64), ValueError),
        (MessageProperties(timestamp=253_402_300_800), ValueError),  # the year 10000: as before, refused
        (MessageProperties(content_type="x" * 256), ValueError),
        (MessageProperties(message_id="é" * 128), ValueError),  # 256 octets of UTF-8
        (MessageProperties(headers={"k": object()}), TypeError),
    ],
)
def test_values_amqp_cannot_carry_are_refused(props: MessageProperties, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_publish(1, "", "q", props, b"x", MAX, MAX)


def test_a_header_over_the_frame_size_is_refused_with_its_size() -> None:
    props = MessageProperties(headers={"k": "v" * 200})
    with pytest.raises(HeaderTooLarge) as caught:
        encode_publish(1, "", "q", props, b"x", MAX, 100)
    assert caught.value.args[0] == len(frames_of(encode_publish(1, "", "q", props, b"x", MAX, MAX))[1][2])


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x3c\x00\x3c\x05ab",  # consumer tag cut short
        b"\x00\x3c\x00\x3c\x00" + bytes(9) + b"\x00",  # routing key missing
        b"\x00\x3c\x00\x3c\x00" + bytes(9) + b"\x00\x00\x00",  # an octet too many
        b"\x00\x3c\x00\x3c\x02\xff\xfe" + bytes(9) + b"\x00\x00",  # a tag that is not UTF-8
    ],
)
def test_a_deliver_it_cannot_read_raises(payload: bytes) -> None:
    with pytest.raises((ValueError, IndexError, struct.error)):
        decode_deliver(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x3c\x00\x00" + bytes(8) + b"\x80\x00\x05ab",  # content type cut short
        b"\x00\x3c\x00\x00" + bytes(8) + b"\x00\x01",  # a second flags word
        b"\x00\x3d\x00\x00" + bytes(8) + b"\x00\x00",  # not class basic
        b"\x00\x3c\x00\x00" + bytes(8) + b"\x00\x00\x00",  # an octet too many
        b"\x00\x3c\x00\x00" + bytes(8) + b"\x20\x00\x00\x00\x00\x09\x01kS\x00\x00\x00\x09",  # table cut short
    ],
)
def test_a_content_header_it_cannot_read_raises(payload: bytes) -> None:
    with pytest.raises((ValueError, IndexError, struct.error)):
        decode_content_header(payload)



@pytest.mark.parametrize("stamp", [253_402_300_800_000, 2**63, 2**64 - 1])
def test_a_timestamp_past_the_year_9999_from_another_publisher_does_not_stop_the_reader(stamp: int) -> None:
    """pamqp cannot read these (its datetime overflows); the gateway reads them as milliseconds, never raising,
    so one such message cannot end a shared AMQP connection."""
    payload = b"\x00\x3c\x00\x00" + bytes(8) + (1 << 6).to_bytes(2, "big") + stamp.to_bytes(8, "big")
    _, props = decode_content_header(payload)
    assert props.timestamp == stamp // 1000
    with pytest.raises(Exception):  # noqa: B017 - whatever pamqp raises: the reason for the fallback
        pamqp.frame.unmarshal(b"\x02\x00\x01" + len(payload).to_bytes(4, "big") + payload + b"\xce")
