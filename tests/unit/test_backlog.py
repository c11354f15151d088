"""What waits behind the write the kernel is taking now (the slow-client measure of the transports)."""

from __future__ import annotations

from gateway.connection import Backlog


class Buffer:
    """Stands for an OS transport's write buffer: ``take`` is the kernel sending."""

    def __init__(self) -> None:
        self.size = 0

    def take(self, n: int) -> None:
        self.size -= min(n, self.size)


def test_one_big_write_waits_behind_nothing() -> None:
    buffer = Buffer()
    backlog = Backlog(lambda: buffer.size)
    buffer.size += 16_000_000
    backlog.wrote(16_000_000)
    assert backlog.behind_head() == 0
    buffer.take(10_000_000)
    assert backlog.behind_head() == 0


def test_what_follows_the_head_counts_until_the_head_is_gone() -> None:
    buffer = Buffer()
    backlog = Backlog(lambda: buffer.size)
    for size in (1000, 200, 300):
        buffer.size += size
        backlog.wrote(size)
    assert backlog.behind_head() == 500
    buffer.take(999)  # the head is still partly in the buffer
    assert backlog.behind_head() == 500
    buffer.take(1)  # the head is gone: the 200-byte write is the head now
    assert backlog.behind_head() == 300
    buffer.take(500)
    assert backlog.behind_head() == 0


def test_ends_of_consumed_writes_are_dropped() -> None:
    buffer = Buffer()
    backlog = Backlog(lambda: buffer.size)
    for _ in range(10_000):
        buffer.size += 10
        backlog.wrote(10)
        buffer.take(10)
    assert len(backlog.ends) <= Backlog.TRIM_AT + 1
