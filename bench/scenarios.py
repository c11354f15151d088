"""The four scenarios, driven from the coordinator process.

Each ``run_*`` function takes one target and returns a round result::

    {"metrics": {...}, "lost": int, "errors": int, "error_samples": [...], "cpu": {...}, "params": {...}}

CPU is measured from /proc over the measured window (after warm-up): ``server`` is the process behind
the target's port (the gateway, or RabbitMQ's beam.smp for Web-STOMP), ``rabbitmq`` is the broker behind
the gateway (when it is another process), ``generator`` is the sum over the worker processes and
``generator_max`` the busiest worker, all in % of one core.
"""

from __future__ import annotations

import time
import uuid
from array import array
from dataclasses import dataclass, field
from typing import Any

from bench.pool import Pool
from bench.procs import GatewayProcess, cpu_seconds, process_tree, rss_kib

__all__ = ["Options", "Target", "run_connections", "run_fanout", "run_pipe", "run_rate"]

RUN_ID = uuid.uuid4().hex[:8]


@dataclass
class Options:
    duration: float = 5.0
    warmup: float = 1.0
    body_size: int = 100
    fanout_subscribers: int = 100
    fanout_window: int = 100
    pipe_pairs: int = 4
    pipe_window: int = 100
    pipe_destination: str = "topic"
    rate: float = 200.0
    rate_subscribers: int = 200
    connections: int = 10_000
    connect_concurrency: int = 100
    broadcasts: int = 3
    broadcast_timeout: float = 10.0
    drain_timeout: float = 10.0
    connect_timeout: float = 30.0
    restart_gateway: bool = True
    start_delay: float = 0.3  # seconds between arming a round and its first message
    settle: float = 1.0  # seconds between the last connect and the RSS reading


@dataclass
class Target:
    label: str  # "A" or "B"
    name: str
    url: str
    server_pid: int | None = None
    broker_pid: int | None = None
    gateway: GatewayProcess | None = None
    max_connections: int | None = None
    #: why ``max_connections`` (RabbitMQ's socket limit, the server process's open-files limit)
    max_connections_reason: str = "RabbitMQ's socket limit"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.label} = {self.name} ({self.url})"

    def server_pids(self) -> list[int]:
        """The server process and its descendants (``gateway --workers N`` forks its workers)."""
        return process_tree(self.server_pid) if self.server_pid else []

    def server_rss_kib(self) -> int | None:
        values = [v for v in (rss_kib(p) for p in self.server_pids()) if v is not None]
        return sum(values) if values else None


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class CpuWindow:
    """CPU seconds of the server, the broker and the workers between :meth:`start` and :meth:`stop`."""

    def __init__(self, target: Target, pool: Pool) -> None:
        self.groups: dict[str, list[int]] = {"generator": pool.pids}
        servers = target.server_pids()
        if servers:
            self.groups["server"] = servers
        if target.broker_pid and target.broker_pid not in servers:
            self.groups["rabbitmq"] = [target.broker_pid]
        self._t0 = 0.0
        self._s0: dict[int, float] = {}
        self.result: dict[str, float] = {}

    def _snap(self) -> dict[int, float]:
        out = {}
        for pids in self.groups.values():
            for pid in pids:
                value = cpu_seconds(pid)
                if value is not None:
                    out[pid] = value
        return out

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._s0 = self._snap()

    def stop(self) -> dict[str, float]:
        dt = max(1e-6, time.monotonic() - self._t0)
        s1 = self._snap()
        per_pid = {pid: 100.0 * (s1[pid] - self._s0[pid]) / dt for pid in s1 if pid in self._s0}
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            out[name] = round(sum(per_pid.get(p, 0.0) for p in pids), 1)
        out["generator_max"] = round(max((per_pid.get(p, 0.0) for p in self.groups["generator"]), default=0.0), 1)
        self.result = out
        return out


def per_cpu_second(rate: float, cpu: dict[str, float]) -> int | None:
    """``rate`` per second of the server's CPU (the gateway's, all its processes): comparable across
    machines and loads where a raw rate is not."""
    server = cpu.get("server") or 0.0
    return round(rate / (server / 100.0)) if server > 0 else None


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def _errors(results: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in results:
        out.extend(r.get("errors", []))
    return out


def _close(pool: Pool) -> list[str]:
    return _errors(pool.call_all("close"))


def _subscribe(pool: Pool, target: Target, opts: Options, destination: str, count: int,
               concurrency: int = 50) -> tuple[int, int, list[dict[str, Any]]]:
    shares = _split(count, pool.n)
    results = pool.call_all(
        "subscribe",
        per_worker=[{"count": c} for c in shares],
        url=target.url, destination=destination, concurrency=concurrency, timeout=opts.connect_timeout,
    )
    return sum(r["ok"] for r in results), sum(r["failed"] for r in results), results


def _round_result(metrics: dict[str, Any], lost: int, errors: list[str], cpu: dict[str, float],
                  params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "metrics": metrics, "lost": lost, "errors": len(errors), "error_samples": errors[:10], "cpu": cpu,
        "params": params, **extra,
    }


# -- fanout ----------------------------------------------------------------------------------------------
def run_fanout(pool: Pool, target: Target, opts: Options, tag: str, on_window: Any = None) -> dict[str, Any]:
    """One publisher, N subscribers on one topic, at most W messages not yet received by all."""
    n = opts.fanout_subscribers
    destination = f"/topic/bench.fanout.{RUN_ID}.{tag}"
    ok, failed, _ = _subscribe(pool, target, opts, destination, n)
    errors: list[str] = []
    pool.call_all("track", progress=True)
    cpu = CpuWindow(target, pool)
    start = time.monotonic_ns() + int(opts.start_delay * 1e9)
    warm = start + int(opts.warmup * 1e9)
    end = warm + int(opts.duration * 1e9)
    pool.send(0, "fanout_publish", url=target.url, destination=destination, start_ns=start, warm_ns=warm,
              end_ns=end, window=opts.fanout_window, body_size=opts.body_size, drain_timeout=opts.drain_timeout)
    _sleep_until(warm)
    cpu.start()
    if on_window is not None:
        on_window(opts.duration)
    _sleep_until(end)
    cpu_result = cpu.stop()
    pub = pool.recv(0, wait=opts.warmup + opts.duration + opts.drain_timeout + 60)
    fin = pool.call_all("finish", expected=pub["published"], timeout=opts.drain_timeout)
    errors += _errors(fin)
    errors += _close(pool)
    received = sum(r["received"] for r in fin)
    lost = sum(r["lost"] for r in fin) + failed * pub["published"]
    seconds = (pub["end_t"] - pub["warm_t"]) / 1e9
    completed = pub["end_complete"] - pub["warm_complete"]
    last = max(r["last_arrival"] for r in fin)
    metrics = {
        "deliveries_per_s": round(ok * completed / seconds) if seconds > 0 else 0,
        "messages_per_s": round(completed / seconds) if seconds > 0 else 0,
        "deliveries_per_s_overall": round(received / ((last - start) / 1e9)) if last > start else 0,
        "published": pub["published"],
        "deliveries": received,
        "subscribers": ok,
        "deliveries_per_cpu_s": per_cpu_second(ok * completed / seconds if seconds > 0 else 0, cpu_result),
    }
    if failed:
        errors.insert(0, f"{failed} of {n} subscribers failed to connect/subscribe")
    return _round_result(
        metrics, lost, errors, cpu_result,
        {"subscribers": n, "window": opts.fanout_window, "body_size": opts.body_size,
         "duration": opts.duration, "warmup": opts.warmup},
        duplicates=sum(r["duplicates"] for r in fin), misordered=sum(r["misordered"] for r in fin),
    )


# -- pipe ------------------------------------------------------------------------------------------------
def run_pipe(pool: Pool, target: Target, opts: Options, tag: str, on_window: Any = None) -> dict[str, Any]:
    """P publisher/subscriber pairs, each on its own destination, each windowed."""
    p = opts.pipe_pairs
    if opts.pipe_destination == "queue":
        destinations = [f"/queue/bench.pipe.{RUN_ID}.{tag}.{i}" for i in range(p)]
        extra = "auto-delete:true\n"  # durable (the default) on SEND and SUBSCRIBE alike, gone after the round
    else:
        destinations = [f"/topic/bench.pipe.{RUN_ID}.{tag}.{i}" for i in range(p)]
        extra = ""
    per_worker: list[list[str]] = [[] for _ in range(pool.n)]
    for i, d in enumerate(destinations):
        per_worker[i % pool.n].append(d)
    setup = pool.call_all("pipe_setup", per_worker=[{"destinations": d} for d in per_worker],
                          url=target.url, timeout=opts.connect_timeout, extra_headers=extra)
    errors: list[str] = []
    failed = sum(r["failed"] for r in setup)
    cpu = CpuWindow(target, pool)
    start = time.monotonic_ns() + int(opts.start_delay * 1e9)
    warm = start + int(opts.warmup * 1e9)
    end = warm + int(opts.duration * 1e9)
    for i in range(pool.n):
        pool.send(i, "pipe_run", start_ns=start, warm_ns=warm, end_ns=end, window=opts.pipe_window,
                  body_size=opts.body_size, drain_timeout=opts.drain_timeout)
    _sleep_until(warm)
    cpu.start()
    if on_window is not None:
        on_window(opts.duration)
    _sleep_until(end)
    cpu_result = cpu.stop()
    runs = [pool.recv(i, wait=opts.warmup + opts.duration + opts.drain_timeout + 60) for i in range(pool.n)]
    errors += _errors(runs)
    errors += _close(pool)
    pairs = [pair for r in runs for pair in r["pairs"]]
    rate = sum(pr["measured"] / pr["seconds"] for pr in pairs if pr["seconds"] > 0)
    lost = sum(pr["lost"] for pr in pairs)
    if failed:
        errors.insert(0, f"{failed} of {p} pairs failed to set up")
    metrics = {
        "messages_per_s": round(rate),
        "messages_per_cpu_s": per_cpu_second(rate, cpu_result),
        "published": sum(pr["published"] for pr in pairs),
        "received": sum(pr["received"] for pr in pairs),
        "pairs": len(pairs),
    }
    return _round_result(
        metrics, lost, errors, cpu_result,
        {"pairs": p, "window": opts.pipe_window, "destination": opts.pipe_destination,
         "body_size": opts.body_size, "duration": opts.duration, "warmup": opts.warmup},
        duplicates=sum(pr["duplicates"] for pr in pairs), misordered=sum(pr["misordered"] for pr in pairs),
    )


# -- rate ------------------------------------------------------------------------------------------------
def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k] / 1e6


def run_rate(pool: Pool, target: Target, opts: Options, tag: str, on_window: Any = None) -> dict[str, Any]:
    """R msg/s, open loop, to N subscribers: end-to-end latency from the send time in the body."""
    n = opts.rate_subscribers
    destination = f"/topic/bench.rate.{RUN_ID}.{tag}"
    ok, failed, _ = _subscribe(pool, target, opts, destination, n)
    errors: list[str] = []
    start = time.monotonic_ns() + int(opts.start_delay * 1e9)
    warm = start + int(opts.warmup * 1e9)
    end = warm + int(opts.duration * 1e9)
    pool.call_all("track", latency_from=warm)
    cpu = CpuWindow(target, pool)
    pool.send(0, "rate_publish", url=target.url, destination=destination, start_ns=start, end_ns=end,
              rate=opts.rate, body_size=opts.body_size)
    _sleep_until(warm)
    cpu.start()
    if on_window is not None:
        on_window(opts.duration)
    _sleep_until(end)
    cpu_result = cpu.stop()
    pub = pool.recv(0, wait=opts.warmup + opts.duration + 60)
    fin = pool.call_all("finish", expected=pub["published"], timeout=opts.drain_timeout, latencies=True)
    errors += _errors(fin)
    errors += _close(pool)
    lat = array("q")
    for r in fin:
        lat.frombytes(r["latencies"])
    values = sorted(lat)
    lost = sum(r["lost"] for r in fin) + failed * pub["published"]
    if failed:
        errors.insert(0, f"{failed} of {n} subscribers failed to connect/subscribe")
    metrics = {
        "p50_ms": round(_percentile(values, 0.50), 2),
        "p99_ms": round(_percentile(values, 0.99), 2),
        "max_ms": round(values[-1] / 1e6, 2) if values else float("nan"),
        "samples": len(values),
        "published": pub["published"],
        "deliveries": sum(r["received"] for r in fin),
        "publisher_late_max_ms": round(pub["publisher_late_max_ns"] / 1e6, 2),
        "subscribers": ok,
    }
    return _round_result(
        metrics, lost, errors, cpu_result,
        {"rate": opts.rate, "subscribers": n, "body_size": opts.body_size, "duration": opts.duration,
         "warmup": opts.warmup},
        duplicates=sum(r["duplicates"] for r in fin), misordered=sum(r["misordered"] for r in fin),
    )


# -- connections -----------------------------------------------------------------------------------------
def run_connections(pool: Pool, target: Target, opts: Options, tag: str) -> dict[str, Any]:
    """N idle subscribed connections: connect rate, server memory per connection, broadcast time."""
    n = opts.connections
    notes: list[str] = []
    if target.max_connections is not None and n > target.max_connections:
        notes.append(f"capped at {target.max_connections} connections (asked {n}): {target.max_connections_reason}")
        n = target.max_connections
    if target.gateway is not None and opts.restart_gateway:
        target.gateway.restart()  # a fresh process, so earlier scenarios' heap does not hide the growth
        target.server_pid = target.gateway.pid
        notes.append("gateway restarted before this round (fresh heap)")
    destination = f"/topic/bench.conn.{RUN_ID}.{tag}"
    errors: list[str] = []
    # warm the code paths (imports, first AMQP connection) before the baseline
    _subscribe(pool, target, opts, destination + ".warm", min(10, n))
    errors += _close(pool)
    time.sleep(min(0.5, opts.settle))
    pid = target.server_pid
    rss0 = target.server_rss_kib()
    broker_rss0 = rss_kib(target.broker_pid) if target.broker_pid and target.broker_pid != pid else None
    cpu = CpuWindow(target, pool)
    cpu.start()
    ok, failed, subs = _subscribe(pool, target, opts, destination, n,
                                  concurrency=max(1, opts.connect_concurrency // pool.n))
    connect_cpu = cpu.stop()
    t_first = min(r["t_start"] for r in subs)
    t_last = max(r["t_end"] for r in subs)
    connect_s = max(1e-9, (t_last - t_first) / 1e9)
    time.sleep(opts.settle)
    rss1 = target.server_rss_kib()
    broker_rss1 = rss_kib(target.broker_pid) if broker_rss0 is not None and target.broker_pid else None
    pool.call(0, "open_publisher", url=target.url, timeout=opts.connect_timeout)
    pool.call_all("track")
    times: list[float] = []
    firsts: list[float] = []
    missing_total = 0
    cpu_b = CpuWindow(target, pool)
    cpu_b.start()
    for b in range(1, opts.broadcasts + 1):
        pool.call_all("arm", seq=b)
        sent = pool.call(0, "broadcast", destination=destination, seq=b, body_size=opts.body_size)
        waits = pool.call_all("wait", seq=b, timeout=opts.broadcast_timeout)
        errors += _errors(waits)
        reached = sum(w["reached"] for w in waits)
        missing_total += ok - reached
        last = max(w["last_arrival"] for w in waits)
        first = min((w["first_arrival"] for w in waits if w["first_arrival"]), default=0)
        if first:
            firsts.append((first - sent) / 1e9)
        if reached == ok and last:
            times.append((last - sent) / 1e9)
        else:
            times.append(float("inf"))
            errors.append(f"broadcast {b}: {ok - reached} of {ok} connections did not get it within "
                          f"{opts.broadcast_timeout} s")
        time.sleep(0.2)
    broadcast_cpu = cpu_b.stop()
    errors += _close(pool)
    if failed:
        errors.insert(0, f"{failed} of {n} connections failed to connect/subscribe")
    finite = sorted(t for t in times if t != float("inf"))
    metrics: dict[str, Any] = {
        "connections": ok,
        "connect_per_s": round(ok / connect_s, 1),
        "connect_seconds": round(connect_s, 2),
        "kib_per_connection": round((rss1 - rss0) / ok, 1) if rss0 is not None and rss1 is not None and ok else None,
        "server_rss_before_mib": round(rss0 / 1024, 1) if rss0 is not None else None,
        "server_rss_after_mib": round(rss1 / 1024, 1) if rss1 is not None else None,
        "broker_kib_per_connection": round((broker_rss1 - broker_rss0) / ok, 1)
        if broker_rss0 is not None and broker_rss1 is not None and ok else None,
        "broadcast_ms_worst": round(max(times) * 1000, 1) if times else None,
        "broadcast_ms_median": round(finite[len(finite) // 2] * 1000, 1) if finite else None,
        "broadcast_first_ms_median": round(sorted(firsts)[len(firsts) // 2] * 1000, 1) if firsts else None,
        "broadcast_ms_all": [round(t * 1000, 1) for t in times],
        "broadcast_first_ms_all": [round(t * 1000, 1) for t in firsts],
    }
    return _round_result(
        metrics, missing_total, errors, {**connect_cpu, **{f"broadcast_{k}": v for k, v in broadcast_cpu.items()}},
        {"connections": n, "concurrency": opts.connect_concurrency, "broadcasts": opts.broadcasts},
        notes=notes, connect_cpu=connect_cpu, broadcast_cpu=broadcast_cpu,
    )
