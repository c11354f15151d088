"""The ticker page under tokens and an Origin allow-list, in headless Chromium against a real gateway
process (the embedded broker and its stock daemon, as ``make run-tokens``): the token travels as the
``access_token`` query parameter of the page's WebSocket (browsers cannot set headers on one)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import GatewayProcess, _gateway_env, free_port
from tests.e2e.test_ticker import ALL_PRICED, SYMBOLS
from tests.tokens import Keys, make_keys

pytestmark = pytest.mark.e2e

SNAPSHOT_SCOPE = (
    "rabbitmq.read:%2F/stocks/* rabbitmq.configure:%2F/stocks.snapshot rabbitmq.write:%2F/amq.default "
    "rabbitmq.configure:%2F/amq.gen-* rabbitmq.read:%2F/amq.gen-*"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def token_gateway(keys: Keys) -> Iterator[GatewayProcess]:
    """Tokens required (no anonymous scope), and only the page's own origin may open a WebSocket."""
    port = free_port()
    gw = GatewayProcess(
        "gateway-tokens",
        port,
        [
            "--broker", "memory", "--with-stock-daemon",
            "--jwt-secret-file", keys.secret_file,
            "--allowed-origin", f"http://127.0.0.1:{port}",
        ],
        env=_gateway_env(),
    )
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def test_the_token_query_parameter_opens_the_session(page: Page, token_gateway: GatewayProcess, keys: Keys) -> None:
    # Without a token the page is refused, in plain words.
    page.goto(token_gateway.url, wait_until="domcontentloaded")
    expect(page.locator("#error-banner")).to_be_visible(timeout=5_000)
    expect(page.locator("#error-message")).to_contain_text("did not accept this page's login")
    expect(page.locator("#error-body")).to_contain_text("A token is required")
    # With ?access_token=..., the session opens, as alice, and the snapshot fills every row at once.
    token = keys.sign("HS256", sub="alice", scope=SNAPSHOT_SCOPE, ttl=120)
    started = time.monotonic()
    page.goto(f"{token_gateway.url}?access_token={token}", wait_until="domcontentloaded")
    page.wait_for_function(ALL_PRICED, arg=SYMBOLS, timeout=3_000)
    assert time.monotonic() - started < 3.0
    expect(page.locator("#status")).to_have_text("Online", timeout=1_000)
    expect(page.locator("#error-banner")).to_be_hidden()
    log = Path(token_gateway.log).read_text()
    assert token not in log  # the token is never logged, not even from the request line


def test_another_origin_is_refused(page: Page, token_gateway: GatewayProcess, keys: Keys) -> None:
    # Same server, another origin (localhost is not 127.0.0.1 to a browser): the upgrade is refused.
    token = keys.sign("HS256", sub="alice", scope=SNAPSHOT_SCOPE, ttl=120)
    refused: list[int] = []
    page.on("websocket", lambda ws: refused.append(1))
    page.goto(f"http://localhost:{token_gateway.port}/?access_token={token}", wait_until="domcontentloaded")
    page.wait_for_timeout(2_000)
    expect(page.locator("#status")).not_to_have_text("Online")
    assert page.evaluate("() => document.querySelectorAll('#quotes .price').length") > 0
    assert not page.evaluate(ALL_PRICED, SYMBOLS)
    assert refused  # it tried
