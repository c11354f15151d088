"""RFC 6455 §5.2 — the framing the WebSocket adapter does beside websockets: the pre-framed server messages
of the fan-out fast path (read back by websockets), the size guard over client frame headers (fed frames
that websockets serialized), and the per-loop framing cache of a fanned-out MESSAGE."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.transport.websocket import _FrameCache, websocket_frame
from gateway.transport.websocket_frames import MessageSizeGuard


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


# --------------------------------------------------------------------------------------------------------
# The message-size guard: client frames (masked), as websockets serializes them


def client(opcode: Opcode, size: int, fin: bool = True) -> bytes:
    return Frame(opcode, b"s" * size, fin).serialize(mask=True)


def feed(guard: MessageSizeGuard, stream: bytes, how: str) -> int | None:
    """Feed ``stream`` whole, in small pieces (one byte at a time; seven bytes for long streams, which still
    cuts through headers), or in two uneven parts; the first size reported."""
    if how == "whole":
        chunks = [stream]
    elif how == "pieces":
        step = 1 if len(stream) < 5000 else 7
        chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    else:
        chunks = [stream[: len(stream) // 3], stream[len(stream) // 3 :]]
    for chunk in chunks:
        size = guard.exceeds(chunk)
        if size is not None:
            return size
    return None


SPLITS = ["whole", "pieces", "halves"]


class TestMessageSizeGuard:
    @pytest.mark.parametrize("how", SPLITS)
    @pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
    def test_messages_up_to_the_limit_pass_at_every_length_encoding(self, how: str, size: int) -> None:
        guard = MessageSizeGuard(size)
        stream = client(Opcode.TEXT, size) + client(Opcode.BINARY, size) + client(Opcode.TEXT, 0)
        assert feed(guard, stream, how) is None

    @pytest.mark.parametrize("how", SPLITS)
    @pytest.mark.parametrize("size", [1, 126, 65536, 70000])
    def test_one_byte_over_is_reported(self, how: str, size: int) -> None:
        guard = MessageSizeGuard(size - 1)
        assert feed(guard, client(Opcode.TEXT, size - 1) + client(Opcode.BINARY, size), how) == size

    def test_reported_from_the_header_before_the_payload_comes(self) -> None:
        header = client(Opcode.TEXT, 2**30)[:14]  # 64-bit length, masking key, no payload
        assert MessageSizeGuard(1000).exceeds(header) == 2**30

    @pytest.mark.parametrize("how", SPLITS)
    def test_a_fragmented_message_counts_whole_and_control_frames_not(self, how: str) -> None:
        stream = (
            client(Opcode.TEXT, 400, fin=False)
            + client(Opcode.PING, 125)
            + client(Opcode.CONT, 400, fin=False)
            + client(Opcode.PONG, 100)
            + client(Opcode.CONT, 200)
        )
        assert feed(MessageSizeGuard(1000), stream, how) is None
        assert feed(MessageSizeGuard(999), stream, how) == 1000

    @pytest.mark.parametrize("how", SPLITS)
    def test_the_count_starts_again_with_each_message(self, how: str) -> None:
        stream = client(Opcode.TEXT, 600, fin=False) + client(Opcode.CONT, 400) + client(Opcode.BINARY, 1000)
        assert feed(MessageSizeGuard(1000), stream, how) is None

    def test_the_limit_may_change_between_reads(self) -> None:
        guard = MessageSizeGuard(100)
        assert guard.exceeds(client(Opcode.TEXT, 100)) is None
        guard.limit = 5000
        assert guard.exceeds(client(Opcode.TEXT, 5000)) is None
        assert guard.exceeds(client(Opcode.TEXT, 5001)) == 5001


# --------------------------------------------------------------------------------------------------------
# The framing cache of a fanned-out MESSAGE


class Template:
    """What the fan-out hands every sink: ``render(version, subscription)`` and ``is_text``."""

    def __init__(self, body: bytes, is_text: bool = True) -> None:
        self.body = body
        self.is_text = is_text
        self.rendered: list[tuple[str, str | None]] = []

    def render(self, version: str, subscription: str | None) -> bytes:
        self.rendered.append((version, subscription))
        return f"MESSAGE\nsubscription:{subscription}\nv:{version}\n\n".encode() + self.body + b"\x00"


class TestFrameCache:
    def test_one_template_is_framed_once_per_version_and_subscription(self) -> None:
        cache = _FrameCache()
        template = Template(b"x")
        first = cache.frame(template, "1.2", "sub-0")
        for _ in range(3):
            assert cache.frame(template, "1.2", "sub-0") is first
        other = cache.frame(template, "1.1", "sub-0")
        cache.frame(template, "1.2", "sub-1")
        assert template.rendered == [("1.2", "sub-0"), ("1.1", "sub-0"), ("1.2", "sub-1")]
        assert parse(first).data == template.render("1.2", "sub-0")
        assert parse(other).data == template.render("1.1", "sub-0")

    def test_a_new_template_is_never_served_the_last_ones_frames(self) -> None:
        cache = _FrameCache()
        one, two = Template(b"one"), Template(b"two", is_text=False)
        assert parse(cache.frame(one, "1.2", "s")).data.endswith(b"one\x00")
        framed = parse(cache.frame(two, "1.2", "s"))
        assert framed.data.endswith(b"two\x00") and framed.opcode == Opcode.BINARY
        assert parse(cache.frame(one, "1.2", "s")).data.endswith(b"one\x00")
