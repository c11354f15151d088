"""CONNECT, versions, credentials, the WebSocket handshake and the HTTP side (real WebSocket, both brokers)."""

from __future__ import annotations

import asyncio
import http.client
import ssl
import subprocess
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.server import Gateway
from tests.conftest import make_config
from tests.stomp_client import StompClient, frame, open_ws


class TestVersionNegotiation:
    """STOMP 1.2 — Protocol Negotiation"""

    async def test_highest_common_version_wins(self, client: StompClient) -> None:
        connected = await client.connect(accept_version="1.0,1.1,1.2")
        assert connected.get("version") == "1.2"
        assert connected.get("session", "").startswith("session-")
        assert connected.get("server")
        assert connected.get("heart-beat") == "0,0"

    async def test_one_one(self, client: StompClient) -> None:
        assert (await client.connect(accept_version="1.1")).get("version") == "1.1"

    async def test_absent_accept_version_means_1_0(self, client: StompClient) -> None:
        await client.send(b"CONNECT\nlogin:guest\npasscode:guest\n\n\x00")
        connected = await client.receive_command("CONNECTED")
        assert connected.get("version") == "1.0"

    async def test_stomp_command_is_connect(self, client: StompClient) -> None:
        await client.send(frame("STOMP", accept_version="1.2", host="/"))
        await client.receive_command("CONNECTED")

    async def test_no_common_version(self, client: StompClient) -> None:
        await client.send(frame("CONNECT", accept_version="100.1"))
        error = await client.receive_command("ERROR")
        assert error.get("message") == "Version mismatch"
        assert error.body == b"Supported versions are 1.0,1.1,1.2\n"
        await client.wait_closed()


class TestCredentials:
    async def test_wrong_passcode_is_access_refused(self, client: StompClient) -> None:
        await client.send(frame("CONNECT", accept_version="1.2", login="guest", passcode="wrong"))
        error = await client.receive_command("ERROR")
        assert error.get("message") == "Bad CONNECT"
        assert error.body.decode() == "Access refused for user 'guest'"
        await client.wait_closed()

    async def test_unknown_vhost(self, client: StompClient) -> None:
        await client.send(
            frame("CONNECT", accept_version="1.2", login="guest", passcode="guest", host="nope")
        )
        error = await client.receive_command("ERROR")
        assert error.get("message") == "Bad CONNECT"
        assert error.body.decode() == "Virtual host 'nope' access denied"
        await client.wait_closed()

    async def test_default_credentials_without_login(self, client: StompClient) -> None:
        await client.send(frame("CONNECT", accept_version="1.2"))
        await client.receive_command("CONNECTED")

    async def test_wrong_passcode_after_a_good_one_is_still_refused(self, ws_url: str) -> None:
        good = await open_ws(ws_url)
        await good.connect(login="guest", passcode="guest")
        bad = await open_ws(ws_url)
        await bad.send(frame("CONNECT", accept_version="1.2", login="guest", passcode="nope"))
        assert (await bad.receive_command("ERROR")).get("message") == "Bad CONNECT"
        await good.close()
        await bad.close()


class TestBeforeConnect:
    async def test_frame_before_connect(self, client: StompClient) -> None:
        await client.send(frame("SUBSCRIBE", destination="/topic/x", id="1"))
        error = await client.receive_command("ERROR")
        assert error.get("message") == "Illegal command"
        assert error.body == b"You must log in using CONNECT first"
        await client.wait_closed()

    async def test_unknown_command_before_connect_is_illegal(self, client: StompClient) -> None:
        await client.send(b"WRONGCOMMAND\n\n\x00")  # RabbitMQ checks the login first, too
        error = await client.receive_command("ERROR")
        assert error.get("message") == "Illegal command"

    async def test_unknown_command(self, connected: StompClient) -> None:
        await connected.send(b"WRONGCOMMAND\n\n\x00")
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Bad command"
        assert error.body == b'Could not interpret command "WRONGCOMMAND"\n'

    @pytest.mark.parametrize("gateway_overrides", [{"login_timeout": 0.3}])
    async def test_login_timeout(self, client: StompClient) -> None:
        error = await client.receive_command("ERROR", timeout=3)
        assert error.get("message") == "Login timeout"
        await client.wait_closed()

    async def test_pipelined_connect_and_subscribe_in_one_message(
        self, client: StompClient, unique: str
    ) -> None:
        data = frame("CONNECT", accept_version="1.2", host="/").serialize("1.2") + frame(
            "SUBSCRIBE", id="a\\cb", destination=f"/queue/pipe-{unique}", receipt="r1"
        ).serialize("1.2")
        await client.send(data)
        await client.receive_command("CONNECTED")
        assert (await client.receive_command("RECEIPT")).get("receipt-id") == "r1"


class TestHandshake:
    """WebSocket subprotocols, Origin, TLS, compression."""

    async def test_highest_subprotocol_offered_wins(self, ws_url: str) -> None:
        async with connect(ws_url, subprotocols=["v10.stomp", "v12.stomp", "v11.stomp"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "v12.stomp"

    async def test_no_subprotocol_is_accepted(self, ws_url: str) -> None:
        c = await open_ws(ws_url, subprotocols=None)
        assert c.ws is not None and c.ws.subprotocol is None
        await c.connect()
        await c.close()

    @pytest.mark.parametrize("gateway_overrides", [{"allowed_origins": ["https://good.example"]}])
    async def test_origin_allow_list(self, ws_url: str) -> None:
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url, origin="https://evil.example")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        async with connect(ws_url, origin="https://good.example") as ws:  # type: ignore[arg-type]
            assert ws.protocol.state.name == "OPEN"
        async with connect(ws_url) as ws:  # no Origin header: not a browser, accepted
            assert ws.protocol.state.name == "OPEN"

    @pytest.mark.parametrize("gateway_overrides", [{"compression": True}])
    async def test_permessage_deflate_when_enabled(self, ws_url: str) -> None:
        async with connect(ws_url, subprotocols=["v12.stomp"]) as ws:  # type: ignore[list-item]
            assert any(ext.name == "permessage-deflate" for ext in ws.protocol.extensions)

    async def test_no_compression_by_default(self, ws_url: str) -> None:
        async with connect(ws_url, subprotocols=["v12.stomp"]) as ws:  # type: ignore[list-item]
            assert ws.protocol.extensions == []


class TestRfc6455:
    """RFC 6455 MUSTs on the server side."""

    @pytest.mark.parametrize("version", ["8", "12", "14", None])
    async def test_unsupported_version_is_426_naming_13(self, gateway: Gateway, version: str | None) -> None:
        assert gateway.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: 127.0.0.1:{gateway.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ]
        if version is not None:
            lines.append(f"Sec-WebSocket-Version: {version}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        status, *headers = head.decode().split("\r\n")
        assert status.startswith("HTTP/1.1 426 ")
        assert "Sec-WebSocket-Version: 13" in headers

    async def test_version_13_is_accepted(self, gateway: Gateway) -> None:
        assert gateway.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(

                b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 101 ")

    async def test_text_message_that_is_not_utf8_fails_with_1007(self, connected: StompClient) -> None:
        assert connected.ws is not None
        # websockets' client only sends valid text, so write the frame ourselves: FIN + text, masked.
        payload = b"SEND\ndestination:/topic/x\n\n\xff\xfe\x00"
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        transport = connected.ws.transport
        assert transport is not None
        transport.write(bytes((0x81, 0x80 | len(payload))) + mask + masked)
        await connected.wait_closed()
        assert connected.ws.close_code == 1007

    async def test_binary_message_need_not_be_utf8(self, connected: StompClient, unique: str) -> None:
        await connected.send(frame("SUBSCRIBE", destination=f"/topic/bin.{unique}", id="1", receipt="s"))
        await connected.receipt("s")
        await connected.send(frame("SEND", b"\xff\xfe", destination=f"/topic/bin.{unique}").serialize("1.2"))
        message = await connected.receive_command("MESSAGE")
        assert message.body == b"\xff\xfe"


def _get(port: int, path: str, *, tls: ssl.SSLContext | None = None) -> http.client.HTTPResponse:
    if tls is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, context=tls, timeout=5
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response


class TestHttp:
    async def test_healthz_and_readyz_while_the_broker_is_up(self, gateway: Gateway) -> None:
        assert gateway.port is not None
        assert (await asyncio.to_thread(_get, gateway.port, "/healthz")).status == 200
        assert (await asyncio.to_thread(_get, gateway.port, "/readyz")).status == 200

    async def test_readyz_503_when_the_broker_is_gone_healthz_still_200(self, backend: str) -> None:
        if backend != "memory":
            pytest.skip("the RabbitMQ case cuts a proxy in front of it: tests/integration/test_process.py")
        gw = Gateway(make_config(backend))
        await gw.start()
        try:
            await gw.broker.close()
            assert gw.port is not None
            assert (await asyncio.to_thread(_get, gw.port, "/readyz")).status == 503
            assert (await asyncio.to_thread(_get, gw.port, "/healthz")).status == 200  # alive, not ready
        finally:
            await gw.stop()

    async def test_readyz_503_while_shutting_down(self, backend: str) -> None:
        gw = Gateway(make_config(backend))
        await gw.start()
        assert gw.port is not None
        port = gw.port
        gw._draining = True  # what stop() sets first: a load balancer stops sending new clients
        try:
            response = await asyncio.to_thread(_get, port, "/readyz")
            assert response.status == 503
        finally:
            await gw.stop()

    async def test_plain_get_of_ws_endpoint_says_upgrade(self, gateway: Gateway) -> None:
        assert gateway.port is not None
        response = await asyncio.to_thread(_get, gateway.port, "/ws")
        assert response.status == 426

    async def test_metrics(self, gateway: Gateway, connected: StompClient) -> None:
        assert gateway.port is not None
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
        await asyncio.to_thread(conn.request, "GET", "/metrics")
        response = await asyncio.to_thread(conn.getresponse)
        body = response.read().decode()
        assert response.status == 200
        assert 'stomp_gateway_connections{transport="websocket"}' in body  # test_metrics.py has the rest


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls(backend: str, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    gw = Gateway(make_config(backend, certfile=str(cert), keyfile=str(key)))
    await gw.start()
    try:
        context = ssl.create_default_context(cafile=str(cert))
        ws = await connect(f"wss://127.0.0.1:{gw.port}/ws", ssl=context, subprotocols=["v12.stomp"])  # type: ignore[list-item]
        c = StompClient(ws)
        assert (await c.connect()).get("version") == "1.2"
        await c.close()
        assert gw.port is not None
        response = await asyncio.to_thread(_get, gw.port, "/healthz", tls=context)
        assert response.status == 200
    finally:
        await gw.stop()
