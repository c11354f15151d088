"""The embedded broker against the AMQP 0-9-1 model and RabbitMQ's behaviour (texts included).

Everything here is real: a started :class:`MemoryBroker`, its channels, the event loop. Deliveries are
dispatched in a later loop pass, so tests ``await drain()`` before looking at what consumers received.
"""

from __future__ import annotations

import ast
import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.broker.memory
from gateway.broker.base import (
    AccessRefused,
    BrokerError,
    BrokerUnavailable,
    ChannelClosed,
    Delivery,
    MessageProperties,
    PublishNacked,
    VhostNotFound,
)
from gateway.broker.memory import MemoryBroker, MemoryChannel, MemoryPrincipal

# --------------------------------------------------------------------------------------------------------
# Helpers


class Inbox:
    """A consumer callback that keeps what it is given."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    @property
    def bodies(self) -> list[bytes]:
        return [delivery.body for delivery in self.deliveries]

    @property
    def tags(self) -> list[int]:
        return [delivery.delivery_tag for delivery in self.deliveries]


async def drain(passes: int = 5) -> None:
    """Let the event loop run a few passes (dispatch, acks that reschedule dispatch, on_close...)."""
    for _ in range(passes):
        await asyncio.sleep(0)


async def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll ``condition`` until it holds (for timer-driven behaviour: TTLs, x-expires)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


def props(**kwargs: Any) -> MessageProperties:
    return MessageProperties(**kwargs)


async def publish_all(channel: MemoryChannel, exchange: str, routing_key: str, *bodies: bytes) -> None:
    for body in bodies:
        await channel.publish(exchange, routing_key, body, props())


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker(vhosts={"/", "dev"})
    await broker.start()
    yield broker
    await broker.close()


async def open_channel(broker: MemoryBroker, vhost: str = "/") -> MemoryChannel:
    return await broker.open_channel(await broker.authenticate("guest", "guest", vhost))


@pytest.fixture
async def channel(broker: MemoryBroker) -> MemoryChannel:
    return await open_channel(broker)


def ready(broker: MemoryBroker, queue: str, vhost: str = "/") -> int:
    info = broker.queue_info(queue, vhost)
    assert info is not None, f"queue {queue!r} is missing"
    return info.messages_ready


async def raises(code: int, name: str, text: str, awaitable: Any) -> BrokerError:
    with pytest.raises(BrokerError) as caught:
        await awaitable
    assert (caught.value.code, caught.value.name, caught.value.text) == (code, name, text)
    return caught.value


# --------------------------------------------------------------------------------------------------------
# Connection: authentication, virtual hosts, lifecycle


class TestAuthentication:
    async def test_default_user_is_guest(self, broker: MemoryBroker) -> None:
        principal = await broker.authenticate("guest", "guest", "/")
        assert principal == MemoryPrincipal("guest", "/")
        assert broker.shared_key(principal) == ("guest", "/")
        assert broker.kind == "memory"

    async def test_wrong_passcode_and_unknown_user_are_refused(self, broker: MemoryBroker) -> None:
        with pytest.raises(AccessRefused) as caught:
            await broker.authenticate("guest", "nope", "/")
        assert caught.value.code == 403 and caught.value.login == "guest"
        with pytest.raises(AccessRefused):
            await broker.authenticate("mallory", "guest", "/")

    async def test_unknown_vhost(self, broker: MemoryBroker) -> None:
        with pytest.raises(VhostNotFound) as caught:
            await broker.authenticate("guest", "guest", "/nope")
        assert caught.value.vhost == "/nope"

    async def test_credentials_are_checked_before_the_vhost(self, broker: MemoryBroker) -> None:
        with pytest.raises(AccessRefused):
            await broker.authenticate("guest", "nope", "/nope")

    async def test_custom_users(self) -> None:
        broker = MemoryBroker(users={"alice": "s3cret"})
        await broker.start()
        assert await broker.authenticate("alice", "s3cret", "/") == MemoryPrincipal("alice", "/")
        with pytest.raises(AccessRefused):
            await broker.authenticate("guest", "guest", "/")
        await broker.close()

    async def test_available_between_start_and_close(self) -> None:
        broker = MemoryBroker()
        assert not broker.is_available
        with pytest.raises(BrokerUnavailable):
            await broker.authenticate("guest", "guest", "/")
        await broker.start()
        assert broker.is_available
        await broker.close()
        assert not broker.is_available
        with pytest.raises(BrokerUnavailable):
            await broker.authenticate("guest", "guest", "/")

    async def test_nothing_survives_a_restart(self) -> None:
        broker = MemoryBroker()
        await broker.start()
        channel = await open_channel(broker)
        await channel.declare_queue("kept?", durable=True)
        await broker.close()
        await broker.start()
        assert broker.queue_info("kept?") is None
        await broker.close()

    async def test_close_closes_channels_and_tells_them(self, broker: MemoryBroker) -> None:
        channel = await open_channel(broker)
        reasons: list[BrokerError] = []
        channel.on_close = reasons.append
        await broker.close()
        assert not channel.is_open
        await drain()
        assert len(reasons) == 1 and isinstance(reasons[0], BrokerUnavailable)
        with pytest.raises(ChannelClosed):
            await channel.declare_queue("q")


class TestVirtualHosts:
    async def test_each_vhost_has_its_own_queues_and_exchanges(self, broker: MemoryBroker) -> None:
        root = await open_channel(broker, "/")
        dev = await open_channel(broker, "dev")
        await root.declare_queue("q")
        await dev.declare_queue("q")
        await root.declare_exchange("prices", "topic")
        await root.publish("", "q", b"root", props())
        assert ready(broker, "q", "/") == 1
        assert ready(broker, "q", "dev") == 0
        await raises(404, "not_found", "no exchange 'prices' in vhost 'dev'", dev.check_exchange("prices"))

    async def test_errors_name_the_real_vhost(self, broker: MemoryBroker) -> None:
        dev = await open_channel(broker, "dev")
        await raises(404, "not_found", "no queue 'q' in vhost 'dev'", dev.declare_queue("q", passive=True))


# --------------------------------------------------------------------------------------------------------
# Exchanges


class TestExchanges:
    @pytest.mark.parametrize("name", ["", "amq.direct", "amq.fanout", "amq.topic"])
    async def test_predeclared(self, channel: MemoryChannel, name: str) -> None:
        await channel.check_exchange(name)
        assert channel.is_open

    async def test_check_missing_exchange_closes_the_channel(self, channel: MemoryChannel) -> None:
        reasons: list[BrokerError] = []
        channel.on_close = reasons.append
        error = await raises(
            404, "not_found", "no exchange 'nope' in vhost '/'", channel.check_exchange("nope")
        )
        assert not channel.is_open
        assert reasons == []  # on_close comes from the loop, not from inside the failing call
        await drain()
        assert reasons == [error]

    async def test_declare_is_idempotent(self, channel: MemoryChannel) -> None:
        await channel.declare_exchange("prices", "topic")
        await channel.declare_exchange("prices", "topic")
        await channel.declare_exchange("amq.topic", "topic")
        await channel.check_exchange("prices")

    async def test_redeclare_with_another_type(self, channel: MemoryChannel) -> None:
        await channel.declare_exchange("prices", "topic")
        await raises(
            406,
            "precondition_failed",
            "inequivalent arg 'type' for exchange 'prices' in vhost '/': "
            "received 'fanout' but current is 'topic'",
            channel.declare_exchange("prices", "fanout"),
        )
        assert not channel.is_open

    async def test_redeclare_with_another_durability(self, channel: MemoryChannel) -> None:
        await channel.declare_exchange("prices", "topic", durable=True)
        await raises(
            406,
            "precondition_failed",
            "inequivalent arg 'durable' for exchange 'prices' in vhost '/': "
            "received 'false' but current is 'true'",
            channel.declare_exchange("prices", "topic", durable=False),
        )

    async def test_default_exchange_cannot_be_declared(self, channel: MemoryChannel) -> None:
        await raises(
            403,
            "access_refused",
            "operation not permitted on the default exchange",
            channel.declare_exchange(""),
        )

    async def test_amq_prefix_is_reserved(self, channel: MemoryChannel) -> None:
        await raises(
            403,
            "access_refused",
            "exchange name 'amq.mine' contains reserved prefix 'amq.*'",
            channel.declare_exchange("amq.mine"),
        )

    async def test_unknown_type(self, channel: MemoryChannel) -> None:
        await raises(
            503,
            "command_invalid",
            "unknown exchange type 'headers'",
            channel.declare_exchange("h", "headers"),
        )

    async def test_publish_to_missing_exchange_closes_the_channel(self, channel: MemoryChannel) -> None:
        reasons: list[BrokerError] = []
        channel.on_close = reasons.append
        await raises(
            404, "not_found", "no exchange 'nope' in vhost '/'", channel.publish("nope", "k", b"", props())
        )
        assert not channel.is_open
        await drain()
        assert [reason.code for reason in reasons] == [404]
        with pytest.raises(ChannelClosed):
            await channel.publish("", "k", b"", props())


# --------------------------------------------------------------------------------------------------------
# Routing


class TestRouting:
    async def test_default_exchange_routes_by_queue_name(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("orders")
        await channel.publish("", "orders", b"1", props())
        await channel.publish("", "nobody", b"2", props(), confirm=True)  # unroutable: dropped, confirmed
        assert ready(broker, "orders") == 1

    async def test_amq_default_is_the_default_exchange(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("orders")
        await channel.publish("amq.default", "orders", b"1", props())
        assert ready(broker, "orders") == 1

    async def test_direct_matches_the_whole_key(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_queue("a")
        await channel.declare_queue("b")
        await channel.bind_queue("a", "amq.direct", "red")
        await channel.bind_queue("b", "amq.direct", "red")
        await channel.bind_queue("b", "amq.direct", "blue")
        await publish_all(channel, "amq.direct", "red", b"r")
        await publish_all(channel, "amq.direct", "blue", b"b")
        await publish_all(channel, "amq.direct", "red.x", b"none")
        assert (ready(broker, "a"), ready(broker, "b")) == (1, 2)

    async def test_fanout_ignores_the_key_and_delivers_once(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("a")
        await channel.declare_queue("b")
        await channel.bind_queue("a", "amq.fanout", "")
        await channel.bind_queue("b", "amq.fanout", "x")
        await channel.bind_queue("b", "amq.fanout", "y")  # two bindings, still one copy
        await publish_all(channel, "amq.fanout", "whatever", b"1")
        assert (ready(broker, "a"), ready(broker, "b")) == (1, 1)
        await channel.unbind_queue("b", "amq.fanout", "x")
        await publish_all(channel, "amq.fanout", "whatever", b"2")
        assert ready(broker, "b") == 2
        await channel.unbind_queue("b", "amq.fanout", "y")
        await publish_all(channel, "amq.fanout", "whatever", b"3")
        assert (ready(broker, "a"), ready(broker, "b")) == (3, 2)

    @pytest.mark.parametrize(
        ("pattern", "key", "matches"),
        [
            ("#", "", True),
            ("#", "a", True),
            ("#", "a.b.c", True),
            ("*", "", False),
            ("*", "a", True),
            ("*", "a.b", False),
            ("", "", True),
            ("", "a", False),
            ("a", "a", True),
            ("a", "a.b", False),
            ("a.b", "a.bb", False),
            ("a.*", "a", False),
            ("a.*", "a.b", True),
            ("a.*", "a.b.c", False),
            ("a.*", "a.", True),  # "a." is two words, the second empty
            ("a.#", "a", True),  # "#" matches zero words
            ("a.#", "a.b.c", True),
            ("a.#", "b", False),
            ("#.b", "b", True),
            ("#.b", "a.b", True),
            ("#.b", "a.b.c", False),
            ("a.#.b", "a.b", True),
            ("a.#.b", "a.x.b", True),
            ("a.#.b", "a.x.y.b", True),
            ("a.#.b", "a.b.c", False),
            ("a.#.b", "a", False),
            ("a.*.b", "a.b", False),
            ("a.*.b", "a.x.b", True),
            ("#.#", "", True),
            ("#.#", "a.b", True),
            ("*.#", "", False),
            ("*.#", "a", True),
            ("#.*", "", False),
            ("#.*", "a.b", True),
            ("*.*", "a", False),
            ("*.*", ".", True),
            ("stocks.*.nyse", "stocks.ibm.nyse", True),
            ("stocks.*.nyse", "stocks.ibm.lse", False),
        ],
    )
    async def test_topic_wildcards(
        self, broker: MemoryBroker, channel: MemoryChannel, pattern: str, key: str, matches: bool
    ) -> None:
        await channel.declare_queue("q")
        await channel.bind_queue("q", "amq.topic", pattern)
        await channel.publish("amq.topic", key, b"", props())
        assert ready(broker, "q") == int(matches)

    async def test_topic_overlapping_bindings_deliver_once(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q")
        await channel.declare_queue("other")
        for pattern in ("stocks.#", "stocks.*", "#", "stocks.ibm"):
            await channel.bind_queue("q", "amq.topic", pattern)
        await channel.bind_queue("other", "amq.topic", "stocks.*")
        await publish_all(channel, "amq.topic", "stocks.ibm", b"1")
        await publish_all(channel, "amq.topic", "stocks.ibm", b"2")  # from the route cache
        assert (ready(broker, "q"), ready(broker, "other")) == (2, 2)

    async def test_topic_route_cache_follows_binding_changes(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("a")
        await channel.declare_queue("b")
        await channel.bind_queue("a", "amq.topic", "x.*")
        await publish_all(channel, "amq.topic", "x.y", b"1")
        await channel.bind_queue("b", "amq.topic", "#.y")
        await publish_all(channel, "amq.topic", "x.y", b"2")
        await channel.unbind_queue("a", "amq.topic", "x.*")
        await publish_all(channel, "amq.topic", "x.y", b"3")
        await channel.delete_queue("b")
        await publish_all(channel, "amq.topic", "x.y", b"4")
        assert ready(broker, "a") == 2
        assert broker.queue_info("b") is None

    async def test_unbind_of_a_missing_binding_is_fine(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await channel.unbind_queue("q", "amq.topic", "never.bound")
        assert channel.is_open

    async def test_declared_exchanges_route(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_exchange("t", "topic")
        await channel.declare_exchange("d", "direct")
        await channel.declare_exchange("f", "fanout")
        await channel.declare_queue("q")
        await channel.bind_queue("q", "t", "a.#")
        await channel.bind_queue("q", "d", "k")
        await channel.bind_queue("q", "f", "")
        await publish_all(channel, "t", "a.b", b"t")
        await publish_all(channel, "d", "k", b"d")
        await publish_all(channel, "f", "zzz", b"f")
        assert ready(broker, "q") == 3


def _reference_topic_match(pattern: str, key: str) -> bool:
    """The AMQP topic rule, written the obvious (exponential) way."""

    def words(text: str) -> list[str]:
        return text.split(".") if text else []

    def match(pattern_words: list[str], key_words: list[str]) -> bool:
        if not pattern_words:
            return not key_words
        head, rest = pattern_words[0], pattern_words[1:]
        if head == "#":
            return any(match(rest, key_words[skip:]) for skip in range(len(key_words) + 1))
        return bool(key_words) and head in ("*", key_words[0]) and match(rest, key_words[1:])

    return match(words(pattern), words(key))


_pattern_words = st.lists(st.sampled_from(["a", "b", "", "*", "#"]), max_size=5)
_key_words = st.lists(st.sampled_from(["a", "b", ""]), max_size=5)


@settings(max_examples=150, deadline=None)
@given(
    patterns=st.lists(_pattern_words.map(".".join), min_size=1, max_size=4),
    keys=st.lists(_key_words.map(".".join), min_size=1, max_size=4),
)
def test_topic_exchange_agrees_with_the_reference(patterns: list[str], keys: list[str]) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        await broker.start()
        channel = await open_channel(broker)
        for index, pattern in enumerate(patterns):
            await channel.declare_queue(f"q{index}")
            await channel.bind_queue(f"q{index}", "amq.topic", pattern)
        for key in keys:
            await channel.publish("amq.topic", key, b"", props())
        for index, pattern in enumerate(patterns):
            expected = sum(_reference_topic_match(pattern, key) for key in keys)
            assert ready(broker, f"q{index}") == expected, (pattern, keys)
        await broker.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------------
# Queues


class TestQueueDeclare:
    async def test_server_named(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        first = await channel.declare_queue("")
        second = await channel.declare_queue("")
        assert first.startswith("amq.gen-") and len(first) == len("amq.gen-") + 22
        assert first != second
        assert broker.queue_info(first) is not None

    async def test_amq_prefix_is_reserved(self, channel: MemoryChannel) -> None:
        name = await channel.declare_queue("")
        await raises(
            403,
            "access_refused",
            f"queue name '{name}' contains reserved prefix 'amq.*'",
            channel.declare_queue(name),
        )

    async def test_redeclare_is_idempotent_and_durable_is_kept(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q", durable=True, arguments={"x-message-ttl": 1000, "x-custom": 1})
        await channel.declare_queue("q", durable=True, arguments={"x-message-ttl": 1000})
        info = broker.queue_info("q")
        assert info is not None and info.durable and info.arguments["x-custom"] == 1

    async def test_redeclare_with_another_durability(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await raises(
            406,
            "precondition_failed",
            "inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'",
            channel.declare_queue("q", durable=True),
        )
        assert not channel.is_open

    async def test_redeclare_with_another_auto_delete(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q", auto_delete=True)
        await raises(
            406,
            "precondition_failed",
            "inequivalent arg 'auto_delete' for queue 'q' in vhost '/': "
            "received 'false' but current is 'true'",
            channel.declare_queue("q"),
        )

    async def test_redeclare_with_other_arguments(self, broker: MemoryBroker) -> None:
        channel = await open_channel(broker)
        await channel.declare_queue("q", arguments={"x-message-ttl": 1000})
        await raises(
            406,
            "precondition_failed",
            "inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': "
            "received the value '2000' of type 'long' but current is the value '1000' of type 'long'",
            channel.declare_queue("q", arguments={"x-message-ttl": 2000}),
        )
        channel = await open_channel(broker)
        await raises(
            406,
            "precondition_failed",
            "inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': "
            "received none but current is the value '1000' of type 'long'",
            channel.declare_queue("q"),
        )

    async def test_unchecked_arguments_may_differ(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q", arguments={"x-custom": 1})
        await channel.declare_queue("q", arguments={"x-custom": 2})
        assert channel.is_open

    @pytest.mark.parametrize(
        ("arguments", "detail"),
        [
            ({"x-message-ttl": -1}, "{value_negative,-1}"),
            ({"x-message-ttl": "10"}, "{unacceptable_type,longstr}"),
            ({"x-max-length": True}, "{unacceptable_type,bool}"),
            ({"x-expires": 0}, "{value_zero,0}"),
            ({"x-dead-letter-routing-key": "k"}, "routing_key_but_no_dlx_defined"),
        ],
    )
    async def test_invalid_arguments(
        self, channel: MemoryChannel, arguments: dict[str, Any], detail: str
    ) -> None:
        key = next(iter(arguments))
        await raises(
            406,
            "precondition_failed",
            f"invalid arg '{key}' for queue 'q' in vhost '/': {detail}",
            channel.declare_queue("q", arguments=arguments),
        )

    async def test_passive(self, broker: MemoryBroker) -> None:
        channel = await open_channel(broker)
        await channel.declare_queue("q", durable=True)
        assert await channel.declare_queue("q", passive=True) == "q"  # flags are not compared
        await raises(
            404, "not_found", "no queue 'nope' in vhost '/'", channel.declare_queue("nope", passive=True)
        )
        assert not channel.is_open

    async def test_delete(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await channel.bind_queue("q", "amq.topic", "#")
        await publish_all(channel, "", "q", b"1")
        await channel.delete_queue("q")
        assert broker.queue_info("q") is None
        await channel.delete_queue("q")  # deleting a missing queue succeeds
        await publish_all(channel, "amq.topic", "x", b"2")
        await channel.declare_queue("q")
        assert ready(broker, "q") == 0  # the binding and the message went with it


class TestBindingErrors:
    async def test_missing_exchange(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await raises(
            404, "not_found", "no exchange 'nope' in vhost '/'", channel.bind_queue("q", "nope", "k")
        )

    async def test_missing_queue(self, channel: MemoryChannel) -> None:
        await raises(
            404, "not_found", "no queue 'nope' in vhost '/'", channel.bind_queue("nope", "amq.topic", "k")
        )

    async def test_missing_queue_on_unbind(self, channel: MemoryChannel) -> None:
        await raises(
            404, "not_found", "no queue 'nope' in vhost '/'", channel.unbind_queue("nope", "amq.topic", "k")
        )

    async def test_default_exchange(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await raises(
            403,
            "access_refused",
            "operation not permitted on the default exchange",
            channel.bind_queue("q", "", "q"),
        )


LOCKED = (
    "cannot obtain exclusive access to locked queue 'mine' in vhost '/'. It could be originally declared on"
    " another connection or the exclusive property value does not match that of the original declaration."
)


class TestExclusiveQueues:
    async def test_other_channels_are_locked_out(self, broker: MemoryBroker) -> None:
        owner = await open_channel(broker)
        await owner.declare_queue("mine", exclusive=True)
        attempts: list[Callable[[MemoryChannel], Awaitable[object]]] = [
            lambda ch: ch.declare_queue("mine", exclusive=True),
            lambda ch: ch.declare_queue("mine"),
            lambda ch: ch.declare_queue("mine", passive=True),
            lambda ch: ch.consume("mine", Inbox(), no_ack=True),
            lambda ch: ch.bind_queue("mine", "amq.topic", "#"),
            lambda ch: ch.delete_queue("mine"),
        ]
        for attempt in attempts:
            other = await open_channel(broker)
            await raises(405, "resource_locked", LOCKED, attempt(other))
            assert not other.is_open
        info = broker.queue_info("mine")
        assert info is not None and info.exclusive

    async def test_owner_must_redeclare_it_exclusive(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("mine", exclusive=True)
        await channel.declare_queue("mine", exclusive=True)
        await raises(405, "resource_locked", LOCKED, channel.declare_queue("mine"))

    async def test_anyone_may_publish_to_it(self, broker: MemoryBroker) -> None:
        owner = await open_channel(broker)
        other = await open_channel(broker)
        await owner.declare_queue("mine", exclusive=True)
        await other.publish("", "mine", b"hi", props())
        assert ready(broker, "mine") == 1

    async def test_deleted_when_the_owner_closes(self, broker: MemoryBroker) -> None:
        owner = await open_channel(broker)
        await owner.declare_queue("mine", exclusive=True)
        await owner.close()
        assert broker.queue_info("mine") is None
        other = await open_channel(broker)
        await other.declare_queue("mine", exclusive=True)  # the name is free again

    async def test_deleted_when_the_owner_fails(self, broker: MemoryBroker) -> None:
        owner = await open_channel(broker)
        await owner.declare_queue("mine", exclusive=True)
        owner.ack(42)
        assert broker.queue_info("mine") is None


class TestAutoDelete:
    async def test_deleted_after_its_last_consumer_goes(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q", auto_delete=True)
        first = await channel.consume("q", Inbox(), no_ack=True)
        second = await channel.consume("q", Inbox(), no_ack=True)
        await channel.cancel(first)
        assert broker.queue_info("q") is not None
        await channel.cancel(second)
        assert broker.queue_info("q") is None

    async def test_kept_until_it_had_a_consumer(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_queue("q", auto_delete=True)
        await drain()
        assert broker.queue_info("q") is not None

    async def test_deleted_when_the_consuming_channel_closes(self, broker: MemoryBroker) -> None:
        declarer = await open_channel(broker)
        consumer = await open_channel(broker)
        await declarer.declare_queue("q", auto_delete=True)
        await consumer.consume("q", Inbox(), no_ack=False)
        await consumer.close()
        assert broker.queue_info("q") is None


class TestQueueExpiry:
    async def test_unused_queue_expires(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_queue("idle", arguments={"x-expires": 20})
        await channel.declare_queue("busy", arguments={"x-expires": 20})
        tag = await channel.consume("busy", Inbox(), no_ack=True)
        await asyncio.sleep(0.06)
        assert broker.queue_info("idle") is None
        assert broker.queue_info("busy") is not None
        await channel.cancel(tag)
        await asyncio.sleep(0.06)
        assert broker.queue_info("busy") is None


# --------------------------------------------------------------------------------------------------------
# Consumers and acknowledgements


class TestConsume:
    async def test_missing_queue(self, channel: MemoryChannel) -> None:
        await raises(
            404, "not_found", "no queue 'nope' in vhost '/'", channel.consume("nope", Inbox(), no_ack=True)
        )

    async def test_delivery_is_asynchronous_and_batched(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()
        tag = await channel.consume("q", inbox, no_ack=True)
        await publish_all(channel, "", "q", b"1", b"2", b"3")
        assert inbox.bodies == []  # never from inside publish()
        await asyncio.sleep(0)  # one loop pass delivers everything pending
        assert inbox.bodies == [b"1", b"2", b"3"]
        first = inbox.deliveries[0]
        assert (first.consumer_tag, first.exchange, first.routing_key, first.redelivered) == (
            tag,
            "",
            "q",
            False,
        )

    async def test_delivery_carries_exchange_key_and_properties(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await channel.bind_queue("q", "amq.topic", "stocks.#")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True)
        sent = props(content_type="text/plain", headers={"h": "1"}, correlation_id="c")
        await channel.publish("amq.topic", "stocks.ibm", b"body", sent)
        sent.headers["h"] = "changed by the publisher afterwards"
        await drain()
        (delivery,) = inbox.deliveries
        assert (delivery.exchange, delivery.routing_key, delivery.body) == (
            "amq.topic",
            "stocks.ibm",
            b"body",
        )
        assert delivery.properties.content_type == "text/plain"
        assert delivery.properties.correlation_id == "c"
        assert delivery.properties.headers == {"h": "1"}

    async def test_messages_waiting_before_consume_are_delivered(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await publish_all(channel, "", "q", b"1", b"2")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True, consumer_tag="mine")
        await drain()
        assert inbox.bodies == [b"1", b"2"]
        assert {delivery.consumer_tag for delivery in inbox.deliveries} == {"mine"}

    async def test_competing_consumers_round_robin(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        first, second = Inbox(), Inbox()
        await channel.consume("q", first, no_ack=True)
        await channel.consume("q", second, no_ack=True)
        await publish_all(channel, "", "q", b"1", b"2", b"3", b"4", b"5")
        await drain()
        assert first.bodies == [b"1", b"3", b"5"]
        assert second.bodies == [b"2", b"4"]

    async def test_round_robin_skips_a_full_consumer(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        slow, fast = Inbox(), Inbox()
        await channel.consume("q", slow, no_ack=False, prefetch_count=1)
        await channel.consume("q", fast, no_ack=True)
        await publish_all(channel, "", "q", b"1", b"2", b"3", b"4")
        await drain()
        assert slow.bodies == [b"1"]
        assert fast.bodies == [b"2", b"3", b"4"]

    async def test_delivery_tags_count_per_channel_from_one(self, broker: MemoryBroker) -> None:
        one, two = await open_channel(broker), await open_channel(broker)
        await one.declare_queue("q")
        first, second = Inbox(), Inbox()
        await one.consume("q", first, no_ack=False)
        await two.consume("q", second, no_ack=True)
        await publish_all(one, "", "q", b"1", b"2", b"3", b"4")
        await drain()
        assert first.tags == [1, 2]
        assert second.tags == [1, 2]

    async def test_order_is_kept_per_queue(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True)
        bodies = [str(n).encode() for n in range(500)]
        for body in bodies:
            await channel.publish("", "q", body, props())
            if body.endswith(b"7"):
                await asyncio.sleep(0)
        await drain()
        assert inbox.bodies == bodies

    async def test_exclusive_consumer(self, broker: MemoryBroker) -> None:
        channel = await open_channel(broker)
        await channel.declare_queue("q")
        await channel.consume("q", Inbox(), no_ack=True, exclusive=True)
        other = await open_channel(broker)
        await raises(
            403,
            "access_refused",
            "queue 'q' in vhost '/' in exclusive use",
            other.consume("q", Inbox(), no_ack=True),
        )
        other = await open_channel(broker)
        await other.declare_queue("r")
        await other.consume("r", Inbox(), no_ack=True)
        await raises(
            403,
            "access_refused",
            "queue 'r' in vhost '/' in exclusive use",
            other.consume("r", Inbox(), no_ack=True, exclusive=True),
        )

    async def test_consumer_tag_reuse(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await channel.consume("q", Inbox(), no_ack=True, consumer_tag="t")
        await raises(
            530,
            "not_allowed",
            "attempt to reuse consumer tag 't'",
            channel.consume("q", Inbox(), no_ack=True, consumer_tag="t"),
        )

    async def test_a_failing_callback_does_not_stop_delivery(
        self, channel: MemoryChannel, caplog: pytest.LogCaptureFixture
    ) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()

        def explode(delivery: Delivery) -> None:
            raise RuntimeError("consumer bug")

        await channel.consume("q", explode, no_ack=True)
        await channel.consume("q", inbox, no_ack=True)
        await publish_all(channel, "", "q", b"1", b"2", b"3", b"4")
        await drain()
        assert inbox.bodies == [b"2", b"4"]
        assert "consumer bug" in caplog.text

    async def test_cancel_stops_deliveries_but_keeps_unacked(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()
        tag = await channel.consume("q", inbox, no_ack=False)
        await publish_all(channel, "", "q", b"1")
        await drain()
        await channel.cancel(tag)
        await channel.cancel("never-existed")  # ignored, as RabbitMQ does
        await publish_all(channel, "", "q", b"2")
        await drain()
        assert inbox.bodies == [b"1"]
        info = broker.queue_info("q")
        assert info is not None and (info.messages_ready, info.messages_unacknowledged) == (1, 1)
        channel.ack(inbox.tags[0])
        info = broker.queue_info("q")
        assert info is not None and info.messages_unacknowledged == 0 and channel.is_open

    async def test_callback_may_ack_at_once(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()

        def ack_at_once(delivery: Delivery) -> None:
            inbox(delivery)
            channel.ack(delivery.delivery_tag)

        await channel.consume("q", ack_at_once, no_ack=False, prefetch_count=1)
        await publish_all(channel, "", "q", b"1", b"2", b"3")
        await asyncio.sleep(0)
        assert inbox.bodies == [b"1", b"2", b"3"]  # one pass: each ack made room for the next
        info = broker.queue_info("q")
        assert info is not None and (info.messages_ready, info.messages_unacknowledged) == (0, 0)

    async def test_callback_that_breaks_its_channel(self, broker: MemoryBroker) -> None:
        clumsy, careful = await open_channel(broker), await open_channel(broker)
        await careful.declare_queue("q")
        first = Inbox()

        def bad_ack(delivery: Delivery) -> None:
            first(delivery)
            clumsy.ack(delivery.delivery_tag + 100)  # unknown tag: closes the channel mid-dispatch

        await clumsy.consume("q", bad_ack, no_ack=False)
        await publish_all(careful, "", "q", b"1", b"2", b"3")
        await drain()
        assert first.bodies == [b"1"] and not clumsy.is_open
        second = Inbox()
        await careful.consume("q", second, no_ack=True)
        await drain()
        assert second.bodies == [b"1", b"2", b"3"]
        assert [d.redelivered for d in second.deliveries] == [True, False, False]

    async def test_queue_deleted_under_a_consumer(self, broker: MemoryBroker) -> None:
        consumer, admin = await open_channel(broker), await open_channel(broker)
        await admin.declare_queue("q")
        cancelled: list[str] = []
        consumer.on_cancel = cancelled.append
        tag = await consumer.consume("q", Inbox(), no_ack=True)
        await admin.delete_queue("q")
        await drain()
        assert cancelled == [tag]
        assert consumer.is_open


class TestPrefetch:
    async def test_limits_unacked_and_resumes_on_ack(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=False, prefetch_count=2)
        await publish_all(channel, "", "q", b"1", b"2", b"3", b"4", b"5")
        await drain()
        assert inbox.bodies == [b"1", b"2"]
        assert ready(broker, "q") == 3
        channel.ack(inbox.tags[0])
        await drain()
        assert inbox.bodies == [b"1", b"2", b"3"]
        channel.ack(inbox.tags[2], multiple=True)
        await drain()
        assert inbox.bodies == [b"1", b"2", b"3", b"4", b"5"]

    async def test_prefetch_is_per_consumer(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        first, second = Inbox(), Inbox()
        await channel.consume("q", first, no_ack=False, prefetch_count=1)
        await channel.consume("q", second, no_ack=False, prefetch_count=2)
        await publish_all(channel, "", "q", b"1", b"2", b"3", b"4")
        await drain()
        assert (first.bodies, second.bodies) == ([b"1"], [b"2", b"3"])

    @pytest.mark.parametrize("prefetch", [None, 0])
    async def test_none_or_zero_is_unlimited(self, channel: MemoryChannel, prefetch: int | None) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=False, prefetch_count=prefetch)
        await publish_all(channel, "", "q", *[b"m"] * 50)
        await drain()
        assert len(inbox.bodies) == 50


class TestAcknowledgements:
    async def _three(self, channel: MemoryChannel, inbox: Inbox) -> None:
        await channel.declare_queue("q")
        await channel.consume("q", inbox, no_ack=False)
        await publish_all(channel, "", "q", b"1", b"2", b"3")
        await drain()
        assert inbox.tags == [1, 2, 3]

    async def test_ack_one(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        inbox = Inbox()
        await self._three(channel, inbox)
        channel.ack(2)
        info = broker.queue_info("q")
        assert info is not None and info.messages_unacknowledged == 2

    async def test_ack_multiple(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        inbox = Inbox()
        await self._three(channel, inbox)
        channel.ack(2, multiple=True)
        info = broker.queue_info("q")
        assert info is not None and info.messages_unacknowledged == 1
        channel.ack(0, multiple=True)  # tag 0 with multiple: everything outstanding
        info = broker.queue_info("q")
        assert info is not None and info.messages_unacknowledged == 0 and channel.is_open

    async def test_nack_requeues_at_the_head_as_redelivered(self, channel: MemoryChannel) -> None:
        inbox = Inbox()
        await self._three(channel, inbox)
        await publish_all(channel, "", "q", b"4")  # waits for the next dispatch pass
        channel.nack(3)
        channel.nack(2, multiple=True)
        await drain()
        assert inbox.bodies == [b"1", b"2", b"3", b"1", b"2", b"3", b"4"]  # back in their places
        assert [d.redelivered for d in inbox.deliveries] == [False] * 3 + [True] * 3 + [False]
        assert inbox.tags == [1, 2, 3, 4, 5, 6, 7]

    async def test_nack_requeue_goes_before_waiting_messages(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=False, prefetch_count=2)
        await publish_all(channel, "", "q", b"1", b"2", b"3")
        await drain()
        channel.nack(0, multiple=True)
        await drain()
        assert inbox.bodies == [b"1", b"2", b"1", b"2"]
        assert [d.redelivered for d in inbox.deliveries] == [False, False, True, True]

    async def test_nack_without_requeue_drops(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        inbox = Inbox()
        await self._three(channel, inbox)
        channel.nack(3, multiple=True, requeue=False)
        await drain()
        info = broker.queue_info("q")
        assert info is not None and (info.messages_ready, info.messages_unacknowledged) == (0, 0)
        assert len(inbox.deliveries) == 3

    @pytest.mark.parametrize("settle", ["ack", "nack", "ack-twice"])
    async def test_unknown_delivery_tag_closes_the_channel(
        self, broker: MemoryBroker, channel: MemoryChannel, settle: str
    ) -> None:
        inbox = Inbox()
        await self._three(channel, inbox)
        reasons: list[BrokerError] = []
        channel.on_close = reasons.append
        if settle == "ack":
            channel.ack(99)
        elif settle == "nack":
            channel.nack(99, multiple=True)
        else:
            channel.ack(1)
            channel.ack(1)
        assert not channel.is_open
        await drain()
        (reason,) = reasons
        tag = 1 if settle == "ack-twice" else 99
        assert (reason.code, reason.name, reason.text) == (
            406,
            "precondition_failed",
            f"unknown delivery tag {tag}",
        )
        info = broker.queue_info("q")
        assert info is not None and info.messages_unacknowledged == 0
        assert info.messages_ready == (2 if settle == "ack-twice" else 3)  # requeued by the close
        channel.ack(2)  # acks on a closed channel are ignored: there is nothing left to settle

    async def test_no_ack_deliveries_are_settled(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True)
        await publish_all(channel, "", "q", b"1")
        await drain()
        info = broker.queue_info("q")
        assert info is not None and info.messages_unacknowledged == 0
        channel.ack(inbox.tags[0])
        assert not channel.is_open  # nothing to acknowledge: unknown tag

    async def test_close_requeues_unacked_as_redelivered(self, broker: MemoryBroker) -> None:
        first = await open_channel(broker)
        await first.declare_queue("q")
        inbox = Inbox()
        await first.consume("q", inbox, no_ack=False, prefetch_count=2)
        await publish_all(first, "", "q", b"1", b"2", b"3")
        await drain()
        reasons: list[BrokerError] = []
        first.on_close = reasons.append
        await first.close()
        await first.close()  # idempotent, never raises
        second = await open_channel(broker)
        after = Inbox()
        await second.consume("q", after, no_ack=True)
        await drain()
        assert after.bodies == [b"1", b"2", b"3"]
        assert [d.redelivered for d in after.deliveries] == [True, True, False]
        assert reasons == []  # close() does not call on_close

    async def test_cancelled_consumers_unacked_are_requeued_on_close(self, broker: MemoryBroker) -> None:
        first = await open_channel(broker)
        await first.declare_queue("q")
        inbox = Inbox()
        tag = await first.consume("q", inbox, no_ack=False)
        await publish_all(first, "", "q", b"1")
        await drain()
        await first.cancel(tag)
        await first.close()
        assert ready(broker, "q") == 1


# --------------------------------------------------------------------------------------------------------
# Queue arguments: TTL, max-length, dead-lettering


async def _dead_letter_queue(channel: MemoryChannel, name: str = "dead") -> Inbox:
    await channel.declare_exchange("dlx", "fanout")
    await channel.declare_queue(name)
    await channel.bind_queue(name, "dlx", "")
    inbox = Inbox()
    await channel.consume(name, inbox, no_ack=True)
    return inbox


class TestMessageTTL:
    async def test_expired_messages_are_dropped_without_a_consumer(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q", arguments={"x-message-ttl": 20})
        await publish_all(channel, "", "q", b"1", b"2")
        assert ready(broker, "q") == 2
        await asyncio.sleep(0.06)
        assert ready(broker, "q") == 0

    async def test_live_messages_are_delivered(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q", arguments={"x-message-ttl": 10_000})
        await publish_all(channel, "", "q", b"1")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True)
        await drain()
        assert inbox.bodies == [b"1"]

    async def test_messages_expire_while_consumers_are_full(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q", arguments={"x-message-ttl": 20})
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=False, prefetch_count=1)
        await publish_all(channel, "", "q", b"1", b"2")
        await asyncio.sleep(0.06)
        channel.ack(inbox.tags[0])
        await drain()
        assert inbox.bodies == [b"1"]

    async def test_zero_ttl_reaches_a_waiting_consumer_only(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("idle", arguments={"x-message-ttl": 0})
        await channel.declare_queue("q", arguments={"x-message-ttl": 0})
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True)
        await publish_all(channel, "", "idle", b"lost")
        await publish_all(channel, "", "q", b"kept")
        await asyncio.sleep(0.01)
        assert inbox.bodies == [b"kept"]
        assert ready(broker, "idle") == 0

    async def test_per_message_expiration(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await channel.publish("", "q", b"short", props(expiration="20"))
        await channel.publish("", "q", b"long", props(expiration="60000"))
        await asyncio.sleep(0.06)
        assert ready(broker, "q") == 1

    async def test_invalid_expiration(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await raises(
            406,
            "precondition_failed",
            "invalid expiration 'soon': no_integer",
            channel.publish("", "q", b"", props(expiration="soon")),
        )

    async def test_expired_messages_are_dead_lettered(self, channel: MemoryChannel) -> None:
        dead = await _dead_letter_queue(channel)
        await channel.declare_queue("q", arguments={"x-message-ttl": 10, "x-dead-letter-exchange": "dlx"})
        await channel.bind_queue("q", "amq.topic", "orders.*")
        await channel.publish("amq.topic", "orders.new", b"1", props(headers={"app": "x"}))
        await asyncio.sleep(0.05)
        (delivery,) = dead.deliveries
        assert (delivery.exchange, delivery.routing_key, delivery.body) == ("dlx", "orders.new", b"1")
        headers = delivery.properties.headers
        assert headers["app"] == "x"
        (death,) = headers["x-death"]
        assert {k: v for k, v in death.items() if k != "time"} == {
            "count": 1,
            "reason": "expired",
            "queue": "q",
            "exchange": "amq.topic",
            "routing-keys": ["orders.new"],
        }
        assert headers["x-first-death-reason"] == "expired"
        assert headers["x-first-death-queue"] == "q"
        assert headers["x-first-death-exchange"] == "amq.topic"

    async def test_per_message_expiration_is_recorded_when_dead_lettered(
        self, channel: MemoryChannel
    ) -> None:
        dead = await _dead_letter_queue(channel)
        await channel.declare_queue("q", arguments={"x-dead-letter-exchange": "dlx"})
        await channel.publish("", "q", b"1", props(expiration="5"))
        await asyncio.sleep(0.04)
        (delivery,) = dead.deliveries
        assert delivery.properties.expiration is None
        assert delivery.properties.headers["x-death"][0]["original-expiration"] == "5"

    async def test_dead_letter_cycle_is_dropped(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        arguments = {"x-message-ttl": 5, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q"}
        await channel.declare_queue("q", arguments=arguments)
        await publish_all(channel, "", "q", b"1")
        await asyncio.sleep(0.04)
        assert ready(broker, "q") == 0


class TestMaxLength:
    async def test_drop_head(self, channel: MemoryChannel) -> None:
        await channel.declare_queue("q", arguments={"x-max-length": 3})
        await publish_all(channel, "", "q", b"1", b"2", b"3", b"4", b"5")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True)
        await drain()
        assert inbox.bodies == [b"3", b"4", b"5"]

    async def test_drop_head_dead_letters(self, channel: MemoryChannel) -> None:
        dead = await _dead_letter_queue(channel)
        await channel.declare_queue("q", arguments={"x-max-length": 1, "x-dead-letter-exchange": "dlx"})
        await publish_all(channel, "", "q", b"1", b"2", b"3")
        await drain()
        assert dead.bodies == [b"1", b"2"]
        assert {d.properties.headers["x-death"][0]["reason"] for d in dead.deliveries} == {"maxlen"}

    async def test_a_waiting_consumer_takes_messages_first(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q", arguments={"x-max-length": 1})
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=False, prefetch_count=1)
        await publish_all(channel, "", "q", b"1", b"2", b"3")
        await drain()
        assert inbox.bodies == [b"1"]  # as RabbitMQ: 1 goes straight to the consumer, 2 is dropped for 3
        channel.ack(1)
        await drain()
        assert inbox.bodies == [b"1", b"3"]

    async def test_broker_wide_default(self) -> None:
        broker = MemoryBroker(max_queue_length=2)
        await broker.start()
        channel = await open_channel(broker)
        await channel.declare_queue("q")
        await channel.declare_queue("roomy", arguments={"x-max-length": 5})
        await publish_all(channel, "", "q", b"1", b"2", b"3", b"4")
        await publish_all(channel, "", "roomy", b"1", b"2", b"3", b"4")
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True)
        await drain()
        assert inbox.bodies == [b"3", b"4"]
        assert ready(broker, "roomy") == 4
        await broker.close()

    async def test_reject_publish_nacks_confirmed_publishes(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        await channel.publish("", "q", b"1", props(), confirm=True)
        with pytest.raises(PublishNacked):
            await channel.publish("", "q", b"2", props(), confirm=True)
        assert channel.is_open  # a nack is an answer, not a channel error
        await channel.publish("", "q", b"3", props())  # unconfirmed: dropped silently
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=True)
        await drain()
        assert inbox.bodies == [b"1"]

    async def test_reject_publish_dlx(self, channel: MemoryChannel) -> None:
        dead = await _dead_letter_queue(channel)
        arguments = {"x-max-length": 1, "x-overflow": "reject-publish-dlx", "x-dead-letter-exchange": "dlx"}
        await channel.declare_queue("q", arguments=arguments)
        await publish_all(channel, "", "q", b"1", b"2")
        await drain()
        assert dead.bodies == [b"2"]

    async def test_invalid_overflow(self, channel: MemoryChannel) -> None:
        await raises(
            406,
            "precondition_failed",
            "invalid arg 'x-overflow' for queue 'q' in vhost '/': {invalid_overflow_value,<<\"drop-tail\">>}",
            channel.declare_queue("q", arguments={"x-overflow": "drop-tail"}),
        )


class TestDeadLettering:
    async def test_rejected_messages(self, channel: MemoryChannel) -> None:
        dead = await _dead_letter_queue(channel)
        arguments = {"x-dead-letter-exchange": "dlx", "x-dead-letter-routing-key": "failed"}
        await channel.declare_queue("q", arguments=arguments)
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=False)
        await publish_all(channel, "", "q", b"1", b"2")
        await drain()
        channel.nack(2, multiple=True, requeue=False)
        await drain()
        assert dead.bodies == [b"1", b"2"]
        delivery = dead.deliveries[0]
        assert (delivery.exchange, delivery.routing_key) == ("dlx", "failed")
        death = delivery.properties.headers["x-death"][0]
        assert (death["reason"], death["queue"], death["exchange"], death["routing-keys"]) == (
            "rejected",
            "q",
            "",
            ["q"],
        )

    async def test_missing_dead_letter_exchange_drops(
        self, broker: MemoryBroker, channel: MemoryChannel
    ) -> None:
        await channel.declare_queue("q", arguments={"x-dead-letter-exchange": "nowhere"})
        inbox = Inbox()
        await channel.consume("q", inbox, no_ack=False)
        await publish_all(channel, "", "q", b"1")
        await drain()
        channel.nack(1, requeue=False)
        assert channel.is_open and ready(broker, "q") == 0

    async def test_retry_loop_counts_deaths(self, channel: MemoryChannel) -> None:
        """work --rejected--> retry (TTL) --expired--> work: the classic delayed retry."""
        await channel.declare_exchange("retry", "fanout")
        await channel.declare_queue("work", arguments={"x-dead-letter-exchange": "retry"})
        await channel.declare_queue(
            "wait",
            arguments={"x-message-ttl": 5, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "work"},
        )
        await channel.bind_queue("wait", "retry", "")
        inbox = Inbox()
        await channel.consume("work", inbox, no_ack=False)
        await publish_all(channel, "", "work", b"job")
        for attempt in range(1, 3):
            await wait_for(lambda: len(inbox.deliveries) == attempt)  # noqa: B023 (awaited at once)
            channel.nack(inbox.tags[-1], requeue=False)
        await wait_for(lambda: len(inbox.deliveries) == 3)
        deaths = inbox.deliveries[-1].properties.headers["x-death"]
        assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [
            ("wait", "expired", 2),
            ("work", "rejected", 2),
        ]
        headers = inbox.deliveries[-1].properties.headers
        assert (headers["x-first-death-queue"], headers["x-last-death-queue"]) == ("work", "wait")


# --------------------------------------------------------------------------------------------------------
# Publisher confirms


class TestConfirms:
    async def test_confirmed_after_routing(self, broker: MemoryBroker, channel: MemoryChannel) -> None:
        await channel.declare_queue("q")
        await channel.publish("", "q", b"1", props(), confirm=True)
        assert ready(broker, "q") == 1

    async def test_unroutable_is_still_confirmed(self, channel: MemoryChannel) -> None:
        await channel.publish("amq.topic", "nobody.listens", b"1", props(), confirm=True)
        assert channel.is_open


# --------------------------------------------------------------------------------------------------------
# Fan-out at benchmark scale


async def test_fan_out_to_ten_thousand_queues(broker: MemoryBroker, channel: MemoryChannel) -> None:
    subscribers = 10_000
    received = [0] * subscribers

    def counter(index: int) -> Any:
        def deliver(delivery: Delivery) -> None:
            received[index] += 1

        return deliver

    for index in range(subscribers):
        name = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await channel.bind_queue(name, "amq.topic", "stocks.ibm" if index % 2 else "stocks.*")
        await channel.consume(name, counter(index), no_ack=True)
    messages = 5
    started = time.perf_counter()
    for _ in range(messages):
        await channel.publish("amq.topic", "stocks.ibm", b'{"price": 1}', props())
    published = time.perf_counter()
    await drain()
    delivered = time.perf_counter()
    assert received == [messages] * subscribers
    print(
        f"\nfan-out: {messages} x {subscribers} queues: publish {1000 * (published - started):.1f} ms, "
        f"dispatch {1000 * (delivered - published):.1f} ms"
    )


# --------------------------------------------------------------------------------------------------------
# The package: one module per concept, talking through public members


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_modules_touch_no_private_member_of_another_object() -> None:
    """Each object reads and changes only its own ``_private`` state: no ``other._x`` and no import of a
    ``_name`` from a sibling module (the old single module had its broker and channels do both ways)."""
    package = pathlib.Path(gateway.broker.memory.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {path.stem for path in modules} >= {"broker", "channels", "exchanges", "queues", "consumers"}
    offences = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                    offences.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom):
                offences.extend(
                    f"{path.name}:{node.lineno}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if _is_private(alias.name)
                )
    assert offences == []


def test_package_exports_the_public_names() -> None:
    exported = {name: getattr(gateway.broker.memory, name) for name in gateway.broker.memory.__all__}
    assert exported["MemoryBroker"] is MemoryBroker and exported["MemoryChannel"] is MemoryChannel
    assert exported["MAX_QUEUE_LENGTH"] == MemoryBroker().max_queue_length
    assert {"MAX_DISPATCH_BATCH", "ROUTE_CACHE_SIZE", "MemoryPrincipal", "QueueInfo"} <= exported.keys()
