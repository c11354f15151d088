"""Where the gateway's time goes: ``py-spy record`` during a fan-out round (cProfile as the fallback)."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["PySpy", "summarize_cprofile", "summarize_raw"]

_LINE = re.compile(r":\d+\)$")


def _py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


class PySpy:
    """``py-spy record --format raw`` on ``pid`` for ``seconds``, started in the background."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.error = ""

    def start(self, seconds: float) -> bool:
        tool = _py_spy()
        if tool is None:
            self.error = "py-spy is not installed (.venv/bin/pip install py-spy)"
            return False
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [tool, "record", "--pid", str(self.pid), "--duration", str(max(1, int(seconds))),
             "--rate", str(self.rate), "--format", "raw", "--output", str(self.out), "--nonblocking",
             "--full-filenames", "--subprocesses"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        return True

    def wait(self, timeout: float = 60) -> bool:
        if self.proc is None:
            return False
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        if self.proc.returncode != 0 or not self.out.exists() or os.path.getsize(self.out) == 0:
            self.error = out.decode("utf-8", "replace").strip()[-500:] or f"py-spy exited {self.proc.returncode}"
            return False
        return True


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (to/file.py)``: one entry per function."""
    frame = _LINE.sub(")", frame)
    name, _, path = frame.partition(" (")
    if path:
        parts = path.rstrip(")").split("/")
        for anchor in ("site-packages", "gateway", "lib"):
            if anchor in parts:
                i = len(parts) - 1 - parts[::-1].index(anchor)
                parts = parts[i + 1 :] if anchor != "gateway" else parts[i:]
                break
        else:
            parts = parts[-2:]
        return f"{name} ({'/'.join(parts)})"
    return name


def summarize_raw(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed stack) output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    by_module: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for f in set(frames):
            incl_counts[f] += count
        leaf = frames[-1]
        module = leaf.partition(" (")[2].rstrip(")") or leaf
        by_module[module.split("/")[0] if "/" in module else module] += count

    def pct(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * c / total, 1)) for name, c in counter.most_common(top)] if total else []

    return {"samples": total, "self": pct(self_counts), "inclusive": pct(incl_counts),
            "self_by_package": pct(by_module)}


def summarize_cprofile(path: Path, top: int = 15) -> dict[str, Any]:
    import pstats

    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0

    def name(key: tuple[str, int, str]) -> str:
        file, _, func = key
        return _short(f"{func} ({file}:0)")

    self_rows = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    incl_rows = sorted(entries.items(), key=lambda kv: kv[1][3], reverse=True)[:top]
    return {
        "samples": None,
        "self": [(name(k), round(100.0 * v[2] / total, 1)) for k, v in self_rows],
        "inclusive": [(name(k), round(100.0 * v[3] / total, 1)) for k, v in incl_rows],
        "self_by_package": [],
    }
