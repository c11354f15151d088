"""``python -m bench.amqp_pipe``: RabbitMQ's own share of the pipe scenario, without STOMP or WebSocket.

The pipe scenario of ``python -m bench`` relays, per message, one STOMP SEND into one ``basic.publish`` and one
``basic.deliver`` back into one MESSAGE. This runs the same pattern on AMQP alone, with the gateway's own AMQP
client (:mod:`gateway.broker.amqp_connection`, :mod:`gateway.broker.amqp_codec`): P publisher channels, each
publishing to ``amq.topic`` with a routing key of its own, at most W messages not yet delivered (topped up when
half came back, as the STOMP generator does), and P consumers (``no_ack``) on server-named exclusive queues,
all on one AMQP connection as the gateway's sessions share one. It prints the rate and what it cost RabbitMQ
in CPU: the CPU RabbitMQ needs per relayed message, whoever sits in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from bench.procs import cpu_seconds, pid_listening_on
from gateway.broker.amqp_codec import encode_publish
from gateway.broker.amqp_connection import (
    AmqpConnection,
    BasicConsume,
    ConnectionParameters,
    QueueBind,
    QueueDeclare,
)
from gateway.broker.base import MessageProperties


async def run(url: str, pairs: int, window: int, seconds: float, body_size: int) -> dict[str, Any]:
    connection = await AmqpConnection.connect(ConnectionParameters.from_url(url, heartbeat=0), timeout=10)
    loop = asyncio.get_running_loop()
    try:
        received = [0] * pairs
        wakers: list[asyncio.Event] = [asyncio.Event() for _ in range(pairs)]
        publishers = []
        for i in range(pairs):
            publisher = await connection.open_channel(connection.gate.take(connection.channels) or 0)
            consumer = await connection.open_channel(connection.gate.take(connection.channels) or 0)
            ok = await consumer.rpc(QueueDeclare(queue="", exclusive=True, auto_delete=True))
            key = f"bench.amqp-pipe.{i}"
            await consumer.rpc(QueueBind(queue=ok.queue, exchange="amq.topic", routing_key=key))

            def delivered(_deliver: Any, _props: Any, _body: bytes, i: int = i) -> None:
                received[i] += 1
                wakers[i].set()

            consumer.add_consumer(f"pipe-{i}", delivered)
            await consumer.rpc(BasicConsume(queue=ok.queue, consumer_tag=f"pipe-{i}", no_ack=True))
            publishers.append((publisher, key))
        props = MessageProperties(content_type="text/plain", headers={"seq": "0", "ts": "0"})
        body = b"x" * body_size
        end = loop.time() + seconds

        async def pair(i: int) -> int:
            publisher, key = publishers[i]
            sent = 0
            while loop.time() < end:
                free = window - (sent - received[i])
                if free > 0:
                    frame = encode_publish(
                        publisher.number, "amq.topic", key, props, body, publisher.max_content, publisher.max_content
                    )
                    publisher.publish(frame * free)
                    sent += free
                while sent - received[i] > window // 2 and loop.time() < end:
                    wakers[i].clear()
                    try:
                        await asyncio.wait_for(wakers[i].wait(), 1)
                    except TimeoutError:
                        break
            return received[i]

        rabbit = pid_listening_on(urlsplit(url).port or 5672)
        rabbit_before = cpu_seconds(rabbit) if rabbit is not None else None
        started, client_before = time.monotonic(), time.process_time()
        done = await asyncio.gather(*(pair(i) for i in range(pairs)))
        elapsed, client_cpu = time.monotonic() - started, time.process_time() - client_before
        rabbit_after = cpu_seconds(rabbit) if rabbit is not None else None
        rate = sum(done) / elapsed
        result: dict[str, Any] = {"pairs": pairs, "window": window, "messages_per_s": round(rate)}
        result["client_cpu_percent"] = round(100 * client_cpu / elapsed, 1)
        if rabbit_before is not None and rabbit_after is not None:
            rabbit_cpu = rabbit_after - rabbit_before
            result["rabbitmq_cpu_percent"] = round(100 * rabbit_cpu / elapsed, 1)
            result["rabbitmq_cpu_us_per_message"] = round(1e6 * rabbit_cpu / sum(done), 1) if sum(done) else None
        return result
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.amqp_pipe", description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--body-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import uvloop  # as the gateway runs

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    for n in range(args.rounds):
        result = runner(run(args.amqp_url, args.pairs, args.window, args.duration, args.body_size))
        print(f"round {n + 1}: {json.dumps(result)}")


if __name__ == "__main__":
    main()
