"""Every bad setting is one line on stderr and exit code 2, naming the flag or variable, the value and the form
expected; the real command (``python -m gateway``) is run for each (issue 11)."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ConfigError, parse_args
from gateway.connection import ConnectionSettings
from gateway.fanout import ContinuitySettings
from gateway.server import Gateway
from gateway.settings import derive
from gateway.stomp.frames import Limits
from gateway.stomp.session import SessionSettings
from stock_daemon.quotes import DEFAULT_SYMBOLS
from tests.conftest import AMQP_URL, rabbitmq_running
from tests.integration.test_process import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


async def gateway_fails(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, list[str]]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "STOCK_"))}
    environ.pop("AMQP_URL", None)
    environ.pop("PORT", None)
    environ.update(env or {})
    port = [] if "PORT" in environ or "--port" in args else ["--port", "0"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *port, *args,
        cwd=ROOT, env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode is not None
    return process.returncode, err.decode().strip().splitlines()


NOT_A_CERTIFICATE = str(ROOT / "README.md")

BAD = [
    # (args, environment, words the one line must hold)
    ([], {"GATEWAY_MAX_FRAME_SIZE": "4MB"}, ["GATEWAY_MAX_FRAME_SIZE", "'4MB'", "MiB"]),
    ([], {"GATEWAY_COMPRESSION": "maybe"}, ["GATEWAY_COMPRESSION", "'maybe'", "true or false"]),
    ([], {"PORT": "abc"}, ["PORT", "'abc'", "port number"]),
    (["--amqp-url", "127.0.0.1:5672"], {}, ["--amqp-url", "'127.0.0.1:5672'", "amqp://"]),
    (["--amqp-url", "http://guest:hunter2@broker/"], {}, ["--amqp-url", "http://guest:******@broker/", "amqps://"]),
    ([], {"AMQP_URL": "amqp://guest:hunter2@broker:99999/"}, ["AMQP_URL", "******", "port"]),
    (["--max-frame-size", "-5"], {}, ["--max-frame-size", "'-5'", "size"]),
    (["--max-outbound-buffer", "0"], {}, ["--max-outbound-buffer", "'0'", "at least 1 byte"]),
    (["--log-level", "VERBOSE"], {}, ["--log-level", "'VERBOSE'", "DEBUG, INFO, WARNING, ERROR"]),
    (["--port", "70000"], {}, ["--port", "'70000'", "0 to 65535"]),
    (["--login-timeout", "0"], {}, ["--login-timeout", "'0'", "greater than 0"]),
    (["--workers", "0"], {}, ["--workers", "'0'", "at least 1"]),
    ([], {"GATEWAY_MAX_HEADERS": "ten"}, ["GATEWAY_MAX_HEADERS", "'ten'", "whole number"]),
    (["--certfile", "/nonexistent/cert.pem", "--keyfile", "/nonexistent/key.pem"], {},
     ["--certfile", "/nonexistent/cert.pem", "no such file"]),
    (["--certfile", NOT_A_CERTIFICATE, "--keyfile", NOT_A_CERTIFICATE], {}, ["--certfile", "README.md", "PEM"]),
    (["--certfile", NOT_A_CERTIFICATE], {}, ["--certfile and --keyfile go together"]),
    (["--with-stock-daemon"], {"STOCK_SYMBOLS": "AAPL:abc"}, ["--with-stock-daemon", "STOCK_SYMBOLS"]),
    (["--no-such-flag"], {}, ["--no-such-flag"]),
    (["--workers", "2"], {}, ["--workers", "RabbitMQ"]),
]


@pytest.mark.parametrize(("args", "env", "words"), BAD, ids=[" ".join(a) or next(iter(e)) for a, e, _ in BAD])
async def test_a_bad_setting_is_one_line_and_exit_2(args: list[str], env: dict[str, str], words: list[str]) -> None:
    code, lines = await gateway_fails(*args, env=env)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("stomp-gateway: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "hunter2" not in lines[0]


@pytest.mark.parametrize(
    ("text", "size"),
    [("65536", 65536), ("64KiB", 65536), ("4MiB", 4 * 1024 * 1024), ("4 mib", 4 * 1024 * 1024), ("1GiB", 2**30)],
)
def test_sizes_take_bytes_or_binary_units(text: str, size: int) -> None:
    assert parse_args([], {"GATEWAY_MAX_FRAME_SIZE": text}).max_frame_size == size
    assert parse_args(["--max-outbound-buffer", text], {}).max_outbound_buffer == size


@pytest.mark.parametrize(("text", "value"), [("yes", True), ("ON", True), ("1", True), ("False", False), ("off", False)])
def test_booleans_take_the_usual_words(text: str, value: bool) -> None:
    assert parse_args([], {"GATEWAY_COMPRESSION": text}).compression is value


def test_config_error_is_a_usage_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(["--max-frame-size", "lots"], {})
    assert info.value.code == 2 and "--max-frame-size" in info.value.message


async def test_each_listener_names_its_own_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = await gateway_fails("--broker", "memory", "--tcp-port", str(port))
        assert code == 1 and len(lines) == 1, lines
        assert f"STOMP over TCP (--tcp-port) on 127.0.0.1:{port}" in lines[0], lines
        code, lines = await gateway_fails("--broker", "memory", "--port", str(port))
        assert code == 1 and len(lines) == 1, lines
        assert f"WebSocket/HTTP (--port) on 127.0.0.1:{port}" in lines[0], lines


async def test_a_broker_that_never_answers_times_out_with_a_reason() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts TCP, never speaks AMQP
    port = silent.getsockname()[1]
    try:
        code, lines = await gateway_fails("--amqp-url", f"amqp://guest:hunter2@127.0.0.1:{port}/", timeout=40)
    finally:
        silent.close()
    assert code == 1 and len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0] and "did not complete the AMQP handshake within 10 s" in lines[0]
    assert "hunter2" not in lines[0]


def test_free_port_helper_is_shared() -> None:
    assert 0 < free_port() < 65536


def test_the_readme_table_is_the_settings_table() -> None:
    from gateway.config import markdown_table

    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README.md's configuration table differs from gateway/config.py: paste markdown_table()"


# --- One definition per setting ---------------------------------------------------------------------------


def _not_taken(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.name not in {c.name for c in dataclasses.fields(Config)}}


def test_each_layers_settings_are_config_settings_with_their_defaults() -> None:
    # Limits, SessionSettings and ConnectionSettings name Config fields: nothing of their own but the nesting,
    # close_timeout (no setting) and what the gateway makes of several settings at start (the token policy,
    # read from the key files; its own broker login, from --amqp-url), and a default of their own would
    # differ from Config's here.
    assert _not_taken(Limits) == set()
    assert _not_taken(SessionSettings) == {"tokens"}
    assert _not_taken(ConnectionSettings) == {"limits", "session", "close_timeout", "gateway_credentials"}
    assert _not_taken(ContinuitySettings) == set()
    for cls in (Limits, SessionSettings, ConnectionSettings, ContinuitySettings):
        built = cls()
        for f in dataclasses.fields(cls):
            if f.name in {c.name for c in dataclasses.fields(Config)}:
                assert getattr(built, f.name) == getattr(Config(), f.name), (cls.__name__, f.name)


def test_the_gateway_derives_every_layers_settings_from_its_config() -> None:
    changed = {
        "max_frame_size": 1000, "max_frame_size_unauthenticated": 10, "max_headers": 7, "max_header_line": 9,
        "default_login": "l", "default_passcode": "p", "default_vhost": "v", "heartbeat_min": 1,
        "heartbeat_max": 2, "topic_exchange": "t", "max_subscriptions": 3, "max_transactions": 4,
        "max_transaction_frames": 5, "max_transaction_bytes": 6, "server_name": "s", "shared_fanout": False,
        "login_timeout": 1.5, "max_outbound_buffer": 11, "max_conflate_interval": 2.5, "stream_prefetch": 12,
        "queue_type": "quorum",
    }
    config = dataclasses.replace(Config(broker="memory"), **changed)
    settings = Gateway(config).connection_settings
    seen = {
        **dataclasses.asdict(settings.limits),
        **{k: v for k, v in dataclasses.asdict(settings.session).items() if k != "tokens"},
        "login_timeout": settings.login_timeout,
        "max_outbound_buffer": settings.max_outbound_buffer,
    }
    assert seen == changed
    assert settings.max_conflate_interval == 2.5
    derived = derive(ConnectionSettings, config)
    derived.gateway_credentials = ("l", "p")  # the embedded broker's login: the default login
    assert derived == settings


def test_the_shared_bindings_take_the_continuity_settings_from_the_config() -> None:
    changed = {
        "retain": ["a", "b"], "retain_max_keys": 3, "retain_max_bytes": 4, "history_size": 5, "history_ttl": 6.5,
        "history_max_bytes": 7, "default_login": "l", "default_passcode": "p", "default_vhost": "v",
    }
    registry = Gateway(dataclasses.replace(Config(broker="memory"), **changed)).registry
    assert dataclasses.asdict(registry.settings) == changed
    assert list(registry.retainers) == ["a", "b"]


# --- /info.json: what the page learns from the server ----------------------------------------------------


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def _info_of_a_gateway(*args: str, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Run ``python -m gateway`` with ``env`` (and no other GATEWAY_/STOCK_ variable); its /info.json and log."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "STOCK_"))}
    environ.pop("AMQP_URL", None)
    environ.update(env)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--port", str(port), *args,
        cwd=ROOT, env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await wait_for_port(port)
        status, body = await asyncio.to_thread(_http_get, port, "/info.json")
        assert status == 200, body
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), 15)
    return json.loads(body), out.decode() + f"\nport {port}"


async def test_info_json_tells_the_page_the_daemons_symbols_and_destinations() -> None:
    info, _ = await _info_of_a_gateway("--broker", "memory", env={})
    assert info == {
        "broker": "the embedded broker",
        "ticker": {
            "symbols": list(DEFAULT_SYMBOLS),
            "destination_prefix": "/exchange/stocks/",
            "snapshot_destination": "/queue/stocks.snapshot",
        },
    }


@pytest.mark.skipif(not rabbitmq_running(), reason="RabbitMQ is not running on 127.0.0.1:5672")
async def test_info_json_follows_the_daemons_variables_and_never_names_a_host_port_or_user() -> None:
    env = {"STOCK_SYMBOLS": "ibm=120,TSLA=250.5", "STOCK_EXCHANGE": "ticks/eu", "AMQP_URL": AMQP_URL}
    info, log = await _info_of_a_gateway("--default-login", "guest", env=env)
    assert info["broker"] == "RabbitMQ"
    assert info["ticker"] == {
        "symbols": ["IBM", "TSLA"],
        "destination_prefix": "/exchange/ticks%2Feu/",  # a destination, escaped as the gateway parses it
        "snapshot_destination": "/queue/stocks.snapshot",
    }
    text = json.dumps(info)
    port = log.rsplit("port ", 1)[1]
    for secret in ("127.0.0.1", "5672", port, "guest", "amqp", "localhost"):
        assert secret not in text, secret


async def test_bad_daemon_variables_leave_the_page_without_a_ticker_and_are_logged() -> None:
    info, log = await _info_of_a_gateway("--broker", "memory", env={"STOCK_SYMBOLS": "AAPL:abc"})
    assert info == {"broker": "the embedded broker"}
    assert "STOCK_SYMBOLS" in log and "/info.json" in log
