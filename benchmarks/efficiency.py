"""1. Tuning efficiency: better models for less compute, at the same trial budget.

For each dataset and seed, arms (a) random search without pruning, (b) Optuna TPE with its
median pruner, (c) Optuna TPE with Hyperband, (d) kubetune's defaults, (e) kubetune's
recommended setting (the defaults with an ensemble of snapshots), (f) the defaults with the
default ensemble and (g) the staged preset tune the same MLP on the same split with the same
budget and epochs per trial (see ``benchmarks.tuning``). Reported per arm, as the median over
seeds with the min–max range: the best validation accuracy, the test accuracy of that best
trial (of the ensemble for (e) and (f)), the (data-weighted) epochs trained in all, the epochs
until a complete trial first reached a target validation accuracy, the epochs until the model a
user would have reached random search's median best test accuracy, and that model's test
accuracy once 30% of random search's epochs are spent (issue 18's goal 1)."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import Section, Table, median_or_inf, progress, spread, times
from benchmarks.sizes import Sizes
from benchmarks.tuning import (
    ARM_LABELS,
    ARMS,
    FIXED_PARAMS,
    MEMBER_KINDS,
    RECOMMENDED_MEMBERS,
    ArmRun,
    Task,
    job_dict,
    prepare_datasets,
    run_tasks,
    staged_job_dict,
)

NAME = "efficiency"
# Validation accuracy each arm is timed to: near the best any arm finds, so that reaching it
# takes a good configuration, not a lucky draw of the random start-up every arm shares.
# hard10 and noisy5: provisional, a little below a scikit-learn MLP's test accuracy on them
# (0.72, 0.68; benchmarks.tuning.HARD_DATASETS) until a full run measures the arms' best.
GOAL_SHARE = 0.3  # goal 1: random search's median best test accuracy within 30% of its epochs
TARGETS = {"digits": 0.97, "breast_cancer": 0.99, "wine": 1.0, "hard10": 0.70, "noisy5": 0.66}


def run(sizes: Sizes, jobs: int) -> Section:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-data-") as folder:
        datasets = prepare_datasets(sizes.datasets, Path(folder))
        tasks = [_task(arm, name, dataset, seed, sizes)
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
        "search space of (a)–(f): the digits example's (lr, weight_decay, layers, hidden, "
        f"dropout, optimizer, activation), fixed {FIXED_PARAMS}; (g): the mlp-classic preset "
        "(lr, weight_decay, hidden, layers, batch_size, dropout, grad_clip, optimizer), 60% "
        "of the trials in a coarse stage on a quarter of the epochs and of the training rows, "
        "the rest in a fine stage narrowed around its top 5; objective val_accuracy",
        "cells: median over seeds [min–max]; *epochs trained* is the compute: epochs actually "
        "trained, summed over all trials, an epoch on a quarter of the rows counting a quarter; "
        "*epochs to val target* counts them until a complete trial first reached the target "
        "validation accuracy; *epochs to random's test* until the best trial so far (on "
        "validation, as a user picks it) had a test accuracy of at least random search's "
        "median best (never: ∞); *test accuracy after N epochs* (N: 30% of random search's "
        "epochs, goal 1's budget) is that of the model a user has once N epochs are spent: "
        "the best trial so far, or for (e) and (f) the model a job that stopped after its last "
        "trial within N epochs gives",
        f"(b) is what a plain Optuna {_optuna_version()} user gets: TPESampler() and "
        "MedianPruner() with their defaults (this Optuna's TPE is multivariate by default); "
        "(d) is kubetune's default TPE, which keeps Optuna's own `multivariate` default "
        "unless `sampler.multivariate` is set, with the same median pruner plus the guards, "
        "through kubetune's trial runner",
        "the first 10 trials (TPE's random start-up) draw the same points in every arm, as "
        "the sampler seed is the same: the arms part where their algorithms do",
        "(c) is Optuna's HyperbandPruner(min_resource=1, max_resource=epochs, "
        "reduction_factor=3), the ASHA-like early stopping Katib and Ray Tune offer",
        "(e) and (f) are kubetune's ensemble step (`kubetune.ensemble.step`) on the study of "
        "(d), which trains nothing more: (e) with `members: snapshots` (docs/tuning.md's "
        "recommended setting), (f) with the default `members: trials`; each row is the model "
        "the job gives, the ensemble or, where no combination beat the best trial on "
        "validation, that trial's model. Their *epochs to random's test* and *test accuracy "
        "after N epochs* replay the job as if it had stopped after each trial: exact, as a "
        "job of k trials runs the first k trials of (d) (one at a time, seeded sampler). The "
        "members are chosen on the validation split, so an ensemble's validation accuracy "
        "flatters it and only its test accuracy compares fairly with a single model's",
    ]
    for dataset in sizes.datasets:
        mine = [r for r in runs if r.dataset == dataset]
        section.tables.append(_table(dataset, mine, TARGETS[dataset]))
        section.headlines += _headlines(dataset, mine, TARGETS[dataset])
    section.settings.append(
        "*ensemble members*: the ensemble step on each study of (d) three times, with "
        "`members: trials` (the top 20 trials' final models; (f)), `snapshots` (their models "
        "at two earlier epochs too, kept while the trials trained: (d)'s job keeps them, "
        "which changes none of its training) and `seeds` (the best configuration trained "
        "again with 4 more seeds); *extra epochs* are those trained after the search; "
        "*points per 100 extra epochs* is the test error cut against the best single trial, "
        "in percentage points, for each 100 of them; where no combination beat the best "
        "single model on validation, the job gives that model: 1.0x")
    section.tables.append(_members_table(runs, sizes.datasets))
    section.headlines += [line for dataset in sizes.datasets
                          if (line := _members_headline(dataset, runs))]
    for run in runs:
        if run.arm == "kubetune" and run.ensemble_note:
            section.notes.append(f"(f) on {run.dataset}, seed {run.seed}: no ensemble: "
                                 f"{run.ensemble_note}")
    section.seconds = time.perf_counter() - started
    return section


def _task(arm: str, name: str, dataset: dict[str, Any], seed: int, sizes: Sizes) -> Task:
    make = staged_job_dict if arm == "staged" else job_dict
    job = make(f"eff-{name.replace('_', '-')}-{seed}", dataset, trials=sizes.trials,
               epochs=sizes.epochs, seed=seed)
    if arm == "kubetune":  # its trials keep snapshots: (e) and the members table
        job["spec"]["ensemble"] = {"members": RECOMMENDED_MEMBERS}
    return Task(arm, name, seed, job, ensemble=arm == "kubetune")


def _members(runs: list[ArmRun], dataset: str, members: str) -> dict[str, list[float]]:
    mine = [r for r in runs if r.dataset == dataset and r.arm == "kubetune"]
    ratios = [r.ensemble_error_ratio(members) for r in mine]
    kept = [r.member_ensembles.get(members, {}).get("members") for r in mine]
    extra = [float(r.member_ensembles.get(members, {}).get("extra_epochs", 0)) for r in mine]
    gains = []  # points of test error cut per 100 extra epochs
    for run, ratio, epochs in zip(mine, ratios, extra):
        best = run.best()
        if ratio is None or best is None or best.test_accuracy is None or epochs <= 0:
            continue
        single = 1.0 - run.member_ensembles[members].get("single_test", best.test_accuracy)
        gains.append(100 * single * (1.0 - ratio) / epochs * 100)
    return {"ratios": [x for x in ratios if x is not None],
            "kept": [x for x in kept if x is not None], "extra": extra, "gains": gains,
            "search": [r.total_epochs for r in mine]}


def _members_table(runs: list[ArmRun], datasets: tuple[str, ...]) -> Table:
    rows = []
    for dataset in datasets:
        for members in MEMBER_KINDS:
            m = _members(runs, dataset, members)
            rows.append([dataset, members, spread(m["ratios"]),
                         f"{sum(x > 1.0 for x in m['ratios'])} of {len(m['ratios'])}",
                         spread(m["kept"], "{:.0f}"), spread(m["extra"], "{:.0f}"),
                         spread(m["gains"], "{:.2f}") if m["gains"] else "no extra epochs"])
    return Table(["dataset", "members", "test error / best single's", "seeds above 1.0x",
                  "models in the ensemble", "extra epochs", "points per 100 extra epochs"],
                 rows, caption="Ensemble members on the studies of (d): no extra training "
                               "(trials, snapshots) or four more trainings (seeds)")


def _members_headline(dataset: str, runs: list[ArmRun]) -> str | None:
    kinds = {members: _members(runs, dataset, members) for members in MEMBER_KINDS}
    if not all(k["ratios"] for k in kinds.values()):
        return None
    seeds = kinds["seeds"]
    extra, search = median_or_inf(seeds["extra"]), median_or_inf(seeds["search"])
    return (f"{dataset}: ensemble members, test error / best single's (median over seeds): "
            f"trials {median_or_inf(kinds['trials']['ratios']):.3f}x and snapshots "
            f"{median_or_inf(kinds['snapshots']['ratios']):.3f}x with no extra epochs; seeds "
            f"{median_or_inf(seeds['ratios']):.3f}x for {extra:.0f} extra epochs "
            f"({extra / search:.0%} of the search's {search:.0f}): "
            f"{median_or_inf(seeds['gains']) if seeds['gains'] else 0.0:.2f} points of test "
            "error per 100 extra epochs.")


def _optuna_version() -> str:
    import optuna

    return optuna.__version__


def _by_arm(runs: list[ArmRun]) -> dict[str, list[ArmRun]]:
    return {arm: [r for r in runs if r.arm == arm] for arm in ARMS}


def random_test_target(runs: list[ArmRun]) -> float:
    """Random search's median best test accuracy: the bar of goal 1."""
    return median_or_inf(b.test_accuracy for b in (r.best() for r in runs if r.arm == "random")
                         if b and b.test_accuracy is not None)


def goal_budget(runs: list[ArmRun]) -> float:
    """Goal 1's budget: 30% of random search's (median) epochs."""
    return GOAL_SHARE * median_or_inf(r.total_epochs for r in runs if r.arm == "random")


def _table(dataset: str, runs: list[ArmRun], target: float) -> Table:
    test_target, budget = random_test_target(runs), goal_budget(runs)
    arms = _by_arm(runs)
    rows = []
    for arm in ARMS:
        rows.append(_single_row(arm, arms[arm], target, test_target, budget))
        if arm == "kubetune":  # (e) and (f): the models its job gives
            rows.append(_result_row("recommended", arms[arm], RECOMMENDED_MEMBERS,
                                    test_target, budget))
            rows.append(_result_row("ensemble", arms[arm], "trials", test_target, budget))
    return Table(["arm", "best val accuracy", "test accuracy (of best)", "epochs trained",
                  f"epochs to val ≥ {target}", f"epochs to random's test {test_target:.3f}",
                  f"test accuracy after {_epochs(budget)} epochs", "trials pruned"],
                 rows, caption=f"{dataset}: target validation accuracy {target}")


def _epochs(value: float) -> str:
    return f"{value:.0f}" if value == round(value) else f"{value:.1f}"


def _single_row(arm: str, mine: list[ArmRun], target: float, test_target: float,
                budget: float) -> list[str]:
    bests = [r.best() for r in mine]
    return [
        ARM_LABELS[arm],
        spread(b.value if b else None for b in bests),
        spread(b.test_accuracy if b else None for b in bests),
        spread((r.total_epochs for r in mine), "{:.0f}"),
        _reach_cell([r.epochs_to_reach(target) for r in mine]),
        _reach_cell([r.epochs_to_test(test_target) for r in mine]),
        spread(r.test_at(budget) for r in mine),
        spread((sum(t.state == "PRUNED" for t in r.trials) for r in mine), "{:.0f}"),
    ]


def _result_row(arm: str, mine: list[ArmRun], members: str, test_target: float,
                budget: float) -> list[str]:
    """(e) and (f): the model the job gives, an ensemble of ``members`` or, where none beat
    it on validation, the best trial's; (d)'s training."""
    label = ARM_LABELS[arm]
    ran = [r for r in mine if r.result_curves.get(members)]
    if not ran:
        notes = [r.member_ensembles.get(members, {}).get("note") or "" for r in mine]
        missing = any(n.startswith("not available") for n in notes)
        cell = "not available yet" if missing else "not built (see note)"
        return [label] + [cell] * 3 + ["—"] * 4
    return [
        label,
        spread(_result_value(r, members) for r in ran),
        spread(r.result_curves[members][-1][1] for r in ran),
        spread((r.total_epochs for r in ran), "{:.0f}"),
        "—",
        _reach_cell([r.epochs_to_result_test(test_target, members) for r in ran]),
        spread(r.result_test_at(budget, members) for r in ran),
        "same as (d)",
    ]


def _result_value(run: ArmRun, members: str) -> float | None:
    """The validation value of the model the job gives: the ensemble's, else its best
    trial's."""
    built = run.member_ensembles.get(members, {})
    if "val" in built:
        return built["val"]
    best = run.best()
    return best.value if best else None


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


def _share(part: float, whole: float) -> str:
    return "never (median)" if math.isinf(part) else f"{part:.0f} epochs, {part / whole:.0%}"


def _headlines(dataset: str, runs: list[ArmRun], target: float) -> list[str]:
    arms = _by_arm(runs)
    reach = {a: median_or_inf(r.epochs_to_reach(target) for r in arms[a]) for a in ARMS}
    total = {a: median_or_inf(r.total_epochs for r in arms[a]) for a in ARMS}
    best = {a: median_or_inf(b.value for b in (r.best() for r in arms[a]) if b) for a in ARMS}
    test = {a: median_or_inf(b.test_accuracy for b in (r.best() for r in arms[a])
                             if b and b.test_accuracy is not None) for a in ARMS}
    test_target = random_test_target(runs)
    to_test = {a: median_or_inf(r.epochs_to_test(test_target) for r in arms[a]) for a in ARMS}
    rows = max((r.test_rows for r in runs), default=0)
    error = math.sqrt(test_target * (1 - test_target) / rows) if rows else math.nan
    budget = goal_budget(runs)
    result_to = median_or_inf(r.epochs_to_result_test(test_target, RECOMMENDED_MEMBERS)
                              for r in arms["kubetune"])
    result_at = [x for r in arms["kubetune"]
                 if (x := r.result_test_at(budget, RECOMMENDED_MEMBERS)) is not None]
    at_budget = median_or_inf(result_at) if result_at else math.nan
    met = "met" if result_at and at_budget >= test_target else "not met"
    within = "within" if test["random"] - test["kubetune"] <= error else "more than"
    lines = [
        f"{dataset}: goal 1 (random search's median best test accuracy, {test_target:.3f}, "
        f"with at most 30% of its {total['random']:.0f} epochs): {met}. kubetune recommended "
        f"(the model the job gives) reached it after "
        f"{_share(result_to, total['random'])}; "
        + (f"a job stopped at {_epochs(budget)} epochs gives {at_budget:.3f} test accuracy"
           + (f" [{min(result_at):.3f}–{max(result_at):.3f}]" if len(result_at) > 1 else "")
           if result_at else f"no trial ended within {_epochs(budget)} epochs")
        + ". Best single models: kubetune defaults "
        f"{_share(to_test['kubetune'], total['random'])}; Optuna TPE + median pruner "
        f"{_share(to_test['optuna'], total['random'])}; Optuna TPE + Hyperband "
        f"{_share(to_test['hyperband'], total['random'])}; staged preset "
        f"{_share(to_test['staged'], total['random'])} (median over seeds).",
        f"{dataset}: best single model's test accuracy, median over seeds: kubetune defaults "
        f"(the recommended setting's search) {test['kubetune']:.3f}, {within} the test "
        f"split's standard error ({error:.3f}) of random search's {test['random']:.3f}; "
        f"staged preset {test['staged']:.3f}.",
    ]
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
    ratios = [x for x in (r.ensemble_error_ratio() for r in arms["kubetune"]) if x is not None]
    if ratios:
        lines.append(
            f"{dataset}: goal 2 (ensemble test error ≤ 0.92x the best single trial's, median; "
            f"never above 1.0x): {median_or_inf(ratios):.3f}x median, "
            f"{min(ratios):.3f}–{max(ratios):.3f} over {len(ratios)} seeds, no extra training.")
    return lines
