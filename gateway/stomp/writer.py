"""The one STOMP serializer: every frame the gateway writes to a client is made here (sans-I/O).

* :func:`serialize` writes one :class:`~gateway.stomp.frames.Frame` (CONNECTED, RECEIPT, ERROR, ...).
* :class:`MessageTemplate` writes MESSAGE frames: the part shared by every receiver of a delivery is
  serialized once per version family, and each session only adds its ``subscription`` (and ``ack``).

Header escaping is :func:`~gateway.stomp.frames.encode_header_value`, the inverse of what the parser
decodes. Transports frame these bytes once more (WebSocket) or write them as they are (TCP); any cache of
that framing is the transport's own.
"""

from __future__ import annotations

from gateway.stomp.frames import UNESCAPED_COMMANDS, Frame, encode_header_value

__all__ = ["MessageTemplate", "is_text", "serialize"]


def serialize(frame: Frame, version: str | None = "1.2") -> bytes:
    """The wire bytes of ``frame`` for ``version``: command, escaped headers, blank line, body, NUL.

    No EOL follows the NUL (the WebSocket transport sends one frame per message). Any ``content-length``
    header in ``frame.headers`` is dropped and, for a non-empty body, the true one is written after the
    other headers. CONNECT, STOMP and CONNECTED headers get only the LF/CR protection of
    :func:`encode_header_value`, whatever the version.
    """
    command = frame.command
    if command in UNESCAPED_COMMANDS:
        version = None
    lines = [command]
    for name, value in frame.headers:
        if name == "content-length":
            continue
        lines.append(f"{encode_header_value(name, version)}:{encode_header_value(value, version)}")
    body = frame.body
    if body:
        lines.append(f"content-length:{len(body)}")
    lines.append("")
    lines.append("")
    return b"".join(("\n".join(lines).encode("utf-8"), body, b"\x00"))


def is_text(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 (a WebSocket text message) rather than binary."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class MessageTemplate:
    """A delivery turned into the shared part of a MESSAGE frame, serialized once per version family.

    ``headers`` are the delivery's headers in wire order (``destination``, ``message-id``, ``redelivered``,
    then the properties). ``render(version, subscription)`` prepends the only per-session header
    (``subscription``) and, for 1.2 client ack modes, adds ``ack``. For shared fan-out every session renders
    the same template, and sessions whose subscription ids are equal (every stompjs page calls its first
    one ``sub-0``) get the very same bytes object.
    """

    __slots__ = ("_rendered", "_tails", "body", "headers", "is_text")

    def __init__(self, headers: list[tuple[str, str]], body: bytes) -> None:
        self.headers = headers
        self.body = body
        self.is_text = is_text(body)
        self._tails: dict[str, bytes] = {}
        self._rendered: dict[tuple[str, str | None], bytes] = {}

    @property
    def message_id(self) -> str:
        return self.headers[1][1]

    def _tail(self, family: str) -> bytes:
        cached = self._tails.get(family)
        if cached is None:
            parts = [
                f"{encode_header_value(k, family)}:{encode_header_value(v, family)}\n"
                for k, v in self.headers
                if k != "content-length"
            ]
            if self.body:
                parts.append(f"content-length:{len(self.body)}\n")
            cached = "".join(parts).encode() + b"\n" + self.body + b"\x00"
            self._tails[family] = cached
        return cached

    def render(self, version: str, subscription: str | None, ack: str | None = None) -> bytes:
        family = "1.0" if version == "1.0" else "1.2"
        if ack is None:
            key = (family, subscription)
            rendered = self._rendered.get(key)
            if rendered is None:
                rendered = self._rendered[key] = self._render(family, subscription, None)
            return rendered
        return self._render(family, subscription, ack)

    def _render(self, family: str, subscription: str | None, ack: str | None) -> bytes:
        head = b"MESSAGE\n"
        if subscription is not None:
            head += b"subscription:" + encode_header_value(subscription, family).encode() + b"\n"
        if ack is not None:
            head += b"ack:" + encode_header_value(ack, family).encode() + b"\n"
        return head + self._tail(family)
