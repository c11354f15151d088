"""RFC 6455 §5 — the client frames the WebSocket adapter reads itself (``ClientFrameReader``), checked against
websockets' own ``ServerProtocol``: the same stream, fed whole, a byte at a time or in random pieces, must
give the same messages, the same answers (pongs, close frames) and the same end state whether websockets
reads every frame or the reader takes the common ones and hands websockets the rest.

Contract with websockets (what the reader relies on beyond its documented API, named so that a release that
changes it fails here by name): ``websockets.speedups.apply_mask(data, mask) -> bytes``, the C unmasking
websockets itself uses (a pure-Python one stands in where it is missing); and that ``ServerProtocol`` fed
whole frames with some frames left out still parses the rest (its parser keeps no state between frames
but the fragmented message under way, which the reader never interrupts).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from gateway.transport.websocket_frames import (
    FRAME_FOR_WEBSOCKETS,
    ClientFrameReader,
    _apply_mask,
    apply_mask,
)

MAX_SIZE = 70_000
REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def open_protocol() -> ServerProtocol:
    ws = ServerProtocol(max_size=MAX_SIZE)
    ws.receive_data(REQUEST)
    [request] = ws.events_received()
    ws.send_response(ws.accept(request))  # type: ignore[arg-type]
    ws.data_to_send()
    return ws


class Collector:
    """Messages reassembled from websockets' frames as the adapter does (``WebSocketProtocol._frame``)."""

    def __init__(self) -> None:
        self.messages: list[tuple[bool, bytes]] = []
        self._fragments: list[bytes] | None = None
        self._text = False

    def frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            if frame.fin:
                self.messages.append((frame.opcode is Opcode.TEXT, bytes(frame.data)))
            else:
                self._fragments = [bytes(frame.data)]
                self._text = frame.opcode is Opcode.TEXT
        elif frame.opcode is Opcode.CONT:
            assert self._fragments is not None
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                self.messages.append((self._text, b"".join(self._fragments)))
                self._fragments = None


def websockets_alone(chunks: list[bytes]) -> tuple[list[tuple[bool, bytes]], bytes, State]:
    ws = open_protocol()
    collector = Collector()
    out = b""
    for chunk in chunks:
        ws.receive_data(chunk)
        for event in ws.events_received():
            collector.frame(event)  # type: ignore[arg-type]
        out += b"".join(w or b"<EOF>" for w in ws.data_to_send())
    return collector.messages, out, ws.state


def with_reader(chunks: list[bytes]) -> tuple[list[tuple[bool, bytes]], bytes, State]:
    """What ``WebSocketProtocol.data_received`` does with a reader."""
    ws = open_protocol()
    reader = ClientFrameReader(MAX_SIZE)
    collector = Collector()
    out = b""
    for chunk in chunks:
        if ws.state is not State.OPEN:
            reader.fast = False
        reader.receive_data(chunk)
        while (item := reader.next_frame()) is not None:
            kind, payload = item
            if kind != FRAME_FOR_WEBSOCKETS:
                collector.messages.append((kind == 1, payload))
                continue
            ws.receive_data(payload)
            for event in ws.events_received():
                collector.frame(event)  # type: ignore[arg-type]
            if ws.state is not State.OPEN:
                reader.fast = False
        out += b"".join(w or b"<EOF>" for w in ws.data_to_send())
    return collector.messages, out, ws.state


def client_frame(opcode: Opcode, data: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    wire = Frame(opcode, data, fin).serialize(mask=True)
    return bytes([wire[0] | 0x40]) + wire[1:] if rsv1 else wire  # websockets will not write a reserved bit


def pieces(stream: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [stream]
    if how == "bytes":
        step = 1 if len(stream) < 3000 else 97
        return [stream[i : i + step] for i in range(0, len(stream), step)]
    third = len(stream) // 3
    return [stream[:third], stream[third : 2 * third], stream[2 * third :]]


HOW = ["whole", "bytes", "thirds"]


# -- §5.2 base framing: every length encoding, text and binary, masked with random keys


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, MAX_SIZE])
@pytest.mark.parametrize("how", HOW)
def test_every_length_encoding_is_read_and_unmasked(size: int, how: str) -> None:
    payload = os.urandom(size)
    stream = client_frame(Opcode.BINARY, payload) + client_frame(Opcode.TEXT, b"x" * (size % 300))
    reader = ClientFrameReader(MAX_SIZE)
    got = []
    for chunk in pieces(stream, how):
        reader.receive_data(chunk)
        while (item := reader.next_frame()) is not None:
            got.append(item)
    assert got == [(2, payload), (1, b"x" * (size % 300))]
    assert reader.at_frame_boundary()
    assert with_reader(pieces(stream, how)) == websockets_alone([stream])


def test_a_large_frame_in_small_pieces_is_joined_once() -> None:
    payload = os.urandom(MAX_SIZE)
    stream = client_frame(Opcode.BINARY, payload)
    reader = ClientFrameReader(MAX_SIZE)
    for i in range(0, len(stream) - 1, 1000):
        reader.receive_data(stream[i : min(i + 1000, len(stream) - 1)])
        assert reader.next_frame() is None
    reader.receive_data(stream[-1:])
    assert reader.next_frame() == (2, payload)
    assert reader.next_frame() is None


# -- what goes to websockets: control frames, fragments, protocol errors, frames past the limit


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([client_frame(Opcode.PING, b"hi"), client_frame(Opcode.TEXT, b"after")], id="ping"),
        pytest.param([client_frame(Opcode.PONG, b""), client_frame(Opcode.TEXT, b"after")], id="pong"),
        pytest.param(
            [
                client_frame(Opcode.TEXT, b"frag", fin=False),
                client_frame(Opcode.PING, b""),
                client_frame(Opcode.CONT, b"ment", fin=False),
                client_frame(Opcode.CONT, b"ed"),
                client_frame(Opcode.TEXT, b"whole"),
            ],
            id="fragmented-with-ping",
        ),
        pytest.param(
            [client_frame(Opcode.TEXT, b"a", fin=False), client_frame(Opcode.TEXT, b"b")], id="text-in-fragment"
        ),
        pytest.param([client_frame(Opcode.CONT, b"x"), client_frame(Opcode.TEXT, b"y")], id="stray-continuation"),
        pytest.param(
            [client_frame(Opcode.TEXT, b"x", rsv1=True), client_frame(Opcode.TEXT, b"y")], id="reserved-bit"
        ),
        pytest.param(
            [Frame(Opcode.TEXT, b"unmasked").serialize(mask=False), client_frame(Opcode.TEXT, b"y")], id="unmasked"
        ),
        pytest.param(
            [client_frame(Opcode.BINARY, b"z" * (MAX_SIZE + 1)), client_frame(Opcode.TEXT, b"y")], id="too-large"
        ),
        pytest.param(
            [client_frame(Opcode.TEXT, b"last"), client_frame(Opcode.CLOSE, b"\x03\xe8bye"), client_frame(Opcode.TEXT, b"late")],
            id="close-then-data",
        ),
        pytest.param([b"\x83\x80\x00\x00\x00\x00", client_frame(Opcode.TEXT, b"y")], id="reserved-opcode"),
        pytest.param([client_frame(Opcode.TEXT, b"\xff\xfe not utf-8")], id="invalid-utf8-text"),
    ],
)
@pytest.mark.parametrize("how", HOW)
def test_the_same_as_websockets_alone(frames: list[bytes], how: str) -> None:
    stream = b"".join(frames)
    assert with_reader(pieces(stream, how)) == websockets_alone([stream])


def test_frames_after_websockets_ended_the_connection_are_not_read() -> None:
    stream = client_frame(Opcode.TEXT, b"ok") + client_frame(Opcode.CLOSE, b"\x03\xe8") + client_frame(Opcode.TEXT, b"no")
    messages, out, state = with_reader([stream])
    assert messages == [(True, b"ok")]
    assert state is State.CLOSING  # until the client's end of stream
    assert out.endswith(b"<EOF>")  # the close frame echoed, then the server's end of stream
    assert (messages, out, state) == websockets_alone([stream])


# -- any stream: hypothesis against websockets alone


def frame_strategy() -> st.SearchStrategy[bytes]:
    data = st.one_of(st.binary(max_size=200), st.binary(min_size=126, max_size=300), st.just(b"y" * 66_000))
    kinds = st.sampled_from(
        [Opcode.TEXT, Opcode.BINARY, Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG, Opcode.CLOSE]
    )

    @st.composite
    def one(draw: st.DrawFn) -> bytes:
        opcode = draw(kinds)
        payload = draw(data)
        if opcode in (Opcode.PING, Opcode.PONG):
            payload = payload[:125]
        if opcode is Opcode.CLOSE:
            return client_frame(Opcode.CLOSE, b"\x03\xe8"[: draw(st.sampled_from([0, 2]))])
        fin = draw(st.booleans()) if opcode not in (Opcode.PING, Opcode.PONG) else True
        if opcode is Opcode.TEXT and draw(st.booleans()):
            payload = payload.decode("latin-1").encode()  # valid UTF-8
        masked = draw(st.sampled_from([True] * 9 + [False]))
        return Frame(opcode, payload, fin).serialize(mask=masked)

    return one()


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(frame_strategy(), max_size=12), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_any_stream_in_any_pieces(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts}) if stream else []
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert with_reader(chunks) == websockets_alone([stream])


# -- contract


@given(data=st.binary(max_size=300), mask=st.binary(min_size=4, max_size=4))
def test_websockets_speedups_apply_mask_is_rfc_6455_masking(data: bytes, mask: bytes) -> None:
    from websockets.speedups import apply_mask as websockets_apply_mask  # the member the reader relies on

    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert websockets_apply_mask(data, mask) == expected
    assert _apply_mask(data, mask) == expected
    assert apply_mask(data, mask) == expected
    assert isinstance(websockets_apply_mask(data, mask), bytes)


def test_after_a_close_frame_every_byte_goes_to_websockets_even_if_the_caller_does_not_look() -> None:
    reader = ClientFrameReader(MAX_SIZE)
    close = client_frame(Opcode.CLOSE, b"\x03\xe8")
    late = client_frame(Opcode.TEXT, b"late")
    reader.receive_data(close + late)
    assert reader.next_frame() == (FRAME_FOR_WEBSOCKETS, close)
    assert reader.next_frame() == (FRAME_FOR_WEBSOCKETS, late)
    assert reader.next_frame() is None
