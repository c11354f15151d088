"""The command line and the process: flags, exit codes, signals, losing RabbitMQ and getting it back."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import sys
import time
from dataclasses import fields

import pytest

from gateway.config import Config, parse_args
from gateway.server import Gateway
from tests.conftest import AMQP_URL, make_config, rabbitmq_running
from tests.stomp_client import open_ws
from tests.tcp_proxy import TcpProxy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_gateway(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    environment = {k: v for k, v in os.environ.items() if k != "AMQP_URL"}
    environment.update(env or {})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        cwd=ROOT,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def healthz(port: int, path: str = "/healthz") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


async def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


class TestCommandLine:
    async def test_help_documents_every_flag_and_its_variable(self) -> None:
        process = await run_gateway("--help")
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0
        text = out.decode()
        for f in fields(Config):
            assert f.metadata["flag"] in text
            assert f.metadata["env"] in text

    def test_flags_win_over_environment(self) -> None:
        config = parse_args(
            ["--port", "9000"],
            {"PORT": "9100", "AMQP_URL": "amqp://u:p@h:1/", "GATEWAY_ALLOWED_ORIGINS": "https://a,https://b"},
        )
        assert config.port == 9000
        assert config.broker == "rabbitmq"
        assert config.allowed_origins == ["https://a", "https://b"]

    def test_no_amqp_url_means_the_embedded_broker(self) -> None:
        assert parse_args([], {}).broker == "memory"

    async def test_unreachable_rabbitmq_is_one_line_and_exit_1(self) -> None:
        dead = free_port()
        process = await run_gateway("--amqp-url", f"amqp://guest:guest@127.0.0.1:{dead}/", "--port", "0")
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert "cannot reach RabbitMQ" in lines[0]

    @pytest.mark.parametrize("backend", ["memory", "rabbitmq"])
    async def test_sigterm_shuts_down_cleanly(self, backend: str) -> None:
        if backend == "rabbitmq" and not rabbitmq_running():
            pytest.skip("RabbitMQ is not running")
        port = free_port()
        args = ["--port", str(port)]
        args += ["--amqp-url", AMQP_URL] if backend == "rabbitmq" else ["--broker", "memory"]
        process = await run_gateway(*args)
        try:
            await wait_for_port(port)
            client = await open_ws(f"ws://127.0.0.1:{port}/ws")
            await client.connect()
            process.send_signal(signal.SIGTERM)
            await client.wait_closed(10)
            await asyncio.wait_for(process.wait(), 15)
            assert process.returncode == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.mark.rabbitmq_only("the embedded broker lives in the gateway process and cannot be cut off from it")
async def test_losing_rabbitmq_and_getting_it_back(backend: str, unique: str) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    url = AMQP_URL.replace(":5672", f":{proxy.port}")
    gateway = Gateway(make_config("rabbitmq", amqp_urls=[url]))
    await gateway.start()
    assert gateway.port is not None
    try:
        client = await open_ws(f"ws://127.0.0.1:{gateway.port}/ws")
        await client.connect()
        await client.send(
            b"SUBSCRIBE\nid:1\ndestination:/topic/cut-" + unique.encode() + b"\nreceipt:r\n\n\x00"
        )
        await client.receipt("r")
        assert await asyncio.to_thread(healthz, gateway.port) == 200

        internals = (b"127.0.0.1", str(proxy.port).encode(), b"guest", b"amqp://", b"Exception", b"Channel")
        await proxy.cut()
        error = await client.receive_command("ERROR", timeout=10)
        assert error.get("message")
        assert not any(word in error.body for word in internals), error.body  # those are for the log
        await client.wait_closed()
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(healthz, gateway.port, "/readyz") != 503:
            assert time.monotonic() < deadline, "/readyz should answer 503 while RabbitMQ is unreachable"
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(healthz, gateway.port) == 200  # alive all along: no restart wanted
        await asyncio.sleep(5)  # long enough for a doubling back-off to grow past the 2 s below
        refused = await open_ws(f"ws://127.0.0.1:{gateway.port}/ws")
        await refused.send(b"CONNECT\naccept-version:1.2\n\n\x00")
        error = await refused.receive_command("ERROR", timeout=15)
        assert error.body == b"the message broker is unreachable"
        assert not any(word in error.body for word in internals), error.body
        await refused.close()

        await proxy.restore()
        restored = time.monotonic()
        while await asyncio.to_thread(healthz, gateway.port, "/readyz") != 200:
            assert time.monotonic() - restored < 2.5, "/readyz should be 200 within about 2 s of RabbitMQ's return"
            await asyncio.sleep(0.1)
        again = await open_ws(f"ws://127.0.0.1:{gateway.port}/ws")
        await again.connect()
        await again.send(
            b"SUBSCRIBE\nid:1\ndestination:/topic/cut-" + unique.encode() + b"\nreceipt:r\n\n\x00"
        )
        await again.receipt("r")
        await again.send(b"SEND\ndestination:/topic/cut-" + unique.encode() + b"\n\nback\x00")
        assert (await again.receive_command("MESSAGE")).body == b"back"
        await again.close()
    finally:
        await gateway.stop()
        await proxy.cut()


@pytest.mark.parametrize("script", ["stomp-gateway", "stock-daemon"])
async def test_console_scripts_are_installed(script: str) -> None:
    """`pip install .` (here the editable install of `make install`) provides both commands."""
    path = os.path.join(os.path.dirname(sys.executable), script)
    assert os.access(path, os.X_OK), f"{path} missing: the package's [project.scripts] were not installed"
    process = await asyncio.create_subprocess_exec(path, "--help", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert b"--amqp-url" in out


@pytest.mark.rabbitmq_only("several processes share RabbitMQ; the embedded broker lives in one process")
async def test_workers_share_the_port_and_rabbitmq(backend: str, unique: str) -> None:
    port = free_port()
    process = await run_gateway("--workers", "2", "--port", str(port), "--amqp-url", AMQP_URL)
    try:
        await wait_for_port(port)
        await asyncio.sleep(1.5)  # both workers listening
        clients = [await open_ws(f"ws://127.0.0.1:{port}/ws") for _ in range(16)]
        for c in clients:
            await c.connect()
        hubs: set[str] = set()  # the shared-subscription prefix of message-id differs per worker
        for i, c in enumerate(clients):
            await c.send(f"SUBSCRIBE\nid:{i}\ndestination:/topic/w-{unique}\nreceipt:r\n\n\x00".encode())
            await c.receipt("r")
        await clients[0].send(f"SEND\ndestination:/topic/w-{unique}\n\nto all\x00".encode())
        for c in clients:
            message = await c.receive_command("MESSAGE")
            assert message.body == b"to all"
            hubs.add(message.get("message-id", "").split("@@")[0])
        assert len(hubs) == 2, "16 connections should land on both workers (all on one: p = 2**-15)"
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_workers_need_rabbitmq() -> None:
    with pytest.raises(SystemExit, match="needs RabbitMQ"):
        parse_args(["--workers", "2"], {})
