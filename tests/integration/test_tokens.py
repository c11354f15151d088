"""Tokens at the edge, over real WebSockets against a real RabbitMQ, with real signed tokens (issue 13):
every source of the token, scope rules per operation, expiry at the second, in-band refresh and its
refusals, pooled broker connections, anonymous scopes, the frame-rate limit."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway import metrics
from gateway.server import Gateway
from tests.conftest import make_config
from tests.stomp_client import StompClient, frame, open_ws
from tests.tokens import Keys, make_keys

pytestmark = pytest.mark.rabbitmq_only("the gateway checks the scopes; RabbitMQ carries the messages")

ALL = "rabbitmq.read:*/*/* rabbitmq.write:*/*/* rabbitmq.configure:*/*/*"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def gateway_overrides(keys: Keys) -> dict[str, object]:
    return {"jwt_secret_file": keys.secret_file, "jwt_key_file": keys.jwks_file}


def sample(name: str) -> float:
    """One series of this process's /metrics (0 when absent)."""
    for line in metrics.exposition().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def connect(url: str, clients: list[StompClient], token: str | None, **headers: str) -> StompClient:
    c = await open_ws(url)
    clients.append(c)
    if token is not None:
        headers["passcode"] = token
    await c.connect(**headers)
    return c


async def refused(url: str, clients: list[StompClient], token: str | None) -> str:
    """CONNECT with ``token``: the ERROR's body, after checking its message and the close."""
    c = await open_ws(url)
    clients.append(c)
    headers = {"passcode": token} if token is not None else {}
    await c.send(frame("CONNECT", accept_version="1.2", host="/", **headers))
    error = await c.receive_command("ERROR")
    assert error.get("message") == "Bad CONNECT"
    await c.wait_closed()
    return error.body.decode()


class TestConnect:
    @pytest.mark.parametrize(("alg", "kid"), [("HS256", None), ("RS256", "one"), ("ES256", "two")])
    async def test_token_as_passcode_with_any_login(
        self, ws_url: str, clients: list[StompClient], keys: Keys, alg: str, kid: str | None, unique: str
    ) -> None:
        c = await connect(ws_url, clients, keys.sign(alg, kid=kid), login="whatever")
        await c.send(frame("SUBSCRIBE", destination=f"/queue/t.{unique}", id="s", receipt="r"))
        await c.receipt("r")
        await c.send(frame("SEND", "hello", destination=f"/queue/t.{unique}", receipt="p"))
        await c.receipt("p")
        assert (await c.receive_command("MESSAGE")).body == b"hello"

    async def test_bad_tokens_are_refused(self, ws_url: str, clients: list[StompClient], keys: Keys) -> None:
        assert "expired" in await refused(ws_url, clients, keys.sign("HS256", ttl=-10))
        assert "audience" in await refused(ws_url, clients, keys.sign("HS256", aud="another-api"))
        assert "no key with kid 'nine'" in await refused(ws_url, clients, keys.sign("RS256", kid="nine"))
        token = keys.sign("RS256", kid="one")
        tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
        assert "signature" in await refused(ws_url, clients, tampered)
        assert "not a JWT" in await refused(ws_url, clients, "guest")

    async def test_no_token_and_no_anonymous_scope(self, ws_url: str, clients: list[StompClient]) -> None:
        assert "A token is required" in await refused(ws_url, clients, None)

    async def test_vhost_without_a_scope(self, ws_url: str, clients: list[StompClient], keys: Keys) -> None:
        c = await open_ws(ws_url)
        clients.append(c)
        await c.send(frame("CONNECT", accept_version="1.2", host="other", passcode=keys.sign(scope="rabbitmq.read:%2F/*")))
        error = await c.receive_command("ERROR")
        assert "Virtual host 'other' access denied" in error.body.decode()

    async def test_issuer_and_audience_settings(self, backend: str, clients: list[StompClient], keys: Keys) -> None:
        # a gateway of its own, with the RSA PEM key, an issuer and an audience
        config = make_config(
            "rabbitmq", jwt_key_file=keys.rsa_pem_file, jwt_issuer="https://idp.test", jwt_audience="ticker"
        )
        gw = Gateway(config)
        await gw.start()
        try:
            url = f"ws://127.0.0.1:{gw.port}/ws"
            await connect(url, clients, keys.sign("RS256", iss="https://idp.test", aud="ticker"))
            assert "issuer" in await refused(url, clients, keys.sign("RS256", iss="https://other.test", aud="ticker"))
            assert "audience" in await refused(url, clients, keys.sign("RS256", iss="https://idp.test"))
            assert "HS256 is not accepted" in await refused(url, clients, keys.sign("HS256", iss="https://idp.test", aud="ticker"))
        finally:
            await gw.stop()


class TestScopes:
    async def test_send_to_exchange_needs_write_and_topic_write(
        self, ws_url: str, clients: list[StompClient], keys: Keys, unique: str
    ) -> None:
        c = await connect(ws_url, clients, keys.sign(scope="rabbitmq.write:*/amq.topic"))
        await c.send(frame("SEND", "x", destination=f"/exchange/amq.topic/k.{unique}"))
        error = await c.receive_command("ERROR")
        assert error.get("message") == "access_refused"
        body = error.body.decode()
        assert f"SEND to '/exchange/amq.topic/k.{unique}'" in body
        assert f"write on routing key 'k.{unique}' of exchange 'amq.topic'" in body
        await c.wait_closed()

    async def test_messages_flow_where_the_scopes_allow(
        self, ws_url: str, clients: list[StompClient], keys: Keys, unique: str
    ) -> None:
        reader = await connect(ws_url, clients, keys.sign(sub="r", scope=f"rabbitmq.read:%2F/amq.topic/t.{unique}.*"))
        writer = await connect(ws_url, clients, keys.sign(sub="w", scope=f"rabbitmq.write:%2F/amq.topic/t.{unique}.*"))
        await reader.send(frame("SUBSCRIBE", destination=f"/topic/t.{unique}.a", id="s", receipt="r"))
        await reader.receipt("r")
        await writer.send(frame("SEND", "tick", destination=f"/topic/t.{unique}.a", receipt="w"))
        await writer.receipt("w")
        assert (await reader.receive_command("MESSAGE")).body == b"tick"
        # the reader may not write, the writer may not read
        await reader.send(frame("SEND", "x", destination=f"/topic/t.{unique}.a"))
        assert (await reader.receive_command("ERROR")).get("message") == "access_refused"
        await writer.send(frame("SUBSCRIBE", destination=f"/topic/t.{unique}.a", id="s"))
        error = await writer.receive_command("ERROR")
        assert "read on exchange 'amq.topic'" in error.body.decode()

    async def test_queue_needs_configure_to_declare(
        self, ws_url: str, clients: list[StompClient], keys: Keys, unique: str
    ) -> None:
        c = await connect(ws_url, clients, keys.sign(scope=f"rabbitmq.read:*/q.{unique}"))
        await c.send(frame("SUBSCRIBE", destination=f"/queue/q.{unique}", id="s"))
        error = await c.receive_command("ERROR")
        assert error.get("message") == "access_refused"
        assert f"configure on queue 'q.{unique}'" in error.body.decode()

    async def test_send_to_queue_needs_the_default_exchange(
        self, ws_url: str, clients: list[StompClient], keys: Keys, unique: str
    ) -> None:
        scope = f"rabbitmq.configure:*/q.{unique} rabbitmq.write:*/q.{unique}"
        c = await connect(ws_url, clients, keys.sign(scope=scope))
        await c.send(frame("SEND", "x", destination=f"/queue/q.{unique}"))
        error = await c.receive_command("ERROR")
        assert "write on exchange 'amq.default'" in error.body.decode()

    async def test_transactional_send_is_checked_where_it_is_sent(
        self, ws_url: str, clients: list[StompClient], keys: Keys
    ) -> None:
        c = await connect(ws_url, clients, keys.sign(scope="rabbitmq.read:*/*"))
        await c.send(frame("BEGIN", transaction="t"))
        await c.send(frame("SEND", "x", destination="/topic/a", transaction="t"))
        assert (await c.receive_command("ERROR")).get("message") == "access_refused"

    async def test_token_sessions_share_one_broker_connection(
        self, ws_url: str, clients: list[StompClient], keys: Keys, unique: str
    ) -> None:
        sessions = [await connect(ws_url, clients, keys.sign(sub="user0"))]
        before_connections = sample("stomp_gateway_amqp_connections")
        before_groups = sample("stomp_gateway_fanout_groups")
        before_subscribers = sample("stomp_gateway_fanout_subscribers")
        sessions += [await connect(ws_url, clients, keys.sign(sub=f"user{n}")) for n in range(1, 4)]
        for n, c in enumerate(sessions):
            await c.send(frame("SUBSCRIBE", destination=f"/topic/p.{unique}", id="s", receipt=f"r{n}"))
            await c.receipt(f"r{n}")
        # four users, one pooled login (the gateway's own): one AMQP connection, one shared consumer
        assert sample("stomp_gateway_amqp_connections") == before_connections
        assert sample("stomp_gateway_fanout_subscribers") - before_subscribers == 4
        assert sample("stomp_gateway_fanout_groups") - before_groups == 1
        await sessions[0].send(frame("SEND", "m", destination=f"/topic/p.{unique}"))
        for c in sessions:
            assert (await c.receive_command("MESSAGE")).body == b"m"


class TestAnonymous:
    @pytest.fixture
    def gateway_overrides(self, keys: Keys) -> dict[str, object]:
        return {"jwt_key_file": keys.rsa_pem_file, "anonymous_scopes": ["rabbitmq.read:%2F/amq.topic/pub.*"]}

    async def test_anonymous_reads_what_the_scope_grants_and_nothing_else(
        self, ws_url: str, clients: list[StompClient], keys: Keys, unique: str
    ) -> None:
        anonymous = await connect(ws_url, clients, None)
        await anonymous.send(frame("SUBSCRIBE", destination=f"/topic/pub.{unique}", id="s", receipt="r"))
        await anonymous.receipt("r")
        publisher = await connect(ws_url, clients, keys.sign("RS256"))
        await publisher.send(frame("SEND", "open", destination=f"/topic/pub.{unique}", receipt="p"))
        await publisher.receipt("p")
        assert (await anonymous.receive_command("MESSAGE")).body == b"open"
        await anonymous.send(frame("SEND", "x", destination=f"/topic/pub.{unique}"))
        error = await anonymous.receive_command("ERROR")
        assert "which an anonymous session does not grant" in error.body.decode()

    async def test_anonymous_cannot_refresh(self, ws_url: str, clients: list[StompClient], keys: Keys) -> None:
        anonymous = await connect(ws_url, clients, None)
        await anonymous.send(frame("SEND", keys.sign("RS256"), destination="/gateway/token"))
        error = await anonymous.receive_command("ERROR")
        assert error.get("message") == "access_refused"
        assert "Only a session opened with a token" in error.body.decode()


class TestExpiry:
    async def test_session_ends_at_exp(self, ws_url: str, clients: list[StompClient], keys: Keys) -> None:
        exp = int(time.time()) + 2
        c = await connect(ws_url, clients, keys.sign(ttl=exp - time.time()))
        await c.send(frame("SUBSCRIBE", destination="/topic/idle", id="s", receipt="r"))
        await c.receipt("r")
        error = await c.receive_command("ERROR", timeout=5)  # nothing sent: the timer, not a frame, ends it
        ended = time.time()
        assert error.get("message") == "Token expired"
        assert exp - 0.01 <= ended <= exp + 0.5, (exp, ended)
        await c.wait_closed()

    async def test_refresh_moves_the_deadline(self, ws_url: str, clients: list[StompClient], keys: Keys) -> None:
        first_exp = int(time.time()) + 2
        c = await connect(ws_url, clients, keys.sign(ttl=first_exp - time.time()))
        await c.send(frame("SEND", keys.sign("RS256", kid="one", ttl=60), destination="/gateway/token", receipt="t"))
        await c.receipt("t")
        await asyncio.sleep(max(0.0, first_exp - time.time()) + 0.5)
        await c.send(frame("SUBSCRIBE", destination="/topic/after", id="s", receipt="r"))
        await c.receipt("r")  # still open, past the first token's exp

    async def test_refresh_for_another_subject_is_refused(
        self, ws_url: str, clients: list[StompClient], keys: Keys
    ) -> None:
        c = await connect(ws_url, clients, keys.sign(sub="alice"))
        await c.send(frame("SEND", keys.sign(sub="mallory"), destination="/gateway/token", receipt="t"))
        error = await c.receive_command("ERROR")
        assert error.get("message") == "access_refused"
        assert "another subject" in error.body.decode()
        await c.wait_closed()

    async def test_refresh_with_a_bad_token_is_refused(
        self, ws_url: str, clients: list[StompClient], keys: Keys
    ) -> None:
        c = await connect(ws_url, clients, keys.sign(sub="alice"))
        await c.send(frame("SEND", keys.sign(sub="alice", ttl=-30), destination="/gateway/token"))
        error = await c.receive_command("ERROR")
        assert "Token refresh refused: the token has expired" in error.body.decode()

    async def test_refresh_ends_the_subscriptions_no_longer_allowed(
        self, ws_url: str, clients: list[StompClient], keys: Keys, unique: str
    ) -> None:
        both = f"rabbitmq.read:*/amq.topic/a.{unique} rabbitmq.read:*/amq.topic/b.{unique} rabbitmq.write:*/amq.topic/*"
        c = await connect(ws_url, clients, keys.sign(scope=both))
        for name in ("a", "b"):
            await c.send(frame("SUBSCRIBE", destination=f"/topic/{name}.{unique}", id=name, receipt=name))
            await c.receipt(name)
        only_b = f"rabbitmq.read:*/amq.topic/b.{unique} rabbitmq.write:*/amq.topic/*"
        await c.send(frame("SEND", keys.sign(scope=only_b), destination="/gateway/token", receipt="t"))
        ended = await c.receive_command("ERROR")
        assert ended.get("message") == "access_refused"
        assert ended.get("subscription") == "a"
        assert ended.get("destination") == f"/topic/a.{unique}"
        await c.receipt("t")
        # the session goes on: 'b' still delivers, 'a' no longer does
        for name in ("a", "b"):
            await c.send(frame("SEND", name, destination=f"/topic/{name}.{unique}", receipt="s" + name))
            await c.receipt("s" + name)
        message = await c.receive_command("MESSAGE")
        assert (message.get("subscription"), message.body) == ("b", b"b")
        await c.nothing(0.3)


class TestFrameRate:
    @pytest.fixture
    def gateway_overrides(self, keys: Keys) -> dict[str, object]:
        return {"max_frames_per_second": 50.0}

    async def test_a_fast_sender_is_slowed_not_cut(self, ws_url: str, clients: list[StompClient], unique: str) -> None:
        c = await connect(ws_url, clients, None)
        before = sample("stomp_gateway_frame_rate_pauses_total")
        started = time.monotonic()
        await c.send(b"".join(frame("SEND", str(i), destination=f"/queue/fr.{unique}", receipt=str(i)).serialize("1.2") for i in range(100)))
        for i in range(100):
            await c.receipt(str(i))
        elapsed = time.monotonic() - started
        # 50 in the first second's bucket (the CONNECT took one), the other 50 at 50 a second
        assert 0.9 <= elapsed < 3, elapsed
        assert sample("stomp_gateway_frame_rate_pauses_total") > before


class TestTokenSources:
    """First found wins: CONNECT passcode, access_token query parameter, Authorization: Bearer, the cookie."""

    @pytest.fixture
    def gateway_overrides(self, keys: Keys) -> dict[str, object]:
        return {"jwt_secret_file": keys.secret_file, "jwt_cookie": "session_jwt"}

    async def test_query_parameter(self, ws_url: str, clients: list[StompClient], keys: Keys) -> None:
        c = await open_ws(f"{ws_url}?access_token={keys.sign(sub='q')}")
        clients.append(c)
        await c.connect()  # no passcode: the upgrade's token

    async def test_bearer_header(self, ws_url: str, clients: list[StompClient], keys: Keys) -> None:
        c = await open_ws(ws_url, additional_headers={"Authorization": f"Bearer {keys.sign(sub='b')}"})
        clients.append(c)
        await c.connect()

    async def test_cookie(self, ws_url: str, clients: list[StompClient], keys: Keys) -> None:
        c = await open_ws(ws_url, additional_headers={"Cookie": f"theme=dark; session_jwt={keys.sign(sub='c')}"})
        clients.append(c)
        await c.connect()

    async def test_passcode_wins_then_query_then_bearer_then_cookie(
        self, gateway: Gateway, ws_url: str, clients: list[StompClient], keys: Keys
    ) -> None:
        expired = keys.sign(ttl=-30)
        # the first found is the one used, even when a later one would do
        c = await open_ws(
            f"{ws_url}?access_token={expired}",
            additional_headers={"Authorization": f"Bearer {keys.sign(sub='b')}"},
        )
        clients.append(c)
        await c.send(frame("CONNECT", accept_version="1.2", host="/"))
        assert "expired" in (await c.receive_command("ERROR")).body.decode()
        c = await open_ws(f"{ws_url}?access_token={expired}")
        clients.append(c)
        await c.connect(passcode=keys.sign(sub="p"))  # the passcode comes first
        c = await open_ws(
            ws_url,
            additional_headers={"Authorization": f"Bearer {keys.sign(sub='b')}", "Cookie": f"session_jwt={expired}"},
        )
        clients.append(c)
        await c.connect()
        assert {connection.session.login for connection in gateway.connections} >= {"p", "b"}
