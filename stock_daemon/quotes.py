"""The price walk: pure, seedable, in integer cents.

Each symbol starts at an *opening* price and moves, one tick at a time, by a random whole number of cents
in ``[-MAX_STEP_CENTS, +MAX_STEP_CENTS]`` (the book's ±$1.50), never below ``MIN_PRICE_CENTS`` (one cent).
Prices are kept as integers so that thousands of ticks never accumulate float error; they become dollars
only in :meth:`Quote.as_json`.

**change / change_percent** follow the usual ticker meaning: the difference from the symbol's *opening*
price (the price it had when the walk started), not from the previous tick. ``change`` is in dollars
(rounded to cents), ``change_percent`` in percent rounded to two decimals: a symbol that opened at 95.00
and now trades at 96.90 has ``change`` 1.9 and ``change_percent`` 2.0.

**Seeding.** ``PriceWalk(prices, seed=42)`` derives one :class:`random.Random` per symbol from the seed
and the symbol's name, so the sequence of prices of each symbol is the same on every run whatever order
the symbols happen to tick in (their tick times are random too). ``seed=None`` draws from the OS.

Nothing here does I/O or reads the clock: the caller passes ``now`` in.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "DEFAULT_SYMBOLS",
    "MAX_PRICE_CENTS",
    "MAX_STEP_CENTS",
    "MIN_PRICE_CENTS",
    "SYMBOL_PATTERN",
    "PriceWalk",
    "Quote",
    "format_symbols",
    "format_time",
    "parse_symbols",
]

#: A tick moves a price by at most this many cents either way (the book's ±$1.50).
MAX_STEP_CENTS = 150
#: The floor: a price never falls below one cent.
MIN_PRICE_CENTS = 1
#: The highest opening price ``parse_symbols`` accepts ($1,000,000.00), to catch typos.
MAX_PRICE_CENTS = 100_000_000
#: What a symbol may look like (the page validates with the same expression).
SYMBOL_PATTERN = re.compile(r"[A-Z][A-Z0-9.]{0,9}")

#: The book's universe and opening prices, in cents.
DEFAULT_SYMBOLS: Mapping[str, int] = {
    "AAPL": 95_00,
    "MSFT": 50_00,
    "AMZN": 300_00,
    "GOOG": 550_00,
    "YHOO": 35_00,
    "FB": 75_00,
}


def format_time(moment: datetime) -> str:
    """ISO 8601 in UTC with millisecond precision and a ``Z``: ``2025-01-31T14:05:09.123Z``.

    ``moment`` must be timezone-aware.
    """
    if moment.tzinfo is None:
        raise ValueError("format_time needs a timezone-aware datetime")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Quote:
    """One symbol's price at one moment. All money in integer cents."""

    symbol: str
    price_cents: int
    open_cents: int
    time: datetime

    @property
    def change_cents(self) -> int:
        """Price minus the opening price."""
        return self.price_cents - self.open_cents

    @property
    def change_percent(self) -> float:
        """``change`` as a percentage of the opening price, rounded to two decimals."""
        return round(self.change_cents * 100 / self.open_cents, 2)

    def as_json(self) -> dict[str, Any]:
        """The wire object: ``{"symbol", "price", "change", "change_percent", "time"}``.

        ``price`` and ``change`` are dollars as JSON numbers with at most two decimals.
        """
        return {
            "symbol": self.symbol,
            "price": self.price_cents / 100,
            "change": self.change_cents / 100,
            "change_percent": self.change_percent,
            "time": format_time(self.time),
        }


class PriceWalk:
    """The current quote of every symbol, and the rule that moves them.

    :meth:`step` moves one symbol and returns its new quote; :meth:`quotes` returns the latest quote of
    every symbol (for snapshots). The walk keeps its prices for its whole life: a daemon that loses its
    broker channel keeps the same object and carries on from the same prices.
    """

    def __init__(self, opening: Mapping[str, int], *, now: datetime, seed: int | None = None) -> None:
        if not opening:
            raise ValueError("the price walk needs at least one symbol")
        for symbol, cents in opening.items():
            if cents < MIN_PRICE_CENTS:
                raise ValueError(f"{symbol}: the opening price must be at least one cent")
        self._rngs = {symbol: _rng_for(seed, symbol) for symbol in opening}
        self._quotes = {symbol: Quote(symbol, cents, cents, now) for symbol, cents in opening.items()}

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbols, in the order they were given."""
        return tuple(self._quotes)

    def quote(self, symbol: str) -> Quote:
        """The latest quote of ``symbol`` (``KeyError`` if unknown)."""
        return self._quotes[symbol]

    def quotes(self) -> list[Quote]:
        """The latest quote of every symbol, in symbol order."""
        return list(self._quotes.values())

    def step(self, symbol: str, now: datetime) -> Quote:
        """Move ``symbol`` by one random step and return its new quote, stamped ``now``."""
        quote = self.propose(symbol, now)
        self.accept(quote)
        return quote

    def propose(self, symbol: str, now: datetime) -> Quote:
        """The next quote of ``symbol``, *not yet* its current one: call :meth:`accept` once it is
        published, so a tick lost with a broker channel does not move the price nobody saw."""
        current = self._quotes[symbol]
        delta = self._rngs[symbol].randint(-MAX_STEP_CENTS, MAX_STEP_CENTS)
        price = max(MIN_PRICE_CENTS, current.price_cents + delta)
        return Quote(symbol, price, current.open_cents, now)

    def accept(self, quote: Quote) -> None:
        """Make ``quote`` (from :meth:`propose`) its symbol's current quote."""
        if quote.symbol not in self._quotes:
            raise KeyError(quote.symbol)
        self._quotes[quote.symbol] = quote


def _rng_for(seed: int | None, symbol: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and Python versions.
    return random.Random() if seed is None else random.Random(f"{seed}:{symbol}")


def parse_symbols(text: str) -> dict[str, int]:
    """Parse ``"AAPL=95,MSFT=50.25"`` into ``{"AAPL": 9500, "MSFT": 5025}`` (opening prices in cents).

    Symbols are upper-cased and must match :data:`SYMBOL_PATTERN`; prices are positive dollar amounts
    with at most two decimals. Blank entries (a trailing comma) are skipped. Raises ``ValueError`` with
    a message naming the bad entry.
    """
    result: dict[str, int] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        symbol_text, sep, price_text = entry.partition("=")
        symbol = symbol_text.strip().upper()
        if not sep:
            raise ValueError(f"{entry!r}: expected SYMBOL=PRICE, e.g. AAPL=95.00")
        if not SYMBOL_PATTERN.fullmatch(symbol):
            raise ValueError(
                f"{entry!r}: {symbol_text.strip()!r} is not a symbol "
                "(a letter, then up to 9 letters, digits or dots)"
            )
        if symbol in result:
            raise ValueError(f"{entry!r}: {symbol} is given twice")
        result[symbol] = _parse_cents(entry, price_text.strip())
    if not result:
        raise ValueError("no symbols given; expected e.g. AAPL=95,MSFT=50")
    return result


def _parse_cents(entry: str, text: str) -> int:
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{entry!r}: {text!r} is not a price") from None
    if not amount.is_finite():
        raise ValueError(f"{entry!r}: {text!r} is not a price")
    cents = amount * 100
    if cents != cents.to_integral_value():
        raise ValueError(f"{entry!r}: a price has at most two decimals")
    if not MIN_PRICE_CENTS <= cents <= MAX_PRICE_CENTS:
        raise ValueError(f"{entry!r}: the price must be between 0.01 and {MAX_PRICE_CENTS // 100}")
    return int(cents)


def format_symbols(prices: Iterable[tuple[str, int]]) -> str:
    """The inverse of :func:`parse_symbols`: ``[("AAPL", 9500)]`` → ``"AAPL=95.00"``."""
    return ",".join(f"{symbol}={cents // 100}.{cents % 100:02d}" for symbol, cents in prices)
