"""The stock daemon: its command line, and its loop against the embedded broker (a real broker, no mocks).

What a consumer of the ``stocks`` exchange and the ``stocks.snapshot`` queue sees: ticks with routing key
= symbol and a JSON body, snapshot replies at ``reply_to``, the ``--rate`` pace, and the same prices
after the daemon's channel is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.broker.base import Channel, Delivery, MessageProperties
from gateway.broker.memory import MemoryBroker
from gateway.config import ConfigError
from stock_daemon.__main__ import build_parser, config_from_args, redact_url, settings_table
from stock_daemon.daemon import (
    DaemonConfig,
    FixedRateSchedule,
    RandomIntervalSchedule,
    StockDaemon,
    run_daemon,
)
from stock_daemon.quotes import DEFAULT_SYMBOLS


def fast(**settings: Any) -> DaemonConfig:
    """A config whose symbols tick every 10-30 ms."""
    return dataclasses.replace(DaemonConfig(min_interval=0.01, max_interval=0.03), **settings)


TIMEOUT = 5.0


# --- Helpers ---------------------------------------------------------------------------------------------


@dataclass
class Listener:
    """A channel with one server-named queue; every delivery lands in ``inbox``."""

    channel: Channel
    queue: str
    inbox: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)

    async def next(self, timeout: float = TIMEOUT) -> Delivery:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def next_json(self, timeout: float = TIMEOUT) -> Any:
        return json.loads((await self.next(timeout)).body)

    def drain(self) -> list[Delivery]:
        items = []
        while not self.inbox.empty():
            items.append(self.inbox.get_nowait())
        return items


async def listen(broker: MemoryBroker, *binding_keys: str) -> Listener:
    """A fresh queue bound to ``stocks`` with ``binding_keys`` (declaring the exchange as the daemon does)."""
    principal = await broker.authenticate("guest", "guest", "/")
    channel = await broker.open_channel(principal)
    await channel.declare_exchange("stocks", "topic", durable=True)
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    listener = Listener(channel, queue)
    for key in binding_keys:
        await channel.bind_queue(queue, "stocks", key)
    await channel.consume(queue, listener.inbox.put_nowait, no_ack=True)
    return listener


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    b = MemoryBroker()
    await b.start()
    yield b
    await b.close()


@contextlib.asynccontextmanager
async def running(broker: MemoryBroker, config: DaemonConfig) -> AsyncIterator[StockDaemon]:
    """Run the daemon in the background; stop it (and check it stopped cleanly) on exit."""
    principal = await broker.authenticate("guest", "guest", "/")
    daemon = StockDaemon(broker, principal, config)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
        assert daemon.channel is None


def cents(amount: float) -> int:
    return round(amount * 100)


# --- Ticks -------------------------------------------------------------------------------------------------


async def test_ticks_arrive_on_a_queue_bound_with_the_symbol(broker: MemoryBroker) -> None:
    aapl = await listen(broker, "AAPL")
    async with running(broker, fast(seed=1)):
        deliveries = [await aapl.next() for _ in range(3)]
    for delivery in deliveries:
        assert delivery.exchange == "stocks"
        assert delivery.routing_key == "AAPL"
        assert delivery.properties.content_type == "application/json"
        tick = json.loads(delivery.body)
        assert list(tick) == ["symbol", "price", "change", "change_percent", "time"]
        assert tick["symbol"] == "AAPL"
        assert isinstance(tick["price"], float)
        assert cents(tick["change"]) == cents(tick["price"]) - 9500  # relative to the opening price
        assert tick["change_percent"] == round((cents(tick["price"]) - 9500) / 95, 2)
        assert tick["time"].endswith("Z")


async def test_every_symbol_ticks_on_its_own_routing_key(broker: MemoryBroker) -> None:
    everything = await listen(broker, "#")
    async with running(broker, fast(seed=2)):
        seen: set[str] = set()
        while seen != set(DEFAULT_SYMBOLS):
            delivery = await everything.next()
            assert delivery.routing_key == json.loads(delivery.body)["symbol"]
            seen.add(delivery.routing_key)


async def test_consecutive_ticks_move_by_at_most_150_cents(broker: MemoryBroker) -> None:
    aapl = await listen(broker, "AAPL")
    async with running(broker, fast(symbols={"AAPL": 200}, seed=3)):
        prices = [cents((await aapl.next_json())["price"]) for _ in range(30)]
    steps = [b - a for a, b in zip([200, *prices], prices, strict=False)]
    assert all(-150 <= step <= 150 for step in steps)
    assert min(prices) >= 1


# --- Snapshots --------------------------------------------------------------------------------------------


async def request_snapshot(listener: Listener, correlation_id: str | None, reply_to: str | None) -> None:
    properties = MessageProperties(reply_to=reply_to, correlation_id=correlation_id)
    await listener.channel.publish("", "stocks.snapshot", b"{}", properties)


async def test_snapshot_answers_at_reply_to_with_the_correlation_id(broker: MemoryBroker) -> None:
    replies = await listen(broker)
    async with running(broker, DaemonConfig(seed=4, min_interval=5, max_interval=5)) as daemon:
        while broker.queue_info("stocks.snapshot") is None:
            await asyncio.sleep(0.01)
        await request_snapshot(replies, "req-1", replies.queue)
        reply = await replies.next()
        assert reply.exchange == ""
        assert reply.routing_key == replies.queue
        assert reply.properties.correlation_id == "req-1"
        assert reply.properties.content_type == "application/json"
        quotes = json.loads(reply.body)
        assert quotes == [quote.as_json() for quote in daemon.walk.quotes()]
        assert [q["symbol"] for q in quotes] == list(DEFAULT_SYMBOLS)
        assert [cents(q["price"]) for q in quotes] == list(DEFAULT_SYMBOLS.values())  # nothing ticked yet


async def test_snapshot_queue_is_declared_as_the_gateway_declares_it(broker: MemoryBroker) -> None:
    async with running(broker, fast()):
        while broker.queue_info("stocks.snapshot") is None:
            await asyncio.sleep(0.01)
        # The gateway's SEND /queue/stocks.snapshot declares durable, not exclusive, not auto-delete, no
        # arguments; an inequivalent declaration would fail with 406 and close the channel.
        other = await listen(broker)
        await other.channel.declare_queue("stocks.snapshot", durable=True, exclusive=False, auto_delete=False)
        assert other.channel.is_open


async def test_snapshot_ignores_requests_without_reply_to(broker: MemoryBroker) -> None:
    replies = await listen(broker)
    async with running(broker, DaemonConfig(seed=5, min_interval=5, max_interval=5)):
        while broker.queue_info("stocks.snapshot") is None:
            await asyncio.sleep(0.01)
        await request_snapshot(replies, "lost", None)
        await request_snapshot(replies, "req-2", replies.queue)
        reply = await replies.next()
        assert reply.properties.correlation_id == "req-2"
        await asyncio.sleep(0.1)
        assert replies.drain() == []
        info = broker.queue_info("stocks.snapshot")
        assert info is not None
        assert (info.messages_ready, info.messages_unacknowledged) == (0, 0)  # both acknowledged


async def test_snapshot_reports_the_latest_ticks(broker: MemoryBroker) -> None:
    aapl = await listen(broker, "AAPL")
    async with running(broker, fast(seed=6)):
        await aapl.next()
        await request_snapshot(aapl, "req-3", aapl.queue)
        # Ticks and the reply share the queue: the reply carries the latest AAPL tick before it.
        last_tick: dict[str, Any] | None = None
        while True:
            delivery = await aapl.next()
            if delivery.properties.correlation_id == "req-3":
                break
            last_tick = json.loads(delivery.body)
        snapshot = {q["symbol"]: q for q in json.loads(delivery.body)}
        if last_tick is not None:
            assert snapshot["AAPL"] == last_tick


# --- --rate ------------------------------------------------------------------------------------------------


async def test_rate_publishes_about_that_many_ticks_per_second_round_robin(broker: MemoryBroker) -> None:
    everything = await listen(broker, "#")
    async with running(broker, DaemonConfig(seed=7, rate=300)):
        await everything.next()  # started
        everything.drain()
        await asyncio.sleep(0.5)
        deliveries = everything.drain()
    assert 110 <= len(deliveries) <= 190, len(deliveries)  # 150 expected
    counts = {symbol: 0 for symbol in DEFAULT_SYMBOLS}
    for delivery in deliveries:
        counts[delivery.routing_key] += 1
    assert max(counts.values()) - min(counts.values()) <= 1, counts


async def test_high_rate_keeps_up(broker: MemoryBroker) -> None:
    everything = await listen(broker, "#")
    async with running(broker, DaemonConfig(seed=8, rate=5000)) as daemon:
        await everything.next()
        start = daemon.ticks_published
        await asyncio.sleep(0.4)
        published = daemon.ticks_published - start
    assert 1200 <= published <= 2800, published  # 2000 expected


def test_fixed_rate_schedule_is_round_robin_on_an_absolute_timetable() -> None:
    schedule = FixedRateSchedule(["A", "B", "C"], rate=4)
    schedule.reset(10.0)
    due = []
    for _ in range(5):
        due.append((schedule.next_due(), schedule.pop()))
    assert due == [(10.0, "A"), (10.25, "B"), (10.5, "C"), (10.75, "A"), (11.0, "B")]


def test_random_interval_schedule_keeps_each_symbol_within_its_interval() -> None:
    schedule = RandomIntervalSchedule(["A", "B"], 0.5, 2.5, random.Random(1))
    schedule.reset(0.0)
    last = {"A": 0.0, "B": 0.0}
    for _ in range(200):
        due = schedule.next_due()
        symbol = schedule.pop()
        assert 0.5 <= due - last[symbol] <= 2.5
        last[symbol] = due


# --- Losing the channel -----------------------------------------------------------------------------------


async def test_broker_restart_reopens_the_channel_and_keeps_the_prices(broker: MemoryBroker) -> None:
    aapl = await listen(broker, "AAPL")
    config = fast(symbols={"AAPL": 100_00}, seed=9)
    async with running(broker, config) as daemon:
        # Let the price wander well away from its opening price, so a restart from 100.00 would show.
        last = await aapl.next_json()
        while abs(last["change"]) < 4:
            last = await aapl.next_json()
        first_channel = daemon.channel

        await broker.close()  # every channel fails with BrokerUnavailable; all queues are gone
        await asyncio.sleep(0.2)
        assert daemon.channel is None  # waiting for the back-off (0.5 s)
        await broker.start()
        aapl = await listen(broker, "AAPL")

        after = await aapl.next_json(timeout=3)
        assert daemon.channel is not None
        assert daemon.channel is not first_channel
        assert abs(cents(after["price"]) - cents(last["price"])) <= 150
        assert abs(after["change"]) >= 2.5  # carried on; a fresh walk would be within 1.50 of 100.00
        # The snapshot queue was declared again on the new channel, and answers.
        await request_snapshot(aapl, "after-restart", aapl.queue)
        while (reply := await aapl.next()).properties.correlation_id != "after-restart":
            pass
        assert json.loads(reply.body)[0]["symbol"] == "AAPL"


async def test_a_broker_side_channel_error_is_survived(broker: MemoryBroker) -> None:
    aapl = await listen(broker, "AAPL")
    async with running(broker, fast(symbols={"AAPL": 100_00}, seed=10)) as daemon:
        await aapl.next_json()
        channel = daemon.channel
        assert channel is not None
        # An acknowledgement of a tag the broker never delivered: RabbitMQ (and the embedded broker)
        # close the channel with 406 PRECONDITION_FAILED and tell on_close.
        channel.ack(999_999)
        assert not channel.is_open
        price_at_close = daemon.walk.quote("AAPL").price_cents
        await asyncio.sleep(0.2)  # within the 0.5 s back-off: every tick so far has been delivered
        assert daemon.channel is None
        published = [json.loads(d.body) for d in aapl.drain()]
        if published:
            assert cents(published[-1]["price"]) == price_at_close  # no tick was lost unseen
        after = await aapl.next_json(timeout=3)
        assert daemon.channel is not None and daemon.channel is not channel
        assert abs(cents(after["price"]) - price_at_close) <= 150


async def test_retries_until_the_broker_is_back(broker: MemoryBroker) -> None:
    principal = await broker.authenticate("guest", "guest", "/")
    await broker.close()
    stop = asyncio.Event()
    config = fast(seed=11, reconnect_initial=0.05, reconnect_max=0.2)
    task = asyncio.create_task(run_daemon(broker, principal, config, stop=stop))
    await asyncio.sleep(0.5)  # attempts at 0, 0.05, 0.15, 0.35 s, then every 0.2 s
    assert not task.done()
    await broker.start()
    aapl = await listen(broker, "AAPL")
    assert (await aapl.next_json(timeout=3))["symbol"] == "AAPL"
    stop.set()
    await asyncio.wait_for(task, TIMEOUT)


async def test_stop_returns_promptly_during_the_back_off(broker: MemoryBroker) -> None:
    principal = await broker.authenticate("guest", "guest", "/")
    await broker.close()
    stop = asyncio.Event()
    task = asyncio.create_task(run_daemon(broker, principal, DaemonConfig(reconnect_initial=10), stop=stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 1)


# --- Configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"symbols": {}}, "at least one symbol"),
        ({"min_interval": 0}, "0 < min <= max"),
        ({"min_interval": 3, "max_interval": 2}, "0 < min <= max"),
        ({"max_interval": float("inf")}, "0 < min <= max"),
        ({"rate": 0}, "rate must be a positive"),
        ({"rate": float("inf")}, "rate must be a positive"),
        ({"rate": float("nan")}, "rate must be a positive"),
        ({"exchange": ""}, "must not be empty"),
        ({"reconnect_initial": 5, "reconnect_max": 1}, "reconnect delays"),
    ],
)
def test_config_rejects_nonsense(kwargs: Mapping[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DaemonConfig(**kwargs)


def test_defaults_are_the_books() -> None:
    config = config_from_args(build_parser({}).parse_args([]))
    assert config == DaemonConfig()
    assert dict(config.symbols) == dict(DEFAULT_SYMBOLS)
    assert (config.min_interval, config.max_interval, config.rate) == (0.5, 2.5, None)
    assert (config.exchange, config.snapshot_queue, config.seed) == ("stocks", "stocks.snapshot", None)
    assert (config.reconnect_initial, config.reconnect_max) == (0.5, 10.0)
    args = build_parser({}).parse_args([])
    assert args.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert args.log_level == "INFO"


def test_every_flag_has_an_environment_variable() -> None:
    env = {
        "AMQP_URL": "amqp://u:p@rabbit:5673/v",
        "STOCK_SYMBOLS": "aapl=1.5,IBM=120",
        "STOCK_MIN_INTERVAL": "0.1",
        "STOCK_MAX_INTERVAL": "0.2",
        "STOCK_RATE": "250",
        "STOCK_SEED": "42",
        "STOCK_EXCHANGE": "ticks",
        "LOG_LEVEL": "debug",
    }
    args = build_parser(env).parse_args([])
    assert args.amqp_url == "amqp://u:p@rabbit:5673/v"
    assert args.log_level == "DEBUG"
    assert config_from_args(args) == DaemonConfig(
        symbols={"AAPL": 150, "IBM": 12000},
        min_interval=0.1,
        max_interval=0.2,
        rate=250.0,
        seed=42,
        exchange="ticks",
    )


def test_from_env_reads_the_same_variables_as_the_command_line() -> None:
    env = {
        "STOCK_SYMBOLS": "aapl=1.5,IBM=120",
        "STOCK_MIN_INTERVAL": "0.1",
        "STOCK_MAX_INTERVAL": "0.2",
        "STOCK_RATE": "250",
        "STOCK_SEED": "42",
        "STOCK_EXCHANGE": "ticks",
    }
    assert DaemonConfig.from_env(env) == config_from_args(build_parser(env).parse_args([]))
    assert DaemonConfig.from_env({}) == DaemonConfig()
    assert DaemonConfig.from_env({"STOCK_RATE": "", "STOCK_SEED": " "}) == DaemonConfig()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STOCK_SYMBOLS": "AAPL"}, "^STOCK_SYMBOLS: 'AAPL': expected SYMBOL=PRICE"),
        ({"STOCK_RATE": "fast"}, "^STOCK_RATE: 'fast' is not valid: expected a number greater than 0"),
        ({"STOCK_MIN_INTERVAL": "0"}, "^STOCK_MIN_INTERVAL: '0' is not valid: expected a number of seconds greater than 0$"),
        ({"STOCK_SEED": "1.5"}, "^STOCK_SEED: '1.5' is not valid: expected a whole number$"),
        ({"STOCK_MIN_INTERVAL": "3"}, "0 < min <= max"),
    ],
)
def test_from_env_names_the_bad_variable(env: dict[str, str], message: str) -> None:
    # The gateway's own error (ConfigError: one line, exit status 2), from the same reader as its settings.
    with pytest.raises(ConfigError, match=message) as info:
        DaemonConfig.from_env(env)
    assert info.value.code == 2


def test_flags_win_over_the_environment() -> None:
    args = build_parser({"STOCK_RATE": "250", "STOCK_SYMBOLS": "X=1"}).parse_args(
        ["--rate", "10", "--symbols", "Y=2"]
    )
    assert args.rate == 10.0
    assert args.symbols == {"Y": 200}


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        ({"STOCK_SYMBOLS": "AAPL=abc"}, [], "STOCK_SYMBOLS: 'AAPL=abc': 'abc' is not a price"),
        ({}, ["--symbols", "AAPL"], "--symbols: 'AAPL': expected SYMBOL=PRICE"),
        ({"STOCK_RATE": "fast"}, [], "STOCK_RATE: 'fast' is not valid: expected a number greater than 0"),
        ({}, ["--min-interval", "-1"], "--min-interval: '-1' is not valid: expected a number of seconds greater than 0"),
        ({"STOCK_SEED": "x"}, [], "STOCK_SEED: 'x' is not valid: expected a whole number"),
        ({"LOG_LEVEL": "loud"}, [], "LOG_LEVEL: 'loud' is not valid: expected one of CRITICAL, ERROR, WARNING"),
        ({}, ["--amqp-url", "rabbit:5672"], "--amqp-url: 'rabbit:5672' is not valid: expected an amqp://"),
        ({}, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_settings_give_a_clear_error(env: dict[str, str], argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exit_info:
        build_parser(env).parse_args(argv)
    assert isinstance(exit_info.value, SystemExit) and exit_info.value.code == 2
    assert message in exit_info.value.message
    assert "\n" not in exit_info.value.message


def test_settings_wrong_together_are_a_config_error_too() -> None:
    with pytest.raises(ConfigError, match="0 < min <= max"):
        config_from_args(build_parser({}).parse_args(["--min-interval", "3"]))


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--rate", "fast"], {}, ["--rate", "'fast'", "number"]),
        ([], {"STOCK_SYMBOLS": "AAPL=abc"}, ["STOCK_SYMBOLS", "'abc' is not a price"]),
        (["--min-interval", "3", "--max-interval", "2"], {}, ["0 < min <= max"]),
        (["--amqp-url", "http://guest:hunter2@rabbit/"], {}, ["--amqp-url", "guest:******@rabbit", "amqp://"]),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2_as_for_the_gateway(
    argv: list[str], env: dict[str, str], words: list[str]
) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STOCK_") and k not in ("AMQP_URL", "LOG_LEVEL")}
    result = subprocess.run(
        [sys.executable, "-m", "stock_daemon", *argv],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stock-daemon: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "hunter2" not in result.stderr


def test_the_readme_table_is_the_daemons_settings_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in readme, "README.md's stock-daemon table differs: paste stock_daemon.__main__.settings_table()"


def test_redact_url_hides_the_password() -> None:
    assert redact_url("amqp://guest:secret@host:5672/v") == "amqp://guest:***@host:5672/v"
    assert redact_url("amqp://host/") == "amqp://host/"


def test_unreachable_rabbitmq_is_one_line_on_stderr_and_exit_1() -> None:
    env = {**os.environ, "AMQP_URL": "amqp://guest:topsecret@127.0.0.1:1/"}
    env.pop("LOG_LEVEL", None)
    result = subprocess.run(
        [sys.executable, "-m", "stock_daemon"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stock-daemon: ")
    assert "RabbitMQ" in lines[0] and "127.0.0.1:1" in lines[0]
    assert "topsecret" not in result.stderr
