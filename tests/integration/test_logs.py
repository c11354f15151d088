"""The gateway's log, read from a real gateway process: no secret at any level, one line per session end,
each ERROR at INFO, JSON on request, health probes and scrapes not logged (issue 11)."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import uuid

import pytest

from tests.conftest import rabbitmq_running
from tests.integration.test_process import free_port, run_gateway, wait_for_port
from tests.stomp_client import frame, open_ws


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def rabbit_user() -> tuple[str, str]:
    """A RabbitMQ user whose password appears nowhere else, so a leak cannot hide."""
    if not rabbitmq_running():
        pytest.skip("RabbitMQ is not running")
    user, password = f"gwlog-{uuid.uuid4().hex[:6]}", f"Pw{uuid.uuid4().hex}"
    _rabbitmqctl("add_user", user, password)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        _rabbitmqctl("delete_user", user)


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


async def _session_life(port: int, user: str, password: str) -> str:
    """One session that subscribes, sends, and ends with an ERROR; returns its session id."""
    client = await open_ws(f"ws://127.0.0.1:{port}/ws")
    connected = await client.connect(login=user, passcode=password)
    await client.send(frame("SUBSCRIBE", destination="/topic/logs.x", id="1", receipt="r"))
    await client.receipt("r")
    await client.send(frame("SEND", "hello", destination="/topic/logs.x"))
    await client.receive_command("MESSAGE")
    await client.send(frame("SEND", destination="/nowhere"))
    await client.receive_command("ERROR")
    await client.close()
    for path in ("/healthz", "/readyz", "/metrics"):
        assert await asyncio.to_thread(_get, port, path) == 200
    return connected.get("session") or ""


async def _run(args: list[str], user: str, password: str) -> tuple[str, str]:
    port = free_port()
    process = await run_gateway("--port", str(port), *args)
    try:
        await wait_for_port(port)
        session = await _session_life(port, user, password)
        await asyncio.sleep(0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 20)
    return err.decode(), session


async def test_no_secret_at_debug(rabbit_user: tuple[str, str]) -> None:
    user, password = rabbit_user
    log, _ = await _run(
        ["--log-level", "DEBUG", "--amqp-url", f"amqp://{user}:{password}@127.0.0.1:5672/"], user, password
    )
    assert "> CONNECT" in log or "CONNECT" in log  # the frames really were logged at DEBUG
    assert password not in log
    assert f"amqp://{user}:" not in log


async def test_json_lines_session_end_and_errors(rabbit_user: tuple[str, str]) -> None:
    user, password = rabbit_user
    log, session = await _run(
        ["--log-format", "json", "--amqp-url", f"amqp://{user}:{password}@127.0.0.1:5672/"], user, password
    )
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    errors = [e for e in entries if e.get("session") == session and e["message"].startswith(f"session {session}: ERROR")]
    assert errors and errors[0]["level"] == "INFO" and "Unknown destination" in errors[0]["message"]
    (end,) = [e for e in entries if e.get("session") == session and "ended after" in e["message"]]
    assert end["level"] == "INFO"
    assert end["user"] == user and end["vhost"] == "/" and end["version"] == "1.2"
    assert end["frames_in"] == 4 and end["messages_out"] == 1 and end["frames_out"] >= 4
    assert end["reason"] == "ERROR Unknown destination" and end["duration_s"] >= 0 and end["peer"].startswith("127.0.0.1:")
    assert not any("healthz" in e["message"] or "readyz" in e["message"] or "metrics" in e["message"] for e in entries)
    assert password not in log
