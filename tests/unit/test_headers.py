"""gateway.headers against rabbitmq-stomp.md (c.1) SEND → AMQP and (c.3) AMQP delivery → MESSAGE."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.broker.base import MessageProperties
from gateway.headers import header_text, message_headers, properties_from_send
from gateway.stomp.frames import ProtocolError

# -- c.1 SEND → basic.publish properties -------------------------------------------------------------------

# (SEND header, value, MessageProperties attribute, expected value)
SEND_PROPERTIES = [
    ("content-type", "application/json", "content_type", "application/json"),
    ("content-encoding", "gzip", "content_encoding", "gzip"),
    ("persistent", "true", "delivery_mode", 2),
    ("persistent", "True", "delivery_mode", 2),
    ("persistent", "false", "delivery_mode", None),  # any other value: transient
    ("persistent", "yes", "delivery_mode", None),
    ("priority", "5", "priority", 5),
    ("priority", " +7 ", "priority", 7),
    ("correlation-id", "c-1", "correlation_id", "c-1"),
    ("reply-to", "/queue/replies", "reply_to", "/queue/replies"),  # verbatim
    ("reply-to", "/temp-queue/r1", "reply_to", "/temp-queue/r1"),  # the session rewrites temp queues
    ("expiration", "60000", "expiration", "60000"),
    ("amqp-message-id", "m-1", "message_id", "m-1"),
    ("timestamp", "1700000000", "timestamp", 1700000000),
    ("type", "order.created", "type", "order.created"),
    ("user-id", "guest", "user_id", "guest"),
    ("app-id", "shop", "app_id", "shop"),
]


@pytest.mark.parametrize(("header", "value", "attribute", "expected"), SEND_PROPERTIES)
def test_c1_property_headers(header: str, value: str, attribute: str, expected: object) -> None:
    props = properties_from_send([("destination", "/queue/q"), (header, value)])
    assert getattr(props, attribute) == expected
    assert header not in props.headers  # a property header never also lands in the headers table


def test_c1_every_other_header_goes_to_the_headers_table_as_a_string() -> None:
    props = properties_from_send(
        [
            ("destination", "/queue/q"),
            ("x-delay", "5000"),
            ("durable", "true"),
            ("x-stream-filter-value", "red"),
            ("id", "0"),
            ("custom", "a:b\nc"),
        ]
    )
    assert props.headers == {
        "x-delay": "5000",
        "durable": "true",
        "x-stream-filter-value": "red",
        "id": "0",
        "custom": "a:b\nc",
    }


@pytest.mark.parametrize("header", ["destination", "receipt", "transaction", "content-length"])
def test_c1_gateway_control_headers_do_not_leak(header: str) -> None:
    props = properties_from_send([(header, "x"), ("destination", "/queue/q")])
    assert props.headers == {}


def test_c1_first_occurrence_wins() -> None:
    props = properties_from_send(
        [
            ("content-type", "text/plain"),
            ("content-type", "application/json"),
            ("x", "1"),
            ("x", "2"),
            ("priority", "1"),
            ("priority", "not-an-integer"),
        ]
    )
    assert props.content_type == "text/plain"
    assert props.headers == {"x": "1"}
    assert props.priority == 1


def test_c1_reply_to_override() -> None:
    props = properties_from_send([("reply-to", "/temp-queue/r1")], reply_to="amq.gen-Xyz")
    assert props.reply_to == "amq.gen-Xyz"
    assert properties_from_send([], reply_to="q").reply_to == "q"


def test_c1_nothing_set() -> None:
    assert properties_from_send([("destination", "/queue/q")]) == MessageProperties()


def test_g_message_id_on_send() -> None:
    with pytest.raises(ProtocolError) as info:
        properties_from_send([("destination", "/queue/q"), ("message-id", "1")])
    assert (info.value.message, info.value.detail) == (
        "Invalid header",
        "'message-id' is not allowed on 'SEND'.\n",
    )


def test_c1_custom_header_names_up_to_the_amqp_field_name_limit() -> None:
    # AMQP field-table names are at most 128 bytes: longer ones are refused, never cut short.
    assert properties_from_send([("n" * 128, "v")]).headers == {"n" * 128: "v"}
    assert properties_from_send([("é" * 64, "v")]).headers == {"é" * 64: "v"}  # 128 bytes of UTF-8
    for name in ("n" * 129, "é" * 65):
        with pytest.raises(ProtocolError) as info:
            properties_from_send([(name, "v")])
        assert info.value.message == "Invalid header"
        assert "128 bytes" in info.value.detail


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("priority", "high"),
        ("priority", "1.5"),
        ("priority", ""),
        ("priority", "256"),
        ("priority", "-1"),
        ("timestamp", "yesterday"),
        ("timestamp", "-5"),
        ("timestamp", "1e9"),
    ],
)
def test_c1_malformed_integer_is_invalid_header(header: str, value: str) -> None:
    with pytest.raises(ProtocolError) as info:
        properties_from_send([(header, value)])
    assert info.value.message == "Invalid header"
    assert f"'{header}'" in info.value.detail
    assert f"'{value}'" in info.value.detail


# -- c.3 AMQP delivery → MESSAGE ---------------------------------------------------------------------------

# (MessageProperties keyword, value, expected MESSAGE headers)
PROPERTY_HEADERS: list[tuple[str, Any, list[tuple[str, str]]]] = [
    ("content_type", "application/json", [("content-type", "application/json")]),
    ("content_encoding", "gzip", [("content-encoding", "gzip")]),
    ("delivery_mode", 2, [("persistent", "true")]),
    ("delivery_mode", 1, []),  # mode 1 gives no header
    ("priority", 3, [("priority", "3")]),
    ("correlation_id", "cid", [("correlation-id", "cid")]),
    ("expiration", "60000", [("expiration", "60000")]),
    ("message_id", "mid", [("amqp-message-id", "mid")]),
    ("timestamp", 1234, [("timestamp", "1234")]),
    ("type", "ty", [("type", "ty")]),
    ("user_id", "uid", [("user-id", "uid")]),
    ("app_id", "aid", [("app-id", "aid")]),
]


@pytest.mark.parametrize(("keyword", "value", "expected"), PROPERTY_HEADERS)
def test_c3_property_headers(keyword: str, value: Any, expected: list[tuple[str, str]]) -> None:
    assert message_headers(MessageProperties(**{keyword: value})) == expected


# (AMQP reply_to, MESSAGE reply-to): RabbitMQ 3.10.8's headers_post_process.
REPLY_TO = [
    ("/exchange/x", "/exchange/x"),
    ("/exchangefoo", "/exchangefoo"),  # a plain prefix test, as in RabbitMQ
    ("/topic/x", "/topic/x"),
    ("/queue/q", "/queue/q"),
    ("/queuex", "/queuex"),
    ("/amq/queue/q", "/amq/queue/q"),
    ("/reply-queue/r", "/reply-queue/r"),
    ("/reply-queue", "/reply-queue//reply-queue"),
    ("/temp-queue/t", "/reply-queue//temp-queue/t"),
    ("amq.gen-Xyz", "/reply-queue/amq.gen-Xyz"),
    ("my-replies", "/reply-queue/my-replies"),
    ("", "/reply-queue/"),
]


@pytest.mark.parametrize(("reply_to", "expected"), REPLY_TO)
def test_c3_reply_to(reply_to: str, expected: str) -> None:
    assert message_headers(MessageProperties(reply_to=reply_to)) == [("reply-to", expected)]


def test_c3_order_properties_then_custom_headers() -> None:
    props = MessageProperties(
        content_type="ct",
        content_encoding="ce",
        headers={"s": "v", "i": 5},
        delivery_mode=2,
        priority=3,
        correlation_id="cid",
        reply_to="rt",
        expiration="60000",
        message_id="mid",
        timestamp=1234,
        type="ty",
        user_id="uid",
        app_id="aid",
    )
    assert message_headers(props) == [
        ("content-type", "ct"),
        ("content-encoding", "ce"),
        ("persistent", "true"),
        ("priority", "3"),
        ("correlation-id", "cid"),
        ("reply-to", "/reply-queue/rt"),
        ("expiration", "60000"),
        ("amqp-message-id", "mid"),
        ("timestamp", "1234"),
        ("type", "ty"),
        ("user-id", "uid"),
        ("app-id", "aid"),
        ("s", "v"),
        ("i", "5"),
    ]


def test_c3_nothing_set() -> None:
    assert message_headers(MessageProperties()) == []


UTC = datetime.UTC
X_DEATH = [
    {
        "count": 1,
        "reason": "expired",
        "queue": "work",
        "time": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "exchange": "",
        "routing-keys": ["work"],
        "original-expiration": b"1000",
    }
]

# (AMQP header value, MESSAGE header text): every type reaches the client
# (RabbitMQ: strings and integers only).
TYPED_VALUES: list[tuple[Any, str]] = [
    ("text", "text"),
    ("", ""),
    (True, "true"),
    (False, "false"),
    (0, "0"),
    (-42, "-42"),
    (2**63 - 1, "9223372036854775807"),
    (1.5, "1.5"),
    (-0.25, "-0.25"),
    (float("nan"), "NaN"),
    (float("inf"), "Infinity"),
    (float("-inf"), "-Infinity"),
    (Decimal("1.23"), "1.23"),
    (Decimal("1E+3"), "1000"),
    (Decimal("-0.000"), "-0.000"),
    (datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "1704164645"),
    (datetime.datetime(2024, 1, 2, 3, 4, 5), "1704164645"),  # naive = UTC
    (
        datetime.datetime(2024, 1, 2, 4, 4, 5, 999, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
        "1704164645",
    ),
    (b"bytes", "bytes"),
    ("é".encode(), "é"),
    (b"\xff\x00", "/wA="),  # not UTF-8: base64
    (bytearray(b"ba"), "ba"),
    (None, ""),
    ([], "[]"),
    ({}, "{}"),
    (["a", 1, True, None], '["a",1,true,null]'),
    ({"k": {"n": [1.5, float("nan")]}}, '{"k":{"n":[1.5,"NaN"]}}'),
    ([b"\xff", Decimal("2.50")], '["/w==","2.50"]'),
    (
        X_DEATH,
        '[{"count":1,"reason":"expired","queue":"work","time":1704164645,"exchange":"",'
        '"routing-keys":["work"],"original-expiration":"1000"}]',
    ),
    ({"é": "ü"}, '{"é":"ü"}'),
    ({1: "x"}, '{"1":"x"}'),
]


@pytest.mark.parametrize(("value", "text"), TYPED_VALUES)
def test_c3_typed_header_values(value: Any, text: str) -> None:
    assert header_text(value) == text
    assert message_headers(MessageProperties(headers={"h": value})) == [("h", text)]


@pytest.mark.parametrize(
    "name", ["subscription", "message-id", "destination", "redelivered", "ack", "content-length"]
)
def test_c3_custom_headers_never_shadow_delivery_headers(name: str) -> None:
    assert message_headers(MessageProperties(headers={name: "x", "ok": "y"})) == [("ok", "y")]


def test_c3_custom_headers_never_duplicate_emitted_properties() -> None:
    props = MessageProperties(content_type="text/plain", headers={"content-type": "evil", "priority": 9})
    # content-type was emitted as a property: skipped. priority was not: the custom entry shows.
    assert message_headers(props) == [("content-type", "text/plain"), ("priority", "9")]


def test_c3_empty_header_name_is_skipped() -> None:
    assert message_headers(MessageProperties(headers={"": "x"})) == []


def test_c3_extreme_datetimes() -> None:
    plus14 = datetime.timezone(datetime.timedelta(hours=14))
    assert header_text(datetime.datetime.min.replace(tzinfo=plus14)) == "-62135647200"
    assert header_text(datetime.datetime.max) == "253402300799"
    assert header_text(datetime.datetime(1969, 12, 31, 23, 59, 59, 500000)) == "-1"  # floor


def test_c3_nesting_is_bounded() -> None:
    value: Any = "leaf"
    for _ in range(5000):
        value = [value]
    text = header_text(value)
    assert text.startswith("[[[") and text.endswith("null" + "]" * 64)


def test_c3_round_trip_of_a_send() -> None:
    props = properties_from_send(
        [
            ("destination", "/queue/q"),
            ("content-type", "text/plain"),
            ("persistent", "true"),
            ("receipt", "r1"),
            ("reply-to", "amq.gen-1"),
            ("x-trace", "abc"),
        ]
    )
    assert message_headers(props) == [
        ("content-type", "text/plain"),
        ("persistent", "true"),
        ("reply-to", "/reply-queue/amq.gen-1"),
        ("x-trace", "abc"),
    ]


# -- hypothesis: never raises, always text -----------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.decimals()
    | st.text()
    | st.binary(max_size=20)
    | st.datetimes(timezones=st.none() | st.timezones())
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), VALUES, max_size=6))
def test_message_headers_never_raises_and_emits_text(table: dict[str, Any]) -> None:
    headers = message_headers(MessageProperties(headers=table, content_type="ct"))
    assert all(type(name) is str and type(value) is str for name, value in headers)
    names = [name for name, _ in headers]
    assert len(names) == len(set(names))
    assert "" not in names
    for name, value in headers:
        if name != "content-type" and isinstance(table[name], list | dict):
            json.loads(value)  # nested values are valid JSON
