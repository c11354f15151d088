"""``python -m stock_daemon`` / ``stock-daemon``: publish fake stock ticks to RabbitMQ.

Usage::

    stock-daemon                                   # the book's six symbols, ticks every 0.5-2.5 s each
    stock-daemon --symbols AAPL=95,MSFT=50.25 --seed 7
    stock-daemon --rate 5000                       # load test: 5000 ticks/s in total, round-robin
    AMQP_URL=amqp://user:pass@rabbit:5672/vhost stock-daemon --log-level DEBUG

Every flag can also be set by an environment variable (the flag wins); ``stock-daemon --help`` and the
README's table list them with their defaults. They are defined once: :class:`Command` (where RabbitMQ is,
how much to log) and the settings of :class:`stock_daemon.daemon.DaemonConfig`, read by the gateway's own
machinery (:mod:`gateway.config`): the same value syntax, and a bad setting is one line on stderr and exit
status 2, as for the gateway.

What it publishes is described in :mod:`stock_daemon.publisher` (ticks) and :mod:`stock_daemon.snapshot`
(the ``stocks.snapshot`` request queue). SIGINT and SIGTERM stop it cleanly (exit status 0). If RabbitMQ
cannot be reached or refuses the login at start, it prints one line on stderr and exits with status 1;
once running, it rides out broker restarts (see :mod:`stock_daemon.daemon`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from gateway.broker.base import BrokerError, BrokerUnavailable
from gateway.config import ConfigError, SettingsParser, markdown_table
from gateway.settings import setting

from .daemon import DaemonConfig, run_daemon

__all__ = ["Command", "build_parser", "config_from_args", "main", "settings_table"]

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
PROG = "stock-daemon"


@dataclass(frozen=True, slots=True)
class Command:
    """The settings of the ``stock-daemon`` process itself, next to those of :class:`DaemonConfig`."""

    amqp_url: str = setting(
        DEFAULT_AMQP_URL, "--amqp-url", "AMQP_URL", "RabbitMQ URL, with login, password and vhost", kind="url"
    )
    log_level: str = setting(
        "INFO", "--log-level", "LOG_LEVEL", "CRITICAL, ERROR, WARNING, INFO or DEBUG", choices=LOG_LEVELS
    )


def build_parser(environ: Mapping[str, str] | None = None) -> SettingsParser:
    """The command line; its ``parse_args`` gives every setting's value, the flag's, else the variable's
    from ``environ`` (``os.environ`` if omitted), else the default, and raises :class:`ConfigError`."""
    return SettingsParser(
        Command,
        DaemonConfig,
        environ=environ,
        prog=PROG,
        description="Publish fake stock ticks to RabbitMQ's 'stocks' topic exchange and answer "
        "'stocks.snapshot' requests.",
        epilog="Every flag can also be set through the environment variable shown in brackets; flags win.",
    )


def config_from_args(args: argparse.Namespace) -> DaemonConfig:
    """The :class:`DaemonConfig` that parsed arguments describe (:class:`ConfigError` if inconsistent)."""
    return DaemonConfig.from_settings(args)


def settings_table() -> str:
    """The README's table of ``stock-daemon``'s settings (a test compares the two)."""
    return markdown_table(Command, DaemonConfig)


def redact_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _describe(exc: BaseException, url: str) -> str:
    """One line saying why RabbitMQ at ``url`` could not be used."""
    if isinstance(exc, BrokerUnavailable):
        return exc.detail  # names where RabbitMQ is, never the credentials
    if isinstance(exc, BrokerError):
        return f"RabbitMQ at {redact_url(url)} refused: {exc.text}"
    return f"cannot reach RabbitMQ at {redact_url(url)}: {exc}"


async def _run(url: str, config: DaemonConfig) -> int:
    # Imported here so the rest of the package (and its unit tests) does not load the AMQP client.
    from gateway.broker.amqp import AmqpBroker, credentials_from_url

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(signum, stop.set)

    broker = AmqpBroker(url)
    try:
        try:
            await broker.start()
            login, passcode, vhost = credentials_from_url(url)
            principal = await broker.authenticate(login, passcode, vhost)
        except (BrokerError, OSError) as exc:
            print(f"{PROG}: {_describe(exc, url)}", file=sys.stderr)
            return 1
        await run_daemon(broker, principal, config, stop=stop)
        return 0
    finally:
        await broker.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stock-daemon``; returns the exit status (2 for a bad setting, printed as one line)."""
    try:
        args = build_parser().parse_args(argv)
        config = config_from_args(args)
    except ConfigError as error:
        print(f"{PROG}: {error.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(_run(args.amqp_url, config))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the handlers are installed
        return 130


if __name__ == "__main__":
    sys.exit(main())
