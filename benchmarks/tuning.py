"""The ways of tuning that parts 1 and 2 compare, on the same trainer, data, space and budget.

Every arm trains with ``kubetune.builtin.mlp.train`` on the same split, with the same epochs
per trial, the same seed per trial number and the same number of trials; the arms differ only
in sampler, pruner, guards and (e) search space and stages:

* ``random``: (a) what Katib does by default: Optuna's ``RandomSampler``, no pruning, stock
  ``study.optimize``. A NaN final value fails the trial, as stock Optuna does, after it trained
  all its epochs.
* ``optuna``: (b) plain Optuna: ``TPESampler`` and ``MedianPruner`` with their defaults, every
  epoch's objective reported (a NaN too) and ``should_prune`` asked after it.
* ``hyperband``: (c) plain Optuna with its ASHA-like pruner: ``TPESampler`` and
  ``HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)``, reported and
  asked like (b).
* ``kubetune``: (d) kubetune's defaults, through kubetune's own code: the TuningJob is parsed by
  ``kubetune.spec.model``, the sampler and pruner come from ``make_sampler``/``make_pruner``
  and each trial runs in ``kubetune.worker.trial.run_trial`` (NaN/divergence guards, then the
  pruner). It runs in process on an in-memory study, artifacts in a temp folder, instead of
  worker processes, so the comparison measures tuning, not process start-up.
* (e) kubetune's recommended setting (docs/tuning.md): (d) with ``ensemble.members:
  snapshots``, judged by the model the job gives: its ensemble of the top trials' models at
  their last and two earlier epochs (kept while the trials trained; it changes none of (d)'s
  training), or the best trial's model when no combination beats it on validation. It trains
  nothing beyond (d), so it reuses (d)'s study; *had the job stopped after each trial* is
  exact, as a job of k trials runs the first k trials of (d), one at a time from the seeded
  sampler.
* (f) ``kubetune`` plus the job's default ensemble (``members: trials``) on the finished study
  of (d); it trains nothing more, so its compute is that of (d).
* ``staged``: (g) the ``mlp-classic`` preset and two coarse-to-fine stages, the first on a
  quarter of the epochs and of the training rows, run through kubetune's stage asker as a
  worker does.

Compute is counted in epochs actually trained, summed over the trials; an epoch on a share of
the training rows counts as that share of an epoch (data-weighted epochs). Each run also notes, per
trial, the first epoch at which training *blew up*: a non-finite metric, or a training loss
above 10x that of the first epoch (the definition of kubetune's guards with their defaults).
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARMS = ("random", "optuna", "hyperband", "kubetune", "staged")
ARM_LABELS = {
    "random": "(a) random search, no pruning (Katib default)",
    "optuna": "(b) Optuna TPE + median pruner",
    "hyperband": "(c) Optuna TPE + Hyperband pruner (ASHA-like)",
    "kubetune": "(d) kubetune defaults (TPE + NaN/divergence guards + median pruner)",
    "recommended": "(e) kubetune recommended (defaults + an ensemble of snapshots: the job's "
                   "final model)",
    "ensemble": "(f) kubetune defaults + ensemble (the top trials' final models)",
    "staged": "(g) kubetune staged preset (mlp-classic preset + coarse-to-fine stages)",
}
RECOMMENDED_MEMBERS = "snapshots"  # (e): spec.ensemble.members of the recommended setting
BLOWUP_FACTOR = 10.0
# What (f) combines (spec.ensemble.members): the top trials' final models, those models at
# earlier epochs too (kept while the trials trained), the best configuration trained again
# with other seeds (spec.ensemble.seeds, default 5: four more trainings).
MEMBER_KINDS = ("trials", "snapshots", "seeds")
NO_BETTER = "NoBetterCombination"  # kubetune.ensemble.step's reason: the best model alone

# The digits example's search space (examples/digits-mlp.yaml), used for every dataset.
SEARCH_SPACE: dict[str, Any] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "layers": {"type": "int", "low": 1, "high": 3},
    "hidden": {"type": "categorical", "choices": [32, 64, 128, 256]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adam", "adamw", "rmsprop"]},
    "activation": {"type": "categorical", "choices": ["relu", "gelu", "tanh"]},
}
FIXED_PARAMS: dict[str, Any] = {"batch_size": 64, "init": "he_uniform"}

# Datasets that ship with scikit-learn, written to CSV and read through kubetune's `file` source.
SKLEARN_DATASETS = ("breast_cancer", "wine")

# Hard synthetic tasks (issue 18): digits and breast_cancer sit at their ceiling for every arm,
# so they cannot tell methods apart. These are scikit-learn's make_classification problems
# with more classes, label noise (flip_y: that share of the labels is drawn at random) and
# uninformative columns (pure noise), written to CSV like the tables above. A scikit-learn MLP
# (2 x 256, alpha 1e-3) reaches about 0.72 test accuracy on hard10 and 0.68 on noisy5, a
# logistic regression 0.56 and 0.70: the ceiling is well below 1.0, and capacity (hard10) or
# regularisation against the noise columns and labels (noisy5) is what a search must find.
HARD_DATASETS: dict[str, dict[str, Any]] = {
    # 10 classes, 12 informative of 40 columns, 5% random labels
    "hard10": {"n_samples": 4000, "n_features": 40, "n_informative": 12, "n_classes": 10,
               "class_sep": 1.6, "flip_y": 0.05},
    # 5 classes, 8 informative of 60 columns, 20% random labels
    "noisy5": {"n_samples": 3000, "n_features": 60, "n_informative": 8, "n_classes": 5,
               "class_sep": 2.0, "flip_y": 0.20},
}


# ---------------------------------------------------------------- what a run records
@dataclass
class TrialRecord:
    number: int
    state: str                       # COMPLETE | PRUNED | FAIL
    epochs: int                      # epochs trained
    value: float | None              # final objective of a complete trial
    test_accuracy: float | None      # of a trial that trained to the end
    blowup_epoch: int | None         # first epoch that went NaN or diverged
    data_share: float = 1.0          # the share of the training rows it trained on
    full: bool = True                # full fidelity: its value competes for the best

    @property
    def cost(self) -> float:
        """Data-weighted epochs."""
        return self.epochs * self.data_share

    @property
    def competes(self) -> bool:
        """A complete full-fidelity trial with a finite value: one that can be the best."""
        return (self.state == "COMPLETE" and self.value is not None and self.full
                and math.isfinite(self.value))


@dataclass
class ArmRun:
    arm: str
    dataset: str
    seed: int
    maximize: bool
    trials: list[TrialRecord]
    seconds: float
    ensemble: dict[str, float] | None = None   # (d): val/test value of the ensemble
    ensemble_note: str | None = None           # why (f) has no numbers
    test_rows: int = 0                         # rows of the test split
    # (d): the ensemble of each kind of member (MEMBER_KINDS) on the same study: its values,
    # or the "note" why none was built, and "extra_epochs", trained beyond the search
    member_ensembles: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (d): what the job gives as its final model had it stopped after each trial (a job with
    # that many trials runs exactly those trials: one at a time, seeded), per kind of member:
    # (epochs trained so far, test accuracy of the ensemble, or of the best single model when
    # no combination beat it)
    result_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @property
    def total_epochs(self) -> float:
        """Data-weighted epochs trained in all."""
        return sum(t.cost for t in self.trials)

    def best(self) -> TrialRecord | None:
        """The best complete full-fidelity trial (ties: the earlier one), as the study
        reports it."""
        done = [t for t in self.trials if t.competes]
        if not done:
            return None
        sign = -1.0 if self.maximize else 1.0
        return min(done, key=lambda t: (sign * t.value, t.number))

    def epochs_to_reach(self, target: float) -> float:
        """Epochs trained until a complete trial first reached ``target``; inf if none did."""
        spent = 0.0
        for trial in sorted(self.trials, key=lambda t: t.number):
            spent += trial.cost
            if trial.state == "COMPLETE" and trial.value is not None and trial.full and (
                    trial.value >= target if self.maximize else trial.value <= target):
                return spent
        return math.inf

    def best_curve(self) -> list[tuple[float, float | None]]:
        """(epochs trained, test accuracy of the best trial so far on validation, as a user
        picks it) after each trial; None before any trial completed."""
        curve: list[tuple[float, float | None]] = []
        spent, best = 0.0, None
        sign = -1.0 if self.maximize else 1.0
        for trial in sorted(self.trials, key=lambda t: t.number):
            spent += trial.cost
            if trial.competes and (best is None or sign * trial.value < sign * best.value):
                best = trial
            curve.append((spent, None if best is None else best.test_accuracy))
        return curve

    def epochs_to_test(self, target: float) -> float:
        """Epochs trained until the run's best trial so far has a test accuracy of at least
        ``target``; inf if it never had."""
        return epochs_to(self.best_curve(), target)

    def test_at(self, budget: float) -> float | None:
        """The test accuracy of the best trial (on validation) among those that ended within
        ``budget`` epochs: what a user has after spending that much."""
        return value_at(self.best_curve(), budget)

    def result_test_at(self, budget: float, members: str) -> float | None:
        """The test accuracy of the job's final model (``result_curves``) had it stopped after
        the last trial that ended within ``budget`` epochs."""
        return value_at(self.result_curves.get(members, []), budget)

    def epochs_to_result_test(self, target: float, members: str) -> float:
        """Epochs trained until the job's final model (``result_curves``) would have had a test
        accuracy of at least ``target``; inf if it never had."""
        return epochs_to(self.result_curves.get(members, []), target)

    def ensemble_error_ratio(self, members: str = "trials") -> float | None:
        """The ensemble's test error over its best single trial's (below 1: it helped);
        ``members``: the kind of member (MEMBER_KINDS). Where no combination beat the best
        single model on validation, that model is what the job gives (1.0)."""
        ensemble = self.member_ensembles.get(members)
        if ensemble is None and members == "trials":
            ensemble = self.ensemble
        best = self.best()
        if not ensemble or best is None or best.test_accuracy is None:
            return None
        if "test" not in ensemble:
            return 1.0 if (ensemble.get("note") or "").startswith(NO_BETTER) else None
        single = 1.0 - ensemble.get("single_test", best.test_accuracy)
        return (1.0 - ensemble["test"]) / single if single > 0 else None


def epochs_to(curve: list[tuple[float, float | None]], target: float) -> float:
    """The epochs at the first point of ``curve`` whose value is at least ``target``; inf if
    none is."""
    for spent, value in curve:
        if value is not None and value >= target:
            return spent
    return math.inf


def value_at(curve: list[tuple[float, float | None]], budget: float) -> float | None:
    """The value at the last point of ``curve`` within ``budget`` epochs (None if none is)."""
    within = [value for spent, value in curve if spent <= budget]
    return within[-1] if within else None


@dataclass
class Task:
    arm: str
    dataset: str
    seed: int
    job: dict[str, Any]
    ensemble: bool = False


# ---------------------------------------------------------------- inputs
def prepare_datasets(names: tuple[str, ...], folder: Path) -> dict[str, dict[str, Any]]:
    """kubetune dataset specs; scikit-learn's bundled tables are written to CSV files first."""
    specs: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "digits":
            specs[name] = {"name": "digits"}
        elif name in SKLEARN_DATASETS:
            specs[name] = {"name": "file", "path": str(_write_csv(name, folder)),
                           "labelColumn": "label"}
        elif name in HARD_DATASETS:
            specs[name] = {"name": "file", "path": str(write_hard_csv(name, folder)),
                           "labelColumn": "label"}
        else:
            raise ValueError(f"unknown benchmark dataset {name!r}")
    return specs


def hard_dataset(name: str) -> tuple[Any, Any]:
    """(X, y) of a hard synthetic task; the same rows on every call (seed 0)."""
    from sklearn.datasets import make_classification

    return make_classification(n_redundant=0, random_state=0, **HARD_DATASETS[name])


def write_hard_csv(name: str, folder: Path) -> Path:
    X, y = hard_dataset(name)
    path = folder / f"{name}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"x{i}" for i in range(X.shape[1])] + ["label"])
        for row, label in zip(X, y):
            writer.writerow([repr(float(v)) for v in row] + [int(label)])
    return path


def _write_csv(name: str, folder: Path) -> Path:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    path = folder / f"{name}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"x{i}" for i in range(bunch.data.shape[1])] + ["label"])
        for row, label in zip(bunch.data, bunch.target):
            writer.writerow([repr(float(v)) for v in row] + [int(label)])
    return path


def job_dict(name: str, dataset: dict[str, Any], *, trials: int, epochs: int, seed: int,
             space: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
             metric: str = "val_accuracy", direction: str = "maximize") -> dict[str, Any]:
    """One TuningJob for every arm; ``pruning`` is left out, so kubetune uses its defaults."""
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob",
        "metadata": {"name": name},
        "spec": {
            "objective": {"metric": metric, "direction": direction},
            "searchSpace": space or SEARCH_SPACE,
            "budget": {"maxTrials": trials, "parallelism": 1, "maxFailedTrials": trials},
            "sampler": {"type": "tpe", "seed": seed},
            "trainer": {"builtin": {"dataset": dataset, "epochs": epochs, "device": "cpu",
                                    "params": dict(FIXED_PARAMS if params is None else params),
                                    "seed": seed * 100_000}},
        },
    }


def staged_job_dict(name: str, dataset: dict[str, Any], *, trials: int, epochs: int,
                    seed: int) -> dict[str, Any]:
    """(g): the job of ``job_dict`` with the ``mlp-classic`` preset, and 60% of the trials in a
    coarse stage on a quarter of the epochs and of the training rows, whose top 5 trials narrow
    the full-fidelity fine stage."""
    job = job_dict(name, dataset, trials=trials, epochs=epochs, seed=seed,
                   space={"preset": "mlp-classic"}, params={"init": FIXED_PARAMS["init"]})
    coarse = max(1, round(0.6 * trials))
    job["spec"]["stages"] = [
        {"name": "coarse", "trials": coarse, "top": min(5, coarse),
         "epochs": max(1, epochs // 4), "data": {"fraction": 0.25}},
        {"name": "fine", "trials": trials - coarse},
    ]
    return job


# ---------------------------------------------------------------- running tasks
_pool: ProcessPoolExecutor | None = None


def run_tasks(tasks: list[Task], jobs: int, name: str) -> list[ArmRun]:
    """Run the tasks in ``jobs`` processes (one torch thread each), printing one line each.

    The processes are kept for the next call (``shutdown`` ends them): parts 1 and 2 share
    them, and with them their start-up and their loaded data.
    """
    import multiprocessing

    from benchmarks.report import progress

    global _pool
    if _pool is None:
        context = multiprocessing.get_context("spawn")  # no inherited threads, locks, sockets
        _pool = ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context,
                                    initializer=_init_process)
    runs: list[ArmRun] = []
    futures = {_pool.submit(run_task, task): task for task in tasks}
    for future in as_completed(futures):
        run = future.result()
        runs.append(run)
        best = run.best()
        progress(name, f"{run.dataset} {run.arm} seed {run.seed}: best "
                       f"{'none' if best is None else f'{best.value:.4f}'}, "
                       f"{run.total_epochs:.0f} epochs, {run.seconds:.0f} s "
                       f"({len(runs)}/{len(tasks)})")
    return sorted(runs, key=lambda r: (r.dataset, ARMS.index(r.arm), r.seed))


def shutdown() -> None:
    """End the processes of ``run_tasks``."""
    global _pool
    if _pool is not None:
        _pool.shutdown(cancel_futures=True)
        _pool = None


def _init_process() -> None:
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")


def run_task(task: Task) -> ArmRun:
    from kubetune.spec.model import parse_job

    job = parse_job(task.job)
    started = time.perf_counter()
    runner = {"random": _run_stock, "optuna": _run_stock, "hyperband": _run_stock,
              "kubetune": _run_kubetune, "staged": _run_kubetune}[task.arm]
    run = runner(task, job)
    run.seconds = time.perf_counter() - started
    return run


class Recorder:
    """Wraps ``kubetune.builtin.mlp.train``: counts epochs, notes blow-ups and the test accuracy."""

    def __init__(self) -> None:
        self.current = -1
        self.trials: dict[int, dict[str, Any]] = {}
        self.test_rows = 0

    def train(self, params: dict[str, Any], data: Any, **kwargs: Any) -> Any:
        from kubetune.builtin.mlp import train

        record = self.trials[self.current] = {"epochs": 0, "blowup": None, "test": None}
        first_loss: list[float] = []
        inner = kwargs.pop("on_epoch", None)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            record["epochs"] = epoch
            loss = metrics.get("train_loss", math.nan)
            if not first_loss and math.isfinite(loss):
                first_loss.append(loss)
            if record["blowup"] is None and (
                    not all(math.isfinite(v) for v in metrics.values())
                    or (first_loss and loss > BLOWUP_FACTOR * max(first_loss[0], 1e-12))):
                record["blowup"] = epoch
            if inner is not None:
                inner(epoch, metrics)

        result = train(params, data, on_epoch=on_epoch, **kwargs)
        record["test"] = float((result.test_proba.argmax(axis=1) == data.y_test).mean())
        self.test_rows = len(data.y_test)
        return result

    def records(self, study: Any) -> list[TrialRecord]:
        from kubetune.study.schema import DATA_SHARE_ATTR, is_full_fidelity

        out = []
        for trial in study.get_trials(deepcopy=False):
            seen = self.trials.get(trial.number, {"epochs": 0, "blowup": None, "test": None})
            out.append(TrialRecord(trial.number, trial.state.name, seen["epochs"],
                                   trial.value if trial.state.name == "COMPLETE" else None,
                                   seen["test"], seen["blowup"],
                                   float(trial.user_attrs.get(DATA_SHARE_ATTR, 1.0)),
                                   is_full_fidelity(trial)))
        return out


def _suggest(trial: Any, name: str, dist: Any) -> Any:
    """What a plain Optuna user writes for each parameter of the space."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)


def _run_stock(task: Task, job: Any) -> ArmRun:
    """(a) and (b): a stock Optuna study and objective, as a user without kubetune writes it."""
    import optuna

    from kubetune.builtin.data import load_data
    from kubetune.search.space import to_distributions

    spec = job.spec
    builtin = spec.trainer.builtin
    metric = spec.objective.metric
    direction = spec.objective.resolved_direction
    data = load_data(job)
    distributions = to_distributions(spec.search_space)
    if task.arm == "random":
        sampler, pruner = optuna.samplers.RandomSampler(seed=task.seed), None
    elif task.arm == "hyperband":
        sampler = optuna.samplers.TPESampler(seed=task.seed)
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=builtin.epochs,
                                                reduction_factor=3)
    else:
        sampler, pruner = optuna.samplers.TPESampler(seed=task.seed), optuna.pruners.MedianPruner()
    study = optuna.create_study(direction=direction, sampler=sampler,
                                pruner=pruner or optuna.pruners.NopPruner())
    recorder = Recorder()

    def objective(trial: optuna.Trial) -> float:
        params = {"epochs": builtin.epochs, **builtin.params,
                  **{n: _suggest(trial, n, d) for n, d in distributions.items()}}

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if pruner is None:
                return
            trial.report(float(metrics[metric]), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        recorder.current = trial.number
        result = recorder.train(params, data, seed=builtin.seed + trial.number,
                                device=builtin.device, on_epoch=report)
        return float(result.history[-1][metric])

    study.optimize(objective, n_trials=spec.budget.max_trials, catch=(Exception,))
    return ArmRun(task.arm, task.dataset, task.seed, direction == "maximize",
                  recorder.records(study), 0.0, test_rows=recorder.test_rows)


def _run_kubetune(task: Task, job: Any) -> ArmRun:
    """(d) and (g), and (e) and (f) when asked: kubetune's sampler, pruner, stages, guards and
    trial runner, a trial at a time as one worker runs them."""
    import optuna
    from optuna.storages import InMemoryStorage

    from kubetune.builtin.data import load_data
    from kubetune.search.space import make_pruner, stage_samplers
    from kubetune.search.stages import StageAsker, new_trial_attrs, stage_for_new_trial
    from kubetune.study.optuna_internals import set_user_attrs
    from kubetune.study.schema import create_or_load_study
    from kubetune.study.storage import make_artifact_store
    from kubetune.worker.trial import run_trial

    spec = job.spec
    storage = InMemoryStorage()
    create_or_load_study(storage, job)
    samplers = stage_samplers(spec, "bench-0")  # slot 0: the seed as given
    study = optuna.load_study(study_name=job.study_name, storage=storage,
                              sampler=samplers(), pruner=make_pruner(spec))
    stages = StageAsker(study, spec, samplers)
    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        store = make_artifact_store(tmp)
        for _ in range(spec.budget.max_trials):
            trials = study.get_trials(deepcopy=False)
            stage = stage_for_new_trial(spec, trials)
            if stage is None:  # cannot happen a trial at a time: every earlier trial ended
                raise RuntimeError("the next stage waits for running trials")
            trial = stages.ask(stage, trials)
            set_user_attrs(trial, new_trial_attrs(trial, spec, stage))
            recorder.current = trial.number
            run_trial(trial.study, trial, job, load_data(job, stage=stage), store,
                      train=recorder.train)
        run = ArmRun(task.arm, task.dataset, task.seed,
                     spec.objective.resolved_direction == "maximize", recorder.records(study),
                     0.0, test_rows=recorder.test_rows)
        if task.ensemble:
            for members in MEMBER_KINDS:
                result, note, extra = run_ensemble(study, store, members)
                run.member_ensembles[members] = {**(result or {}), "extra_epochs": extra,
                                                 "note": note}
                if members == "trials":
                    run.ensemble, run.ensemble_note = result, note
            for members in ("trials", RECOMMENDED_MEMBERS):
                run.result_curves[members] = result_curve(study, store, job, run.trials,
                                                          members)
    return run


class _Prefix:
    """The study as a job that stopped after its first trials saw it (``collect_members``
    reads only ``get_trials``)."""

    def __init__(self, trials: list[Any]) -> None:
        self._trials = trials

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return [t for t in self._trials if states is None or t.state in states]


def result_curve(study: Any, store: Any, job: Any, records: list[TrialRecord],
                 members: str) -> list[tuple[float, float]]:
    """(epochs trained, test accuracy of the job's final model) after each trial: the
    ensemble of ``members`` kubetune's ensemble step chooses on the trials so far, or the best
    single model where none beats it. Trials run one at a time from a seeded sampler, so the
    first k trials of this study are exactly what a job of k trials runs."""
    from kubetune.ensemble.step import (
        ArtifactReader,
        NotEnoughMembers,
        collect_members,
        combine,
        score,
        selection_metric,
    )

    spec = job.spec
    job = job.model_copy(update={"spec": spec.model_copy(update={
        "ensemble": spec.ensemble.model_copy(update={"members": members})})})
    metric = selection_metric(spec.objective.primary_metric)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    cost = {r.number: r.cost for r in records}
    curve: list[tuple[float, float]] = []
    spent = 0.0
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-curve-") as tmp:
        reader = ArtifactReader(store, Path(tmp))
        for count, trial in enumerate(trials, start=1):
            spent += cost.get(trial.number, 0.0)
            candidates = collect_members(_Prefix(trials[:count]), job, reader)
            if not candidates.members:
                continue
            try:
                result = combine(candidates.members, candidates.y_val, candidates.y_test,
                                 metric=metric, direction=spec.objective.resolved_direction,
                                 method=spec.ensemble.method, bags=spec.ensemble.bags)
            except NotEnoughMembers:
                test = score(metric, candidates.members[0].test_proba, candidates.y_test)
            else:
                test = (result.test_value if len(result.members) > 1
                        else result.best_single_test_value)
            curve.append((spent, float(test)))
    return curve


def run_ensemble(study: Any, store: Any, members: str = "trials"
                 ) -> tuple[dict[str, float] | None, str | None, int]:
    """(d): kubetune's ensemble step on a finished study, with ``members`` in place of the
    job's ``spec.ensemble.members``: (values, None) or (None, why not), and the epochs it
    trained. A job that keeps snapshots trains exactly as one that does not, so one study
    serves every kind."""
    from kubetune.builtin.mlp import train
    from kubetune.ensemble.step import run_ensemble_step
    from kubetune.study.schema import JOB_ATTR

    stored = study.user_attrs[JOB_ATTR]
    ensemble = {**stored["spec"].get("ensemble", {}), "members": members}
    study.set_user_attr(JOB_ATTR, {**stored, "spec": {**stored["spec"], "ensemble": ensemble}})
    extra = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:  # seeds: the trainings after the search
        def on_epoch(epoch: int, metrics: Any) -> None:
            extra[0] += 1

        return train(*args, on_epoch=on_epoch, **kwargs)

    try:
        record = run_ensemble_step(study, store, train=counted)
    except Exception as err:  # report it in the table rather than lose the whole benchmark
        return None, f"ensemble step failed: {type(err).__name__}: {err}", extra[0]
    finally:
        study.set_user_attr(JOB_ATTR, stored)
    if "reason" in record:
        return None, f"{record['reason']}: {record.get('message', '')}", extra[0]
    return {"val": float(record["validationValue"]), "test": float(record["testValue"]),
            "single_test": float(record["bestSingleTestValue"]),
            "members": float(len(record.get("members", [])))}, None, extra[0]
