"""The unmodified ``@stomp/stompjs`` client from npm, run by Node over the ``ws`` package, against the gateway.

Each test runs ``stompjs_client.mjs`` (beside this file) with a scenario name; the script prints what it
observed as JSON lines and the test asserts on them. Both backends (the fixture's params).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.server import Gateway
from tests.conftest import make_config
from tests.tokens import Keys, make_keys

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("stompjs_client.mjs")
STOMPJS = ROOT / "node_modules" / "@stomp" / "stompjs" / "package.json"
WS = ROOT / "node_modules" / "ws" / "package.json"


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable; a skip (a failure under CI) when Node or the npm packages are missing."""
    executable = shutil.which("node")
    problem = None
    if executable is None:
        problem = "node is not installed (Node 20+ runs the @stomp/stompjs interop tests)"
    elif not STOMPJS.exists() or not WS.exists():
        problem = f"@stomp/stompjs and ws are not installed in {ROOT / 'node_modules'} (run npm install)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    assert executable is not None
    return executable


class Events:
    """What the Node script printed, one dict per JSON line."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.all = events

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.all)

    def of(self, event: str, client: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.all if e["event"] == event and (client is None or e.get("client") == client)]

    def one(self, event: str, client: str | None = None) -> dict[str, Any]:
        found = self.of(event, client)
        assert len(found) == 1, f"expected one {event!r}, got {len(found)}: {self.all}"
        return found[0]

    def kinds(self, *events: str) -> list[str]:
        """The order in which events of these kinds happened."""
        return [e["event"] for e in self.all if e["event"] in events]


async def run_stompjs(node: str, url: str, scenario: str, timeout: float = 15.0, **args: Any) -> Events:
    """Run one scenario; fail with the script's output when it does not finish cleanly within ``timeout``."""
    args.setdefault("timeoutMs", int((timeout - 2) * 1000))  # the script gives up first and says where
    proc = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        url,
        scenario,
        json.dumps(args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        stdout, stderr = await proc.communicate()
        raise AssertionError(
            f"node {scenario} did not finish in {timeout} s\nstdout: {stdout.decode()}\nstderr: {stderr.decode()}"
        ) from None
    lines = stdout.decode().splitlines()
    events = Events([json.loads(line) for line in lines if line.strip()])
    assert proc.returncode == 0 and events.all and events.all[-1]["event"] == "done", (
        f"node {scenario} exited {proc.returncode}\nstdout:\n"
        + "\n".join(lines)
        + f"\nstderr:\n{stderr.decode()}"
    )
    for e in events.of("stomp_error"):
        assert scenario in ("error", "badlogin", "refresh"), f"unexpected ERROR frame: {e}"
    return events


async def test_connect_negotiates_1_2_and_heart_beats(node: str, ws_url: str) -> None:
    events = await run_stompjs(node, ws_url, "connect", firstHeartbeatMs=3000, idleMs=2500)
    connected = events.one("connected")
    assert connected["connectedVersion"] == "1.2"
    assert connected["headers"]["version"] == "1.2"
    assert (
        connected["headers"]["heart-beat"] == "1000,1000"
    )  # the server sends every 1000, expects every 1000
    assert connected["headers"]["server"] == "stomp-ws-gateway/0.1"
    assert connected["headers"]["session"].startswith("session-")
    # stompjs's own reading of the negotiation
    assert {e["line"] for e in events.of("debug")} == {"send PING every 1000ms", "check PONG every 1000ms"}
    heartbeats = events.of("heartbeat")
    assert heartbeats, "no server heart-beat"
    assert heartbeats[0]["t"] - connected["t"] < 3000
    # idle for 2.5 s after the first heart-beat: the gateway (expects one every 1000 ms, gives up after 2000)
    # kept the session, so stompjs's PINGs arrived; and the server kept sending (about one per second)
    state = events.one("state")
    assert state["connected"] is True
    assert state["heartbeats"] >= 3
    assert len(events.of("ws_close")) == 1  # the only close is the one deactivate() asked for
    assert events.kinds("disconnect_receipt", "ws_close") == ["disconnect_receipt", "ws_close"]


CUSTOM = "a:b\nc\\d\re"  # needs every STOMP 1.2 header escape: \c \n \\ \r


@pytest.mark.parametrize("kind", ["queue", "topic", "exchange"])
async def test_subscribe_and_publish(node: str, ws_url: str, unique: str, kind: str) -> None:
    destination = {
        "queue": f"/queue/js-{unique}",
        "topic": f"/topic/js.{unique}",
        "exchange": f"/exchange/amq.direct/js-{unique}",
    }[kind]
    body = 'héllo wörld: {"a": 1}\n'
    events = await run_stompjs(
        node,
        ws_url,
        "pubsub",
        destination=destination,
        body=body,
        headers={"content-type": "text/plain", "x-custom": CUSTOM},
    )
    message = events.one("message")
    headers = message["headers"]
    assert message["body"] == body
    assert message["length"] == len(body.encode())
    assert headers["content-type"] == "text/plain"
    assert headers["x-custom"] == CUSTOM
    assert headers["destination"] == destination
    assert headers["subscription"] == message["sub"] == "sub-0"
    assert headers["redelivered"] == "false"
    # a queue subscription has its own consumer; /topic and /exchange ones with ack:auto share one (fanout.py)
    assert headers["message-id"].startswith("T_sub-0@@session-" if kind == "queue" else "F_")
    assert headers["content-length"] == str(len(body.encode()))
    assert "receipt" not in headers and "ack" not in headers


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_older_protocol_versions(node: str, ws_url: str, unique: str, version: str) -> None:
    """stompjs offering only 1.1 (or 1.0), in accept-version and in its WebSocket subprotocol list."""
    destination = f"/queue/js-v{version}-{unique}"
    # stompjs escapes header values for 1.2 only, so no ':' or newline in headers here
    events = await run_stompjs(
        node,
        ws_url,
        "pubsub",
        destination=destination,
        body="old",
        versions=[version],
        headers={"content-type": "text/plain", "x-custom": "plain value"},
    )
    connected = events.one("connected")
    assert connected["connectedVersion"] == connected["headers"]["version"] == version
    message = events.one("message")
    assert message["body"] == "old"
    assert message["headers"]["x-custom"] == "plain value"
    assert message["headers"]["content-type"] == "text/plain"
    assert message["headers"]["destination"] == destination


@pytest.mark.parametrize("version", ["1.2", "1.1"])
async def test_client_individual_ack_and_nack(node: str, ws_url: str, unique: str, version: str) -> None:
    destination = f"/queue/js-ack-{unique}"
    events = await run_stompjs(node, ws_url, "ack", destination=destination, versions=[version])
    assert events.of("connected", "c")[0]["connectedVersion"] == version
    first, again = events.of("message", "c")
    assert first["body"] == again["body"] == "m1"
    if version == "1.2":
        assert first["headers"]["ack"]  # message.ack()/nack() send ACK/NACK id:<this>
    else:
        assert "ack" not in first["headers"]  # they send message-id + subscription instead
    assert first["headers"]["redelivered"] == "false"
    assert again["headers"]["redelivered"] == "true"  # the NACK requeued it
    assert {e["headers"]["receipt-id"] for e in events.of("receipt", "c")} >= {"nack-1", "ack-1"}
    # the ACK settled it: after a reconnect only the marker is in the queue
    [check] = events.of("message", "check")
    assert check["body"] == "marker"


async def test_receipts(node: str, ws_url: str, unique: str) -> None:
    destination = f"/queue/js-rcpt-{unique}"
    events = await run_stompjs(node, ws_url, "receipts", destination=destination)
    receipts = [e["headers"]["receipt-id"] for e in events.of("receipt")]
    assert receipts[0] == f"sub-{destination}"
    assert receipts[1].startswith("pub-")
    assert receipts[2] == "unsub-1"
    assert receipts[3].startswith("pub-")
    assert len(receipts) == 4
    assert not events.of("unhandled_receipt")
    assert [m["body"] for m in events.of("message")] == ["x"]  # nothing after UNSUBSCRIBE
    assert events.one("disconnect_receipt")["headers"]["receipt-id"].startswith("close-")
    assert events.kinds("disconnect_receipt", "ws_close") == ["disconnect_receipt", "ws_close"]


@pytest.mark.parametrize("size", [256, 1_000_000])
async def test_binary_body(node: str, ws_url: str, unique: str, size: int) -> None:
    events = await run_stompjs(node, ws_url, "binary", destination=f"/queue/js-bin-{unique}", size=size)
    expected = bytes(i % 256 for i in range(size))
    message = events.one("message")
    assert message["length"] == size
    assert message["headers"]["content-length"] == str(size)
    assert message["headers"]["content-type"] == "application/octet-stream"
    if size <= 4096:
        assert bytes.fromhex(message["hex"]) == expected
    else:
        assert message["sha256"] == hashlib.sha256(expected).hexdigest()
    check = events.one("binary_check")
    assert check == {**check, "isUint8Array": True, "equal": True}


async def test_transactions(node: str, ws_url: str, unique: str) -> None:
    events = await run_stompjs(node, ws_url, "transaction", destination=f"/queue/js-tx-{unique}")
    # nothing before COMMIT; the aborted send never arrives (the plain send after the ABORT does)
    assert events.kinds("commit", "message", "abort") == ["commit", "message", "abort", "message"]
    assert [m["body"] for m in events.of("message")] == ["in-tx1", "after-abort"]
    assert events.one("commit")["transaction"] != events.one("abort")["transaction"]


async def test_error_frame_reaches_on_stomp_error(node: str, ws_url: str, unique: str) -> None:
    events = await run_stompjs(node, ws_url, "error", destination=f"/exchange/does-not-exist-{unique}")
    error = events.one("stomp_error")
    assert error["headers"]["message"] == "not_found"
    assert error["body"] == f"no exchange 'does-not-exist-{unique}' in vhost '/'"
    assert error["headers"]["receipt-id"] == "sub-missing"
    assert events.kinds("stomp_error", "ws_close") == [
        "stomp_error",
        "ws_close",
    ]  # ERROR first, then the close
    assert events.one("state")["connected"] is False


async def test_bad_passcode_reaches_on_stomp_error(node: str, ws_url: str) -> None:
    events = await run_stompjs(node, ws_url, "badlogin")
    error = events.one("stomp_error")
    assert error["headers"]["message"] == "Bad CONNECT"
    assert error["body"] == "Access refused for user 'guest'"
    assert events.kinds("stomp_error", "ws_close") == ["stomp_error", "ws_close"]
    assert events.one("state") == {**events.one("state"), "connected": False, "connects": 0}


async def test_temp_queue_reply_reaches_on_unhandled_message(node: str, ws_url: str, unique: str) -> None:
    events = await run_stompjs(node, ws_url, "rpc", destination=f"/queue/js-rpc-{unique}")
    request = events.one("message", "server")
    assert request["headers"]["reply-to"].startswith("/reply-queue/")
    assert request["headers"]["correlation-id"] == "c-1"
    reply = events.one("message", "requester")
    assert (
        reply["sub"] is None
    )  # no stompjs subscription: onUnhandledMessage, as stompjs documents for RabbitMQ
    assert reply["body"] == "pong"
    assert reply["headers"]["subscription"] == "/temp-queue/replies"
    assert reply["headers"]["correlation-id"] == "c-1"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


async def test_token_refresh_in_band(node: str, backend: str, keys: Keys, unique: str) -> None:
    """The README's stompjs refresh example: an ended subscription is an ERROR that does not close."""
    gw = Gateway(make_config(backend, jwt_secret_file=keys.secret_file))
    await gw.start()
    try:
        keep, drop = f"/topic/keep.{unique}", f"/topic/drop.{unique}"
        first_exp = int(time.time()) + 3
        both = f"rabbitmq.read:*/amq.topic/*.{unique} rabbitmq.write:*/amq.topic/*"
        narrower = f"rabbitmq.read:*/amq.topic/keep.{unique} rabbitmq.write:*/amq.topic/*"
        events = await run_stompjs(
            node,
            f"ws://127.0.0.1:{gw.port}/ws",
            "refresh",
            token=keys.sign(sub="alice", scope=both, ttl=first_exp - time.time()),
            newToken=keys.sign(sub="alice", scope=narrower, ttl=60),
            keep=keep,
            drop=drop,
            firstExpMs=int(first_exp * 1000),
        )
    finally:
        await gw.stop()
    ended = events.one("stomp_error")
    assert ended["headers"]["message"] == "access_refused"
    assert ended["headers"]["destination"] == drop
    assert events.one("message")["headers"]["destination"] == keep
    assert events.one("state")["connected"] is True
