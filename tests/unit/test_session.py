"""The STOMP session state machine (gateway.stomp.session), section by section of the STOMP 1.2 spec.

Pure tests: frames go in through :meth:`Session.receive_frame`, the tests play the connection layer
(:meth:`Session.authenticated`, :meth:`Session.broker_failed`, :meth:`Session.deliver`) and check the
actions that come out and the frames they carry. No network, no asyncio.

Expected ERROR texts are RabbitMQ's (``rabbitmq-stomp.md`` section g) wherever RabbitMQ has one.
"""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.broker.base import (
    AccessRefused,
    BrokerError,
    BrokerUnavailable,
    ConnectionLostWithNode,
    Delivery,
    MessageProperties,
    VhostNotFound,
)
from gateway.continuity import HandOver
from gateway.destinations import Destination, QueueDeclaration, durable_subscription_queue_name
from gateway.stomp.frames import Frame, ProtocolError
from gateway.stomp.session import (
    ACCEPTS,
    Ack,
    Action,
    Authenticate,
    Barrier,
    Close,
    Connected,
    Disconnect,
    Publish,
    Reattach,
    SendFrame,
    Session,
    SessionSettings,
    State,
    Subscribe,
    Subscription,
    Unsubscribe,
    negotiate_heartbeat,
    negotiate_version,
)
from gateway.stomp.writer import MessageTemplate

SESSION_ID = "session-test"
UNKNOWN_TAIL = (
    "Valid destination types are: /temp-queue, /exchange, /topic, /queue, /amq/queue, /reply-queue/.\n"
)
ACTION_TYPES = (SendFrame, Authenticate, Subscribe, Unsubscribe, Publish, Ack, Disconnect, Close)


# --------------------------------------------------------------------------------------------------------
# Helpers


def make(command: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Frame:
    return Frame(command, tuple((headers or {}).items()), body)


def receipt(receipt_id: str) -> Frame:
    return Frame("RECEIPT", (("receipt-id", receipt_id),))


def connecting(settings: SessionSettings | None = None) -> Session:
    return Session(settings, session_id=SESSION_ID)


def connected(version: str = "1.2", settings: SessionSettings | None = None) -> Session:
    """A session after CONNECT (accept-version: ``version``) and the broker's yes."""
    session = connecting(settings)
    actions = session.receive_frame(make("CONNECT", {"accept-version": version}))
    assert [type(action) for action in actions] == [Authenticate]
    session.authenticated()
    assert session.state is State.CONNECTED
    return session


def accept_login(session: Session) -> SendFrame:
    """The broker accepted the login: a Connected action (switch limits, start timers), then CONNECTED."""
    actions = session.authenticated()
    assert isinstance(actions[0], Connected), actions
    assert (actions[0].send_every, actions[0].expect_every) == session.heartbeat
    action = only(actions[1:], SendFrame)
    assert isinstance(action, SendFrame)
    return action


def only(actions: list[Action], kind: type) -> Action:
    assert len(actions) == 1, actions
    assert isinstance(actions[0], kind), actions
    return actions[0]


def error_frame(actions: list[Action]) -> Frame:
    """The ERROR frame of a session-closing ``[Close(ERROR)]``."""
    close = only(actions, Close)
    assert isinstance(close, Close)
    assert close.error is not None
    assert close.error.command == "ERROR"
    assert close.error.get("content-type") == "text/plain"
    assert close.error.get("version") == "1.0,1.1,1.2"
    return close.error


def error_of(actions: list[Action]) -> tuple[str | None, str]:
    """``(message header, body text)`` of the ERROR frame in ``actions``."""
    error = error_frame(actions)
    return error.get("message"), error.body.decode()


def fails(session: Session, frame: Frame) -> tuple[str | None, str]:
    """Feed ``frame``; it must close the session with an ERROR. Returns (message, body)."""
    result = error_of(session.receive_frame(frame))
    assert session.state is State.CLOSED
    return result


def send(session: Session, headers: dict[str, str], body: bytes = b"") -> Publish:
    action = only(session.receive_frame(make("SEND", headers, body)), Publish)
    assert isinstance(action, Publish)
    return action


def subscribe(session: Session, headers: dict[str, str]) -> Subscription:
    action = only(session.receive_frame(make("SUBSCRIBE", headers)), Subscribe)
    assert isinstance(action, Subscribe)
    return action.subscription


def delivery(
    tag: int,
    *,
    exchange: str = "",
    routing_key: str = "a",
    body: bytes = b"hello",
    redelivered: bool = False,
    properties: MessageProperties | None = None,
) -> Delivery:
    return Delivery(
        consumer_tag="ctag",
        delivery_tag=tag,
        exchange=exchange,
        routing_key=routing_key,
        redelivered=redelivered,
        body=body,
        properties=properties or MessageProperties(),
    )


def ack_frame(session: Session, message_id: str, command: str = "ACK", **extra: str) -> Frame:
    """ACK/NACK naming ``message_id`` with the header of the negotiated version."""
    header = "id" if session.version == "1.2" else "message-id"
    return make(command, {header: message_id, **extra})


def acknowledge(session: Session, message_id: str, command: str = "ACK", **extra: str) -> Ack:
    action = only(session.receive_frame(ack_frame(session, message_id, command, **extra)), Ack)
    assert isinstance(action, Ack)
    return action


# --------------------------------------------------------------------------------------------------------
# The state table


# What the STOMP 1.2 spec allows in each state: CONNECT/STOMP first and only once, then the client frames.
SPEC_ACCEPTS: dict[State, set[str]] = {
    State.CONNECTING: {"CONNECT", "STOMP"},
    State.AUTHENTICATING: set(),
    State.CONNECTED: {
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    },
    State.CLOSED: set(),
}
CLIENT_COMMANDS = sorted(SPEC_ACCEPTS[State.CONNECTING] | SPEC_ACCEPTS[State.CONNECTED])
PENDING_ID = f"T_sub-0@@{SESSION_ID}@@1"

# A well-formed frame of each command, valid in a session made by session_in(State.CONNECTED), and the
# one action it must give there.
GOOD_FRAMES: dict[str, tuple[Frame, type]] = {
    "CONNECT": (make("CONNECT", {"accept-version": "1.2"}), Authenticate),
    "STOMP": (make("STOMP", {"accept-version": "1.2"}), Authenticate),
    "SEND": (make("SEND", {"destination": "/queue/a", "receipt": "r"}, b"x"), Publish),
    "SUBSCRIBE": (make("SUBSCRIBE", {"destination": "/queue/b", "id": "sub-1", "receipt": "r"}), Subscribe),
    "UNSUBSCRIBE": (make("UNSUBSCRIBE", {"id": "sub-0", "receipt": "r"}), Unsubscribe),
    "ACK": (make("ACK", {"id": PENDING_ID, "receipt": "r"}), Ack),
    "NACK": (make("NACK", {"id": PENDING_ID, "receipt": "r"}), Ack),
    "BEGIN": (make("BEGIN", {"transaction": "tx-1", "receipt": "r"}), SendFrame),
    "COMMIT": (make("COMMIT", {"transaction": "tx-0", "receipt": "r"}), SendFrame),
    "ABORT": (make("ABORT", {"transaction": "tx-0", "receipt": "r"}), SendFrame),
    "DISCONNECT": (make("DISCONNECT", {"receipt": "r"}), Disconnect),
}


def session_in(state: State) -> Session:
    """A session in ``state``; once connected it holds subscription ``sub-0`` (client-individual) with one
    pending message (:data:`PENDING_ID`) and an open transaction ``tx-0``."""
    session = connecting()
    if state is State.CONNECTING:
        return session
    session.receive_frame(make("CONNECT", {"accept-version": "1.2"}))
    if state is State.AUTHENTICATING:
        return session
    session.authenticated()
    sub = subscribe(session, {"destination": "/queue/a", "id": "sub-0", "ack": "client-individual"})
    session.deliver(sub, delivery(1))
    assert session.receive_frame(make("BEGIN", {"transaction": "tx-0"})) == []
    if state is State.CONNECTED:
        return session
    assert isinstance(only(session.receive_frame(make("DISCONNECT")), Disconnect), Disconnect)
    assert session.state is State.CLOSED
    return session


TABLE = [(state, command) for state in State for command in CLIENT_COMMANDS]


class TestStateTable:
    """STOMP 1.2 — Client Frames; the session's state table ``ACCEPTS`` (rabbitmq-stomp.md g)"""

    def test_table_is_the_spec(self) -> None:
        assert {state: set(commands) for state, commands in ACCEPTS.items()} == SPEC_ACCEPTS

    @pytest.mark.parametrize(("state", "command"), TABLE, ids=[f"{s.name}-{c}" for s, c in TABLE])
    def test_every_command_in_every_state(self, state: State, command: str) -> None:
        session = session_in(state)
        frame, expected = GOOD_FRAMES[command]
        actions = session.receive_frame(frame)
        if state is State.CLOSED:
            assert actions == []  # the connection is going away: nothing at all, not even an ERROR
        elif command in SPEC_ACCEPTS[state]:
            assert [type(action) for action in actions] == [expected]
        else:
            error = error_frame(actions)
            assert error.get("message") == "Illegal command"
            assert error.get("receipt-id") == frame.get("receipt")
            if state is State.CONNECTING:
                assert error.body == b"You must log in using CONNECT first"
            assert session.state is State.CLOSED

    @pytest.mark.parametrize("command", ["CONNECT", "STOMP"])
    def test_second_connect_is_refused(self, command: str) -> None:
        session = connected()
        assert fails(session, make(command, {"accept-version": "1.2"})) == (
            "Illegal command",
            f"'{command}' is not allowed once the session is connected",
        )

    @pytest.mark.parametrize("state", [State.AUTHENTICATING, State.CONNECTED])
    def test_unknown_command_is_a_bad_command(self, state: State) -> None:
        session = session_in(state)
        assert fails(session, make("WRONGCOMMAND")) == (
            "Bad command",
            'Could not interpret command "WRONGCOMMAND"\n',
        )

    def test_unknown_command_is_case_sensitive(self) -> None:
        assert fails(connected(), make("send", {"destination": "/queue/a"})) == (
            "Bad command",
            'Could not interpret command "send"\n',
        )

    @pytest.mark.parametrize("command", ["MESSAGE", "RECEIPT", "ERROR", "CONNECTED"])
    def test_server_frames_from_the_client_are_bad_commands(self, command: str) -> None:
        assert fails(connected(), make(command))[0] == "Bad command"

    def test_unknown_command_before_connect_is_illegal(self) -> None:
        assert fails(connecting(), make("WRONGCOMMAND")) == (
            "Illegal command",
            "You must log in using CONNECT first",
        )

    def test_closed_session_ignores_everything(self) -> None:
        session = connected()
        fails(session, make("WRONGCOMMAND"))
        for command in [*CLIENT_COMMANDS, "WRONGCOMMAND"]:
            assert session.receive_frame(GOOD_FRAMES.get(command, (make(command), None))[0]) == []


# --------------------------------------------------------------------------------------------------------
# Connecting


class TestConnecting:
    """STOMP 1.2 — Connecting; Protocol Negotiation (rabbitmq-stomp.md c.4)"""

    @pytest.mark.parametrize(
        ("accept_version", "version"),
        [
            (None, "1.0"),
            ("1.0", "1.0"),
            ("1.1", "1.1"),
            ("1.2", "1.2"),
            ("1.0,1.1", "1.1"),
            ("1.0,1.1,1.2", "1.2"),
            ("1.2,1.0", "1.2"),
            (" 1.1 , 1.0 ", "1.1"),
            ("1.1,2.0", "1.1"),
        ],
    )
    def test_highest_common_version(self, accept_version: str | None, version: str) -> None:
        assert negotiate_version(accept_version) == version
        session = connecting()
        headers = {} if accept_version is None else {"accept-version": accept_version}
        session.receive_frame(make("CONNECT", headers))
        assert session.version == version
        connected_frame = accept_login(session)
        assert isinstance(connected_frame, SendFrame)
        assert connected_frame.frame.get("version") == version

    @pytest.mark.parametrize("accept_version", ["100.1", "2.0", "", "1.3,0.9"])
    def test_version_mismatch(self, accept_version: str) -> None:
        with pytest.raises(ProtocolError) as info:
            negotiate_version(accept_version)
        assert (info.value.message, info.value.detail) == (
            "Version mismatch",
            "Supported versions are 1.0,1.1,1.2\n",
        )
        session = connecting()
        assert fails(session, make("CONNECT", {"accept-version": accept_version, "receipt": "c"})) == (
            "Version mismatch",
            "Supported versions are 1.0,1.1,1.2\n",
        )

    def test_bare_connect(self) -> None:
        """(g): a bare CONNECT is answered version:1.0, heart-beat:0,0, session, server."""
        session = connecting()
        authenticate = only(session.receive_frame(make("CONNECT")), Authenticate)
        assert authenticate == Authenticate("guest", "guest", "/")
        states = [session.state]
        action = accept_login(session)
        assert isinstance(action, SendFrame)
        assert action.frame == Frame(
            "CONNECTED",
            (
                ("version", "1.0"),
                ("session", SESSION_ID),
                ("server", "stomp-ws-gateway/0.1"),
                ("heart-beat", "0,0"),
            ),
        )
        states.append(session.state)
        assert states == [State.AUTHENTICATING, State.CONNECTED]

    @pytest.mark.parametrize("command", ["CONNECT", "STOMP"])
    def test_credentials_and_host(self, command: str) -> None:
        session = connecting()
        frame = make(command, {"accept-version": "1.2", "login": "bob", "passcode": "secret", "host": "prod"})
        assert session.receive_frame(frame) == [Authenticate("bob", "secret", "prod")]
        assert (session.login, session.vhost) == ("bob", "prod")

    def test_default_login_when_absent(self) -> None:
        settings = SessionSettings(default_login="anon", default_passcode="pw", default_vhost="dev")
        session = connecting(settings)
        assert session.receive_frame(make("CONNECT", {"accept-version": "1.2"})) == [
            Authenticate("anon", "pw", "dev")
        ]

    def test_login_without_passcode(self) -> None:
        session = connecting()
        assert session.receive_frame(make("CONNECT", {"login": "bob", "accept-version": "1.2"})) == [
            Authenticate("bob", "", "/")
        ]

    def test_empty_host_is_the_default_vhost(self) -> None:
        session = connecting()
        assert session.receive_frame(make("CONNECT", {"host": "", "accept-version": "1.2"})) == [
            Authenticate("guest", "guest", "/")
        ]

    def test_first_header_wins(self) -> None:
        session = connecting()
        frame = Frame("CONNECT", (("accept-version", "1.2"), ("login", "first"), ("login", "second")))
        authenticate = only(session.receive_frame(frame), Authenticate)
        assert isinstance(authenticate, Authenticate)
        assert authenticate.login == "first"

    def test_stomp_1_0_trims_leading_whitespace(self) -> None:
        """(c.4): for 1.0, leading whitespace is trimmed from CONNECT header values (RS-proc frame_transformer)."""
        session = connecting()
        frame = make(
            "CONNECT", {"login": "  bob", "passcode": "\tpw ", "host": " vh", "heart-beat": " 5000,0"}
        )
        assert session.receive_frame(frame) == [Authenticate("bob", "pw ", "vh")]
        assert session.version == "1.0"
        assert session.heartbeat == (0, 5000)

    def test_stomp_1_1_keeps_whitespace(self) -> None:
        session = connecting()
        frame = make("CONNECT", {"accept-version": "1.1", "login": " bob", "host": " vh"})
        assert session.receive_frame(frame) == [Authenticate(" bob", "", " vh")]

    def test_connected_headers(self) -> None:
        settings = SessionSettings(server_name="gw/9", heartbeat_min=1000, heartbeat_max=60_000)
        session = connecting(settings)
        session.receive_frame(make("CONNECT", {"accept-version": "1.1,1.2", "heart-beat": "10000,20000"}))
        action = accept_login(session)
        assert isinstance(action, SendFrame)
        assert action.frame.command == "CONNECTED"
        assert dict(action.frame.headers) == {
            "version": "1.2",
            "session": SESSION_ID,
            "server": "gw/9",
            "heart-beat": "20000,10000",  # the server sends every cy, expects every cx
        }

    def test_session_ids_are_random(self) -> None:
        first, second = Session(), Session()
        assert first.id.startswith("session-")
        assert first.id != second.id

    def test_bad_heart_beat_closes_at_connect(self) -> None:
        session = connecting()
        message, body = fails(session, make("CONNECT", {"accept-version": "1.2", "heart-beat": "-1,0"}))
        assert message == "Invalid header"
        assert "heart-beat" in body


# --------------------------------------------------------------------------------------------------------
# Heart-beating


class TestHeartBeating:
    """STOMP 1.2 — Heart-beating: ``negotiate_heartbeat(client heart-beat, minimum, maximum)``"""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (None, (0, 0)),
            ("", (0, 0)),
            ("0,0", (0, 0)),
            ("10000,20000", (20000, 10000)),  # (send every cy, expect every cx)
            ("5000,0", (0, 5000)),  # the client does not want heart-beats: the server sends none
            ("0,5000", (5000, 0)),  # the client cannot send: the server expects none
            ("500,200", (1000, 1000)),  # below the minimum: never more often than the minimum
            ("1000,1000", (1000, 1000)),
            ("0,700000", (600_000, 0)),  # sending more often than asked is harmless
            (" 5000 , 6000 ", (6000, 5000)),
        ],
    )
    def test_negotiation(self, value: str | None, expected: tuple[int, int]) -> None:
        assert negotiate_heartbeat(value, 1000, 600_000) == expected

    @pytest.mark.parametrize(
        "value", ["abc", "1", "1,2,3", "1;2", ",", "1,", ",1", "1.5,2", "x,1", "9" * 5000 + ",0"]
    )
    def test_malformed(self, value: str) -> None:
        with pytest.raises(ProtocolError) as info:
            negotiate_heartbeat(value, 1000, 600_000)
        assert info.value.message == "Invalid header"
        assert info.value.detail.startswith("'heart-beat' must be two comma-separated integers")

    @pytest.mark.parametrize("value", ["-1,0", "0,-5", "-10,-10"])
    def test_negative(self, value: str) -> None:
        with pytest.raises(ProtocolError) as info:
            negotiate_heartbeat(value, 1000, 600_000)
        assert info.value.message == "Invalid header"
        assert info.value.detail == f"'heart-beat' values must not be negative, got {value!r}\n"

    def test_never_expects_more_often_than_the_client_can_send(self) -> None:
        _, expect_every = negotiate_heartbeat("3600000,0", 1000, 600_000)
        assert expect_every == 0 or expect_every >= 3_600_000

    @pytest.mark.parametrize("value", ["1_000,0", "\u0661\u0660\u0660\u0660,0"])
    def test_only_ascii_digits(self, value: str) -> None:
        with pytest.raises(ProtocolError):
            negotiate_heartbeat(value, 1000, 600_000)


# --------------------------------------------------------------------------------------------------------
# Broker outcomes of CONNECT and later operations


class TestBrokerFailures:
    """rabbitmq-stomp.md (g) — Bad CONNECT, and broker errors reported with the broker's name and text"""

    def test_access_refused(self) -> None:
        session = connecting()
        session.receive_frame(make("CONNECT", {"accept-version": "1.2", "login": "guest", "passcode": "no"}))
        assert error_of(session.broker_failed(AccessRefused("guest"))) == (
            "Bad CONNECT",
            "Access refused for user 'guest'",
        )
        assert session.state is State.CLOSED

    def test_vhost_not_found(self) -> None:
        session = connecting()
        session.receive_frame(make("CONNECT", {"accept-version": "1.2", "host": "nope"}))
        assert error_of(session.broker_failed(VhostNotFound("nope"))) == (
            "Bad CONNECT",
            "Virtual host 'nope' access denied",
        )
        assert session.state is State.CLOSED

    def test_other_broker_error(self) -> None:
        session = connected()
        error = BrokerError(404, "not_found", "no exchange 'doesnotexist' in vhost '/'")
        assert error_of(session.broker_failed(error)) == (
            "not_found",
            "no exchange 'doesnotexist' in vhost '/'",
        )
        assert session.state is State.CLOSED

    def test_receipt_id_is_carried(self) -> None:
        session = connected()
        actions = session.broker_failed(BrokerUnavailable(), receipt("r-7"))
        error = error_frame(actions)
        assert error.get("message") == "connection_forced"
        assert error.get("receipt-id") == "r-7"
        assert error.body == b"the message broker is not available"

    def test_frames_after_a_broker_failure_are_ignored(self) -> None:
        session = connected()
        session.broker_failed(BrokerError(406, "precondition_failed", "x"))
        assert session.receive_frame(make("SEND", {"destination": "/queue/a"})) == []


# --------------------------------------------------------------------------------------------------------
# SEND


class TestSend:
    """STOMP 1.2 — SEND; rabbitmq-stomp.md (b.2) destinations and (c.1) headers"""

    @pytest.mark.parametrize(
        ("destination", "exchange", "routing_key", "declared"),
        [
            ("/exchange/ticks/NASDAQ.AAPL", "ticks", "NASDAQ.AAPL", None),
            ("/exchange/ticks", "ticks", "", None),
            ("/exchange/x/", "x", "", None),
            ("/topic/stocks.NYSE.AAPL", "amq.topic", "stocks.NYSE.AAPL", None),
            ("/topic/a%2Fb", "amq.topic", "a/b", None),
            ("/queue/orders", "", "orders", "orders"),
            ("orders", "", "orders", "orders"),  # no "/": the same as /queue/orders
            ("/amq/queue/existing", "", "existing", None),
            ("/reply-queue/amq.gen-Xyz", "", "amq.gen-Xyz", None),
        ],
    )
    def test_routing(self, destination: str, exchange: str, routing_key: str, declared: str | None) -> None:
        publish = send(connected(), {"destination": destination}, b"body")
        assert (publish.exchange, publish.routing_key, publish.body) == (exchange, routing_key, b"body")
        assert publish.temp_queue is None
        assert publish.receipt is None
        if declared is None:
            assert publish.declare is None
        else:
            assert publish.declare == QueueDeclaration(
                declared, durable=True, exclusive=False, auto_delete=False
            )

    def test_configured_topic_exchange(self) -> None:
        publish = send(
            connected(settings=SessionSettings(topic_exchange="stomp.t")), {"destination": "/topic/k"}
        )
        assert (publish.exchange, publish.routing_key) == ("stomp.t", "k")

    def test_the_same_destination_routes_by_each_sessions_topic_exchange(self) -> None:
        """The parsed route of a destination is kept (per topic exchange) for the next SEND to it."""
        for _ in range(2):
            assert send(connected(), {"destination": "/topic/k"}).exchange == "amq.topic"
            configured = connected(settings=SessionSettings(topic_exchange="stomp.t"))
            assert send(configured, {"destination": "/topic/k"}).exchange == "stomp.t"

    @pytest.mark.parametrize(
        ("destination", "refusal"), [("/temp-queue/t", "Invalid destination"), ("/bogus/" + "k" * 300, "Unknown destination")]
    )
    def test_a_refused_destination_is_refused_every_time(self, destination: str, refusal: str) -> None:
        for _ in range(2):
            message, _ = fails(connected(), Frame("SEND", (("destination", destination),), b""))
            assert message == refusal

    def test_queue_declaration_headers(self) -> None:
        publish = send(
            connected(),
            {"destination": "/queue/q", "durable": "false", "x-max-length": "10", "x-queue-type": "classic"},
        )
        assert publish.declare == QueueDeclaration(
            "q",
            durable=False,
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": 10, "x-queue-type": "classic"},
        )

    def test_persistent(self) -> None:
        publish = send(connected(), {"destination": "/queue/q", "persistent": "true"})
        assert publish.properties.delivery_mode == 2
        # On SEND persistent means delivery_mode only, never the queue's durability.
        assert publish.declare == QueueDeclaration("q", durable=True, exclusive=False, auto_delete=False)
        assert (
            send(connected(), {"destination": "/queue/q", "persistent": "false"}).properties.delivery_mode
            is None
        )

    def test_temp_queue_reply_to(self) -> None:
        """(b.2): reply-to:/temp-queue/T asks the connection layer for the temp queue; it rewrites reply_to."""
        publish = send(connected(), {"destination": "/queue/rpc", "reply-to": "/temp-queue/r1"})
        assert publish.temp_queue == "/temp-queue/r1"
        assert publish.properties.reply_to == "/temp-queue/r1"

    def test_other_reply_to_is_verbatim(self) -> None:
        publish = send(connected(), {"destination": "/queue/rpc", "reply-to": "/queue/replies"})
        assert publish.temp_queue is None
        assert publish.properties.reply_to == "/queue/replies"

    def test_properties_and_custom_headers(self) -> None:
        publish = send(
            connected(),
            {
                "destination": "/topic/t",
                "content-type": "application/json",
                "correlation-id": "c-1",
                "amqp-message-id": "m-1",
                "priority": "5",
                "x-app": "demo",
                "receipt": "r-1",
                "content-length": "2",
            },
            b"{}",
        )
        properties = publish.properties
        assert properties.content_type == "application/json"
        assert properties.correlation_id == "c-1"
        assert properties.message_id == "m-1"
        assert properties.priority == 5
        assert properties.headers == {"x-app": "demo"}  # receipt, destination, content-length stay ours

    def test_receipt_is_passed_through(self) -> None:
        publish = send(connected(), {"destination": "/queue/q", "receipt": "r-1"})
        assert publish.receipt == receipt("r-1")

    def test_missing_destination(self) -> None:
        assert fails(connected(), make("SEND", {}, b"x")) == (
            "Missing destination",
            "\"SEND\" must include a 'destination' header\n",
        )

    def test_unknown_destination(self) -> None:
        assert fails(connected(), make("SEND", {"destination": "/bogus/x"})) == (
            "Unknown destination",
            "'/bogus/x' is not a valid destination.\n" + UNKNOWN_TAIL,
        )

    def test_invalid_queue_destination(self) -> None:
        assert fails(connected(), make("SEND", {"destination": "/queue/"})) == (
            "Invalid destination",
            "'/' is not a valid queue destination\n",
        )

    def test_temp_queue_destination(self) -> None:
        assert fails(connected(), make("SEND", {"destination": "/temp-queue/x"})) == (
            "Invalid destination",
            "'/temp-queue/x' is not a valid destination for 'SEND'\n",
        )

    def test_message_id_is_not_allowed(self) -> None:
        assert fails(connected(), make("SEND", {"destination": "/queue/a", "message-id": "1"})) == (
            "Invalid header",
            "'message-id' is not allowed on 'SEND'.\n",
        )

    def test_bad_priority(self) -> None:
        assert (
            fails(connected(), make("SEND", {"destination": "/queue/a", "priority": "high"}))[0]
            == "Invalid header"
        )

    def test_error_carries_the_receipt_id(self) -> None:
        error = error_frame(
            connected().receive_frame(make("SEND", {"destination": "/bogus/x", "receipt": "r-9"}))
        )
        assert error.get("receipt-id") == "r-9"

    def test_error_without_receipt_has_no_receipt_id(self) -> None:
        error = error_frame(connected().receive_frame(make("SEND", {"destination": "/bogus/x"})))
        assert not error.has("receipt-id")


# --------------------------------------------------------------------------------------------------------
# SUBSCRIBE


class TestSubscribe:
    """STOMP 1.2 — SUBSCRIBE; rabbitmq-stomp.md (c.2) and (b.2) note 3"""

    def test_subscription_with_id(self) -> None:
        session = connected()
        action = only(
            session.receive_frame(
                make(
                    "SUBSCRIBE", {"id": "sub-0", "destination": "/exchange/ticks/NASDAQ.AAPL", "receipt": "r"}
                )
            ),
            Subscribe,
        )
        assert isinstance(action, Subscribe)
        sub = action.subscription
        assert (sub.key, sub.id, sub.consumer_tag, sub.ack) == ("T_sub-0", "sub-0", "T_sub-0", "auto")
        assert sub.destination == Destination(
            "exchange", "ticks", "NASDAQ.AAPL", "/exchange/ticks/NASDAQ.AAPL"
        )
        assert (sub.plan.exchange, sub.plan.binding_key) == ("ticks", "NASDAQ.AAPL")
        assert sub.prefetch_count is None
        assert sub.consumer_arguments == {}
        assert sub.pending == {}
        assert action.receipt == receipt("r")
        assert session.subscriptions == {"T_sub-0": sub}

    def test_subscription_without_id(self) -> None:
        """(b.2) note 3: without an id (STOMP 1.0 style) the key and consumer tag are Q_<destination>."""
        sub = subscribe(connected("1.0"), {"destination": "/queue/a"})
        assert (sub.key, sub.id, sub.consumer_tag) == ("Q_/queue/a", None, "Q_/queue/a")
        assert sub.plan.queue == "a"

    @pytest.mark.parametrize("ack", ["auto", "client", "client-individual"])
    def test_ack_modes(self, ack: str) -> None:
        sub = subscribe(connected(), {"id": "1", "destination": "/queue/a", "ack": ack})
        assert sub.ack == ack

    def test_ack_defaults_to_auto(self) -> None:
        assert subscribe(connected(), {"id": "1", "destination": "/queue/a"}).ack == "auto"

    def test_invalid_ack_mode(self) -> None:
        message, body = fails(
            connected(), make("SUBSCRIBE", {"id": "1", "destination": "/queue/a", "ack": "CLIENT"})
        )
        assert message == "Invalid header"
        assert body == "'ack' must be auto, client or client-individual, got 'CLIENT'\n"

    @pytest.mark.parametrize(("value", "count"), [("0", 0), ("1", 1), ("250", 250), ("65535", 65535)])
    def test_prefetch_count(self, value: str, count: int) -> None:
        sub = subscribe(connected(), {"id": "1", "destination": "/queue/a", "prefetch-count": value})
        assert sub.prefetch_count == count

    @pytest.mark.parametrize("value", ["-1", "65536", "abc", "", "1.5"])
    def test_bad_prefetch_count(self, value: str) -> None:
        frame = make("SUBSCRIBE", {"id": "1", "destination": "/queue/a", "prefetch-count": value})
        assert fails(connected(), frame) == (
            "Invalid header",
            f"'prefetch-count' must be an integer 0..65535, got {value!r}\n",
        )

    def test_x_priority(self) -> None:
        sub = subscribe(connected(), {"id": "1", "destination": "/queue/a", "x-priority": "10"})
        assert sub.consumer_arguments == {"x-priority": 10}

    def test_bad_x_priority(self) -> None:
        frame = make("SUBSCRIBE", {"id": "1", "destination": "/queue/a", "x-priority": "high"})
        assert fails(connected(), frame) == (
            "Invalid header",
            "'x-priority' must be an integer, got 'high'\n",
        )

    @pytest.mark.parametrize(
        ("headers", "shared"),
        [
            ({"destination": "/topic/t"}, True),
            ({"destination": "/exchange/x/k"}, True),
            ({"destination": "/topic/t", "ack": "client"}, False),
            ({"destination": "/topic/t", "ack": "client-individual"}, False),
            ({"destination": "/topic/t", "durable": "true"}, False),
            ({"destination": "/topic/t", "x-queue-name": "mine"}, False),
            ({"destination": "/topic/t", "x-max-length": "5"}, False),
            ({"destination": "/queue/q"}, False),
            ({"destination": "/amq/queue/q"}, False),
        ],
    )
    def test_shared_only_when_shareable_and_auto(self, headers: dict[str, str], shared: bool) -> None:
        sub = subscribe(connected(), {"id": "1", **headers})
        assert sub.shared is shared
        assert sub.shared == (sub.plan.shareable and sub.ack == "auto")

    def test_shared_fanout_can_be_turned_off(self) -> None:
        sub = subscribe(
            connected(settings=SessionSettings(shared_fanout=False)), {"id": "1", "destination": "/topic/t"}
        )
        assert sub.plan.shareable is False
        assert sub.shared is False
        assert sub.plan.exchange == "amq.topic"

    def test_durable_topic_subscription(self) -> None:
        sub = subscribe(connected(), {"id": "1", "destination": "/topic/t", "durable": "true"})
        assert sub.plan.durable_subscription
        assert sub.plan.queue == durable_subscription_queue_name("t", "1")

    def test_durable_subscription_needs_an_id(self) -> None:
        assert fails(connected(), make("SUBSCRIBE", {"destination": "/topic/t", "durable": "true"})) == (
            "Missing Header",
            "Header 'id' is required for durable subscriptions",
        )

    def test_duplicate_id(self) -> None:
        session = connected()
        subscribe(session, {"id": "1", "destination": "/queue/a"})
        assert fails(session, make("SUBSCRIBE", {"id": "1", "destination": "/queue/b"})) == (
            "Duplicated subscription identifier",
            "A subscription identified by 'T_1' already exists.",
        )

    def test_duplicate_destination_without_id(self) -> None:
        session = connected("1.0")
        subscribe(session, {"destination": "/queue/a"})
        assert fails(session, make("SUBSCRIBE", {"destination": "/queue/a"})) == (
            "Duplicated subscription identifier",
            "A subscription identified by 'Q_/queue/a' already exists.",
        )

    def test_id_and_destination_keys_do_not_collide(self) -> None:
        session = connected()
        subscribe(session, {"id": "Q_/queue/a", "destination": "/queue/b"})
        sub = subscribe(session, {"destination": "/queue/a"})
        assert sub.consumer_tag == "Q_/queue/a"

    def test_max_subscriptions(self) -> None:
        session = connected(settings=SessionSettings(max_subscriptions=2))
        subscribe(session, {"id": "1", "destination": "/queue/a"})
        subscribe(session, {"id": "2", "destination": "/queue/a"})
        message, body = fails(session, make("SUBSCRIBE", {"id": "3", "destination": "/queue/a"}))
        assert message == "Too many subscriptions"
        assert (
            body
            == "A session may hold at most 2 subscriptions, temporary reply queues included (setting --max-subscriptions)\n"
        )

    def test_unsubscribe_frees_a_slot(self) -> None:
        session = connected(settings=SessionSettings(max_subscriptions=1))
        subscribe(session, {"id": "1", "destination": "/queue/a"})
        only(session.receive_frame(make("UNSUBSCRIBE", {"id": "1"})), Unsubscribe)
        subscribe(session, {"id": "1", "destination": "/queue/a"})

    def test_id_may_not_start_with_temp_queue(self) -> None:
        assert fails(connected(), make("SUBSCRIBE", {"id": "/temp-queue/x", "destination": "/queue/a"})) == (
            "Invalid header",
            "Subscription id '/temp-queue/x' may not start with '/temp-queue/'\n",
        )

    def test_missing_destination(self) -> None:
        assert fails(connected(), make("SUBSCRIBE", {"id": "1"})) == (
            "Missing destination",
            "\"SUBSCRIBE\" must include a 'destination' header\n",
        )

    def test_temp_queue_destination(self) -> None:
        assert fails(connected(), make("SUBSCRIBE", {"id": "1", "destination": "/temp-queue/x"})) == (
            "Invalid destination",
            "'/temp-queue/x' is not a valid destination for 'SUBSCRIBE'\n",
        )

    def test_failed_subscribe_records_nothing(self) -> None:
        session = connected()
        fails(session, make("SUBSCRIBE", {"id": "1", "destination": "/bogus/x"}))
        assert session.subscriptions == {}


# --------------------------------------------------------------------------------------------------------
# UNSUBSCRIBE


class TestUnsubscribe:
    """STOMP 1.2 — UNSUBSCRIBE; rabbitmq-stomp.md (b.2) note 4"""

    def test_by_id(self) -> None:
        session = connected()
        sub = subscribe(session, {"id": "1", "destination": "/queue/a"})
        actions = session.receive_frame(make("UNSUBSCRIBE", {"id": "1", "receipt": "r"}))
        assert actions == [Unsubscribe(sub, None, receipt("r"))]
        assert session.subscriptions == {}

    def test_by_destination(self) -> None:
        session = connected("1.0")
        sub = subscribe(session, {"destination": "/queue/a"})
        assert session.receive_frame(make("UNSUBSCRIBE", {"destination": "/queue/a"})) == [
            Unsubscribe(sub, None, None)
        ]
        assert session.subscriptions == {}

    def test_id_wins_over_destination(self) -> None:
        session = connected()
        sub = subscribe(session, {"id": "1", "destination": "/queue/a"})
        actions = session.receive_frame(make("UNSUBSCRIBE", {"id": "1", "destination": "/queue/zzz"}))
        assert actions == [Unsubscribe(sub, None, None)]

    def test_unknown_id(self) -> None:
        assert fails(connected(), make("UNSUBSCRIBE", {"id": "nope"})) == (
            "No subscription found",
            "UNSUBSCRIBE must refer to an existing subscription.\nSubscription to \"id='nope'\" not found.\n",
        )

    def test_unknown_destination(self) -> None:
        session = connected()
        subscribe(session, {"id": "1", "destination": "/queue/a"})  # has an id: not found by destination
        assert fails(session, make("UNSUBSCRIBE", {"destination": "/queue/a"})) == (
            "No subscription found",
            "UNSUBSCRIBE must refer to an existing subscription.\n"
            "Subscription to \"destination='/queue/a'\" not found.\n",
        )

    def test_neither_id_nor_destination(self) -> None:
        assert fails(connected(), make("UNSUBSCRIBE", {"receipt": "r"})) == (
            "Missing destination or id",
            "UNSUBSCRIBE must include a 'destination' or 'id' header",
        )

    def test_durable_topic_unsubscribe_deletes_the_queue(self) -> None:
        session = connected()
        sub = subscribe(session, {"id": "1", "destination": "/topic/t", "durable": "true"})
        action = only(session.receive_frame(make("UNSUBSCRIBE", {"id": "1", "durable": "true"})), Unsubscribe)
        assert isinstance(action, Unsubscribe)
        assert action.delete_queue == durable_subscription_queue_name("t", "1") == sub.plan.queue

    def test_persistent_is_an_alias_of_durable(self) -> None:
        session = connected()
        subscribe(session, {"id": "1", "destination": "/topic/t", "persistent": "true"})
        action = only(
            session.receive_frame(make("UNSUBSCRIBE", {"id": "1", "persistent": "true"})), Unsubscribe
        )
        assert isinstance(action, Unsubscribe)
        assert action.delete_queue == durable_subscription_queue_name("t", "1")

    @pytest.mark.parametrize(
        ("destination", "unsubscribe_headers"),
        [
            ("/topic/t", {}),  # no durable header on the UNSUBSCRIBE: keep the queue
            ("/queue/q", {"durable": "true"}),  # only /topic subscriptions are deleted
            ("/exchange/x/k", {"durable": "true"}),
        ],
    )
    def test_no_delete(self, destination: str, unsubscribe_headers: dict[str, str]) -> None:
        session = connected()
        subscribe(session, {"id": "1", "destination": destination, "durable": "true"})
        action = only(
            session.receive_frame(make("UNSUBSCRIBE", {"id": "1", **unsubscribe_headers})), Unsubscribe
        )
        assert isinstance(action, Unsubscribe)
        assert action.delete_queue is None

    def test_pending_acks_are_forgotten(self) -> None:
        session = connected()
        sub = subscribe(session, {"id": "1", "destination": "/queue/a", "ack": "client"})
        session.deliver(sub, delivery(1))
        session.receive_frame(make("UNSUBSCRIBE", {"id": "1"}))
        assert fails(session, ack_frame(session, f"T_1@@{SESSION_ID}@@1")) == (
            "Invalid header",
            '"ACK" must include a valid "id" header\n',
        )


# --------------------------------------------------------------------------------------------------------
# MESSAGE


class TestMessage:
    """STOMP 1.2 — MESSAGE; rabbitmq-stomp.md (c.3) delivery headers"""

    def test_message_frame(self) -> None:
        session = connected()
        sub = subscribe(session, {"id": "sub-0", "destination": "/exchange/ticks/NASDAQ.AAPL"})
        properties = MessageProperties(content_type="application/json", headers={"x-source": "feed"})
        template = session.deliver(
            sub,
            delivery(7, exchange="ticks", routing_key="NASDAQ.AAPL", body=b'{"p":1}', properties=properties),
        )
        data = session.render(sub, template)
        assert data == (
            b"MESSAGE\n"
            b"subscription:sub-0\n"
            b"destination:/exchange/ticks/NASDAQ.AAPL\n"
            b"message-id:T_sub-0@@session-test@@7\n"
            b"redelivered:false\n"
            b"content-type:application/json\n"
            b"x-source:feed\n"
            b"content-length:7\n"
            b'\n{"p":1}\x00'
        )
        assert sub.pending == {}  # auto: nothing to acknowledge

    @pytest.mark.parametrize("ack", ["client", "client-individual"])
    def test_ack_header_for_stomp_1_2_client_modes(self, ack: str) -> None:
        session = connected("1.2")
        sub = subscribe(session, {"id": "s", "destination": "/queue/a", "ack": ack})
        message = Frame.parse(session.render(sub, session.deliver(sub, delivery(3, redelivered=True))))
        message_id = f"T_s@@{SESSION_ID}@@3"
        assert message.command == "MESSAGE"
        assert message.get("subscription") == "s"
        assert message.get("destination") == "/queue/a"
        assert message.get("message-id") == message_id
        assert message.get("ack") == message_id
        assert message.get("redelivered") == "true"
        assert message.get("content-length") == "5"
        assert message.body == b"hello"
        assert sub.pending == {message_id: 3}

    @pytest.mark.parametrize("version", ["1.0", "1.1"])
    def test_no_ack_header_before_1_2(self, version: str) -> None:
        session = connected(version)
        sub = subscribe(session, {"id": "s", "destination": "/queue/a", "ack": "client"})
        message = Frame.parse(session.render(sub, session.deliver(sub, delivery(1))), version)
        assert not message.has("ack")
        assert message.get("message-id") == f"T_s@@{SESSION_ID}@@1"

    def test_no_ack_header_in_auto_mode(self) -> None:
        session = connected()
        sub = subscribe(session, {"id": "s", "destination": "/queue/a"})
        assert not Frame.parse(session.render(sub, session.deliver(sub, delivery(1)))).has("ack")

    def test_no_subscription_header_without_id(self) -> None:
        session = connected("1.0")
        sub = subscribe(session, {"destination": "/queue/a"})
        message = Frame.parse(session.render(sub, session.deliver(sub, delivery(1))), "1.0")
        assert not message.has("subscription")
        assert message.get("message-id") == f"Q_/queue/a@@{SESSION_ID}@@1"

    def test_destination_is_rebuilt_from_the_delivery(self) -> None:
        """(b.3): the MESSAGE destination comes from the delivery, not from the subscription."""
        session = connected()
        sub = subscribe(session, {"id": "s", "destination": "/topic/stocks.*.AAPL"})
        template = session.deliver(sub, delivery(1, exchange="amq.topic", routing_key="stocks.NYSE.AAPL"))
        assert Frame.parse(session.render(sub, template)).get("destination") == "/topic/stocks.NYSE.AAPL"


# --------------------------------------------------------------------------------------------------------
# ACK / NACK


def client_session(
    version: str = "1.2", ack: str = "client", sub_id: str = "s"
) -> tuple[Session, Subscription]:
    session = connected(version)
    return session, subscribe(session, {"id": sub_id, "destination": "/queue/a", "ack": ack})


def deliver_tags(session: Session, sub: Subscription, *tags: int) -> list[str]:
    """Deliver messages with these delivery tags; return their message ids."""
    ids = []
    for tag in tags:
        template = session.deliver(sub, delivery(tag))
        ids.append(template.headers[1][1])
        assert template.headers[1][0] == "message-id"
    return ids


class TestAck:
    """STOMP 1.2 — ACK, NACK; rabbitmq-stomp.md (c.2) ack modes and (c.4)"""

    def test_ack_by_id_in_1_2(self) -> None:
        session, sub = client_session("1.2", "client-individual")
        (message_id,) = deliver_tags(session, sub, 1)
        actions = session.receive_frame(make("ACK", {"id": message_id, "receipt": "r"}))
        assert actions == [Ack(sub, (1,), nack=False, requeue=True, receipt=receipt("r"))]

    @pytest.mark.parametrize("version", ["1.0", "1.1"])
    def test_ack_by_message_id_before_1_2(self, version: str) -> None:
        session, sub = client_session(version, "client-individual")
        (message_id,) = deliver_tags(session, sub, 1)
        assert fails(session, make("ACK", {"id": message_id})) == (
            "Missing header",
            '"ACK" must include the "message-id" header\n',
        )
        session, sub = client_session(version, "client-individual")
        (message_id,) = deliver_tags(session, sub, 1)
        assert session.receive_frame(make("ACK", {"message-id": message_id})) == [
            Ack(sub, (1,), False, True, None)
        ]

    def test_client_mode_is_cumulative(self) -> None:
        session, sub = client_session(ack="client")
        first, second, third = deliver_tags(session, sub, 1, 2, 3)
        assert acknowledge(session, second).delivery_tags == (1, 2)
        assert list(sub.pending) == [third]
        assert acknowledge(session, third).delivery_tags == (3,)
        assert sub.pending == {}
        assert fails(session, ack_frame(session, first))[0] == "Invalid header"  # already acknowledged

    def test_cumulative_ack_stays_in_its_subscription(self) -> None:
        session = connected()
        sub_a = subscribe(session, {"id": "a", "destination": "/queue/a", "ack": "client"})
        sub_b = subscribe(session, {"id": "b", "destination": "/queue/b", "ack": "client"})
        (a1,) = deliver_tags(session, sub_a, 1)
        (b2,) = deliver_tags(session, sub_b, 2)
        (a3,) = deliver_tags(session, sub_a, 3)
        action = acknowledge(session, a3)
        assert (action.subscription, action.delivery_tags) == (sub_a, (1, 3))
        assert list(sub_b.pending) == [b2]
        action = acknowledge(session, b2)
        assert (action.subscription, action.delivery_tags) == (sub_b, (2,))
        assert a1 not in sub_a.pending

    def test_client_individual_acks_one(self) -> None:
        session, sub = client_session(ack="client-individual")
        first, second, third = deliver_tags(session, sub, 1, 2, 3)
        assert acknowledge(session, second).delivery_tags == (2,)
        assert list(sub.pending) == [first, third]
        assert acknowledge(session, third).delivery_tags == (3,)
        assert acknowledge(session, first).delivery_tags == (1,)

    @pytest.mark.parametrize(
        ("extra", "requeue"),
        [
            ({}, True),
            ({"requeue": "false"}, False),
            ({"requeue": "true"}, True),
            ({"requeue": "False"}, False),  # what Python clients send, as RabbitMQ accepts
            ({"requeue": "True"}, True),
            ({"requeue": "FALSE"}, True),  # anything else is the default
            ({"requeue": "no"}, True),
        ],
    )
    def test_nack_requeue(self, extra: dict[str, str], requeue: bool) -> None:
        session, sub = client_session(ack="client-individual")
        (message_id,) = deliver_tags(session, sub, 1)
        action = acknowledge(session, message_id, "NACK", **extra)
        assert (action.nack, action.requeue, action.delivery_tags) == (True, requeue, (1,))

    def test_nack_in_client_mode_is_cumulative(self) -> None:
        session, sub = client_session(ack="client")
        _, second = deliver_tags(session, sub, 1, 2)
        assert acknowledge(session, second, "NACK").delivery_tags == (1, 2)

    @pytest.mark.parametrize("command", ["ACK", "NACK"])
    def test_unknown_id(self, command: str) -> None:
        session, sub = client_session()
        deliver_tags(session, sub, 1)
        assert fails(session, make(command, {"id": "T_s@@other-session@@1", "receipt": "r"})) == (
            "Invalid header",
            f'"{command}" must include a valid "id" header\n',
        )

    @pytest.mark.parametrize("command", ["ACK", "NACK"])
    def test_missing_id(self, command: str) -> None:
        session, _ = client_session()
        assert fails(session, make(command)) == ("Missing header", f'"{command}" must include the "id" header\n')

    def test_double_ack(self) -> None:
        session, sub = client_session(ack="client-individual")
        (message_id,) = deliver_tags(session, sub, 1)
        acknowledge(session, message_id)
        assert fails(session, ack_frame(session, message_id)) == (
            "Invalid header",
            '"ACK" must include a valid "id" header\n',
        )

    def test_ack_in_auto_mode(self) -> None:
        session, sub = client_session(ack="auto")
        (message_id,) = deliver_tags(session, sub, 1)
        assert fails(session, ack_frame(session, message_id))[0] == "Invalid header"


# --------------------------------------------------------------------------------------------------------
# Transactions


def transaction_session() -> tuple[Session, Subscription, str]:
    """A session with a client-individual subscription and one pending message (its id returned)."""
    session, sub = client_session(ack="client-individual")
    (message_id,) = deliver_tags(session, sub, 1)
    return session, sub, message_id


class TestTransactions:
    """STOMP 1.2 — BEGIN, COMMIT, ABORT"""

    def test_buffered_until_commit_then_as_without_transaction(self) -> None:
        session, _, message_id = transaction_session()
        twin, _, _ = transaction_session()
        send_headers = {"destination": "/queue/q", "persistent": "true", "x-app": "1"}
        plain = twin.receive_frame(make("SEND", send_headers, b"m")) + twin.receive_frame(
            make("ACK", {"id": message_id})
        )

        assert session.receive_frame(make("BEGIN", {"transaction": "t"})) == []
        assert session.receive_frame(make("SEND", {**send_headers, "transaction": "t"}, b"m")) == []
        assert session.receive_frame(make("ACK", {"id": message_id, "transaction": "t"})) == []
        committed = session.receive_frame(make("COMMIT", {"transaction": "t", "receipt": "c"}))

        # The same actions as without a transaction, the publishes confirmed, and the RECEIPT after the
        # confirms (a Barrier), as for a SEND's RECEIPT.
        assert [type(action) for action in committed] == [Publish, Ack, Barrier]
        publish = committed[0]
        assert isinstance(publish, Publish)
        assert publish == dataclasses.replace(plain[0], confirm=True)  # type: ignore[type-var]
        assert committed[1] == plain[1]
        assert committed[2] == Barrier(receipt("c"))
        assert "transaction" not in publish.properties.headers
        assert session.transactions == {}

    def test_receipts_of_the_transactions_frames_come_with_the_commit(self) -> None:
        session, _, message_id = transaction_session()
        assert session.receive_frame(make("BEGIN", {"transaction": "t", "receipt": "b"})) == [
            SendFrame(receipt("b"))
        ]
        send_frame = make("SEND", {"destination": "/queue/q", "transaction": "t", "receipt": "s"})
        assert session.receive_frame(send_frame) == []
        assert session.receive_frame(make("NACK", {"id": message_id, "transaction": "t", "receipt": "n"})) == []
        committed = session.receive_frame(make("COMMIT", {"transaction": "t", "receipt": "c"}))
        assert [type(action) for action in committed] == [Publish, Ack, Barrier]
        publish, ack, barrier = committed
        assert isinstance(publish, Publish) and publish.receipt == receipt("s")  # sent after its confirm
        assert isinstance(ack, Ack) and ack.receipt == receipt("n")
        assert barrier == Barrier(receipt("c"))  # and COMMIT's after all of them

    def test_an_aborted_transactions_frames_get_no_receipt(self) -> None:
        session, _, _ = transaction_session()
        session.receive_frame(make("BEGIN", {"transaction": "t"}))
        assert session.receive_frame(make("SEND", {"destination": "/queue/q", "transaction": "t", "receipt": "s"})) == []
        assert session.receive_frame(make("ABORT", {"transaction": "t"})) == []

    def test_abort_drops_the_frames(self) -> None:
        session, sub, message_id = transaction_session()
        session.receive_frame(make("BEGIN", {"transaction": "t"}))
        session.receive_frame(make("SEND", {"destination": "/queue/q", "transaction": "t"}))
        session.receive_frame(make("ACK", {"id": message_id, "transaction": "t"}))
        assert session.receive_frame(make("ABORT", {"transaction": "t", "receipt": "a"})) == [
            SendFrame(receipt("a"))
        ]
        assert session.transactions == {}
        assert list(sub.pending) == [message_id]  # the aborted ACK never happened
        assert acknowledge(session, message_id).delivery_tags == (1,)
        assert fails(session, make("COMMIT", {"transaction": "t"})) == (
            "Bad transaction",
            'Invalid transaction identifier: "t"\n',
        )

    def test_transactions_are_independent(self) -> None:
        session = connected()
        session.receive_frame(make("BEGIN", {"transaction": "t1"}))
        session.receive_frame(make("BEGIN", {"transaction": "t2"}))
        session.receive_frame(make("SEND", {"destination": "/queue/one", "transaction": "t1"}))
        session.receive_frame(make("SEND", {"destination": "/queue/two", "transaction": "t2"}))
        session.receive_frame(make("ABORT", {"transaction": "t1"}))
        committed = session.receive_frame(make("COMMIT", {"transaction": "t2"}))
        assert [action.routing_key for action in committed if isinstance(action, Publish)] == ["two"]

    @pytest.mark.parametrize("command", ["COMMIT", "ABORT"])
    def test_unknown_transaction(self, command: str) -> None:
        assert fails(connected(), make(command, {"transaction": "nope"})) == (
            "Bad transaction",
            'Invalid transaction identifier: "nope"\n',
        )

    @pytest.mark.parametrize("command", ["SEND", "ACK", "NACK"])
    def test_frame_in_unknown_transaction(self, command: str) -> None:
        frame = make(command, {"destination": "/queue/a", "id": "x", "transaction": "nope", "receipt": "r"})
        session = connected()
        error = error_frame(session.receive_frame(frame))
        assert (error.get("message"), error.body) == (
            "Bad transaction",
            b'Invalid transaction identifier: "nope"\n',
        )
        assert error.get("receipt-id") == "r"

    @pytest.mark.parametrize("command", ["BEGIN", "COMMIT", "ABORT"])
    def test_missing_transaction_header(self, command: str) -> None:
        assert fails(connected(), make(command)) == (
            "Missing transaction",
            f"\"{command}\" must include a 'transaction' header\n",
        )

    def test_duplicate_begin(self) -> None:
        session = connected()
        session.receive_frame(make("BEGIN", {"transaction": "t"}))
        assert fails(session, make("BEGIN", {"transaction": "t"})) == (
            "Bad transaction",
            'Transaction "t" has already begun\n',
        )

    def test_transaction_id_is_reusable_after_commit(self) -> None:
        session = connected()
        for _ in range(2):
            assert session.receive_frame(make("BEGIN", {"transaction": "t"})) == []
            assert session.receive_frame(make("COMMIT", {"transaction": "t"})) == []

    def test_max_transactions(self) -> None:
        session = connected(settings=SessionSettings(max_transactions=2))
        session.receive_frame(make("BEGIN", {"transaction": "t1"}))
        session.receive_frame(make("BEGIN", {"transaction": "t2"}))
        assert fails(session, make("BEGIN", {"transaction": "t3"})) == (
            "Too many transactions",
            "A session may hold at most 2 open transactions (setting --max-transactions)\n",
        )

    def test_max_transactions_counts_open_ones(self) -> None:
        session = connected(settings=SessionSettings(max_transactions=1))
        session.receive_frame(make("BEGIN", {"transaction": "t1"}))
        session.receive_frame(make("COMMIT", {"transaction": "t1"}))
        assert session.receive_frame(make("BEGIN", {"transaction": "t2"})) == []

    def test_max_transaction_frames(self) -> None:
        session = connected(settings=SessionSettings(max_transaction_frames=2))
        session.receive_frame(make("BEGIN", {"transaction": "t"}))
        for _ in range(2):
            assert session.receive_frame(make("SEND", {"destination": "/queue/a", "transaction": "t"})) == []
        assert fails(session, make("SEND", {"destination": "/queue/a", "transaction": "t"})) == (
            "Transaction too large",
            "A transaction may buffer at most 2 frames (setting --max-transaction-frames)\n",
        )

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            ({}, ("Missing destination", "\"SEND\" must include a 'destination' header\n")),
            (
                {"destination": "/temp-queue/x"},
                ("Invalid destination", "'/temp-queue/x' is not a valid destination for 'SEND'\n"),
            ),
            (
                {"destination": "/queue/a", "message-id": "1"},
                ("Invalid header", "'message-id' is not allowed on 'SEND'.\n"),
            ),
            (
                {"destination": "/bogus/x"},
                ("Unknown destination", "'/bogus/x' is not a valid destination.\n" + UNKNOWN_TAIL),
            ),
        ],
    )
    def test_bad_send_fails_where_it_was_sent(
        self, headers: dict[str, str], expected: tuple[str, str]
    ) -> None:
        session = connected()
        session.receive_frame(make("BEGIN", {"transaction": "t"}))
        assert fails(session, make("SEND", {**headers, "transaction": "t"})) == expected

    def test_bad_queue_argument_fails_where_it_was_sent(self) -> None:
        session = connected()
        session.receive_frame(make("BEGIN", {"transaction": "t"}))
        actions = session.receive_frame(
            make("SEND", {"destination": "/queue/a", "x-max-length": "ten", "transaction": "t"})
        )
        assert error_of(actions) == (
            "Invalid header",
            "'x-max-length' must be a signed 64-bit integer, got 'ten'\n",
        )

    def test_disconnect_drops_open_transactions(self) -> None:
        session = connected()
        session.receive_frame(make("BEGIN", {"transaction": "t"}))
        session.receive_frame(make("SEND", {"destination": "/queue/a", "transaction": "t"}))
        assert session.receive_frame(make("DISCONNECT")) == [Disconnect(None)]
        assert session.transactions == {}


# --------------------------------------------------------------------------------------------------------
# DISCONNECT


class TestDisconnect:
    """STOMP 1.2 — DISCONNECT (graceful shutdown with a receipt)"""

    def test_disconnect_with_receipt(self) -> None:
        session = connected()
        assert session.receive_frame(make("DISCONNECT", {"receipt": "77"})) == [Disconnect(receipt("77"))]
        assert session.state is State.CLOSED

    def test_disconnect_without_receipt(self) -> None:
        session = connected()
        assert session.receive_frame(make("DISCONNECT")) == [Disconnect(None)]

    def test_nothing_after_disconnect(self) -> None:
        session = connected()
        session.receive_frame(make("DISCONNECT"))
        assert session.receive_frame(make("SEND", {"destination": "/queue/a"})) == []
        assert session.receive_frame(make("DISCONNECT", {"receipt": "again"})) == []
        assert session.receive_frame(make("WRONGCOMMAND")) == []


# --------------------------------------------------------------------------------------------------------
# MessageTemplate


BASE_HEADERS = [("destination", "/queue/a"), ("message-id", "m-1"), ("redelivered", "false")]


class TestMessageTemplate:
    """STOMP 1.2 — Value Encoding; a delivery serialized once per version family"""

    def test_serialized_once_per_family(self) -> None:
        template = MessageTemplate(list(BASE_HEADERS), b"body")
        first = template.render("1.2", "s1")
        second = template.render("1.1", "s2", "ack-1")
        tail = template._tail("1.2")
        assert template._tail("1.2") is tail  # the cached object, not a new serialization
        assert first.endswith(tail)
        assert second.endswith(tail)
        assert len(template._tails) == 1  # 1.1 and 1.2 escape alike: one family
        template.render("1.0", "s1")
        assert len(template._tails) == 2

    def test_equal_subscription_ids_share_the_bytes(self) -> None:
        template = MessageTemplate(list(BASE_HEADERS), b"body")
        assert template.render("1.2", "sub-0") is template.render("1.1", "sub-0")
        assert template.render("1.2", "sub-1") != template.render("1.2", "sub-0")

    def test_render_is_repeatable(self) -> None:
        template = MessageTemplate(list(BASE_HEADERS), b"body")
        assert template.render("1.2", "s", "a") == template.render("1.2", "s", "a")

    def test_per_session_headers_come_first(self) -> None:
        template = MessageTemplate(list(BASE_HEADERS), b"")
        assert template.render("1.2", "sub-1", "ack-1") == (
            b"MESSAGE\nsubscription:sub-1\nack:ack-1\ndestination:/queue/a\nmessage-id:m-1\nredelivered:false\n\n\x00"
        )
        assert template.render("1.2", None) == (
            b"MESSAGE\ndestination:/queue/a\nmessage-id:m-1\nredelivered:false\n\n\x00"
        )

    def test_escaping_stomp_1_2(self) -> None:
        template = MessageTemplate([*BASE_HEADERS, ("x:note", "a:b\nc\\d\re")], b"")
        data = template.render("1.2", "s:1")
        assert b"subscription:s\\c1\n" in data
        assert b"x\\cnote:a\\cb\\nc\\\\d\\re\n" in data
        assert Frame.parse(data, "1.2").get("x:note") == "a:b\nc\\d\re"

    def test_escaping_stomp_1_0(self) -> None:
        """1.0 has no escaping: ':' and '\\' stay, but LF and CR are never written raw."""
        template = MessageTemplate([*BASE_HEADERS, ("x-note", "a:b\nc\\d\re")], b"")
        data = template.render("1.0", "s:1")
        assert b"subscription:s:1\n" in data
        assert b"x-note:a:b\\nc\\d\\re\n" in data

    def test_text_body(self) -> None:
        template = MessageTemplate(list(BASE_HEADERS), "h\u00e9".encode())
        assert template.is_text is True
        assert b"content-length:3\n" in template.render("1.2", "s")

    def test_binary_body(self) -> None:
        template = MessageTemplate(list(BASE_HEADERS), b"\xff\x00\xfe")
        assert template.is_text is False
        data = template.render("1.2", "s")
        assert data.endswith(b"content-length:3\n\n\xff\x00\xfe\x00")
        assert Frame.parse(data).body == b"\xff\x00\xfe"

    def test_empty_body_has_no_content_length(self) -> None:
        template = MessageTemplate(list(BASE_HEADERS), b"")
        assert template.is_text is True
        data = template.render("1.2", "s")
        assert b"content-length" not in data
        assert data.endswith(b"redelivered:false\n\n\x00")

    def test_given_content_length_is_replaced(self) -> None:
        template = MessageTemplate([*BASE_HEADERS, ("content-length", "999")], b"abc")
        data = template.render("1.2", "s")
        assert data.count(b"content-length") == 1
        assert b"content-length:3\n" in data


# --------------------------------------------------------------------------------------------------------
# Robustness


HEADER_NAMES = [
    "accept-version", "heart-beat", "login", "passcode", "host", "destination", "id", "ack", "receipt",
    "transaction", "prefetch-count", "x-priority", "durable", "persistent", "auto-delete", "exclusive",
    "message-id", "requeue", "x-queue-name", "reply-to", "x-max-length", "x-queue-type", "priority",
    "timestamp", "content-type", "content-length",
]  # fmt: skip
INTERESTING_VALUES = [
    "", "1", "0", "-1", "65536", "true", "false", "True", "auto", "client", "client-individual",
    "1.0", "1.1", "1.2", "1.0,1.2", "9.9", "0,0", "10,20", "x,y", "-5,5",
    "/queue/a", "/topic/t", "/exchange/x/k", "/amq/queue/q", "/reply-queue/r", "/temp-queue/t", "/bogus/x",
    "/queue/", "a", "t", "sub-1", "quorum", "T_sub-1@@s@@1", "T_sub-1@@s@@2", "Q_/queue/a@@s@@1",
]  # fmt: skip
# Parsed frames never carry lone surrogates (headers are decoded UTF-8, commands visible ASCII).
TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
COMMANDS = st.sampled_from(
    [*CLIENT_COMMANDS, "WRONGCOMMAND", "send", "MESSAGE", "CONNECTED", "ERROR", "RECEIPT"]
)
FRAMES = st.builds(
    Frame,
    COMMANDS,
    st.lists(
        st.tuples(st.sampled_from(HEADER_NAMES), st.sampled_from(INTERESTING_VALUES) | TEXT), max_size=5
    ).map(tuple),
    st.binary(max_size=8),
)
# The connection layer's part: the broker's yes to CONNECT, and deliveries to every subscription.
STEPS = st.lists(FRAMES | st.sampled_from(["authenticated", "deliver"]), max_size=14)


class TestRobustness:
    """STOMP 1.2 — ERROR: whatever the client sends, the session answers with actions, never an exception"""

    @settings(max_examples=300, deadline=None)
    @given(steps=STEPS)
    def test_receive_frame_never_raises(self, steps: list[Frame | str]) -> None:
        session = Session(session_id="s")
        closed = False
        tag = 0
        for step in steps:
            if step == "authenticated":
                if session.state is State.AUTHENTICATING:
                    session.authenticated()
                continue
            if step == "deliver":
                for sub in list(session.subscriptions.values()):
                    tag += 1
                    assert session.render(sub, session.deliver(sub, delivery(tag))).startswith(b"MESSAGE\n")
                continue
            assert isinstance(step, Frame)
            actions = session.receive_frame(step)
            assert isinstance(actions, list)
            assert all(isinstance(action, ACTION_TYPES) for action in actions)
            if closed:
                assert actions == []
                continue
            if any(isinstance(action, Close) for action in actions):
                assert len(actions) == 1  # an ERROR replaces whatever the frame would have done
                closed = True
            if any(isinstance(action, Disconnect) for action in actions):
                closed = True
            assert (session.state is State.CLOSED) == closed


class TestResourceLimits:
    """Every broker resource a client can make a session create is bounded."""

    def test_temp_queues_count_as_subscriptions(self) -> None:
        session = connected(settings=SessionSettings(max_subscriptions=2))
        for name in ("a", "b"):
            only(
                session.receive_frame(
                    make("SEND", {"destination": "/queue/q", "reply-to": f"/temp-queue/{name}"})
                ),
                Publish,
            )
        again = session.receive_frame(make("SEND", {"destination": "/queue/q", "reply-to": "/temp-queue/a"}))
        assert isinstance(again[0], Publish)  # the same temp queue again costs nothing
        closed = session.receive_frame(make("SEND", {"destination": "/queue/q", "reply-to": "/temp-queue/c"}))
        assert isinstance(closed[0], Close) and closed[0].error is not None
        assert closed[0].error.get("message") == "Too many subscriptions"

    def test_consumer_tag_must_fit_an_amqp_short_string(self) -> None:
        session = connected()
        actions = session.receive_frame(make("SUBSCRIBE", {"destination": "/topic/x", "id": "i" * 300}))
        assert isinstance(actions[0], Close) and actions[0].error is not None
        assert actions[0].error.get("message") == "Invalid header"

    def test_transaction_bytes_are_bounded(self) -> None:
        session = connected(settings=SessionSettings(max_transaction_bytes=10))
        session.receive_frame(make("BEGIN", {"transaction": "t"}))
        assert (
            session.receive_frame(make("SEND", {"destination": "/queue/q", "transaction": "t"}, b"x" * 6))
            == []
        )
        actions = session.receive_frame(
            make("SEND", {"destination": "/queue/q", "transaction": "t"}, b"x" * 6)
        )
        assert isinstance(actions[0], Close) and actions[0].error is not None
        assert actions[0].error.get("message") == "Transaction too large"

    def test_committed_bytes_are_given_back(self) -> None:
        session = connected(settings=SessionSettings(max_transaction_bytes=10))
        for _ in range(3):
            session.receive_frame(make("BEGIN", {"transaction": "t"}))
            session.receive_frame(make("SEND", {"destination": "/queue/q", "transaction": "t"}, b"x" * 8))
            actions = session.receive_frame(make("COMMIT", {"transaction": "t"}))
            assert isinstance(actions[0], Publish)


# --------------------------------------------------------------------------------------------------------
# Continuity headers (issue 14): what a SUBSCRIBE asks of its shared binding, and what its RECEIPT says


class TestContinuity:
    def test_the_headers_become_the_subscriptions_request(self) -> None:
        session = connected()
        sub = subscribe(
            session,
            {"destination": "/topic/t", "id": "1", "x-last-value": "true", "x-recover-from": "Ab-_9x:42",
             "x-conflate": "250"},
        )
        assert sub.continuity is not None
        assert (sub.continuity.last_value, sub.continuity.recover_from, sub.continuity.conflate_ms) == (
            True, ("Ab-_9x", 42), 250,
        )
        assert sub.shared

    def test_without_the_headers_nothing_changes(self) -> None:
        sub = subscribe(connected(), {"destination": "/topic/t", "id": "1"})
        assert sub.continuity is None and not sub.gateway_acks and sub.broker_no_ack

    def test_a_continuity_subscription_is_shared_even_with_shared_fanout_off(self) -> None:
        session = connected(settings=SessionSettings(shared_fanout=False))
        assert not subscribe(session, {"destination": "/topic/t", "id": "1"}).shared
        assert subscribe(session, {"destination": "/topic/t", "id": "2", "x-conflate": "10"}).shared

    def test_x_last_value_false_asks_for_nothing_retained(self) -> None:
        sub = subscribe(connected(), {"destination": "/exchange/x/k", "id": "1", "x-last-value": "false"})
        assert sub.continuity is not None and not sub.continuity.last_value

    @pytest.mark.parametrize(
        "headers",
        [
            {"destination": "/queue/q", "x-recover-from": "e:1"},
            {"destination": "/amq/queue/q", "x-conflate": "10"},
            {"destination": "/topic/t", "x-last-value": "true", "durable": "true"},
            {"destination": "/topic/t", "x-last-value": "true", "x-queue-name": "mine"},
            {"destination": "/topic/t", "x-last-value": "true", "x-message-ttl": "1000"},
            {"destination": "/topic/t", "x-last-value": "true", "ack": "client-individual"},
        ],
    )
    def test_only_shared_bindings_serve_them(self, headers: dict[str, str]) -> None:
        message, body = fails(connected(), make("SUBSCRIBE", {"id": "1", **headers}))
        assert message == "Invalid header"
        assert "apply to ack:auto subscriptions to /exchange or /topic" in body

    def test_the_longest_conflation_is_the_setting(self) -> None:
        session = connected(settings=SessionSettings(max_conflate_interval=2.0))
        assert subscribe(session, {"destination": "/topic/t", "id": "1", "x-conflate": "2000"}).continuity
        message, body = fails(session, make("SUBSCRIBE", {"destination": "/topic/t", "id": "2", "x-conflate": "2001"}))
        assert message == "Invalid header" and "1..2000 ms (setting --max-conflate-interval)" in body

    def test_the_receipt_says_what_the_subscription_got(self) -> None:
        session = connected()
        base = receipt("r")
        assert session.subscription_receipt(base, HandOver()) == base
        assert session.subscription_receipt(None, HandOver(True, None)) is None
        got = session.subscription_receipt(base, HandOver(recovered=False, last_value=True))
        assert got is not None
        assert got.headers == (("receipt-id", "r"), ("x-recovered", "false"), ("x-last-value", "true"))


class TestStreamOffset:
    @pytest.mark.parametrize(
        ("value", "argument"),
        [
            ("first", "first"),
            ("last", "last"),
            ("next", "next"),
            ("offset=0", 0),
            ("offset=12345", 12345),
            ("timestamp=1700000000", datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC)),
        ],
    )
    def test_each_form_becomes_rabbitmqs_consumer_argument(self, value: str, argument: object) -> None:
        sub = subscribe(connected(), {"destination": "/amq/queue/s", "id": "1", "x-stream-offset": value})
        assert sub.consumer_arguments["x-stream-offset"] == argument

    def test_ack_auto_means_the_gateway_acks_with_a_prefetch(self) -> None:
        session = connected(settings=SessionSettings(stream_prefetch=7))
        sub = subscribe(session, {"destination": "/queue/s", "id": "1", "x-stream-offset": "first"})
        assert sub.ack == "auto" and sub.gateway_acks and not sub.broker_no_ack
        assert sub.prefetch_count == 7
        own = subscribe(
            session, {"destination": "/queue/s", "id": "2", "x-stream-offset": "first", "prefetch-count": "3"}
        )
        assert own.prefetch_count == 3
        message = session.render(sub, session.deliver(sub, delivery(1)))
        assert b"\nack:" not in message  # nothing for the client to acknowledge

    def test_a_stream_declared_by_the_subscribe_is_acked_by_the_gateway_too(self) -> None:
        sub = subscribe(connected(), {"destination": "/queue/s", "id": "1", "x-queue-type": "stream"})
        assert sub.gateway_acks and sub.prefetch_count == SessionSettings().stream_prefetch
        assert "x-stream-offset" not in sub.consumer_arguments  # RabbitMQ's default: next

    def test_client_ack_stays_the_clients(self) -> None:
        sub = subscribe(
            connected(), {"destination": "/queue/s", "id": "1", "x-stream-offset": "last", "ack": "client"}
        )
        assert not sub.gateway_acks and sub.prefetch_count is None

    @pytest.mark.parametrize("value", ["", "FIRST", "offset=", "offset=-1", "offset=x", "timestamp=soon", "when=1"])
    def test_other_values_are_an_error(self, value: str) -> None:
        message, body = fails(connected(), make("SUBSCRIBE", {"destination": "/queue/s", "x-stream-offset": value}))
        assert message == "Invalid header" and "'x-stream-offset' must be first, last, next" in body


# A broker node goes away (issue 12): move the session when that loses nothing, else ERROR naming why not

NODE_GONE = ConnectionLostWithNode(
    "RabbitMQ closed the gateway's connection: 320 CONNECTION_FORCED - broker forced connection closure with "
    "reason 'shutdown'"
)


def _delivery(tag: int) -> Delivery:
    return Delivery("T_1", tag, "", "q", False, b"x", MessageProperties())


class TestNodeLoss:
    def test_a_session_of_auto_ack_subscriptions_moves(self) -> None:
        session = connected()
        for destination in ("/topic/a", "/queue/b", "/amq/queue/c", "/exchange/amq.direct/d"):
            session.receive_frame(make("SUBSCRIBE", {"destination": destination, "id": destination}))
        reattach = only(session.broker_lost(NODE_GONE), Reattach)
        assert isinstance(reattach, Reattach) and reattach.error is NODE_GONE
        assert session.state is State.CONNECTED

    def test_a_client_ack_subscription_with_nothing_unacknowledged_moves(self) -> None:
        session = connected()
        session.receive_frame(make("SUBSCRIBE", {"destination": "/queue/b", "id": "1", "ack": "client"}))
        only(session.broker_lost(NODE_GONE), Reattach)

    @pytest.mark.parametrize(
        ("setup", "cause"),
        [
            ([make("SUBSCRIBE", {"destination": "/queue/b", "id": "1", "ack": "client"})], "subscription '1' holds 1 unacknowledged message(s)"),
            ([make("BEGIN", {"transaction": "tx"})], "transaction 'tx' is open"),
            ([make("SEND", {"destination": "/queue/r", "reply-to": "/temp-queue/x"})], "the temporary queue behind '/temp-queue/x' was deleted"),
            ([make("SUBSCRIBE", {"destination": "/queue/e", "id": "2", "exclusive": "true"})], "subscription '2' consumes the exclusive queue 'e', which was deleted"),
            ([make("SEND", {"destination": "/queue/s", "exclusive": "true"})], "the exclusive queue 's' was deleted"),
        ],
    )
    def test_a_session_that_would_lose_something_gets_an_error_naming_it(self, setup: list[Frame], cause: str) -> None:
        session = connected()
        for frame in setup:
            session.receive_frame(frame)
        if session.subscriptions.get("T_1") is not None:
            session.deliver(session.subscriptions["T_1"], _delivery(7))
        message, body = error_of(session.broker_lost(NODE_GONE))
        assert message == "connection_forced"
        assert body.startswith(NODE_GONE.text)
        assert f"The session could not move to another node: {cause}" in body
        assert session.state is State.CLOSED

    def test_before_the_login_or_once_closed_it_is_an_ordinary_failure(self) -> None:
        session = connecting()
        session.receive_frame(make("CONNECT", {"accept-version": "1.2"}))
        assert error_of(session.broker_lost(NODE_GONE))[0] == "connection_forced"
        assert session.broker_lost(NODE_GONE) == []


class TestQueueType:
    def quorum(self) -> Session:
        return connected(settings=SessionSettings(queue_type="quorum"))

    def test_quorum_is_the_default_type_of_queue_declarations(self) -> None:
        session = self.quorum()
        subscribe = only(session.receive_frame(make("SUBSCRIBE", {"destination": "/queue/q", "id": "1"})), Subscribe)
        assert isinstance(subscribe, Subscribe) and subscribe.subscription.plan.declaration is not None
        assert subscribe.subscription.plan.declaration.arguments == {"x-queue-type": "quorum"}
        publish = only(session.receive_frame(make("SEND", {"destination": "/queue/q"})), Publish)
        assert isinstance(publish, Publish) and publish.declare is not None
        assert publish.declare.arguments == {"x-queue-type": "quorum"}

    def test_a_header_wins_and_what_quorum_cannot_be_stays_classic(self) -> None:
        session = self.quorum()
        for headers in ({"x-queue-type": "classic"}, {"durable": "false"}, {"auto-delete": "true"}):
            publish = only(session.receive_frame(make("SEND", {"destination": "/queue/q", **headers})), Publish)
            assert isinstance(publish, Publish) and publish.declare is not None
            assert publish.declare.arguments.get("x-queue-type") in (None, "classic"), headers
        subscribe = only(session.receive_frame(make("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})), Subscribe)
        assert isinstance(subscribe, Subscribe) and subscribe.subscription.plan.declaration is not None
        assert "x-queue-type" not in subscribe.subscription.plan.declaration.arguments

    def test_classic_by_default(self) -> None:
        publish = only(connected().receive_frame(make("SEND", {"destination": "/queue/q"})), Publish)
        assert isinstance(publish, Publish) and publish.declare is not None
        assert publish.declare.arguments == {}
