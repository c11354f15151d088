"""A load-generator process: uvloop, many :class:`~bench.wsclient.StompWsClient` connections, and a
command pipe to the coordinator (:mod:`bench.pool`).

The coordinator does no network I/O itself. It sends ``(op, kwargs)`` and gets ``("ok", result)`` or
``("err", traceback)`` back. Times are ``time.monotonic_ns()`` values, which are system-wide on Linux, so
the processes share one clock (the same clock is written into message bodies for latency).

Fan-out flow control across processes: every worker writes, into its slot of a shared ``RawArray``, the
lowest sequence number that *all* its subscribers have reached; the publisher (in worker 0) reads the
minimum over the slots, so "in flight" = published minus received by every subscriber of every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import traceback
from array import array
from typing import Any

from bench.wsclient import StompWsClient, open_client, raise_nofile, send_frame_bytes

__all__ = ["NO_SUBSCRIBERS", "worker_main"]

#: open files a worker asks for (the connections scenario may hold 50,000+ sockets)
WANTED_NOFILE = 200_000
NO_SUBSCRIBERS = 1 << 62  # progress slot value of a worker that hosts no subscriber
monotonic_ns = time.monotonic_ns


async def sleep_until(t_ns: int) -> None:
    delay = (t_ns - monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


class Worker:
    def __init__(self, index: int, conn: Any, progress: Any) -> None:
        self.index = index
        self.opened = 0  # connections opened by op_subscribe so far
        self.conn = conn
        self.progress = progress
        self.subs: list[StompWsClient] = []
        self.others: list[StompWsClient] = []  # publishers, pipe pairs
        self.pairs: list[tuple[StompWsClient, StompWsClient, bytes]] = []
        self.publisher: StompWsClient | None = None
        self.pipe_extra = b""
        self._armed: asyncio.Future[None] | None = None
        self._armed_count = 0
        self.errors: list[str] = []
        self._progress_task: asyncio.Task[None] | None = None
        progress[index] = NO_SUBSCRIBERS

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def readable() -> None:
            try:
                queue.put_nowait(self.conn.recv())
            except (EOFError, OSError):
                queue.put_nowait(("exit", {}))
                loop.remove_reader(self.conn.fileno())

        loop.add_reader(self.conn.fileno(), readable)
        # uvloop makes a watched fd non-blocking; a large reply (latencies) must not be written partially
        os.set_blocking(self.conn.fileno(), True)
        while True:
            op, kwargs = await queue.get()
            if op == "exit":
                await self.op_close()
                break
            try:
                result = await getattr(self, "op_" + op)(**kwargs)
                self.conn.send(("ok", result))
            except Exception:
                self.conn.send(("err", traceback.format_exc()))

    # -- helpers -----------------------------------------------------------------------------------------
    def _take_errors(self) -> list[str]:
        errors = self.errors
        self.errors = []
        for client in (*self.subs, *self.others):
            if client.errors:
                errors.extend(client.errors)
                client.errors = []
        return errors

    def _write_progress(self) -> None:
        subs = self.subs
        self.progress[self.index] = min(c.last_seq for c in subs) if subs else NO_SUBSCRIBERS

    async def _progress_loop(self) -> None:
        while True:
            self._write_progress()
            await asyncio.sleep(0.001)

    def _complete(self) -> int:
        """Highest sequence number that every subscriber of every worker has received."""
        self._write_progress()
        low = min(self.progress)
        return 0 if low == NO_SUBSCRIBERS else low

    # -- operations ----------------------------------------------------------------------------------------
    async def op_ping(self) -> int:
        return self.index

    async def op_subscribe(
        self, url: str, destination: str, count: int, concurrency: int, timeout: float, sub_extra: str = ""
    ) -> dict[str, Any]:
        """Open ``count`` connections, each with one ``ack:auto`` subscription confirmed by a RECEIPT."""
        sem = asyncio.Semaphore(max(1, concurrency))
        ok = 0
        failed = 0
        first: list[int] = []
        last = [0]

        async def one(i: int) -> None:
            nonlocal ok, failed
            async with sem:
                started = monotonic_ns()
                if not first:
                    first.append(started)
                client: StompWsClient | None = None
                try:
                    # Numbered across this worker's life, each worker in a range of its own: the source
                    # addresses of its connections (past 20,000 on loopback) never collide with another's.
                    client = await open_client(url, timeout=timeout, index=self.index * 1_000_000 + base + i)
                    await client.subscribe(destination, "0", timeout, sub_extra)
                except Exception as error:  # counted and reported, never fatal for the others
                    failed += 1
                    self.errors.append(f"connect/subscribe failed: {type(error).__name__}: {error}")
                    if client is not None:
                        client.close()
                    return
                self.subs.append(client)
                ok += 1
                last[0] = monotonic_ns()

        base = self.opened
        self.opened += count
        t0 = monotonic_ns()
        await asyncio.gather(*(one(i) for i in range(count)))
        return {"ok": ok, "failed": failed, "t_start": first[0] if first else t0, "t_end": last[0] or t0}

    async def op_track(self, progress: bool = False, latency_from: int | None = None) -> None:
        for client in self.subs:
            client.reset_counters()
            if latency_from is not None:
                client.latencies = array("q")
                client.latency_from = latency_from
        if progress and self._progress_task is None:
            self._progress_task = asyncio.create_task(self._progress_loop())
        self._write_progress()

    async def op_fanout_publish(
        self,
        url: str,
        destination: str,
        start_ns: int,
        warm_ns: int,
        end_ns: int,
        window: int,
        body_size: int,
        drain_timeout: float,
    ) -> dict[str, Any]:
        """Publish as fast as the window allows until ``end_ns``; measure completions after ``warm_ns``."""
        pub = await open_client(url)
        self.others.append(pub)
        dest = destination.encode()
        await sleep_until(start_ns)
        seq = 0
        warm: tuple[int, int] | None = None
        now = monotonic_ns()
        while now < end_ns and not pub.lost:
            complete = self._complete()
            if warm is None and now >= warm_ns:
                warm = (now, complete)
            free = window - (seq - complete)
            if free > 0:
                frames = []
                for _ in range(free):
                    seq += 1
                    frames.append(send_frame_bytes(dest, seq, body_size))
                pub.write(b"".join(frames))
                await pub.drain()
            await asyncio.sleep(0.001)
            now = monotonic_ns()
        end = (now, self._complete())
        if warm is None:
            warm = end
        deadline = now + int(drain_timeout * 1e9)
        while self._complete() < seq and monotonic_ns() < deadline:
            await asyncio.sleep(0.002)
        return {
            "published": seq,
            "warm_t": warm[0],
            "warm_complete": warm[1],
            "end_t": end[0],
            "end_complete": end[1],
            "drained_t": monotonic_ns(),
            "final_complete": self._complete(),
        }

    async def op_rate_publish(
        self, url: str, destination: str, start_ns: int, end_ns: int, rate: float, body_size: int
    ) -> dict[str, Any]:
        """Open-loop publisher: message ``i`` is due at ``start + i/rate``; the body carries the send time."""
        pub = await open_client(url)
        self.others.append(pub)
        dest = destination.encode()
        interval = 1e9 / rate
        await sleep_until(start_ns)
        seq = 0
        late_max = 0
        while not pub.lost:
            now = monotonic_ns()
            if now >= end_ns:
                break
            due = start_ns + int(seq * interval)
            frames = []
            while due <= now and due < end_ns:
                late_max = max(late_max, now - due)
                seq += 1
                frames.append(send_frame_bytes(dest, seq, body_size))
                due = start_ns + int(seq * interval)
            if frames:
                pub.write(b"".join(frames))
            await sleep_until(min(due, end_ns))
        return {"published": seq, "publisher_late_max_ns": late_max}

    async def op_finish(self, expected: int, timeout: float, latencies: bool = False) -> dict[str, Any]:
        """Wait (bounded) until every subscriber has ``expected`` messages, then count."""
        deadline = monotonic_ns() + int(timeout * 1e9)
        while monotonic_ns() < deadline and any(c.last_seq < expected and not c.lost for c in self.subs):
            await asyncio.sleep(0.005)
        if self._progress_task is not None:
            self._progress_task.cancel()
            self._progress_task = None
        received = sum(c.received for c in self.subs)
        lost = sum(max(0, expected - c.received) for c in self.subs)
        extra = sum(max(0, c.received - expected) for c in self.subs)
        lat = array("q")
        if latencies:
            for c in self.subs:
                if c.latencies is not None:
                    lat.extend(c.latencies)
        return {
            "subscribers": len(self.subs),
            "received": received,
            "lost": lost,
            "duplicates": extra,
            "misordered": sum(c.misordered for c in self.subs),
            "last_arrival": max((c.last_arrival for c in self.subs), default=0),
            "latencies": lat.tobytes(),
            "errors": self._take_errors(),
        }

    async def op_pipe_setup(
        self, url: str, destinations: list[str], timeout: float, extra_headers: str = ""
    ) -> dict[str, Any]:
        """One publisher and one subscriber connection per destination (``extra_headers`` go on both the
        SUBSCRIBE and every SEND, e.g. ``durable:false`` for queues)."""
        self.pipe_extra = extra_headers.encode()
        failed = 0
        for i, destination in enumerate(destinations):
            try:
                sub = await open_client(url, timeout=timeout)
                self.others.append(sub)
                await sub.subscribe(destination, str(i), timeout, extra_headers)
                pub = await open_client(url, timeout=timeout)
                self.others.append(pub)
            except Exception as error:
                failed += 1
                self.errors.append(f"pipe setup failed: {type(error).__name__}: {error}")
                continue
            self.pairs.append((pub, sub, destination.encode()))
        return {"pairs": len(self.pairs), "failed": failed}

    async def op_pipe_run(
        self, start_ns: int, warm_ns: int, end_ns: int, window: int, body_size: int, drain_timeout: float
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        low = max(0, window // 2)
        extra = self.pipe_extra

        async def run_pair(pub: StompWsClient, sub: StompWsClient, dest: bytes) -> dict[str, Any]:
            seq = 0
            waiter: asyncio.Future[None] | None = None

            def wake() -> None:
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

            def notify() -> None:
                if waiter is not None and seq - sub.last_seq <= low and not waiter.done():
                    waiter.set_result(None)

            sub.reset_counters()
            sub.notify = notify
            await sleep_until(start_ns)
            warm: tuple[int, int] | None = None
            now = monotonic_ns()
            while now < end_ns and not pub.lost and not sub.lost:
                if warm is None and now >= warm_ns:
                    warm = (now, sub.received)
                free = window - (seq - sub.last_seq)
                if free > 0:
                    frames = []
                    for _ in range(free):
                        seq += 1
                        frames.append(send_frame_bytes(dest, seq, body_size, extra))
                    pub.write(b"".join(frames))
                    await pub.drain()
                if seq - sub.last_seq > low:
                    waiter = loop.create_future()
                    timer = loop.call_at(loop.time() + 0.02, wake)
                    await waiter
                    timer.cancel()
                    waiter = None
                now = monotonic_ns()
            end = (now, sub.received)
            if warm is None:
                warm = end
            sub.notify = None
            deadline = now + int(drain_timeout * 1e9)
            while sub.last_seq < seq and not sub.lost and monotonic_ns() < deadline:
                await asyncio.sleep(0.002)
            return {
                "published": seq,
                "received": sub.received,
                "lost": max(0, seq - sub.received),
                "duplicates": max(0, sub.received - seq),
                "misordered": sub.misordered,
                "measured": end[1] - warm[1],
                "seconds": (end[0] - warm[0]) / 1e9,
                "last_arrival": sub.last_arrival,
            }

        results = await asyncio.gather(*(run_pair(p, s, d) for p, s, d in self.pairs))
        return {"pairs": results, "errors": self._take_errors()}

    async def op_open_publisher(self, url: str, timeout: float) -> None:
        self.publisher = await open_client(url, timeout=timeout)
        self.others.append(self.publisher)

    async def op_broadcast(self, destination: str, seq: int, body_size: int) -> int:
        assert self.publisher is not None
        frame = send_frame_bytes(destination.encode(), seq, body_size)
        sent = monotonic_ns()  # the body's timestamp is taken a few microseconds earlier
        self.publisher.write(frame)
        return sent

    async def op_arm(self, seq: int) -> None:
        """Count, without polling, the subscribers that reach ``seq`` (for :meth:`op_wait`)."""
        loop = asyncio.get_running_loop()
        self._armed = loop.create_future()
        self._armed_count = sum(1 for c in self.subs if c.last_seq >= seq)
        total = len(self.subs)

        def make_notify(client: StompWsClient) -> Any:
            def notify() -> None:
                if client.last_seq >= seq and client.notify is not None:
                    client.notify = None
                    self._armed_count += 1
                    if self._armed_count >= total and self._armed is not None and not self._armed.done():
                        self._armed.set_result(None)
            return notify

        for client in self.subs:
            client.notify = make_notify(client) if client.last_seq < seq else None
        if self._armed_count >= total:
            self._armed.set_result(None)

    async def op_wait(self, seq: int, timeout: float) -> dict[str, Any]:
        assert self._armed is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._armed), timeout)
        for client in self.subs:
            client.notify = None
        reached = [c for c in self.subs if c.last_seq >= seq]
        return {
            "subscribers": len(self.subs),
            "reached": len(reached),
            "last_arrival": max((c.last_arrival for c in reached), default=0),
            "first_arrival": min((c.last_arrival for c in reached), default=0),
            "errors": self._take_errors(),
        }

    async def op_errors(self) -> list[str]:
        return self._take_errors()

    async def op_close(self) -> dict[str, Any]:
        if self._progress_task is not None:
            self._progress_task.cancel()
            self._progress_task = None
        errors = self._take_errors()
        clients = [*self.subs, *self.others]
        for client in clients:
            client.close()
        self.subs, self.others, self.pairs, self.publisher = [], [], [], None
        self.progress[self.index] = NO_SUBSCRIBERS
        if clients:
            await asyncio.sleep(0.05)
        return {"closed": len(clients), "errors": errors}


def worker_main(index: int, conn: Any, progress: Any) -> None:
    raise_nofile(WANTED_NOFILE)
    worker = Worker(index, conn, progress)
    try:
        import uvloop

        uvloop.run(worker.serve())
    except ImportError:  # pragma: no cover
        asyncio.run(worker.serve())
