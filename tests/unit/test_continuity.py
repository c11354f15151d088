"""The continuity data structures (pure): topic matching, retained map, history ring, conflation."""

from __future__ import annotations

import pytest

from gateway.continuity import Conflator, History, RetainedMap, new_epoch, parse_position, topic_matcher

# --- AMQP topic matching (the same answers as RabbitMQ's topic exchange) ---------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("AAPL", "AAPL", True),
        ("AAPL", "MSFT", False),
        ("*", "AAPL", True),
        ("*", "a.b", False),
        ("#", "", True),
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("a.#", "b.a", False),
        ("#.c", "a.b.c", True),
        ("#.c", "c", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.#.c", "a.c", True),
        ("*.#", "", False),
        ("", "", True),
        ("a..b", "a..b", True),
        ("#.*", "a", True),
        ("#.*", "", False),
    ],
)
def test_topic_matcher_follows_amqp_topic_semantics(pattern: str, key: str, matches: bool) -> None:
    assert topic_matcher(pattern)(key) is matches


# --- positions ---------------------------------------------------------------------------------------------


def test_an_epoch_never_contains_a_colon_and_positions_round_trip() -> None:
    for _ in range(200):
        epoch = new_epoch()
        assert ":" not in epoch and len(epoch) == 8
        assert parse_position(f"{epoch}:42") == (epoch, 42)


@pytest.mark.parametrize("text", ["", "abc", ":5", "abc:", "abc:-1", "abc:+1", "abc:1.5", "abc:\u0661", "a:" + "9" * 19])
def test_a_malformed_position_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_position(text)


# --- retained map ------------------------------------------------------------------------------------------


def test_retained_map_keeps_the_newest_item_per_key() -> None:
    retained: RetainedMap[str] = RetainedMap(max_keys=10, max_bytes=1000)
    retained.put("AAPL", "a1", 10)
    retained.put("MSFT", "m1", 10)
    retained.put("AAPL", "a2", 10)
    assert retained.get("AAPL") == "a2"
    assert len(retained) == 2 and retained.bytes == 20
    assert retained.matching("AAPL") == ["a2"]
    assert retained.matching("#") == ["m1", "a2"]  # least recently updated first
    assert retained.matching("GOOG") == []


def test_retained_map_is_bounded_in_keys_dropping_the_least_recently_updated() -> None:
    retained: RetainedMap[int] = RetainedMap(max_keys=3, max_bytes=1000)
    for i in range(5):
        retained.put(f"k{i}", i, 1)
    assert sorted(retained.matching("#")) == [2, 3, 4]
    retained.put("k2", 22, 1)  # k2 is now the newest, k3 the oldest
    retained.put("k5", 5, 1)
    assert retained.get("k3") is None and retained.get("k2") == 22


def test_retained_map_is_bounded_in_bytes_and_never_keeps_a_stale_value_for_an_oversized_one() -> None:
    retained: RetainedMap[str] = RetainedMap(max_keys=100, max_bytes=100)
    retained.put("a", "a", 40)
    retained.put("b", "b", 40)
    retained.put("c", "c", 40)  # 120 > 100: "a" goes
    assert retained.get("a") is None and retained.bytes == 80
    retained.put("b", "huge", 101)  # too large to keep; the older "b" is no longer the last value either
    assert retained.get("b") is None and retained.bytes == 40


# --- history -------------------------------------------------------------------------------------------------


def test_history_numbers_messages_and_gives_everything_after_a_position() -> None:
    history: History[str] = History(max_count=10, max_bytes=1000, ttl=60, epoch="E")
    assert history.position() == "E:0"
    for i in range(1, 6):
        assert history.append(f"m{i}", 1, now=0.0) == i
    assert history.position() == "E:5"
    assert history.since("E", 2, now=1.0) == ["m3", "m4", "m5"]
    assert history.since("E", 0, now=1.0) == ["m1", "m2", "m3", "m4", "m5"]
    assert history.since("E", 5, now=1.0) == []  # up to date: covered, nothing to send


def test_history_does_not_cover_another_epoch_or_a_future_position() -> None:
    history: History[str] = History(max_count=10, max_bytes=1000, ttl=60, epoch="E")
    history.append("m1", 1, now=0.0)
    assert history.since("other", 0, now=0.0) is None
    assert history.since("E", 2, now=0.0) is None


def test_history_bounded_in_count_no_longer_covers_what_it_dropped() -> None:
    history: History[str] = History(max_count=3, max_bytes=1000, ttl=60, epoch="E")
    for i in range(1, 7):
        history.append(f"m{i}", 1, now=0.0)
    assert len(history) == 3
    assert history.since("E", 3, now=0.0) == ["m4", "m5", "m6"]  # m4 is the oldest kept: covered
    assert history.since("E", 2, now=0.0) is None  # m3 was dropped: a gap, so not covered


def test_history_bounded_in_bytes() -> None:
    history: History[str] = History(max_count=100, max_bytes=25, ttl=60, epoch="E")
    for i in range(1, 5):
        history.append(f"m{i}", 10, now=0.0)
    assert len(history) == 2 and history.bytes == 20
    assert history.since("E", 2, now=0.0) == ["m3", "m4"]
    assert history.since("E", 1, now=0.0) is None


def test_history_forgets_messages_older_than_its_ttl() -> None:
    history: History[str] = History(max_count=100, max_bytes=1000, ttl=10, epoch="E")
    history.append("m1", 1, now=0.0)
    history.append("m2", 1, now=5.0)
    assert history.since("E", 0, now=9.0) == ["m1", "m2"]
    assert history.since("E", 0, now=12.0) is None  # m1 expired
    assert history.since("E", 1, now=12.0) == ["m2"]
    assert history.since("E", 1, now=16.0) is None  # m2 expired too
    assert history.since("E", 2, now=16.0) == []  # but whoever saw m2 missed nothing


# --- conflation ----------------------------------------------------------------------------------------------


def test_conflation_sends_the_first_at_once_and_holds_only_the_newest_within_the_interval() -> None:
    c: Conflator[str] = Conflator(interval=1.0, max_interval=10.0)
    assert c.offer("A", "a1", now=0.0) is True
    assert c.offer("A", "a2", now=0.1) is False
    assert c.offer("A", "a3", now=0.2) is False
    assert c.offer("B", "b1", now=0.3) is True  # another key has its own interval
    assert c.next_due() == 1.0
    assert c.take_due(now=0.9) == []
    assert c.take_due(now=1.0) == [("A", "a3")]  # the last of the burst, never lost
    assert c.next_due() is None
    assert c.offer("A", "a4", now=1.5) is False  # sent at 1.0: the next may go at 2.0
    assert c.take_due(now=2.0) == [("A", "a4")]
    assert c.offer("A", "a5", now=3.5) is True


def test_a_lagging_conflator_slows_down_up_to_its_maximum_and_recovers() -> None:
    c: Conflator[str] = Conflator(interval=1.0, max_interval=5.0)
    for _ in range(5):
        c.lagging()
    assert c.current == 5.0
    c.keeping_up()
    assert c.current == 2.5
    for _ in range(5):
        c.keeping_up()
    assert c.current == 1.0


def test_an_item_put_back_does_not_replace_a_newer_one() -> None:
    c: Conflator[str] = Conflator(interval=1.0, max_interval=5.0)
    c.offer("A", "a1", now=0.0)
    c.offer("A", "a2", now=0.5)
    assert c.take_due(now=1.0) == [("A", "a2")]
    c.offer("A", "a3", now=1.2)
    c.hold("A", "a2")  # the write of a2 failed, but a3 is newer
    assert c.take_due(now=2.0) == [("A", "a3")]
