"""RFC 6455 §5.2 framing that the WebSocket adapter does itself, beside websockets' sans-I/O protocol.

Pure, no I/O. Two small things websockets' public API does not offer:

* :func:`websocket_frame` — one server frame as bytes, so that a MESSAGE fanned out to many connections is
  framed once and written to each of them as it is (websockets frames every ``send_*`` call anew).
* :class:`MessageSizeGuard` — a message-size limit that can change on a live connection: a client may send
  little before CONNECT succeeded, much more after. websockets takes its ``max_size`` once, at construction;
  the adapter gives it the larger limit and this guard, reading only the frame headers of the incoming
  stream, enforces the smaller one before a payload is buffered.
"""

from __future__ import annotations

__all__ = ["MessageSizeGuard", "websocket_frame"]


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
