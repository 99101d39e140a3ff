"""2. Divergence handling: compute wasted on trials that go NaN or diverge.

A search space where many trials blow up (plain SGD with high momentum and learning rates up
to 1, deep ReLU nets): arms (a), (b) and (d) of ``benchmarks.tuning`` tune it with the same
budget. A trial *blew up* at the first epoch with a non-finite metric or a training loss above
10x that of its first epoch; every epoch trained after that one is wasted compute.

The objective is val_loss (minimized), so that a trial that ends NaN is what stock Optuna makes
of it: a failed trial, after all its epochs.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.report import Section, Table, progress, spread
from benchmarks.sizes import Sizes
from benchmarks.tuning import ARM_LABELS, ArmRun, Task, job_dict, run_tasks

NAME = "divergence"
DIVERGENT_SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    "momentum": {"type": "float", "low": 0.9, "high": 0.99},
    "layers": {"type": "int", "low": 1, "high": 4},
    "hidden": {"type": "categorical", "choices": [64, 128, 256]},
    "activation": {"type": "categorical", "choices": ["relu", "leaky_relu", "gelu"]},
}
DIVERGENT_PARAMS = {"optimizer": "sgd", "init": "he_normal", "batch_size": 64}
# Random search, stock Optuna and kubetune's guards: the other arms of part 1 differ from these
# in what they search, not in how a blow-up is handled.
ARMS = ("random", "optuna", "kubetune")


def run(sizes: Sizes, jobs: int) -> Section:
    started = time.perf_counter()
    tasks = [Task(arm, "digits", seed,
                  job_dict(f"div-{seed}", {"name": "digits"}, trials=sizes.divergence_trials,
                           epochs=sizes.epochs, seed=seed, space=DIVERGENT_SPACE,
                           params=DIVERGENT_PARAMS, metric="val_loss", direction="minimize"))
             for seed in range(sizes.divergence_seeds) for arm in ARMS]
    tasks.sort(key=lambda t: t.arm != "random")
    progress(NAME, f"{len(tasks)} tuning runs of {sizes.divergence_trials} trials in {jobs} "
                   "processes")
    runs = run_tasks(tasks, jobs, NAME)
    section = Section(NAME, "2. Divergence handling: compute wasted on NaN and diverging trials")
    section.settings = [
        f"digits, {sizes.divergence_trials} trials per run, {sizes.epochs} epochs per trial, "
        f"{sizes.divergence_seeds} seed(s) per arm; objective val_loss (minimize)",
        "space: lr 1e-3..1 (log), momentum 0.9..0.99, layers 1..4, hidden 64/128/256, "
        f"activation relu/leaky_relu/gelu; fixed {DIVERGENT_PARAMS}",
        "a trial *blew up* at the first epoch with a NaN/Inf metric or a training loss above "
        "10x its first epoch's (the definition kubetune's guards use by default); *wasted* "
        "counts the epochs trained after that epoch",
        "cells: median over seeds [min–max]",
    ]
    section.tables.append(_table(runs))
    section.headlines.append(_headline(runs))
    section.notes.append(
        "kubetune's row shows 0 wasted epochs by construction (its guards stop a trial at the "
        "epoch it blows up, with this very definition); what matters is how much the other "
        "arms waste, and that the guards cost no accuracy (best val_loss).")
    section.seconds = time.perf_counter() - started
    return section


def _wasted(run: ArmRun) -> int:
    return sum(t.epochs - t.blowup_epoch for t in run.trials if t.blowup_epoch is not None)


def _table(runs: list[ArmRun]) -> Table:
    rows = []
    for arm in ARMS:
        mine = [r for r in runs if r.arm == arm]
        rows.append([
            ARM_LABELS[arm],
            spread((sum(t.blowup_epoch is not None for t in r.trials) for r in mine), "{:.0f}"),
            spread((r.total_epochs for r in mine), "{:.0f}"),
            spread((sum(t.epochs for t in r.trials if t.blowup_epoch is not None)
                    for r in mine), "{:.0f}"),
            spread((_wasted(r) for r in mine), "{:.0f}"),
            spread((100 * _wasted(r) / max(1, r.total_epochs) for r in mine), "{:.0f}%"),
            spread((sum(t.state == "FAIL" for t in r.trials) for r in mine), "{:.0f}"),
            spread(b.value if b else None for b in (r.best() for r in mine)),
        ])
    return Table(["arm", "trials that blew up", "epochs trained", "epochs in blown-up trials",
                  "epochs wasted after blow-up", "share of compute wasted",
                  "trials failed (NaN final value)", "best val_loss"], rows)


def _headline(runs: list[ArmRun]) -> str:
    def med(arm: str, f) -> float:
        return statistics.median(f(r) for r in runs if r.arm == arm)

    share = {a: med(a, lambda r: 100 * _wasted(r) / max(1, r.total_epochs)) for a in ARMS}
    wasted = {a: med(a, _wasted) for a in ARMS}
    blown = med("random", lambda r: 100 * sum(t.blowup_epoch is not None for t in r.trials)
                / max(1, len(r.trials)))
    return (f"Divergence: on a space where {blown:.0f}% of random-search trials blow up, random "
            f"search wasted {wasted['random']:.0f} epochs ({share['random']:.0f}% of its "
            f"compute) and Optuna TPE + median pruner {wasted['optuna']:.0f} epochs "
            f"({share['optuna']:.0f}%) training trials after they had gone NaN or diverged; "
            f"kubetune wasted {wasted['kubetune']:.0f} (median over seeds).")
