"""RFC 6455 §5.2 — the pre-framed server messages of the fan-out fast path, read back by websockets."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.transport.websocket import websocket_frame


def parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("text", [True, False])
def test_every_length_encoding(size: int, text: bool) -> None:
    payload = b"a" * size
    frame = parse(websocket_frame(payload, text))
    assert frame.opcode == (Opcode.TEXT if text else Opcode.BINARY)
    assert frame.fin
    assert frame.data == payload
