"""Real processes for the cluster tests: a private 3-node RabbitMQ cluster, two gateway processes in front
of it, and HAProxy (``deploy/haproxy.cfg``, the file the compose file uses) in front of them.

Everything starts once per test session (the cluster takes about 30 s) and is marked ``cluster``:
``pytest -m "not cluster"`` is the quick run, ``make test`` (and CI) runs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rabbit_cluster import RabbitCluster, cluster_support

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"cluster tests cannot run: {reason} (make test installs what they need)")
    pytest.skip(f"cluster tests cannot run: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


class GatewayProcess:
    """``python -m gateway`` on ``port`` with every node's URL; ``server_name`` tells clients which one they
    reached (CONNECTED's ``server`` header)."""

    def __init__(self, server_name: str, urls: list[str], log_dir: Path, *extra: str) -> None:
        self.server_name = server_name
        self.urls = urls
        self.port = free_port()
        self.log_path = log_dir / f"{server_name}.log"
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        argv = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(self.port)]
        for url in self.urls:
            argv += ["--amqp-url", url]
        argv += ["--server-name", self.server_name, "--web-root", "none", *self.extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "AMQP_URL"))}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while http_status(self.port, "/readyz") != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway {self.server_name} did not become ready:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: the gateway vanishes without closing anything (a crashed pod)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class HAProxy:
    """Debian's haproxy with the repository's configuration, its addresses from the environment."""

    def __init__(self, gateways: list[GatewayProcess], log_dir: Path) -> None:
        self.port = free_port()
        self.gateways = gateways
        self.log_path = log_dir / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        env = {
            **os.environ,
            "HAPROXY_BIND": f"127.0.0.1:{self.port}",
            "GATEWAY_1": f"127.0.0.1:{self.gateways[0].port}",
            "GATEWAY_2": f"127.0.0.1:{self.gateways[1].port}",
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(HAPROXY_CONFIG)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 15
        while http_status(self.port, "/haproxy-health") != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="package")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    reason = cluster_support()
    if reason is not None:
        _unavailable(reason)
    with RabbitCluster(3) as cluster:
        yield cluster


@pytest.fixture(scope="package")
def cluster_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-logs")


@pytest.fixture(scope="package")
def gateway_pair(rabbit_cluster: RabbitCluster, cluster_logs: Path) -> Iterator[list[GatewayProcess]]:
    """Gateways A and B, each given all three nodes (their connections go to the nodes in turn: the first
    session connection of each to node 2, as the monitor took node 1)."""
    extra = ("--queue-type", "quorum")
    pair = [GatewayProcess(name, rabbit_cluster.urls, cluster_logs, *extra) for name in ("gw-a", "gw-b")]
    try:
        for gateway in pair:
            gateway.start()
        yield pair
    finally:
        for gateway in pair:
            gateway.stop()


@pytest.fixture
def gateways(gateway_pair: list[GatewayProcess], rabbit_cluster: RabbitCluster) -> list[GatewayProcess]:
    """Both gateways running (a test may have killed one) and all three nodes up (one may have stopped one)."""
    for node in rabbit_cluster.nodes:
        if node.name not in rabbit_cluster.running_nodes():
            rabbit_cluster.start_node(node)
    for gateway in gateway_pair:
        gateway.ensure_running()
    return gateway_pair


@pytest.fixture(scope="package")
def haproxy_process(gateway_pair: list[GatewayProcess], cluster_logs: Path) -> Iterator[HAProxy]:
    if shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"):
        _unavailable("haproxy is not installed")
    balancer = HAProxy(gateway_pair, cluster_logs)
    balancer.start()
    try:
        yield balancer
    finally:
        balancer.stop()


@pytest.fixture
def haproxy(haproxy_process: HAProxy, gateways: list[GatewayProcess]) -> HAProxy:
    """HAProxy in front of both gateways (running: see ``gateways``)."""
    return haproxy_process
