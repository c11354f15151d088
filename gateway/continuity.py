"""Continuity for live pages, as pure data structures (no I/O, no clock of their own: callers pass ``now``).

* :func:`topic_matcher`: AMQP topic binding semantics (``*`` one word, ``#`` zero or more), so a
  gateway-side feed can tell which shared bindings a routing key reaches.
* :class:`RetainedMap`: the newest message per routing key of a ``--retain`` exchange, bounded in keys and
  bytes, for ``x-last-value:true``.
* :class:`History`: the recent messages of one shared binding, numbered from 1 under a random *epoch*, bounded
  in count, bytes and age, for ``x-recover-from``. A position is ``<epoch>:<offset>``: "everything up to and
  including message ``offset`` of that epoch was seen".
* :class:`Conflator`: at most one message per key per interval, the newest, never losing the last of a burst;
  it slows down (conflates harder) while its client lags, for ``x-conflate``.

:mod:`gateway.fanout` and :mod:`gateway.connection` drive these; the session parses the headers.
"""

from __future__ import annotations

import base64
import collections
import functools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "Conflator",
    "ContinuityRequest",
    "History",
    "RetainedMap",
    "new_epoch",
    "parse_position",
    "topic_matcher",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ContinuityRequest:
    """What a SUBSCRIBE asked of its shared binding (parsed and checked by the session).

    ``last_value``: first the retained message of every matching routing key. ``recover_from``: first every
    message after this ``(epoch, offset)``. Both: recovery when the position is covered, else last values.
    ``conflate_ms``: at most one message per routing key per this many ms (None: every message).
    """

    last_value: bool = False
    recover_from: tuple[str, int] | None = None
    conflate_ms: int | None = None


@dataclass(frozen=True, slots=True)
class HandOver:
    """What a subscription got when it joined its shared binding, for its RECEIPT: ``recovered`` (None: it
    did not ask) and ``last_value`` (None: it did not ask; False: the exchange is not retained)."""

    recovered: bool | None = None
    last_value: bool | None = None


def new_epoch() -> str:
    """A random epoch: 8 URL-safe characters, never a ``:``. A new one for every history, so a position from
    another gateway, an earlier process or an expired binding is never taken for one of this history."""
    return base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()


def parse_position(text: str) -> tuple[str, int]:
    """``<epoch>:<offset>`` → ``(epoch, offset)``; ``ValueError`` if it is not that shape."""
    epoch, sep, offset = text.rpartition(":")
    if not sep or not epoch or not offset.isascii() or not offset.isdigit() or len(offset) > 18:
        raise ValueError(text)
    return epoch, int(offset)


# -- topic matching --------------------------------------------------------------------------------------


def _words_match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    """AMQP topic matching on word lists (dynamic programming, linear in len(pattern) * len(words))."""
    # reachable[j]: the pattern prefix handled so far matches words[:j]
    reachable = [True] + [False] * len(words)
    for part in pattern:
        if part == "#":
            # zero or more words: once a prefix is reachable, every longer one is
            seen = False
            for j in range(len(reachable)):
                seen = seen or reachable[j]
                reachable[j] = seen
        else:
            nxt = [False] * len(reachable)
            for j in range(len(words)):
                if reachable[j] and (part == "*" or part == words[j]):
                    nxt[j + 1] = True
            reachable = nxt
    return reachable[-1]


@functools.lru_cache(maxsize=4096)
def topic_matcher(pattern: str) -> Callable[[str], bool]:
    """A test of routing keys against the binding key ``pattern`` of a topic exchange."""
    parts = _split(pattern)
    if "*" not in parts and "#" not in parts:
        return pattern.__eq__
    if parts == ("#",):
        return lambda key: True
    return lambda key: _words_match(parts, _split(key))


def _split(key: str) -> tuple[str, ...]:
    """RabbitMQ's split: ``""`` is zero words, ``"a."`` is ``("a", "")``."""
    return tuple(key.split(".")) if key else ()


def is_literal(pattern: str) -> bool:
    """Whether ``pattern`` matches only the routing key equal to it."""
    parts = _split(pattern)
    return "*" not in parts and "#" not in parts


# -- last value ------------------------------------------------------------------------------------------


class RetainedMap(Generic[T]):
    """The newest item per routing key, at most ``max_keys`` keys and ``max_bytes`` bytes (sizes as the
    caller counts them); the keys updated least recently go first. An item larger than ``max_bytes`` is not
    kept, and neither is the older item of its key (it is no longer the last value)."""

    def __init__(self, max_keys: int, max_bytes: int) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: collections.OrderedDict[str, tuple[T, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> T | None:
        found = self._items.get(key)
        return None if found is None else found[0]

    def put(self, key: str, item: T, size: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return
        self._items[key] = (item, size)
        self.bytes += size
        while len(self._items) > self.max_keys or self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def matching(self, pattern: str) -> list[T]:
        """The items whose key the binding key ``pattern`` matches, least recently updated first."""
        if is_literal(pattern):
            found = self._items.get(pattern)
            return [] if found is None else [found[0]]
        matches = topic_matcher(pattern)
        return [item for key, (item, _) in self._items.items() if matches(key)]


# -- recovery ----------------------------------------------------------------------------------------------


class History(Generic[T]):
    """The last messages of one shared binding: offsets 1, 2, ... under ``epoch``; at most ``max_count``
    messages, ``max_bytes`` bytes, none older than ``ttl`` seconds (checked whenever it is used)."""

    __slots__ = ("_entries", "bytes", "epoch", "last", "max_bytes", "max_count", "ttl")

    def __init__(self, max_count: int, max_bytes: int, ttl: float, epoch: str | None = None) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.epoch = epoch or new_epoch()
        self.last = 0  # offset of the newest message recorded (0: none yet)
        self.bytes = 0
        self._entries: collections.deque[tuple[int, float, T, int]] = collections.deque()

    def __len__(self) -> int:
        return len(self._entries)

    def position(self, offset: int | None = None) -> str:
        """``<epoch>:<offset>`` (the newest offset by default)."""
        return f"{self.epoch}:{self.last if offset is None else offset}"

    def next_offset(self) -> int:
        return self.last + 1

    def append(self, item: T, size: int, now: float) -> int:
        """Record the next message; returns its offset."""
        self.last += 1
        entries = self._entries
        entries.append((self.last, now, item, size))
        self.bytes += size
        while len(entries) > self.max_count or self.bytes > self.max_bytes:
            self.bytes -= entries.popleft()[3]
        self.expire(now)
        return self.last

    def expire(self, now: float) -> None:
        entries = self._entries
        horizon = now - self.ttl
        while entries and entries[0][1] < horizon:
            self.bytes -= entries.popleft()[3]

    def since(self, epoch: str, offset: int, now: float) -> list[T] | None:
        """Every message after ``epoch:offset``, oldest first; None when that position is not covered (another
        epoch, a position never given, or a message after it no longer kept)."""
        if epoch != self.epoch or offset > self.last:
            return None
        self.expire(now)
        entries = self._entries
        first = entries[0][0] if entries else self.last + 1
        if offset + 1 < first:
            return None
        skip = offset + 1 - first
        return [entry[2] for i, entry in enumerate(entries) if i >= skip]


# -- conflation ----------------------------------------------------------------------------------------------


class Conflator(Generic[T]):
    """At most one item per key per interval, the newest; what is held is sent when its key's interval ends
    (so the last item of a burst always goes out). While the client lags, :meth:`lagging` doubles the
    interval (up to ``max_interval``); :meth:`keeping_up` halves it back towards the one asked for."""

    def __init__(self, interval: float, max_interval: float) -> None:
        self.interval = interval
        self.max_interval = max(max_interval, interval)
        self.current = interval
        self._sent: dict[str, float] = {}
        self._pending: dict[str, T] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def offer(self, key: str, item: T, now: float) -> bool:
        """True: send ``item`` now (and it counts as sent). False: it is held, replacing an older one."""
        if key not in self._pending and now - self._sent.get(key, float("-inf")) >= self.current:
            self._sent[key] = now
            return True
        self._pending[key] = item
        return False

    def hold(self, key: str, item: T) -> None:
        """Put back an item that could not be written (a newer one held meanwhile wins)."""
        self._pending.setdefault(key, item)

    def next_due(self) -> float | None:
        """When the earliest held item may go (None: nothing held)."""
        if not self._pending:
            return None
        sent = self._sent
        return min(sent.get(key, float("-inf")) for key in self._pending) + self.current

    def take_due(self, now: float) -> list[tuple[str, T]]:
        """The held items whose interval has ended, in the order they were first held; they count as sent."""
        current = self.current
        sent = self._sent
        due = [key for key in self._pending if now - sent.get(key, float("-inf")) >= current]
        out = []
        for key in due:
            out.append((key, self._pending.pop(key)))
            sent[key] = now
        if len(sent) > 1024 and len(sent) > 4 * len(self._pending):
            # keys quiet for a whole interval need no record: they may send at once anyway
            for key in [k for k, t in sent.items() if now - t >= current and k not in self._pending]:
                del sent[key]
        return out

    def lagging(self) -> None:
        self.current = min(self.current * 2, self.max_interval)

    def keeping_up(self) -> None:
        if self.current > self.interval:
            self.current = max(self.current / 2, self.interval)
