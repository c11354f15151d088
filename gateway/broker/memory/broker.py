"""The embedded broker object: users, virtual hosts, the open channels, and the dispatch pass they share.

It authenticates, hands out :class:`~gateway.broker.memory.channels.MemoryChannel` objects and, when it
stops, fails every channel and deletes every queue. Everything that happens to messages happens in the
channels, virtual hosts, exchanges, queues and consumers.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.broker.base import AccessRefused, Broker, BrokerUnavailable, VhostNotFound
from gateway.broker.memory.channels import MemoryChannel
from gateway.broker.memory.queues import MAX_QUEUE_LENGTH, Dispatcher, QueueInfo
from gateway.broker.memory.vhosts import VHost

__all__ = ["MemoryBroker", "MemoryPrincipal"]

logger = logging.getLogger("gateway.broker.memory")

_SHUTDOWN_TEXT: Final = "broker forced connection closure with reason 'shutdown'"


@dataclass(frozen=True, slots=True)
class MemoryPrincipal:
    """Who a channel acts for: what :meth:`MemoryBroker.authenticate` returns."""

    login: str
    vhost: str


class MemoryBroker(Broker):
    """The embedded broker. Use it from one event loop; :meth:`start` binds it to the running loop.

    ``users`` maps login to passcode (default ``{"guest": "guest"}``), ``vhosts`` names the virtual hosts
    (each has its own exchanges and queues), ``max_queue_length`` is the per-queue default of
    :data:`~gateway.broker.memory.queues.MAX_QUEUE_LENGTH` for queues declared without ``x-max-length``.
    """

    kind = "memory"

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        vhosts: Iterable[str] = ("/",),
        *,
        max_queue_length: int = MAX_QUEUE_LENGTH,
    ) -> None:
        self._users = dict({"guest": "guest"} if users is None else users)
        self._vhost_names = frozenset(vhosts)
        self.max_queue_length = max_queue_length
        self._dispatcher = Dispatcher()
        self._vhosts: dict[str, VHost] = {}
        self._channels: dict[MemoryChannel, None] = {}
        self._available = False

    @property
    def debug(self) -> bool:
        """Whether debug logging was on at :meth:`start` (decided once: the hot path tests this flag)."""
        return self._dispatcher.debug

    @debug.setter
    def debug(self, value: bool) -> None:
        self._dispatcher.debug = value

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop :meth:`start` ran in (channels schedule their callbacks there)."""
        return self._dispatcher.loop

    # -- Broker interface

    @property
    def is_available(self) -> bool:
        return self._available

    async def start(self) -> None:
        """Start with empty vhosts (only the pre-declared exchanges). Idempotent while started."""
        if self._available:
            return
        self._dispatcher.start(asyncio.get_running_loop(), debug=logger.isEnabledFor(logging.DEBUG))
        self._vhosts = {name: VHost(name, self._dispatcher) for name in self._vhost_names}
        self._available = True

    async def authenticate(self, login: str, passcode: str, vhost: str) -> MemoryPrincipal:
        if not self._available:
            raise BrokerUnavailable()
        expected = self._users.get(login)
        if expected is None or not hmac.compare_digest(expected.encode(), passcode.encode()):
            raise AccessRefused(login)
        if vhost not in self._vhosts:
            raise VhostNotFound(vhost)
        return MemoryPrincipal(login, vhost)

    async def open_channel(self, principal: Any, owner: str | None = None) -> MemoryChannel:
        if not self._available:
            raise BrokerUnavailable()
        if not isinstance(principal, MemoryPrincipal):
            raise TypeError(f"not a principal of this broker: {principal!r}")
        vhost = self._vhosts.get(principal.vhost)
        if vhost is None:
            raise VhostNotFound(principal.vhost)
        channel = MemoryChannel(self, vhost, principal)
        self._channels[channel] = None
        return channel

    async def close(self) -> None:
        """Stop: every open channel closes (its ``on_close`` gets :class:`BrokerUnavailable`), all
        exchanges, queues and messages are dropped."""
        if not self._available:
            return
        self._available = False
        error = BrokerUnavailable(_SHUTDOWN_TEXT)
        for channel in list(self._channels):
            channel.fail(error)
        for vhost in self._vhosts.values():
            vhost.delete_queues()
        self._vhosts = {}
        self._dispatcher.stop()

    def shared_key(self, principal: Any) -> tuple[str, str]:
        return (principal.login, principal.vhost)

    # -- Called by channels

    def forget_channel(self, channel: MemoryChannel) -> None:
        """``channel`` closed: the broker no longer has to close it when it stops."""
        self._channels.pop(channel, None)

    # -- Introspection

    def queue_info(self, name: str, vhost: str = "/") -> QueueInfo | None:
        """A snapshot of queue ``name``, or None if it does not exist."""
        host = self._vhosts.get(vhost)
        queue = None if host is None else host.find_queue(name)
        return None if queue is None else queue.info()
