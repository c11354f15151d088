"""The client's address behind a load balancer (pure): ``X-Forwarded-For`` and the PROXY protocol v1 and v2.

Both are believed only from ``--trusted-proxy`` networks (:class:`TrustedProxies`): anyone else could
write them. ``X-Forwarded-For`` is read from the right: each trusted hop is skipped, and the first address
that is not a trusted proxy is the client (:meth:`TrustedProxies.client_address`). A PROXY protocol header
(HAProxy's specification, v1 text and v2 binary) comes before the first byte of HTTP or STOMP on a
connection from a trusted proxy: :func:`parse_proxy_header` reads it, and the transport strips it. An HTTP
request or a STOMP frame never starts like one, so a trusted proxy may send it or not.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["PROXY_V1", "PROXY_V2", "ProxyHeaderError", "TrustedProxies", "is_proxy_header", "parse_proxy_header"]

PROXY_V1 = b"PROXY "
PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the longest v1 line, CRLF included
_V2_MAX = 16 + 65535

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """A malformed PROXY protocol header: the connection must be closed."""


def is_proxy_header(data: bytes) -> bool | None:
    """Whether ``data`` (the first bytes of a connection) starts with a PROXY header; None: too few bytes
    to tell yet."""
    for signature in (PROXY_V1, PROXY_V2):
        size = min(len(data), len(signature))
        if data[:size] == signature[:size]:
            return True if size == len(signature) else None
    return False


def _address(text: str | bytes, port: int) -> Address:
    try:
        host = str(ipaddress.ip_address(text if isinstance(text, str) else bytes(text)))
    except ValueError:
        raise ProxyHeaderError(f"not an IP address: {text!r}") from None
    if not 0 <= port <= 65535:
        raise ProxyHeaderError(f"not a port: {port}")
    return host, port


def _parse_v1(data: bytes) -> tuple[int, Address | None] | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end == -1:
        if len(data) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    fields = data[:end].decode("ascii", "replace").split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return end + 2, None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    _, family, source, _destination, source_port, _destination_port = fields
    if not source_port.isdigit():
        raise ProxyHeaderError("malformed PROXY v1 port")
    host, port = _address(source, int(source_port))
    if (family == "TCP4") != ("." in host):
        raise ProxyHeaderError("PROXY v1 address of the wrong family")
    return end + 2, (host, port)


def _parse_v2(data: bytes) -> tuple[int, Address | None] | None:
    if len(data) < 16:
        return None
    version_command, family, length = data[12], data[13], int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise ProxyHeaderError("unknown PROXY v2 version or command")
    total = 16 + length
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL: the proxy's own connection (a health check)
        return total, None
    body = data[16:total]
    if family >> 4 == 1 and length >= 12:  # AF_INET
        return total, _address(body[0:4], int.from_bytes(body[8:10], "big"))
    if family >> 4 == 2 and length >= 36:  # AF_INET6
        return total, _address(body[0:16], int.from_bytes(body[32:34], "big"))
    if family >> 4 in (1, 2):
        raise ProxyHeaderError("PROXY v2 address block too short")
    return total, None  # AF_UNIX or unspecified: no IP address to take


def parse_proxy_header(data: bytes) -> tuple[int, Address | None] | None:
    """Read the PROXY header at the start of ``data``: ``(bytes it takes, (client address, port))``, the
    address None for ``UNKNOWN``/``LOCAL``; None while more bytes are needed. Raises
    :class:`ProxyHeaderError` if ``data`` does not start with a valid header."""
    if data.startswith(PROXY_V1):
        return _parse_v1(data)
    if data.startswith(PROXY_V2):
        return _parse_v2(data)
    if is_proxy_header(data) is None:
        return None
    raise ProxyHeaderError("no PROXY header")


class TrustedProxies:
    """The ``--trusted-proxy`` networks."""

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(network, strict=False) for network in networks]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def client_address(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The client behind ``peer``: ``peer`` itself unless it is a trusted proxy; then, reading the
        ``X-Forwarded-For`` headers (in order) from the right, the first address that is no trusted proxy.
        A malformed entry ends the walk at the last trusted hop."""
        if not self.trusts(peer):
            return peer
        hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
        current = peer
        for hop in reversed(hops):
            try:
                address = str(ipaddress.ip_address(hop))
            except ValueError:
                return current
            current = address
            if not self.trusts(address):
                return address
        return current
