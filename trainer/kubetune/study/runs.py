"""Where ``kubetune run`` keeps a run (its study journal, results and artifacts) by default, so
that other commands (results, plot, dashboard, export) find it by name."""

from __future__ import annotations

from pathlib import Path

RUNS_FOLDER = Path("kubetune-runs")  # under the working directory: ./kubetune-runs/<name>


def default_output(name: str) -> Path:
    """The output folder of a run of job ``name`` without ``--output``."""
    return RUNS_FOLDER / name


def find_run(name: str) -> Path | None:
    """``./kubetune-runs/<name>`` when a local run of that name is there, else None."""
    folder = default_output(name)
    return folder if "/" not in name and (folder / "result.json").is_file() else None
