"""The daemon's loop: publish ticks and serve snapshots, and survive the broker going away.

:func:`run_daemon` is used both by ``python -m stock_daemon`` and inside the gateway process
(``--with-stock-daemon``). Given an authenticated principal it

1. opens a channel, declares the ``stocks`` exchange and the ``stocks.snapshot`` queue;
2. publishes ticks (:mod:`stock_daemon.publisher`) on a schedule and answers snapshot requests
   (:mod:`stock_daemon.snapshot`);
3. when the channel closes (a broker restart, a broker-side error) opens a new one after a back-off of
   0.5 s doubling up to 10 s, reset once a channel is set up again, and carries on from the **same
   prices**: the :class:`~stock_daemon.quotes.PriceWalk` lives as long as the loop, not the channel;
4. returns when ``stop`` is set, after closing its channel. It never closes the broker (the caller owns it).

**Schedules.** By default every symbol ticks on its own, each interval drawn uniformly from
``[min_interval, max_interval]`` seconds. With ``rate`` set (load tests) the daemon publishes ``rate``
ticks per second in total, round-robin over the symbols. Either way ticks follow an absolute timetable so
the rate does not drift; after a stall longer than :data:`MAX_LAG` (or a reconnect) the timetable restarts
from now instead of bursting out the missed ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.broker.base import Broker, BrokerError, Channel, ChannelClosed
from gateway.config import ConfigError, read_environment
from gateway.settings import derive, setting

from .publisher import DEFAULT_EXCHANGE, TickPublisher
from .quotes import DEFAULT_SYMBOLS, PriceWalk, format_symbols, parse_symbols
from .snapshot import SNAPSHOT_QUEUE, SnapshotService

__all__ = [
    "MAX_LAG",
    "DaemonConfig",
    "FixedRateSchedule",
    "RandomIntervalSchedule",
    "StockDaemon",
    "TickSchedule",
    "run_daemon",
]

logger = logging.getLogger(__name__)

#: Seconds the timetable may fall behind before it restarts from now (missed ticks are dropped).
MAX_LAG = 1.0
#: Ticks published back to back before the loop yields to other tasks (matters at high ``rate``).
YIELD_EVERY = 64


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Every setting of the daemon. Prices are opening prices in integer cents.

    The fields made with :func:`gateway.settings.setting` are the daemon's settings (flag, variable, default
    and help, defined here once): ``stock-daemon``'s command line, :meth:`from_env` (the gateway's
    ``--with-stock-daemon``), the gateway's ``/info.json`` (the page's symbols and destinations) and the
    README's table of them are all made from these fields. The others are fixed for a run (tests change them).
    """

    symbols: Mapping[str, int] = setting(
        dict(DEFAULT_SYMBOLS),
        "--symbols",
        "STOCK_SYMBOLS",
        "symbols and opening prices; the page shows these unless the visitor chose others",
        parse=parse_symbols,
        show=lambda symbols: format_symbols(symbols.items()),
        metavar="SYM=PRICE,...",
    )
    min_interval: float = setting(
        0.5, "--min-interval", "STOCK_MIN_INTERVAL", "shortest time between two ticks of one symbol", kind="seconds"
    )
    max_interval: float = setting(
        2.5, "--max-interval", "STOCK_MAX_INTERVAL", "longest time between two ticks of one symbol", kind="seconds"
    )
    #: Ticks per second across all symbols; when set, replaces the random intervals.
    rate: float | None = setting(
        None,
        "--rate",
        "STOCK_RATE",
        "ticks per second across all symbols, round-robin; replaces the intervals (load tests)",
        kind="number",
        metavar="TICKS_PER_SECOND",
    )
    seed: int | None = setting(
        None, "--seed", "STOCK_SEED", "seed for reproducible prices (random when unset)", kind="int", minimum=None
    )
    exchange: str = setting(DEFAULT_EXCHANGE, "--exchange", "STOCK_EXCHANGE", "topic exchange the ticks go to")
    snapshot_queue: str = SNAPSHOT_QUEUE
    reconnect_initial: float = 0.5
    reconnect_max: float = 10.0

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("at least one symbol is needed")
        if not 0 < self.min_interval <= self.max_interval < math.inf:
            raise ValueError(
                "intervals must satisfy 0 < min <= max "
                f"(got min={self.min_interval}, max={self.max_interval})"
            )
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise ValueError(f"rate must be a positive number of ticks per second (got {self.rate})")
        if not self.exchange:
            raise ValueError("the exchange name must not be empty (the default exchange cannot route ticks)")
        if not 0 < self.reconnect_initial <= self.reconnect_max:
            raise ValueError("reconnect delays must satisfy 0 < initial <= max")

    @classmethod
    def from_settings(cls, values: object) -> DaemonConfig:
        """The config that read settings describe (an object or namespace with the fields' names, e.g.
        ``stock-daemon``'s parsed command line); fields it lacks keep their defaults. Settings that are
        wrong together (``--min-interval`` above ``--max-interval``) raise :class:`ConfigError`."""
        try:
            return derive(cls, values)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DaemonConfig:
        """The config that ``STOCK_SYMBOLS``, ``STOCK_MIN_INTERVAL``, ``STOCK_MAX_INTERVAL``, ``STOCK_RATE``,
        ``STOCK_SEED`` and ``STOCK_EXCHANGE`` describe (the variables behind ``stock-daemon``'s flags);
        unset or empty ones keep their defaults. Raises :class:`ConfigError` naming the bad variable.

        The gateway uses this for ``--with-stock-daemon`` and for what ``/info.json`` tells the page.
        """
        return cls.from_settings(read_environment(cls, environ))


class TickSchedule(Protocol):
    """Which symbol ticks next, and when (in the event loop's clock, seconds)."""

    def reset(self, now: float) -> None:
        """Start the timetable afresh from ``now``."""

    def next_due(self) -> float:
        """When the next tick is due."""

    def pop(self) -> str:
        """The symbol of the tick due at :meth:`next_due`; advances the timetable past it."""


class RandomIntervalSchedule:
    """Each symbol ticks on its own, every ``uniform(min_interval, max_interval)`` seconds."""

    def __init__(self, symbols: Sequence[str], min_interval: float, max_interval: float, rng: random.Random):
        self._symbols = tuple(symbols)
        self._min = min_interval
        self._max = max_interval
        self._rng = rng
        self._heap: list[tuple[float, int, str]] = []

    def reset(self, now: float) -> None:
        self._heap = [(now + self._interval(), i, s) for i, s in enumerate(self._symbols)]
        heapq.heapify(self._heap)

    def next_due(self) -> float:
        return self._heap[0][0]

    def pop(self) -> str:
        due, index, symbol = self._heap[0]
        heapq.heapreplace(self._heap, (due + self._interval(), index, symbol))
        return symbol

    def _interval(self) -> float:
        return self._rng.uniform(self._min, self._max)


class FixedRateSchedule:
    """``rate`` ticks per second in total, round-robin over the symbols."""

    def __init__(self, symbols: Sequence[str], rate: float) -> None:
        self._symbols = tuple(symbols)
        self._period = 1.0 / rate
        self._index = 0
        self._due = 0.0

    def reset(self, now: float) -> None:
        self._due = now

    def next_due(self) -> float:
        return self._due

    def pop(self) -> str:
        symbol = self._symbols[self._index]
        self._index = (self._index + 1) % len(self._symbols)
        self._due += self._period
        return symbol


def make_schedule(config: DaemonConfig) -> TickSchedule:
    """The schedule ``config`` asks for (intervals drawn from a generator seeded by ``config.seed``)."""
    symbols = list(config.symbols)
    if config.rate is not None:
        return FixedRateSchedule(symbols, config.rate)
    rng = random.Random() if config.seed is None else random.Random(f"{config.seed}:intervals")
    return RandomIntervalSchedule(symbols, config.min_interval, config.max_interval, rng)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class StockDaemon:
    """The state that outlives channels (prices, timetable) and the loop that (re)opens them.

    Most callers want :func:`run_daemon`. ``channel`` is the channel in use (``None`` between channels);
    ``ticks_published`` counts ticks handed to the broker.
    """

    def __init__(
        self,
        broker: Broker,
        principal: Any,
        config: DaemonConfig,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.broker = broker
        self.principal = principal
        self.config = config
        self.clock = clock
        self.walk = PriceWalk(config.symbols, now=clock(), seed=config.seed)
        self.schedule = make_schedule(config)
        self.channel: Channel | None = None
        self.ticks_published = 0
        self.debug = logger.isEnabledFor(logging.DEBUG)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; see the module docstring."""
        delay = self.config.reconnect_initial
        first = True
        while not stop.is_set():
            ready = asyncio.Event()
            try:
                await self._run_channel(stop, ready, first=first)
            except (BrokerError, OSError) as exc:
                if stop.is_set():
                    break
                if ready.is_set():
                    delay = self.config.reconnect_initial
                    first = False
                what = "channel lost" if ready.is_set() else "cannot open a channel"
                logger.warning("stock daemon: %s (%s); retrying in %.1f s", what, exc, delay)
            if await _sleep_unless(stop, delay):
                break
            delay = min(delay * 2, self.config.reconnect_max)
        logger.info("stock daemon stopped after %d ticks", self.ticks_published)

    async def _run_channel(self, stop: asyncio.Event, ready: asyncio.Event, *, first: bool) -> None:
        """Serve on one channel until ``stop`` (return) or until the channel fails (raise BrokerError)."""
        loop = asyncio.get_running_loop()
        channel = await self.broker.open_channel(self.principal)
        lost: asyncio.Future[BrokerError] = loop.create_future()

        def on_close(reason: BrokerError) -> None:
            if not lost.done():
                lost.set_result(reason)

        channel.on_close = on_close
        self.channel = channel
        tasks: list[asyncio.Future[Any]] = []
        try:
            publisher = TickPublisher(channel, self.config.exchange)
            await publisher.declare()
            snapshots = SnapshotService(channel, self.walk, self.config.snapshot_queue)
            await snapshots.declare()
            await snapshots.start()
            ready.set()
            if first:
                logger.info(
                    "stock daemon: publishing %s to exchange '%s', answering '%s'",
                    ",".join(self.walk.symbols),
                    self.config.exchange,
                    self.config.snapshot_queue,
                )
            else:
                logger.info("stock daemon: channel reopened, carrying on from the same prices")
            tasks = [
                loop.create_task(stop.wait()),
                loop.create_task(self._publish_ticks(publisher)),
                loop.create_task(snapshots.serve()),
            ]
            await asyncio.wait([*tasks, lost], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                return
            if lost.done():
                raise lost.result()
            for task in tasks[1:]:
                if task.done():
                    task.result()  # re-raises the BrokerError that ended it
            raise ChannelClosed("the daemon's tasks ended unexpectedly")
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, BrokerError, OSError):
                    await task
            channel.on_close = None
            self.channel = None
            await channel.close()

    async def _publish_ticks(self, publisher: TickPublisher) -> None:
        loop = asyncio.get_running_loop()
        schedule = self.schedule
        schedule.reset(loop.time())
        burst = 0
        while True:
            now = loop.time()
            due = schedule.next_due()
            if due > now:
                burst = 0
                await asyncio.sleep(due - now)
                continue
            if now - due > MAX_LAG:
                logger.warning("stock daemon: %.1f s behind schedule, skipping the missed ticks", now - due)
                schedule.reset(now)
                continue
            quote = self.walk.propose(schedule.pop(), self.clock())
            await publisher.publish(quote)
            self.walk.accept(quote)
            self.ticks_published += 1
            if self.debug:
                logger.debug("tick %s %.2f", quote.symbol, quote.price_cents / 100)
            burst += 1
            if burst >= YIELD_EVERY:
                burst = 0
                await asyncio.sleep(0)


async def _sleep_unless(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``stop`` is set; True if it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


async def run_daemon(broker: Broker, principal: Any, config: DaemonConfig, *, stop: asyncio.Event) -> None:
    """Publish ticks and answer snapshots through ``broker`` as ``principal`` until ``stop`` is set.

    ``broker`` must be started and ``principal`` come from its ``authenticate``. Channel failures are
    handled here (reopen with back-off, same prices); the call returns only once ``stop`` is set.
    """
    await StockDaemon(broker, principal, config).run(stop)
