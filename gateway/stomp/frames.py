"""STOMP 1.0/1.1/1.2 frame codec, sans-I/O.

Bytes go in, :class:`Frame` values come out, one per :meth:`FrameParser.next_frame` call. Frames go out
through :mod:`gateway.stomp.writer`, the one serializer. Nothing here does I/O, logging or time: the transport feeds whatever chunks it
received and writes whatever bytes it is given.

Wire format (STOMP 1.2 "Augmented BNF", accepted for every version)::

    frame   = command EOL *(header EOL) EOL body NUL *EOL
    EOL     = [CR] LF

* Heart-beats (runs of CR/LF) between frames are skipped.
* ``content-length`` fixes the body size (the body may then hold NULs); without it the body runs to the
  first NUL.
* Header escaping depends on the negotiated version and is never applied to CONNECT, STOMP and CONNECTED
  frames (spec: "CONNECT and CONNECTED frames do not escape").
* Every malformed input and every exceeded limit raises :class:`ProtocolError`, which carries the ERROR
  frame to send before closing. No other exception leaves :meth:`FrameParser.next_frame`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.settings import DEFAULTS

__all__ = [
    "DEFAULT_LIMITS",
    "SUPPORTED_VERSIONS_TEXT",
    "UNESCAPED_COMMANDS",
    "VERSIONS",
    "Frame",
    "FrameParser",
    "Limits",
    "ProtocolError",
    "decode_header_value",
    "encode_header_value",
]

VERSIONS: tuple[str, ...] = ("1.0", "1.1", "1.2")
SUPPORTED_VERSIONS_TEXT = "1.0,1.1,1.2"

# Frames whose headers are never escaped (STOMP 1.2 "Value Encoding").
UNESCAPED_COMMANDS = frozenset({"CONNECT", "STOMP", "CONNECTED"})
_ESCAPING_VERSIONS = frozenset({"1.1", "1.2"})

# Heart-beats between frames, and the stray NULs RabbitMQ's parser also skips (``\n\0SUBSCRIBE...``).
_EOLS = re.compile(rb"[\r\n\x00]*")
_HEADER_END = re.compile(rb"\n\r?\n")  # end of the last header line + the blank line
_COMMAND = re.compile(r"[!-~]+")  # visible ASCII, no spaces
_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)

_DECODE_12 = {"n": "\n", "c": ":", "\\": "\\", "r": "\r"}
# STOMP 1.1 defines only \n \c \\. We also decode \r, because our own 1.1 encoder writes CR as \r (see
# encode_header_value) and a conforming 1.1 peer never sends a bare "\r" sequence otherwise (it would
# have escaped the backslash). Other undefined sequences stay literal in 1.1.
_DECODE_11 = _DECODE_12


def _shorten(text: str | bytes, limit: int = 60) -> str:
    """repr() of ``text`` cut to about ``limit`` characters, for error details."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


class ProtocolError(Exception):
    """A STOMP error to report to the peer, then close.

    ``message`` is the ERROR frame's ``message`` header (RabbitMQ's wording where it has one), ``detail``
    its text/plain body. The I/O layer sends :meth:`to_frame` and closes the connection; a
    :class:`FrameParser` that raised one stays failed.
    """

    def __init__(
        self,
        message: str,
        detail: str = "",
        *,
        receipt_id: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message, detail)
        self.message = message
        self.detail = detail
        self.receipt_id = receipt_id
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.message}: {self.detail}" if self.detail else self.message

    def to_frame(self) -> Frame:
        """The ERROR frame: ``message``, ``content-type:text/plain``, ``version``, ``receipt-id`` when
        set, then the extra ``headers``; the body is ``detail`` in UTF-8."""
        headers: list[tuple[str, str]] = [
            ("message", self.message),
            ("content-type", "text/plain"),
            ("version", SUPPORTED_VERSIONS_TEXT),
        ]
        if self.receipt_id is not None:
            headers.append(("receipt-id", self.receipt_id))
        headers.extend(self.headers)
        return Frame("ERROR", tuple(headers), self.detail.encode("utf-8"))


def encode_header_value(value: str, version: str | None) -> str:
    """Escape a header name or value for ``version``.

    * "1.2": ``\\`` → ``\\\\``, LF → ``\\n``, CR → ``\\r``, ``:`` → ``\\c``.
    * "1.1": the same. 1.1 defines no CR escape, but a raw CR would be stripped as part of the EOL by
      1.2-style parsers; our parser decodes ``\\r`` under 1.1 as well, so 1.1 round-trips exactly.
    * "1.0" and ``None`` (before CONNECT, and CONNECT/CONNECTED frames): ``:`` and ``\\`` are written as
      they are, but LF and CR are never written raw (that would inject headers or frames); they become
      ``\\n`` and ``\\r``, as RabbitMQ writes them.
    * Every version: NUL, which no STOMP version can carry in a header (it would end the frame), becomes
      U+FFFD.

    Returns ``value`` itself when nothing needs escaping (the common case).
    """
    if version in _ESCAPING_VERSIONS:
        if "\\" in value or ":" in value or "\n" in value or "\r" in value or "\x00" in value:
            value = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            return value.replace(":", "\\c").replace("\x00", "\ufffd")
        return value
    if "\n" in value or "\r" in value or "\x00" in value:
        return value.replace("\n", "\\n").replace("\r", "\\r").replace("\x00", "\ufffd")
    return value


def _undefined_escape(sequence: str, where: str) -> ProtocolError:
    if sequence:
        return ProtocolError("Invalid header", f"Undefined escape sequence '\\{sequence}' in {where}")
    return ProtocolError("Invalid header", f"Incomplete escape sequence '\\' at the end of {where}")


def _unescape(text: str, version: str | None, where: str) -> str:
    if "\\" not in text or version not in _ESCAPING_VERSIONS:
        return text
    if version == "1.2":

        def replace_12(match: re.Match[str]) -> str:
            try:
                return _DECODE_12[match.group(1)]
            except KeyError:
                raise _undefined_escape(match.group(1), where) from None

        return _ESCAPE.sub(replace_12, text)

    def replace_11(match: re.Match[str]) -> str:
        return _DECODE_11.get(match.group(1), match.group(0))

    return _ESCAPE.sub(replace_11, text)


def decode_header_value(value: str, version: str | None) -> str:
    """Undo :func:`encode_header_value`-style escaping of a received header name or value.

    * "1.2": ``\\n`` ``\\c`` ``\\\\`` ``\\r`` are decoded; any other sequence (``\\t``, a trailing lone
      ``\\``) raises :class:`ProtocolError` ("Invalid header"), as the spec requires.
    * "1.1": ``\\n`` ``\\c`` ``\\\\`` and also ``\\r`` are decoded; other sequences stay literal.
    * "1.0" and ``None``: returned unchanged.
    """
    return _unescape(value, version, "header value")


@dataclass(frozen=True, slots=True)
class Frame:
    """One STOMP frame, as a value.

    ``headers`` keeps wire order and duplicates; the first occurrence of a name wins (:meth:`get`).
    Names and values are decoded text (escaping is a wire concern, handled by :class:`FrameParser` and
    :mod:`gateway.stomp.writer`). ``body`` is raw bytes.
    """

    command: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = field(default=b"", repr=False)

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 40 else self.body[:40] + b"..."
        return f"Frame({self.command!r}, {self.headers!r}, {body!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of the first header called ``name``, else ``default``."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def has(self, name: str) -> bool:
        """Whether a header called ``name`` is present."""
        return any(key == name for key, _ in self.headers)

    def serialize(self, version: str | None = "1.2") -> bytes:
        """The wire bytes for ``version``: see :func:`gateway.stomp.writer.serialize`, the one serializer
        (here for clients and tests that build frames by hand)."""
        from gateway.stomp.writer import serialize  # the writer builds on this module

        return serialize(self, version)

    @classmethod
    def parse(cls, data: bytes, version: str | None = "1.2") -> Frame:
        """Parse exactly one whole frame (trailing EOLs allowed) decoded for ``version``.

        No size limits apply. Raises :class:`ProtocolError` if ``data`` is malformed, incomplete, or holds
        more than one frame.
        """
        parser = FrameParser(_UNLIMITED)
        parser.version = version
        parser.authenticated = True
        parser.receive_data(data)
        frame = parser.next_frame()
        if frame is None:
            raise ProtocolError("Invalid frame", "Incomplete frame")
        count = 1
        while parser.next_frame() is not None:
            count += 1
        if count > 1:
            raise ProtocolError("Invalid frame", f"Expected one frame, got {count}")
        if parser.buffered:
            raise ProtocolError("Invalid frame", "Trailing data after the frame")
        return frame


@dataclass(frozen=True, slots=True)
class Limits:
    """Named parser limits (RabbitMQ 4.2+ defaults). Exceeding one raises :class:`ProtocolError`.

    The frame size counts command, header lines, blank line and body (not the NUL or trailing EOLs).
    Each field is the :class:`gateway.settings.Config` setting of the same name (its flag, variable, help
    and default are defined there, once); ``derive(Limits, config)`` fills them from a configuration.
    """

    max_frame_size_unauthenticated: int = DEFAULTS.max_frame_size_unauthenticated  # until CONNECT succeeded
    max_frame_size: int = DEFAULTS.max_frame_size  # after
    max_headers: int = DEFAULTS.max_headers  # header lines per frame
    max_header_line: int = DEFAULTS.max_header_line  # bytes in one header line, and in the command line


DEFAULT_LIMITS = Limits()  # RabbitMQ's defaults; FrameParser's default
_UNLIMITED = Limits(1 << 62, 1 << 62, 1 << 62, 1 << 62)


class FrameParser:
    """Incremental pull parser (the shape of h11's ``next_event``): feed any split of the byte stream with
    :meth:`receive_data`, then call :meth:`next_frame` until it returns ``None`` ("need more data").

    :attr:`version` ("1.0", "1.1" or "1.2"; it selects header unescaping) and :attr:`authenticated` (it
    selects the frame-size limit) are read by every :meth:`next_frame` call, so whoever owns the parser
    (the :class:`~gateway.stomp.session.Session`) changes them between frames, and a frame pipelined
    behind CONNECT is decoded with the negotiated version and limits, with no special case.

    Work is linear in the input: a partial frame is never rescanned, whatever the chunking, and a burst of
    frames is consumed by advancing an offset (the buffer is compacted once per :meth:`receive_data`).
    Limits are checked as far as the input arrived, so an oversized frame (or header line, or header count)
    fails before it completes and a partial frame never grows past the frame-size limit.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.version: str | None = None
        self.authenticated = False
        # Unconsumed input starts at ``_pos``. ``bytes`` while it is one received chunk (parsed without a
        # copy), a bytearray once chunks had to be joined.
        self._buffer: bytes | bytearray = b""
        self._pos = 0
        self._error: ProtocolError | None = None
        self._begin(0)
        self._reset()

    def _reset(self) -> None:
        """Forget the current frame; the next byte starts a frame (or a heart-beat). The other state
        fields are set when a frame starts (``_begin``) or its headers complete."""
        self._started = False  # past the heart-beats: a command line has begun
        self._head: tuple[str, tuple[tuple[str, str], ...], int, int] | None = None

    def _begin(self, pos: int) -> None:
        self._started = True
        self._scan = pos  # where the header-end search resumes
        self._line_scan = pos  # where the incremental header-line checks resume
        self._line_start = pos  # start of the current, unfinished header line
        self._lines = 0  # complete lines seen so far (command line included)
        self._nul_scan = pos  # where the search for the body's NUL resumes

    @property
    def max_frame_size(self) -> int:
        """The frame-size limit in force now."""
        if self.authenticated:
            return self.limits.max_frame_size
        return self.limits.max_frame_size_unauthenticated

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed by a returned frame."""
        return len(self._buffer) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Add the next chunk of the stream (any split, possibly empty). Nothing is parsed here."""
        if self._error is not None or not data:
            return
        data = data if type(data) is bytes else bytes(data)
        buf = self._buffer
        pos = self._pos
        if pos == len(buf):
            if pos:
                self._rebase(pos)
            self._buffer = data
            return
        if pos:
            self._rebase(pos)
        if isinstance(buf, bytearray):
            if pos:
                del buf[:pos]
            buf += data
        else:
            joined = bytearray(memoryview(buf)[pos:])
            joined += data
            self._buffer = joined

    def next_frame(self) -> Frame | None:
        """The next complete frame, or ``None`` when more data is needed.

        Raises :class:`ProtocolError` for malformed input or an exceeded limit. Frames before the bad
        input are returned first (nothing the client sent correctly is lost); the parser is then dead and
        every later call raises the same error again.
        """
        if self._error is not None:
            error = self._error
            raise ProtocolError(error.message, error.detail, headers=error.headers)
        try:
            return self._next()
        except ProtocolError as exc:
            self._fail(exc)
            raise
        except Exception as exc:  # a bug here must still reach the peer as a STOMP error
            error = ProtocolError("Invalid frame", f"Internal parser error: {exc!r}")
            self._fail(error)
            raise error from exc

    @property
    def error(self) -> ProtocolError | None:
        """The error that killed this parser, if any."""
        return self._error

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        self._buffer = b""
        self._pos = 0
        self._reset()

    def _too_large(self) -> ProtocolError:
        limit = self.max_frame_size
        when = "" if self.authenticated else " before CONNECT succeeded"
        return ProtocolError("Frame too large", f"Frame exceeds the {limit}-byte limit{when}")

    def _next(self) -> Frame | None:
        buf = self._buffer
        end = len(buf)
        pos = self._pos  # start of the current frame (or of the EOLs before it); indexes are absolute in buf
        max_size = self.max_frame_size
        head = self._head
        if head is None:
            if not self._started:
                if pos < end and (buf[pos] == 10 or buf[pos] == 13 or buf[pos] == 0):
                    pos = self._pos = _EOLS.match(buf, pos).end()  # type: ignore[union-attr]  # always matches
                if pos == end:
                    return None
                self._begin(pos)
            header_end = _HEADER_END.search(buf, self._scan)
            if header_end is None:
                self._check_partial_head(buf, pos, end, max_size)
                self._scan = max(pos, end - 2)
                return None
            body_start = header_end.end()
            command, headers, length = self._parse_head(buf, pos, header_end.start(), max_size)
            if length >= 0 and body_start - pos + length > max_size:
                raise self._too_large()
            head = self._head = (command, headers, body_start, length)
            self._nul_scan = body_start
        command, headers, body_start, length = head
        if length >= 0:
            body_end = body_start + length
            if body_end >= end:
                return None
            if buf[body_end] != 0:
                raise ProtocolError(
                    "Invalid frame",
                    f"Expected NUL after the {length}-byte body given by content-length, "
                    f"got {_shorten(bytes(buf[body_end : body_end + 10]))}",
                )
        else:
            body_end = buf.find(b"\x00", self._nul_scan)
            if body_end < 0:
                if end - pos > max_size:
                    raise self._too_large()
                self._nul_scan = end
                return None
            if body_end - pos > max_size:
                raise self._too_large()
        body = buf[body_start:body_end]
        self._pos = body_end + 1
        self._started = False
        self._head = None
        return Frame(command, headers, body if type(body) is bytes else bytes(body))

    def _rebase(self, pos: int) -> None:
        """The first ``pos`` bytes of the buffer are being dropped: move the state indexes with them."""
        self._pos -= pos
        if self._started:
            self._scan -= pos
            self._line_scan -= pos
            self._line_start -= pos
            self._nul_scan -= pos
            if self._head is not None:
                command, headers, body_start, length = self._head
                self._head = (command, headers, body_start - pos, length)

    def _check_partial_head(self, buf: bytes | bytearray, pos: int, end: int, max_size: int) -> None:
        """Check the unfinished header block as far as it arrived; scan only the new bytes."""
        if end - pos > max_size:
            raise self._too_large()
        i = self._line_scan
        if buf.find(b"\x00", i, end) >= 0:
            raise ProtocolError("Invalid frame", "NUL before the end of the headers (missing blank line?)")
        max_line = self.limits.max_header_line
        max_headers = self.limits.max_headers
        line_start = self._line_start
        lines = self._lines
        while (newline := buf.find(b"\n", i, end)) >= 0:
            if newline - line_start > max_line:
                raise self._line_too_long(lines == 0)
            lines += 1
            if lines - 1 > max_headers:
                raise self._too_many_headers()
            line_start = i = newline + 1
        if end - line_start > max_line:
            raise self._line_too_long(lines == 0)
        self._line_scan = end
        self._line_start = line_start
        self._lines = lines

    def _line_too_long(self, command: bool) -> ProtocolError:
        limit = self.limits.max_header_line
        if command:
            return ProtocolError("Invalid frame", f"Command line exceeds the {limit}-byte limit")
        return ProtocolError("Header too long", f"Header line exceeds the {limit}-byte limit")

    def _too_many_headers(self) -> ProtocolError:
        limit = self.limits.max_headers
        return ProtocolError("Too many headers", f"A frame may carry at most {limit} headers")

    def _parse_head(
        self, buf: bytes | bytearray, start: int, stop: int, max_size: int
    ) -> tuple[str, tuple[tuple[str, str], ...], int]:
        """Decode command and headers from buf[start:stop] (no final EOL); return them and the
        content-length (-1 if absent)."""
        limits = self.limits
        if stop - start > max_size:
            raise self._too_large()
        block = buf[start:stop]
        if 0 in block:
            raise ProtocolError("Invalid frame", "NUL before the end of the headers (missing blank line?)")
        if len(block) > limits.max_header_line:
            for index, raw_line in enumerate(block.split(b"\n")):
                if len(raw_line) > limits.max_header_line:
                    raise self._line_too_long(index == 0)
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            first = block.split(b"\n", 1)[0]
            if not first.isascii():
                raise ProtocolError(
                    "Invalid frame", f"Invalid command line {_shorten(bytes(first))}"
                ) from None
            raise ProtocolError("Invalid frame", "Header block is not valid UTF-8") from None
        lines = text.split("\n")
        if "\r" in text:
            lines = [line[:-1] if line[-1:] == "\r" else line for line in lines]
        command = lines[0]
        if not (command.isascii() and command.isalpha()) and _COMMAND.fullmatch(command) is None:
            raise ProtocolError(
                "Invalid frame", f"Invalid command line {_shorten(command)}: expected visible ASCII"
            )
        if len(lines) == 1:
            return command, (), -1
        if len(lines) - 1 > limits.max_headers:
            raise self._too_many_headers()
        version = self.version
        unescape = "\\" in text and version in _ESCAPING_VERSIONS and command not in UNESCAPED_COMMANDS
        trim = version == "1.0"
        headers: list[tuple[str, str]] = []
        append = headers.append
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise ProtocolError("Invalid frame", f"Header line without ':': {_shorten(line)}")
            if not name:
                raise ProtocolError("Invalid frame", f"Header line with an empty name: {_shorten(line)}")
            if unescape:
                name = _unescape(name, version, "header name")
                value = _unescape(value, version, "header value")
            elif trim:
                value = value.lstrip(" \t")
            append((name, value))
        length = -1
        if "content-length" in text:
            for name, value in headers:
                if name == "content-length":
                    length = self._content_length(value)
                    break
        return command, tuple(headers), length

    def _content_length(self, value: str) -> int:
        if not (value.isascii() and value.isdigit()):
            raise ProtocolError(
                "Invalid frame",
                f"Invalid content-length {_shorten(value)}: expected a non-negative decimal integer",
            )
        if len(value) > 18:  # beyond any limit; also keeps int() clear of its digit cap
            raise self._too_large()
        return int(value)
