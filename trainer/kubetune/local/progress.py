"""What ``kubetune run`` shows: a live progress bar on a terminal, plain lines elsewhere,
and a leaderboard at the end, with the ensemble against the best single trial."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from kubetune.search.space import effective_max_trials
from kubetune.spec.model import TuningJob


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Rich exits with status 1; ``kubetune.cli`` stops quietly instead (``| head``)."""
        self.quiet = True
        raise BrokenPipeError


def make_console() -> Console:
    """Rich's console for kubetune's output: on a terminal, lines wrap at its width; elsewhere
    (a file, a pipe, a CI log) a line stays whole, as grep and a wider window want it."""
    console = _Console(highlight=False)
    console.soft_wrap = not console.is_terminal
    return console


class ProgressView:
    def __init__(self, job: TuningJob, *, quiet: bool = False,
                 console: Console | None = None) -> None:
        self._job = job
        self._quiet = quiet
        self._console = console or make_console()
        self._live = self._console.is_terminal and not quiet
        self._progress: Progress | None = None
        self._task: Any = None
        self._last_line = ("", 0.0)
        self._last_phase = ""
        self._preflight_told = False

    # ------------------------------------------------------------------ lifecycle
    def intro(self, *, storage: str, output: Path, workers: int, resumed: int,
              done: int, warm: dict[str, Any] | None = None) -> None:
        if self._quiet:
            return
        spec = self._job.spec
        what = f"continuing study ({done} trials done)" if done else "new study"
        slots = spec.budget.trials_per_worker
        at_once = f" x {slots} trials at once" if slots > 1 else ""
        self._console.print(
            f"[bold]kubetune run {self._job.name}[/]: {what}, up to "
            f"{effective_max_trials(spec)} trials, {workers} worker(s){at_once}, "
            f"{objective_text(spec.objective)}")
        self._console.print(f"  storage: {storage}\n  output:  {output}")
        if resumed:
            self._console.print(f"  {resumed} trial(s) left running by an earlier run were "
                                "queued again")
        if warm:
            self._console.print(f"  warm start: {warm_start_text(warm)}")

    def __enter__(self) -> ProgressView:
        if self._live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                console=self._console, transient=False)
            self._task = self._progress.add_task(
                "trials", total=effective_max_trials(self._job.spec), detail="")
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    # ------------------------------------------------------------------ updates
    def update(self, status: dict[str, Any]) -> None:
        self._tell_preflight(status.get("preflight"))
        done, _, total = status["progress"].partition("/")
        detail = self._detail(status)
        ensembling = status.get("phase") == "Ensembling"
        if self._progress is not None:
            self._progress.update(self._task, completed=int(done), total=int(total),
                                  detail=detail,
                                  description="ensembling" if ensembling else "trials")
        elif not self._quiet:
            line = f"trials {status['progress']}  {detail}"
            last, when = self._last_line
            changed = status.get("phase", "") != self._last_phase
            if line != last and (changed or time.monotonic() - when >= 2.0):
                self._console.print(line)
                self._last_line = (line, time.monotonic())
        self._last_phase = status.get("phase", "")

    def _tell_preflight(self, preflight: dict[str, Any] | None) -> None:
        """One line once the first worker has run the preflight; a failure is told by the
        summary at the end."""
        if self._quiet or self._preflight_told or not preflight:
            return
        self._preflight_told = True
        if preflight.get("result") != "failed":
            self._console.print(f"preflight {preflight['result']}: {preflight['message']}")

    def _detail(self, status: dict[str, Any]) -> str:
        trials = status["trials"]
        best = status.get("best")
        best_text = f"best {best['value']:.4g} (#{best['trial']})" if best else "best -"
        if status.get("phase") == "Ensembling":
            cond = next((c for c in status.get("conditions", [])
                         if c["type"] == "EnsembleReady"), None)
            return f"{best_text}  Ensembling: {cond['message'] if cond else ''}".rstrip()
        stage = f"stage {status['stage']}  " if len(status.get("stages") or ()) > 1 else ""
        return (f"{stage}{best_text}  running {trials['running']}  pruned {trials['pruned']}  "
                f"failed {trials['failed']}")

    def interrupted(self, output: Path) -> None:
        self._console.print(f"interrupted: run the same command again to continue "
                            f"(results so far in {output})")

    def summary(self, status: dict[str, Any], result_path: Path, *,
                elapsed: float | None = None, plots: Path | None = None,
                run: str | None = None) -> None:
        """The leaderboard and how the job ended, then where its files are, how long it took
        and what to run next (``run``: how the commands name the run folder)."""
        if self._quiet:
            return
        print_summary(status, self._console)
        self._console.print(f"result: {result_path}", markup=False)
        if plots is not None:
            self._console.print(f"plots:  {plots}", markup=False)
        if elapsed is not None:
            self._console.print(f"{status.get('phase', 'finished').lower()} in "
                                f"{duration(elapsed)}", markup=False)
        if run is not None:
            for line in next_steps(status, run, models=self._job.spec.trainer.is_builtin):
                self._console.print(line, markup=False)


def duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``1h 02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def next_steps(status: dict[str, Any], run: str, *, models: bool = True) -> list[str]:
    """The follow-up commands for a finished run (``run``: its name or folder; ``models``:
    whether kubetune kept the trials' models, which it does for the built-in trainer only)."""
    steps = [(f"kubetune results {run}", "the leaderboard again (--json: the whole status)"),
             (f"kubetune plot {run}", "redraw the learning curves and search plots")]
    if status.get("ensemble"):
        steps.append((f"kubetune export {run} --output model",
                      "the ensemble as a model folder for kubetune.load_ensemble"))
    elif status.get("best") and models:
        steps.append((f"kubetune export {run} --trial {status['best']['trial']} --output "
                      "model", "the best trial's model, for kubetune.load_ensemble"))
    width = max(len(command) for command, _ in steps)
    return ["next:"] + [f"  {command:<{width}}  {what}" for command, what in steps]


def print_summary(status: dict[str, Any], console: Console | None = None) -> None:
    """Leaderboard, how the job ended, why trials were pruned and what their curves say."""
    console = console or make_console()
    if status.get("leaderboard"):
        console.print(leaderboard_table(status))
    front = pareto_table(status)
    if front is not None:
        console.print(front)
    for cond in status.get("conditions", []):
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            console.print(f"[bold]{status['phase']}[/] ({cond['reason']}): {cond['message']}")
    reasons = status.get("pruneReasons") or {}
    if reasons:
        console.print("pruned: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    warm = status.get("warmStart")
    if warm:
        console.print(f"warm start: {warm.get('copiedTrials', 0)} trial(s) copied from job "
                      f"{warm.get('fromJob')!r} guided the sampler (not ranked above, no "
                      "budget used)", markup=False)
    _print_failures(status, console)
    _print_stages(status, console)
    spent = status.get("compute")
    if spent:
        data = (f" ({spent['dataEpochs']:,g} in epochs of the full data)"
                if "dataEpochs" in spent else "")
        console.print(f"compute: {spent['epochsTrained']:,} epochs trained{data}", markup=False)
    diagnosis = status.get("diagnosis")
    if diagnosis:
        counts = ", ".join(f"{k} {v}" for k, v in diagnosis["counts"].items())
        pruned = diagnosis.get("pruned")
        console.print(f"diagnosis: {counts or 'no trial ran to its end'}", markup=False)
        if pruned:
            console.print(f"  pruned early (not labelled): {pruned['trials']}, "
                          f"{pruned['atEpoch']} of them after {pruned['epoch']} epoch"
                          f"{'s' if pruned['epoch'] != 1 else ''}", markup=False)
        console.print(f"  advice: {diagnosis['advice']}", markup=False)
    _print_ensemble(status, console)


def _print_failures(status: dict[str, Any], console: Console) -> None:
    """Why the latest trials failed: the first line of each reason."""
    failures = status.get("failures") or []
    if failures:
        console.print(f"failed ({status['trials']['failed']}), latest first:", markup=False)
    for failure in failures:
        first = failure["reason"].splitlines()[0] if failure["reason"] else ""
        console.print(f"  #{failure['trial']}: {first}", markup=False)


def _print_stages(status: dict[str, Any], console: Console) -> None:
    """Each stage of a staged job: trials, fidelity and the ranges it searched."""
    stages = status.get("stages") or []
    if len(stages) < 2:
        return
    for stage in stages:
        cheap = ", ".join(([f"{stage['epochs']} epochs"] if "epochs" in stage else [])
                          + [f"{k} {v}" for k, v in (stage.get("data") or {}).items()])
        ranges = "; ".join(f"{k} {v}" for k, v in (stage.get("ranges") or {}).items())
        console.print(f"stage {stage['name']}: {stage['finished']}/{stage['trials']} trials, "
                      f"{stage['fidelity']} fidelity{f' ({cheap})' if cheap else ''}"
                      f"{f': {ranges}' if ranges else ''}", markup=False)


def _print_ensemble(status: dict[str, Any], console: Console) -> None:
    """The ensemble against the best single trial on the test split, or why there is none."""
    ensemble = status.get("ensemble")
    if ensemble:
        members = ", ".join(_member(m) for m in ensemble["members"])
        console.print(
            f"[bold]ensemble[/] ({ensemble['method']}, {ensemble['memberSource']}): "
            f"test {ensemble['metric'].removeprefix('val_')} {ensemble['testValue']:.4g} vs "
            f"best single trial "
            f"#{ensemble['bestSingleTrial']} {ensemble['bestSingleTestValue']:.4g} "
            f"(validation {ensemble['validationValue']:.4g} vs "
            f"{ensemble['bestSingleValidationValue']:.4g})")
        console.print(f"  members: {members}")
        if ensemble.get("note"):
            console.print(f"  note: {ensemble['note']}")
        return
    for cond in status.get("conditions", []):
        if cond["type"] == "EnsembleReady" and cond["status"] == "False":
            console.print(f"no ensemble ({cond['reason']}): {cond['message']}")


def _member(member: dict[str, Any]) -> str:
    extra = "".join(f" {k} {member[k]}" for k in ("seed", "epoch") if k in member)
    return f"#{member['trial']}{extra} x{member['weight']:.3g}"


def objective_text(objective: Any) -> str:
    """``objective val_accuracy (maximize)``, or with several ``objectives val_accuracy
    (maximize, primary), n_params (minimize)``."""
    if not objective.is_multi:
        return f"objective {objective.primary_metric} ({objective.resolved_direction})"
    return "objectives " + ", ".join(
        f"{name} ({direction}{', primary' if name == objective.primary_metric else ''})"
        for name, direction in zip(objective.names, objective.directions))


def leaderboard_table(status: dict[str, Any]) -> Table:
    objective = status["objective"]
    table = Table(title=f"{status['name']}: top trials by {objective['metric']} "
                        f"({objective['direction']})")
    _trial_rows(table, objective, status.get("leaderboard", []))
    return table


def pareto_table(status: dict[str, Any]) -> Table | None:
    """The Pareto front of a job with several objectives (``status.paretoFront``)."""
    front = status.get("paretoFront")
    if not isinstance(front, dict):
        return None
    shown = front.get("trials") or []
    size = front.get("size", len(shown))
    names = " vs ".join(f"{m['metric']} ({m['direction']})"
                        for m in status["objective"].get("metrics", []))
    more = f", {len(shown)} shown" if len(shown) < size else ""
    table = Table(title=f"{status['name']}: Pareto front of {names}: {size} trials{more}")
    _trial_rows(table, status["objective"], shown)
    return table


def _trial_rows(table: Table, objective: dict[str, Any], entries: list[dict[str, Any]]
                ) -> None:
    metrics = [m["metric"] for m in objective.get("metrics", [])] or [objective["metric"]]
    table.add_column("#", justify="right")
    table.add_column("trial", justify="right")
    for name in metrics:
        table.add_column(name, justify="right")
    table.add_column("params")
    for rank, entry in enumerate(entries, start=1):
        params = ", ".join(f"{k}={_short(v)}" for k, v in entry["params"].items())
        values = entry.get("values") or [entry["value"]]
        table.add_row(str(rank), str(entry["trial"]), *(f"{v:.5g}" for v in values), params)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def warm_start_text(warm: dict[str, Any]) -> str:
    """What ``spec.warmStart`` did when the study was created (``WARM_START_ATTR``)."""
    parts = []
    if warm.get("enqueued"):
        parts.append(f"{warm['enqueued']} given configuration(s) tried first")
    if "fromJob" in warm:
        skipped = warm.get("skipped", 0)
        parts.append(f"{warm.get('copied', 0)} complete trial(s) copied from job "
                     f"{warm['fromJob']!r} to guide the sampler (no budget used, not ranked)"
                     + (f"; {skipped} left out (outside this search space, or not complete "
                        "at full fidelity)" if skipped else ""))
    return "; ".join(parts) or "nothing to do"
