"""One client's burst must not hold up the others: a WebSocket message of 50,000 SENDs is parsed and handled a
slice at a time (issue 8). A real gateway process (so that the test's own clients do not share its event loop),
real WebSockets, both backends."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import AMQP_URL, rabbitmq_running
from tests.integration.test_process import free_port, run_gateway, wait_for_port
from tests.stomp_client import frame, open_ws


@pytest.mark.parametrize("backend", ["memory", "rabbitmq"])
async def test_a_burst_of_sends_does_not_hold_up_other_sessions(backend: str, unique: str) -> None:
    if backend == "rabbitmq" and not rabbitmq_running():
        pytest.skip("RabbitMQ is not running")
    port = free_port()
    args = ["--port", str(port), "--log-level", "WARNING", "--max-frame-size", "16MiB"]
    args += ["--amqp-url", AMQP_URL] if backend == "rabbitmq" else ["--broker", "memory"]
    process = await run_gateway(*args)
    try:
        await wait_for_port(port)
        url = f"ws://127.0.0.1:{port}/ws"
        victim = await open_ws(url)
        burster = await open_ws(url)
        await victim.connect()
        await burster.connect()
        await victim.send(frame("SUBSCRIBE", destination=f"/topic/fair.{unique}", id="1", receipt="r"))
        await victim.receipt("r")
        one = frame("SEND", "x" * 100, destination=f"/topic/fair.{unique}.burst").serialize("1.2")
        last = frame("SEND", "x", destination=f"/topic/fair.{unique}.burst", receipt="end").serialize("1.2")

        async def round_trip(i: int) -> float:
            started = time.perf_counter()
            await victim.send(frame("SEND", str(i), destination=f"/topic/fair.{unique}"))
            await victim.receive_command("MESSAGE", timeout=10)
            return time.perf_counter() - started

        idle = sorted([await round_trip(i) for i in range(20)])
        during: list[float] = []

        async def probe() -> None:
            for i in range(10_000):
                during.append(await round_trip(i))
                await asyncio.sleep(0.002)

        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.05)
        sent = time.perf_counter()
        await burster.send(one * 49_999 + last)
        await burster.receipt("end", timeout=60)
        handled = time.perf_counter() - sent
        prober.cancel()
        during.sort()
        summary = (
            f"idle max {idle[-1] * 1000:.1f} ms; during the burst ({handled * 1000:.0f} ms) "
            f"{len(during)} round trips, p50 {during[len(during) // 2] * 1000:.1f} max {during[-1] * 1000:.1f} ms"
        )
        print(summary)
        # Parsed whole, the burst held the gateway 100-240 ms on the project's machine; a slice is ~1 ms (the
        # slicing itself is checked without timing in tests/unit/test_connection.py). The bound here is for
        # gross stalls only: a loaded CI machine shows single outliers near 200 ms (a GC pass, the scheduler).
        assert len(during) >= 5 and during[len(during) // 2] < 0.05 and during[-1] < 0.5, summary
        await victim.close()
        await burster.close()
    finally:
        process.terminate()
        await process.wait()
