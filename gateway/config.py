"""Every setting of the gateway in one value, with its default, its flag and its environment variable.

:func:`parse_args` turns a command line plus the environment into a :class:`Config`; ``python -m gateway
--help`` prints the same table. Limits are named here and nowhere else.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["Config", "build_parser", "parse_args"]


def _setting(default: Any, flag: str, env: str, help: str, **kw: Any) -> Any:
    meta = {"flag": flag, "env": env, "help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class Config:
    """The gateway's configuration. Field metadata carries the flag, the variable and the help text."""

    host: str = _setting("127.0.0.1", "--host", "GATEWAY_HOST", "address to listen on")
    port: int = _setting(8181, "--port", "PORT", "WebSocket/HTTP port (ws://HOST:PORT/ws)")
    tcp_port: int | None = _setting(
        None,
        "--tcp-port",
        "GATEWAY_TCP_PORT",
        "also serve plain STOMP over TCP on this port (61613 is usual)",
    )
    broker: str = _setting(
        "auto",
        "--broker",
        "GATEWAY_BROKER",
        "'rabbitmq', 'memory' (embedded, nothing survives a restart) or 'auto': rabbitmq when an AMQP URL is set",
        choices=["auto", "rabbitmq", "memory"],
    )
    amqp_url: str | None = _setting(
        None,
        "--amqp-url",
        "AMQP_URL",
        "RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/ (selects RabbitMQ)",
    )
    default_login: str = _setting(
        "guest", "--default-login", "GATEWAY_DEFAULT_LOGIN", "login for CONNECT without one"
    )
    default_passcode: str = _setting(
        "guest", "--default-passcode", "GATEWAY_DEFAULT_PASSCODE", "passcode for CONNECT without a login"
    )
    default_vhost: str = _setting(
        "/", "--default-vhost", "GATEWAY_DEFAULT_VHOST", "vhost for CONNECT without host"
    )
    allowed_origins: list[str] = _setting(
        [],
        "--allowed-origin",
        "GATEWAY_ALLOWED_ORIGINS",
        "browser Origin allowed to connect (repeatable; env: comma-separated); none given = any origin; "
        "clients that send no Origin are always accepted",
        action="append",
    )
    certfile: str | None = _setting(
        None, "--certfile", "GATEWAY_CERTFILE", "TLS certificate (PEM) for wss:// and https://"
    )
    keyfile: str | None = _setting(None, "--keyfile", "GATEWAY_KEYFILE", "TLS private key (PEM)")
    compression: bool = _setting(
        False,
        "--compression",
        "GATEWAY_COMPRESSION",
        "offer permessage-deflate (costs CPU and ~50 KiB per connection)",
        kind="bool",
    )
    max_frame_size: int = _setting(
        4 * 1024 * 1024,
        "--max-frame-size",
        "GATEWAY_MAX_FRAME_SIZE",
        "largest STOMP frame after CONNECT, bytes",
    )
    max_frame_size_unauthenticated: int = _setting(
        64 * 1024,
        "--max-frame-size-unauthenticated",
        "GATEWAY_MAX_FRAME_SIZE_UNAUTHENTICATED",
        "largest STOMP frame before CONNECT succeeds, bytes",
    )
    max_headers: int = _setting(100, "--max-headers", "GATEWAY_MAX_HEADERS", "most headers in one frame")
    max_header_line: int = _setting(
        8 * 1024,
        "--max-header-line",
        "GATEWAY_MAX_HEADER_LINE",
        "longest header line (and command line), bytes",
    )
    max_subscriptions: int = _setting(
        1000, "--max-subscriptions", "GATEWAY_MAX_SUBSCRIPTIONS", "most subscriptions one session may hold"
    )
    max_transactions: int = _setting(
        100, "--max-transactions", "GATEWAY_MAX_TRANSACTIONS", "most open transactions in one session"
    )
    max_transaction_frames: int = _setting(
        10_000,
        "--max-transaction-frames",
        "GATEWAY_MAX_TRANSACTION_FRAMES",
        "most frames buffered in one transaction",
    )
    max_transaction_bytes: int = _setting(
        16 * 1024 * 1024,
        "--max-transaction-bytes",
        "GATEWAY_MAX_TRANSACTION_BYTES",
        "bytes of bodies one session may hold in open transactions",
    )
    max_outbound_buffer: int = _setting(
        4 * 1024 * 1024,
        "--max-outbound-buffer",
        "GATEWAY_MAX_OUTBOUND_BUFFER",
        "bytes queued for one slow client before it is disconnected with an ERROR",
    )
    login_timeout: float = _setting(
        10.0, "--login-timeout", "GATEWAY_LOGIN_TIMEOUT", "seconds to send CONNECT"
    )
    heartbeat_min: int = _setting(
        1000,
        "--heartbeat-min",
        "GATEWAY_HEARTBEAT_MIN",
        "smallest heart-beat interval the server agrees to, ms",
    )
    heartbeat_max: int = _setting(
        600_000,
        "--heartbeat-max",
        "GATEWAY_HEARTBEAT_MAX",
        "largest heart-beat interval the server agrees to, ms",
    )
    topic_exchange: str = _setting(
        "amq.topic", "--topic-exchange", "GATEWAY_TOPIC_EXCHANGE", "exchange behind /topic"
    )
    sessions_per_connection: int = _setting(
        500,
        "--sessions-per-connection",
        "GATEWAY_SESSIONS_PER_CONNECTION",
        "STOMP sessions sharing one AMQP connection",
    )
    shared_fanout: bool = _setting(
        True,
        "--shared-fanout",
        "GATEWAY_SHARED_FANOUT",
        "consume a non-durable /topic or /exchange subscription once per AMQP connection and fan out in process",
        kind="bool",
    )
    workers: int = _setting(
        1,
        "--workers",
        "GATEWAY_WORKERS",
        "gateway processes sharing the port (SO_REUSEPORT); needs RabbitMQ, as the embedded broker is per process",
    )
    with_stock_daemon: bool = _setting(
        False,
        "--with-stock-daemon",
        "GATEWAY_WITH_STOCK_DAEMON",
        "run the stock price daemon in this process",
        kind="bool",
    )
    web_root: str | None = _setting(
        None,
        "--web-root",
        "GATEWAY_WEB_ROOT",
        "folder served at / (default: the bundled ticker page; 'none' disables)",
    )
    server_name: str = _setting(
        "stomp-ws-gateway/0.1", "--server-name", "GATEWAY_SERVER_NAME", "CONNECTED server header"
    )
    log_level: str = _setting("INFO", "--log-level", "LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="STOMP 1.0-1.2 over WebSocket (and TCP) into RabbitMQ or the embedded broker.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag can also be set through the environment variable shown in brackets.",
    )
    for f in fields(Config):
        meta = f.metadata
        helptext = f"{meta['help']} [{meta['env']}]"
        if meta.get("kind") == "bool":
            parser.add_argument(
                meta["flag"], dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext
            )
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": helptext}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if meta.get("action") == "append":
            kwargs["action"] = "append"
        elif f.type in ("int", "int | None"):
            kwargs["type"] = int
        elif f.type == "float":
            kwargs["type"] = float
        parser.add_argument(meta["flag"], **kwargs)
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields(Config):
        meta = f.metadata
        given = getattr(ns, f.name)
        if given is None and meta["env"] in env and env[meta["env"]] != "":
            raw = env[meta["env"]]
            if meta.get("kind") == "bool":
                given = _parse_bool(raw)
            elif meta.get("action") == "append":
                given = [part.strip() for part in raw.split(",") if part.strip()]
            elif f.type in ("int", "int | None"):
                given = int(raw)
            elif f.type == "float":
                given = float(raw)
            else:
                given = raw
        if given is not None:
            values[f.name] = given
    config = Config(**values)
    if config.broker == "auto":
        config.broker = "rabbitmq" if config.amqp_url else "memory"
    if config.broker == "rabbitmq" and not config.amqp_url:
        config.amqp_url = "amqp://guest:guest@127.0.0.1:5672/"
    if bool(config.certfile) != bool(config.keyfile):
        raise SystemExit("--certfile and --keyfile go together")
    if config.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if config.workers > 1 and config.broker == "memory":
        raise SystemExit("--workers > 1 needs RabbitMQ (--amqp-url): the embedded broker lives in one process")
    if config.heartbeat_min > config.heartbeat_max:
        raise SystemExit("--heartbeat-min must not exceed --heartbeat-max")
    return config
