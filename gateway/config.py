"""Every setting of the gateway in one value, with its default, its flag and its environment variable.

:func:`parse_args` turns a command line plus the environment into a :class:`Config`; ``python -m gateway
--help`` prints the same table. Limits are named here and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn
from urllib.parse import urlsplit

__all__ = ["Config", "ConfigError", "build_parser", "markdown_table", "parse_args"]


def _setting(default: Any, flag: str, env: str, help: str, **kw: Any) -> Any:
    meta = {"flag": flag, "env": env, "help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class Config:
    """The gateway's configuration. Field metadata carries the flag, the variable and the help text."""

    host: str = _setting("127.0.0.1", "--host", "GATEWAY_HOST", "address to listen on")
    port: int = _setting(8181, "--port", "PORT", "WebSocket/HTTP port (ws://HOST:PORT/ws)", kind="port")
    tcp_port: int | None = _setting(
        None,
        "--tcp-port",
        "GATEWAY_TCP_PORT",
        "also serve plain STOMP over TCP on this port (61613 is usual)",
        kind="port",
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
        "RabbitMQ URL, amqp:// or amqps://, e.g. amqp://guest:guest@127.0.0.1:5672/ (selects RabbitMQ)",
        kind="url",
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
        None, "--certfile", "GATEWAY_CERTFILE", "TLS certificate (PEM) for wss:// and https://", kind="file"
    )
    keyfile: str | None = _setting(None, "--keyfile", "GATEWAY_KEYFILE", "TLS private key (PEM)", kind="file")
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
        "largest STOMP frame after CONNECT",
        kind="size",
    )
    max_frame_size_unauthenticated: int = _setting(
        64 * 1024,
        "--max-frame-size-unauthenticated",
        "GATEWAY_MAX_FRAME_SIZE_UNAUTHENTICATED",
        "largest STOMP frame before CONNECT succeeds",
        kind="size",
    )
    max_headers: int = _setting(100, "--max-headers", "GATEWAY_MAX_HEADERS", "most headers in one frame")
    max_header_line: int = _setting(
        8 * 1024,
        "--max-header-line",
        "GATEWAY_MAX_HEADER_LINE",
        "longest header line (and command line)",
        kind="size",
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
        "bodies one session may hold in open transactions",
        kind="size",
    )
    max_outbound_buffer: int = _setting(
        4 * 1024 * 1024,
        "--max-outbound-buffer",
        "GATEWAY_MAX_OUTBOUND_BUFFER",
        "what may wait behind the message being written to one client before it is disconnected as slow",
        kind="size",
    )
    login_timeout: float = _setting(
        10.0, "--login-timeout", "GATEWAY_LOGIN_TIMEOUT", "seconds to send CONNECT", kind="seconds"
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
    log_level: str = _setting(
        "INFO", "--log-level", "LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    log_format: str = _setting(
        "text", "--log-format", "LOG_FORMAT", "log lines as text or as JSON objects", choices=["text", "json"]
    )


class ConfigError(SystemExit):
    """A bad setting: ``message`` is the one line to print; the exit code is 2 (as for a usage error)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE = re.compile(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError("a size in bytes, or a number with KiB, MiB or GiB (e.g. 65536 or 4MiB)")
    value = int(match.group(1)) * _SIZE_UNITS[unit]
    if value < 1:
        raise ValueError("a size of at least 1 byte")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("true or false (also yes/no, on/off, 1/0)")


def _parse_int(text: str, minimum: int = 1) -> int:
    stripped = text.strip()
    if not stripped.isascii() or not stripped.lstrip("-").isdigit():
        raise ValueError("a whole number")
    value = int(stripped)
    if value < minimum:
        raise ValueError(f"a whole number of at least {minimum}")
    return value


def _parse_port(text: str) -> int:
    try:
        value = _parse_int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise ValueError("a port number from 0 to 65535")
    return value


def _parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number of seconds (e.g. 10 or 2.5)") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("a number of seconds greater than 0")
    return value


def _parse_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("an amqp:// or amqps:// URL with a host, e.g. amqp://user:password@host:5672/vhost")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("an amqp:// or amqps:// URL whose port is a number from 1 to 65535") from None
    return text.strip()


def _parse_file(text: str) -> str:
    if not os.path.isfile(text):
        raise ValueError("an existing, readable file (no such file)")
    if not os.access(text, os.R_OK):
        raise ValueError("an existing, readable file (not readable)")
    return text


def _show(value: str, kind: str | None) -> str:
    """The value as the error line may show it: never an AMQP URL's password."""
    if kind == "url":
        parts = urlsplit(value)
        if parts.password:
            value = value.replace(f":{parts.password}@", ":******@", 1)
    return repr(value)


_PARSERS = {
    "size": _parse_size,
    "bool": _parse_bool,
    "port": _parse_port,
    "seconds": _parse_seconds,
    "url": _parse_url,
    "file": _parse_file,
}
_INT_MINIMUM = {"heartbeat_min": 0, "heartbeat_max": 0}


def _convert(f: Any, raw: str, source: str) -> Any:
    """One setting's text (from ``source``: its flag or its variable) as a value, or a ConfigError."""
    meta = f.metadata
    kind = meta.get("kind")
    try:
        if "choices" in meta:
            choices = meta["choices"]
            value = raw.strip().upper() if f.name == "log_level" else raw.strip()
            if value not in choices:
                raise ValueError("one of " + ", ".join(choices))
            return value
        if meta.get("action") == "append":
            return [part.strip() for part in raw.split(",") if part.strip()]
        if kind in _PARSERS:
            return _PARSERS[kind](raw)
        if f.type in ("int", "int | None"):
            return _parse_int(raw, _INT_MINIMUM.get(f.name, 1))
        return raw
    except ValueError as exc:
        raise ConfigError(f"{source}: {_show(raw, kind)} is not valid: expected {exc}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2
        raise ConfigError(message)


def _default_text(f: Any) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if f.metadata.get("kind") == "size" and isinstance(default, int):
        for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if default % factor == 0:
                return f"{default // factor} {unit}"
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default == []:
        return "unset"
    return str(default)


def markdown_table() -> str:
    """The README's configuration table, made from the settings themselves (a test compares the two)."""
    rows = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for f in fields(Config):
        meta = f.metadata
        flag = f"`{meta['flag']}` / `--no-{meta['flag'][2:]}`" if meta.get("kind") == "bool" else f"`{meta['flag']}`"
        rows.append(f"| {flag} | `{meta['env']}` | {_default_text(f)} | {meta['help'].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m gateway",
        description="STOMP 1.0-1.2 over WebSocket (and TCP) into RabbitMQ or the embedded broker.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag can also be set through the environment variable shown in brackets; flags win.\n"
        "Sizes take plain bytes or KiB/MiB/GiB (4MiB); booleans take true/false, yes/no, on/off, 1/0.",
    )
    for f in fields(Config):
        meta = f.metadata
        helptext = f"{meta['help']} (default: {_default_text(f)}) [{meta['env']}]"
        if meta.get("kind") == "bool":
            parser.add_argument(
                meta["flag"], dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext
            )
            continue
        metavar = {"size": "SIZE", "port": "PORT", "url": "URL", "file": "FILE", "seconds": "SECONDS"}.get(
            meta.get("kind", ""), "N" if f.type in ("int", "int | None") else "TEXT"
        )
        if "choices" in meta:
            metavar = "{" + ",".join(meta["choices"]) + "}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": helptext, "metavar": metavar}
        if meta.get("action") == "append":
            kwargs["action"] = "append"
        parser.add_argument(meta["flag"], **kwargs)
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Flags win over environment variables, which win over defaults. A bad setting raises
    :class:`ConfigError` naming the flag or variable, the value and the form expected."""
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields(Config):
        meta = f.metadata
        given = getattr(ns, f.name)
        if isinstance(given, bool):
            values[f.name] = given
        elif isinstance(given, list):
            values[f.name] = [item for raw in given for item in _convert(f, raw, meta["flag"])]
        elif given is not None:
            values[f.name] = _convert(f, given, meta["flag"])
        elif env.get(meta["env"], "") != "":
            values[f.name] = _convert(f, env[meta["env"]], meta["env"])
    config = Config(**values)
    if config.broker == "auto":
        config.broker = "rabbitmq" if config.amqp_url else "memory"
    if config.broker == "rabbitmq" and not config.amqp_url:
        config.amqp_url = "amqp://guest:guest@127.0.0.1:5672/"
    _check(config, env)
    return config


def _check(config: Config, env: Mapping[str, str]) -> None:
    """Settings that are wrong together, or that only fail once used."""
    if bool(config.certfile) != bool(config.keyfile):
        raise ConfigError("--certfile and --keyfile go together")
    if config.certfile and config.keyfile:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.certfile, config.keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"--certfile {config.certfile!r} / --keyfile {config.keyfile!r}: not a usable certificate and key "
                f"in PEM ({getattr(exc, 'reason', None) or exc})"
            ) from None
    if config.workers > 1 and config.broker == "memory":
        raise ConfigError("--workers > 1 needs RabbitMQ (--amqp-url): the embedded broker lives in one process")
    if config.heartbeat_min > config.heartbeat_max:
        raise ConfigError("--heartbeat-min must not exceed --heartbeat-max")
    if config.max_frame_size_unauthenticated > config.max_frame_size:
        raise ConfigError("--max-frame-size-unauthenticated must not exceed --max-frame-size")
    if config.with_stock_daemon:
        from stock_daemon.daemon import DaemonConfig

        try:
            DaemonConfig.from_env(env)
        except ValueError as exc:
            raise ConfigError(f"--with-stock-daemon: {exc}") from None
