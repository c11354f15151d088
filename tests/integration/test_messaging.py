"""SEND, SUBSCRIBE, destinations, acks, transactions, receipts (real WebSocket, both brokers)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.broker.base import BrokerError, Channel, Delivery, MessageProperties
from gateway.server import Gateway
from tests.stomp_client import StompClient, frame, open_ws


async def subscribe(c: StompClient, destination: str, sub_id: str = "s1", **headers: str) -> None:
    await c.send(frame("SUBSCRIBE", destination=destination, id=sub_id, receipt=f"sub-{sub_id}", **headers))
    receipt = await c.receive_command("RECEIPT")
    assert receipt.get("receipt-id") == f"sub-{sub_id}"


async def send(c: StompClient, destination: str, body: str | bytes = "hello", **headers: str) -> None:
    await c.send(frame("SEND", body, destination=destination, receipt="send", **headers))
    await c.receipt("send")


async def connected_client(ws_url: str, clients: list[StompClient], version: str = "1.2") -> StompClient:
    c = await open_ws(ws_url)
    clients.append(c)
    await c.connect(version)
    return c


class TestDestinations:
    """RabbitMQ's destination semantics (reference §b)."""

    async def test_queue(self, connected: StompClient, unique: str) -> None:
        await subscribe(connected, f"/queue/q-{unique}")
        await send(connected, f"/queue/q-{unique}", "a\nb\x00c", content_type="text/plain")
        message = await connected.receive_command("MESSAGE")
        assert message.body == b"a\nb\x00c"
        assert message.get("destination") == f"/queue/q-{unique}"
        assert message.get("subscription") == "s1"
        assert message.get("content-type") == "text/plain"
        assert message.get("redelivered") == "false"
        assert message.get("message-id", "").startswith("T_s1@@session-")
        assert message.get("content-length") == "5"

    async def test_queue_is_durable_and_outlives_the_subscriber(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        sender = await connected_client(ws_url, clients)
        await send(sender, f"/queue/keep-{unique}", "kept", persistent="true")
        receiver = await connected_client(ws_url, clients)
        await subscribe(receiver, f"/queue/keep-{unique}")
        message = await receiver.receive_command("MESSAGE")
        assert message.body == b"kept"
        assert message.get("persistent") == "true"

    async def test_topic_with_wildcards(self, connected: StompClient, unique: str) -> None:
        await subscribe(connected, f"/topic/t{unique}.*.x")
        await send(connected, f"/topic/t{unique}.a.x", "one")
        await send(connected, f"/topic/t{unique}.a.y", "not me")
        message = await connected.receive_command("MESSAGE")
        assert message.body == b"one"
        assert message.get("destination") == f"/topic/t{unique}.a.x"
        await connected.nothing()

    async def test_exchange_with_routing_key(self, connected: StompClient, unique: str) -> None:
        await subscribe(connected, f"/exchange/amq.direct/k{unique}")
        await send(connected, f"/exchange/amq.direct/k{unique}", "direct")
        message = await connected.receive_command("MESSAGE")
        assert message.get("destination") == f"/exchange/amq.direct/k{unique}"

    async def test_exchange_without_key_on_fanout(
        self, connected: StompClient, backdoor: Channel, unique: str
    ) -> None:
        await backdoor.declare_exchange(f"fx-{unique}", "fanout", durable=False)
        await subscribe(connected, f"/exchange/fx-{unique}")
        await send(connected, f"/exchange/fx-{unique}", "fan")
        message = await connected.receive_command("MESSAGE")
        assert message.get("destination") == f"/exchange/fx-{unique}"

    async def test_amq_queue_needs_an_existing_queue(
        self, connected: StompClient, backdoor: Channel, unique: str
    ) -> None:
        await backdoor.declare_queue(f"amqq-{unique}", auto_delete=True)
        await subscribe(connected, f"/amq/queue/amqq-{unique}")
        await send(connected, f"/amq/queue/amqq-{unique}", "x")
        assert (await connected.receive_command("MESSAGE")).get("destination") == f"/queue/amqq-{unique}"

    async def test_amq_queue_missing_is_not_found(self, connected: StompClient, unique: str) -> None:
        await connected.send(frame("SUBSCRIBE", destination=f"/amq/queue/none-{unique}", id="1"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "not_found"
        assert error.body.decode() == f"no queue 'none-{unique}' in vhost '/'"
        await connected.wait_closed()

    async def test_subscribe_to_missing_exchange_error_arrives_before_close(
        self, connected: StompClient, unique: str
    ) -> None:
        await connected.send(
            frame("SUBSCRIBE", destination=f"/exchange/missing-{unique}/k", id="1", receipt="r9")
        )
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "not_found"
        assert error.body.decode() == f"no exchange 'missing-{unique}' in vhost '/'"
        assert error.get("receipt-id") == "r9"
        await connected.wait_closed()

    async def test_temp_queue_reply(self, ws_url: str, clients: list[StompClient], unique: str) -> None:
        server = await connected_client(ws_url, clients)
        requester = await connected_client(ws_url, clients)
        await subscribe(server, f"/queue/rpc-{unique}")
        await send(requester, f"/queue/rpc-{unique}", "ping", reply_to="/temp-queue/r1", correlation_id="c1")
        request = await server.receive_command("MESSAGE")
        reply_to = request.get("reply-to") or ""
        assert reply_to.startswith("/reply-queue/")
        assert request.get("correlation-id") == "c1"
        await send(server, reply_to, "pong", correlation_id="c1")
        reply = await requester.receive_command("MESSAGE")
        assert reply.body == b"pong"
        assert reply.get("subscription") == "/temp-queue/r1"
        assert reply.get("destination") == "/queue/" + reply_to.removeprefix("/reply-queue/")

    async def test_durable_topic_subscription_keeps_messages(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        first = await connected_client(ws_url, clients)
        destination = f"/topic/dur-{unique}"
        await subscribe(first, destination, "d1", durable="true", auto_delete="false")
        await first.send(frame("DISCONNECT", receipt="bye"))
        await first.receive_command("RECEIPT")
        sender = await connected_client(ws_url, clients)
        await send(sender, destination, "while away")
        again = await connected_client(ws_url, clients)
        await subscribe(again, destination, "d1", durable="true", auto_delete="false")
        assert (await again.receive_command("MESSAGE")).body == b"while away"
        await again.send(frame("UNSUBSCRIBE", id="d1", durable="true", receipt="gone"))
        assert (await again.receive_command("RECEIPT")).get("receipt-id") == "gone"

    async def test_durable_without_id_is_an_error(self, connected: StompClient, unique: str) -> None:
        await connected.send(frame("SUBSCRIBE", destination=f"/topic/d-{unique}", durable="true"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Missing Header"
        assert error.body == b"Header 'id' is required for durable subscriptions"

    async def test_x_queue_name_and_queue_arguments(
        self, connected: StompClient, backdoor: Channel, unique: str
    ) -> None:
        await subscribe(
            connected,
            f"/topic/named-{unique}",
            x_queue_name=f"named-{unique}",
            x_max_length="5",
            exclusive="false",
        )
        # the named queue exists with those arguments: a passive declare finds it
        assert await backdoor.declare_queue(f"named-{unique}", passive=True) == f"named-{unique}"

    async def test_max_length_drops_the_oldest(self, connected: StompClient, unique: str) -> None:
        queue = f"/queue/ml-{unique}"
        for i in range(5):
            await send(connected, queue, str(i), x_max_length="2", auto_delete="true", durable="false")
        await subscribe(connected, queue, x_max_length="2", auto_delete="true", durable="false")
        assert (await connected.receive_command("MESSAGE")).body == b"3"
        assert (await connected.receive_command("MESSAGE")).body == b"4"

    async def test_unknown_destination(self, connected: StompClient) -> None:
        await connected.send(frame("SEND", "x", destination="/bogus/x"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Unknown destination"
        assert error.body == (
            b"'/bogus/x' is not a valid destination.\nValid destination types are: "
            b"/temp-queue, /exchange, /topic, /queue, /amq/queue, /reply-queue/.\n"
        )

    async def test_send_to_temp_queue_is_invalid(self, connected: StompClient) -> None:
        await connected.send(frame("SEND", "x", destination="/temp-queue/x"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Invalid destination"
        assert error.body == b"'/temp-queue/x' is not a valid destination for 'SEND'\n"

    async def test_missing_destination(self, connected: StompClient) -> None:
        await connected.send(frame("SEND", "x"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Missing destination"
        assert error.body == b"\"SEND\" must include a 'destination' header\n"


class TestHeaders:
    """Header mapping both ways (reference §c) and escaping."""

    async def test_properties_and_custom_headers_round_trip(
        self, connected: StompClient, unique: str
    ) -> None:
        await subscribe(connected, f"/queue/h-{unique}")
        await send(
            connected,
            f"/queue/h-{unique}",
            "{}",
            content_type="application/json",
            correlation_id="corr",
            priority="3",
            type="t",
            app_id="app",
            expiration="60000",
            amqp_message_id="m-1",
            x_custom="a:b\\c\nd",
        )
        message = await connected.receive_command("MESSAGE")
        assert message.get("content-type") == "application/json"
        assert message.get("correlation-id") == "corr"
        assert message.get("priority") == "3"
        assert message.get("type") == "t"
        assert message.get("app-id") == "app"
        assert message.get("amqp-message-id") == "m-1"
        assert message.get("x-custom") == "a:b\\c\nd"
        assert message.get("receipt") is None  # gateway control headers do not leak into AMQP

    async def test_message_id_on_send_is_invalid(self, connected: StompClient) -> None:
        await connected.send(frame("SEND", "x", destination="/queue/x", message_id="nope"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Invalid header"
        assert error.body == b"'message-id' is not allowed on 'SEND'.\n"

    async def test_typed_amqp_headers_reach_the_client(
        self, connected: StompClient, backdoor: Channel, unique: str
    ) -> None:
        await subscribe(connected, f"/queue/typed-{unique}")
        headers = {"flag": True, "ratio": 1.5, "count": 42, "nested": {"a": [1, "two"]}, "text": "plain"}
        await backdoor.publish("", f"typed-{unique}", b"x", MessageProperties(headers=headers), confirm=True)
        message = await connected.receive_command("MESSAGE")
        assert message.get("flag") == "true"
        assert message.get("ratio") == "1.5"
        assert message.get("count") == "42"
        assert json.loads(message.get("nested") or "") == {"a": [1, "two"]}
        assert message.get("text") == "plain"

    async def test_amqp_reply_to_gets_the_reply_queue_prefix(
        self, connected: StompClient, backdoor: Channel, unique: str
    ) -> None:
        await subscribe(connected, f"/queue/rt-{unique}")
        await backdoor.publish(
            "", f"rt-{unique}", b"x", MessageProperties(reply_to="my-replies"), confirm=True
        )
        assert (await connected.receive_command("MESSAGE")).get("reply-to") == "/reply-queue/my-replies"


class TestWebSocketFrames:
    async def test_binary_body_goes_out_as_a_binary_message(
        self, connected: StompClient, unique: str
    ) -> None:
        await subscribe(connected, f"/queue/bin-{unique}")
        body = bytes(range(256))
        await send(connected, f"/queue/bin-{unique}", body)
        message = await connected.receive_command("MESSAGE")
        assert message.body == body
        [raw] = [m for m in connected.raw_messages if m[:7] in (b"MESSAGE", "MESSAGE")]
        assert isinstance(raw, bytes)

    async def test_text_body_goes_out_as_text(self, connected: StompClient, unique: str) -> None:
        await subscribe(connected, f"/queue/txt-{unique}")
        await send(connected, f"/queue/txt-{unique}", "héllo")
        assert (await connected.receive_command("MESSAGE")).body == "héllo".encode()
        [raw] = [m for m in connected.raw_messages if m[:7] in (b"MESSAGE", "MESSAGE")]
        assert isinstance(raw, str)

    async def test_frame_split_over_messages_and_frames_sharing_one(
        self, connected: StompClient, unique: str
    ) -> None:
        await subscribe(connected, f"/queue/split-{unique}")
        data = frame("SEND", "one", destination=f"/queue/split-{unique}").serialize("1.2")
        data += b"\n\n" + frame("SEND", "two", destination=f"/queue/split-{unique}", receipt="r").serialize(
            "1.2"
        )
        for i in range(0, len(data), 7):
            await connected.send(data[i : i + 7])
        await connected.receipt("r")
        bodies = {(await connected.receive_command("MESSAGE")).body for _ in range(2)}
        assert bodies == {b"one", b"two"}


class TestAcknowledgement:
    """STOMP 1.2 — SUBSCRIBE ack modes, ACK, NACK."""

    async def test_client_individual_ack_and_nack_requeue(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        c = await connected_client(ws_url, clients)
        queue = f"/queue/ack-{unique}"
        await subscribe(c, queue, ack="client-individual")
        await send(c, queue, "m1")
        first = await c.receive_command("MESSAGE")
        assert first.get("ack") == first.get("message-id")
        await c.send(frame("NACK", id=first.get("ack") or "", receipt="n"))
        await c.receive_command("RECEIPT")
        again = await c.receive_command("MESSAGE")
        assert again.body == b"m1"
        assert again.get("redelivered") == "true"
        await c.send(frame("ACK", id=again.get("ack") or "", receipt="a"))
        await c.receive_command("RECEIPT")
        await c.nothing()

    @pytest.mark.parametrize("requeue", ["false", "False"])
    async def test_nack_without_requeue_dead_letters(
        self, ws_url: str, clients: list[StompClient], unique: str, requeue: str, backdoor: Channel
    ) -> None:
        c = await connected_client(ws_url, clients)
        dead = f"/queue/dead-{unique}"
        await subscribe(c, dead, "dead")
        queue = f"/queue/nack-{unique}"
        await subscribe(c, queue, ack="client-individual", x_dead_letter_exchange="",
                        x_dead_letter_routing_key=f"dead-{unique}")
        await backdoor.publish("", f"nack-{unique}", b"reject me", MessageProperties())
        message = await c.receive_command("MESSAGE")
        assert message.get("subscription") == "s1"
        await c.send(frame("NACK", id=message.get("ack") or "", requeue=requeue, receipt="n"))
        await c.receipt("n")
        dead_letter = await c.receive_command("MESSAGE")
        assert (dead_letter.get("subscription"), dead_letter.body) == ("dead", b"reject me")
        await c.nothing()  # not redelivered to s1
        for name in (f"dead-{unique}", f"nack-{unique}"):
            await backdoor.delete_queue(name)

    async def test_nack_without_requeue_and_without_dead_letter_exchange_drops(
        self, ws_url: str, clients: list[StompClient], unique: str, backdoor: Channel
    ) -> None:
        c = await connected_client(ws_url, clients)
        queue = f"/queue/drop-{unique}"
        await subscribe(c, queue, ack="client")
        await send(c, queue, "drop me")
        message = await c.receive_command("MESSAGE")
        await c.send(frame("NACK", id=message.get("ack") or "", requeue="False", receipt="n"))
        await c.receipt("n")
        await c.nothing()
        await c.send(frame("UNSUBSCRIBE", id="s1", receipt="u"))
        await c.receipt("u")
        other = await connected_client(ws_url, clients)
        await subscribe(other, queue)
        await other.nothing()  # nothing went back to the queue
        await backdoor.delete_queue(f"drop-{unique}")

    @pytest.mark.parametrize(("version", "header"), [("1.2", "id"), ("1.1", "message-id"), ("1.0", "message-id")])
    @pytest.mark.parametrize("command", ["ACK", "NACK"])
    async def test_ack_without_its_id_header_is_missing_header(
        self, ws_url: str, clients: list[StompClient], version: str, header: str, command: str
    ) -> None:
        c = await connected_client(ws_url, clients, version)
        await c.send(frame(command, subscription="s1"))
        error = await c.receive_command("ERROR")
        assert error.get("message") == "Missing header"
        assert error.body == f'"{command}" must include the "{header}" header\n'.encode()

    async def test_unacked_messages_return_to_the_queue_on_disconnect(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        queue = f"/queue/unacked-{unique}"
        c = await connected_client(ws_url, clients)
        await subscribe(c, queue, ack="client")
        await send(c, queue, "keep me")
        await c.receive_command("MESSAGE")
        await c.send(frame("DISCONNECT", receipt="bye"))
        await c.receive_command("RECEIPT")
        other = await connected_client(ws_url, clients)
        await subscribe(other, queue, ack="auto")
        message = await other.receive_command("MESSAGE")
        assert message.body == b"keep me"
        assert message.get("redelivered") == "true"

    async def test_client_mode_ack_is_cumulative(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        queue = f"/queue/cum-{unique}"
        c = await connected_client(ws_url, clients)
        await subscribe(c, queue, ack="client")
        for i in range(3):
            await send(c, queue, f"m{i}")
        messages = [await c.receive_command("MESSAGE") for _ in range(3)]
        await c.send(frame("ACK", id=messages[1].get("ack") or "", receipt="a"))
        await c.receive_command("RECEIPT")
        # m0 and m1 are settled; acking m0 again is an error
        await c.send(frame("ACK", id=messages[0].get("ack") or ""))
        error = await c.receive_command("ERROR")
        assert error.get("message") == "Invalid header"

    async def test_prefetch_count_limits_unacked_messages(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        queue = f"/queue/pf-{unique}"
        c = await connected_client(ws_url, clients)
        for i in range(3):
            await send(c, queue, f"m{i}")
        await subscribe(c, queue, ack="client-individual", prefetch_count="1")
        first = await c.receive_command("MESSAGE")
        await c.nothing(0.4)
        await c.send(frame("ACK", id=first.get("ack") or ""))
        assert (await c.receive_command("MESSAGE")).body == b"m1"

    async def test_one_one_acks_by_message_id(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        c = await connected_client(ws_url, clients, "1.1")
        queue = f"/queue/a11-{unique}"
        await subscribe(c, queue, ack="client-individual")
        await send(c, queue, "x")
        message = await c.receive_command("MESSAGE")
        assert message.get("ack") is None
        await c.send(
            frame("ACK", message_id=message.get("message-id") or "", subscription="s1", receipt="ok")
        )
        await c.receive_command("RECEIPT")

    async def test_ack_with_unknown_id(self, connected: StompClient) -> None:
        await connected.send(frame("ACK", id="nope"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Invalid header"
        assert error.body == b'"ACK" must include a valid "id" header\n'


class TestTransactions:
    """STOMP 1.2 — BEGIN, COMMIT, ABORT (buffered in the gateway)."""

    async def test_commit_applies_and_abort_drops(self, connected: StompClient, unique: str) -> None:
        queue = f"/queue/tx-{unique}"
        await subscribe(connected, queue)
        await connected.send(frame("BEGIN", transaction="t1"))
        await connected.send(frame("SEND", "in t1", destination=queue, transaction="t1"))
        await connected.nothing(0.3)
        await connected.send(frame("COMMIT", transaction="t1", receipt="c"))
        got = {(await connected.receive()).command for _ in range(2)}
        assert got == {"RECEIPT", "MESSAGE"}
        await connected.send(frame("BEGIN", transaction="t2"))
        await connected.send(frame("SEND", "in t2", destination=queue, transaction="t2"))
        await connected.send(frame("ABORT", transaction="t2", receipt="a"))
        assert (await connected.receive_command("RECEIPT")).get("receipt-id") == "a"
        await connected.nothing(0.3)

    async def test_transactional_ack(self, connected: StompClient, unique: str) -> None:
        queue = f"/queue/txack-{unique}"
        await subscribe(connected, queue, ack="client-individual")
        await send(connected, queue, "x")
        message = await connected.receive_command("MESSAGE")
        await connected.send(frame("BEGIN", transaction="t"))
        await connected.send(frame("ACK", id=message.get("ack") or "", transaction="t"))
        await connected.send(frame("COMMIT", transaction="t", receipt="done"))
        await connected.receive_command("RECEIPT")

    async def test_receipts_of_transactional_frames_come_at_commit_in_order(
        self, connected: StompClient, unique: str, backdoor: Channel
    ) -> None:
        queue = f"/queue/txr-{unique}"
        await subscribe(connected, queue, ack="client-individual")
        await send(connected, queue, "to ack")
        to_ack = await connected.receive_command("MESSAGE")
        await connected.send(frame("BEGIN", transaction="t", receipt="b"))
        assert (await connected.receive_command("RECEIPT")).get("receipt-id") == "b"
        await connected.send(frame("SEND", "one", destination=queue, transaction="t", receipt="s1"))
        await connected.send(frame("ACK", id=to_ack.get("ack") or "", transaction="t", receipt="a1"))
        await connected.send(frame("SEND", "two", destination=queue, transaction="t", receipt="s2"))
        await connected.nothing(0.5)  # nothing took effect yet, so nothing is receipted
        await connected.send(frame("COMMIT", transaction="t", receipt="c"))
        receipts, bodies = [], []
        while len(receipts) < 4 or len(bodies) < 2:
            f = await connected.receive()
            if f.command == "RECEIPT":
                receipts.append(f.get("receipt-id"))
            else:
                assert f.command == "MESSAGE", f
                bodies.append(f.body)
                await connected.send(frame("ACK", id=f.get("ack") or ""))
        assert sorted(receipts[:3]) == ["a1", "s1", "s2"] and receipts.index("s1") < receipts.index("s2")
        assert receipts[3] == "c"  # COMMIT's RECEIPT last: everything before it is confirmed
        assert bodies == [b"one", b"two"]
        await backdoor.delete_queue(f"txr-{unique}")

    async def test_an_aborted_transactions_sends_get_no_receipt(self, connected: StompClient, unique: str) -> None:
        queue = f"/queue/txa-{unique}"
        await connected.send(frame("BEGIN", transaction="t"))
        await connected.send(frame("SEND", "x", destination=queue, transaction="t", receipt="s"))
        await connected.send(frame("ABORT", transaction="t", receipt="a"))
        assert (await connected.receive_command("RECEIPT")).get("receipt-id") == "a"
        await connected.nothing(0.5)

    async def test_commit_of_unknown_transaction(self, connected: StompClient) -> None:
        await connected.send(frame("COMMIT", transaction="nope"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Bad transaction"
        assert error.body == b'Invalid transaction identifier: "nope"\n'


class TestSubscriptions:
    async def test_duplicate_subscription_id(self, connected: StompClient, unique: str) -> None:
        await subscribe(connected, f"/topic/dup-{unique}", "1")
        await connected.send(frame("SUBSCRIBE", destination=f"/topic/dup2-{unique}", id="1"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Duplicated subscription identifier"
        assert error.body == b"A subscription identified by 'T_1' already exists."

    async def test_unsubscribe_stops_delivery(self, connected: StompClient, unique: str) -> None:
        await subscribe(connected, f"/topic/u-{unique}")
        await connected.send(frame("UNSUBSCRIBE", id="s1", receipt="u"))
        await connected.receive_command("RECEIPT")
        await send(connected, f"/topic/u-{unique}", "x")
        await connected.nothing()

    async def test_unsubscribe_unknown(self, connected: StompClient) -> None:
        await connected.send(frame("UNSUBSCRIBE", id="nope"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "No subscription found"

    async def test_one_zero_subscription_without_id(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        c = await open_ws(ws_url)
        clients.append(c)
        await c.send(b"CONNECT\nlogin:guest\npasscode:guest\n\n\x00")
        await c.receive_command("CONNECTED")
        c.version = c.parser.version = "1.0"
        await c.send(frame("SUBSCRIBE", destination=f"/queue/v10-{unique}", receipt="r"))
        await c.receive_command("RECEIPT")
        await c.send(frame("SEND", "x", destination=f"/queue/v10-{unique}"))
        message = await c.receive_command("MESSAGE")
        assert message.get("subscription") is None
        assert message.get("message-id", "").startswith(f"Q_/queue/v10-{unique}@@")


class TestFanout:
    """Many sessions on one topic: one broker consumer, fanned out in process."""

    async def test_sessions_share_one_consumer(
        self, gateway: Gateway, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        subscribers = [await connected_client(ws_url, clients) for _ in range(5)]
        for i, c in enumerate(subscribers):
            await subscribe(c, f"/topic/fan-{unique}", f"sub-{i}")
        hubs = list(gateway.registry.hubs.values())
        assert len(hubs) == 1 and len(hubs[0].groups) == 1
        publisher = await connected_client(ws_url, clients)
        for n in range(10):
            await publisher.send(frame("SEND", str(n), destination=f"/topic/fan-{unique}"))
        for i, c in enumerate(subscribers):
            messages = [await c.receive_command("MESSAGE") for _ in range(10)]
            assert [m.body for m in messages] == [str(n).encode() for n in range(10)]
            assert {m.get("subscription") for m in messages} == {f"sub-{i}"}
        await subscribers[0].send(frame("UNSUBSCRIBE", id="sub-0", receipt="u"))
        await subscribers[0].receive_command("RECEIPT")
        for c in subscribers:
            await c.close()
        await asyncio.sleep(0.2)
        assert sum(len(h.groups) for h in gateway.registry.hubs.values()) == 0

    async def test_client_ack_subscriptions_are_not_shared(
        self, gateway: Gateway, connected: StompClient, unique: str
    ) -> None:
        await subscribe(connected, f"/topic/own-{unique}", ack="client")
        assert sum(len(h.groups) for h in gateway.registry.hubs.values()) == 0


class TestReceiptsAndDisconnect:
    async def test_disconnect_receipt_comes_before_the_close(self, connected: StompClient) -> None:
        await connected.send(frame("DISCONNECT", receipt="77"))
        assert (await connected.receive_command("RECEIPT")).get("receipt-id") == "77"
        await connected.wait_closed()

    async def test_error_closes_only_that_session(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        good = await connected_client(ws_url, clients)
        bad = await connected_client(ws_url, clients)
        await subscribe(good, f"/topic/iso-{unique}")
        await bad.send(b"SEND\ndestination:/queue/x\nbroken-header-line\n\n\x00")
        error = await bad.receive_command("ERROR")
        assert error.get("message")
        await bad.wait_closed()
        await send(good, f"/topic/iso-{unique}", "still here")
        assert (await good.receive_command("MESSAGE")).body == b"still here"

    async def test_frames_before_a_malformed_one_are_not_lost(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        receiver = await connected_client(ws_url, clients)
        await subscribe(receiver, f"/queue/before-bad-{unique}")
        sender = await connected_client(ws_url, clients)
        good = frame("SEND", "kept", destination=f"/queue/before-bad-{unique}").serialize("1.2")
        await sender.send(good + b"SEND\nno colon here\n\n\x00")
        error = await sender.receive_command("ERROR")
        assert error.get("message") == "Invalid frame"
        assert (await receiver.receive_command("MESSAGE")).body == b"kept"

    async def test_a_missing_exchange_does_not_disturb_shared_subscriptions(
        self, ws_url: str, clients: list[StompClient], unique: str
    ) -> None:
        watcher = await connected_client(ws_url, clients)
        await subscribe(watcher, f"/topic/calm-{unique}")
        careless = await connected_client(ws_url, clients)
        await careless.send(frame("SUBSCRIBE", destination=f"/exchange/none-{unique}/k", id="x"))
        assert (await careless.receive_command("ERROR")).get("message") == "not_found"
        await send(watcher, f"/topic/calm-{unique}", "still shared")
        assert (await watcher.receive_command("MESSAGE")).body == b"still shared"


class TestExclusiveQueues:
    """AMQP exclusive queues belong to a connection, which sessions share: the gateway deletes them."""

    async def test_exclusive_queue_of_a_send_goes_with_the_session(
        self, ws_url: str, clients: list[StompClient], backdoor: Channel, unique: str
    ) -> None:
        c = await connected_client(ws_url, clients)
        await send(c, f"/queue/excl-{unique}", "x", durable="false")
        await c.send(frame("DISCONNECT", receipt="bye"))
        await c.receipt("bye")
        await c.wait_closed()
        await asyncio.sleep(0.3)
        with pytest.raises(BrokerError) as gone:
            await backdoor.declare_queue(f"excl-{unique}", passive=True)
        assert gone.value.code == 404

    async def test_failed_subscribe_leaves_no_queue(
        self, connected: StompClient, backdoor: Channel, unique: str
    ) -> None:
        await connected.send(
            frame(
                "SUBSCRIBE",
                destination=f"/exchange/none-{unique}/k",
                id="1",
                ack="client",
                x_queue_name=f"orphan-{unique}",
            )
        )
        assert (await connected.receive_command("ERROR")).get("message") == "not_found"
        await connected.wait_closed()
        await asyncio.sleep(0.3)
        with pytest.raises(BrokerError) as gone:
            await backdoor.declare_queue(f"orphan-{unique}", passive=True)
        assert gone.value.code == 404


class TestDeliveryBackend:
    async def test_backdoor_consumer_sees_stomp_sends(
        self, connected: StompClient, backdoor: Channel, unique: str
    ) -> None:
        queue = await backdoor.declare_queue(f"bd-{unique}", auto_delete=True)
        received: asyncio.Queue[Delivery] = asyncio.Queue()
        await backdoor.consume(queue, received.put_nowait, no_ack=True)
        await send(connected, f"/amq/queue/{queue}", "to amqp", persistent="true", x_extra="v")
        delivery = await asyncio.wait_for(received.get(), 5)
        assert delivery.body == b"to amqp"
        assert delivery.properties.delivery_mode == 2
        assert delivery.properties.headers.get("x-extra") == "v"


async def test_broker_nack_becomes_an_error_naming_the_receipt(
    connected: StompClient, backdoor: Channel, unique: str
) -> None:
    queue = await backdoor.declare_queue(
        f"nack-{unique}", auto_delete=False, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    try:
        await connected.send(frame("SEND", "x", destination=f"/amq/queue/{queue}", receipt="r-nack"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "Message rejected"
        assert error.get("receipt-id") == "r-nack"
        assert "r-nack" in error.body.decode()
        await connected.wait_closed()
    finally:
        await backdoor.delete_queue(queue)


class TestPadding:
    """RabbitMQ's parser skips NULs and EOLs before a frame; so does the gateway's."""

    async def test_nuls_and_eols_before_and_between_frames(self, connected: StompClient, unique: str) -> None:
        destination = f"/topic/pad.{unique}"
        await connected.send(
            b"\n\x00SUBSCRIBE\ndestination:" + destination.encode() + b"\nid:1\nreceipt:s\n\n\x00\x00\n"
        )
        await connected.receipt("s")
        await connected.send(b"\x00\nSEND\ndestination:" + destination.encode() + b"\n\nhi\x00\x00\n\x00")
        message = await connected.receive_command("MESSAGE")
        assert message.body == b"hi"
        await connected.send(b"\x00")  # padding alone is no frame and no error
        await connected.send(frame("DISCONNECT", receipt="bye"))
        await connected.receipt("bye")


class TestNameLimits:
    """AMQP names and keys are short strings (255 bytes): both backends refuse longer ones alike, with the
    AMQP reply precondition_failed. (RabbitMQ's own STOMP plugin passes such names on internally; an AMQP
    0-9-1 connection cannot carry them, so the gateway refuses them in its own words.)"""

    @pytest.mark.parametrize(
        ("command", "destination", "what"),
        [
            ("SEND", "/queue/" + "q" * 256, "queue name"),
            ("SUBSCRIBE", "/queue/" + "é" * 128, "queue name"),
            ("SEND", "/topic/" + "k" * 256, "routing key"),
            ("SUBSCRIBE", "/topic/" + "k" * 256, "binding key"),
            ("SEND", "/exchange/" + "e" * 256 + "/k", "exchange name"),
            ("SUBSCRIBE", "/exchange/amq.topic/" + "k" * 300, "binding key"),
            ("SUBSCRIBE", "/amq/queue/" + "q" * 256, "queue name"),
        ],
    )
    async def test_over_255_bytes(self, connected: StompClient, command: str, destination: str, what: str) -> None:
        await connected.send(frame(command, destination=destination, id="1", receipt="r"))
        error = await connected.receive_command("ERROR")
        assert error.get("message") == "precondition_failed"
        assert error.body.startswith(what.encode() + b" '")
        assert error.body.endswith(b"...' is longer than the 255 bytes AMQP allows")

    async def test_exactly_255_bytes_is_fine(self, connected: StompClient, backdoor: Channel) -> None:
        name = "q" * 255
        await connected.send(frame("SUBSCRIBE", destination=f"/queue/{name}", id="1", receipt="r"))
        await connected.receipt("r")
        await connected.send(frame("SEND", "x", destination="/topic/" + "k" * 255, receipt="s"))
        await connected.receipt("s")
        await backdoor.delete_queue(name)


async def test_a_queue_deleted_under_a_subscription_is_an_error_that_names_it(
    connected: StompClient, backdoor: Channel, unique: str
) -> None:
    """The broker cancels the consumer (queue deleted, or its node left): RabbitMQ's plugin then keeps the
    session open and silent (rabbitmq-server #2410); the gateway names the subscription and closes."""
    await subscribe(connected, f"/queue/doomed-{unique}", "s-doomed")
    await backdoor.delete_queue(f"doomed-{unique}")
    error = await connected.receive_command("ERROR")
    assert error.get("message") == "Subscription cancelled"
    assert error.get("subscription") == "s-doomed"
    assert f"/queue/doomed-{unique}" in error.body.decode()
    await connected.wait_closed()
