"""A private RabbitMQ cluster on this machine, for the cluster tests and the cluster benchmark.

Debian's ``rabbitmq-server`` scripts run as the ``rabbitmq`` user (so every node and ``rabbitmqctl`` share the
Erlang cookie in ``/var/lib/rabbitmq``); each node has its own node name, AMQP and distribution ports, data
and log directories under one temporary folder. The machine's own node (``rabbit@localhost`` on 5672) is
never touched: every ``rabbitmqctl`` call names its node with ``-n``.

Starting three nodes and clustering them takes about 30 s on a 2-core machine; start it once per test
session (or benchmark run).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ClusterUnavailable", "Node", "RabbitCluster", "cluster_support"]

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
RABBITMQ_HOME = "/var/lib/rabbitmq"


class ClusterUnavailable(Exception):
    """This machine cannot run private RabbitMQ nodes (no rabbitmq-server, no ``rabbitmq`` user, not root)."""


def cluster_support() -> str | None:
    """Why private nodes cannot run here, or None when they can."""
    if not os.path.exists(SERVER):
        return f"{SERVER} is missing (Debian's rabbitmq-server package)"
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "there is no 'rabbitmq' user"
    if os.geteuid() != 0:
        return "starting nodes as the 'rabbitmq' user needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Node:
    """One node: its Erlang node name, its AMQP port, its folder, its server process (None when stopped)."""

    name: str
    port: int
    dist_port: int
    home: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


def _as_rabbitmq(argv: list[str], env: dict[str, str]) -> list[str]:
    """``argv`` run as the ``rabbitmq`` user with ``env`` (su keeps no environment of ours)."""
    assignments = [f"{key}={value}" for key, value in env.items()]
    return ["su", "rabbitmq", "-s", "/bin/sh", "-c", 'exec env "$@"', "--", *assignments, *argv]


class RabbitCluster:
    """``size`` nodes joined into one cluster. :meth:`start` boots and clusters them; :meth:`close` stops them
    and deletes their folder. :meth:`stop_node` / :meth:`start_node` simulate a node restart."""

    def __init__(self, size: int = 3, *, prefix: str | None = None) -> None:
        reason = cluster_support()
        if reason is not None:
            raise ClusterUnavailable(reason)
        self.prefix = prefix or f"gwt{os.getpid()}"
        self.root = Path(tempfile.mkdtemp(prefix="stomp-gw-cluster-"))
        os.chmod(self.root, 0o755)
        shutil.chown(self.root, "rabbitmq", "rabbitmq")
        self.nodes = [self._node(chr(ord("a") + i)) for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def _node(self, letter: str) -> Node:
        name = f"{self.prefix}{letter}@localhost"
        home = self.root / letter
        for sub in ("mnesia", "log"):
            (home / sub).mkdir(parents=True)
        port = _free_port()
        dist_port = _free_port()
        (home / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{port}\n"
            "loopback_users.guest = false\n"
            # a quorum queue must keep its leader writable with one node down; the machine's disk is shared
            "disk_free_limit.absolute = 50MB\n"
        )
        (home / "enabled_plugins").write_text("[].\n")
        for path in [home, *home.rglob("*")]:
            shutil.chown(path, "rabbitmq", "rabbitmq")
        env = {
            "HOME": RABBITMQ_HOME,
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
            "PATH": "/usr/lib/rabbitmq/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        }
        return Node(name, port, dist_port, home, env=env)

    # -- control

    def ctl(self, node: Node, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n NODE ARGS`` as the rabbitmq user; raises with its output if it fails."""
        env = {"HOME": RABBITMQ_HOME, "PATH": node.env["PATH"]}
        result = subprocess.run(
            _as_rabbitmq([CTL, "-n", node.name, *args], env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def _launch(self, node: Node) -> None:
        log = open(node.home / "server.out", "ab")  # noqa: SIM115 - the child holds it
        node.process = subprocess.Popen(
            _as_rabbitmq([SERVER], node.env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _await(self, node: Node, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not _port_open(node.port):
            if node.process is not None and node.process.poll() is not None:
                tail = (node.home / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"node {node.name} exited ({node.process.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.name} did not open port {node.port} within {timeout:g} s")
            time.sleep(0.2)
        self.ctl(node, "await_startup", timeout=timeout)

    def start(self) -> RabbitCluster:
        """Boot every node (in parallel) and join B, C, ... to A."""
        try:
            for node in self.nodes:
                self._launch(node)
            with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(self._await, self.nodes))
            first = self.nodes[0]
            for node in self.nodes[1:]:
                self.ctl(node, "stop_app")
                self.ctl(node, "join_cluster", first.name)
                self.ctl(node, "start_app")
        except BaseException:
            self.close()
            raise
        return self

    def running_nodes(self) -> list[str]:
        """The members ``cluster_status`` on the first running node reports as running."""
        for node in self.nodes:
            if _port_open(node.port):
                out = self.ctl(node, "cluster_status", "--formatter", "json")
                import json

                return list(json.loads(out).get("running_nodes", []))
        return []

    def stop_node(self, node: Node) -> None:
        """``rabbitmqctl stop_app``: the node leaves the running members, its clients are disconnected
        (CONNECTION_FORCED), the Erlang VM stays up (as in a rolling restart)."""
        self.ctl(node, "stop_app")

    def start_node(self, node: Node) -> None:
        self.ctl(node, "start_app")
        self._await(node)

    def close(self) -> None:
        """Stop every node (``rabbitmqctl stop``, then a kill) and delete the folder."""
        for node in self.nodes:
            if node.process is None:
                continue
            with contextlib.suppress(Exception):
                self.ctl(node, "stop", timeout=30)
            with contextlib.suppress(Exception):
                node.process.wait(timeout=10)
            if node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    node.process.wait(timeout=5)
            self._kill_leftovers(node)
            node.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _kill_leftovers(node: Node) -> None:
        """The Erlang VM outlives ``su`` in its own session: find it by its node name and kill it."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                if b"beam.smp" in os.path.basename(cmdline[0]) and node.name.encode() in cmdline:
                    os.kill(int(entry.name), signal.SIGKILL)

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
