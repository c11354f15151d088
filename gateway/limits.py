"""Limits at the door (pure): how many connections the gateway and one address may hold, and how fast one
session may send frames.

:class:`Admission` counts the open connections, in total and per client address, and says whether one
more may come in (and if not, why: the transport answers the upgrade with HTTP 503 or 429 and a
``Retry-After``). :class:`TokenBucket` paces a session's frames: the connection waits for a token before
handling each frame, and while it waits it reads nothing more from that client, so a fast sender is
slowed down, never cut off, and nothing is dropped.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

__all__ = ["Admission", "Refusal", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a connection is not taken: ``status`` (503: the gateway is full; 429: this address holds too
    many), the ``reason`` (a metric label) and the words of the HTTP answer."""

    status: int
    reason: str
    text: str
    retry_after: int = 5


class Admission:
    """Counts open connections: ask :meth:`refuse` before taking one, then say :meth:`opened` and, when it
    ends, :meth:`closed`."""

    __slots__ = ("max_per_ip", "max_total", "per_ip", "total")

    def __init__(self, max_total: int | None, max_per_ip: int | None) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: collections.Counter[str] = collections.Counter()

    def refuse(self, address: str) -> Refusal | None:
        """Why one more connection from ``address`` must not be taken, or None (nothing is counted here)."""
        if self.max_total is not None and self.total >= self.max_total:
            return Refusal(
                503, "max_connections", f"The gateway is at its limit of {self.max_total} connections\n"
            )
        if self.max_per_ip is not None and self.per_ip[address] >= self.max_per_ip:
            return Refusal(
                429,
                "max_connections_per_ip",
                f"Your address holds the most connections allowed ({self.max_per_ip})\n",
            )
        return None

    def opened(self, address: str) -> None:
        """A connection from ``address`` was taken."""
        self.total += 1
        self.per_ip[address] += 1

    def closed(self, address: str) -> None:
        """A connection from ``address`` ended."""
        self.total -= 1
        self.per_ip[address] -= 1
        if self.per_ip[address] <= 0:
            del self.per_ip[address]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; it starts full."""

    __slots__ = ("burst", "level", "rate", "updated")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.updated: float | None = None

    def take(self, now: float) -> float:
        """Take one token at time ``now`` (seconds, monotonic): 0 if one was there, else the seconds to wait
        until it is (the token is taken all the same: call once per frame, and wait that long)."""
        if self.updated is not None:
            self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        self.level -= 1
        if self.level >= 0:
            return 0.0
        return -self.level / self.rate
