"""``python -m stock_daemon`` / ``stock-daemon``: publish fake stock ticks to RabbitMQ.

Usage::

    stock-daemon                                   # the book's six symbols, ticks every 0.5-2.5 s each
    stock-daemon --symbols AAPL=95,MSFT=50.25 --seed 7
    stock-daemon --rate 5000                       # load test: 5000 ticks/s in total, round-robin
    AMQP_URL=amqp://user:pass@rabbit:5672/vhost stock-daemon --log-level DEBUG

Every flag can also be set by an environment variable (the flag wins):

==================  =====================  =========================================
flag                environment            default
==================  =====================  =========================================
``--amqp-url``      ``AMQP_URL``           ``amqp://guest:guest@127.0.0.1:5672/``
``--symbols``       ``STOCK_SYMBOLS``      ``AAPL=95,MSFT=50,AMZN=300,GOOG=550,YHOO=35,FB=75``
``--min-interval``  ``STOCK_MIN_INTERVAL`` ``0.5`` (seconds)
``--max-interval``  ``STOCK_MAX_INTERVAL`` ``2.5`` (seconds)
``--rate``          ``STOCK_RATE``         unset (ticks/s in total; replaces the intervals)
``--seed``          ``STOCK_SEED``         unset (random)
``--exchange``      ``STOCK_EXCHANGE``     ``stocks``
``--log-level``     ``LOG_LEVEL``          ``INFO``
==================  =====================  =========================================

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
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from gateway.broker.base import BrokerError, BrokerUnavailable

from .daemon import DaemonConfig, run_daemon
from .publisher import DEFAULT_EXCHANGE
from .quotes import DEFAULT_SYMBOLS, format_symbols, parse_symbols

__all__ = ["build_parser", "config_from_args", "main"]

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
PROG = "stock-daemon"


def _symbols(text: str) -> dict[str, int]:
    try:
        return parse_symbols(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(kind: Callable[[str], float], what: str) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be greater than 0")
        return value

    return convert


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(LOG_LEVELS)}")
    return level


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line, with defaults taken from ``environ`` (``os.environ`` if omitted).

    Environment values go through the same validation as flags (argparse converts string defaults).
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish fake stock ticks to RabbitMQ's 'stocks' topic exchange and answer "
        "'stocks.snapshot' requests.",
        epilog="Every option can also be set by the environment variable named in its help.",
    )
    parser.add_argument(
        "--amqp-url",
        default=env.get("AMQP_URL", DEFAULT_AMQP_URL),
        help="RabbitMQ URL, with login, password and vhost (env AMQP_URL; default %(default)s)",
    )
    parser.add_argument(
        "--symbols",
        type=_symbols,
        default=env.get("STOCK_SYMBOLS", format_symbols(DEFAULT_SYMBOLS.items())),
        metavar="SYM=PRICE,...",
        help="symbols and opening prices (env STOCK_SYMBOLS; default %(default)s)",
    )
    parser.add_argument(
        "--min-interval",
        type=_number(float, "a number of seconds"),
        default=env.get("STOCK_MIN_INTERVAL", "0.5"),
        metavar="SECONDS",
        help="shortest time between two ticks of one symbol (env STOCK_MIN_INTERVAL; default %(default)s)",
    )
    parser.add_argument(
        "--max-interval",
        type=_number(float, "a number of seconds"),
        default=env.get("STOCK_MAX_INTERVAL", "2.5"),
        metavar="SECONDS",
        help="longest time between two ticks of one symbol (env STOCK_MAX_INTERVAL; default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=_number(float, "a number of ticks per second"),
        default=env.get("STOCK_RATE") or None,
        metavar="TICKS_PER_SECOND",
        help="ticks per second across all symbols, round-robin; overrides the intervals "
        "(env STOCK_RATE; default: unset)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=env.get("STOCK_SEED") or None,
        help="seed for reproducible prices (env STOCK_SEED; default: random)",
    )
    parser.add_argument(
        "--exchange",
        default=env.get("STOCK_EXCHANGE", DEFAULT_EXCHANGE),
        help="topic exchange to publish to (env STOCK_EXCHANGE; default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=env.get("LOG_LEVEL", "INFO"),
        help="CRITICAL, ERROR, WARNING, INFO or DEBUG (env LOG_LEVEL; default %(default)s)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> DaemonConfig:
    """The :class:`DaemonConfig` that parsed arguments describe (``ValueError`` if inconsistent)."""
    return DaemonConfig(
        symbols=args.symbols,
        min_interval=args.min_interval,
        max_interval=args.max_interval,
        rate=args.rate,
        seed=args.seed,
        exchange=args.exchange,
    )


def redact_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def _quiet_client_libraries() -> Iterator[None]:
    """Silence the AMQP libraries' own error logs while connecting, so that a broker that cannot be
    reached gives the one line :func:`_run` prints (unless DEBUG logging asks for everything)."""
    loggers = [logging.getLogger(name) for name in ("aiormq", "aio_pika")]
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _describe(exc: BaseException, url: str) -> str:
    """One line saying why RabbitMQ at ``url`` could not be used."""
    if isinstance(exc, BrokerUnavailable):
        return exc.detail  # names where RabbitMQ is, never the credentials
    if isinstance(exc, BrokerError):
        return f"RabbitMQ at {redact_url(url)} refused: {exc.text}"
    return f"cannot reach RabbitMQ at {redact_url(url)}: {exc}"


async def _run(url: str, config: DaemonConfig) -> int:
    # Imported here so the rest of the package (and its unit tests) does not need aio-pika.
    from gateway.broker.amqp import AmqpBroker, credentials_from_url

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(signum, stop.set)

    broker = AmqpBroker(url)
    try:
        try:
            with _quiet_client_libraries():
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
    """Entry point of ``stock-daemon``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
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
