"""A minimal, fast STOMP 1.2 over WebSocket client for the load generator.

It is an :class:`asyncio.Protocol` (uvloop in the workers) that speaks just enough RFC 6455 and STOMP to
drive a server hard without becoming the bottleneck itself:

* the opening handshake is checked (``101`` and ``Sec-WebSocket-Accept``), then frames are parsed by hand;
* client frames are masked with the all-zero key: RFC 6455 requires a mask, not an unpredictable one on a
  benchmark, and the server still runs its unmasking code, so the server's cost is unchanged while the
  generator saves a pure-Python XOR;
* STOMP frames are found with ``bytes.find``; a MESSAGE body is ``b"<seq> <send-time-ns> <padding>"`` and
  only the two numbers are parsed. ``content-length`` is not needed because the bodies never contain NUL.

Every subscriber counts what it received (count, last sequence number, order faults, arrival time of the
last message) and, when asked, the latencies of the messages sent after a given time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import resource
import time
from array import array
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["StompError", "StompWsClient", "body", "open_client", "parse_url", "send_frame_bytes", "ws_frame"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO_MASK = b"\x00\x00\x00\x00"
monotonic_ns = time.monotonic_ns


class StompError(Exception):
    """A connection, handshake or STOMP-level failure."""


def parse_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "http"):
        raise ValueError(f"only ws:// URLs are supported, not {url!r}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, port, path


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final, masked (zero key) client frame."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    return header + _ZERO_MASK + payload


def body(seq: int, body_size: int) -> bytes:
    """``b"<seq> <monotonic ns> xxx..."`` padded to ``body_size`` bytes (longer if the numbers need it)."""
    head = b"%d %d " % (seq, monotonic_ns())
    pad = body_size - len(head)
    return head + b"x" * pad if pad > 0 else head


def send_frame_bytes(destination: bytes, seq: int, body_size: int, extra: bytes = b"") -> bytes:
    """A complete WebSocket frame carrying a STOMP SEND of :func:`body` to ``destination``.

    ``extra`` is more header lines, each ending in LF."""
    b = body(seq, body_size)
    stomp = b"SEND\ndestination:%s\n%scontent-length:%d\n\n%s\x00" % (destination, extra, len(b), b)
    return ws_frame(stomp)


def _header(headers: bytes, name: bytes) -> str | None:
    for line in headers.split(b"\n"):
        key, sep, value = line.rstrip(b"\r").partition(b":")
        if sep and key == name:
            return value.decode("utf-8", "replace")
    return None


class StompWsClient(asyncio.Protocol):
    """One STOMP-over-WebSocket connection. Create it with :func:`open_client`."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.path = host, port, path
        self.transport: asyncio.Transport | None = None
        self._key = base64.b64encode(os.urandom(16))
        self._upgraded = False
        self._hs = b""
        self._rest = b""
        self._frag: list[bytes] | None = None
        self._sbuf = b""
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.receipts: dict[str, asyncio.Future[None]] = {}
        self.errors: list[str] = []
        self.closing = False
        self.lost = False
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        # subscriber counters
        self.received = 0
        self.last_seq = 0
        self.misordered = 0
        self.last_arrival = 0
        self.latencies: array[int] | None = None  # ns, filled when not None
        self.latency_from = 0  # only messages sent at or after this monotonic ns count
        self.notify: Callable[[], None] | None = None  # called after each MESSAGE

    # -- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass
        request = (
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v12.stomp\r\n\r\n"
        ) % (self.path.encode(), self.host.encode(), self.port, self._key)
        self.transport.write(request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closing:
            self._error(f"connection lost{': ' + str(exc) if exc else ''}")
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self._paused and not self.lost:
            self._drain = self.loop.create_future()
            await self._drain

    def data_received(self, data: bytes) -> None:
        if not self._upgraded:
            self._handshake_data(data)
            return
        if self._rest:
            data = self._rest + data
        pos = 0
        n = len(data)
        while n - pos >= 2:
            ln = data[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            if data[pos + 1] & 0x80:  # a masked server frame is a protocol error; unmask anyway
                hl += 4
            end = pos + hl + ln
            if end > n:
                break
            b0 = data[pos]
            payload = data[pos + hl : end]
            if data[pos + 1] & 0x80:
                mask = data[pos + hl - 4 : pos + hl]
                payload = bytes(c ^ mask[i & 3] for i, c in enumerate(payload))
            pos = end
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 2:
                if b0 & 0x80:
                    self._stomp_data(payload)
                else:
                    self._frag = [payload]
            elif opcode == 0:
                if self._frag is not None:
                    self._frag.append(payload)
                    if b0 & 0x80:
                        whole = b"".join(self._frag)
                        self._frag = None
                        self._stomp_data(whole)
            elif opcode == 9:  # ping
                if self.transport is not None and not self.closing:
                    self.transport.write(ws_frame(payload, 10))
            elif opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.closing:
                    self._error(f"server closed the WebSocket ({code} {payload[2:].decode('utf-8', 'replace')})")
                self.closing = True
                if self.transport is not None:
                    self.transport.close()
                return
        self._rest = data[pos:] if pos < n else b""

    # -- handshake -------------------------------------------------------------------------------------
    def _handshake_data(self, data: bytes) -> None:
        self._hs += data
        end = self._hs.find(b"\r\n\r\n")
        if end < 0:
            if len(self._hs) > 65536:
                self._fail_handshake("handshake response too long")
            return
        head, rest = self._hs[:end], self._hs[end + 4 :]
        self._hs = b""
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            self._fail_handshake(f"handshake refused: {lines[0].decode('latin-1')}")
            return
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if headers.get(b"sec-websocket-accept") != accept:
            self._fail_handshake("bad Sec-WebSocket-Accept")
            return
        self._upgraded = True
        if not self.handshake.done():
            self.handshake.set_result(None)
        if rest:
            self.data_received(rest)

    def _fail_handshake(self, why: str) -> None:
        self._error(why)
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- STOMP -----------------------------------------------------------------------------------------
    def _stomp_data(self, data: bytes) -> None:
        if self._sbuf:
            data = self._sbuf + data
            self._sbuf = b""
        pos = 0
        n = len(data)
        while pos < n:
            c = data[pos]
            if c == 10 or c == 13:  # heart-beat / trailing EOL
                pos += 1
                continue
            he = data.find(b"\n\n", pos)
            sep = 2
            if he < 0:
                he = data.find(b"\n\r\n", pos)
                sep = 3
                if he < 0:
                    break
            start = he + sep
            nul = data.find(b"\x00", start)
            if nul < 0:
                break
            if data.startswith(b"MESSAGE", pos):
                self._on_message(data, start, nul)
            else:
                line_end = data.find(b"\n", pos)
                command = data[pos:line_end].rstrip(b"\r")
                self._on_frame(command, data[line_end + 1 : he], data[start:nul])
            pos = nul + 1
        if pos < n:
            self._sbuf = data[pos:]

    def _on_message(self, data: bytes, start: int, end: int) -> None:
        sp = data.find(b" ", start, end)
        try:
            seq = int(data[start:sp])
        except ValueError:
            self._error("MESSAGE with an unexpected body")
            return
        now = monotonic_ns()
        if seq != self.last_seq + 1:
            self.misordered += 1
        if seq > self.last_seq:
            self.last_seq = seq
        self.received += 1
        self.last_arrival = now
        lat = self.latencies
        if lat is not None:
            sp2 = data.find(b" ", sp + 1, end)
            sent = int(data[sp + 1 : sp2])
            if sent >= self.latency_from:
                lat.append(now - sent)
        if self.notify is not None:
            self.notify()

    def _on_frame(self, command: bytes, headers: bytes, payload: bytes) -> None:
        if command == b"CONNECTED":
            if not self.connected.done():
                self.connected.set_result(None)
        elif command == b"RECEIPT":
            fut = self.receipts.pop(_header(headers, b"receipt-id") or "", None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif command == b"ERROR":
            message = _header(headers, b"message") or ""
            self._error(f"ERROR frame: {message} {payload[:200].decode('utf-8', 'replace')}".strip())
        else:
            self._error(f"unexpected frame {command.decode('latin-1')}")

    def _error(self, text: str) -> None:
        self.errors.append(text)
        exc = StompError(text)
        for fut in (self.handshake, self.connected, *self.receipts.values()):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: nobody may be waiting any more
        self.receipts.clear()

    # -- sending ---------------------------------------------------------------------------------------
    def send_stomp(self, frame: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(ws_frame(frame))

    def write(self, data: bytes) -> None:
        """Already framed bytes (one or more WebSocket frames)."""
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    async def subscribe(self, destination: str, sub_id: str, timeout: float, extra: str = "") -> None:
        receipt = f"sub-{sub_id}"
        fut = self.loop.create_future()
        self.receipts[receipt] = fut
        self.send_stomp(
            f"SUBSCRIBE\nid:{sub_id}\ndestination:{destination}\nack:auto\n{extra}receipt:{receipt}\n\n\x00".encode()
        )
        await asyncio.wait_for(fut, timeout)

    def close(self) -> None:
        if self.closing or self.transport is None:
            return
        self.closing = True
        if not self.lost:
            self.transport.write(b"\x88\x82" + _ZERO_MASK + (1000).to_bytes(2, "big"))
        self.transport.close()

    def reset_counters(self) -> None:
        self.received = 0
        self.last_seq = 0
        self.misordered = 0
        self.last_arrival = 0


#: Connections per loopback source address: the ephemeral ports of one (source, destination) pair run
#: out near 28,000 (Linux's default 32768-60999), so more connections come from 127.0.0.2, 127.0.0.3, ...
PER_SOURCE_ADDRESS = 20_000


def source_address(host: str, index: int) -> str | None:
    """The local address for the ``index``-th connection to ``host``: spread over 127.0.0.0/8 when the target
    is on loopback (every 127.x address is local on Linux), else the system's choice."""
    if not host.startswith("127.") or index < PER_SOURCE_ADDRESS:
        return None
    return f"127.0.{index // PER_SOURCE_ADDRESS // 250}.{2 + index // PER_SOURCE_ADDRESS % 250}"


def raise_nofile(wanted: int = 0) -> None:
    """Open-files limit of this process (and what it starts) up to ``wanted``: above the hard limit when
    privileged (the bench raises it for itself, never for the machine), else up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def open_client(
    url: str, *, login: str = "guest", passcode: str = "guest", vhost: str = "/", timeout: float = 10.0,
    index: int = 0,
) -> StompWsClient:
    """Connect, upgrade and log in; raises :class:`StompError` or OSError/TimeoutError. ``index`` numbers the
    caller's connections, to pick a source address (:func:`source_address`)."""
    host, port, path = parse_url(url)
    loop = asyncio.get_running_loop()
    local = source_address(host, index)
    _, client = await asyncio.wait_for(
        loop.create_connection(
            lambda: StompWsClient(host, port, path), host, port, local_addr=(local, 0) if local else None
        ),
        timeout,
    )
    try:
        await asyncio.wait_for(client.handshake, timeout)
        client.send_stomp(
            f"CONNECT\naccept-version:1.2\nhost:{vhost}\nlogin:{login}\npasscode:{passcode}\n"
            f"heart-beat:0,0\n\n\x00".encode()
        )
        await asyncio.wait_for(client.connected, timeout)
    except BaseException:
        client.close()
        raise
    return client
