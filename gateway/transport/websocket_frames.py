"""RFC 6455 §5.2 framing that the WebSocket adapter does itself, beside websockets' sans-I/O protocol.

Pure, no I/O. Three small things websockets' public API does not offer:

* :func:`websocket_frame` — one server frame as bytes, so that a MESSAGE fanned out to many connections is
  framed once and written to each of them as it is (websockets frames every ``send_*`` call anew).
* :class:`MessageSizeGuard` — a message-size limit that can change on a live connection: a client may send
  little before CONNECT succeeded, much more after. websockets takes its ``max_size`` once, at construction;
  the adapter gives it the larger limit and this guard, reading only the frame headers of the incoming
  stream, enforces the smaller one before a payload is buffered.
* :class:`ClientFrameReader` — the common client frame (final, masked, text or binary, no extension) read
  and unmasked here, so that a burst of small messages does not go through websockets' generator-based
  parser one frame at a time (5 µs a frame, a tenth of what the gateway spends relaying a message). Every
  other frame (control frames, fragments, anything unmasked or with reserved bits, anything past the size
  limit) goes to websockets byte for byte, whole, so its parser always stands at a frame boundary and sees
  a valid stream of frames; websockets still answers pings and closes, and fails what RFC 6455 fails.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["FRAME_FOR_WEBSOCKETS", "ClientFrameReader", "MessageSizeGuard", "apply_mask", "websocket_frame"]


def _apply_mask(data: bytes, mask: bytes) -> bytes:
    """RFC 6455 §5.3 unmasking in pure Python (about 0.7 µs for 200 bytes; websockets' C version 0.1 µs)."""
    size = len(data)
    key = int.from_bytes(mask * ((size >> 2) + 1), "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(size + 4, "little")[:size]


apply_mask: Callable[[bytes, bytes], bytes]
try:
    # Not in websockets' documented API: named in tests/unit/test_websocket_contract.py, and the pure
    # version stands in if a release moves it.
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    apply_mask = _apply_mask


def websocket_frame(payload: bytes, text: bool) -> bytes:
    """One unfragmented, unmasked server-to-client WebSocket frame (RFC 6455 §5.2)."""
    first = 0x81 if text else 0x82
    length = len(payload)
    if length < 126:
        header = bytes((first, length))
    elif length < 65536:
        header = bytes((first, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + length.to_bytes(8, "big")
    return header + payload


_MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (masking key)


class MessageSizeGuard:
    """Follows the frame headers of a client's byte stream and says when a message grows past ``limit``.

    Feed it every byte received after the opening handshake, in order, *before* giving them to the
    protocol (:meth:`exceeds`); it never copies a payload. A message's size is the sum of its frames'
    payload lengths (a fragmented message counts whole, as websockets' ``max_size`` does); control frames
    do not count. Once :meth:`exceeds` returned a size, the stream is to be failed with 1009 and the guard
    must not be fed again.
    """

    __slots__ = ("_head", "_message", "_skip", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._head = b""  # the start of a frame header split across reads
        self._skip = 0  # payload bytes of the current frame still to come
        self._message = 0  # payload bytes of the current (fragmented) message so far

    def exceeds(self, data: bytes) -> int | None:
        """The size of the message that went over the limit with ``data``, or None."""
        position = 0
        end = len(data)
        while position < end:
            if self._skip:
                step = min(self._skip, end - position)
                self._skip -= step
                position += step
                continue
            head = data[position : position + _MAX_HEADER]
            if self._head:
                head = self._head + head
            size = _header_size(head)
            if size is None or len(head) < size:
                self._head = head
                return None
            position += size - len(self._head)
            self._head = b""
            too_large = self._frame(head)
            if too_large is not None:
                return too_large
        return None

    def _frame(self, head: bytes) -> int | None:
        first, second = head[0], head[1]
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(head[2:4], "big")
        elif length == 127:
            length = int.from_bytes(head[2:10], "big")
        self._skip = length
        opcode = first & 0x0F
        if opcode >= 0x8:  # control frame: never part of a message
            return None
        if opcode != 0x0:  # a new message (websockets fails one that interrupts a fragmented message)
            self._message = 0
        self._message += length
        if self._message > self.limit:
            return self._message
        if first & 0x80:  # FIN
            self._message = 0
        return None


def _header_size(head: bytes) -> int | None:
    """Bytes of the frame header that ``head`` starts with, or None when its second byte has not come."""
    if len(head) < 2:
        return None
    second = head[1]
    length = second & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + 4 if second & 0x80 else size


#: :meth:`ClientFrameReader.next_frame`'s kind for bytes that go to websockets' protocol as they are
FRAME_FOR_WEBSOCKETS = 0
_TEXT = 0x1
_BINARY = 0x2
_CONT = 0x0
_CLOSE = 0x8
_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
_FAST_FIRST_BYTES = (_FIN_TEXT, _FIN_BINARY)


class ClientFrameReader:
    """Splits a client's byte stream (after the opening handshake) into frames.

    Feed bytes with :meth:`receive_data`, then call :meth:`next_frame` until it returns None. It returns
    ``(1, payload)`` for a text message and ``(2, payload)`` for a binary one (unmasked, whole), or
    ``(FRAME_FOR_WEBSOCKETS, data)``: bytes the caller gives websockets' ``receive_data`` as they are, in
    order (a large frame comes in pieces as it arrives). Only a final, masked text or binary frame with no
    reserved bit, outside a fragmented message and at most ``max_size`` bytes is read here. After a close
    frame, and once the caller sets :attr:`fast` to False (websockets' connection is no longer OPEN, say),
    every byte goes to websockets.

    A frame read here is buffered until it is complete (linear time: the pieces are joined once).
    """

    __slots__ = ("_buffer", "_chunks", "_fragmented", "_have", "_need", "_owed", "_pos", "fast", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        #: False: every byte goes to websockets from now on
        self.fast = True
        self._buffer = b""
        self._pos = 0
        #: bytes of the current frame still to go to websockets as they come
        self._owed = 0
        #: a fragmented message is under way (its frames, and any frame until it ends, go to websockets)
        self._fragmented = False
        #: an incomplete frame's pieces while they arrive: joined once ``_have`` reaches ``_need``
        self._chunks: list[bytes] | None = None
        self._have = 0
        self._need = 0

    def receive_data(self, data: bytes) -> None:
        chunks = self._chunks
        if chunks is not None:
            chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            self._buffer = b"".join(chunks)
            self._chunks = None
            self._pos = 0
            return
        pos = self._pos
        if pos < len(self._buffer):
            self._buffer = self._buffer[pos:] + data
        else:
            self._buffer = data
        self._pos = 0

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next frame's kind and payload, bytes for websockets, or None until more bytes come."""
        if self._chunks is not None:
            return None
        buf = self._buffer
        pos = self._pos
        available = len(buf) - pos
        if self._owed:
            if not available:
                return None
            step = min(self._owed, available)
            self._owed -= step
            self._pos = pos + step
            return FRAME_FOR_WEBSOCKETS, buf[pos : pos + step]
        if available < 2:
            return None
        first = buf[pos]
        second = buf[pos + 1]
        length = second & 0x7F
        head = 2
        if length == 126:
            if available < 4:
                return None
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if available < 10:
                return None
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if second & 0x80:
            head += 4
        total = head + length
        if (
            first in _FAST_FIRST_BYTES
            and second & 0x80
            and self.fast
            and not self._fragmented
            and length <= self.max_size
        ):
            if available < total:
                self._wait(buf[pos:], total)
                return None
            end = pos + total
            self._pos = end
            start = pos + head
            return first & 0x0F, apply_mask(buf[start:end], buf[start - 4 : start])
        opcode = first & 0x0F
        if opcode == _CLOSE:
            self.fast = False
        elif opcode == _CONT:
            if first & 0x80:
                self._fragmented = False
        elif opcode in (_TEXT, _BINARY):
            self._fragmented = not first & 0x80
        step = min(total, available)
        self._owed = total - step
        self._pos = pos + step
        return FRAME_FOR_WEBSOCKETS, buf[pos : pos + step]

    def _wait(self, partial: bytes, need: int) -> None:
        self._chunks = [partial]
        self._have = len(partial)
        self._need = need
        self._buffer = b""
        self._pos = 0

    def at_frame_boundary(self) -> bool:
        """Nothing of an unfinished frame is held or owed (websockets' parser stands between frames)."""
        return self._chunks is None and not self._owed and self._pos >= len(self._buffer)
