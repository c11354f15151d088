"""The per-connection write gate of the AMQP connection: which frames of a channel may go on the wire, and when a
channel number may be used again (AMQP 0-9-1 section 4.2.6 and RabbitMQ's 504 CHANNEL_ERROR rules)."""

from __future__ import annotations

import pamqp.frame
from pamqp import commands as spec

from gateway.broker.amqp_connection import WriteGate


def payload(number: int, method: object) -> bytes:
    return pamqp.frame.marshal(method, number)  # type: ignore[arg-type]


CLOSE = spec.Channel.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
CLOSE_OK = spec.Channel.CloseOk()
ACK = spec.Basic.Ack(delivery_tag=1)
DECLARE = spec.Queue.Declare(queue="q")


def test_an_open_channel_writes_everything() -> None:
    gate = WriteGate(2047)
    number = gate.take({})
    assert number == 1
    assert gate.admit(1, payload(1, ACK)) and gate.admit(1, payload(1, DECLARE))


def test_numbers_go_round_robin_and_skip_busy_ones() -> None:
    gate = WriteGate(4)
    busy = {3: None}  # the connection knows a channel 3 the gate never handed out
    assert [gate.take(busy), gate.take(busy), gate.take(busy)] == [1, 2, 4]
    assert gate.take(busy) is None


class TestClosedByTheClient:
    def test_nothing_after_our_close_but_a_close_ok(self) -> None:
        gate = WriteGate(2047)
        gate.take({})
        assert gate.admit(1, payload(1, CLOSE))
        assert not gate.admit(1, payload(1, ACK))
        assert not gate.admit(1, payload(1, CLOSE))  # a second close (after a time-out)
        assert gate.take({}) == 2  # not reused while the handshake runs

    def test_reused_only_after_the_brokers_close_ok(self) -> None:
        gate = WriteGate(2)
        gate.take({})
        gate.admit(1, payload(1, CLOSE))
        gate.take({})
        assert gate.take({}) is None
        gate.received(1, close=False)  # the broker's close-ok
        assert not gate.admit(1, payload(1, ACK))  # the old channel's stragglers stay off the wire
        assert gate.take({}) == 1
        assert gate.admit(1, payload(1, ACK))  # the new channel on the same number


class TestClosedByTheBroker:
    def test_only_the_close_ok_answers_the_brokers_close(self) -> None:
        gate = WriteGate(2047)
        gate.take({})
        gate.received(1, close=True)
        assert not gate.admit(1, payload(1, ACK))  # RabbitMQ would ignore it; after the close-ok it would not
        assert gate.admit(1, payload(1, CLOSE_OK))
        assert not gate.admit(1, payload(1, CLOSE_OK))
        assert not gate.admit(1, payload(1, DECLARE))

    def test_reused_only_once_our_close_ok_was_written(self) -> None:
        gate = WriteGate(1)
        gate.take({})
        gate.received(1, close=True)
        assert gate.take({}) is None  # our close-ok has not gone out yet: a channel.open now would be fatal
        gate.admit(1, payload(1, CLOSE_OK))
        assert gate.take({}) == 1

    def test_a_lost_close_ok_leaves_the_number_unused(self) -> None:
        gate = WriteGate(1)
        gate.take({})
        gate.received(1, close=True)  # and our close-ok never written (the connection went first)
        assert gate.take({}) is None

    def test_without_the_receivers_report_the_close_ok_itself_tells(self) -> None:
        gate = WriteGate(1)
        gate.take({})
        assert gate.admit(1, payload(1, CLOSE_OK))  # only ever sent in answer to the broker's close
        assert not gate.admit(1, payload(1, ACK))
        assert gate.take({}) == 1


def test_crossing_closes_finish_with_either_close_ok() -> None:
    gate = WriteGate(1)
    gate.take({})
    gate.admit(1, payload(1, CLOSE))
    gate.received(1, close=True)  # the broker closed it at the same moment
    assert gate.admit(1, payload(1, CLOSE_OK))
    assert gate.take({}) == 1
