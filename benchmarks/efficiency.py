"""1. Tuning efficiency: better models for less compute, at the same trial budget.

For each dataset and seed, arms (a) random search without pruning, (b) Optuna TPE with its
median pruner, (c) kubetune's defaults and (d) kubetune plus its ensemble tune the same MLP on
the same split with the same space, budget and epochs per trial (see ``benchmarks.tuning``).
Reported per arm, as the median over seeds with the min–max range: the best validation
accuracy, the test accuracy of that best trial, the epochs trained in all, and the epochs
trained until a complete trial first reached a target validation accuracy.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from benchmarks.report import Section, Table, median_or_inf, progress, spread, times
from benchmarks.sizes import Sizes
from benchmarks.tuning import (
    ARM_LABELS,
    ARMS,
    FIXED_PARAMS,
    ArmRun,
    Task,
    job_dict,
    prepare_datasets,
    run_tasks,
)

NAME = "efficiency"
# Validation accuracy each arm is timed to: near the best any arm finds, so that reaching it
# takes a good configuration, not a lucky draw of the random start-up every arm shares.
# hard10 and noisy5: provisional, a little below a scikit-learn MLP's test accuracy on them
# (0.72, 0.68; benchmarks.tuning.HARD_DATASETS) until a full run measures the arms' best.
TARGETS = {"digits": 0.97, "breast_cancer": 0.99, "wine": 1.0, "hard10": 0.70, "noisy5": 0.66}


def run(sizes: Sizes, jobs: int) -> Section:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-data-") as folder:
        datasets = prepare_datasets(sizes.datasets, Path(folder))
        tasks = [Task(arm, name, seed,
                      job_dict(f"eff-{name.replace('_', '-')}-{seed}", dataset,
                               trials=sizes.trials, epochs=sizes.epochs, seed=seed),
                      ensemble=arm == "kubetune")
                 for name, dataset in datasets.items()
                 for seed in range(sizes.seeds) for arm in ARMS]
        # The slowest runs first, so that the last ones to finish are short.
        tasks.sort(key=lambda t: (t.dataset != "digits", t.arm != "random"))
        progress(NAME, f"{len(tasks)} tuning runs of {sizes.trials} trials in {jobs} "
                       f"processes")
        runs = run_tasks(tasks, jobs, NAME)
    section = Section(NAME, "1. Tuning efficiency: accuracy for the compute spent")
    section.settings = [
        f"datasets: {', '.join(sizes.datasets)} (scikit-learn's bundled copies, and the hard "
        "synthetic tasks hard10 and noisy5 of docs/benchmarks.md; all but digits written to "
        "CSV and read through kubetune's `file` source); the same stratified 60/20/20 "
        "train/validation/test split for every arm",
        f"{sizes.trials} trials per run, {sizes.epochs} epochs per trial, {sizes.seeds} "
        "seed(s) per arm (the seed sets the sampler and the training seeds); one trial at a time",
        "search space: the digits example's (lr, weight_decay, layers, hidden, dropout, "
        f"optimizer, activation), fixed {FIXED_PARAMS}; objective val_accuracy",
        "cells: median over seeds [min–max]; *epochs trained* is the compute: epochs actually "
        "trained, summed over all trials; *epochs to target* counts them until a complete "
        "trial first reached the target validation accuracy (never: ∞)",
        f"(b) is what a plain Optuna {_optuna_version()} user gets: TPESampler() and "
        "MedianPruner() with their defaults (this Optuna's TPE is multivariate by default); "
        "(c) is kubetune's default TPE, which is univariate unless `sampler.multivariate` is "
        "set, with the same median pruner plus the guards. So (b) and (c) differ in the TPE "
        "variant as well as in the guards",
        "the first 10 trials (TPE's random start-up) draw the same points in every arm, as "
        "the sampler seed is the same: the arms part where their algorithms do",
        "(d) is kubetune's ensemble step (`kubetune.ensemble.step.run_ensemble_step`, the job's "
        "default ensemble: greedy selection over the top 5 trials) on the study of (c); its "
        "members are chosen on the validation split, so its validation accuracy flatters it "
        "and only its test accuracy compares fairly with the best single trial's",
    ]
    for dataset in sizes.datasets:
        mine = [r for r in runs if r.dataset == dataset]
        section.tables.append(_table(dataset, mine, TARGETS[dataset]))
        section.headlines += _headlines(dataset, mine, TARGETS[dataset])
    for run in runs:
        if run.arm == "kubetune" and run.ensemble_note:
            section.notes.append(f"(d) on {run.dataset}, seed {run.seed}: no ensemble: "
                                 f"{run.ensemble_note}")
    section.seconds = time.perf_counter() - started
    return section


def _optuna_version() -> str:
    import optuna

    return optuna.__version__


def _by_arm(runs: list[ArmRun]) -> dict[str, list[ArmRun]]:
    return {arm: [r for r in runs if r.arm == arm] for arm in ARMS}


def _table(dataset: str, runs: list[ArmRun], target: float) -> Table:
    rows = []
    for arm, mine in _by_arm(runs).items():
        bests = [r.best() for r in mine]
        reach = [r.epochs_to_reach(target) for r in mine]
        rows.append([
            ARM_LABELS[arm],
            spread(b.value if b else None for b in bests),
            spread(b.test_accuracy if b else None for b in bests),
            spread((r.total_epochs for r in mine), "{:.0f}"),
            _reach_cell(reach),
            f"{sum(math.isfinite(x) for x in reach)}/{len(reach)}",
            spread((sum(t.state == "PRUNED" for t in r.trials) for r in mine), "{:.0f}"),
        ])
    kubetune = [r for r in runs if r.arm == "kubetune"]
    ens = [r for r in kubetune if r.ensemble]
    if ens:
        rows.append([ARM_LABELS["ensemble"],
                     spread(r.ensemble["val"] for r in ens),
                     spread(r.ensemble["test"] for r in ens),
                     spread((r.total_epochs for r in ens), "{:.0f}"),
                     "same as (c)", "—", "—"])
    else:
        missing = any((r.ensemble_note or "").startswith("not available") for r in kubetune)
        cell = "not available yet" if missing else "not built (see note)"
        rows.append([ARM_LABELS["ensemble"]] + [cell] * 3 + ["—"] * 3)
    return Table(["arm", "best val accuracy", "test accuracy (of best)", "epochs trained",
                  f"epochs to val ≥ {target}", "seeds reaching it", "trials pruned"],
                 rows, caption=f"{dataset}: target validation accuracy {target}")


def _reach_cell(values: list[float]) -> str:
    med = median_or_inf(values)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "∞ (never)"
    text = "∞" if math.isinf(med) else f"{med:.0f}"
    lo, hi = min(values), max(values)
    if len(values) > 1:
        text += f" [{lo:.0f}–{'∞' if math.isinf(hi) else f'{hi:.0f}'}]"
    return text


def _needed(baseline: float, ours: float) -> str:
    if math.isinf(baseline):
        return "more than its whole budget (its median run never got there)"
    return f"{baseline:.0f} ({baseline / ours:.1f}x as many)"


def _headlines(dataset: str, runs: list[ArmRun], target: float) -> list[str]:
    arms = _by_arm(runs)
    reach = {a: median_or_inf(r.epochs_to_reach(target) for r in arms[a]) for a in ARMS}
    total = {a: median_or_inf(r.total_epochs for r in arms[a]) for a in ARMS}
    best = {a: median_or_inf(b.value for b in (r.best() for r in arms[a]) if b) for a in ARMS}
    lines = []
    if math.isinf(reach["kubetune"]):
        lines.append(f"{dataset}: kubetune's median run did not reach {target} validation "
                     "accuracy within the budget.")
    else:
        lines.append(
            f"{dataset}: kubetune reached {target} validation accuracy after "
            f"{reach['kubetune']:.0f} epochs (median over seeds); random search without pruning "
            f"needed {_needed(reach['random'], reach['kubetune'])} and Optuna TPE + median "
            f"pruner {_needed(reach['optuna'], reach['kubetune'])}.")
    lines.append(
        f"{dataset}: over the whole budget kubetune trained "
        f"{times(total['random'], total['kubetune'], 'epochs')} random search "
        f"({total['kubetune']:.0f} vs {total['random']:.0f}), for a median best validation "
        f"accuracy of {best['kubetune']:.3f} vs {best['random']:.3f}; Optuna TPE + median "
        f"pruner: {best['optuna']:.3f} with {total['optuna']:.0f} epochs.")
    ens = [r for r in arms["kubetune"] if r.ensemble]
    if ens:
        single = median_or_inf(b.test_accuracy for b in (r.best() for r in ens) if b)
        lines.append(
            f"{dataset}: kubetune's ensemble scored a median test accuracy of "
            f"{median_or_inf(r.ensemble['test'] for r in ens):.3f} against {single:.3f} for "
            f"its best single trial, with no extra training ({len(ens)} seeds).")
    return lines
