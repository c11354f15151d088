"""Client addresses behind load balancers: X-Forwarded-For and the PROXY protocol v1/v2 (HAProxy's spec)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from gateway.proxy import PROXY_V2, ProxyHeaderError, TrustedProxies, is_proxy_header, parse_proxy_header


def v2(command: int, family: int, body: bytes) -> bytes:
    return PROXY_V2 + bytes((0x20 | command, family)) + struct.pack(">H", len(body)) + body


V2_IPV4 = v2(1, 0x11, bytes([203, 0, 113, 7]) + bytes([10, 0, 0, 1]) + struct.pack(">HH", 51000, 443))
V2_IPV6 = v2(
    1,
    0x21,
    ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed + struct.pack(">HH", 4000, 80),
)


class TestProxyProtocol:
    @pytest.mark.parametrize(
        ("header", "address"),
        [
            (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n", ("203.0.113.7", 51000)),
            (b"PROXY TCP6 2001:db8::7 ::1 4000 80\r\n", ("2001:db8::7", 4000)),
            (b"PROXY UNKNOWN\r\n", None),
            (V2_IPV4, ("203.0.113.7", 51000)),
            (V2_IPV6, ("2001:db8::7", 4000)),
            (v2(0, 0x00, b""), None),  # LOCAL
            (v2(1, 0x11, bytes(12) + b"\x00\x03TLV"), ("0.0.0.0", 0)),  # TLVs after the addresses are skipped
        ],
    )
    def test_whole_one_byte_at_a_time_and_with_trailing_data(self, header: bytes, address: object) -> None:
        trailing = b"GET /ws HTTP/1.1\r\n"
        assert parse_proxy_header(header + trailing) == (len(header), address)
        for cut in range(len(header)):
            assert parse_proxy_header(header[:cut]) is None, cut
        assert is_proxy_header(header[:5]) is None or header.startswith(b"PROXY")

    @pytest.mark.parametrize(
        "bad",
        [
            b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            b"PROXY SCTP 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY " + b"x" * 200,
            PROXY_V2 + bytes((0x31, 0x11)) + b"\x00\x00",  # version 3
            v2(1, 0x11, bytes(4)),  # too short for IPv4
            b"GET / HTTP/1.1\r\n",
        ],
    )
    def test_malformed(self, bad: bytes) -> None:
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(bad)

    def test_http_and_stomp_are_not_proxy_headers(self) -> None:
        assert is_proxy_header(b"GET /ws HTTP/1.1") is False
        assert is_proxy_header(b"CONNECT\n") is False
        assert is_proxy_header(b"\r\n") is None  # could still be v2
        assert is_proxy_header(b"\n") is False  # a heart-beat


class TestForwardedFor:
    trusted = TrustedProxies(["10.0.0.0/8", "::1/128"])

    def test_untrusted_peer_is_the_client_whatever_it_claims(self) -> None:
        assert self.trusted.client_address("198.51.100.1", ["203.0.113.7"]) == "198.51.100.1"

    def test_first_untrusted_hop_from_the_right(self) -> None:
        assert self.trusted.client_address("10.0.0.2", ["1.1.1.1, 203.0.113.7, 10.0.0.5"]) == "203.0.113.7"
        assert self.trusted.client_address("::1", ["1.1.1.1", "203.0.113.7"]) == "203.0.113.7"

    def test_all_trusted_or_no_header(self) -> None:
        assert self.trusted.client_address("10.0.0.2", ["10.1.1.1"]) == "10.1.1.1"
        assert self.trusted.client_address("10.0.0.2", []) == "10.0.0.2"

    def test_malformed_hop_stops_at_the_last_trusted_one(self) -> None:
        assert self.trusted.client_address("10.0.0.2", ["203.0.113.7, garbage"]) == "10.0.0.2"

    def test_ipv4_mapped_peer(self) -> None:
        assert self.trusted.trusts("::ffff:10.1.2.3")
