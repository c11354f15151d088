"""The stock daemon against a real RabbitMQ that goes away and comes back (through a cuttable proxy)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway.broker.amqp import AmqpBroker
from gateway.broker.base import Delivery
from stock_daemon.daemon import DaemonConfig, StockDaemon
from tests.conftest import AMQP_URL, rabbitmq_running
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.skipif(not rabbitmq_running(), reason="RabbitMQ is not running on 127.0.0.1:5672")


async def test_daemon_survives_a_broker_outage_and_keeps_its_prices(unique: str) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    exchange = "stocks"  # the daemon's own durable topic exchange; a symbol of our own keeps the test apart
    symbol = "T" + unique[:6].upper()
    daemon_broker = AmqpBroker(AMQP_URL.replace(":5672", f":{proxy.port}"))
    await daemon_broker.start()
    observer = AmqpBroker(AMQP_URL)  # watches the ticks directly, not through the proxy
    await observer.start()
    stop = asyncio.Event()
    try:
        watch = await observer.open_channel(await observer.authenticate("guest", "guest", "/"))
        await watch.declare_exchange(exchange, "topic", durable=True)
        queue = await watch.declare_queue("", exclusive=True, auto_delete=True)
        await watch.bind_queue(queue, exchange, symbol)
        ticks: asyncio.Queue[dict[str, object]] = asyncio.Queue()

        def on_tick(delivery: Delivery) -> None:
            ticks.put_nowait(json.loads(delivery.body))

        await watch.consume(queue, on_tick, no_ack=True)

        config = DaemonConfig(
            symbols={symbol: 9500},
            min_interval=0.05,
            max_interval=0.1,
            exchange=exchange,
            snapshot_queue=f"stocks.snapshot-{unique}",
            reconnect_initial=0.2,
            reconnect_max=1.0,
            seed=3,
        )
        principal = await daemon_broker.authenticate(*("guest", "guest", "/"))
        daemon = StockDaemon(daemon_broker, principal, config)
        task = asyncio.create_task(daemon.run(stop))

        before = await asyncio.wait_for(ticks.get(), 10)
        channel_before = daemon.channel
        await proxy.cut()
        await asyncio.sleep(1.0)
        while not ticks.empty():  # ticks published just before the cut
            before = ticks.get_nowait()
        last_price = before["price"]
        await proxy.restore()

        deadline = time.monotonic() + 20
        after = await asyncio.wait_for(ticks.get(), 20)
        assert time.monotonic() < deadline
        # The walk carried on from where it was: one tick moves at most $1.50, never back to the opening price.
        assert abs(float(after["price"]) - float(last_price)) <= 1.5 + 1e-9  # type: ignore[arg-type]
        assert after["symbol"] == symbol
        assert daemon.channel is not None and daemon.channel is not channel_before  # it really reconnected
        stop.set()
        await asyncio.wait_for(task, 10)
        await watch.delete_queue(f"stocks.snapshot-{unique}")
    finally:
        stop.set()
        await daemon_broker.close()
        await observer.close()
        await proxy.cut()
