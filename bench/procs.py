"""Processes: the gateway the tool starts, the PID behind a port, CPU and RSS from /proc, Web-STOMP,
the machine's description."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.wsclient import raise_nofile

__all__ = [
    "GatewayProcess",
    "comm",
    "cpu_seconds",
    "ensure_web_stomp",
    "machine_info",
    "parent_pid",
    "pid_listening_on",
    "pids_listening_on",
    "port_open",
    "process_tree",
    "rabbitmq_socket_headroom",
    "rss_kib",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all threads), in seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of ``pid`` (``/proc/PID/limits``), None if unknown or unlimited."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return int(soft) if soft.isdigit() else None
    except OSError:
        return None
    return None


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _listen_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def pids_listening_on(port: int) -> list[int]:
    """Every process holding a listening TCP socket on ``port`` (/proc/net/tcp + /proc/*/fd); several with
    SO_REUSEPORT (``gateway --workers N``)."""
    inodes = _listen_inodes(port)
    if not inodes:
        return []
    targets = {f"socket:[{inode}]" for inode in inodes}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") in targets:
                    found.append(int(entry))
                    break
    return sorted(found)


def pid_listening_on(port: int) -> int | None:
    """The server behind ``port``: the listener, or the common parent of several listeners when that
    parent is the same program (a supervisor such as ``gateway --workers N``)."""
    pids = pids_listening_on(port)
    if not pids:
        return None
    if len(pids) > 1:
        parents = {parent_pid(p) for p in pids}
        if len(parents) == 1:
            parent = parents.pop()
            if parent and parent > 1 and comm(parent) == comm(pids[0]):
                return parent
    return pids[0]


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rfind(b")") + 2 :].split()[1])


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (gateway workers, Erlang port programs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = parent_pid(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    out = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    raise_nofile(200_000)  # the started gateway may hold 50,000+ connections


class GatewayProcess:
    """``python -m gateway`` started by the tool (RabbitMQ or embedded broker), on a free port."""

    def __init__(self, broker: str, amqp_url: str, extra_args: list[str], log_dir: Path,
                 profile_cprofile: Path | None = None) -> None:
        self.broker = broker
        self.amqp_url = amqp_url
        self.extra_args = extra_args
        self.log_dir = log_dir
        self.profile_cprofile = profile_cprofile
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def command(self) -> list[str]:
        args = [sys.executable]
        if self.profile_cprofile is not None:
            args += ["-m", "cProfile", "-o", str(self.profile_cprofile)]
        args += ["-m", "gateway", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING"]
        if self.broker == "memory":
            args += ["--broker", "memory"]
        else:
            args += ["--broker", "rabbitmq", "--amqp-url", self.amqp_url]
        return args + self.extra_args

    def start(self, port: int | None = None) -> None:
        self.port = port or self.port or free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.log_dir / f"gateway-{self.starts}.log", "wb")  # noqa: SIM115 - handed to the child
        env = dict(os.environ)
        env.pop("AMQP_URL", None)
        env.pop("GATEWAY_BROKER", None)
        self.proc = subprocess.Popen(
            self.command(), cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_raise_nofile, env=env,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}; see {log.name}")
            if _healthy(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the gateway did not answer /healthz within 30 s; see {log.name}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start(self.port)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def ensure_web_stomp(host: str, port: int, log: list[str]) -> bool:
    """Enable RabbitMQ's Web-STOMP plugin when ``port`` (15674) is not listening. True if it listens."""
    if port_open(host, port):
        return True
    tool = shutil.which("rabbitmq-plugins") or "/usr/sbin/rabbitmq-plugins"
    if not os.path.exists(tool):
        log.append(f"{host}:{port} is not listening and rabbitmq-plugins is not installed")
        return False
    log.append(f"{host}:{port} was not listening: ran 'rabbitmq-plugins enable rabbitmq_web_stomp'")
    print(f"bench: {log[-1]}", flush=True)
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run([tool, "enable", "rabbitmq_web_stomp"], timeout=120, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.5)
    log.append(f"{host}:{port} still not listening after enabling the plugin")
    return False


def rabbitmq_socket_headroom() -> int | None:
    """RabbitMQ's free socket slots (``sockets_limit - sockets_used``), or None if rabbitmqctl fails."""
    tool = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    try:
        out = subprocess.run([tool, "status", "--formatter", "json"], capture_output=True, timeout=60,
                             check=False).stdout
        fds = json.loads(out)["file_descriptors"]
        return int(fds["sockets_limit"]) - int(fds["sockets_used"])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None


def machine_info() -> dict[str, object]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    rabbit = "?"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True,
                             timeout=10, check=False, text=True).stdout
        rabbit = out.strip() or "?"
    digest = hashlib.sha256()
    for path in sorted((PROJECT_ROOT / "gateway").rglob("*.py")):
        digest.update(path.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "gateway_source_sha256": digest.hexdigest()[:16],
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq_server": rabbit,
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
    }
