"""The STOMP frame codec (gateway.stomp.frames), section by section of the STOMP 1.2 spec.

Every codec input is fed three ways (h11 ``test_io.py`` style): whole, one byte at a time, and followed by
the beginning of a next frame. All three must give the same frames, or the same error.
"""

from __future__ import annotations

import string
import time
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.stomp import frames as frames_module
from gateway.stomp.frames import (
    DEFAULT_LIMITS,
    SUPPORTED_VERSIONS_TEXT,
    VERSIONS,
    Frame,
    FrameParser,
    Limits,
    ProtocolError,
    decode_header_value,
    encode_header_value,
)

# The beginning of a next frame, appended to inputs to check that it changes nothing.
TAIL = b"SEND\ndestination:/queue/next\ncontent-"


# --------------------------------------------------------------------------------------------------------
# Helpers


def make_parser(
    version: str | None = "1.2", *, authenticated: bool = True, limits: Limits = DEFAULT_LIMITS
) -> FrameParser:
    parser = FrameParser(limits)
    parser.version = version
    parser.authenticated = authenticated
    return parser


def pull(parser: FrameParser, data: bytes) -> list[Frame]:
    """Feed ``data`` and pull every complete frame. Frames before bad input come back first; the error is
    then raised by the next call (the parser stays failed)."""
    parser.receive_data(data)
    received: list[Frame] = []
    while True:
        try:
            frame = parser.next_frame()
        except ProtocolError:
            if received:
                return received
            raise
        if frame is None:
            return received
        received.append(frame)


def receive_all(parser: FrameParser, chunks: Iterable[bytes]) -> list[Frame]:
    """Feed ``chunks`` one at a time, pulling the frames after each; raise the error of bad input."""
    received: list[Frame] = []
    for chunk in chunks:
        received += pull(parser, chunk)
        if parser.error is not None:
            pull(parser, b"")  # raises it
    return received


def three_ways(data: bytes) -> list[tuple[str, list[bytes]]]:
    return [
        ("whole", [data]),
        ("bytewise", [data[i : i + 1] for i in range(len(data))]),
        ("trailing", [data + TAIL]),
    ]


def feed(
    data: bytes,
    version: str | None = "1.2",
    *,
    authenticated: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> list[Frame]:
    """Frames from ``data`` fed three ways; asserts the three agree."""
    results = {
        way: receive_all(make_parser(version, authenticated=authenticated, limits=limits), chunks)
        for way, chunks in three_ways(data)
    }
    assert results["bytewise"] == results["whole"]
    assert results["trailing"] == results["whole"]
    return results["whole"]


def feed_one(data: bytes, version: str | None = "1.2", **kwargs: object) -> Frame:
    received = feed(data, version, **kwargs)  # type: ignore[arg-type]
    assert len(received) == 1, received
    return received[0]


def feed_error(
    data: bytes,
    message: str,
    detail: str = "",
    version: str | None = "1.2",
    *,
    authenticated: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> ProtocolError:
    """The ProtocolError ``data`` raises, fed three ways; asserts message and (part of) detail."""
    error: ProtocolError | None = None
    for way, chunks in three_ways(data):
        parser = make_parser(version, authenticated=authenticated, limits=limits)
        with pytest.raises(ProtocolError) as info:
            receive_all(parser, chunks)
        error = info.value
        assert error.message == message, (way, error)
        assert detail in error.detail, (way, error)
    assert error is not None
    return error


# --------------------------------------------------------------------------------------------------------
# STOMP 1.2 — Frames and their framing


class TestFraming:
    """STOMP 1.2 — STOMP Frames / Augmented BNF: command EOL *(header EOL) EOL body NUL *EOL."""

    def test_simple_frame(self) -> None:
        frame = feed_one(b"SEND\ndestination:/queue/a\n\nhello\x00")
        assert frame == Frame("SEND", (("destination", "/queue/a"),), b"hello")

    def test_frame_without_headers_or_body(self) -> None:
        assert feed_one(b"DISCONNECT\n\n\x00") == Frame("DISCONNECT")

    def test_crlf_line_endings(self) -> None:
        frame = feed_one(b"SEND\r\ndestination:/queue/a\r\nreceipt:1\r\n\r\nhi\x00")
        assert frame == Frame("SEND", (("destination", "/queue/a"), ("receipt", "1")), b"hi")

    def test_mixed_line_endings(self) -> None:
        frame = feed_one(b"SEND\r\na:1\nb:2\r\n\nhi\x00")
        assert frame.headers == (("a", "1"), ("b", "2"))

    def test_nul_followed_by_eols(self) -> None:
        assert feed(b"SEND\n\nA\x00\n\r\n\nSEND\n\nB\x00\r\n") == [
            Frame("SEND", body=b"A"),
            Frame("SEND", body=b"B"),
        ]

    def test_nuls_and_eols_before_a_frame_are_skipped(self) -> None:
        """As RabbitMQ's parser: ``\\n\\0SUBSCRIBE...`` and ``\\0\\n`` between frames."""
        assert feed(b"\n\x00SEND\n\nA\x00\x00\nSEND\n\nB\x00\x00\x00\r\n\x00SEND\n\nC\x00") == [
            Frame("SEND", body=b"A"),
            Frame("SEND", body=b"B"),
            Frame("SEND", body=b"C"),
        ]

    def test_nothing_but_nuls_and_eols_is_no_frame(self) -> None:
        assert feed(b"\x00\n\x00\r\n\x00") == []

    def test_a_nul_inside_a_command_line_is_still_malformed(self) -> None:
        feed_error(b"SE\x00ND\n\n\x00", "Invalid frame")

    def test_frames_ending_in_nul_only(self) -> None:
        """stomp.js style: no EOL after the NUL."""
        assert feed(b"SEND\n\nA\x00SEND\n\nB\x00") == [Frame("SEND", body=b"A"), Frame("SEND", body=b"B")]

    def test_heart_beats_before_between_and_after_frames(self) -> None:
        data = b"\n\r\n\nSEND\n\nA\x00\n\n\r\nSEND\n\nB\x00\n\r\n"
        assert feed(data) == [Frame("SEND", body=b"A"), Frame("SEND", body=b"B")]

    def test_heart_beats_alone(self) -> None:
        parser = make_parser()
        assert pull(parser, b"\n") == []
        assert pull(parser, b"\r\n") == []
        assert pull(parser, b"") == []
        assert pull(parser, b"SEND\n\nx\x00") == [Frame("SEND", body=b"x")]

    def test_many_frames_in_one_chunk(self) -> None:
        data = b"".join(b"SEND\nn:%d\n\n%d\x00" % (i, i) for i in range(50))
        received = pull(make_parser(), data)
        assert [frame.get("n") for frame in received] == [str(i) for i in range(50)]
        assert [frame.body for frame in received] == [str(i).encode() for i in range(50)]

    def test_every_two_way_split(self) -> None:
        data = b"\nSEND\r\ndestination:/queue/a\r\ncontent-length:3\r\n\r\na\x00b\x00\nACK\nid:1\n\n\x00"
        expected = [
            Frame("SEND", (("destination", "/queue/a"), ("content-length", "3")), b"a\x00b"),
            Frame("ACK", (("id", "1"),)),
        ]
        for cut in range(len(data) + 1):
            assert receive_all(make_parser(), [data[:cut], data[cut:]]) == expected, cut

    def test_partial_frame_is_kept_across_calls(self) -> None:
        parser = make_parser()
        assert pull(parser, b"SEND\ndestination:/qu") == []
        assert pull(parser, b"eue/a\n\nhel") == []
        assert pull(parser, b"lo\x00SEND\n") == [
            Frame("SEND", (("destination", "/queue/a"),), b"hello")
        ]
        assert pull(parser, b"\n\x00") == [Frame("SEND")]

    def test_accepts_bytearray_and_memoryview(self) -> None:
        parser = make_parser()
        assert pull(parser, bytearray(b"SEND\n\nx\x00")) == [Frame("SEND", body=b"x")]  # type: ignore[arg-type]
        assert pull(parser, memoryview(b"SEND\n\ny\x00")) == [Frame("SEND", body=b"y")]  # type: ignore[arg-type]

    def test_body_is_kept_verbatim(self) -> None:
        """stomper drops blank lines and strips lines; we must not."""
        assert feed_one(b"SEND\n\n  l1\n\nl3\n  \x00").body == b"  l1\n\nl3\n  "

    def test_body_bytes_are_bytes(self) -> None:
        assert type(feed_one(b"SEND\n\nabc\x00").body) is bytes

    @pytest.mark.parametrize("command", ["WRONGCOMMAND", "send", "X", "FOO_BAR", "A-1"])
    def test_unknown_visible_ascii_commands_are_returned(self, command: str) -> None:
        """The session, not the codec, answers "Bad command"."""
        assert feed_one(command.encode() + b"\n\n\x00").command == command

    @pytest.mark.parametrize(
        "line",
        [b"\x01\x02\x03", b"SE ND", b"\xff\xfeSEND", b"S\xc3\xa9ND", b"SEND\x7f", b"\x00\x01"],
        ids=["control", "space", "not-utf8", "non-ascii", "del", "nul-then-control"],
    )
    def test_invalid_command_line(self, line: bytes) -> None:
        feed_error(line + b"\n\n\x00", "Invalid frame")

    def test_binary_garbage_is_invalid(self) -> None:
        feed_error(bytes(range(256)) + b"\n\n\x00", "Invalid frame")

    def test_header_line_without_colon(self) -> None:
        feed_error(b"SEND\nbogusline\n\n\x00", "Invalid frame", "Header line without ':'")

    def test_header_with_empty_name(self) -> None:
        feed_error(b"SEND\n:value\n\n\x00", "Invalid frame", "empty name")

    def test_header_block_must_be_utf8(self) -> None:
        feed_error(b"SEND\nx:\xff\xfe\n\n\x00", "Invalid frame", "UTF-8")

    def test_nul_inside_header_block(self) -> None:
        """A NUL before the blank line: the frame ended without its header terminator."""
        feed_error(b"SEND\ndestination:/queue/a\n\x00", "Invalid frame", "NUL before the end of the headers")

    def test_utf8_headers(self) -> None:
        frame = feed_one("SEND\nnäme:välue ✓\n\n\x00".encode())
        assert frame.headers == (("näme", "välue ✓"),)

    def test_value_may_contain_colons(self) -> None:
        """Unescaped ':' in 1.2 values is tolerated (RabbitMQ does); the first ':' separates."""
        assert feed_one(b"SEND\nmessage-id:ID:host-1:2\n\n\x00").get("message-id") == "ID:host-1:2"

    def test_empty_value(self) -> None:
        assert feed_one(b"SEND\nx:\n\n\x00").headers == (("x", ""),)

    def test_values_are_not_trimmed_in_1_2(self) -> None:
        assert feed_one(b"SEND\nfoo: bar \n\n\x00").get("foo") == " bar "

    def test_internal_errors_become_protocol_errors(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The network layer only ever sees ProtocolError (websockets' Protocol.parse() does the same)."""

        class Broken:
            def search(self, *args: object) -> None:
                raise RuntimeError("boom")

        monkeypatch.setattr(frames_module, "_HEADER_END", Broken())
        parser = make_parser()
        with pytest.raises(ProtocolError) as info:
            pull(parser, b"SEND\n\n\x00")
        assert info.value.message == "Invalid frame"
        assert "Internal parser error" in info.value.detail
        assert isinstance(info.value.__cause__, RuntimeError)


class TestFailedParser:
    """After a ProtocolError the connection is closed: the parser stays failed."""

    def test_parser_is_dead_after_an_error(self) -> None:
        parser = make_parser()
        with pytest.raises(ProtocolError) as first:
            pull(parser, b"SEND\nbogus\n\n\x00")
        for data in (b"SEND\n\nok\x00", b""):
            with pytest.raises(ProtocolError) as again:
                pull(parser, data)
            assert (again.value.message, again.value.detail) == (first.value.message, first.value.detail)

    def test_failed_parser_drops_its_buffer(self) -> None:
        parser = make_parser(authenticated=False)
        pull(parser, b"SEND\n\n" + b"x" * 60_000)
        with pytest.raises(ProtocolError):
            pull(parser, b"x" * 10_000)
        assert len(parser._buffer) == 0

    def test_frames_before_the_error_are_returned_first(self) -> None:
        """Nothing sent correctly is lost: the good frames come back, the error waits in ``error``."""
        parser = make_parser()
        frames = pull(parser, b"SEND\n\nok\x00SEND\nbogus\n\n\x00")
        assert [f.body for f in frames] == [b"ok"]
        assert parser.error is not None and parser.error.message == "Invalid frame"
        with pytest.raises(ProtocolError):
            pull(parser, b"")

    def test_a_chunk_with_only_bad_input_raises(self) -> None:
        parser = make_parser()
        with pytest.raises(ProtocolError):
            pull(parser, b"SEND\nbogus\n\n\x00")
        assert parser.error is not None


# --------------------------------------------------------------------------------------------------------
# STOMP 1.2 — Body, content-length


class TestBody:
    """STOMP 1.2 — Body and Header content-length."""

    def test_content_length_body_may_contain_nul(self) -> None:
        frame = feed_one(b"SEND\ncontent-length:5\n\nab\x00cd\x00")
        assert frame.body == b"ab\x00cd"

    def test_binary_body(self) -> None:
        body = bytes(range(256)) * 4
        frame = feed_one(b"SEND\ncontent-length:%d\n\n" % len(body) + body + b"\x00")
        assert frame.body == body

    def test_content_length_zero(self) -> None:
        assert feed_one(b"SEND\ncontent-length:0\n\n\x00").body == b""

    def test_content_length_frame_followed_by_next_frame(self) -> None:
        data = b"SEND\ncontent-length:2\n\n\x00\x00\x00SEND\n\nx\x00\n"
        assert [f.body for f in feed(data)] == [b"\x00\x00", b"x"]

    def test_content_length_header_is_kept(self) -> None:
        assert feed_one(b"SEND\ncontent-length:1\n\nx\x00").get("content-length") == "1"

    def test_first_content_length_wins(self) -> None:
        assert feed_one(b"SEND\ncontent-length:2\ncontent-length:1\n\nab\x00").body == b"ab"

    def test_body_without_content_length_runs_to_first_nul(self) -> None:
        assert [f.body for f in feed(b"SEND\n\nab\x00SEND\n\ncd\x00")] == [b"ab", b"cd"]
        # What follows the first NUL is the next frame: here one without EOLs, hence malformed.
        feed_error(b"SEND\n\nab\x00cd\x00", "Invalid frame", "NUL before the end of the headers")

    @pytest.mark.parametrize("value", ["abc", "-1", "+5", " 5", "5 ", "1.0", "", "0x10", "٣", "1_0"])
    def test_invalid_content_length(self, value: str) -> None:
        data = f"SEND\ncontent-length:{value}\n\nabcdefghijkl\x00".encode()
        feed_error(data, "Invalid frame", "Invalid content-length")

    def test_content_length_1_0_leading_space_is_trimmed_first(self) -> None:
        assert feed_one(b"SEND\ncontent-length: 2\n\nab\x00", "1.0").body == b"ab"

    def test_missing_nul_after_content_length_body(self) -> None:
        feed_error(
            b"SEND\ncontent-length:2\n\nabc\x00", "Invalid frame", "Expected NUL after the 2-byte body"
        )

    def test_huge_content_length(self) -> None:
        feed_error(b"SEND\ncontent-length:" + b"9" * 5000 + b"\n\n\x00", "Frame too large")


# --------------------------------------------------------------------------------------------------------
# STOMP 1.2 — Repeated header entries


class TestRepeatedHeaders:
    """STOMP 1.2 — Repeated Header Entries: only the first one is used; all are kept."""

    def test_first_occurrence_wins(self) -> None:
        frame = feed_one(b"SEND\ndestination:/first\ndestination:/second\n\n\x00")
        assert frame.get("destination") == "/first"
        assert frame.headers == (("destination", "/first"), ("destination", "/second"))

    def test_get_and_has(self) -> None:
        frame = Frame("SEND", (("a", "1"), ("b", ""), ("a", "2")))
        assert frame.get("a") == "1"
        assert frame.get("b") == ""
        assert frame.get("c") is None
        assert frame.get("c", "d") == "d"
        assert frame.has("b")
        assert not frame.has("c")


# --------------------------------------------------------------------------------------------------------
# STOMP 1.2 — Value Encoding


ESCAPES_1_2 = [("\n", "\\n"), (":", "\\c"), ("\\", "\\\\"), ("\r", "\\r")]


class TestValueEncoding:
    """STOMP 1.2 — Value Encoding (and 1.1's, and RabbitMQ's 1.0 behaviour)."""

    @pytest.mark.parametrize(("decoded", "encoded"), ESCAPES_1_2)
    @pytest.mark.parametrize("version", ["1.1", "1.2"])
    def test_decode_table(self, version: str, decoded: str, encoded: str) -> None:
        data = f"SEND\nx{encoded}y:a{encoded}b\n\n\x00".encode()
        assert feed_one(data, version).headers == ((f"x{decoded}y", f"a{decoded}b"),)

    @pytest.mark.parametrize(("decoded", "encoded"), ESCAPES_1_2)
    @pytest.mark.parametrize("version", ["1.1", "1.2"])
    def test_encode_table(self, version: str, decoded: str, encoded: str) -> None:
        assert encode_header_value(f"a{decoded}b", version) == f"a{encoded}b"
        data = Frame("SEND", ((f"x{decoded}", f"a{decoded}b"),)).serialize(version)
        assert data == f"SEND\nx{encoded}:a{encoded}b\n\n\x00".encode()

    @pytest.mark.parametrize("version", ["1.0", None])
    def test_encode_1_0_only_protects_lf_and_cr(self, version: str | None) -> None:
        assert encode_header_value("a:b\\c", version) == "a:b\\c"
        assert encode_header_value("a\nb\rc", version) == "a\\nb\\rc"

    @pytest.mark.parametrize("version", [*VERSIONS, None])
    def test_encode_fast_path_returns_the_same_object(self, version: str | None) -> None:
        value = "/exchange/amq.topic/stocks.nyse.acme"
        assert encode_header_value(value, version) is value

    def test_decode_sequence_of_escapes(self) -> None:
        assert decode_header_value("\\\\n\\\\\\c\\n", "1.2") == "\\n\\:\n"

    @pytest.mark.parametrize("sequence", ["\\t", "\\a", "\\0", "\\C", "\\N", "\\ "])
    def test_undefined_escape_is_fatal_in_1_2(self, sequence: str) -> None:
        data = f"SEND\nx:a{sequence}b\n\n\x00".encode()
        feed_error(data, "Invalid header", f"Undefined escape sequence '{sequence}' in header value")

    def test_undefined_escape_in_name_is_fatal_in_1_2(self) -> None:
        feed_error(b"SEND\nx\\ty:v\n\n\x00", "Invalid header", "in header name")

    def test_trailing_backslash_is_fatal_in_1_2(self) -> None:
        feed_error(b"SEND\nx:ab\\\n\n\x00", "Invalid header", "Incomplete escape sequence")

    def test_decode_header_value_raises_protocol_error(self) -> None:
        with pytest.raises(ProtocolError) as info:
            decode_header_value("a\\tb", "1.2")
        assert info.value.message == "Invalid header"
        assert info.value.detail == "Undefined escape sequence '\\t' in header value"

    def test_undefined_escapes_stay_literal_in_1_1(self) -> None:
        assert feed_one(b"SEND\nx:a\\tb\\\n\n\x00", "1.1").get("x") == "a\\tb\\"

    def test_cr_escape_is_decoded_in_1_1(self) -> None:
        """1.1 defines no \\r, but our 1.1 encoder writes CR that way; decoding it keeps 1.1 symmetric."""
        assert feed_one(b"SEND\nx:a\\rb\n\n\x00", "1.1").get("x") == "a\rb"

    @pytest.mark.parametrize("version", ["1.0", None])
    def test_no_unescaping_in_1_0_or_before_connect(self, version: str | None) -> None:
        assert feed_one(b"SEND\nx\\c:a\\cb\\n\\t\n\n\x00", version).headers == (("x\\c", "a\\cb\\n\\t"),)

    @pytest.mark.parametrize("command", ["CONNECT", "STOMP", "CONNECTED"])
    @pytest.mark.parametrize("version", ["1.1", "1.2"])
    def test_connect_and_connected_are_not_unescaped(self, command: str, version: str) -> None:
        frame = feed_one(f"{command}\nlogin:a\\cb\npasscode:p\\t\\\n\n\x00".encode(), version)
        assert frame.headers == (("login", "a\\cb"), ("passcode", "p\\t\\"))

    @pytest.mark.parametrize("command", ["CONNECT", "STOMP", "CONNECTED"])
    def test_connect_and_connected_are_not_escaped(self, command: str) -> None:
        data = Frame(command, (("login", "a:b\\c"), ("x", "l1\nl2\r"))).serialize("1.2")
        assert data == f"{command}\nlogin:a:b\\c\nx:l1\\nl2\\r\n\n\x00".encode()

    def test_1_0_trims_leading_whitespace_of_values(self) -> None:
        """RabbitMQ's 1.0 frame transformer; names and trailing whitespace are left alone."""
        frame = feed_one(b"SEND\ndestination:  /queue/a \n x:\t\ty\n\n\x00", "1.0")
        assert frame.headers == (("destination", "/queue/a "), (" x", "y"))

    @pytest.mark.parametrize("version", ["1.1", "1.2", None])
    def test_other_versions_do_not_trim(self, version: str | None) -> None:
        assert feed_one(b"SEND\nx:  y \n\n\x00", version).get("x") == "  y "

    def test_version_is_read_when_the_headers_complete(self) -> None:
        parser = make_parser(None)
        assert pull(parser, b"SEND\nx:a\\c") == []
        parser.version = "1.2"
        assert pull(parser, b"b\n\n\x00") == [Frame("SEND", (("x", "a:b"),))]


# --------------------------------------------------------------------------------------------------------
# Limits (RabbitMQ 4.2+: 64 KiB before CONNECT, 4 MiB after, 100 headers)


def sized_frame(size: int, *, content_length: bool = False) -> bytes:
    """A frame of exactly ``size`` bytes by the Limits definition (command to body, NUL excluded)."""
    head = b"SEND\ncontent-length:%010d\n\n" if content_length else b"SEND\nx:%010d\n\n"
    body_size = size - len(head % 0)
    return head % body_size + b"b" * body_size + b"\x00"


class TestLimits:
    """Named limits: every one raises ProtocolError as soon as it is exceeded, never buffering more."""

    small = Limits(max_frame_size_unauthenticated=200, max_frame_size=400, max_headers=5, max_header_line=50)

    def test_defaults_match_rabbitmq(self) -> None:
        assert Limits(64 * 1024, 4 * 1024 * 1024, 100, 8 * 1024) == DEFAULT_LIMITS
        assert FrameParser().limits == DEFAULT_LIMITS

    @pytest.mark.parametrize("content_length", [False, True])
    def test_frame_size_before_connect(self, content_length: bool) -> None:
        limit = self.small.max_frame_size_unauthenticated
        ok = sized_frame(limit, content_length=content_length)
        assert len(feed(ok, authenticated=False, limits=self.small)) == 1
        too_big = sized_frame(limit + 1, content_length=content_length)
        error = feed_error(too_big, "Frame too large", authenticated=False, limits=self.small)
        assert error.detail == "Frame exceeds the 200-byte limit before CONNECT succeeded"

    @pytest.mark.parametrize("content_length", [False, True])
    def test_frame_size_after_connect(self, content_length: bool) -> None:
        limit = self.small.max_frame_size
        assert len(feed(sized_frame(limit, content_length=content_length), limits=self.small)) == 1
        too_big = sized_frame(limit + 1, content_length=content_length)
        error = feed_error(too_big, "Frame too large", limits=self.small)
        assert error.detail == "Frame exceeds the 400-byte limit"

    def test_default_frame_sizes(self) -> None:
        """64 KiB pre-auth, 4 MiB post-auth; content-length lets the limit fail from the headers alone."""
        assert len(pull(make_parser(authenticated=False), sized_frame(64 * 1024))) == 1
        with pytest.raises(ProtocolError, match="65536-byte"):
            pull(make_parser(authenticated=False),
                sized_frame(64 * 1024 + 1, content_length=True)[:100]
            )
        assert len(pull(make_parser(), sized_frame(4 * 1024 * 1024, content_length=True))) == 1
        with pytest.raises(ProtocolError, match="4194304-byte"):
            pull(make_parser(), sized_frame(4 * 1024 * 1024 + 1, content_length=True)[:100])

    def test_authenticated_switches_the_limit(self) -> None:
        parser = make_parser(authenticated=False, limits=self.small)
        with pytest.raises(ProtocolError):
            pull(parser, sized_frame(300))
        parser = make_parser(authenticated=False, limits=self.small)
        parser.authenticated = True
        assert len(pull(parser, sized_frame(300))) == 1

    def test_body_fails_before_its_nul_arrives(self) -> None:
        parser = make_parser(limits=self.small)
        assert pull(parser, b"SEND\n\n" + b"x" * 394) == []  # 400 bytes so far: still allowed
        with pytest.raises(ProtocolError, match="Frame too large"):
            pull(parser, b"x")

    def test_content_length_fails_as_soon_as_the_headers_arrive(self) -> None:
        parser = make_parser(limits=self.small)
        with pytest.raises(ProtocolError, match="Frame too large"):
            pull(parser, b"SEND\ncontent-length:1000\n\n")

    def test_unterminated_header_block_fails_before_the_frame_completes(self) -> None:
        limits = Limits(max_frame_size_unauthenticated=200, max_headers=1000, max_header_line=1000)
        parser = make_parser(authenticated=False, limits=limits)
        assert pull(parser, b"SEND\n" + b"a:b\n" * 48 + b"abc") == []  # 200 bytes
        with pytest.raises(ProtocolError, match="Frame too large"):
            pull(parser, b"d")

    def test_header_count(self) -> None:
        ok = b"SEND\n" + b"h:v\n" * 5 + b"\n\x00"
        assert feed_one(ok, limits=self.small).headers == (("h", "v"),) * 5
        error = feed_error(b"SEND\n" + b"h:v\n" * 6 + b"\n\x00", "Too many headers", limits=self.small)
        assert error.detail == "A frame may carry at most 5 headers"

    def test_default_header_count(self) -> None:
        assert len(feed_one(b"SEND\n" + b"h:v\n" * 100 + b"\n\x00").headers) == 100
        feed_error(b"SEND\n" + b"h:v\n" * 101 + b"\n\x00", "Too many headers", "at most 100 headers")

    def test_header_count_fails_before_the_frame_completes(self) -> None:
        parser = make_parser(limits=self.small)
        assert pull(parser, b"SEND\n" + b"h:v\n" * 5) == []
        with pytest.raises(ProtocolError, match="Too many headers"):
            pull(parser, b"h:v\n")

    def test_header_line_length(self) -> None:
        line = b"h:" + b"v" * 48  # 50 bytes
        assert feed_one(b"SEND\n" + line + b"\n\n\x00", limits=self.small).get("h") == "v" * 48
        error = feed_error(b"SEND\n" + line + b"v\n\n\x00", "Header too long", limits=self.small)
        assert error.detail == "Header line exceeds the 50-byte limit"

    def test_default_header_line_length(self) -> None:
        line = b"h:" + b"v" * (8 * 1024 - 2)
        assert len(feed(b"SEND\n" + line + b"\n\n\x00")) == 1
        feed_error(b"SEND\n" + line + b"v\n\n\x00", "Header too long", "8192-byte limit")

    def test_header_line_fails_before_its_eol_arrives(self) -> None:
        parser = make_parser(limits=self.small)
        assert pull(parser, b"SEND\nh:" + b"v" * 48) == []
        with pytest.raises(ProtocolError, match="Header too long"):
            pull(parser, b"v")

    def test_command_line_length(self) -> None:
        assert feed_one(b"A" * 50 + b"\n\n\x00", limits=self.small).command == "A" * 50
        error = feed_error(b"A" * 51 + b"\n\n\x00", "Invalid frame", limits=self.small)
        assert error.detail == "Command line exceeds the 50-byte limit"

    def test_command_line_fails_before_its_eol_arrives(self) -> None:
        parser = make_parser(limits=self.small)
        assert pull(parser, b"A" * 50) == []
        with pytest.raises(ProtocolError, match="Command line exceeds"):
            pull(parser, b"A")


class TestLinearTime:
    """A partial frame is never rescanned: work stays linear however the stream is split.

    Each case takes about 0.1 s when linear; rescanning the partial frame on every chunk (the bug these
    tests catch, checked by breaking the scan positions) takes several seconds.
    """

    bound = 1.5  # seconds

    def feed_chunks(self, parser: FrameParser, data: bytes, size: int) -> list[Frame]:
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        started = time.perf_counter()
        received: list[Frame] = []
        for chunk in chunks:
            received += pull(parser, chunk)
        elapsed = time.perf_counter() - started
        assert elapsed < self.bound, f"{elapsed:.2f}s for {len(chunks)} chunks: quadratic?"
        return received

    def test_body_without_content_length_in_small_chunks(self) -> None:
        """4 MiB waiting for its NUL, in 16-byte chunks (262,000 calls)."""
        body = b"x" * (4 * 1024 * 1024 - 100)
        received = self.feed_chunks(make_parser(), b"SEND\n\n" + body + b"\x00", 16)
        assert received == [Frame("SEND", body=body)]

    def test_body_with_content_length_in_small_chunks(self) -> None:
        body = b"\x00" * (4 * 1024 * 1024 - 100)
        data = b"SEND\ncontent-length:%d\n\n" % len(body) + body + b"\x00"
        received = self.feed_chunks(make_parser(), data, 64)
        assert received == [Frame("SEND", (("content-length", str(len(body))),), body)]

    def test_header_block_one_byte_at_a_time(self) -> None:
        """64 KiB of short header lines: the header-end search and the line checks resume, never restart."""
        limits = Limits(max_headers=10_000, max_header_line=2048)
        data = b"SEND\n" + (b"h:" + b"v" * 12 + b"\r\n") * 4000 + b"\r\n\x00"
        received = self.feed_chunks(make_parser(limits=limits), data, 1)
        assert len(received[0].headers) == 4000

    def test_many_frames_per_chunk(self) -> None:
        data = b"SEND\ndestination:/queue/a\n\nhello\x00\n" * 20_000
        assert len(self.feed_chunks(make_parser(), data, len(data))) == 20_000


# --------------------------------------------------------------------------------------------------------
# Before CONNECT succeeded


class TestConnectPipelining:
    """Frames pipelined behind CONNECT are pulled one at a time: the owner of the parser (the session)
    switches version and limits after CONNECT, before it pulls the next frame."""

    def test_frames_behind_connect_use_the_switches_set_after_it(self) -> None:
        parser = make_parser(None, authenticated=False)
        parser.receive_data(b"CONNECT\naccept-version:1.2\n\n\x00SEND\nx:a\\cb\n\n\x00SEND\n\n\x00")
        assert parser.next_frame() == Frame("CONNECT", (("accept-version", "1.2"),))
        parser.version = "1.2"
        parser.authenticated = True
        assert pull(parser, b"") == [Frame("SEND", (("x", "a:b"),)), Frame("SEND")]

    def test_without_the_switch_the_next_frame_is_not_unescaped(self) -> None:
        parser = make_parser(None, authenticated=False)
        parser.receive_data(b"STOMP\n\n\x00SEND\nx:a\\cb\n\n\x00")
        assert parser.next_frame() == Frame("STOMP")
        assert parser.next_frame() == Frame("SEND", (("x", "a\\cb"),))

    def test_the_frame_size_limit_follows_authenticated(self) -> None:
        parser = make_parser(None, authenticated=False, limits=Limits(max_frame_size_unauthenticated=100))
        parser.receive_data(b"CONNECT\n\n\x00SEND\n\n" + b"x" * 200 + b"\x00")
        assert parser.next_frame() == Frame("CONNECT")
        parser.authenticated = True
        frame = parser.next_frame()
        assert frame is not None and len(frame.body) == 200

    def test_stomp_command_too(self) -> None:
        parser = make_parser(None, authenticated=False)
        parser.receive_data(b"STOMP\n\n\x00DISCONNECT\n\n\x00")
        assert [f.command for f in pull(parser, b"")] == ["STOMP", "DISCONNECT"]

    def test_frames_before_connect_are_returned(self) -> None:
        """The session answers them "Illegal command"; the codec just parses."""
        parser = make_parser(None, authenticated=False)
        assert len(pull(parser, b"SEND\n\n\x00SEND\n\n\x00")) == 2


# --------------------------------------------------------------------------------------------------------
# Serialization


class TestSerialize:
    """Frame.serialize: the bytes we write."""

    def test_layout(self) -> None:
        frame = Frame("MESSAGE", (("destination", "/queue/a"), ("subscription", "0")), b"hi")
        assert (
            frame.serialize() == b"MESSAGE\ndestination:/queue/a\nsubscription:0\ncontent-length:2\n\nhi\x00"
        )

    def test_empty_body_has_no_content_length(self) -> None:
        assert Frame("RECEIPT", (("receipt-id", "1"),)).serialize() == b"RECEIPT\nreceipt-id:1\n\n\x00"

    def test_given_content_length_is_replaced(self) -> None:
        frame = Frame("MESSAGE", (("content-length", "99"), ("a", "1"), ("content-length", "7")), b"abc")
        assert frame.serialize() == b"MESSAGE\na:1\ncontent-length:3\n\nabc\x00"
        assert Frame("MESSAGE", (("content-length", "5"),)).serialize() == b"MESSAGE\n\n\x00"

    def test_binary_body_is_written_raw(self) -> None:
        body = bytes(range(256))
        assert Frame("MESSAGE", body=body).serialize().endswith(b"\n\n" + body + b"\x00")

    def test_order_and_duplicates_are_kept(self) -> None:
        frame = Frame("MESSAGE", (("b", "2"), ("a", "1"), ("b", "3")))
        assert frame.serialize() == b"MESSAGE\nb:2\na:1\nb:3\n\n\x00"

    def test_utf8(self) -> None:
        assert Frame("MESSAGE", (("ä", "✓"),)).serialize() == "MESSAGE\nä:✓\n\n\x00".encode()

    @pytest.mark.parametrize("version", [*VERSIONS, None])
    def test_no_header_injection_in_any_version(self, version: str | None) -> None:
        frame = Frame("MESSAGE", (("x", "a\n\nEVIL\n\n\x00"), ("y\r\n", "b")))
        data = frame.serialize(version)
        assert data.count(b"\n") == 4  # command, two headers, blank line
        assert b"\r" not in data
        assert data.count(b"\x00") == 1

    @pytest.mark.parametrize("version", [*VERSIONS, None])
    def test_nul_in_headers(self, version: str | None) -> None:
        """No STOMP version can carry NUL in a header (it ends the frame): it is written as U+FFFD."""
        assert encode_header_value("a\x00b", version) == "a\ufffdb"
        frame = Frame("MESSAGE", (("x\x00", "\x00"),))
        assert Frame.parse(frame.serialize(version), version) == Frame("MESSAGE", (("x\ufffd", "\ufffd"),))

    def test_serialize_1_0_keeps_colons_and_backslashes(self) -> None:
        frame = Frame("MESSAGE", (("message-id", "ID:host\\1"),))
        assert frame.serialize("1.0") == b"MESSAGE\nmessage-id:ID:host\\1\n\n\x00"

    def test_round_trip_1_0(self) -> None:
        frame = Frame("MESSAGE", (("message-id", "ID:host\\1"), ("x", "y ")), b"body")
        parsed = feed_one(frame.serialize("1.0"), "1.0")
        assert parsed == Frame("MESSAGE", (*frame.headers, ("content-length", "4")), b"body")


class TestFrameParse:
    """Frame.parse: exactly one whole frame."""

    def test_one_frame(self) -> None:
        assert Frame.parse(b"SEND\nx:a\\cb\n\nhi\x00") == Frame("SEND", (("x", "a:b"),), b"hi")

    def test_version(self) -> None:
        assert Frame.parse(b"SEND\nx:a\\cb\n\n\x00", "1.0").get("x") == "a\\cb"
        assert Frame.parse(b"SEND\nx:a\\cb\n\n\x00", None).get("x") == "a\\cb"

    def test_trailing_eols_are_allowed(self) -> None:
        assert Frame.parse(b"\nSEND\n\n\x00\r\n\n") == Frame("SEND")

    def test_no_limits(self) -> None:
        assert len(Frame.parse(b"SEND\n" + b"h:v\n" * 200 + b"\n\x00").headers) == 200

    @pytest.mark.parametrize(
        ("data", "detail"),
        [
            (b"SEND\n\n", "Incomplete frame"),
            (b"", "Incomplete frame"),
            (b"SEND\n\n\x00SEND\n\n\x00", "Expected one frame, got 2"),
            (b"SEND\n\n\x00SEND", "Trailing data"),
        ],
    )
    def test_not_exactly_one_frame(self, data: bytes, detail: str) -> None:
        with pytest.raises(ProtocolError, match=detail):
            Frame.parse(data)

    def test_malformed(self) -> None:
        with pytest.raises(ProtocolError, match="Invalid header"):
            Frame.parse(b"SEND\nx:\\t\n\n\x00")


class TestFrameValue:
    """Frames are values (websockets frames.py)."""

    def test_frozen(self) -> None:
        frame = Frame("SEND")
        with pytest.raises(AttributeError):
            frame.command = "ACK"  # type: ignore[misc]

    def test_equality_and_hash(self) -> None:
        assert Frame("SEND", (("a", "1"),), b"x") == Frame("SEND", (("a", "1"),), b"x")
        assert hash(Frame("SEND", (("a", "1"),), b"x")) == hash(Frame("SEND", (("a", "1"),), b"x"))

    def test_repr_truncates_the_body(self) -> None:
        text = repr(Frame("SEND", (), b"x" * 10_000))
        assert len(text) < 100
        assert text.startswith("Frame('SEND', (), b'xxx")


# --------------------------------------------------------------------------------------------------------
# ERROR frames


class TestProtocolError:
    """STOMP 1.2 — ERROR; RabbitMQ adds version:1.0,1.1,1.2 and content-type:text/plain."""

    def test_to_frame(self) -> None:
        frame = ProtocolError("Invalid frame", "Header line without ':' ✓").to_frame()
        assert frame == Frame(
            "ERROR",
            (("message", "Invalid frame"), ("content-type", "text/plain"), ("version", "1.0,1.1,1.2")),
            "Header line without ':' ✓".encode(),
        )

    def test_to_frame_with_receipt_and_extra_headers(self) -> None:
        error = ProtocolError("Bad CONNECT", "no", receipt_id="r-1", headers=(("subscription", "0"),))
        assert error.to_frame().headers == (
            ("message", "Bad CONNECT"),
            ("content-type", "text/plain"),
            ("version", SUPPORTED_VERSIONS_TEXT),
            ("receipt-id", "r-1"),
            ("subscription", "0"),
        )

    def test_attributes_and_str(self) -> None:
        error = ProtocolError("Frame too large", "Frame exceeds the 10-byte limit")
        assert (error.message, error.detail, error.receipt_id, error.headers) == (
            "Frame too large",
            "Frame exceeds the 10-byte limit",
            None,
            (),
        )
        assert str(error) == "Frame too large: Frame exceeds the 10-byte limit"
        assert str(ProtocolError("Bad command")) == "Bad command"

    def test_error_frame_serializes(self) -> None:
        data = ProtocolError("Invalid header", "x").to_frame().serialize("1.2")
        assert data.startswith(
            b"ERROR\nmessage:Invalid header\ncontent-type:text/plain\nversion:1.0,1.1,1.2\n"
        )
        assert data.endswith(b"content-length:1\n\nx\x00")


# --------------------------------------------------------------------------------------------------------
# Properties


COMMANDS = st.text(string.ascii_uppercase, min_size=1, max_size=12).filter(
    lambda command: command not in {"CONNECT", "STOMP", "CONNECTED"}
)
# Any text that has a UTF-8 encoding, except NUL (no STOMP header can carry it; see test_nul_in_headers).
ANY_TEXT = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
NAMES = st.text(ANY_TEXT, min_size=1, max_size=12).filter(lambda name: name != "content-length")
VALUES = st.text(ANY_TEXT, max_size=20)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=8).map(tuple)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class TestProperties:
    """Hypothesis: round trips, and no exception but ProtocolError on arbitrary input."""

    @settings(max_examples=150, deadline=None)
    @given(
        command=COMMANDS,
        headers=HEADERS,
        body=st.binary(max_size=64),
        version=st.sampled_from(["1.1", "1.2"]),
        cuts=st.lists(st.integers(0, 400), max_size=6),
    )
    def test_round_trip(
        self, command: str, headers: tuple[tuple[str, str], ...], body: bytes, version: str, cuts: list[int]
    ) -> None:
        frame = Frame(command, headers, body)
        data = frame.serialize(version)
        expected = Frame(command, headers + ((("content-length", str(len(body))),) if body else ()), body)
        assert Frame.parse(data, version) == expected
        parser = make_parser(version)
        assert receive_all(parser, chunked(data + b"\n" + data, cuts)) == [expected, expected]

    @settings(max_examples=50, deadline=None)
    @given(
        command=st.sampled_from(["CONNECT", "STOMP", "CONNECTED"]),
        headers=st.lists(
            st.tuples(
                st.text(ANY_TEXT.filter(lambda c: c not in ":\r\n"), min_size=1, max_size=10),
                st.text(ANY_TEXT.filter(lambda c: c not in "\r\n"), max_size=10),
            ),
            max_size=5,
        ).map(tuple),
        version=st.sampled_from([*VERSIONS, None]),
    )
    def test_round_trip_unescaped_commands(
        self, command: str, headers: tuple[tuple[str, str], ...], version: str | None
    ) -> None:
        """CONNECT/CONNECTED carry ':' and '\\' raw; only LF/CR (which they cannot carry) are lost."""
        frame = Frame(command, headers)
        parsed = Frame.parse(frame.serialize(version), version)
        if version == "1.0":
            headers = tuple((name, value.lstrip(" \t")) for name, value in headers)
        assert parsed == Frame(command, headers)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        data=st.lists(
            st.one_of(
                st.binary(max_size=6),
                st.sampled_from(
                    [
                        b"SEND",
                        b"CONNECT",
                        b"\n",
                        b"\r\n",
                        b"\r",
                        b":",
                        b"\\",
                        b"\\c",
                        b"\\t",
                        b"\x00",
                        b"content-length:",
                        b"content-length:3\n",
                        b"3",
                        b"a:b\n",
                        b"\n\n",
                        b"\xff",
                        "é".encode(),
                    ]
                ),
            ),
            max_size=25,
        ).map(b"".join),
        cuts=st.lists(st.integers(0, 150), max_size=8),
        version=st.sampled_from([*VERSIONS, None]),
        authenticated=st.booleans(),
        small=st.booleans(),
    )
    def test_arbitrary_input_in_arbitrary_chunks(
        self, data: bytes, cuts: list[int], version: str | None, authenticated: bool, small: bool
    ) -> None:
        """Only ProtocolError escapes, and the chunking never changes the outcome."""
        limits = Limits(40, 60, 3, 12) if small else DEFAULT_LIMITS

        def outcome(chunks: list[bytes]) -> list[Frame] | None:
            parser = make_parser(version, authenticated=authenticated, limits=limits)
            try:
                return receive_all(parser, chunks)
            except ProtocolError as error:
                assert not error.detail.startswith("Internal parser error"), error.__cause__
                return None

        whole = outcome([data])
        assert outcome(chunked(data, cuts)) == whole
        assert outcome([data[i : i + 1] for i in range(len(data))]) == whole


class TestPull:
    """``next_frame``: a burst is taken one frame at a time, the rest stays buffered."""

    def test_one_frame_per_call_then_need_data(self) -> None:
        parser = make_parser("1.2")
        parser.receive_data(b"".join(f"SEND\nn:{i}\n\n\x00".encode() for i in range(5)) + b"SEND\n")
        taken = []
        while (frame := parser.next_frame()) is not None:
            taken.append(frame.get("n"))
        assert taken == ["0", "1", "2", "3", "4"]
        assert parser.next_frame() is None
        assert pull(parser, b"\n\x00") == [Frame("SEND")]  # the partial frame was kept

    def test_bad_input_is_raised_when_it_is_reached(self) -> None:
        parser = make_parser("1.2")
        parser.receive_data(b"SEND\n\n\x00SEND\n\n\x00SEND\n\n\x00BAD FRAME\n\n\x00")
        for _ in range(3):
            assert parser.next_frame() == Frame("SEND") and parser.error is None
        with pytest.raises(ProtocolError):
            parser.next_frame()
        assert parser.error is not None and parser.error.message == "Invalid frame"
