"""``python -m bench --smoke``: the load generator runs end to end against a gateway it starts itself
(embedded broker) and loses nothing. Never asserts on speed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import rabbitmq_running

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_loses_nothing(tmp_path: Path) -> None:
    report = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    summary = re.search(r"^lost messages: (\d+), errors: (\d+)$", proc.stdout, re.MULTILINE)
    assert summary is not None, output
    assert summary.group(1) == "0", output
    assert summary.group(2) == "0", output
    doc = json.loads(report.read_text())
    for scenario in ("fanout", "pipe", "rate", "connections"):
        rounds = doc["rounds"][scenario]["A"]
        assert rounds, scenario
        for result in rounds:
            assert result["lost"] == 0, (scenario, result)
            assert result["errors"] == 0, (scenario, result)
            metrics = result["metrics"]
            # something really flowed (counts, not speed)
            if scenario == "connections":
                assert metrics["connections"] == result["params"]["connections"], metrics
            else:
                assert metrics["published"] > 0, (scenario, metrics)
            if scenario == "fanout":
                assert metrics["deliveries"] == metrics["published"] * metrics["subscribers"], metrics


def test_amqp_pipe_reference_runs_against_rabbitmq() -> None:
    """``python -m bench.amqp_pipe``: RabbitMQ's share of the pipe, measured on AMQP alone (counts, not speed)."""
    if not rabbitmq_running():
        pytest.skip("RabbitMQ is not running")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.amqp_pipe", "--rounds", "1", "--duration", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.split(": ", 1)[1])
    assert result["messages_per_s"] > 0 and result["pairs"] == 4, result
    assert result["rabbitmq_cpu_us_per_message"] is not None, result
