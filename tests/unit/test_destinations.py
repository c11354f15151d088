"""gateway.destinations against rabbitmq-stomp.md (b), (c.1), (c.2) and (g).

Expected values marked "RabbitMQ 3.10.8" were read off the broker's own code on this machine
(``rabbit_routing_util:parse_endpoint/1``, ``rabbit_stomp_util:subscription_queue_name/3`` and
``rabbit_stomp_util:headers/5``, run in ``erl``).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.destinations import (
    Destination,
    QueueDeclaration,
    SubscriptionPlan,
    check_send_destination,
    durable_subscription_queue_name,
    durable_unsubscribe_queue,
    format_destination,
    parse_bool,
    parse_destination,
    queue_arguments,
    queue_declaration,
    routing_pair,
    send_declaration,
    subscription_plan,
)
from gateway.stomp.frames import ProtocolError

UNKNOWN_TAIL = (
    "Valid destination types are: /temp-queue, /exchange, /topic, /queue, /amq/queue, /reply-queue/.\n"
)


def error_of(call: object, *args: object) -> tuple[str, str]:
    assert callable(call)
    with pytest.raises(ProtocolError) as info:
        call(*args)
    return info.value.message, info.value.detail


# -- b.1 Parsing the destination header --------------------------------------------------------------------

# (raw, kind, name, pattern): every accepted row of b.1, as RabbitMQ 3.10.8 parses it.
PARSED = [
    ("/exchange/x", "exchange", "x", None),
    ("/exchange/x/k", "exchange", "x", "k"),
    ("/exchange/x/", "exchange", "x", ""),
    ("/exchange/a%2Fb/c%2Fd", "exchange", "a/b", "c/d"),
    ("/exchange/x/a%2Fb", "exchange", "x", "a/b"),
    ("/exchange/ticks/NASDAQ.AAPL", "exchange", "ticks", "NASDAQ.AAPL"),
    ("/queue/a", "queue", "a", None),
    ("/queue/a%2Fb", "queue", "a/b", None),
    ("/queue/%2F", "queue", "/", None),
    ("/queue/a%2F%2Fb", "queue", "a//b", None),
    ("/queue/a%2fb", "queue", "a%2fb", None),  # only upper-case %2F is decoded
    ("/queue/%252F", "queue", "%252F", None),  # nothing else is decoded
    ("/queue/caf%C3%A9", "queue", "caf%C3%A9", None),
    ("/amq/queue/q", "amqqueue", "q", None),
    ("/topic/a.b", "topic", "a.b", None),
    ("/topic/a%2Fb", "topic", "a/b", None),
    ("/topic/*.#", "topic", "*.#", None),
    ("/topic/stocks.*.AAPL", "topic", "stocks.*.AAPL", None),
    ("/temp-queue/x", "temp_queue", "x", None),
    ("/reply-queue/a", "reply_queue", "a", None),
    ("/reply-queue/amq.gen-Xyz", "reply_queue", "amq.gen-Xyz", None),
    ("/reply-queue/a/b", "reply_queue", "a/b", None),  # the rest is verbatim, slashes included
    ("/reply-queue/a%2Fb", "reply_queue", "a%2Fb", None),  # ... and not unescaped (RabbitMQ: "a/b")
    ("/reply-queue//", "reply_queue", "/", None),
    ("foo", "queue", "foo", None),  # no "/" at all: same as /queue/foo
    ("foo%2Fbar", "queue", "foo/bar", None),
    ("a%2fb", "queue", "a%2fb", None),
]


@pytest.mark.parametrize(("raw", "kind", "name", "pattern"), PARSED)
def test_b1_accepted(raw: str, kind: str, name: str, pattern: str | None) -> None:
    assert parse_destination(raw) == Destination(kind, name, pattern, raw)


def invalid(content: str, kind: str) -> tuple[str, str]:
    return "Invalid destination", f"'{content}' is not a valid {kind} destination\n"


def unknown(raw: str) -> tuple[str, str]:
    return "Unknown destination", f"'{raw}' is not a valid destination.\n{UNKNOWN_TAIL}"


# (raw, (message, body)): every refused row of b.1 with RabbitMQ's ERROR texts (g).
REFUSED = [
    ("", ("Invalid destination", "Destination cannot be blank")),
    ("/exchange", invalid("", "exchange")),
    ("/exchange/", invalid("/", "exchange")),
    ("/exchange//k", invalid("//k", "exchange")),
    ("/exchange/a/b/c", invalid("/a/b/c", "exchange")),
    ("/exchange/x//", invalid("/x//", "exchange")),
    ("/queue", invalid("", "queue")),
    ("/queue/", invalid("/", "queue")),
    ("/queue//", invalid("//", "queue")),
    ("/queue/a/b", invalid("/a/b", "queue")),
    ("/amq/queue", invalid("", "amqqueue")),
    ("/amq/queue/", invalid("/", "amqqueue")),
    ("/amq/queue/a/b", invalid("/a/b", "amqqueue")),
    ("/topic", invalid("", "topic")),
    ("/topic/", invalid("/", "topic")),
    ("/topic/a/b", invalid("/a/b", "topic")),
    ("/temp-queue", invalid("", "temp_queue")),
    ("/temp-queue/", invalid("/", "temp_queue")),
    ("/temp-queue/x/y", invalid("/x/y", "temp_queue")),
    ("/reply-queue/", invalid("/", "reply_queue")),
    ("/reply-queue", unknown("/reply-queue")),
    ("/bogus/x", unknown("/bogus/x")),
    ("/", unknown("/")),
    ("//", unknown("//")),
    ("foo/bar", unknown("foo/bar")),
    ("queue/x", unknown("queue/x")),
    ("/Queue/x", unknown("/Queue/x")),
    ("/amq", unknown("/amq")),
    ("/amq/", unknown("/amq/")),
    ("/amq/topic/x", unknown("/amq/topic/x")),
]


@pytest.mark.parametrize(("raw", "expected"), REFUSED)
def test_b1_refused(raw: str, expected: tuple[str, str]) -> None:
    assert error_of(parse_destination, raw) == expected


def test_g_unknown_destination_wording() -> None:
    assert error_of(parse_destination, "/bogus/x") == (
        "Unknown destination",
        "'/bogus/x' is not a valid destination.\n"
        "Valid destination types are: /temp-queue, /exchange, /topic, /queue, /amq/queue, /reply-queue/.\n",
    )


def test_g_queue_slash_wording() -> None:
    assert error_of(parse_destination, "/queue/") == (
        "Invalid destination",
        "'/' is not a valid queue destination\n",
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("/%2F2fabqueuexchangtopicmr-. \x00é")), max_size=30) | st.text())
def test_b1_never_raises_anything_but_protocol_error(raw: str) -> None:
    try:
        dest = parse_destination(raw)
    except ProtocolError as error:
        assert error.message in {"Invalid destination", "Unknown destination"}
        assert isinstance(error.detail, str)
    else:
        assert dest.raw == raw
        assert dest.kind in {"exchange", "topic", "queue", "amqqueue", "temp_queue", "reply_queue"}


# -- b.1 Routing pair --------------------------------------------------------------------------------------

ROUTING = [
    ("/exchange/x", ("x", "")),
    ("/exchange/x/", ("x", "")),
    ("/exchange/x/k", ("x", "k")),
    ("/topic/a.b", ("amq.topic", "a.b")),
    ("/topic/a%2Fb", ("amq.topic", "a/b")),
    ("/queue/orders", ("", "orders")),
    ("/amq/queue/q", ("", "q")),
    ("/reply-queue/amq.gen-Xyz", ("", "amq.gen-Xyz")),
    ("foo", ("", "foo")),
]


@pytest.mark.parametrize(("raw", "pair"), ROUTING)
def test_b1_routing_pair(raw: str, pair: tuple[str, str]) -> None:
    assert routing_pair(parse_destination(raw)) == pair


def test_b2_note6_topic_exchange_override() -> None:
    assert routing_pair(parse_destination("/topic/k"), "events") == ("events", "k")
    assert routing_pair(parse_destination("/exchange/amq.topic/k"), "events") == ("amq.topic", "k")


def test_temp_queue_has_no_routing_pair() -> None:
    assert error_of(routing_pair, parse_destination("/temp-queue/x")) == (
        "Invalid destination",
        "'/temp-queue/x' is not a valid destination for 'SEND'\n",
    )


# -- b.2 SEND ----------------------------------------------------------------------------------------------


def test_g_send_to_temp_queue() -> None:
    assert error_of(check_send_destination, parse_destination("/temp-queue/x")) == (
        "Invalid destination",
        "'/temp-queue/x' is not a valid destination for 'SEND'\n",
    )


@pytest.mark.parametrize(
    "raw", ["/exchange/x/k", "/topic/k", "/queue/q", "/amq/queue/q", "/reply-queue/r", "q"]
)
def test_send_destinations_allowed(raw: str) -> None:
    check_send_destination(parse_destination(raw))


# (raw, headers, expected declaration or None)
SEND_DECLARES = [
    ("/queue/orders", {}, QueueDeclaration("orders", True, False, False, {})),
    ("/queue/orders", {"persistent": "true"}, QueueDeclaration("orders", True, False, False, {})),
    # persistent is the message's delivery mode on a SEND, not the queue's durability (differs from RabbitMQ)
    ("/queue/orders", {"persistent": "false"}, QueueDeclaration("orders", True, False, False, {})),
    ("/queue/orders", {"durable": "false"}, QueueDeclaration("orders", False, True, True, {})),
    (
        "/queue/orders",
        {"durable": "False", "exclusive": "false"},
        QueueDeclaration("orders", False, False, True, {}),
    ),
    ("/queue/orders", {"auto-delete": "true"}, QueueDeclaration("orders", True, False, True, {})),
    (
        "/queue/orders",
        {"x-max-length": "10", "x-queue-type": "quorum"},
        QueueDeclaration("orders", True, False, False, {"x-max-length": 10, "x-queue-type": "quorum"}),
    ),
    ("/exchange/x/k", {"durable": "true"}, None),
    ("/topic/k", {}, None),
    ("/amq/queue/q", {}, None),
    ("/reply-queue/r", {}, None),
]


@pytest.mark.parametrize(("raw", "headers", "expected"), SEND_DECLARES)
def test_b2_send_declaration(raw: str, headers: dict[str, str], expected: QueueDeclaration | None) -> None:
    assert send_declaration(parse_destination(raw), headers) == expected


# -- b.2 Queue-declare defaults ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("True", True),
        ("false", False),
        ("False", False),
        ("TRUE", None),
        ("yes", None),
        ("1", None),
        ("", None),
        (" true", None),
        (None, None),
    ],
)
def test_b2_header_booleans(value: str | None, expected: bool | None) -> None:
    assert parse_bool(value) is expected


# (headers, default_durable, expected (durable, exclusive, auto_delete))
DECLARE_DEFAULTS = [
    ({}, True, (True, False, False)),  # durable: only durable=true
    ({}, False, (False, True, True)),  # not durable: exclusive + auto-delete
    ({"durable": "true"}, False, (True, False, False)),
    ({"persistent": "true"}, False, (True, False, False)),  # alias
    ({"durable": "false"}, True, (False, True, True)),
    ({"persistent": "False"}, True, (False, True, True)),
    ({"durable": "maybe"}, True, (True, False, False)),  # not a boolean: not set
    ({"durable": "false", "exclusive": "false"}, True, (False, False, True)),  # then explicit headers
    ({"durable": "false", "auto-delete": "false"}, True, (False, True, False)),
    ({"exclusive": "true", "auto-delete": "true"}, True, (True, True, True)),
    ({"durable": "false", "x-queue-type": "quorum"}, True, (True, False, True)),  # finally quorum/stream
    ({"durable": "false", "x-queue-type": "stream"}, True, (True, False, True)),
    ({"exclusive": "true", "x-queue-type": " quorum "}, True, (True, False, False)),
    ({"durable": "false", "x-queue-type": "classic"}, True, (False, True, True)),
]


@pytest.mark.parametrize(("headers", "default_durable", "expected"), DECLARE_DEFAULTS)
def test_b2_queue_declare_defaults(
    headers: dict[str, str], default_durable: bool, expected: tuple[bool, bool, bool]
) -> None:
    declaration = queue_declaration(headers, name="q", default_durable=default_durable)
    assert (declaration.durable, declaration.exclusive, declaration.auto_delete) == expected
    assert declaration.name == "q"


# -- c.1 Queue-declare x-arguments -------------------------------------------------------------------------

ARGUMENTS = [
    ("x-dead-letter-exchange", " dlx ", "dlx"),
    ("x-dead-letter-routing-key", "dead", "dead"),
    ("x-queue-type", "quorum", "quorum"),
    ("x-max-age", "7D", "7D"),
    ("x-expires", "60000", 60000),
    ("x-message-ttl", " 1000 ", 1000),
    ("x-max-length", "+10", 10),
    ("x-max-length-bytes", "1048576", 1048576),
    ("x-max-priority", "10", 10),
    ("x-stream-max-segment-size-bytes", "500000000", 500000000),
    ("x-stream-filter-size-bytes", "32", 32),
    ("x-overflow", "reject-publish", "reject-publish"),  # extension
    ("x-delivery-limit", "5", 5),  # extension
    ("x-single-active-consumer", "true", True),  # extension
]


@pytest.mark.parametrize(("name", "value", "typed"), ARGUMENTS)
def test_c1_argument_types(name: str, value: str, typed: object) -> None:
    arguments = queue_arguments({name: value})
    assert arguments == {name: typed}
    assert type(arguments[name]) is type(typed)


def test_c1_other_headers_are_not_arguments() -> None:
    headers = {"x-queue-name": "n", "x-priority": "5", "durable": "true", "x-custom": "1", "id": "0"}
    assert queue_arguments(headers) == {}


def test_c1_arguments_keep_header_order() -> None:
    headers = {"x-max-length": "1", "x-queue-type": "quorum", "x-expires": "9"}
    assert list(queue_arguments(headers)) == ["x-max-length", "x-queue-type", "x-expires"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-max-length", "ten"),
        ("x-expires", "1.5"),
        ("x-message-ttl", ""),
        ("x-max-priority", "1_0"),
        ("x-max-length-bytes", "\uff19"),
        ("x-expires", str(2**63)),
        ("x-single-active-consumer", "yes"),
    ],
)
def test_c1_malformed_argument_is_invalid_header(name: str, value: str) -> None:
    message, detail = error_of(queue_arguments, {name: value})
    assert message == "Invalid header"
    assert f"'{name}'" in detail
    assert f"'{value}'" in detail
    assert detail.endswith("\n")


def test_c1_long_range() -> None:
    assert queue_arguments({"x-expires": str(2**63 - 1)}) == {"x-expires": 2**63 - 1}
    assert queue_arguments({"x-expires": str(-(2**63))}) == {"x-expires": -(2**63)}


# -- b.2 SUBSCRIBE -----------------------------------------------------------------------------------------

GENERATED = re.compile(r"stomp-subscription-[A-Za-z0-9_-]{22}")
# RabbitMQ 3.10.8: the durable queue name for (K="k", id="id")
NAME_K_ID = "stomp-subscription-nBOCvwVOieiKHq45KpsMvA"


def plan(raw: str, headers: dict[str, str] | None = None, sub_id: str | None = "0") -> SubscriptionPlan:
    return subscription_plan(parse_destination(raw), headers or {}, sub_id)


def test_b2_exchange_subscription_defaults() -> None:
    p = plan("/exchange/ticks/NASDAQ.AAPL", sub_id="sub-0")
    assert p.declaration is not None
    assert GENERATED.fullmatch(p.queue)
    assert p.declaration == QueueDeclaration(p.queue, False, True, True, {})  # exclusive, auto-delete
    assert (p.exchange, p.binding_key) == ("ticks", "NASDAQ.AAPL")
    assert (p.durable_subscription, p.shareable) == (False, True)


def test_b2_exchange_without_pattern_binds_with_empty_key() -> None:
    p = plan("/exchange/amq.fanout")
    assert (p.exchange, p.binding_key) == ("amq.fanout", "")


def test_b2_topic_subscription_non_durable() -> None:
    p = plan("/topic/stocks.*.AAPL")
    assert p.declaration is not None
    assert GENERATED.fullmatch(p.queue)
    assert p.declaration == QueueDeclaration(p.queue, False, True, True, {})  # 4.3: exclusive
    assert (p.exchange, p.binding_key) == ("amq.topic", "stocks.*.AAPL")
    assert (p.durable_subscription, p.shareable) == (False, True)


def test_b2_topic_subscription_with_configured_topic_exchange() -> None:
    p = subscription_plan(parse_destination("/topic/k"), {}, "0", "events")
    assert (p.exchange, p.binding_key) == ("events", "k")


@pytest.mark.parametrize("header", ["durable", "persistent"])
@pytest.mark.parametrize("value", ["true", "True"])
def test_b2_topic_subscription_durable(header: str, value: str) -> None:
    p = plan("/topic/k", {header: value}, sub_id="id")
    assert p.declaration == QueueDeclaration(NAME_K_ID, True, False, True, {})
    assert p.queue == NAME_K_ID
    assert (p.exchange, p.binding_key) == ("amq.topic", "k")
    assert (p.durable_subscription, p.shareable) == (True, False)


def test_b2_durable_topic_auto_delete_false() -> None:
    p = plan("/topic/k", {"durable": "true", "auto-delete": "false"}, sub_id="id")
    assert p.declaration == QueueDeclaration(NAME_K_ID, True, False, False, {})


def test_b2_durable_exchange_subscription_is_not_exclusive() -> None:
    p = plan("/exchange/x/k", {"durable": "true"}, sub_id="id")
    assert p.declaration == QueueDeclaration(NAME_K_ID, True, False, True, {})
    assert (p.durable_subscription, p.shareable) == (False, False)


@pytest.mark.parametrize("raw", ["/topic/k", "/exchange/x/k"])
@pytest.mark.parametrize("headers", [{"durable": "true"}, {"persistent": "True"}])
def test_g_durable_subscription_without_id(raw: str, headers: dict[str, str]) -> None:
    assert error_of(subscription_plan, parse_destination(raw), headers, None) == (
        "Missing Header",
        "Header 'id' is required for durable subscriptions",
    )


def test_b2_non_durable_without_id_is_fine() -> None:
    assert plan("/topic/k", sub_id=None).shareable


def test_c2_x_queue_name() -> None:
    p = plan("/topic/k", {"x-queue-name": "my-subscription"})
    assert p.queue == "my-subscription"
    assert p.declaration == QueueDeclaration("my-subscription", False, True, True, {})
    assert not p.shareable  # named: someone may look for it
    durable = plan("/exchange/x/k", {"x-queue-name": "mine", "durable": "true", "auto-delete": "false"})
    assert durable.declaration == QueueDeclaration("mine", True, False, False, {})


def test_c2_empty_x_queue_name_lets_the_broker_name_it() -> None:
    p = plan("/topic/k", {"x-queue-name": ""})
    assert p.queue == ""
    assert p.declaration is not None and p.declaration.name == ""


def test_b2_subscription_queue_arguments() -> None:
    p = plan("/topic/k", {"x-max-length": "100", "x-queue-type": "quorum"})
    assert p.declaration is not None
    assert p.declaration.arguments == {"x-max-length": 100, "x-queue-type": "quorum"}
    assert (p.declaration.durable, p.declaration.exclusive) == (True, False)  # quorum forces
    assert not p.shareable
    assert not p.durable_subscription  # a random name: nothing for UNSUBSCRIBE to delete


def test_b2_subscription_with_override_headers_is_still_shareable() -> None:
    assert plan("/topic/k", {"exclusive": "false", "prefetch-count": "5", "x-priority": "3"}).shareable


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, QueueDeclaration("orders", True, False, False, {})),
        ({"durable": "false"}, QueueDeclaration("orders", False, True, True, {})),
        ({"persistent": "false"}, QueueDeclaration("orders", False, True, True, {})),
        ({"durable": "true"}, QueueDeclaration("orders", True, False, False, {})),
        ({"exclusive": "true"}, QueueDeclaration("orders", True, True, False, {})),
        ({"x-message-ttl": "5"}, QueueDeclaration("orders", True, False, False, {"x-message-ttl": 5})),
    ],
)
def test_b2_queue_subscription(headers: dict[str, str], expected: QueueDeclaration) -> None:
    p = plan("/queue/orders", headers)
    assert p == SubscriptionPlan(expected, "orders", None, "", False, False)


def test_b2_queue_subscription_durable_without_id_is_fine() -> None:
    assert plan("/queue/orders", {"durable": "true"}, sub_id=None).queue == "orders"


@pytest.mark.parametrize(
    ("raw", "queue"), [("/amq/queue/q", "q"), ("/reply-queue/amq.gen-Xyz", "amq.gen-Xyz")]
)
def test_b2_consume_without_declare(raw: str, queue: str) -> None:
    assert plan(raw, {"durable": "false", "x-max-length": "1"}) == SubscriptionPlan(
        None, queue, None, "", False, False
    )


def test_b2_subscribe_to_temp_queue() -> None:
    assert error_of(subscription_plan, parse_destination("/temp-queue/x"), {}, "0") == (
        "Invalid destination",
        "'/temp-queue/x' is not a valid destination for 'SUBSCRIBE'\n",
    )


def test_b2_malformed_argument_on_subscribe() -> None:
    assert error_of(subscription_plan, parse_destination("/topic/k"), {"x-expires": "soon"}, "0")[0] == (
        "Invalid header"
    )


# -- b.2 note 1: generated queue names ---------------------------------------------------------------------

# (key, id, name): RabbitMQ 3.10.8's rabbit_stomp_util:subscription_queue_name/3.
RABBITMQ_NAMES = [
    ("k", "id", NAME_K_ID),
    ("", "id", "stomp-subscription-V409TEtwzmGp7KXHMDqgew"),
    ("", "", "stomp-subscription-F5AIJl-Inmm3V-UVm8kWNA"),
    ("#", "durable-1", "stomp-subscription-0vI-bct8LcJj5hhtNhqa5A"),
    ("stocks.*.AAPL", "sub-0", "stomp-subscription-YH4O9GvMb5lirbfEF9yeGw"),
    ("a/b", "1", "stomp-subscription-GH4JqgBMVzTkuzIb_dxZ9g"),
    ("é", "x", "stomp-subscription-6hgbwrGuysXY7u9qOC9Ymw"),
    ("k", "\x00\x01", "stomp-subscription-l-oHazHmLGjcXhBN3gUMmw"),
    ("b" * 65535, "id", "stomp-subscription-xwtkxG4IduiSRmLgeyGrxA"),
    ("b" * 65536, "id", "stomp-subscription-mnUOKvh5iBblw_XPMepqGQ"),
    ("a" * 70000, "id", "stomp-subscription-wpc6WMTp0mYsmX5Jx8vIvw"),
]


@pytest.mark.parametrize(("key", "sub_id", "name"), RABBITMQ_NAMES, ids=range(len(RABBITMQ_NAMES)))
def test_note1_durable_names_match_rabbitmq(key: str, sub_id: str, name: str) -> None:
    assert durable_subscription_queue_name(key, sub_id) == name


def test_note1_durable_name_is_deterministic_and_ignores_the_exchange() -> None:
    headers = {"durable": "true"}
    names = {
        plan("/exchange/A/k", headers, "7").queue,
        plan("/exchange/B/k", headers, "7").queue,
        plan("/topic/k", headers, "7").queue,
        plan("/topic/k", headers, "7").queue,
    }
    assert names == {durable_subscription_queue_name("k", "7")}
    assert plan("/topic/k", headers, "8").queue != plan("/topic/k", headers, "7").queue
    assert plan("/topic/j", headers, "7").queue != plan("/topic/k", headers, "7").queue


def test_note1_exchange_without_pattern_uses_the_empty_key() -> None:
    assert plan("/exchange/x", {"durable": "true"}, "id").queue == "stomp-subscription-V409TEtwzmGp7KXHMDqgew"


def test_note1_non_durable_names_are_random() -> None:
    names = {plan("/topic/k", {}, "7").queue for _ in range(50)}
    assert len(names) == 50
    assert all(GENERATED.fullmatch(name) for name in names)


# -- b.2 note 4: UNSUBSCRIBE -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "headers", "expected"),
    [
        ("/topic/k", {"durable": "true"}, NAME_K_ID),
        ("/topic/k", {"persistent": "True"}, NAME_K_ID),
        ("/topic/k", {"durable": "true", "x-queue-name": "mine"}, "mine"),
        ("/topic/k", {}, None),
        ("/topic/k", {"durable": "false"}, None),
        ("/exchange/x/k", {"durable": "true"}, None),
        ("/queue/k", {"durable": "true"}, None),
    ],
)
def test_note4_durable_unsubscribe(raw: str, headers: dict[str, str], expected: str | None) -> None:
    assert durable_unsubscribe_queue(parse_destination(raw), headers, "id") == expected


def test_note4_unsubscribe_deletes_what_subscribe_declared() -> None:
    dest = parse_destination("/topic/a%2Fb.*")
    subscribed = subscription_plan(dest, {"durable": "true", "auto-delete": "false"}, "s1")
    assert durable_unsubscribe_queue(dest, {"durable": "true"}, "s1") == subscribed.queue


# -- b.3 MESSAGE destination -------------------------------------------------------------------------------

# (exchange, routing key, destination): the b.3 table and escaping, as RabbitMQ 3.10.8 formats them.
FORMATTED = [
    ("", "RK", "/queue/RK"),
    ("amq.topic", "a.b", "/topic/a.b"),
    ("x", "", "/exchange/x"),
    ("x", "rk", "/exchange/x/rk"),
    ("amq.direct", "k", "/exchange/amq.direct/k"),
    ("ticks", "NASDAQ.AAPL", "/exchange/ticks/NASDAQ.AAPL"),
    ("a/b", "c/d", "/exchange/a%2Fb/c%2Fd"),
    ("", "a/b", "/queue/a%2Fb"),
    ("", "100%", "/queue/100%25"),
    ("", "%2F", "/queue/%252F"),
    ("", "tab\tnl\n", "/queue/tab%09nl%0A"),
    ("", "café", "/queue/caf%C3%A9"),
    ("ex", "euro€", "/exchange/ex/euro%E2%82%AC"),
    ("", "del\x7f", "/queue/del\x7f"),  # 127 is not escaped (only < 32 and > 127)
    ("amq.topic", "", "/topic/"),
    ("", "", "/queue/"),
    ("", "amq.gen-Xyz", "/queue/amq.gen-Xyz"),
]


@pytest.mark.parametrize(("exchange", "routing_key", "destination"), FORMATTED)
def test_b3_format_destination(exchange: str, routing_key: str, destination: str) -> None:
    assert format_destination(exchange, routing_key) == destination


def test_b3_configured_topic_exchange() -> None:
    assert format_destination("events", "k", "events") == "/topic/k"
    assert format_destination("amq.topic", "k", "events") == "/exchange/amq.topic/k"


def test_b4_topic_with_escaped_slash_round_trips() -> None:
    dest = parse_destination("/topic/a%2Fb")
    assert format_destination(*routing_pair(dest)) == "/topic/a%2Fb"


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(), st.sampled_from(["", "amq.topic", "x"]))
def test_b3_escaping_properties(exchange: str, routing_key: str, which: str) -> None:
    exchange = which or exchange
    destination = format_destination(exchange, routing_key)
    assert all(32 <= ord(char) <= 127 for char in destination)  # no control characters, only ASCII
    segments = destination.split("/")
    # "/" only separates: a raw "/" never appears inside a name segment
    assert segments[0] == ""
    assert segments[1] in {"queue", "topic", "exchange"}
    assert len(segments) == (3 if exchange in ("", "amq.topic") or routing_key == "" else 4)
    # the names come back through the parser when they contain no "%" and are ASCII without controls
    if "%" not in exchange + routing_key and all(32 <= ord(char) < 127 for char in exchange + routing_key):
        if destination.startswith("/exchange/") and exchange:
            dest = parse_destination(destination)
            assert (dest.name, dest.pattern or "") == (exchange, routing_key)
        elif routing_key:
            assert parse_destination(destination).name == routing_key
