"""/metrics scraped from a gateway under real traffic: in process on both backends, and from a real
``--workers 2`` gateway whose scrape sums both workers (issue 11)."""

from __future__ import annotations

import asyncio
import http.client
import re

import pytest

from gateway.fanout import LATENCY_SAMPLE_MASK
from gateway.server import Gateway
from tests.conftest import AMQP_URL, rabbitmq_running
from tests.integration.test_process import free_port, run_gateway, wait_for_port
from tests.stomp_client import StompClient, frame, open_ws

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


async def traffic(url: str, unique: str, clients: list[StompClient]) -> None:
    """Two subscribers on one topic (shared fan-out), a publisher, a failed login and an ERROR."""
    subscribers = []
    for n in range(2):
        c = await open_ws(url)
        clients.append(c)
        await c.connect()
        await c.send(frame("SUBSCRIBE", destination=f"/topic/m.{unique}", id=str(n), receipt="r"))
        await c.receipt("r")
        subscribers.append(c)
    publisher = await open_ws(url)
    clients.append(publisher)
    await publisher.connect()
    for i in range(10):
        await publisher.send(frame("SEND", f"m{i}", destination=f"/topic/m.{unique}"))
    for c in subscribers:
        for _ in range(10):
            await c.receive_command("MESSAGE")
    bad = await open_ws(url)
    await bad.send(frame("CONNECT", accept_version="1.2", login="nobody", passcode="wrong", host="/"))
    await bad.receive_command("ERROR")
    await bad.close()
    await publisher.send(frame("SEND", destination="/nowhere"))
    await publisher.receive_command("ERROR")


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_under_traffic(
    gateway: Gateway, ws_url: str, backend: str, unique: str, clients: list[StompClient]
) -> None:
    assert gateway.port is not None
    before = await asyncio.to_thread(scrape, gateway.port)
    await traffic(ws_url, unique, clients)
    after = await asyncio.to_thread(scrape, gateway.port)
    assert delta(after, before, 'stomp_gateway_frames_received_total{command="SEND"}') == 11
    assert delta(after, before, 'stomp_gateway_frames_received_total{command="SUBSCRIBE"}') == 2
    assert delta(after, before, 'stomp_gateway_frames_sent_total{command="MESSAGE"}') == 20
    assert delta(after, before, "stomp_gateway_messages_published_total") == 10
    assert delta(after, before, "stomp_gateway_messages_delivered_total") == 20
    assert delta(after, before, 'stomp_gateway_error_frames_sent_total{reason="Bad CONNECT"}') == 1
    assert delta(after, before, 'stomp_gateway_error_frames_sent_total{reason="Unknown destination"}') == 1
    assert delta(after, before, "stomp_gateway_login_failures_total") == 1
    assert delta(after, before, "stomp_gateway_received_bytes_total") > 10 * 20
    assert delta(after, before, "stomp_gateway_sent_bytes_total") > 20 * 20
    assert after['stomp_gateway_sessions{state="connected",version="1.2"}'] >= 2
    assert after['stomp_gateway_connections{transport="websocket"}'] >= 2  # the publisher's ERROR closed it
    assert after["stomp_gateway_fanout_groups"] >= 1 and after["stomp_gateway_fanout_subscribers"] >= 2
    # one delivery in eight of a shared subscription is timed: the 8th of these 10
    assert delta(after, before, "stomp_gateway_delivery_latency_seconds_count") == 10 // (LATENCY_SAMPLE_MASK + 1)
    assert after["stomp_gateway_broker_up"] == 1
    if backend == "rabbitmq":
        assert after["stomp_gateway_amqp_connections"] >= 1 and after["stomp_gateway_amqp_channels"] >= 1
    assert "process_resident_memory_bytes" in after and "python_info" in " ".join(after)


@pytest.mark.skipif(not rabbitmq_running(), reason="RabbitMQ is not running")
async def test_workers_are_summed(unique: str, clients: list[StompClient]) -> None:
    port = free_port()
    process = await run_gateway("--port", str(port), "--workers", "2", "--amqp-url", AMQP_URL)
    try:
        await wait_for_port(port)
        url = f"ws://127.0.0.1:{port}/ws"
        for _ in range(12):  # SO_REUSEPORT spreads them over both workers
            c = await open_ws(url)
            clients.append(c)
            await c.connect()
        await asyncio.sleep(1.5)  # each worker flushes its tallies once a second
        for _ in range(6):  # whichever worker answers, the scrape is the sum of both
            samples = await asyncio.to_thread(scrape, port)
            assert samples['stomp_gateway_connections{transport="websocket"}'] == 12, samples
            assert samples['stomp_gateway_sessions{state="connected",version="1.2"}'] == 12
            assert samples['stomp_gateway_frames_received_total{command="CONNECT"}'] == 12
        for c in clients:
            await c.close()
        clients.clear()
        await asyncio.sleep(1.5)
        samples = await asyncio.to_thread(scrape, port)
        assert samples['stomp_gateway_connections{transport="websocket"}'] == 0
        assert samples['stomp_gateway_connections_opened_total{transport="websocket"}'] == 12
    finally:
        process.terminate()
        await process.wait()
