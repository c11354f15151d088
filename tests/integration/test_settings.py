"""Every bad setting is one line on stderr and exit code 2, naming the flag or variable, the value and the form
expected; the real command (``python -m gateway``) is run for each (issue 11)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_args
from tests.integration.test_process import free_port

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
