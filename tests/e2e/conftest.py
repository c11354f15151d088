"""End-to-end fixtures: the real gateway and stock daemon as subprocesses, and headless Chromium.

Nothing here uses the parametrised ``backend`` fixture of ``tests/conftest.py``: these tests start the
processes the way a user does (``python -m gateway ...``, ``python -m stock_daemon ...``) and drive the
page with Playwright's sync API. The tests are plain (not async) functions, so Playwright's own event loop
never meets pytest-asyncio's.

Process logs go to ``test-artifacts/e2e-logs/`` (gitignored) and their tails are printed when a process
does not come up.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, ViewportSize, sync_playwright

from tests.conftest import rabbitmq_running

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
LOGS = ARTIFACTS / "e2e-logs"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT: ViewportSize = {"width": 1100, "height": 700}
START_TIMEOUT = 15.0
#: What the page needs of a gateway for continuity (README, "Continuity"): the ticks' last values and a
#: history to recover from after a reconnect. ``make run`` passes the same.
CONTINUITY_ARGS = ["--retain", "stocks", "--history-size", "500", "--history-ttl", "60"]
STOP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Process:
    """One subprocess with its output in a log file; :meth:`stop` is SIGTERM, then SIGKILL."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.log = LOGS / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        LOGS.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        mode = "wb" if self.starts == 1 else "ab"
        with open(self.log, mode) as out:
            out.write(f"--- start #{self.starts}: {' '.join(self.args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode

    def fail(self, what: str) -> None:
        status = self.proc.poll() if self.proc is not None else None
        pytest.fail(f"{self.name}: {what} (exit status {status}); log {self.log}:\n{_tail(self.log)}")

    def wait_for_log(self, text: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text(errors="replace"):
                return
            if not self.running():
                self.fail(f"exited before logging {text!r}")
            time.sleep(0.05)
        self.fail(f"did not log {text!r} within {timeout} s")


def healthz(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


class GatewayProcess(Process):
    """``python -m gateway`` on a fixed port (kept across restarts)."""

    def __init__(self, name: str, port: int, extra: Sequence[str], env: dict[str, str] | None = None) -> None:
        super().__init__(name, [PYTHON, "-m", "gateway", "--port", str(port), *extra], env)
        self.port = port
        self.url = f"http://127.0.0.1:{port}/"

    def start(self) -> None:
        super().start()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                self.fail("exited while starting")
            if healthz(self.port) == 200:
                return
            time.sleep(0.05)
        self.fail(f"/healthz did not answer 200 within {timeout} s")

    def wait_port_closed(self, timeout: float = STOP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                return
            time.sleep(0.05)
        self.fail(f"port {self.port} still accepts connections {timeout} s after the gateway stopped")


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    if not rabbitmq_running():
        if os.environ.get("CI") == "true":
            pytest.fail("RabbitMQ is not running on 127.0.0.1:5672 (make test starts it)")
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    return AMQP_URL


def _start_daemon(name: str, amqp_url: str) -> Process:
    daemon = Process(
        name,
        [
            PYTHON,
            "-m",
            "stock_daemon",
            "--amqp-url",
            amqp_url,
            "--min-interval",
            "0.2",
            "--max-interval",
            "0.6",
            "--seed",
            "1",
        ],
    )
    daemon.start()
    # Logged once the tick exchange and the snapshot queue are declared and consumed.
    daemon.wait_for_log("stock daemon: publishing")
    return daemon


@pytest.fixture(scope="module")
def stock_daemon(rabbitmq: str) -> Iterator[Process]:
    """The stock daemon against RabbitMQ, fast ticks (0.2-0.6 s per symbol), seed 1."""
    daemon = _start_daemon("stock-daemon", rabbitmq)
    try:
        yield daemon
    finally:
        daemon.stop()


def _gateway_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("AMQP_URL", "PORT")}


@pytest.fixture(scope="module")
def gateway(rabbitmq: str, stock_daemon: Process) -> Iterator[GatewayProcess]:
    """One gateway in front of RabbitMQ, shared by the tests that do not restart it."""
    gw = GatewayProcess("gateway", free_port(), ["--amqp-url", rabbitmq, *CONTINUITY_ARGS], env=_gateway_env())
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def own_gateway(rabbitmq: str, stock_daemon: Process) -> Iterator[GatewayProcess]:
    """A gateway of the test's own (in front of RabbitMQ), which the test may stop and start."""
    gw = GatewayProcess(
        "gateway-restart", free_port(), ["--amqp-url", rabbitmq, *CONTINUITY_ARGS], env=_gateway_env()
    )
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def embedded_gateway() -> Iterator[GatewayProcess]:
    """What ``make run`` starts: the embedded broker and the in-process stock daemon, no AMQP_URL."""
    gw = GatewayProcess(
        "gateway-embedded",
        free_port(),
        ["--broker", "memory", "--with-stock-daemon", *CONTINUITY_ARGS],
        env=_gateway_env(),
    )
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium (never a downloaded browser), one per module."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing")
    manager = sync_playwright().start()
    try:
        chromium = manager.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        manager.stop()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser context per test: empty localStorage, 1100x700."""
    ctx = browser.new_context(viewport=VIEWPORT)
    ctx.set_default_timeout(10_000)
    try:
        yield ctx
    finally:
        ctx.close()


# Console errors a test may cause on purpose: the page has no favicon, while a gateway is down the
# browser reports each failed WebSocket attempt, and a test may refuse the page its info.json.
EXPECTED_CONSOLE_ERRORS = re.compile(
    r"/favicon\.ico|WebSocket connection to 'ws://(127\.0\.0\.1|localhost):\d+/ws(\?access_token=[^']*)?' failed"
    r"|Failed to load resource: .*\(http://127\.0\.0\.1:\d+/info\.json\)"
)


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A page that fails the test on an uncaught exception or an unexpected console error (a CSP
    violation, a failed script or stylesheet, ...)."""
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))

    def on_console(message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        text = f"{message.text} ({message.location.get('url', '')})"
        if not EXPECTED_CONSOLE_ERRORS.search(text):
            errors.append(f"console: {text}")

    pg.on("console", on_console)
    yield pg
    assert not errors, f"errors in the page: {errors}"
