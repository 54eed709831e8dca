"""Shared helpers for benchmarks: machine description and docs/BENCHMARKS.md section replacement."""

from __future__ import annotations

import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DOC = ROOT / "docs" / "BENCHMARKS.md"
SHARED = ROOT.parent / "shared"
HEADER = "# Benchmarks\n\nEach section is rewritten by its benchmark (`make bench` runs them all). Ratios compare\nagainst a baseline measured in the same run on the same machine.\n"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        tv = f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        tv = ""
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}{tv}"


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _cpu_times() -> list[int] | None:
    """The machine's CPU counters from /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None


_START_TIMES = _cpu_times()  # when the benchmark imported this module


def steal_share() -> str:
    """Share of CPU time the hypervisor took for other machines since the benchmark started (a
    virtual machine's cores are not always its own, and stolen time slows every figure)."""
    now = _cpu_times()
    if not now or not _START_TIMES or len(now) < 8:
        return "?"
    delta = [a - b for a, b in zip(now, _START_TIMES, strict=False)]
    total = sum(delta[:8])
    return f"{100 * delta[7] / total:.0f}%" if total > 0 else "?"


def stamp() -> str:
    """When and where, with the 1-minute load average at the end of the run (other work on the same
    2 cores slows every figure, latencies most) and the CPU time stolen by the hypervisor."""
    return (f"_Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}; "
            f"load average {load_average()} when it finished, CPU steal {steal_share()} during the run._")


def write_section(name: str, body: str) -> None:
    """Replace the text between <!-- bench:NAME:start --> and <!-- bench:NAME:end --> (append if new)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    BENCH_DOC.parent.mkdir(parents=True, exist_ok=True)
    text = BENCH_DOC.read_text(encoding="utf-8") if BENCH_DOC.exists() else HEADER
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_DOC.write_text(text, encoding="utf-8")


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
