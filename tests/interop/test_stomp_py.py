"""The third-party ``stomp.py`` library (8.x) over the gateway's plain STOMP TCP port, both backends.

stomp.py is blocking and threaded (a receiver thread calls the listener), so every test body runs in a
worker thread (``asyncio.to_thread``) while the gateway keeps running in the test's event loop. Every wait
is bounded: frames go into a :class:`queue.Queue` read with a timeout, and stomp.py's own unbounded waits
(``connect(wait=True)``, ``disconnect(receipt=...)``) are avoided or run in a thread that is joined with a
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import stomp

from gateway.server import Gateway

pytestmark = pytest.mark.interop

TIMEOUT = 5.0


@dataclass
class Received:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = ""


class Frames(stomp.ConnectionListener):  # type: ignore[misc]
    """Everything stomp.py's receiver thread hands the listener, in order, in a thread-safe queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Received] = queue.Queue()
        self.heartbeats = 0
        self._lock = threading.Lock()
        self._stash: list[Received] = []
        self.connected: Received | None = None

    def on_connected(self, frame: Any) -> None:
        self.queue.put(Received("CONNECTED", dict(frame.headers), frame.body))

    def on_message(self, frame: Any) -> None:
        self.queue.put(Received("MESSAGE", dict(frame.headers), frame.body))

    def on_receipt(self, frame: Any) -> None:
        self.queue.put(Received("RECEIPT", dict(frame.headers), frame.body))

    def on_error(self, frame: Any) -> None:
        self.queue.put(Received("ERROR", dict(frame.headers), frame.body))

    def on_disconnected(self) -> None:
        self.queue.put(Received("DISCONNECTED"))

    def on_heartbeat(self) -> None:
        with self._lock:
            self.heartbeats += 1

    def next(self, timeout: float = TIMEOUT) -> Received:
        if self._stash:
            return self._stash.pop(0)
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame within {timeout} s") from None

    def expect(self, command: str, timeout: float = TIMEOUT) -> Received:
        got = self.next(timeout)
        assert got.command == command, f"expected {command}, got {got}"
        return got

    def receipt(self, receipt_id: str, timeout: float = TIMEOUT) -> Received:
        """Wait for RECEIPT ``receipt_id``; other frames that come first stay queued for :meth:`next`."""
        skipped: list[Received] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                got = self.next(max(0.01, deadline - time.monotonic()))
                if got.command == "RECEIPT" and got.headers.get("receipt-id") == receipt_id:
                    return got
                assert got.command not in ("ERROR", "DISCONNECTED"), (
                    f"{got} while waiting for receipt {receipt_id}"
                )
                skipped.append(got)
        finally:
            self._stash = skipped + self._stash

    def nothing(self, wait: float = 0.3) -> None:
        assert not self._stash, f"unexpected {self._stash[0]}"
        try:
            got = self.queue.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected {got}")


@contextlib.contextmanager
def session(
    port: int, version: str = "1.2", *, connect: bool = True, vhost: str | None = "/", **options: Any
) -> Iterator[tuple[Any, Frames]]:
    """A stomp.py connection to the gateway's TCP port, its listener, and a forced close at the end.

    ``vhost="/"``: stomp.py 1.2 otherwise sends ``host:<hostname>`` and the gateway, like RabbitMQ, takes the
    host header as the virtual host (see :func:`test_host_header_is_the_vhost`).
    """
    cls = {"1.2": stomp.Connection12, "1.1": stomp.Connection11}[version]
    conn = cls([("127.0.0.1", port)], vhost=vhost, reconnect_attempts_max=1, **options)
    frames = Frames()
    conn.set_listener("frames", frames)
    try:
        if connect:
            # connect(wait=True) waits without a timeout; the listener's queue has one
            conn.connect("guest", "guest", wait=False)
            frames.connected = frames.expect("CONNECTED")
            assert frames.connected.headers["version"] == version
        yield conn, frames
    finally:
        conn.transport.disconnect_socket()  # idempotent; ends the receiver thread whatever the gateway did
        receiver = conn.transport.receiver_thread
        if receiver is not None:
            receiver.join(TIMEOUT)


def disconnect_with_receipt(conn: Any, frames: Frames, receipt: str) -> None:
    """``conn.disconnect(receipt=...)`` blocks until the receiver thread ends: run it in a bounded thread."""
    worker = threading.Thread(target=conn.disconnect, kwargs={"receipt": receipt}, daemon=True)
    worker.start()
    worker.join(TIMEOUT)
    assert not worker.is_alive(), "disconnect(receipt=...) did not return"
    # stomp.py closes the socket on the receipt, and tells the listener so before it passes on the RECEIPT
    got = [frames.next(), frames.next()]
    assert sorted(f.command for f in got) == ["DISCONNECTED", "RECEIPT"], got
    assert next(f for f in got if f.command == "RECEIPT").headers["receipt-id"] == receipt
    assert not conn.is_connected()


async def in_thread(fn: Callable[..., None], *args: Any, timeout: float = 20.0) -> None:
    await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout)


@pytest.fixture
def port(gateway: Gateway) -> int:
    assert gateway.tcp_port is not None
    return gateway.tcp_port


CUSTOM = "a:b\nc\\d"


@pytest.mark.parametrize("kind", ["queue", "topic"])
async def test_connect_subscribe_send_receive(port: int, unique: str, kind: str) -> None:
    destination = f"/queue/py-{unique}" if kind == "queue" else f"/topic/py.{unique}"

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(destination, id="s1", ack="auto", receipt="sub")
            frames.receipt("sub")
            conn.send(
                destination,
                "héllo wörld",
                content_type="text/plain",
                headers={"x-custom": CUSTOM},
                receipt="sent",
            )
            frames.receipt("sent")
            message = frames.expect("MESSAGE")
            assert message.body == "héllo wörld"
            assert message.headers["content-type"] == "text/plain"
            assert message.headers["x-custom"] == CUSTOM  # escaped by stomp.py, unescaped back by stomp.py
            assert message.headers["destination"] == destination
            assert message.headers["subscription"] == "s1"
            assert message.headers["content-length"] == str(len("héllo wörld".encode()))
            assert message.headers["redelivered"] == "false"
            assert message.headers["message-id"]
            frames.nothing()

    await in_thread(run)


async def test_client_individual_ack_and_nack(port: int, unique: str) -> None:
    destination = f"/queue/py-ack-{unique}"

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(destination, id="s1", ack="client-individual", receipt="sub")
            frames.receipt("sub")
            for body in ("m1", "m2"):
                conn.send(destination, body, receipt=f"sent-{body}")
                frames.receipt(f"sent-{body}")
            m1, m2 = frames.expect("MESSAGE"), frames.expect("MESSAGE")
            assert (m1.body, m2.body) == ("m1", "m2")
            assert m1.headers["ack"] and m1.headers["ack"] != m2.headers["ack"]
            # client-individual: acking m2 leaves m1 alone; the NACK requeues m1
            conn.ack(m2.headers["ack"], receipt="ack-m2")
            frames.receipt("ack-m2")
            conn.nack(m1.headers["ack"], receipt="nack-m1")
            frames.receipt("nack-m1")
            again = frames.expect("MESSAGE")
            assert again.body == "m1"
            assert again.headers["redelivered"] == "true"
            conn.ack(again.headers["ack"], receipt="ack-m1")
            frames.receipt("ack-m1")
            frames.nothing()
            disconnect_with_receipt(conn, frames, "bye")
        # both settled: a new session finds only what is sent now
        with session(port) as (conn, frames):
            conn.send(destination, "marker", receipt="sent")
            frames.receipt("sent")
            conn.subscribe(destination, id="s2", ack="auto")
            assert frames.expect("MESSAGE").body == "marker"
            frames.nothing()

    await in_thread(run)


async def test_frames_pipelined_behind_connect(port: int, unique: str) -> None:
    """Without ``wait=True`` stomp.py sends SUBSCRIBE and SEND before CONNECTED arrives."""
    destination = f"/queue/py-pipe-{unique}"

    def run() -> None:
        with session(port, connect=False) as (conn, frames):
            conn.connect("guest", "guest", wait=False)
            conn.subscribe(destination, id="s1", receipt="sub")
            conn.send(destination, "piped", receipt="sent")
            assert frames.expect("CONNECTED").headers["version"] == "1.2"
            frames.receipt("sub")
            frames.receipt("sent")
            assert frames.expect("MESSAGE").body == "piped"

    await in_thread(run)


async def test_durable_topic_subscription(port: int, unique: str) -> None:
    """RabbitMQ's durable topic subscriptions: ``durable:true``, ``auto-delete:false`` and a stable id."""
    destination = f"/topic/py-dur.{unique}"
    durable = {"durable": "true", "auto-delete": "false"}

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(destination, id=f"d-{unique}", headers=durable, receipt="sub")
            frames.receipt("sub")
            disconnect_with_receipt(conn, frames, "bye")
        with session(port) as (conn, frames):
            conn.send(destination, "while away", receipt="sent")
            frames.receipt("sent")
        with session(port) as (conn, frames):
            conn.subscribe(destination, id=f"d-{unique}", headers=durable, receipt="sub")
            frames.receipt("sub")
            assert frames.expect("MESSAGE").body == "while away"
            conn.unsubscribe(f"d-{unique}", headers={"durable": "true"}, receipt="gone")  # deletes the queue
            frames.receipt("gone")

    await in_thread(run)


async def test_unacked_message_returns_after_disconnect(port: int, unique: str) -> None:
    destination = f"/queue/py-unacked-{unique}"

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(destination, id="s1", ack="client-individual")
            conn.send(destination, "keep me", receipt="sent")
            frames.receipt("sent")
            assert frames.expect("MESSAGE").body == "keep me"
            disconnect_with_receipt(conn, frames, "bye")
        with session(port) as (conn, frames):
            conn.subscribe(destination, id="s1", ack="auto")
            message = frames.expect("MESSAGE")
            assert message.body == "keep me"
            assert message.headers["redelivered"] == "true"

    await in_thread(run)


async def test_receipts_and_disconnect_with_receipt(port: int, unique: str) -> None:
    destination = f"/topic/py-rcpt.{unique}"

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(destination, id="s1", receipt="r-sub")
            assert frames.expect("RECEIPT").headers == {"receipt-id": "r-sub"}
            conn.send(destination, "x", receipt="r-send")
            got = {frames.next().command, frames.next().command}  # the MESSAGE and the RECEIPT, either order
            assert got == {"MESSAGE", "RECEIPT"}
            conn.begin("t1", receipt="r-begin")
            frames.receipt("r-begin")
            conn.commit("t1", receipt="r-commit")
            frames.receipt("r-commit")
            conn.unsubscribe("s1", receipt="r-unsub")
            frames.receipt("r-unsub")
            conn.send(destination, "nobody listens", receipt="r-send2")
            frames.receipt("r-send2")
            frames.nothing()
            disconnect_with_receipt(conn, frames, "r-bye")
            frames.nothing()

    await in_thread(run)


async def test_transactions(port: int, unique: str) -> None:
    destination = f"/queue/py-tx-{unique}"

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(destination, id="s1", receipt="sub")
            frames.receipt("sub")
            conn.begin("t1")
            conn.send(destination, "in t1", transaction="t1")
            frames.nothing(0.3)
            conn.commit("t1")
            assert frames.expect("MESSAGE").body == "in t1"
            conn.begin("t2")
            conn.send(destination, "in t2", transaction="t2")
            conn.abort("t2")
            conn.send(destination, "after abort", receipt="sent")
            frames.receipt("sent")
            assert frames.expect("MESSAGE").body == "after abort"
            frames.nothing()

    await in_thread(run)


async def test_binary_body(port: int, unique: str) -> None:
    destination = f"/queue/py-bin-{unique}"
    body = bytes(range(256)) * 4

    def run() -> None:
        with session(port, auto_decode=False) as (conn, frames):
            conn.subscribe(destination, id="s1", receipt="sub")
            frames.receipt("sub")
            conn.send(destination, body, content_type="application/octet-stream")
            message = frames.expect("MESSAGE")
            assert message.body == body
            assert message.headers["content-length"] == str(len(body))

    await in_thread(run)


async def test_heart_beats(port: int) -> None:
    def run() -> None:
        with session(port, heartbeats=(1000, 1000)) as (conn, frames):
            assert frames.connected is not None
            assert frames.connected.headers["heart-beat"] == "1000,1000"
            time.sleep(2.8)  # the gateway gives up after 2000 ms without a client heart-beat
            assert conn.is_connected()
            assert frames.heartbeats >= 2
            frames.nothing(0.1)

    await in_thread(run)


async def test_error_for_missing_exchange(port: int, unique: str) -> None:
    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(f"/exchange/does-not-exist-{unique}", id="s1", receipt="sub")
            error = frames.expect("ERROR")
            assert error.headers["message"] == "not_found"
            assert error.body == f"no exchange 'does-not-exist-{unique}' in vhost '/'"
            assert error.headers["receipt-id"] == "sub"
            frames.expect("DISCONNECTED")  # the gateway closes the socket after the ERROR

    await in_thread(run)


async def test_host_header_is_the_vhost(port: int) -> None:
    """stomp.py 1.2 sends ``host:<hostname>`` unless given a vhost; like RabbitMQ, that names the vhost."""

    def run() -> None:
        with session(port, connect=False, vhost=None) as (conn, frames):
            conn.connect("guest", "guest", wait=False)
            error = frames.expect("ERROR")
            assert error.headers["message"] == "Bad CONNECT"
            assert error.body == "Virtual host '127.0.0.1' access denied"
            frames.expect("DISCONNECTED")

    await in_thread(run)


async def test_connection11(port: int, unique: str) -> None:
    destination = f"/queue/py11-{unique}"

    def run() -> None:
        with session(port, "1.1") as (conn, frames):
            conn.subscribe(destination, id="s1", ack="client-individual", receipt="sub")
            frames.receipt("sub")
            conn.send(destination, "eleven", content_type="text/plain", headers={"x-custom": "a:b\nc\\d"})
            message = frames.expect("MESSAGE")
            assert message.body == "eleven"
            assert message.headers["x-custom"] == "a:b\nc\\d"  # 1.1 escapes \n, : and \\ too
            assert "ack" not in message.headers  # 1.1 acks by message-id + subscription
            assert message.headers["subscription"] == "s1"
            conn.nack(message.headers["message-id"], "s1", receipt="nacked")
            frames.receipt("nacked")
            again = frames.expect("MESSAGE")
            assert again.headers["redelivered"] == "true"
            conn.ack(again.headers["message-id"], "s1", receipt="acked")
            frames.receipt("acked")
            frames.nothing()
            disconnect_with_receipt(conn, frames, "bye")

    await in_thread(run)


# RabbitMQ takes any UTF-8 queue or exchange name up to 255 bytes (so does its STOMP plugin, and so does the
# embedded broker). pamqp's commands, as most AMQP clients send them, check names on the client side against the AMQP grammar
# ^[a-zA-Z0-9-_.:@#,/+ ]*$ and raises ValueError before anything reaches RabbitMQ.


@pytest.mark.parametrize("name", ["ünïcødé", "a!b(c)~d$e"])
async def test_queue_names_outside_the_amqp_grammar(backend: str, port: int, unique: str, name: str) -> None:
    queue_name = f"{name}-{unique}"
    destination = f"/queue/{queue_name}"
    # MESSAGE destinations escape like RabbitMQ's escape_dest: UTF-8 bytes above 127 become %XX
    shown = "/queue/" + "".join(f"%{b:02X}" if b > 127 else chr(b) for b in queue_name.encode())

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(destination, id="s1", receipt="sub")
            frames.receipt("sub")
            conn.send(destination, "x", receipt="sent")
            frames.receipt("sent")
            message = frames.expect("MESSAGE")
            assert message.body == "x"
            assert message.headers["destination"] == shown

    await in_thread(run)


async def test_missing_exchange_with_punctuation_is_not_found(backend: str, port: int, unique: str) -> None:

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(f"/exchange/missing!{unique}/k", id="s1", receipt="sub")
            error = frames.expect("ERROR")
            assert (error.headers["message"], error.body) == (
                "not_found",
                f"no exchange 'missing!{unique}' in vhost '/'",
            )

    await in_thread(run)


async def test_property_header_longer_than_a_shortstr(backend: str, port: int, unique: str) -> None:
    destination = f"/queue/py-long-{unique}"
    correlation_id = "c" * 300

    def run() -> None:
        with session(port) as (conn, frames):
            conn.subscribe(destination, id="s1", receipt="sub")
            frames.receipt("sub")
            conn.send(destination, "x", headers={"correlation-id": correlation_id})
            got = frames.next()
            if got.command == "MESSAGE":  # the embedded broker has no 255-byte limit
                assert got.headers["correlation-id"] == correlation_id
            else:  # AMQP cannot carry it: a refusal that names the problem is fine, a crash is not
                assert (got.command, got.headers.get("message")) == ("ERROR", "Invalid header"), got

    await in_thread(run)
