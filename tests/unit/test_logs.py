"""The log never carries a secret, whoever writes the line."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.logs import JsonFormatter, Redact, TextFormatter, redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("connecting to amqp://guest:hunter2@10.0.0.5:5672/%2F", "hunter2"),
        ("amqps://svc:p%40ss@rabbit/vhost?heartbeat=15", "p%40ss"),
        ("> CONNECT (('login', 'bob'), ('passcode', 'hunter2'), ('host', '/'))", "hunter2"),
        ('{"passcode": "hunter2"}', "hunter2"),
        ("password=hunter2 user=bob", "hunter2"),
        ("Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2ln", "eyJhbGciOi"),
        ("GET /ws?access_token=abc.def.ghi", "abc.def.ghi"),
    ],
)
def test_secrets_are_redacted(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert "******" in redact(text)


def test_text_without_secrets_is_untouched() -> None:
    text = "session s-1 ended after 1.5 s: DISCONNECT (user bob, vhost /, 127.0.0.1:5672)"
    assert redact(text) == text


def record(msg: str, *args: object, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("gateway", logging.INFO, __file__, 1, msg, args, None)
    rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_the_filter_redacts_arguments_too() -> None:
    rec = record("url %s", "amqp://u:topsecret@h/")
    Redact().filter(rec)
    assert "topsecret" not in rec.getMessage()


def test_json_and_text_carry_the_fields() -> None:
    rec = record("session %s ended", "s-1", session="s-1", frames_in=3, reason="ERROR Bad command")
    entry = json.loads(JsonFormatter().format(rec))
    assert entry["message"] == "session s-1 ended" and entry["frames_in"] == 3 and entry["level"] == "INFO"
    line = TextFormatter().format(rec)
    assert line.endswith('session=s-1 frames_in=3 reason="ERROR Bad command"')
