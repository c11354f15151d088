"""Prometheus metrics of the gateway, one definition each, under the ``stomp_gateway_`` prefix.

The hot paths (per frame, per delivery, per write) only add to plain integers in :data:`TALLY`; :func:`flush`
moves them into the Prometheus counters once a second (and before each scrape), so counting costs the data
path an integer addition. Gauges and the latency histogram are updated where the event happens.

With ``--workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start, every
worker writes its values there (prometheus-client's multiprocess mode), and a scrape of any worker returns
the sum over all of them: counters and histograms summed, gauges summed over the live workers. The
``process_*`` and ``python_*`` series describe the process that answered the scrape.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["MULTIPROCESS", "TALLY", "error_sent", "exposition", "flush", "run_flusher"]

#: prometheus-client's multiprocess mode is on (set by the ``--workers`` supervisor).
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_REGISTRY = CollectorRegistry(auto_describe=True)
disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series say nothing an operator needs


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(f"stomp_gateway_{name}", doc, labels, registry=_REGISTRY)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = (), mode: str = "livesum") -> Gauge:
    return Gauge(f"stomp_gateway_{name}", doc, labels, registry=_REGISTRY, multiprocess_mode=mode)  # type: ignore[arg-type]


CONNECTIONS = _gauge("connections", "Open client connections", ("transport",))
CONNECTIONS_OPENED = _counter("connections_opened", "Client connections accepted", ("transport",))
SESSIONS = _gauge("sessions", "STOMP sessions by state and negotiated version", ("state", "version"))
LOGIN_FAILURES = _counter("login_failures", "CONNECTs refused (credentials, vhost, broker unreachable)")
FRAMES_RECEIVED = _counter("frames_received", "STOMP frames received from clients, by command", ("command",))
FRAMES_SENT = _counter("frames_sent", "STOMP frames sent to clients, by command", ("command",))
MESSAGES_PUBLISHED = _counter("messages_published", "Messages published to the broker (SENDs carried out)")
MESSAGES_DELIVERED = _counter("messages_delivered", "MESSAGE frames written to clients")
BYTES_RECEIVED = _counter("received_bytes", "Bytes of STOMP received from clients")
BYTES_SENT = _counter("sent_bytes", "Bytes written to clients (framing included)")
ERRORS_SENT = _counter("error_frames_sent", "ERROR frames sent to clients, by their message header", ("reason",))
SLOW_CLIENTS = _counter("slow_client_disconnects", "Clients disconnected for falling behind")
CONNECTIONS_REFUSED = _counter(
    "connections_refused",
    "Connections refused at the door, by limit (max_connections, max_connections_per_ip)",
    ("reason",),
)
FRAME_RATE_PAUSES = _counter("frame_rate_pauses", "Times a session's reading paused for --max-frames-per-second")
FRAME_RATE_PAUSED = _counter("frame_rate_paused_seconds", "Seconds sessions' reading paused for --max-frames-per-second")
LIMITS = _gauge("limit", "The limits set at the door (absent: no limit)", ("name",), mode="max")
TOKEN_REFRESHES = _counter("token_refreshes", "Tokens replaced in-band (SEND to /gateway/token)")
TOKENS_EXPIRED = _counter("tokens_expired", "Sessions ended because their token expired")
AMQP_CONNECTIONS = _gauge("amqp_connections", "Pooled AMQP connections open to RabbitMQ")
AMQP_CHANNELS = _gauge("amqp_channels", "AMQP channels open (sessions' own and shared fan-out)")
BROKER_RECONNECTS = _counter("broker_reconnects", "Times the connection to the broker was restored")
SESSIONS_MOVED = _counter(
    "sessions_moved", "Sessions moved to another broker node after their AMQP connection was lost"
)
REPUBLISHED = _counter(
    "republished_messages", "Messages published again on another node because the lost connection took their confirm"
)
BROKER_UP = _gauge("broker_up", "1 while the broker is reachable (the lowest over the workers)", mode="livemin")
FANOUT_GROUPS = _gauge("fanout_groups", "Shared fan-out groups (one broker consumer each)")
FANOUT_SUBSCRIBERS = _gauge("fanout_subscribers", "Subscriptions served by shared fan-out groups")
DELIVERY_LATENCY = Histogram(
    "stomp_gateway_delivery_latency_seconds",
    "From an AMQP delivery's arrival to its MESSAGE being written for the last subscriber "
    "(one delivery in eight of each shared subscription is timed)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=_REGISTRY,
)


#: distinct ERROR reasons counted per process; more are counted as "other" (bounded cardinality)
MAX_ERROR_REASONS = 50
_error_reasons: set[str] = set()


def error_sent(reason: str) -> None:
    if reason not in _error_reasons:
        if len(_error_reasons) >= MAX_ERROR_REASONS:
            reason = "other"
        else:
            _error_reasons.add(reason)
    ERRORS_SENT.labels(reason).inc()


class Tally:
    """Counts of the hot paths, as plain integers until :func:`flush` moves them to the counters."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "frames_received",
        "frames_sent",
        "messages_delivered",
        "messages_published",
    )

    def __init__(self) -> None:
        self.bytes_received = 0
        self.bytes_sent = 0
        self.messages_published = 0
        self.messages_delivered = 0
        self.frames_received: collections.Counter[str] = collections.Counter()
        self.frames_sent: collections.Counter[str] = collections.Counter()


TALLY = Tally()


def flush() -> None:
    """Move the tallies into the Prometheus counters."""
    tally = TALLY
    for counter, attribute in (
        (BYTES_RECEIVED, "bytes_received"),
        (BYTES_SENT, "bytes_sent"),
        (MESSAGES_PUBLISHED, "messages_published"),
        (MESSAGES_DELIVERED, "messages_delivered"),
    ):
        value = getattr(tally, attribute)
        if value:
            setattr(tally, attribute, 0)
            counter.inc(value)
    for labelled, counts in ((FRAMES_RECEIVED, tally.frames_received), (FRAMES_SENT, tally.frames_sent)):
        if counts:
            items = list(counts.items())
            counts.clear()
            for command, n in items:
                labelled.labels(command).inc(n)


async def run_flusher(broker_up: Callable[[], bool], interval: float = 1.0) -> None:
    """Flush the tallies and record whether the broker is up, every ``interval`` seconds, until cancelled."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            BROKER_UP.set(1 if broker_up() else 0)
            flush()
            await asyncio.sleep(interval)


if not MULTIPROCESS:
    ProcessCollector(registry=_REGISTRY)
    PlatformCollector(registry=_REGISTRY)
    GCCollector(registry=_REGISTRY)


def exposition() -> bytes:
    """The text a scrape gets: this process's metrics, or the sum over all workers in multiprocess mode."""
    flush()
    if not MULTIPROCESS:
        return generate_latest(_REGISTRY)
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return generate_latest(registry)

