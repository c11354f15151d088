"""Reading settings: a command line plus the environment into a settings dataclass.

The settings themselves are defined once, in :mod:`gateway.settings` (flag, variable, default, help, kind);
this module reads them. :class:`SettingsParser` makes the command line of any settings dataclass (the
gateway's :class:`Config`, the stock daemon's), :func:`parse_args` gives the gateway's :class:`Config`,
``python -m gateway --help`` and :func:`markdown_table` (the README's table) come from the same fields.

Every process reads values the same way: a flag wins over its variable, which wins over the default; an
empty variable counts as unset; sizes take ``KiB``/``MiB``/``GiB``, booleans ``yes``/``no`` and the like.
A bad value raises :class:`ConfigError`, one line naming the flag or variable, the value and the form
expected, which the command prints before exiting with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from gateway.settings import Config, default_of, default_text, settings_fields

__all__ = [
    "Config",
    "ConfigError",
    "SettingsParser",
    "build_parser",
    "markdown_table",
    "parse_args",
    "read_environment",
]

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


def _parse_int(text: str, minimum: int | None = 1) -> int:
    stripped = text.strip()
    if not stripped.isascii() or not stripped.removeprefix("-").isdigit():
        raise ValueError("a whole number")
    value = int(stripped)
    if minimum is not None and value < minimum:
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


def _parse_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number greater than 0 (e.g. 250 or 2.5)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("a number greater than 0")
    return value


def _show(value: str, kind: str | None) -> str:
    """The value as the error line may show it: never an AMQP URL's password."""
    if kind == "url":
        parts = urlsplit(value)
        if parts.password:
            value = value.replace(f":{parts.password}@", ":******@", 1)
    return repr(value)


_READERS: dict[str, Callable[[str], Any]] = {
    "size": _parse_size,
    "bool": _parse_bool,
    "port": _parse_port,
    "seconds": _parse_seconds,
    "number": _parse_number,
    "url": _parse_url,
    "file": _parse_file,
}
_METAVARS = {
    "size": "SIZE", "port": "PORT", "url": "URL", "file": "FILE", "seconds": "SECONDS", "number": "NUMBER", "int": "N"
}


def _choice(text: str, choices: Sequence[str]) -> str:
    value = text.strip()
    if all(choice.isupper() for choice in choices):  # log levels: 'debug' means DEBUG
        value = value.upper()
    if value not in choices:
        raise ValueError("one of " + ", ".join(choices))
    return value


def _convert(f: Any, raw: str, source: str) -> Any:
    """One setting's text (from ``source``: its flag or its variable) as a value, or a :class:`ConfigError`."""
    meta = f.metadata
    kind = meta["kind"]
    if "parse" in meta:
        try:
            return meta["parse"](raw)
        except ValueError as exc:  # the setting's own reader names the value and what it expected
            raise ConfigError(f"{source}: {exc}") from None
    if meta.get("action") == "append" and kind != "list":  # a repeatable setting of another kind
        return [_convert_one(f, part.strip(), source) for part in raw.split(",") if part.strip()]
    return _convert_one(f, raw, source)


def _convert_one(f: Any, raw: str, source: str) -> Any:
    meta = f.metadata
    kind = meta["kind"]
    try:
        if kind == "choice":
            return _choice(raw, meta["choices"])
        if kind == "list":
            return [part.strip() for part in raw.split(",") if part.strip()]
        if kind == "int":
            return _parse_int(raw, meta["minimum"])
        if kind in _READERS:
            return _READERS[kind](raw)
        return raw
    except ValueError as exc:
        raise ConfigError(f"{source}: {_show(raw, kind)} is not valid: expected {exc}") from None


def _value(f: Any, given: Any, env: Mapping[str, str]) -> Any:
    """The flag's value if given, else the variable's if set and not empty, else the default."""
    meta = f.metadata
    if isinstance(given, bool):
        return given
    if isinstance(given, list):
        return [item for raw in given for item in _convert(f, raw, meta["flag"])]
    if given is not None:
        return _convert(f, given, meta["flag"])
    text = env.get(meta["env"], "")
    if text.strip() != "":
        return _convert(f, text, meta["env"])
    return default_of(f)


EPILOG = (
    "Every flag can also be set through the environment variable shown in brackets; flags win.\n"
    "Sizes take plain bytes or KiB/MiB/GiB (4MiB); booleans take true/false, yes/no, on/off, 1/0."
)


class SettingsParser(argparse.ArgumentParser):
    """The command line of one or more settings dataclasses: a flag per setting (``--help`` shows its
    default and variable), and a :meth:`parse_args` whose namespace holds every setting's **value**: the
    flag's, else the variable's (from ``environ``, ``os.environ`` if None), else the default. A bad value,
    an unknown flag or a missing argument raises :class:`ConfigError` (nothing is printed)."""

    def __init__(self, *classes: type, environ: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EPILOG)
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.settings = settings_fields(*classes)
        self.environ = environ
        for f in self.settings:
            self._add_setting(f)

    def _add_setting(self, f: Any) -> None:
        meta = f.metadata
        helptext = f"{meta['help']} (default: {default_text(f)}) [{meta['env']}]"
        if meta["kind"] == "bool":
            self.add_argument(
                meta["flag"], dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext
            )
            return
        metavar = meta.get("metavar") or _METAVARS.get(meta["kind"], "TEXT")
        if meta["kind"] == "choice":
            metavar = "{" + ",".join(meta["choices"]) + "}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": helptext, "metavar": metavar}
        if meta.get("action") == "append":
            kwargs["action"] = "append"
        self.add_argument(meta["flag"], **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit code 2
        raise ConfigError(message)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        env = os.environ if self.environ is None else self.environ
        for f in self.settings:
            setattr(parsed, f.name, _value(f, getattr(parsed, f.name), env))
        return parsed, extras


def read_environment(cls: type, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The values of ``cls``'s settings as the environment alone sets them (no command line): what a
    process reads of another one's settings (the gateway of the stock daemon's). Raises :class:`ConfigError`."""
    return SettingsParser(cls, environ=environ).parse_args([])


def markdown_table(*classes: type) -> str:
    """The README's table of the settings of ``classes`` (default: the gateway's :class:`Config`), made
    from their definitions; a test compares the README with it."""
    rows = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for f in settings_fields(*(classes or (Config,))):
        meta = f.metadata
        flag = f"`{meta['flag']}` / `--no-{meta['flag'][2:]}`" if meta["kind"] == "bool" else f"`{meta['flag']}`"
        rows.append(f"| {flag} | `{meta['env']}` | {default_text(f)} | {meta['help'].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def build_parser(environ: Mapping[str, str] | None = None) -> SettingsParser:
    """The gateway's command line (``python -m gateway``); see :class:`SettingsParser`."""
    return SettingsParser(
        Config,
        environ=environ,
        prog="python -m gateway",
        description="STOMP 1.0-1.2 over WebSocket (and TCP) into RabbitMQ or the embedded broker.",
    )


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Flags win over environment variables, which win over defaults. A bad setting raises
    :class:`ConfigError` naming the flag or variable, the value and the form expected."""
    env = os.environ if environ is None else environ
    config = Config(**vars(build_parser(env).parse_args(argv)))
    if config.broker == "auto":
        config.broker = "rabbitmq" if config.amqp_urls else "memory"
    if config.broker == "rabbitmq" and not config.amqp_urls:
        config.amqp_urls = ["amqp://guest:guest@127.0.0.1:5672/"]
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
    if config.jwt_cookie and not (config.jwt_secret_file or config.jwt_key_file):
        raise ConfigError("--jwt-cookie needs --jwt-secret-file or --jwt-key-file (keys to verify the token with)")
    from gateway.auth import load_policy

    try:
        load_policy(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.with_stock_daemon:
        from stock_daemon.daemon import DaemonConfig

        try:
            DaemonConfig.from_env(env)
        except ConfigError as exc:
            raise ConfigError(f"--with-stock-daemon: {exc.message}") from None
