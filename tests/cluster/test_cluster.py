"""Several gateways on a 3-node RabbitMQ cluster, with real processes (issue 12).

* A message published through gateway A reaches a subscriber on gateway B.
* A node stops under load: no receipted SEND to a quorum ``/queue`` is lost, and ``ack:auto`` subscribers
  keep receiving on the same STOMP connection (their sessions move to another node within 2 s).
* Gateway A is killed: its clients reconnect through HAProxy, land on gateway B and resume their durable
  subscription without losing a message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import re
import time
import uuid

import pytest

from tests.cluster.conftest import GatewayProcess, HAProxy, http_status
from tests.rabbit_cluster import RabbitCluster
from tests.stomp_client import StompClient, frame, open_ws

pytestmark = pytest.mark.cluster


def _unique() -> str:
    return uuid.uuid4().hex[:10]


async def _connected(url: str) -> tuple[StompClient, str]:
    client = await open_ws(url)
    connected = await client.connect(login="guest", passcode="guest")
    return client, connected.get("server") or ""


async def _subscribe(client: StompClient, destination: str, sub_id: str, **headers: str) -> None:
    await client.send(frame("SUBSCRIBE", destination=destination, id=sub_id, receipt=f"sub-{sub_id}", **headers))
    await client.receipt(f"sub-{sub_id}", timeout=15)


async def test_a_publish_through_gateway_a_reaches_a_subscriber_on_gateway_b(gateways: list[GatewayProcess]) -> None:
    a, b = gateways
    unique = _unique()
    subscriber, server = await _connected(b.ws_url)
    publisher, _ = await _connected(a.ws_url)
    try:
        assert server == "gw-b"
        await _subscribe(subscriber, f"/topic/across-{unique}", "t")
        await _subscribe(subscriber, f"/queue/across-{unique}", "q")
        await publisher.send(frame("SEND", "to the topic", destination=f"/topic/across-{unique}", receipt="1"))
        await publisher.receipt("1")
        await publisher.send(frame("SEND", "to the queue", destination=f"/queue/across-{unique}", receipt="2"))
        await publisher.receipt("2")
        bodies = {(await subscriber.receive_command("MESSAGE", timeout=10)).body for _ in range(2)}
        assert bodies == {b"to the topic", b"to the queue"}
    finally:
        await subscriber.close()
        await publisher.close()


class Receiver:
    """A subscriber that records when each message arrived and whether its connection ever broke."""

    def __init__(self, client: StompClient) -> None:
        self.client = client
        self.arrivals: list[float] = []
        self.bodies: list[bytes] = []
        self.errors: list[str] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                received = await self.client.receive(timeout=60)
            except TimeoutError:
                continue
            if received.command == "MESSAGE":
                self.arrivals.append(time.monotonic())
                self.bodies.append(received.body)
            elif received.command == "ERROR":
                self.errors.append(f"{received.get('message')}: {received.body.decode(errors='replace')}")

    def since(self, moment: float) -> int:
        return sum(1 for t in self.arrivals if t > moment)

    def largest_gap(self, start: float, end: float) -> float:
        times = [start] + [t for t in self.arrivals if start < t < end] + [end]
        return max(b - a for a, b in itertools.pairwise(times))


class ReceiptedPublisher:
    """SENDs with a receipt each, at most ``window`` unanswered; records which were receipted."""

    def __init__(self, client: StompClient, destination: str, name: str, window: int = 10) -> None:
        self.client = client
        self.destination = destination
        self.name = name
        self.window = asyncio.Semaphore(window)
        self.sent: dict[str, str] = {}  # receipt id -> body
        self.receipted: set[str] = set()
        self.errors: list[str] = []
        self.stop = asyncio.Event()
        self.reader = asyncio.create_task(self._read())
        self.writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        count = 0
        while not self.stop.is_set() and not self.errors:
            await self.window.acquire()
            count += 1
            body = f"{self.name}-{count}"
            self.sent[str(count)] = body
            try:
                await self.client.send(frame("SEND", body, destination=self.destination, receipt=str(count)))
            except Exception as exc:  # the connection closed: the ERROR (if any) says why
                self.errors.append(f"send failed: {exc!r}")
                return
            await asyncio.sleep(0.005)

    async def _read(self) -> None:
        while True:
            received = await self.client.receive(timeout=120)
            if received.command == "RECEIPT":
                self.receipted.add(self.sent[received.get("receipt-id") or ""])
                self.window.release()
            elif received.command == "ERROR":
                self.errors.append(f"{received.get('message')}: {received.body.decode(errors='replace')}")

    async def finish(self, timeout: float = 20) -> None:
        """Stop sending; wait for the receipts of what was sent (or an ERROR)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        while (
            not self.writer.done() or len(self.receipted) < len(self.sent)
        ) and not self.errors and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.writer.cancel()
        self.reader.cancel()


def _busiest_node(gateway: GatewayProcess) -> int:
    """The index of the node on which ``gateway`` opened the most session connections (its log says)."""
    found = re.findall(r"AMQP connection for user 'guest' opened on node (\d+)/", gateway.log_tail(200_000))
    assert found, "the gateway logged no AMQP connection"
    return int(collections.Counter(found).most_common(1)[0][0]) - 1


async def test_a_node_stopping_under_load_loses_no_receipted_send_and_auto_ack_subscribers_keep_receiving(
    gateways: list[GatewayProcess], rabbit_cluster: RabbitCluster
) -> None:
    a, b = gateways
    unique = _unique()
    topic, feed, load = f"/topic/ticks-{unique}", f"/queue/feed-{unique}", f"/queue/load-{unique}"
    clients: list[StompClient] = []

    async def client_on(gateway: GatewayProcess) -> StompClient:
        client, _ = await _connected(gateway.ws_url)
        clients.append(client)
        return client

    stopped = None
    try:
        topic_receivers, feed_receivers = [], []
        for i in range(6):  # shared fan-out subscribers, spread over gateway A's AMQP connections
            client = await client_on(a)
            await _subscribe(client, topic, f"t{i}")
            topic_receivers.append(Receiver(client))
        for i in range(2):  # auto-ack consumers of a quorum queue (--queue-type quorum)
            client = await client_on(a)
            await _subscribe(client, feed, f"f{i}")
            feed_receivers.append(Receiver(client))
        publishers = [ReceiptedPublisher(await client_on(a), load, f"p{i}") for i in range(3)]
        ticker = await client_on(b)

        async def tick() -> None:
            n = 0
            while True:
                n += 1
                await ticker.send(frame("SEND", f"tick-{n}", destination=topic))
                await ticker.send(frame("SEND", f"feed-{n}", destination=feed))
                await asyncio.sleep(0.02)

        ticking = asyncio.create_task(tick())
        await asyncio.sleep(2)
        assert all(r.arrivals for r in topic_receivers + feed_receivers), "nothing flows before the stop"

        stopped = rabbit_cluster.nodes[_busiest_node(a)]
        stop_started = time.monotonic()
        await asyncio.to_thread(rabbit_cluster.stop_node, stopped)
        stop_done = time.monotonic()
        assert http_status(a.port, "/readyz") == 200 and http_status(b.port, "/readyz") == 200
        await asyncio.sleep(4)
        ticking.cancel()
        for publisher in publishers:
            await publisher.finish()

        for receiver in topic_receivers + feed_receivers:
            assert not receiver.errors, receiver.errors
            assert not receiver.client.closed.is_set(), "a subscriber's connection was closed"
            assert receiver.since(stop_done + 1) > 0, "a subscriber stopped receiving after the node stopped"
        gaps = [r.largest_gap(stop_started, stop_done + 3) for r in topic_receivers]
        assert max(gaps) < 2.0, f"longest pause of a /topic subscriber across the node stop: {max(gaps):.2f} s"
        for publisher in publishers:
            assert not publisher.errors, publisher.errors
            assert publisher.receipted, "a publisher got no receipt"
        # every session on the stopped node moved: the subscribers, and the publishers (whose unconfirmed
        # SENDs were published again on the new node)
        moved = a.log_tail(400_000).count("moved to another broker node")
        assert moved >= len(topic_receivers) + len(feed_receivers) + len(publishers), a.log_tail()

        # Every receipted SEND is in the quorum queue (some may be there twice: published again after the loss).
        drain = await client_on(b)
        await _subscribe(drain, load, "drain")
        got: set[str] = set()
        receipted = set().union(*(p.receipted for p in publishers))
        deadline = time.monotonic() + 30
        while not receipted <= got and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                message = await drain.receive(timeout=2)
                got.add(message.body.decode())
        lost = receipted - got
        assert not lost, f"{len(lost)} of {len(receipted)} receipted SENDs lost, e.g. {sorted(lost)[:5]}"
    finally:
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__.startswith(("Receiver.", "ReceiptedPublisher.", "test_a_node_stopping")) and task is not asyncio.current_task():
                task.cancel()
        for client in clients:
            await client.close()
        if stopped is not None:
            await asyncio.to_thread(rabbit_cluster.start_node, stopped)


async def _connect_through(balancer: HAProxy, want: str | None = None, within: float = 15) -> tuple[StompClient, str]:
    """A session through HAProxy (on gateway ``want`` if given: leastconn decides, so try a few times)."""
    deadline = time.monotonic() + within
    while True:
        try:
            client, server = await _connected(balancer.ws_url)
        except (OSError, TimeoutError, AssertionError, Exception):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        if want is None or server == want:
            return client, server
        await client.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"HAProxy never sent a client to {want}")


async def test_a_killed_gateways_clients_reconnect_through_haproxy_to_the_other_and_resume(
    gateways: list[GatewayProcess], haproxy: HAProxy
) -> None:
    a, b = gateways
    deadline = time.monotonic() + 10
    while http_status(a.port, "/readyz") != 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.5)  # HAProxy's checks (rise 2, every second) see A up
    unique = _unique()
    destination = f"/topic/resume-{unique}"
    durable = {"durable": "true", "auto-delete": "false", "ack": "client-individual"}
    client, server = await _connect_through(haproxy, want="gw-a")
    publisher, _ = await _connected(b.ws_url)
    received: set[str] = set()
    total = 60
    try:
        await _subscribe(client, destination, "resume", **durable)

        async def publish() -> None:
            for n in range(1, total + 1):
                await publisher.send(frame("SEND", str(n), destination=destination, persistent="true"))
                await asyncio.sleep(0.03)

        publishing = asyncio.create_task(publish())

        async def take(c: StompClient, until: int) -> None:
            while len(received) < until:
                message = await c.receive_command("MESSAGE", timeout=10)
                received.add(message.body.decode())
                await c.send(frame("ACK", id=message.get("ack") or ""))

        await take(client, 10)
        a.kill()
        await asyncio.wait_for(client.closed.wait(), 10)

        client, server = await _connect_through(haproxy)
        assert server == "gw-b", f"reconnected to {server}"
        await _subscribe(client, destination, "resume", **durable)
        await take(client, total)
        await publishing
        assert received == {str(n) for n in range(1, total + 1)}
        await client.send(frame("UNSUBSCRIBE", id="resume", durable="true", receipt="gone"))
        await client.receipt("gone")
    finally:
        await client.close()
        await publisher.close()
        a.ensure_running()
