"""Scopes read as RabbitMQ's OAuth 2.0 plugin reads them, and the permissions each STOMP operation needs."""

from __future__ import annotations

import pytest

from gateway.destinations import parse_destination, subscription_plan
from gateway.scopes import Need, Scopes, scopes_from_claim, send_needs, subscribe_needs, wildcard_match


class TestWildcard:
    """rabbitmq_auth_backend_oauth2 ``wildcard:match/2``"""

    @pytest.mark.parametrize(
        ("subject", "pattern", "matches"),
        [
            ("stocks", "stocks", True),
            ("stocks", "stock", False),
            ("stocks", "*", True),
            ("", "*", True),
            ("stocks", "st*", True),
            ("stocks", "*ks", True),
            ("stocks", "s*c*s", True),
            ("stocks", "s**s", True),
            ("stocks", "x*", False),
            ("/", "%2F", True),  # each part is percent-decoded
            ("a b", "a+b", True),
            ("anything", "%zz*", False),  # a bad escape: the pattern matches nothing
            ("aa", "*a", False),  # RabbitMQ's scan takes the first 'a' and never backtracks
            ("ab", "*b", True),
        ],
    )
    def test_match(self, subject: str, pattern: str, matches: bool) -> None:
        assert wildcard_match(subject, pattern) is matches


class TestScopes:
    def test_claim_as_string_or_list(self) -> None:
        assert scopes_from_claim("a b  c") == ["a", "b", "c"]
        assert scopes_from_claim(["a", 1, "b"]) == ["a", "b"]
        assert scopes_from_claim(None) == []

    def test_other_resource_servers_and_malformed_scopes_grant_nothing(self) -> None:
        scopes = Scopes(["other.read:*/*", "rabbitmq.read", "rabbitmq.delete:*/*", "rabbitmq.read:*", "openid"])
        assert not scopes
        assert not scopes.vhost_access("/")

    def test_resource_server_id(self) -> None:
        scopes = Scopes(["api.read:*/q"], "api")
        assert scopes.allows("/", Need("read", "queue", "q"))
        assert not Scopes(["api.read:*/q"]).allows("/", Need("read", "queue", "q"))

    def test_permission_vhost_and_name_must_all_match(self) -> None:
        scopes = Scopes(["rabbitmq.read:%2F/stocks"])
        assert scopes.allows("/", Need("read", "exchange", "stocks"))
        assert not scopes.allows("/", Need("write", "exchange", "stocks"))
        assert not scopes.allows("other", Need("read", "exchange", "stocks"))
        assert not scopes.allows("/", Need("read", "exchange", "stocks2"))
        assert scopes.vhost_access("/") and not scopes.vhost_access("other")

    def test_topic_permission_needs_a_routing_key_pattern(self) -> None:
        assert not Scopes(["rabbitmq.read:*/stocks"]).allows("/", Need("read", "topic", "stocks", "AAPL"))
        with_key = Scopes(["rabbitmq.read:*/stocks/A*"])
        assert with_key.allows("/", Need("read", "topic", "stocks", "AAPL"))
        assert not with_key.allows("/", Need("read", "topic", "stocks", "MSFT"))
        assert with_key.allows("/", Need("read", "exchange", "stocks"))  # a three-part scope grants the name too

    def test_missing_names_the_first_permission_lacking(self) -> None:
        scopes = Scopes(["rabbitmq.write:*/stocks"])
        needs = [Need("write", "exchange", "stocks"), Need("write", "topic", "stocks", "AAPL")]
        assert scopes.missing("/", needs) == needs[1]
        text = needs[1].describe("/")
        assert "write on routing key 'AAPL' of exchange 'stocks' in vhost '/'" in text
        assert "<id>.write:%2F/stocks/AAPL" in text


TOPIC_EXCHANGE = "amq.topic"


def _subscribe(raw: str, **headers: str) -> list[Need]:
    destination = parse_destination(raw)
    plan = subscription_plan(destination, headers, headers.get("id", "s1"), TOPIC_EXCHANGE)
    return subscribe_needs(destination, plan, headers, TOPIC_EXCHANGE)


class TestPermissionTable:
    """The README's table, row by row."""

    def test_send_to_exchange(self) -> None:
        assert send_needs(parse_destination("/exchange/stocks/AAPL"), TOPIC_EXCHANGE) == [
            Need("write", "exchange", "stocks"),
            Need("write", "topic", "stocks", "AAPL"),
        ]

    def test_send_to_topic(self) -> None:
        assert send_needs(parse_destination("/topic/a.b"), TOPIC_EXCHANGE) == [
            Need("write", "exchange", "amq.topic"),
            Need("write", "topic", "amq.topic", "a.b"),
        ]

    def test_send_to_queue_declares_it_and_publishes_to_the_default_exchange(self) -> None:
        assert send_needs(parse_destination("/queue/orders"), TOPIC_EXCHANGE) == [
            Need("configure", "queue", "orders"),
            Need("write", "exchange", "amq.default"),
        ]

    @pytest.mark.parametrize("raw", ["/amq/queue/orders", "/reply-queue/amq.gen-x"])
    def test_send_without_declare(self, raw: str) -> None:
        assert send_needs(parse_destination(raw), TOPIC_EXCHANGE) == [Need("write", "exchange", "amq.default")]

    def test_send_with_a_temp_queue_reply_to(self) -> None:
        needs = send_needs(parse_destination("/queue/q"), TOPIC_EXCHANGE, temp_reply=True)
        assert needs[-2:] == [Need("configure", "queue", "amq.gen-"), Need("read", "queue", "amq.gen-")]

    def test_subscribe_to_exchange(self) -> None:
        assert _subscribe("/exchange/stocks/AAPL") == [
            Need("read", "exchange", "stocks"),
            Need("read", "topic", "stocks", "AAPL"),
        ]

    def test_durable_topic_subscription_owns_a_queue(self) -> None:
        needs = _subscribe("/topic/t", durable="true", id="d1")
        queue = needs[-1].name
        assert queue.startswith("stomp-subscription-")
        assert needs[2:] == [Need("configure", "queue", queue), Need("write", "queue", queue), Need("read", "queue", queue)]

    def test_named_subscription_queue(self) -> None:
        assert Need("configure", "queue", "mine") in _subscribe("/topic/t", **{"x-queue-name": "mine"})

    def test_subscribe_to_queue(self) -> None:
        assert _subscribe("/queue/orders") == [Need("configure", "queue", "orders"), Need("read", "queue", "orders")]

    @pytest.mark.parametrize("raw", ["/amq/queue/orders", "/reply-queue/orders"])
    def test_subscribe_to_existing_queue(self, raw: str) -> None:
        assert _subscribe(raw) == [Need("read", "queue", "orders")]
