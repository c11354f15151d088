"""The stock ticker page in headless Chromium, against the real gateway and stock daemon processes.

Every wait is bounded. The page is driven only through what a user sees (ids and classes of
web/index.html and web/app.js); the one exception is the ERROR-frame test, which has to reach the page's
own WebSocket (see there).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time

import pytest
from playwright.sync_api import BrowserContext, Locator, Page, expect

from tests.e2e.conftest import (
    ARTIFACTS,
    CONTINUITY_ARGS,
    ROOT,
    GatewayProcess,
    Process,
    _gateway_env,
    free_port,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

SYMBOLS = ["AAPL", "MSFT", "AMZN", "GOOG", "YHOO", "FB"]
STORAGE_KEY = "stock-ticker.symbols"
SCREENSHOT = ARTIFACTS / "ticker.png"
DOCS_SCREENSHOT = ROOT / "docs" / "ticker.png"

# --- JavaScript predicates evaluated in the page ------------------------------------------------------

# Every listed symbol has a row whose .price is a plain number ("95.12").
ALL_PRICED = """(symbols) => symbols.every((s) => {
  const el = document.querySelector(`#quotes tr[data-symbol="${s}"] .price`);
  return el !== null && /^-?\\d+(\\.\\d+)?$/.test(el.textContent.trim());
})"""

# symbol -> .price text, for every row.
PRICES = """() => Object.fromEntries([...document.querySelectorAll('#quotes tbody tr')].map(
  (tr) => [tr.dataset.symbol, tr.querySelector('.price').textContent.trim()]))"""

# Some row shows a price other than the one in `before`.
PRICE_CHANGED = """(before) => [...document.querySelectorAll('#quotes tbody tr')].some((tr) => {
  const s = tr.dataset.symbol;
  return s in before && tr.querySelector('.price').textContent.trim() !== before[s];
})"""

# Every listed symbol's sparkline has at least `n` points.
SPARKLINES_HAVE = """([symbols, n]) => symbols.every((s) => {
  const line = document.querySelector(`#quotes tr[data-symbol="${s}"] svg.sparkline polyline`);
  if (line === null) return false;
  const points = (line.getAttribute('points') || '').trim();
  return points !== '' && points.split(/\\s+/).length >= n;
})"""

ROW_SYMBOLS = "() => [...document.querySelectorAll('#quotes tbody tr')].map((tr) => tr.dataset.symbol)"


def row(page: Page, symbol: str) -> Locator:
    return page.locator(f'#quotes tr[data-symbol="{symbol}"]')


def open_ticker(page: Page, url: str, symbols: list[str] = SYMBOLS, within: float = 3.0) -> float:
    """Load the page; return the seconds it took until every symbol's row showed a numeric price."""
    started = time.monotonic()
    page.goto(url, wait_until="domcontentloaded", timeout=5_000)
    page.wait_for_function(ALL_PRICED, arg=symbols, timeout=within * 1000)
    return time.monotonic() - started


def wait_for_price_change(page: Page, timeout_s: float) -> dict[str, str]:
    before: dict[str, str] = page.evaluate(PRICES)
    page.wait_for_function(PRICE_CHANGED, arg=before, timeout=timeout_s * 1000)
    return before


def stored_symbols(page: Page) -> list[str] | None:
    raw = page.evaluate(f"() => window.localStorage.getItem({json.dumps(STORAGE_KEY)})")
    return None if raw is None else json.loads(raw)


# --- against RabbitMQ, with the stock daemon as its own process ----------------------------------------


def test_rows_show_prices_within_3_seconds_and_status_is_online(page: Page, gateway: GatewayProcess) -> None:
    elapsed = open_ticker(page, gateway.url, within=3.0)
    assert elapsed < 3.0
    expect(page.locator("#status")).to_have_text("Online", timeout=1_000)
    assert page.evaluate(ROW_SYMBOLS) == SYMBOLS
    for symbol in SYMBOLS:
        price = row(page, symbol).locator(".price").inner_text().strip()
        assert float(price) > 0, (symbol, price)
        # Change and % change are filled too: "+1.23" / "-0.40" / "0.00" and "+1.29%".
        change = row(page, symbol).locator(".change").inner_text().strip()
        percent = row(page, symbol).locator(".change-percent").inner_text().strip()
        float(change)
        assert percent.endswith("%"), percent
        float(percent[:-1])
    expect(page.locator("#error-banner")).to_be_hidden()


# Records every change of a .price text with the flash class the page gave the cell at that moment.
RECORD_FLASHES = """() => {
  window.__e2eFlashes = [];
  new MutationObserver((records) => {
    for (const r of records) {
      const td = r.target;
      if (!(td instanceof HTMLElement) || !td.classList.contains('price')) continue;
      const old = [...r.removedNodes].map((n) => n.textContent).join('');
      window.__e2eFlashes.push({
        symbol: td.parentElement.dataset.symbol, old, now: td.textContent,
        up: td.classList.contains('flash-up'), down: td.classList.contains('flash-down'),
      });
    }
  }).observe(document.querySelector('#quotes tbody'), { childList: true, subtree: true });
}"""


def test_prices_change_and_sparklines_get_points(page: Page, gateway: GatewayProcess) -> None:
    open_ticker(page, gateway.url)
    page.evaluate(RECORD_FLASHES)
    wait_for_price_change(page, timeout_s=3.0)
    # Ticks come every 0.2-0.6 s per symbol: a dozen points within a few seconds.
    page.wait_for_function(SPARKLINES_HAVE, arg=[SYMBOLS, 3], timeout=5_000)
    # For the screenshot, longer lines that show a trend (UPDATE_DOCS_SCREENSHOT=1: longer still).
    updating_docs = os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1"
    page.wait_for_function(SPARKLINES_HAVE, arg=[SYMBOLS, 25 if updating_docs else 12], timeout=20_000)

    # A price flashes green when it rose and red when it fell (the book had the two swapped).
    flashes = page.evaluate("() => window.__e2eFlashes")
    not_prices = ("", "\u2014", "waiting for data", "no data yet")
    moves = [
        f for f in flashes if f["old"] not in not_prices and f["now"] not in not_prices and float(f["now"]) != float(f["old"])
    ]
    assert len(moves) >= 6, flashes
    wrong = [
        f
        for f in moves
        if (f["up"], f["down"]) != ((True, False) if float(f["now"]) > float(f["old"]) else (False, True))
    ]
    assert not wrong, wrong

    page.mouse.move(0, 0)  # no hover highlight
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), animations="disabled")  # price flashes finished
    assert SCREENSHOT.stat().st_size > 10_000
    if updating_docs:
        # Regenerating docs/ticker.png is a deliberate act: UPDATE_DOCS_SCREENSHOT=1 pytest tests/e2e
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(SCREENSHOT, DOCS_SCREENSHOT)


def test_remove_add_unknown_symbol_and_reload(page: Page, gateway: GatewayProcess) -> None:
    open_ticker(page, gateway.url)
    message = page.locator("#message")

    # Remove MSFT: the row goes, and stays gone while MSFT keeps ticking (its subscription went too).
    row(page, "MSFT").locator("button.remove").click()
    expect(row(page, "MSFT")).to_have_count(0, timeout=1_000)
    expect(message).to_contain_text("MSFT", timeout=1_000)
    assert stored_symbols(page) == ["AAPL", "AMZN", "GOOG", "YHOO", "FB"]
    wait_for_price_change(page, timeout_s=3.0)  # the others tick on ...
    page.wait_for_timeout(1_000)  # ... and MSFT ticked several times meanwhile (every 0.2-0.6 s)
    expect(row(page, "MSFT")).to_have_count(0)

    # Input the page refuses before asking anyone: empty, malformed, already shown.
    page.fill("#symbol-input", "")
    page.click("#add-button")
    expect(message).to_contain_text("Type a symbol first", timeout=1_000)
    page.fill("#symbol-input", "1ABC")
    page.click("#add-button")
    expect(message).to_contain_text("Invalid symbol: 1ABC", timeout=1_000)
    page.fill("#symbol-input", "aapl")
    page.press("#symbol-input", "Enter")
    expect(message).to_contain_text("AAPL is already in the table", timeout=1_000)
    assert page.evaluate(ROW_SYMBOLS) == ["AAPL", "AMZN", "GOOG", "YHOO", "FB"]

    # A symbol nobody publishes yet: any symbol may be added, and its row says it waits for data.
    page.fill("#symbol-input", "zzzz")
    page.click("#add-button")
    expect(message).to_contain_text("Added ZZZZ", timeout=1_000)
    expect(row(page, "ZZZZ").locator(".price")).to_have_text("waiting for data", timeout=1_000)
    row(page, "ZZZZ").locator("button.remove").click()
    expect(row(page, "ZZZZ")).to_have_count(0, timeout=1_000)
    assert "ZZZZ" not in (stored_symbols(page) or [])

    # The choice survives a reload (localStorage): MSFT stays removed.
    page.reload(wait_until="domcontentloaded", timeout=5_000)
    rest = ["AAPL", "AMZN", "GOOG", "YHOO", "FB"]
    page.wait_for_function(ALL_PRICED, arg=rest, timeout=3_000)
    assert page.evaluate(ROW_SYMBOLS) == rest

    # Re-add MSFT (typed in lower case, submitted with the button): its row comes back with a price.
    expect(page.locator("#status")).to_have_text("Online", timeout=3_000)
    page.fill("#symbol-input", "msft")
    page.click("#add-button")
    expect(row(page, "MSFT")).to_have_count(1, timeout=1_000)
    page.wait_for_function(ALL_PRICED, arg=["MSFT"], timeout=3_000)
    expect(message).to_contain_text("Added MSFT", timeout=1_000)
    expect(page.locator("#symbol-input")).to_have_value("")
    assert stored_symbols(page) == [*rest, "MSFT"]

    # And that survives a reload too (MSFT now last, as the user ordered it).
    page.reload(wait_until="domcontentloaded", timeout=5_000)
    page.wait_for_function(ALL_PRICED, arg=SYMBOLS, timeout=3_000)
    assert page.evaluate(ROW_SYMBOLS) == [*rest, "MSFT"]
    # ... and MSFT's row keeps ticking after the reload.
    msft = row(page, "MSFT").locator(".price").inner_text()
    page.wait_for_function(
        """(before) => document.querySelector('#quotes tr[data-symbol="MSFT"] .price').textContent.trim()
                       !== before""",
        arg=msft.strip(),
        timeout=4_000,
    )


def test_gateway_restart_status_goes_offline_then_online_and_rows_keep_updating(
    page: Page, own_gateway: GatewayProcess
) -> None:
    status = page.locator("#status")
    open_ticker(page, own_gateway.url)
    expect(status).to_have_text("Online", timeout=1_000)

    note = page.locator("#stale-note")
    expect(note).to_be_hidden()
    assert own_gateway.stop() == 0, "the gateway should exit 0 on SIGTERM"
    own_gateway.wait_port_closed()
    expect(status).to_have_text("Reconnecting…", timeout=5_000)
    page.wait_for_timeout(1_500)  # time for the page to try, and fail, to reconnect while it is down
    expect(status).to_have_text("Reconnecting…")
    # The prices are marked stale: dimmed rows and the time of the last update.
    expect(note).to_be_visible()
    expect(note).to_contain_text("prices as of")
    assert page.evaluate("() => document.body.classList.contains('stale')")
    assert float(page.evaluate("() => getComputedStyle(document.querySelector('#quotes tbody tr')).opacity")) < 0.6

    restarted = time.monotonic()
    own_gateway.start()  # the same port
    expect(status).to_have_text("Online", timeout=15_000)
    back_after = time.monotonic() - restarted
    assert back_after < 15
    expect(note).to_be_hidden()
    assert not page.evaluate("() => document.body.classList.contains('stale')")
    # A clean shutdown is not an error: the gateway closes the WebSocket without an ERROR frame.
    expect(page.locator("#error-banner")).to_be_hidden()

    # The reconnect brings the last values (a restarted gateway has no history to recover from), which may
    # change every price once; after them, a further change can only be a live tick, i.e. the rows were
    # subscribed again.
    page.wait_for_timeout(1_000)
    wait_for_price_change(page, timeout_s=3.0)
    page.wait_for_function(ALL_PRICED, arg=SYMBOLS, timeout=1_000)


def test_removing_every_symbol_leaves_an_empty_table_that_survives_a_reload(
    page: Page, gateway: GatewayProcess
) -> None:
    open_ticker(page, gateway.url)
    empty = page.locator("#empty")
    expect(empty).to_be_hidden()
    for symbol in SYMBOLS:
        row(page, symbol).locator("button.remove").click()
    expect(page.locator("#quotes tbody tr")).to_have_count(0, timeout=1_000)
    expect(empty).to_be_visible()
    assert stored_symbols(page) == []
    # An empty choice is a choice: the reload must not bring the six defaults back.
    page.reload(wait_until="domcontentloaded", timeout=5_000)
    expect(page.locator("#status")).to_have_text("Online", timeout=3_000)
    page.wait_for_timeout(500)
    expect(page.locator("#quotes tbody tr")).to_have_count(0)
    expect(empty).to_be_visible()
    page.fill("#symbol-input", "FB")
    page.press("#symbol-input", "Enter")
    page.wait_for_function(ALL_PRICED, arg=["FB"], timeout=3_000)
    expect(empty).to_be_hidden()


def test_a_stored_symbol_nobody_publishes_is_kept_and_says_so(
    context: BrowserContext, page: Page, gateway: GatewayProcess
) -> None:
    # A list saved earlier (or by a page of another price universe), in odd case and with junk.
    stored = json.dumps(["goog", "ZZZZ", "AAPL", "not a symbol!"])
    context.add_init_script(
        f"if (!sessionStorage.getItem('e2e-seeded')) {{"
        f" localStorage.setItem({json.dumps(STORAGE_KEY)}, {json.dumps(stored)});"
        f" sessionStorage.setItem('e2e-seeded', '1'); }}"
    )
    open_ticker(page, gateway.url + "?nodata=1500", symbols=["GOOG", "AAPL"])
    assert page.evaluate(ROW_SYMBOLS) == ["GOOG", "ZZZZ", "AAPL"]
    price = row(page, "ZZZZ").locator(".price")
    expect(price).to_have_text("no data yet", timeout=3_000)  # after the (shortened) wait for a first tick
    assert stored_symbols(page) == ["GOOG", "ZZZZ", "AAPL"]


# A tick for a symbol the stock daemon does not know, published by "another service": the page's own STOMP
# connection sends it to the stocks exchange, through the gateway, into RabbitMQ and back.
PUBLISH_TSLA = """(price) => {
  const ws = window.__e2eSockets.filter((s) => s.readyState === WebSocket.OPEN).pop();
  if (!ws) return false;
  const tick = JSON.stringify({symbol: 'TSLA', price, change: '1.50', change_percent: '0.60',
                               time: new Date().toISOString()});
  ws.send('SEND\\ndestination:/exchange/stocks/TSLA\\ncontent-type:application/json\\n\\n' + tick + '\\0');
  return true;
}"""


def test_any_symbol_a_back_end_publishes_can_be_added(page: Page, gateway: GatewayProcess) -> None:
    page.add_init_script(CAPTURE_WEBSOCKETS)
    open_ticker(page, gateway.url)
    expect(page.locator("#status")).to_have_text("Online", timeout=1_000)
    page.fill("#symbol-input", "tsla")
    page.click("#add-button")
    expect(row(page, "TSLA").locator(".price")).to_have_text("waiting for data", timeout=1_000)
    expect(page.locator("#message")).to_contain_text("Added TSLA")
    page.wait_for_timeout(300)  # the new row's SUBSCRIBE is in place
    assert page.evaluate(PUBLISH_TSLA, "251.25"), "the page has no open WebSocket"
    expect(row(page, "TSLA").locator(".price")).to_have_text("251.25", timeout=3_000)
    expect(page.locator("#broker")).to_have_text("RabbitMQ")  # the subtitle names the broker in use


# --- the embedded default (make run) ---------------------------------------------------------------------


def test_embedded_broker_default_like_make_run(page: Page, embedded_gateway: GatewayProcess) -> None:
    # The in-process daemon ticks every 0.5-2.5 s per symbol (its defaults); the last values fill the rows.
    open_ticker(page, embedded_gateway.url, within=3.0)
    expect(page.locator("#status")).to_have_text("Online", timeout=1_000)
    expect(page.locator("#broker")).to_have_text("the embedded broker")
    wait_for_price_change(page, timeout_s=4.0)
    # Every symbol ticks at least every 2.5 s: last-value point + one tick each.
    page.wait_for_function(SPARKLINES_HAVE, arg=[SYMBOLS, 2], timeout=4_000)


# --- what the page learns from the server (GET info.json) -----------------------------------------------


def test_the_page_takes_its_symbols_and_destinations_from_the_server(page: Page) -> None:
    # The gateway runs the daemon in process with symbols and an exchange of their own; the page, which
    # repeats neither, shows those symbols and gets their prices from that exchange.
    env = {**_gateway_env(), "STOCK_SYMBOLS": "IBM=120,TSLA=250", "STOCK_EXCHANGE": "ticks-e2e"}
    gw = GatewayProcess(
        "gateway-own-symbols",
        free_port(),
        ["--broker", "memory", "--with-stock-daemon", "--retain", "ticks-e2e", "--history-size", "100"],
        env=env,
    )
    try:
        gw.start()
        open_ticker(page, gw.url, symbols=["IBM", "TSLA"], within=3.0)
        assert page.evaluate(ROW_SYMBOLS) == ["IBM", "TSLA"]
        wait_for_price_change(page, timeout_s=4.0)  # live ticks, not only the last values
        assert stored_symbols(page) == ["IBM", "TSLA"]
    finally:
        gw.stop()


def test_without_info_json_the_page_says_so_and_asks_again(page: Page, gateway: GatewayProcess) -> None:
    page.route("**/info.json", lambda route: route.fulfill(status=503, body="not now"))
    page.goto(gateway.url, wait_until="domcontentloaded", timeout=5_000)
    note = page.locator("#stale-note")
    expect(note).to_contain_text("has not said which prices it publishes", timeout=3_000)
    expect(page.locator("#status")).to_have_text("Reconnecting…")
    assert page.evaluate(ROW_SYMBOLS) == []
    expect(page.locator("#empty")).to_be_hidden()  # not "no symbols": the page does not know them yet
    assert stored_symbols(page) is None  # nothing saved that would hide the server's symbols later
    page.unroute("**/info.json")
    page.wait_for_function(ALL_PRICED, arg=SYMBOLS, timeout=6_000)  # asked again after 1 s, then 2 s
    expect(page.locator("#status")).to_have_text("Online", timeout=1_000)
    assert page.evaluate(ROW_SYMBOLS) == SYMBOLS


# --- an ERROR frame ---------------------------------------------------------------------------------------

# The page keeps its stompjs client in a closure, so the test reaches the page's own WebSocket instead:
# a subclass installed before any page script runs records every socket the page opens.
CAPTURE_WEBSOCKETS = """(() => {
  const Native = window.WebSocket;
  const sockets = [];
  class Recorded extends Native {
    constructor(...args) { super(...args); sockets.push(this); }
  }
  window.WebSocket = Recorded;
  window.__e2eSockets = sockets;
})();"""

# A SEND to a destination RabbitMQ does not know, written on the page's STOMP connection.
SEND_TO_BAD_DESTINATION = """() => {
  const ws = window.__e2eSockets.filter((s) => s.readyState === WebSocket.OPEN).pop();
  if (!ws) return false;
  ws.send('SEND\\ndestination:/nowhere/e2e\\ncontent-type:text/plain\\n\\nhello\\0');
  return true;
}"""


def test_error_frame_is_shown_to_the_user(page: Page, gateway: GatewayProcess) -> None:
    page.add_init_script(CAPTURE_WEBSOCKETS)
    open_ticker(page, gateway.url)
    status = page.locator("#status")
    expect(status).to_have_text("Online", timeout=1_000)
    banner = page.locator("#error-banner")
    expect(banner).to_be_hidden()

    assert page.evaluate(SEND_TO_BAD_DESTINATION), "the page has no open WebSocket"
    expect(banner).to_be_visible(timeout=3_000)
    # Plain words for the visitor, RabbitMQ's wording in the fold.
    expect(page.locator("#error-message")).to_contain_text("The server reported a problem (Unknown destination)")
    expect(page.locator("#error-message")).to_contain_text("reconnects by itself")
    expect(page.locator("#error-body")).to_contain_text("/nowhere/e2e")

    # One ERROR closes the session; the page reconnects on a new WebSocket (about 2 s of back-off) and
    # carries on.
    expect(status).to_have_text("Reconnecting…", timeout=3_000)
    page.wait_for_function(
        "() => window.__e2eSockets.length >= 2 && window.__e2eSockets.at(-1).readyState === WebSocket.OPEN",
        timeout=8_000,
    )
    expect(status).to_have_text("Online", timeout=3_000)
    expect(banner).to_be_hidden(timeout=1_000)  # the connection is back: the banner goes by itself
    page.wait_for_timeout(1_000)
    wait_for_price_change(page, timeout_s=3.0)


# --- the broker lost behind the gateway ----------------------------------------------------------------


class ThreadedProxy:
    """tests/tcp_proxy.py's cuttable proxy, on an event loop of its own (these tests are synchronous)."""

    def __init__(self, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = TcpProxy("127.0.0.1", port)
        self._call(self.proxy.start())

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)  # type: ignore[arg-type]

    def cut(self) -> None:
        self._call(self.proxy.cut())

    def restore(self) -> None:
        self._call(self.proxy.restore())

    def close(self) -> None:
        self._call(self.proxy.cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_broker_outage_is_told_in_plain_words_and_cleared_on_recovery(
    page: Page, rabbitmq: str, stock_daemon: Process
) -> None:
    proxy = ThreadedProxy(5672)
    url = rabbitmq.replace(":5672", f":{proxy.proxy.port}")
    gw = GatewayProcess("gateway-proxied", free_port(), ["--amqp-url", url, *CONTINUITY_ARGS], env=_gateway_env())
    try:
        gw.start()
        open_ticker(page, gw.url)
        status = page.locator("#status")
        banner = page.locator("#error-banner")
        expect(status).to_have_text("Online", timeout=1_000)
        expect(banner).to_be_hidden()

        proxy.cut()
        expect(banner).to_be_visible(timeout=5_000)
        expect(page.locator("#error-message")).to_have_text(
            "The price feed is unavailable right now. The page reconnects by itself.", timeout=1_000
        )
        text = banner.text_content() or ""
        for internal in ("127.0.0.1", str(proxy.proxy.port), "guest", "amqp", "Exception"):
            assert internal not in text, text
        expect(status).to_have_text("Reconnecting…", timeout=3_000)
        expect(page.locator("#stale-note")).to_contain_text("prices as of")

        proxy.restore()
        expect(status).to_have_text("Online", timeout=25_000)
        expect(banner).to_be_hidden(timeout=1_000)
        page.wait_for_timeout(1_000)
        wait_for_price_change(page, timeout_s=4.0)
    finally:
        gw.stop()
        proxy.close()
