"""The page keeps every tick (issue 14), in headless Chromium against the real gateway and stock daemon.

Two pages watch the same ticks: one straight from the gateway, one through a TCP proxy that the test cuts
for a few seconds (or one whose tab the test hides). Each sparkline's ``<svg>`` lists the times of the ticks
it draws (``data-times``); from just before the cut on, both pages must list the very same ticks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, Page

from tests.e2e.conftest import CONTINUITY_ARGS, GatewayProcess, Process, _gateway_env, free_port
from tests.e2e.test_ticker import SYMBOLS, ThreadedProxy, open_ticker

pytestmark = pytest.mark.e2e

# symbol -> the tick times its sparkline draws
SERIES = """() => Object.fromEntries([...document.querySelectorAll('#quotes tbody tr')].map((tr) => [
  tr.dataset.symbol, (tr.querySelector('svg.sparkline').dataset.times || '').split(' ').filter(Boolean)]))"""

# The page has caught up with `latest` (symbol -> newest time) on every symbol.
CAUGHT_UP = """(latest) => Object.entries(latest).every(([s, t]) => {
  const svg = document.querySelector(`#quotes tr[data-symbol="${s}"] svg.sparkline`);
  const times = (svg && svg.dataset.times || '').split(' ');
  return times.includes(t);
})"""


@pytest.fixture(scope="module")
def continuity_gateway(rabbitmq: str, stock_daemon: Process) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        "gateway-continuity", free_port(), ["--amqp-url", rabbitmq, *CONTINUITY_ARGS], env=_gateway_env()
    )
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def series(page: Page) -> dict[str, list[str]]:
    found: dict[str, list[str]] = page.evaluate(SERIES)
    return found


def newest(page: Page) -> dict[str, str]:
    return {symbol: times[-1] for symbol, times in series(page).items() if times}


def assert_same_ticks_since(page: Page, witness: Page, since: dict[str, str]) -> int:
    """Once ``page`` has caught up with ``witness``, both list the same ticks after ``since``; returns how
    many ticks that was (over all symbols)."""
    latest = newest(witness)
    page.wait_for_function(CAUGHT_UP, arg=latest, timeout=20_000)
    ours, theirs = series(page), series(witness)
    total = 0
    for symbol in SYMBOLS:
        mine = [t for t in ours[symbol] if since[symbol] < t <= latest[symbol]]
        seen = [t for t in theirs[symbol] if since[symbol] < t <= latest[symbol]]
        assert mine == seen, (symbol, mine, seen)
        total += len(seen)
    return total


def test_a_network_cut_leaves_no_hole_in_the_sparklines(
    context: BrowserContext, page: Page, continuity_gateway: GatewayProcess
) -> None:
    witness = context.new_page()
    proxy = ThreadedProxy(continuity_gateway.port)
    try:
        open_ticker(witness, continuity_gateway.url)
        open_ticker(page, f"http://127.0.0.1:{proxy.proxy.port}/")
        page.wait_for_timeout(1_500)  # some ticks on the cut page before the cut
        status = page.locator("#status")
        before = newest(page)
        proxy.cut()
        page.wait_for_function("() => document.querySelector('#status').textContent !== 'Online'", timeout=5_000)
        cut_at = time.monotonic()
        page.wait_for_timeout(3_000)  # the ticks flow on (0.2-0.6 s per symbol): the cut page misses them
        during = sum(1 for s in SYMBOLS for t in series(witness)[s] if t > before[s])
        proxy.restore()
        page.wait_for_function("() => document.querySelector('#status').textContent === 'Online'", timeout=20_000)
        assert time.monotonic() - cut_at < 20
        assert status.text_content() == "Online"
        assert during >= len(SYMBOLS)  # ticks did flow while the page was cut off
        page.wait_for_timeout(1_000)
        assert assert_same_ticks_since(page, witness, before) >= during
    finally:
        proxy.close()
        witness.close()


def test_a_hidden_tab_conflates_and_gets_every_tick_back_when_shown(
    context: BrowserContext, page: Page, continuity_gateway: GatewayProcess
) -> None:
    witness = context.new_page()
    try:
        open_ticker(witness, continuity_gateway.url)
        open_ticker(page, continuity_gateway.url + "?conflate=2500")
        page.wait_for_timeout(1_000)
        before = newest(page)
        # What the browser does when the tab goes to the background.
        page.evaluate(
            "() => { Object.defineProperty(document, 'hidden', {value: true, configurable: true});"
            " document.dispatchEvent(new Event('visibilitychange')); }"
        )
        page.wait_for_timeout(4_000)
        hidden = series(page)
        shown_while_hidden = sum(1 for s in SYMBOLS for t in hidden[s] if t > before[s])
        ticked = sum(1 for s in SYMBOLS for t in series(witness)[s] if t > before[s])
        # At most one tick per symbol per 2.5 s (two intervals, plus the one that ends the first) while
        # the daemon ticks every 0.2-0.6 s.
        assert shown_while_hidden <= 3 * len(SYMBOLS) < ticked
        page.evaluate(
            "() => { Object.defineProperty(document, 'hidden', {value: false, configurable: true});"
            " document.dispatchEvent(new Event('visibilitychange')); }"
        )
        assert assert_same_ticks_since(page, witness, before) >= ticked
    finally:
        witness.close()
