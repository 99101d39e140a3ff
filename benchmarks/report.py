"""What a benchmark hands back, and the RESULTS.md it becomes.

Each benchmark returns a ``Section``: a title, the settings it ran with, one or more
``Table``s and a few plain-language headlines. ``render`` puts the sections under a header
that says when, where and with which command they ran.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""

    def markdown(self) -> str:
        lines = []
        if self.caption:
            lines += [f"**{self.caption}**", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Section:
    key: str                      # the --only name
    title: str
    settings: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    headlines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        if self.headlines:
            parts += [f"- **{h}**" for h in self.headlines] + [""]
        if self.settings:
            parts += ["Settings:", ""] + [f"- {s}" for s in self.settings] + [""]
        for table in self.tables:
            parts += [table.markdown(), ""]
        if self.notes:
            parts += [f"- {n}" for n in self.notes] + [""]
        parts.append(f"_Took {self.seconds:.0f} s._")
        return "\n".join(parts)


def render(sections: Sequence[Section], *, size: str, command: str, started: datetime,
           seconds: float, machine: dict[str, str], load_before: float) -> str:
    run_kind = {
        "quick": "the **quick** run (`--quick`): smaller counts than the full suite, as each "
                 "section's settings say. Run `python -m benchmarks` for the full counts.",
        "standard": "the **standard** run (`--standard`): every goal of issue 18 measured, "
                    "with the counts each section's settings say.",
        "full": "the **full** run: the counts the issue asks for.",
        "smoke": "a **smoke** run (`--smoke`): tiny counts that only check the suite works; "
                 "the numbers mean nothing.",
    }[size]
    head = [
        "# kubetune benchmark results",
        "",
        f"These are the results of {run_kind}",
        "",
        f"- Command: `{command}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Duration: {seconds / 60:.1f} min",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']} RAM, "
        f"{machine['os']}",
        f"- Software: {machine['software']}",
        f"- Code: {machine['commit']}",
        f"- Load before the run: {load_before:.2f} (the 1-minute load average; other work "
        "on the machine makes times, not epochs or bytes, noisier)",
        "",
    ]
    return "\n".join(head) + "\n" + "\n\n".join(s.markdown() for s in sections) + "\n"


# ---------------------------------------------------------------- the machine
def machine_info(postgres: str | None = None) -> dict[str, str]:
    import numpy
    import optuna
    import sklearn
    import torch

    software = (f"Python {platform.python_version()}, torch {torch.__version__}, "
                f"optuna {optuna.__version__}, scikit-learn {sklearn.__version__}, "
                f"numpy {numpy.__version__}")
    if postgres:
        software += f", {postgres}"
    return {"cpu": _cpu_model(), "cores": str(os.cpu_count() or "?"), "memory": _memory(),
            "os": _os_name(), "software": software, "commit": _commit()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if match:
            return f"{int(match.group(1)) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "?"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    return f"git {sha}" + (" with uncommitted changes in the working tree" if dirty else "")


# ---------------------------------------------------------------- numbers
def spread(values: Iterable[float], fmt: str = "{:.3f}") -> str:
    """``median [min–max]`` of the finite values; ``n/a`` when there are none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    med = fmt.format(statistics.median(vals))
    if len(vals) == 1:
        return med
    return f"{med} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]"


def median_or_inf(values: Iterable[float]) -> float:
    """Median where ``inf`` means "never" (a seed that did not reach the target)."""
    vals = sorted(values)
    return statistics.median(vals) if vals else math.inf


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    vals = sorted(values)
    pos = (len(vals) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def times(baseline: float, ours: float, unit: str) -> str:
    """"3.1x fewer epochs than", "1.2x more epochs than" or "as many epochs as"."""
    if ours <= 0 or math.isinf(ours) or math.isinf(baseline):
        return f"? {unit} than"
    ratio = baseline / ours
    if round(ratio, 1) == 1.0:
        return f"as many {unit} as"
    if ratio > 1:
        return f"{ratio:.1f}x fewer {unit} than"
    return f"{1 / ratio:.1f}x more {unit} than"


def progress(name: str, message: str) -> None:
    """One progress line on stdout while the suite runs."""
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {name}: {message}", flush=True)


def python_command() -> str:
    return "python -m benchmarks" + "".join(f" {a}" for a in sys.argv[1:])
