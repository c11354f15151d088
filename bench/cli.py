"""``python -m bench``: run the scenarios against one or two STOMP-over-WebSocket URLs, print a table,
write JSON. See ``python -m bench --help`` and bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.pool import Pool
from bench.procs import (
    GatewayProcess,
    comm,
    ensure_web_stomp,
    machine_info,
    open_files_limit,
    pid_listening_on,
    rabbitmq_socket_headroom,
)
from bench.profile import PySpy, summarize_cprofile, summarize_raw
from bench.scenarios import Options, Target, run_connections, run_fanout, run_pipe, run_rate

__all__ = ["main"]

SCENARIOS = ("fanout", "pipe", "rate", "connections")
WEB_STOMP_URL = "ws://127.0.0.1:15674/ws"

# (key, label, better: "high"/"low"/None, aggregate over rounds: "mean"/"max"/"min")
METRICS: dict[str, list[tuple[str, str, str | None, str]]] = {
    "fanout": [
        ("deliveries_per_s", "deliveries/s (measured window)", "high", "mean"),
        ("messages_per_s", "messages/s fully delivered", "high", "mean"),
        ("deliveries_per_s_overall", "deliveries/s (whole round)", "high", "mean"),
        ("deliveries_per_cpu_s", "deliveries per server CPU-second", "high", "mean"),
        ("subscribers", "subscribers", None, "min"),
    ],
    "pipe": [
        ("messages_per_s", "messages/s (all pairs)", "high", "mean"),
        ("messages_per_cpu_s", "messages per server CPU-second", "high", "mean"),
        ("pairs", "pairs", None, "min"),
    ],
    "rate": [
        ("p50_ms", "latency p50 ms", "low", "mean"),
        ("p99_ms", "latency p99 ms", "low", "mean"),
        ("max_ms", "latency max ms", "low", "max"),
        ("samples", "latency samples", None, "min"),
        ("publisher_late_max_ms", "publisher lateness max ms", "low", "max"),
    ],
    "connections": [
        ("connections", "connections", None, "min"),
        ("connect_per_s", "connects/s", "high", "mean"),
        ("kib_per_connection", "server KiB per connection", "low", "mean"),
        ("server_rss_after_mib", "server RSS MiB (all connected)", "low", "max"),
        ("broker_kib_per_connection", "RabbitMQ KiB per connection", "low", "mean"),
        ("broadcast_first_ms_median", "broadcast, first connection, median ms", "low", "mean"),
        ("broadcast_ms_median", "broadcast to all, median ms", "low", "mean"),
        ("broadcast_ms_worst", "broadcast to all, worst ms", "low", "max"),
    ],
}
CPU_ROWS = [("server", "CPU % server"), ("rabbitmq", "CPU % RabbitMQ (gateway's broker)"),
            ("generator", "CPU % generator (all workers)"), ("generator_max", "CPU % busiest generator worker")]
GENERATOR_SATURATED = 90.0
#: a scenario's figure measures the gateway only while the busiest generator worker stays under this (% of a core)
GENERATOR_HEADROOM = 80.0
SIZE_DEPENDENT = {"server_rss_after_mib", "broadcast_ms_median", "broadcast_ms_worst", "broadcast_first_ms_median"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load generator for STOMP over WebSocket (fanout, pipe, rate, connections). With no "
        "target options it starts the gateway (RabbitMQ backend) as A and compares it with RabbitMQ's "
        f"Web-STOMP at {WEB_STOMP_URL} as B.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t = p.add_argument_group("targets")
    t.add_argument("--url", help="target A (a STOMP-over-WebSocket URL)")
    t.add_argument("--start-gateway", action="store_true",
                   help="start 'python -m gateway' on a free port and use it as target A")
    t.add_argument("--gateway-broker", choices=("rabbitmq", "memory"), default="rabbitmq",
                   help="backend of the started gateway")
    t.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/", help="RabbitMQ for the started gateway")
    t.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the started gateway (repeatable), e.g. --gateway-arg=--no-shared-fanout")
    t.add_argument("--gateway-pid", type=int, help="PID of target A's server (default: found from its port)")
    t.add_argument("--compare", metavar="URL", help="target B, run alternately with A (A B A B ...)")
    t.add_argument("--compare-pid", type=int, help="PID of target B's server (default: found from its port)")
    t.add_argument("--no-compare", action="store_true", help="with the default targets: run A only")
    t.add_argument("--compare-max-connections", type=int,
                   help="cap B's connections scenario (default: RabbitMQ's free sockets minus 60 when B is "
                   "RabbitMQ, else none)")
    s = p.add_argument_group("run")
    s.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    s.add_argument("--rounds", type=int, default=2, help="rounds per target (alternating A B A B)")
    s.add_argument("--duration", type=float, default=5.0, help="measured seconds per round")
    s.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each round's window")
    s.add_argument("--body-size", type=int, default=100, help="message body bytes")
    s.add_argument("--workers", type=int, default=1,
                   help="generator processes (1 is best on a 2-core machine: see bench/RESULTS.md)")
    s.add_argument("--fanout-workers", type=int, default=2,
                   help="generator processes for the fan-out scenario, whose 100 subscribers are the generator's "
                        "heaviest load: with one process it is the bottleneck, with two each has headroom")
    s.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to wait for stragglers after a round")
    s.add_argument("--connect-timeout", type=float, default=30.0, help="seconds for one connect + subscribe")
    s.add_argument("--json", metavar="FILE", help="write all results as JSON")
    s.add_argument("--max-seconds", type=float, default=1800.0,
                   help="watchdog: abort the whole run (and stop what it started) after this many seconds")
    s.add_argument("--log-dir", help="where the started gateway's logs and profiles go (default: a temp dir)")
    s.add_argument("--smoke", action="store_true",
                   help="tiny sizes, ~3 s, embedded-broker gateway started by the tool; exit 1 only on lost "
                   "messages or errors")
    f = p.add_argument_group("scenario sizes")
    f.add_argument("--subscribers", type=int, default=100, help="fanout: subscribers")
    f.add_argument("--window", type=int, default=100, help="fanout: messages in flight (not yet received by all)")
    f.add_argument("--pairs", type=int, default=4, help="pipe: publisher/subscriber pairs")
    f.add_argument("--pipe-window", type=int, default=100, help="pipe: messages in flight per pair")
    f.add_argument("--pipe-destination", choices=("topic", "queue"), default="topic", help="pipe: /topic or /queue")
    f.add_argument("--rate", type=float, default=200.0, help="rate: messages per second")
    f.add_argument("--rate-subscribers", type=int, default=200, help="rate: subscribers")
    f.add_argument("--connections", type=int, default=50_000,
                   help="connections: idle subscribed connections (capped by the server's open-files limit)")
    f.add_argument("--connect-concurrency", type=int, default=100, help="connections: handshakes in progress")
    f.add_argument("--broadcasts", type=int, default=3, help="connections: broadcasts timed")
    s.add_argument("--start-delay", type=float, default=0.3, help="seconds from arming a round to its first message")
    f.add_argument("--settle", type=float, default=1.0, help="connections: seconds before reading the RSS")
    f.add_argument("--no-restart", action="store_true",
                   help="connections: do not restart the started gateway before each of its rounds")
    r = p.add_argument_group("profile")
    r.add_argument("--profile-scenario", choices=("fanout", "pipe", "rate"), default="fanout",
                   help="the scenario of the extra profiled round")
    r.add_argument("--profile", choices=("auto", "py-spy", "cprofile", "none"), default="auto",
                   help="after the rounds, profile target A during one extra fanout round (auto: py-spy when A's "
                   "PID is known and this is not --smoke; cprofile restarts the started gateway under cProfile)")
    return p


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        duration=args.duration, warmup=args.warmup, body_size=args.body_size,
        fanout_subscribers=args.subscribers, fanout_window=args.window,
        pipe_pairs=args.pairs, pipe_window=args.pipe_window, pipe_destination=args.pipe_destination,
        rate=args.rate, rate_subscribers=args.rate_subscribers,
        connections=args.connections, connect_concurrency=args.connect_concurrency, broadcasts=args.broadcasts,
        drain_timeout=args.drain_timeout, connect_timeout=args.connect_timeout, restart_gateway=not args.no_restart,
        settle=args.settle, start_delay=args.start_delay,
    )


def apply_smoke(args: argparse.Namespace) -> None:
    args.start_gateway = True
    args.gateway_broker = "memory"
    args.url = None
    args.compare = None
    args.no_compare = True
    args.rounds = 1
    args.workers = 1
    args.fanout_workers = 1
    args.duration = 0.4
    args.warmup = 0.1
    args.subscribers = 5
    args.window = 20
    args.pairs = 2
    args.pipe_window = 20
    args.rate = 50
    args.rate_subscribers = 5
    args.connections = 50
    args.connect_concurrency = 25
    args.broadcasts = 1
    args.no_restart = True
    args.settle = 0.1
    args.start_delay = 0.1
    args.drain_timeout = 5.0
    args.connect_timeout = 5.0
    if args.profile == "auto":
        args.profile = "none"


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or 80


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _aggregate(values: list[Any], how: str) -> Any:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return None
    if how == "max":
        return max(nums)
    if how == "min":
        return min(nums)
    return sum(nums) / len(nums)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.opts = options_from(args)
        self.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        for s in self.scenarios:
            if s not in SCENARIOS:
                raise SystemExit(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
        self.log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="bench-"))
        self.gateway: GatewayProcess | None = None
        self.targets: list[Target] = []
        self.pool: Pool | None = None
        self.results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.notes: list[str] = []
        self.profile: dict[str, Any] | None = None

    # -- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        args = self.args
        amqp_port = urlsplit(args.amqp_url).port or 5672
        rabbit_pid = pid_listening_on(amqp_port)
        if args.start_gateway:
            self.gateway = GatewayProcess(args.gateway_broker, args.amqp_url, args.gateway_arg, self.log_dir)
            self.gateway.start()
            name = f"gateway ({'RabbitMQ' if args.gateway_broker == 'rabbitmq' else 'embedded'} broker)"
            a = Target("A", name, self.gateway.url, server_pid=self.gateway.pid,
                       broker_pid=rabbit_pid if args.gateway_broker == "rabbitmq" else None, gateway=self.gateway)
            a.notes.append("started by bench: " + " ".join(self.gateway.command()[1:]))
        else:
            pid = args.gateway_pid or pid_listening_on(_port(args.url))
            name = self._name_for(pid, "A")
            a = Target("A", name, args.url, server_pid=pid, broker_pid=rabbit_pid)
            if pid is None:
                a.notes.append("server PID unknown: no server CPU/RSS figures")
        if a.server_pid is not None:
            files = open_files_limit(a.server_pid)
            if files is not None and files - FILES_KEPT < args.connections:
                a.max_connections = files - FILES_KEPT
                a.max_connections_reason = (
                    f"the server process may open {files} files (its RLIMIT_NOFILE, which this machine does not let "
                    "the bench raise further)"
                )
        self.targets.append(a)
        if args.compare:
            port = _port(args.compare)
            host = urlsplit(args.compare).hostname or "127.0.0.1"
            if port == 15674:
                ensure_web_stomp(host, port, self.notes)
            pid = args.compare_pid or pid_listening_on(port)
            b = Target("B", self._name_for(pid, "B"), args.compare, server_pid=pid, broker_pid=rabbit_pid)
            cap = args.compare_max_connections
            if cap is None and pid is not None and comm(pid).startswith("beam"):
                headroom = rabbitmq_socket_headroom()
                cap = max(10, headroom - 60) if headroom is not None else 750
                b.notes.append(f"RabbitMQ socket headroom {headroom}: connections scenario capped at {cap}")
            b.max_connections = cap
            self.targets.append(b)
        self.pool = Pool(args.workers)
        self.pools: dict[int, Pool] = {}  # other sizes (--fanout-workers), made on first use

    def _pool_size(self, scenario: str) -> int:
        return int(self.args.fanout_workers if scenario == "fanout" else self.args.workers)

    def _pool(self, scenario: str) -> Pool:
        n = self._pool_size(scenario)
        if n == self.args.workers:
            assert self.pool is not None
            return self.pool
        if n not in self.pools:
            self.pools[n] = Pool(n)
        return self.pools[n]

    @staticmethod
    def _name_for(pid: int | None, label: str) -> str:
        if pid is None:
            return label
        c = comm(pid)
        if c.startswith("beam"):
            return "RabbitMQ Web-STOMP"
        if c.startswith("python"):
            return "gateway"
        return c

    # -- running ---------------------------------------------------------------------------------------
    def run(self) -> None:
        assert self.pool is not None
        runners = {"fanout": run_fanout, "pipe": run_pipe, "rate": run_rate, "connections": run_connections}
        for scenario in self.scenarios:
            self.results[scenario] = {t.label: [] for t in self.targets}
            for r in range(1, self.args.rounds + 1):
                for target in self.targets:
                    tag = f"{target.label}{r}"
                    started = time.monotonic()
                    failed = False
                    try:
                        result = runners[scenario](self._pool(scenario), target, self.opts, tag)
                    except Exception as error:
                        failed = True
                        result = {"metrics": {}, "lost": 0, "errors": 1, "cpu": {}, "params": {},
                                  "error_samples": [f"round failed: {error}"],
                                  "traceback": traceback.format_exc() + getattr(error, "remote_traceback", "")}
                        print(result["traceback"], file=sys.stderr, flush=True)
                    if failed:  # outside the except block: forked workers must not inherit the exception
                        self._recover(scenario)
                    result["round"] = r
                    result["seconds"] = round(time.monotonic() - started, 1)
                    self.results[scenario][target.label].append(result)
                    self._progress_line(scenario, target, r, result)

    def _recover(self, scenario: str) -> None:
        """After a failed round: fresh workers (their state is unknown)."""
        n = self._pool_size(scenario)
        if n != self.args.workers:
            pool = self.pools.pop(n, None)
            if pool is not None:
                pool.close()
            return  # made again on next use
        assert self.pool is not None
        try:
            self.pool.close()
        finally:
            self.pool = Pool(self.args.workers)

    def _progress_line(self, scenario: str, target: Target, r: int, result: dict[str, Any]) -> None:
        m = result["metrics"]
        keys = [k for k, _, better, _ in METRICS[scenario] if better is not None][:3]
        shown = " ".join(f"{k}={_fmt(m.get(k))}" for k in keys)
        cpu = result.get("cpu", {})
        cpu_txt = " ".join(f"{k}={_fmt(cpu.get(k))}%" for k, _ in CPU_ROWS if k in cpu)
        print(f"[{scenario}] {target.label} round {r}: {shown} lost={result['lost']} errors={result['errors']} "
              f"| CPU {cpu_txt} ({result['seconds']} s)", flush=True)
        for sample in result.get("error_samples", [])[:3]:
            print(f"    error: {sample}", flush=True)

    def run_profile(self) -> None:
        mode = self.args.profile
        a = self.targets[0]
        scenario = self.args.profile_scenario
        runner = {"fanout": run_fanout, "pipe": run_pipe, "rate": run_rate}[scenario]
        if mode == "none" or scenario not in self.scenarios:
            return
        if mode == "auto":
            if a.server_pid is None or not comm(a.server_pid).startswith("python"):
                return
            mode = "py-spy"
        assert self.pool is not None
        out = self.log_dir / f"{self.args.profile_scenario}-profile.txt"
        print(f"[profile] one extra {scenario} round on A with {mode} (not counted in the figures)", flush=True)
        if mode == "cprofile":
            self.profile = self._run_cprofile(a, runner)
            return
        assert a.server_pid is not None
        spy = PySpy(a.server_pid, out)

        def on_window(seconds: float) -> None:
            spy.start(seconds)

        result = runner(self._pool(scenario), a, self.opts, "P", on_window=on_window)
        ok = spy.wait()
        if not ok:
            print(f"[profile] py-spy failed ({spy.error}); falling back to cProfile", flush=True)
            if self.gateway is not None:
                self.profile = self._run_cprofile(a, runner)
            return
        summary = summarize_raw(out)
        summary.update({"tool": "py-spy record --format raw --rate 200 --nonblocking", "file": str(out),
                        "scenario": scenario,
                        "round": {"metrics": result["metrics"], "cpu": result.get("cpu"), "lost": result["lost"],
                                  "errors": result["errors"]}})
        self.profile = summary

    def _run_cprofile(self, a: Target, runner: Any) -> dict[str, Any] | None:
        if self.gateway is None:
            print("[profile] cProfile needs a gateway started by bench (--start-gateway)", flush=True)
            return None
        assert self.pool is not None
        stats = self.log_dir / "gateway.pstats"
        self.gateway.stop()
        self.gateway.profile_cprofile = stats
        self.gateway.start(self.gateway.port)
        a.server_pid = self.gateway.pid
        result = runner(self._pool(self.args.profile_scenario), a, self.opts, "C")
        self.gateway.stop()
        self.gateway.profile_cprofile = None
        self.gateway.start(self.gateway.port)
        a.server_pid = self.gateway.pid
        if not stats.exists():
            print("[profile] cProfile wrote no stats", flush=True)
            return None
        summary = summarize_cprofile(stats)
        summary.update({"tool": "python -m cProfile (whole process lifetime)", "file": str(stats),
                        "scenario": self.args.profile_scenario, "round": {"metrics": result["metrics"]}})
        return summary

    # -- reporting -------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for scenario, by_target in self.results.items():
            agg: dict[str, dict[str, Any]] = {}
            for label, rounds in by_target.items():
                row: dict[str, Any] = {}
                for key, _, _, how in METRICS[scenario]:
                    row[key] = _aggregate([r["metrics"].get(key) for r in rounds], how)
                for key, _ in CPU_ROWS:
                    row["cpu_" + key] = _aggregate([r.get("cpu", {}).get(key) for r in rounds], "mean")
                row["lost"] = sum(r["lost"] for r in rounds)
                row["errors"] = sum(r["errors"] for r in rounds)
                row["generator_saturated_rounds"] = sum(
                    1 for r in rounds if (r.get("cpu", {}).get("generator_max") or 0) >= GENERATOR_SATURATED)
                agg[label] = row
            ratios: dict[str, float | None] = {}
            if "A" in agg and "B" in agg:
                same_n = agg["A"].get("connections") == agg["B"].get("connections")
                for key, _, better, _ in METRICS[scenario]:
                    if scenario == "connections" and not same_n and key in SIZE_DEPENDENT:
                        continue  # not comparable across different connection counts
                    a, b = agg["A"].get(key), agg["B"].get(key)
                    if better and isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                        ratios[key] = float(f"{a / b:.3g}")
            out[scenario] = {"targets": agg, "ratio_A_over_B": ratios}
        return out

    def verdicts(self, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """The issue's targets, evaluated on A (and A/B where a ratio is asked for)."""
        v: list[dict[str, Any]] = []

        def add(name: str, value: Any, ok: bool | None, detail: str) -> None:
            v.append({"target": name, "value": value, "met": ok, "detail": detail})

        gateway_workers = _gateway_workers(self.args.gateway_arg)
        if "fanout" in summary:
            ratio = summary["fanout"]["ratio_A_over_B"].get("deliveries_per_s")
            add(f"fan-out to {self.opts.fanout_subscribers} subscribers >= 10x B deliveries/s", ratio,
                None if ratio is None else ratio >= 10.0, "A/B deliveries/s")
            busiest = summary["fanout"]["targets"]["A"].get("cpu_generator_max")
            add(f"fan-out generator has headroom (busiest worker < {GENERATOR_HEADROOM:g} % of a core)", busiest,
                None if busiest is None else busiest < GENERATOR_HEADROOM, "A busiest generator worker CPU %")
        if "pipe" in summary:
            ratio = summary["pipe"]["ratio_A_over_B"].get("messages_per_s")
            goal = 1.6 if gateway_workers >= 2 else 1.0
            processes = f"{gateway_workers} gateway processes" if gateway_workers >= 2 else "one gateway process"
            add(f"{self.opts.pipe_pairs} pairs >= {goal:g}x B msg/s with {processes}", ratio,
                None if ratio is None else ratio >= goal, "A/B messages/s")
        if "rate" in summary:
            p99 = summary["rate"]["targets"]["A"].get("p99_ms")
            add(f"{self.opts.rate:g} msg/s to {self.opts.rate_subscribers} subscribers p99 <= 50 ms", p99,
                None if p99 is None else p99 <= 50.0, "A p99 ms (mean of rounds)")
            busiest = summary["rate"]["targets"]["A"].get("cpu_generator_max")
            add(f"rate generator not saturated (busiest worker < {GENERATOR_HEADROOM:g} % of a core)", busiest,
                None if busiest is None else busiest < GENERATOR_HEADROOM, "A busiest generator worker CPU %")
        if "connections" in summary:
            a = summary["connections"]["targets"]["A"]
            n = a.get("connections")
            kib = a.get("kib_per_connection")
            worst = a.get("broadcast_ms_worst")
            add("50,000 subscribed connections on one gateway", n, None if n is None else n >= 50_000,
                "A connections held (min of rounds)")
            add("<= 16 KiB gateway memory per connection", kib, None if kib is None else kib <= 16.0,
                "A RSS growth / connections")
            add("one broadcast reaches all within 1 s", worst, None if worst is None else worst <= 1000.0,
                "A worst broadcast ms")
        return v

    def print_report(self, summary: dict[str, Any], verdicts: list[dict[str, Any]]) -> None:
        print()
        print("=" * 100)
        for t in self.targets:
            print(t.describe())
            for note in t.notes:
                print(f"    note: {note}")
        for note in self.notes:
            print(f"note: {note}")
        labels = [t.label for t in self.targets]
        for scenario, data in summary.items():
            rounds = self.results[scenario]
            print()
            print(self._scenario_title(scenario))
            header = ["metric"]
            for label in labels:
                header += [f"{label} r{r['round']}" for r in rounds[label]]
                header.append(f"{label} mean")
            if len(labels) == 2:
                header.append("A/B")
            rows: list[list[str]] = []
            for key, title, better, _ in METRICS[scenario]:
                row = [title + (" (higher=better)" if better == "high" else " (lower=better)" if better == "low"
                                else "")]
                for label in labels:
                    row += [_fmt(r["metrics"].get(key)) for r in rounds[label]]
                    row.append(_fmt(data["targets"][label].get(key)))
                if len(labels) == 2:
                    ratio = data["ratio_A_over_B"].get(key)
                    row.append(f"{ratio:g}x" if ratio is not None else "")
                rows.append(row)
            for key, title, src in (("lost", "lost messages", "lost"), ("errors", "errors", "errors")):
                row = [title]
                for label in labels:
                    row += [_fmt(r[src]) for r in rounds[label]]
                    row.append(_fmt(data["targets"][label].get(key)))
                if len(labels) == 2:
                    row.append("")
                rows.append(row)
            for key, title in CPU_ROWS:
                if not any(key in r.get("cpu", {}) for label in labels for r in rounds[label]):
                    continue
                row = [title]
                for label in labels:
                    row += [_fmt(r.get("cpu", {}).get(key)) for r in rounds[label]]
                    row.append(_fmt(data["targets"][label].get("cpu_" + key)))
                if len(labels) == 2:
                    row.append("")
                rows.append(row)
            widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
            print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths,
                                                                                                   strict=False))))
            for row in rows:
                print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                  strict=False))))
            if len(labels) == 2:
                print(f"  A/B = {self.targets[0].name} / {self.targets[1].name} "
                      "(for lower=better rows a value < 1 favours A)")
            for label in labels:
                for r in rounds[label]:
                    for note in r.get("notes", []):
                        print(f"  note {label} r{r['round']}: {note}")
                    for sample in r.get("error_samples", [])[:5]:
                        print(f"  error {label} r{r['round']}: {sample}")
                sat = data["targets"][label]["generator_saturated_rounds"]
                if sat:
                    print(f"  WARNING {label}: in {sat} round(s) a generator worker used >= {GENERATOR_SATURATED:.0f}%"
                          " of a core: the generator may be the bottleneck there")
        if verdicts:
            print()
            print(f"Targets from the issue (set for the gateway), evaluated on A = {self.targets[0].name}:")
            for item in verdicts:
                met = {True: "MET", False: "NOT MET", None: "n/a"}[item["met"]]
                print(f"  [{met:7}] {item['target']}: {_fmt(item['value'])} ({item['detail']})")
        if self.profile:
            print()
            print(f"Profile of A during a {self.profile['scenario']} round ({self.profile['tool']}; "
                  f"{self.profile.get('samples')} samples; "
                  f"raw file {self.profile['file']}):")
            print("  self time (top):")
            for name, pct in self.profile["self"][:12]:
                print(f"    {pct:5.1f}%  {name}")
            print("  inclusive (top):")
            for name, pct in self.profile["inclusive"][:12]:
                print(f"    {pct:5.1f}%  {name}")
        total_lost = sum(d["targets"][lab]["lost"] for d in summary.values() for lab in d["targets"])
        total_errors = sum(d["targets"][lab]["errors"] for d in summary.values() for lab in d["targets"])
        print()
        print(f"lost messages: {total_lost}, errors: {total_errors}")

    def _scenario_title(self, scenario: str) -> str:
        o = self.opts
        rounds = f"{o.duration:g} s measured (+{o.warmup:g} s warm-up) per round, body {o.body_size} B"
        if scenario == "fanout":
            return (f"== fanout: 1 publisher -> {o.fanout_subscribers} subscribers on one topic, window "
                    f"{o.fanout_window} msgs, {rounds}")
        if scenario == "pipe":
            return (f"== pipe: {o.pipe_pairs} publisher/subscriber pairs, each on its own {o.pipe_destination}, "
                    f"window {o.pipe_window} per pair, {rounds}")
        if scenario == "rate":
            return f"== rate: {o.rate:g} msg/s to {o.rate_subscribers} subscribers, {rounds}"
        return (f"== connections: {o.connections} idle subscribed connections (capped per target where noted), "
                f"{o.connect_concurrency} handshakes in flight, {o.broadcasts} broadcasts")

    def teardown(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
        pools, self.pools = list(self.pools.values()), {}
        for other in pools:
            other.close()
        if self.gateway is not None:
            self.gateway.stop()


#: files left free under the server's open-files limit (its listeners, AMQP connections and logs, and the
#: generator, whose process has the same limit): the connections scenario's cap is the limit less these
FILES_KEPT = 1000


def _gateway_workers(gateway_args: list[str]) -> int:
    """The ``--workers`` among the arguments given to the started gateway (1 when absent)."""
    workers = 1
    for i, arg in enumerate(gateway_args):
        value = arg.split("=", 1)[1] if arg.startswith("--workers=") else None
        if arg == "--workers" and i + 1 < len(gateway_args):
            value = gateway_args[i + 1]
        if value is not None and value.isdigit():
            workers = int(value)
    return workers


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    elif not args.url and not args.start_gateway:
        args.start_gateway = True
        if not args.compare and not args.no_compare:
            args.compare = WEB_STOMP_URL
    if args.url and args.start_gateway:
        raise SystemExit("--url and --start-gateway both name target A: give one")
    if args.smoke:
        args.max_seconds = min(args.max_seconds, 100.0)

    def watchdog(signum: int, frame: Any) -> None:
        raise TimeoutError(f"bench: the run exceeded --max-seconds={args.max_seconds:g}; aborting")

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(max(1, int(args.max_seconds)))
    machine = machine_info()
    bench = Bench(args)
    print(f"bench: {machine['date']}, {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_gib']} GiB; "
          f"gateway source sha256 {machine['gateway_source_sha256']}; logs in {bench.log_dir}", flush=True)
    try:
        bench.setup()
        for t in bench.targets:
            print(f"bench: {t.describe()}", flush=True)
        bench.run()
        bench.run_profile()
    except TimeoutError as error:
        print(error, file=sys.stderr, flush=True)
        bench.teardown()
        return 3
    finally:
        signal.alarm(0)
        bench.teardown()
    summary = bench.summary()
    verdicts = bench.verdicts(summary) if not args.smoke else []
    bench.print_report(summary, verdicts)
    if args.json:
        doc = {
            "machine": machine,
            "targets": [{"label": t.label, "name": t.name, "url": t.url, "server_pid": t.server_pid,
                         "notes": t.notes, "max_connections": t.max_connections} for t in bench.targets],
            "options": vars(args),
            "notes": bench.notes,
            "summary": summary,
            "verdicts": verdicts,
            "rounds": bench.results,
            "profile": bench.profile,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"JSON written to {args.json}")
    lost = sum(d["targets"][lab]["lost"] for d in summary.values() for lab in d["targets"])
    errors = sum(d["targets"][lab]["errors"] for d in summary.values() for lab in d["targets"])
    if args.smoke and not args.log_dir and not lost and not errors:
        shutil.rmtree(bench.log_dir, ignore_errors=True)  # keep the gateway's log only when something failed
    return 1 if lost or errors else 0
