"""The gateway's log: text or JSON lines, and never a secret.

:func:`configure` sets up the root logger from the configuration. Every record passes :class:`Redact` first,
whatever library wrote it: credentials in URLs (``amqp://user:password@``) and ``passcode`` / ``password`` /
``token`` values are replaced by ``******``. Records may carry structured fields in ``extra={"fields": {...}}``:
the text format appends them as ``key=value``, the JSON format as members.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

__all__ = ["JsonFormatter", "Redact", "TextFormatter", "configure"]

_URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*(?::[^/@\s]*)?@")
_SECRET_VALUES = re.compile(
    r"""(?P<key>['"]?(?:passcode|password|passwd|token|access_token|authorization)['"]?\s*[:=,]\s*['"]?)"""
    r"""(?P<value>[^'"\s,)}\]]+)""",
    re.IGNORECASE,
)


_BEARER = re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def redact(text: str) -> str:
    text = _URL_CREDENTIALS.sub(r"\1******@", text)
    text = _BEARER.sub(r"\1******", text)
    return _SECRET_VALUES.sub(lambda m: m.group("key") + "******", text)


class Redact(logging.Filter):
    """Rewrites each record's message without credentials (the formatted message: arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{key}={_plain(value)}" for key, value in _fields(record).items())
        return f"{line} {extra}" if extra else line


def _plain(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=')) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = record.exc_text or redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Root logging at ``level`` in ``fmt`` ("text" or "json") on stderr; third-party chatter quieted."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(Redact())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    debug = level.upper() == "DEBUG"
    # websockets logs protocol details at INFO and below: for debugging only.
    logging.getLogger("websockets").setLevel(logging.DEBUG if debug else logging.WARNING)
