"""``python -m bench.cluster``: fan-out through one gateway, then through two behind HAProxy, on a private
3-node RabbitMQ cluster (issue 12's scale figure).

All runs use the same cluster, the same two gateway processes (each given all three nodes) and the same
load generator (``python -m bench --scenarios fanout``); only the entry point changes: gateway A directly (for
reference), HAProxy (``deploy/haproxy.cfg``) with gateway A as its only backend, then HAProxy in front of A
and B (least-connections spreads the subscribers over both). The scale figure is the last over the second
(same path, one backend or two); what was lost must be 0.

On a 2-core machine the three RabbitMQ nodes, the generator and the gateways share two cores, so a second
gateway cannot double the figure; the point is that nothing is lost and the figure does not fall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import PROJECT_ROOT, GatewayProcess, free_port, machine_info
from tests.rabbit_cluster import RabbitCluster, cluster_support

HAPROXY_CONFIG = PROJECT_ROOT / "deploy" / "haproxy.cfg"


def _start_haproxy(port: int, gateways: list[GatewayProcess], log_dir: Path) -> subprocess.Popen[bytes]:
    """HAProxy with the repository's config; both of its servers are ``gateways[0]`` if only one is given."""
    second = gateways[-1]
    env = {**os.environ, "HAPROXY_BIND": f"127.0.0.1:{port}",
           "GATEWAY_1": f"127.0.0.1:{gateways[0].port}", "GATEWAY_2": f"127.0.0.1:{second.port}"}
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    with open(log_dir / f"haproxy-{len(gateways)}.log", "wb") as log:
        process = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CONFIG)], stdout=log, stderr=subprocess.STDOUT,
                                   env=env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/haproxy-health", timeout=1):
                time.sleep(2.5)  # both gateways pass two checks (rise 2, every second)
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("haproxy did not start; see haproxy.log")


def _fanout(label: str, url: str, pid: int | None, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    out = log_dir / f"fanout-{label}.json"
    argv = [sys.executable, "-m", "bench", "--url", url, "--no-compare", "--scenarios", "fanout", "--profile", "none",
            "--rounds", str(args.rounds), "--duration", str(args.duration), "--subscribers", str(args.subscribers),
            "--window", str(args.window), "--json", str(out)]
    if pid is not None:
        argv += ["--gateway-pid", str(pid)]
    print(f"\n== fan-out through {label} ==", flush=True)
    subprocess.run(argv, cwd=PROJECT_ROOT, check=False)
    row: dict[str, Any] = json.loads(out.read_text())["summary"]["fanout"]["targets"]["A"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="write both rows and the ratio as JSON")
    args = parser.parse_args(argv)
    reason = cluster_support()
    if reason is not None:
        print(f"bench.cluster: cannot start private RabbitMQ nodes: {reason}", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = RabbitCluster(3, prefix=f"gwb{os.getpid()}")
    gateways: list[GatewayProcess] = []
    balancer = None
    try:
        print("starting a 3-node RabbitMQ cluster (about 30 s)", flush=True)
        cluster.start()
        urls = cluster.urls
        for name in ("gw-a", "gw-b"):
            extra = [arg for url in urls[1:] for arg in ("--amqp-url", url)] + ["--server-name", name]
            gateway = GatewayProcess("rabbitmq", urls[0], extra, log_dir / name)
            gateway.start()
            gateways.append(gateway)
        direct = _fanout("gateway A directly", gateways[0].url, gateways[0].pid, args, log_dir)
        port = free_port()
        balancer = _start_haproxy(port, gateways[:1], log_dir)
        one = _fanout("HAProxy in front of gateway A alone", f"ws://127.0.0.1:{port}/ws", None, args, log_dir)
        balancer.terminate()
        balancer.wait(10)
        port = free_port()
        balancer = _start_haproxy(port, gateways, log_dir)
        two = _fanout("HAProxy in front of gateways A and B", f"ws://127.0.0.1:{port}/ws", None, args, log_dir)
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        for gateway in gateways:
            gateway.stop()
        cluster.close()
    ratio = two["deliveries_per_s"] / one["deliveries_per_s"] if one.get("deliveries_per_s") else None
    print("\n| entry point | deliveries/s | messages/s | lost | errors |\n|---|---|---|---|---|")
    for label, row in (("gateway A, directly", direct), ("HAProxy -> gateway A", one), ("HAProxy -> gateways A + B", two)):
        print(f"| {label} | {row['deliveries_per_s']} | {row['messages_per_s']} | {row['lost']} | {row['errors']} |")
    print(f"\nbehind HAProxy, two gateways / one: {ratio:.2f}x" if ratio else "\nno ratio (nothing delivered)")
    if args.json:
        doc = {"machine": machine_info(), "options": vars(args), "direct": direct, "haproxy_one_gateway": one,
               "haproxy_two_gateways": two, "ratio_two_over_one": ratio}
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0 if direct["lost"] == 0 and one["lost"] == 0 and two["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
