"""The coordinator's handle on the generator processes (:mod:`bench.worker`)."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import time
from typing import Any

from bench.worker import worker_main

__all__ = ["Pool", "WorkerError"]


class WorkerError(RuntimeError):
    remote_traceback = ""


class Pool:
    """``n`` worker processes, started with fork (the coordinator runs no event loop)."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.n = n
        self.progress = ctx.RawArray("q", n)
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(i, child, self.progress), name=f"bench-worker-{i}")
            proc.daemon = True
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for i in range(n):
            self.call(i, "ping", wait=30)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send(self, i: int, op: str, **kwargs: Any) -> None:
        self.conns[i].send((op, kwargs))

    def recv(self, i: int, wait: float = 600.0) -> Any:
        """The answer of worker ``i``; ``wait`` bounds the wait in seconds."""
        conn = self.conns[i]
        if not conn.poll(wait):
            raise WorkerError(f"worker {i} did not answer within {wait:.0f} s")
        status, value = conn.recv()
        if status != "ok":
            error = WorkerError(f"worker {i} failed: {value.strip().splitlines()[-1]}")
            error.remote_traceback = value
            raise error
        return value

    def call(self, i: int, op: str, wait: float = 600.0, **kwargs: Any) -> Any:
        self.send(i, op, **kwargs)
        return self.recv(i, wait)

    def call_all(self, op: str, per_worker: list[dict[str, Any]] | None = None, wait: float = 600.0,
                 **kwargs: Any) -> list[Any]:
        """The same op on every worker (kwargs, plus ``per_worker[i]``), concurrently."""
        for i in range(self.n):
            extra = per_worker[i] if per_worker is not None else {}
            self.send(i, op, **kwargs, **extra)
        return [self.recv(i, wait) for i in range(self.n)]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("exit", {}))
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
        for conn in self.conns:
            conn.close()
