"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

``docker-compose config`` (Debian's docker-compose 1.29) validates and normalises the file; the normalised
YAML is then checked against the code: the services, the health check the gateway waits for, the
published port, and every command line, which is parsed by the very argparse parsers the console scripts
use, so a flag that does not exist (or a wrong console-script name) fails here rather than in a container.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import stock_daemon.__main__ as stock_daemon_main
from gateway import config as gateway_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's docker-compose depends on python3-yaml
GATEWAY_SCRIPT = "stomp-gateway"
DAEMON_SCRIPT = "stock-daemon"
GATEWAY_PORT = 8181


def _docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is not installed (make test installs Debian's docker-compose)")
        pytest.skip(
            "docker-compose is not installed (make test installs it); docker-compose.yml not validated"
        )
    return path


def _run_config(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE_FILE), "config", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _yaml_to_data(text: str) -> Any:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        return yaml.safe_load(text)
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no YAML parser: PyYAML is not in the venv and /usr/bin/python3 is missing")
    converted = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import yaml, json, sys; print(json.dumps(yaml.safe_load(sys.stdin)))"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if converted.returncode != 0:
        pytest.fail(f"could not parse docker-compose's output with {SYSTEM_PYTHON}:\n{converted.stderr}")
    return json.loads(converted.stdout)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The normalised compose file, as docker-compose itself sees it."""
    result = _run_config()
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    data = _yaml_to_data(result.stdout)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), data
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]["scripts"]  # type: ignore[no-any-return]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_cmd() -> list[str]:
    cmds = [rest for word, rest in dockerfile_instructions() if word == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    last = cmds[-1]
    return json.loads(last) if last.startswith("[") else ["/bin/sh", "-c", last]


def command_of(service: Mapping[str, Any]) -> list[str]:
    """The argv a service runs: its command (list or string); without one, our Dockerfile's CMD for a
    service built here, and [] for someone else's image (whose CMD is its own business)."""
    assert "entrypoint" not in service, "an entrypoint would change what the command means; update this test"
    command = service.get("command")
    if command is None:
        return dockerfile_cmd() if "build" in service else []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=value items
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def parse_strictly(parse: Any, args: Sequence[str], what: str) -> Any:
    """Run an argparse-based parse; a SystemExit (unknown flag, bad value) becomes a test failure."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parse(list(args))
    except SystemExit as exc:
        pytest.fail(
            f"{what}: {shlex.join(args)!r} is refused by the real parser ({exc}):\n{stderr.getvalue()}"
        )


def runs(argv: Sequence[str], script: str) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == script


def test_docker_compose_config_is_valid() -> None:
    result = _run_config("--quiet")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert {"rabbitmq", "gateway", "stock-daemon"} <= set(services), sorted(services)


def test_rabbitmq_has_a_healthcheck_and_the_management_image(services: dict[str, dict[str, Any]]) -> None:
    rabbitmq = services["rabbitmq"]
    image = rabbitmq.get("image", "")
    assert image.startswith("rabbitmq:") and image.endswith("-management"), image
    healthcheck = rabbitmq.get("healthcheck") or {}
    assert not healthcheck.get("disable"), healthcheck
    test = healthcheck.get("test")
    assert test and test != ["NONE"], healthcheck
    assert "rabbitmq-diagnostics" in (test if isinstance(test, str) else " ".join(test)), test


def _published(service: Mapping[str, Any]) -> dict[int, int]:
    """published port -> container port, from docker-compose's normalised long syntax."""
    ports: dict[int, int] = {}
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            ports[int(port["published"])] = int(port["target"])
        else:  # short syntax, in case a newer docker-compose leaves it alone
            host, _, container = str(port).rpartition(":")
            ports[int(host.rsplit(":", 1)[-1] or container)] = int(container.split("/")[0])
    return ports


def test_gateway_waits_for_a_healthy_rabbitmq_and_publishes_8181(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    depends = gateway.get("depends_on")
    assert isinstance(depends, dict), f"depends_on must name a condition: {depends!r}"
    assert depends.get("rabbitmq", {}).get("condition") == "service_healthy", depends
    assert _published(gateway).get(GATEWAY_PORT) == GATEWAY_PORT, gateway.get("ports")


def test_stock_daemon_waits_for_a_healthy_rabbitmq(services: dict[str, dict[str, Any]]) -> None:
    depends = services["stock-daemon"].get("depends_on")
    assert isinstance(depends, dict), depends
    assert depends.get("rabbitmq", {}).get("condition") == "service_healthy", depends


def _commands(
    services: dict[str, dict[str, Any]], script: str
) -> list[tuple[str, list[str], dict[str, str]]]:
    found = [(name, command_of(service), environment_of(service)) for name, service in services.items()]
    return [(name, argv, env) for name, argv, env in found if runs(argv, script)]


def test_gateway_commands_use_only_real_flags_and_listen_on_all_interfaces(
    services: dict[str, dict[str, Any]],
) -> None:
    commands = _commands(services, GATEWAY_SCRIPT)
    assert any(name == "gateway" for name, _, _ in commands), "the gateway service does not run stomp-gateway"
    rabbit_env = environment_of(services["rabbitmq"])
    for name, argv, env in commands:
        parse_strictly(gateway_config.build_parser().parse_args, argv[1:], f"service {name}")
        # The whole configuration as the process would see it (flags over the service's environment).
        config = parse_strictly(
            lambda a, env=env: gateway_config.parse_args(a, environ=env), argv[1:], f"service {name}"
        )
        assert config.host in ("0.0.0.0", "::"), f"{name}: listens on {config.host}, unreachable from outside"
        assert config.port == GATEWAY_PORT, f"{name}: listens on {config.port}"
        assert config.broker == "rabbitmq", f"{name}: runs the {config.broker} broker"
        assert config.amqp_urls, name
        # A browser's CONNECT carries no login: the default one must be a user RabbitMQ has (guest may only
        # log in from localhost, which the gateway container is not).
        user = rabbit_env.get("RABBITMQ_DEFAULT_USER", "guest")
        password = rabbit_env.get("RABBITMQ_DEFAULT_PASS", "guest")
        assert (config.default_login, config.default_passcode) == (user, password), name
        for amqp_url in config.amqp_urls:
            url = urlsplit(amqp_url)
            assert url.hostname == "rabbitmq", amqp_url
            assert (url.username, url.password) == (user, password), amqp_url


def test_gateway_healthcheck_probes_the_gateway_port(services: dict[str, dict[str, Any]]) -> None:
    test = (services["gateway"].get("healthcheck") or {}).get("test") or []
    text = test if isinstance(test, str) else " ".join(test)
    assert f"127.0.0.1:{GATEWAY_PORT}/readyz" in text, test


def test_stock_daemon_commands_use_only_real_flags(services: dict[str, dict[str, Any]]) -> None:
    # stock_daemon.__main__ exposes build_parser(environ): the same parser main() uses.
    commands = _commands(services, DAEMON_SCRIPT)
    assert any(name == "stock-daemon" for name, _, _ in commands), "the stock-daemon service does not run it"
    rabbit_env = environment_of(services["rabbitmq"])
    for name, argv, env in commands:
        args = parse_strictly(
            lambda a, env=env: stock_daemon_main.build_parser(env).parse_args(a), argv[1:], f"service {name}"
        )
        stock_daemon_main.config_from_args(args)  # consistent (e.g. min <= max interval)
        url = urlsplit(args.amqp_url)
        assert url.hostname == "rabbitmq", args.amqp_url
        user = rabbit_env.get("RABBITMQ_DEFAULT_USER", "guest")
        password = rabbit_env.get("RABBITMQ_DEFAULT_PASS", "guest")
        assert (url.username, url.password) == (user, password), args.amqp_url


def test_one_image_is_built_and_used_by_both_services(services: dict[str, dict[str, Any]]) -> None:
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["gateway"], built
    assert services["stock-daemon"]["image"] == services["gateway"]["image"]


def test_no_obsolete_version_key_and_healthchecks_have_a_start_period(
    services: dict[str, dict[str, Any]],
) -> None:
    assert not re.search(r"^version\s*:", COMPOSE_FILE.read_text(), re.MULTILINE)
    for name in ("rabbitmq", "gateway"):
        assert services[name]["healthcheck"].get("start_period"), name


def test_every_command_runs_a_declared_console_script(
    services: dict[str, dict[str, Any]], scripts: dict[str, str]
) -> None:
    image = services["gateway"]["image"]
    built = {name: s for name, s in services.items() if "build" in s or s.get("image") == image}
    assert {"gateway", "stock-daemon"} <= set(built), sorted(built)
    for name, service in built.items():
        program = command_of(service)[0]
        assert program in scripts, (
            f"service {name} runs {program!r}, not in [project.scripts] {sorted(scripts)}"
        )
    assert dockerfile_cmd()[0] in scripts, dockerfile_cmd()


def test_console_scripts_point_at_the_real_entry_points(scripts: dict[str, str]) -> None:
    assert scripts.get(GATEWAY_SCRIPT) == "gateway.__main__:main", scripts
    assert scripts.get(DAEMON_SCRIPT) == "stock_daemon.__main__:main", scripts
    for target in scripts.values():
        module, _, function = target.partition(":")
        __import__(module)
        assert callable(getattr(sys.modules[module], function)), target


def test_dockerfile_cmd_uses_real_gateway_flags() -> None:
    argv = dockerfile_cmd()
    assert runs(argv, GATEWAY_SCRIPT), argv
    config = parse_strictly(lambda a: gateway_config.parse_args(a, environ={}), argv[1:], "Dockerfile CMD")
    assert config.host in ("0.0.0.0", "::"), config.host
    assert config.port == GATEWAY_PORT, config.port


def test_dockerfile_installs_from_pyproject() -> None:
    instructions = dockerfile_instructions()
    copies = [rest for word, rest in instructions if word == "COPY"]
    assert any("pyproject.toml" in rest.split() for rest in copies), copies
    installs = [
        rest for word, rest in instructions if word == "RUN" and re.search(r"\bpip\b.*\binstall\b", rest)
    ]
    assert installs, "the Dockerfile runs no pip install"
    for rest in installs:
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            if "pip" in [os.path.basename(w) for w in words] and "install" in words:
                targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
                assert targets == ["."], (
                    f"pip should install the project itself (pip install .), not {targets}"
                )
    # Nothing else installs Python packages behind pyproject.toml's back (no requirements file).
    assert not any("requirements" in rest for word, rest in instructions if word in ("RUN", "COPY")), (
        instructions
    )


def test_dockerfile_copies_only_files_that_exist_and_are_not_dockerignored() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for word, rest in dockerfile_instructions():
        if word != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing from the build context"
            assert not any(source == pattern or source.startswith(pattern + "/") for pattern in ignored), (
                f"COPY {source}: excluded by .dockerignore"
            )


MAKEFILE = ROOT / "Makefile"


def test_make_run_installs_only_what_running_needs() -> None:
    dry = subprocess.run(
        ["make", "-n", "-B", "run"], cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ}
    ).stdout
    installs = [line for line in dry.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("[dev]" not in line and "[test]" not in line for line in installs), installs


def test_no_make_target_prints_a_password() -> None:
    env = {**os.environ, "AMQP_URL": "amqp://someone:s3cretpw@broker.internal:5672/"}
    for target in ("run", "run-rabbitmq", "up", "test", "bench"):
        dry = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, env=env)
        echoed = [line for line in dry.stdout.splitlines() if line.lstrip().startswith("echo")]
        # make -n shows the recipe unexpanded: an echo of ${AMQP_URL} would print the password when run
        assert not any(
            "s3cretpw" in line or "${AMQP_URL" in line or "$AMQP_URL" in line for line in echoed
        ), (target, echoed)


# --- docker-compose.cluster.yml: three RabbitMQ nodes, two gateways, HAProxy, the stock daemon ----------------

CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"
RABBIT_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")


@pytest.fixture(scope="module")
def cluster_services() -> dict[str, dict[str, Any]]:
    result = subprocess.run(
        [_docker_compose(), "-f", str(CLUSTER_FILE), "config"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"docker-compose config failed for {CLUSTER_FILE.name}:\n{result.stderr}"
    data = _yaml_to_data(result.stdout)
    return data["services"]  # type: ignore[no-any-return]


def test_the_cluster_file_has_three_nodes_two_gateways_a_balancer_and_the_daemon(
    cluster_services: dict[str, dict[str, Any]],
) -> None:
    assert {*RABBIT_NODES, "gateway-1", "gateway-2", "balancer", "stock-daemon"} <= set(cluster_services)
    cookies = {environment_of(cluster_services[name]).get("RABBITMQ_ERLANG_COOKIE") for name in RABBIT_NODES}
    assert len(cookies) == 1 and None not in cookies, "the nodes must share one Erlang cookie to cluster"
    for name in RABBIT_NODES:
        erl_args = environment_of(cluster_services[name]).get("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "")
        assert all(f"rabbit@{node}" in erl_args for node in RABBIT_NODES), (name, erl_args)
        assert cluster_services[name].get("hostname") == name


def test_every_gateway_of_the_cluster_knows_every_node_and_declares_quorum_queues(
    cluster_services: dict[str, dict[str, Any]],
) -> None:
    commands = _commands(cluster_services, GATEWAY_SCRIPT)
    assert {name for name, _, _ in commands} == {"gateway-1", "gateway-2"}
    for name, argv, env in commands:
        config = parse_strictly(lambda a, env=env: gateway_config.parse_args(a, environ=env), argv[1:], name)
        assert sorted(urlsplit(url).hostname for url in config.amqp_urls) == list(RABBIT_NODES), name
        assert config.queue_type == "quorum", name
        assert config.host == "0.0.0.0" and config.port == GATEWAY_PORT, name
        depends = cluster_services[name].get("depends_on") or {}
        assert all(depends.get(node, {}).get("condition") == "service_healthy" for node in RABBIT_NODES), depends
        healthcheck = " ".join(cluster_services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{GATEWAY_PORT}/readyz" in healthcheck, name
    images = {cluster_services[name]["image"] for name in ("gateway-1", "gateway-2", "stock-daemon")}
    assert len(images) == 1, images


def test_the_balancer_runs_the_repositorys_haproxy_config_against_both_gateways(
    cluster_services: dict[str, dict[str, Any]],
) -> None:
    balancer = cluster_services["balancer"]
    mounts = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in balancer.get("volumes", [])]
    assert any(str(HAPROXY_CONFIG) in mount and mount.split(":")[1].endswith("haproxy.cfg") for mount in mounts), mounts
    env = environment_of(balancer)
    assert env["GATEWAY_1"] == f"gateway-1:{GATEWAY_PORT}" and env["GATEWAY_2"] == f"gateway-2:{GATEWAY_PORT}", env
    bind_port = int(env["HAPROXY_BIND"].rsplit(":", 1)[1])
    assert bind_port in _published(balancer), balancer.get("ports")
    assert balancer.get("stop_signal") == "SIGUSR1", "HAProxy stops gracefully (drains) on SIGUSR1"


def test_the_haproxy_config_is_websocket_aware_and_checks_readyz() -> None:
    text = HAPROXY_CONFIG.read_text()
    assert re.search(r"^\s*option httpchk GET /readyz\s*$", text, re.MULTILINE), "health check on /readyz"
    assert re.search(r"^\s*timeout tunnel\s+\S+", text, re.MULTILINE), "WebSocket tunnels need timeout tunnel"
    assert re.search(r"^\s*mode http\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*hard-stop-after\s+\S+", text, re.MULTILINE), "a soft stop drains for a bounded time"
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if haproxy is None:
        if os.environ.get("CI") == "true":
            pytest.fail("haproxy is not installed (make test installs Debian's haproxy)")
        pytest.skip("haproxy is not installed: its own check of the config did not run")
    env = {**os.environ, "HAPROXY_BIND": "127.0.0.1:8080", "GATEWAY_1": "127.0.0.1:8181", "GATEWAY_2": "127.0.0.1:8182"}
    checked = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CONFIG)], capture_output=True, text=True, env=env, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
