"""``python -m gateway`` / ``stomp-gateway``: run the gateway until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from gateway.broker.base import BrokerError
from gateway.config import Config, ConfigError, parse_args
from gateway.logs import configure
from gateway.server import Gateway, ListenError

__all__ = ["configure_logging", "main", "run", "serve"]


async def run(config: Config) -> int:
    gateway = Gateway(config)
    try:
        await gateway.start()
    except BrokerError as error:
        print(f"stomp-gateway: {getattr(error, 'detail', None) or error.text}", file=sys.stderr)
        return 1
    except ListenError as error:
        print(f"stomp-gateway: {error}", file=sys.stderr)
        await gateway.stop()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if config.certfile else "http"
    ws_scheme = "wss" if config.certfile else "ws"
    host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    logging.getLogger("gateway").info(
        "serving %s://%s:%s/ (STOMP at %s://%s:%s/ws%s) with the %s broker",
        scheme,
        host,
        gateway.port,
        ws_scheme,
        host,
        gateway.port,
        f", TCP STOMP on port {gateway.tcp_port}" if gateway.tcp_port else "",
        gateway.broker.kind,
    )
    await stop.wait()
    logging.getLogger("gateway").info("shutting down")
    await gateway.stop()
    return 0


def serve(config: Config) -> int:
    """Run one gateway process (uvloop when installed) until SIGINT/SIGTERM; return its exit code."""
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        runner = asyncio.run
    return runner(run(config))


def configure_logging(config: Config) -> None:
    configure(config.log_level, config.log_format)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = parse_args(argv)
    except ConfigError as error:
        print(f"stomp-gateway: {error.message}", file=sys.stderr)
        sys.exit(2)
    configure_logging(config)
    if config.workers > 1:
        from gateway.workers import supervise

        sys.exit(supervise(config))
    sys.exit(serve(config))


if __name__ == "__main__":
    main()
