"""The price walk (stock_daemon.quotes): pure, seedable, integer cents."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from stock_daemon.quotes import (
    DEFAULT_SYMBOLS,
    MAX_STEP_CENTS,
    MIN_PRICE_CENTS,
    PriceWalk,
    Quote,
    format_symbols,
    format_time,
    parse_symbols,
)

T0 = datetime(2025, 1, 31, 14, 5, 9, 123456, tzinfo=UTC)


def walk_prices(walk: PriceWalk, order: list[str], rounds: int) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {symbol: [] for symbol in order}
    for n in range(rounds):
        for symbol in order:
            seen[symbol].append(walk.step(symbol, T0 + timedelta(seconds=n)).price_cents)
    return seen


# --- The book's universe ------------------------------------------------------------------------------


def test_default_universe_is_the_books() -> None:
    assert dict(DEFAULT_SYMBOLS) == {
        "AAPL": 9500,
        "MSFT": 5000,
        "AMZN": 30000,
        "GOOG": 55000,
        "YHOO": 3500,
        "FB": 7500,
    }


def test_a_new_walk_quotes_the_opening_prices() -> None:
    walk = PriceWalk(DEFAULT_SYMBOLS, now=T0, seed=1)
    assert walk.symbols == ("AAPL", "MSFT", "AMZN", "GOOG", "YHOO", "FB")
    assert [(q.symbol, q.price_cents, q.change_cents, q.time) for q in walk.quotes()] == [
        (symbol, cents, 0, T0) for symbol, cents in DEFAULT_SYMBOLS.items()
    ]


# --- Determinism ----------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_prices() -> None:
    a = walk_prices(PriceWalk(DEFAULT_SYMBOLS, now=T0, seed=42), list(DEFAULT_SYMBOLS), 50)
    b = walk_prices(PriceWalk(DEFAULT_SYMBOLS, now=T0, seed=42), list(DEFAULT_SYMBOLS), 50)
    assert a == b


def test_different_seeds_give_different_prices() -> None:
    a = walk_prices(PriceWalk(DEFAULT_SYMBOLS, now=T0, seed=1), list(DEFAULT_SYMBOLS), 50)
    b = walk_prices(PriceWalk(DEFAULT_SYMBOLS, now=T0, seed=2), list(DEFAULT_SYMBOLS), 50)
    assert a != b


def test_each_symbols_prices_do_not_depend_on_tick_order() -> None:
    symbols = list(DEFAULT_SYMBOLS)
    forward = walk_prices(PriceWalk(DEFAULT_SYMBOLS, now=T0, seed=7), symbols, 30)
    backward = walk_prices(PriceWalk(DEFAULT_SYMBOLS, now=T0, seed=7), symbols[::-1], 30)
    assert forward == backward


def test_seed_none_is_random() -> None:
    a = walk_prices(PriceWalk({"X": 100_00}, now=T0), ["X"], 40)
    b = walk_prices(PriceWalk({"X": 100_00}, now=T0), ["X"], 40)
    assert a != b


# --- Steps ------------------------------------------------------------------------------------------------


def test_steps_are_whole_cents_within_150_either_way() -> None:
    walk = PriceWalk({"AAPL": 1_000_00}, now=T0, seed=3)
    previous = walk.quote("AAPL").price_cents
    deltas = set()
    for _ in range(20_000):
        price = walk.step("AAPL", T0).price_cents
        assert isinstance(price, int)
        deltas.add(price - previous)
        previous = price
    assert min(deltas) == -MAX_STEP_CENTS == -150
    assert max(deltas) == MAX_STEP_CENTS == 150
    assert 0 in deltas  # "unchanged" is a possible tick, which the page must not flash


def test_price_never_falls_below_one_cent() -> None:
    walk = PriceWalk({"PENNY": 1}, now=T0, seed=5)
    prices = [walk.step("PENNY", T0).price_cents for _ in range(2_000)]
    assert min(prices) == MIN_PRICE_CENTS == 1
    # From the floor, every downward step stops at one cent (about half of all steps).
    walk = PriceWalk({"PENNY": 1}, now=T0, seed=5)
    proposals = [walk.propose("PENNY", T0).price_cents for _ in range(1_000)]
    assert min(proposals) == 1
    assert 400 < proposals.count(1) < 600


def test_step_stamps_the_given_time_and_keeps_the_opening_price() -> None:
    walk = PriceWalk({"AAPL": 9500}, now=T0, seed=9)
    later = T0 + timedelta(seconds=3)
    quote = walk.step("AAPL", later)
    assert quote.time == later
    assert quote.open_cents == 9500
    assert walk.quote("AAPL") == quote
    assert walk.quotes() == [quote]


def test_propose_does_not_move_the_price_until_accepted() -> None:
    walk = PriceWalk({"AAPL": 9500}, now=T0, seed=11)
    proposed = walk.propose("AAPL", T0)
    assert walk.quote("AAPL").price_cents == 9500
    walk.accept(proposed)
    assert walk.quote("AAPL") == proposed


def test_unknown_symbols_are_refused() -> None:
    walk = PriceWalk({"AAPL": 9500}, now=T0)
    with pytest.raises(KeyError):
        walk.step("XYZ", T0)
    with pytest.raises(KeyError):
        walk.accept(Quote("XYZ", 100, 100, T0))


def test_a_walk_needs_symbols_and_positive_prices() -> None:
    with pytest.raises(ValueError, match="at least one symbol"):
        PriceWalk({}, now=T0)
    with pytest.raises(ValueError, match="at least one cent"):
        PriceWalk({"AAPL": 0}, now=T0)


# --- Change and change_percent (relative to the opening price) ------------------------------------------


@pytest.mark.parametrize(
    ("price", "opening", "change", "percent"),
    [
        (9690, 9500, 1.9, 2.0),
        (9500, 9500, 0.0, 0.0),
        (9310, 9500, -1.9, -2.0),
        (5001, 5000, 0.01, 0.02),
        (3333, 3000, 3.33, 11.1),
        (10000, 3000, 70.0, 233.33),
        (1, 3500, -34.99, -99.97),
    ],
)
def test_change_is_relative_to_the_opening_price(
    price: int, opening: int, change: float, percent: float
) -> None:
    quote = Quote("X", price, opening, T0)
    assert quote.as_json()["change"] == change
    assert quote.change_percent == percent


# --- The wire object ----------------------------------------------------------------------------------


def test_json_shape() -> None:
    quote = Quote("AAPL", 9623, 9500, T0)
    assert quote.as_json() == {
        "symbol": "AAPL",
        "price": 96.23,
        "change": 1.23,
        "change_percent": 1.29,
        "time": "2025-01-31T14:05:09.123Z",
    }


def test_prices_serialize_with_at_most_two_decimals() -> None:
    walk = PriceWalk(DEFAULT_SYMBOLS, now=T0, seed=13)
    for _ in range(500):
        for symbol in DEFAULT_SYMBOLS:
            text = json.dumps(walk.step(symbol, T0).as_json())
            decoded = json.loads(text)
            for key in ("price", "change", "change_percent"):
                digits = repr(decoded[key]).split(".")[1]
                assert len(digits) <= 2, (key, decoded)


def test_time_is_iso8601_utc_with_z() -> None:
    assert format_time(T0) == "2025-01-31T14:05:09.123Z"
    plus_two = timezone(timedelta(hours=2))
    assert format_time(datetime(2025, 1, 31, 16, 0, 0, tzinfo=plus_two)) == "2025-01-31T14:00:00.000Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_time(datetime(2025, 1, 31))


# --- STOCK_SYMBOLS / --symbols --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("AAPL=95,MSFT=50", {"AAPL": 9500, "MSFT": 5000}),
        ("AAPL=95.5", {"AAPL": 9550}),
        ("BRK.B=412.07", {"BRK.B": 41207}),
        (" aapl = 95.00 , msft=0.01 ,", {"AAPL": 9500, "MSFT": 1}),
        ("X1=1e2", {"X1": 10000}),
    ],
)
def test_parse_symbols(text: str, expected: dict[str, int]) -> None:
    assert parse_symbols(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no symbols given"),
        (" , ", "no symbols given"),
        ("AAPL", "expected SYMBOL=PRICE"),
        ("AAPL:95", "expected SYMBOL=PRICE"),
        ("=95", "is not a symbol"),
        ("1AB=95", "is not a symbol"),
        ("TOOLONGSYMBOL=95", "is not a symbol"),
        ("A-B=95", "is not a symbol"),
        ("AAPL=95,aapl=96", "AAPL is given twice"),
        ("AAPL=", "is not a price"),
        ("AAPL=ninety", "is not a price"),
        ("AAPL=NaN", "is not a price"),
        ("AAPL=Infinity", "is not a price"),
        ("AAPL=95.001", "at most two decimals"),
        ("AAPL=0", "between 0.01 and"),
        ("AAPL=-5", "between 0.01 and"),
        ("AAPL=1000000000", "between 0.01 and"),
    ],
)
def test_parse_symbols_rejects_bad_input_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_symbols(text)


def test_bad_entry_is_named_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"^'MSFT=abc': 'abc' is not a price$"):
        parse_symbols("AAPL=95,MSFT=abc")


def test_format_symbols_is_the_inverse_of_parse_symbols() -> None:
    text = format_symbols(DEFAULT_SYMBOLS.items())
    assert text == "AAPL=95.00,MSFT=50.00,AMZN=300.00,GOOG=550.00,YHOO=35.00,FB=75.00"
    assert parse_symbols(text) == DEFAULT_SYMBOLS
    assert format_symbols([("P", 1), ("Q", 1205)]) == "P=0.01,Q=12.05"
