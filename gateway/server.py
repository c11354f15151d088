"""The gateway process: one broker, the shared fan-out, the transports, optionally the stock daemon."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import metrics
from gateway.auth import load_policy, token_from_request
from gateway.broker.base import Broker
from gateway.config import Config, ConfigError
from gateway.connection import ConnectionSettings, Handshake, StompConnection
from gateway.destinations import format_destination
from gateway.fanout import ContinuitySettings, FanoutRegistry
from gateway.limits import Admission, Refusal
from gateway.proxy import TrustedProxies
from gateway.settings import derive
from gateway.transport.http import DEFAULT_WEB_ROOT, HttpResponder
from stock_daemon.daemon import DaemonConfig

__all__ = ["Gateway", "ListenError", "make_broker"]

logger = logging.getLogger("gateway")


def make_broker(config: Config) -> Broker:
    if config.broker == "memory":
        from gateway.broker.memory import MemoryBroker

        users = {config.default_login: config.default_passcode}
        return MemoryBroker(users=users)
    from gateway.broker.amqp import AmqpBroker

    assert config.amqp_urls
    return AmqpBroker(config.amqp_urls, sessions_per_connection=config.sessions_per_connection)


def _ticker_settings() -> DaemonConfig | None:
    """The stock daemon's settings from this process's environment (the in-process daemon runs with them
    and ``/info.json`` tells the page about them), or None, with a warning, if they are not valid."""
    try:
        return DaemonConfig.from_env()
    except ConfigError as error:
        logger.warning("the page gets no symbols from /info.json: %s", error.message)
        return None


def _gateway_credentials(config: Config) -> tuple[str, str]:
    """The broker login of token and anonymous sessions: the user of the first ``--amqp-url`` (the nodes of
    one cluster share their users), or the default login of the embedded broker."""
    if config.broker == "rabbitmq" and config.amqp_urls:
        from gateway.broker.amqp import credentials_from_url

        login, passcode, _ = credentials_from_url(config.amqp_urls[0])
        return login, passcode
    return config.default_login, config.default_passcode


class ListenError(Exception):
    """A listener could not open its port; the message names that listener, its port and why."""

    def __init__(self, listener: str, host: str, port: int, exc: OSError) -> None:
        super().__init__(f"cannot listen for {listener} on {host}:{port}: {exc.strerror or exc}")


class Gateway:
    """Start with :meth:`start`, stop with :meth:`stop`. ``port``/``tcp_port`` are the bound ports."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.broker = broker or make_broker(config)
        self.registry = FanoutRegistry(self.broker, config.topic_exchange, derive(ContinuitySettings, config))
        self.connection_settings = derive(ConnectionSettings, config)
        self.tokens = load_policy(config)
        self.connection_settings.session = dataclasses.replace(self.connection_settings.session, tokens=self.tokens)
        self.connection_settings.gateway_credentials = _gateway_credentials(config)
        self.admission = Admission(config.max_connections, config.max_connections_per_ip)
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
        for name in ("max_connections", "max_connections_per_ip", "max_frames_per_second"):
            value = getattr(config, name)
            if value is not None:
                metrics.LIMITS.labels(name).set(value)
        self.ticker = _ticker_settings()
        self.connections: set[StompConnection] = set()
        self._metrics_task: asyncio.Task[None] | None = None
        self._servers: list[Any] = []
        self._draining = False
        self._daemon_task: asyncio.Task[None] | None = None
        self._daemon_stop = asyncio.Event()
        self.port: int | None = None
        self.tcp_port: int | None = None

    # -- the door: who is connecting, and may they ------------------------------------------------------

    def handshake(
        self,
        peer: Any,
        *,
        proxied: tuple[str, int] | None = None,
        query: str = "",
        headers: Callable[[str], list[str]] | None = None,
    ) -> Handshake:
        """What a transport learnt of a new client: ``peer`` is the socket's peername; ``proxied`` the
        address a PROXY protocol header named (the transport reads one only from a trusted proxy);
        ``query`` the upgrade request's query string and ``headers(name)`` its header values. The client
        address is the PROXY header's, else ``X-Forwarded-For``'s from a trusted proxy, else the peer's."""
        address, port = (str(peer[0]), int(peer[1])) if peer else ("?", None)
        get = headers or (lambda name: [])
        if proxied is not None:
            address, port = proxied
        elif self.trusted_proxies and self.trusted_proxies.trusts(address):
            client = self.trusted_proxies.client_address(address, get("X-Forwarded-For"))
            if client != address:
                address, port = client, None
        token = None
        if headers is not None:
            token = token_from_request(query, get("Authorization"), get("Cookie"), self.config.jwt_cookie)
        return Handshake(address, port, token)

    def refusal(self, address: str) -> Refusal | None:
        """Why one more connection from ``address`` must not be taken now (answer it and close), or None.
        It is counted once :meth:`connection_opened` runs, released at :meth:`connection_closed`."""
        refusal = self.admission.refuse(address)
        if refusal is not None:
            metrics.CONNECTIONS_REFUSED.labels(refusal.reason).inc()
            logger.info("refused a connection from %s: %s", address, refusal.text.strip())
        return refusal

    def connection_opened(self, connection: StompConnection) -> None:
        self.admission.opened(connection.handshake.address)
        self.connections.add(connection)
        kind = connection.transport.kind
        metrics.CONNECTIONS.labels(kind).inc()
        metrics.CONNECTIONS_OPENED.labels(kind).inc()

    def connection_closed(self, connection: StompConnection) -> None:
        if connection in self.connections:
            self.admission.closed(connection.handshake.address)
            self.connections.discard(connection)
            metrics.CONNECTIONS.labels(connection.transport.kind).dec()

    def _web_root(self) -> Path | None:
        root = self.config.web_root
        if root is None:
            return DEFAULT_WEB_ROOT if DEFAULT_WEB_ROOT.is_dir() else None
        if root.lower() == "none":
            return None
        return Path(root)

    async def start(self) -> None:
        """Connect the broker (raises BrokerUnavailable) and open the listeners."""
        from gateway.transport.tcp import serve_tcp
        from gateway.transport.websocket import serve_websocket

        await self.broker.start()
        self.registry.start()
        http = HttpResponder(self._web_root(), self.not_ready, metrics.exposition, self.info)
        self._metrics_task = asyncio.create_task(metrics.run_flusher(lambda: self.broker.is_available))
        try:
            ws_server = await serve_websocket(self, http)
        except OSError as exc:
            raise ListenError("WebSocket/HTTP (--port)", self.config.host, self.config.port, exc) from exc
        self._servers.append(ws_server)
        self.port = ws_server.sockets[0].getsockname()[1]
        if self.config.tcp_port is not None:
            try:
                tcp_server = await serve_tcp(self)
            except OSError as exc:
                raise ListenError("STOMP over TCP (--tcp-port)", self.config.host, self.config.tcp_port, exc) from exc
            self._servers.append(tcp_server)
            self.tcp_port = tcp_server.sockets[0].getsockname()[1]
        if self.config.with_stock_daemon:
            self._daemon_task = asyncio.create_task(self._run_stock_daemon(), name="stock-daemon")

    async def _run_stock_daemon(self) -> None:
        from stock_daemon.daemon import run_daemon

        if self.ticker is None:  # parse_args refuses this; a Config made in code may not have been checked
            logger.error("stock daemon not started: its settings are not valid")
            return
        principal = await self.broker.authenticate(
            self.config.default_login, self.config.default_passcode, self.config.default_vhost
        )
        await run_daemon(self.broker, principal, self.ticker, stop=self._daemon_stop)

    def info(self) -> dict[str, object]:
        """``/info.json``: what the page needs to know, never an address, port, user or URL.

        ``broker`` names the broker in use. ``ticker`` (absent if the stock daemon's settings in this
        process's environment are not valid) tells the page what the stock daemon publishes, from the
        daemon's own settings (``STOCK_SYMBOLS``, ``STOCK_EXCHANGE``: give the gateway the same environment
        as the daemon): its ``symbols``, the ``destination_prefix`` that a symbol completes into the
        destination of its ticks, and the ``snapshot_destination`` to which snapshot requests go.
        """
        info: dict[str, object] = {"broker": "RabbitMQ" if self.broker.kind == "rabbitmq" else "the embedded broker"}
        if self.tokens is not None:
            # The page asks for the snapshot (a SEND) only when it has a token or anonymous sessions may send.
            info["tokens"] = {"anonymous_scopes": list(self.tokens.anonymous_scopes)}
        if self.ticker is not None:
            info["ticker"] = {
                "symbols": list(self.ticker.symbols),
                # The daemon publishes with routing key = symbol; "" as the topic exchange keeps /exchange/X.
                "destination_prefix": format_destination(self.ticker.exchange, "", topic_exchange="") + "/",
                "snapshot_destination": format_destination("", self.ticker.snapshot_queue),
            }
        return info

    def not_ready(self) -> str | None:
        """Why the gateway should not take new clients now (``/readyz``), or None."""
        if self._draining:
            return "shutting down"
        if not self.broker.is_available:
            return "the message broker is unreachable"
        return None

    async def stop(self) -> None:
        self._draining = True
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        self._daemon_stop.set()
        if self._daemon_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._daemon_task, 5)
        for server in self._servers:
            server.close()
        async def close(connection: StompConnection) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.transport.close(), 2)
            await connection.connection_lost()

        await asyncio.gather(*(close(connection) for connection in list(self.connections)))
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        await self.registry.close()
        await self.broker.close()
