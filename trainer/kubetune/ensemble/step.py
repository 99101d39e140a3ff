"""The ensemble step: combine the best models of a finished search, scored on unseen data.

``run_ensemble_step`` (``kubetune ensemble``, one more process or pod) stores its record in the
study (``ENSEMBLE_ATTR``); the job core decides when to run it, reuses a record whose
``fingerprint`` still holds, and copies it into ``status.ensemble``. Members and methods:
docs/ensemble.md. Invariants: selection reads the validation predictions only, and the test
predictions are scored once, at the end; every member predicts the best trial's rows
(``_usable``); a retrained seed is ``trainer.builtin.seed + trial + i * SEED_STRIDE``, so none
repeats a trial's seed. Selection and scoring need numpy only; torch is imported where weights
are read, retrained or saved.
"""

from __future__ import annotations

import base64
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from kubetune.ensemble.export import BUNDLE_FORMAT
from kubetune.search.budget import count_trials, ranked
from kubetune.search.stages import trial_params
from kubetune.spec.model import Ensemble as EnsembleSpec
from kubetune.spec.model import FileData, TuningJob
from kubetune.study.optuna_internals import set_study_system_attr
from kubetune.study.schema import ARTIFACTS_ATTR, ENSEMBLE_ATTR, EPOCHS_ATTR, MODEL_ATTR
from kubetune.version import __version__

log = logging.getLogger("kubetune.ensemble")

METRICS = ("val_accuracy", "val_f1", "val_loss")
GREEDY_ROUNDS = 25
SEED_STRIDE = 1_000_003                    # larger than any trial number: seeds never repeat
EMBED_LIMIT = 8 << 20                      # bytes of ensemble copied into the study storage
NOT_ENOUGH_MEMBERS = "NotEnoughMembers"
NO_BETTER_COMBINATION = "NoBetterCombination"
NO_ENSEMBLE_METRIC = "NoEnsembleMetric"
_LOG_EPS = 1e-15


class NotEnoughMembers(Exception):
    """Fewer than two usable members: there is nothing to combine (the job still succeeds)."""


# ---------------------------------------------------------------- metrics
def selection_metric(objective_metric: str) -> str:
    """The validation metric that selects and scores members for ``objective_metric``.

    ``train_loss`` -> ``val_loss``, ``train_accuracy`` -> ``val_accuracy``: selecting on the
    training split would reward overfitting.
    """
    if objective_metric in METRICS:
        return objective_metric
    if objective_metric.startswith("train_"):
        counterpart = "val_" + objective_metric[len("train_"):]
        if counterpart in METRICS:
            return counterpart
    raise ValueError(f"no ensemble metric for objective {objective_metric!r}; "
                     f"known: {', '.join(METRICS)} and their train_ counterparts")


def score(metric: str, proba: np.ndarray, y: np.ndarray) -> float:
    """``metric`` (one of ``METRICS``) of class probabilities ``proba`` for labels ``y``.

    The ``val_`` name says which metric, not which split: the same function scores test data.
    """
    proba = np.asarray(proba)
    y = np.asarray(y)
    if metric == "val_accuracy":
        return float(np.mean(proba.argmax(axis=1) == y))
    if metric == "val_f1":
        return macro_f1(y, proba.argmax(axis=1))
    if metric == "val_loss":
        picked = proba[np.arange(len(y)), y].astype(np.float64)
        return float(-np.mean(np.log(np.clip(picked, _LOG_EPS, 1.0))))
    raise ValueError(f"unknown ensemble metric {metric!r}; known: {', '.join(METRICS)}")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean F1 over the labels that occur in ``y_true`` or ``y_pred``.

    The same as scikit-learn's ``f1_score(average="macro", zero_division=0)``, which the
    trainer reports as ``val_f1``.
    """
    labels = np.union1d(y_true, y_pred)
    scores = []
    for label in labels:
        tp = np.sum((y_pred == label) & (y_true == label))
        fp = np.sum((y_pred == label) & (y_true != label))
        fn = np.sum((y_pred != label) & (y_true == label))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _sign(direction: str) -> float:
    return 1.0 if direction == "maximize" else -1.0


def weighted(probas: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The ensemble's probabilities: the weighted sum of its members' (weights sum to 1)."""
    total = np.zeros(np.shape(probas[0]), dtype=np.float64)
    for proba, weight in zip(probas, weights):
        if weight:
            total += weight * np.asarray(proba, dtype=np.float64)
    return total


# ---------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """Members picked (greedy: in pick order, the kept prefix; bagged: by weight, heaviest
    first) and the weight of every member."""

    picks: tuple[int, ...]
    weights: tuple[float, ...]


def greedy_selection(val_probas: Sequence[np.ndarray], y_val: np.ndarray, metric: str,
                     direction: str, rounds: int = GREEDY_ROUNDS) -> Selection:
    """Ensemble selection with replacement (Caruana et al. 2004) on validation predictions.

    Starts from the best single member; each round adds the member whose addition scores best
    (ties: the earlier member, i.e. the better-ranked one); keeps the shortest best-scoring
    prefix. Never worse on validation than the best single member.

    Args:
        val_probas: one (samples, classes) probability array per member.
        y_val: the validation labels (0 .. classes-1).
        metric: one of ``METRICS``.
        direction: ``maximize`` or ``minimize``.
        rounds: picks made in all, the first included.
    """
    if not val_probas:
        raise ValueError("greedy selection needs at least one member")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 but got {rounds}")
    sign = _sign(direction)
    probas = [np.asarray(p, dtype=np.float64) for p in val_probas]
    singles = [sign * score(metric, p, y_val) for p in probas]
    first = int(np.argmax(singles))
    picks, total = [first], probas[first].copy()
    best, best_length = singles[first], 1
    for _ in range(rounds - 1):
        size = len(picks) + 1
        scores = [sign * score(metric, (total + p) / size, y_val) for p in probas]
        choice = int(np.argmax(scores))
        picks.append(choice)
        total += probas[choice]
        if scores[choice] > best:
            best, best_length = scores[choice], size
    kept = picks[:best_length]
    weights = np.bincount(kept, minlength=len(probas)) / best_length
    if sign * score(metric, weighted(probas, weights), y_val) < singles[first]:
        kept, weights = [first], np.eye(len(probas))[first]  # rounding in the sum: stay safe
    return Selection(tuple(kept), tuple(float(w) for w in weights))


def bagged_selection(val_probas: Sequence[np.ndarray], y_val: np.ndarray, metric: str,
                     direction: str, bags: int, rounds: int = GREEDY_ROUNDS,
                     seed: int = 0) -> Selection:
    """Ensemble selection with bagging (Caruana et al. 2004, section 2.3): greedy selection
    on ``bags`` random halves of the members, the weights averaged.

    One greedy run over all members chases the validation split's noise: on noisy tasks it
    ended worse on test than the best single model on 2 of 20 benchmark studies, the bagged
    selection on none (docs/ensemble.md). The halves are drawn from ``seed``, so a study
    gives the same ensemble every time. Unless the average beats the best single member on
    validation, that member alone is the selection (as greedy selection keeps the shortest
    best prefix); ``bags`` 1 is one greedy run over all members.
    """
    count = len(val_probas)
    if bags <= 1 or count <= 2:
        return greedy_selection(val_probas, y_val, metric, direction, rounds)
    rng = np.random.default_rng(seed)
    half = max(2, round(count / 2))
    weights = np.zeros(count)
    for _ in range(bags):
        chosen = np.sort(rng.choice(count, half, replace=False))
        bag = greedy_selection([val_probas[i] for i in chosen], y_val, metric, direction,
                               rounds)
        weights[chosen] += bag.weights
    weights /= bags
    sign = _sign(direction)
    singles = [sign * score(metric, np.asarray(p, dtype=np.float64), y_val)
               for p in val_probas]
    first = int(np.argmax(singles))
    if sign * score(metric, weighted(val_probas, weights), y_val) <= singles[first]:
        return Selection((first,), tuple(float(w) for w in np.eye(count)[first]))
    picks = tuple(int(i) for i in sorted(np.flatnonzero(weights), key=lambda i: -weights[i]))
    return Selection(picks, tuple(float(w) for w in weights))


def average_selection(count: int) -> Selection:
    """Every member once, with equal weights."""
    return Selection(tuple(range(count)), tuple([1.0 / count] * count))


# ---------------------------------------------------------------- members and the ensemble
@dataclass
class Member:
    """A candidate model: its class probabilities on the validation and test splits.

    ``load`` returns ``(state_dict, train_params)`` and is called only for members the
    ensemble keeps (it may download or hold weights).
    """

    trial: int
    val_proba: np.ndarray
    test_proba: np.ndarray
    seed: int | None = None
    epoch: int | None = None
    load: Callable[[], tuple[dict[str, Any], dict[str, Any]]] | None = field(
        default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        """``{"trial": N}``, with the ``seed`` or ``epoch`` that tells seed and snapshot
        members of one trial apart."""
        key: dict[str, Any] = {"trial": self.trial}
        if self.seed is not None:
            key["seed"] = self.seed
        if self.epoch is not None:
            key["epoch"] = self.epoch
        return key


@dataclass
class EnsembleResult:
    """The chosen members (weight > 0, in candidate order) and the four scores."""

    method: str
    metric: str
    direction: str
    members: list[Member]
    weights: list[float]
    validation_value: float
    test_value: float
    best_single: Member
    best_single_validation_value: float
    best_single_test_value: float
    candidates: int


def combine(members: Sequence[Member], y_val: np.ndarray, y_test: np.ndarray, *, metric: str,
            direction: str, method: str, rounds: int = GREEDY_ROUNDS,
            bags: int = 1) -> EnsembleResult:
    """Select and weight ``members`` on validation, then score on test.

    ``members[0]`` is the best single trial (the top-ranked usable one); the comparison in the
    result is against it. Raises ``NotEnoughMembers`` for fewer than two members.
    """
    if len(members) < 2:
        raise NotEnoughMembers(f"an ensemble needs at least 2 usable members, found "
                               f"{len(members)}")
    val = [m.val_proba for m in members]
    if method == "greedy":
        selection = bagged_selection(val, y_val, metric, direction, bags, rounds)
    elif method == "average":
        selection = average_selection(len(members))
    else:
        raise ValueError(f"unknown ensemble method {method!r}; expected greedy or average")
    weights = list(selection.weights)
    # Test predictions are read here, after selection, and only to score.
    test = [m.test_proba for m in members]
    kept = [i for i, w in enumerate(weights) if w > 0]
    single = members[0]
    return EnsembleResult(
        method=method, metric=metric, direction=direction,
        members=[members[i] for i in kept], weights=[weights[i] for i in kept],
        validation_value=score(metric, weighted(val, weights), y_val),
        test_value=score(metric, weighted(test, weights), y_test),
        best_single=single,
        best_single_validation_value=score(metric, single.val_proba, y_val),
        best_single_test_value=score(metric, single.test_proba, y_test),
        candidates=len(members))


# ---------------------------------------------------------------- reading trials
class ArtifactReader:
    """Reads the artifacts trials saved (``predictions.npz``, ``model.pt``), each once."""

    def __init__(self, store: Any, folder: Path) -> None:
        self._store, self._folder = store, folder
        self._models: dict[int, dict[str, Any]] = {}

    def predictions(self, trial: FrozenTrial) -> dict[str, np.ndarray] | None:
        """The trial's stored predictions, or None when it has none that can be read."""
        artifact = (trial.user_attrs.get(ARTIFACTS_ATTR) or {}).get("predictions")
        if not artifact:
            return None
        try:
            path = self._download(artifact, f"predictions-{trial.number}.npz")
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except Exception as err:  # a missing or broken file: skip the trial, say why
            log.warning("trial %d: cannot read its predictions: %s", trial.number, err)
            return None

    def model(self, trial: FrozenTrial) -> dict[str, Any]:
        """The trial's ``model.pt`` (weights-only load)."""
        if trial.number not in self._models:
            import torch

            artifact = (trial.user_attrs.get(ARTIFACTS_ATTR) or {}).get("model")
            if not artifact:
                raise FileNotFoundError(f"trial {trial.number} has no stored model")
            path = self._download(artifact, f"model-{trial.number}.pt")
            self._models[trial.number] = torch.load(path, map_location="cpu",
                                                    weights_only=True)
        return self._models[trial.number]

    def _download(self, artifact_id: str, name: str) -> Path:
        from optuna.artifacts import download_artifact

        path = self._folder / name
        if not path.exists():
            download_artifact(artifact_store=self._store, artifact_id=artifact_id,
                              file_path=str(path))
        return path


@dataclass
class Candidates:
    """The members to choose from, the labels they are scored against, and what was skipped."""

    members: list[Member]
    y_val: np.ndarray
    y_test: np.ndarray
    best_trial: FrozenTrial | None
    skipped: list[int]


def collect_members(study: optuna.Study, job: TuningJob, reader: ArtifactReader, *,
                    train: Callable[..., Any] | None = None) -> Candidates:
    """The candidate members ``spec.ensemble.members`` asks for, best trial first."""
    ensemble = job.spec.ensemble
    wanted = 1 if ensemble.members == "seeds" else ensemble.top_k
    usable: list[tuple[FrozenTrial, dict[str, np.ndarray]]] = []
    skipped: list[int] = []
    objective = job.spec.objective  # several objectives: ranked by the primary one
    for trial in ranked(study.get_trials(deepcopy=False), objective.resolved_direction,
                        index=objective.primary_index):
        if len(usable) == wanted:
            break
        preds = reader.predictions(trial)
        if preds is None or not _usable(preds, usable[0][1] if usable else None):
            skipped.append(trial.number)
            continue
        usable.append((trial, preds))
    if not usable:
        return Candidates([], np.array([]), np.array([]), None, skipped)
    best, reference = usable[0]
    y_val, y_test = reference["y_val"], reference["y_test"]
    members: list[Member] = []
    for trial, preds in usable:
        members.append(Member(trial.number, preds["val_proba"], preds["test_proba"],
                              epoch=_final_epoch(trial) if ensemble.members == "snapshots"
                              else None, load=_loader(reader, job, trial)
                              if job.spec.trainer.is_builtin else None))
        if ensemble.members == "snapshots" and "snapshot_epochs" in preds:
            for i, epoch in enumerate(preds["snapshot_epochs"].tolist()):
                member = Member(trial.number, preds["snapshot_val_proba"][i],
                                preds["snapshot_test_proba"][i], epoch=int(epoch),
                                load=_loader(reader, job, trial, int(epoch)))
                if _finite(member):
                    members.append(member)
    if ensemble.members == "seeds":
        members[0].seed = job.spec.trainer.builtin.seed + best.number
        members += _retrain(job, reader, best, y_val, y_test, train)
    return Candidates(members, y_val, y_test, best, skipped)


def _usable(preds: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None) -> bool:
    """Finite probabilities of the right shape, for the same validation and test rows."""
    if not {"val_proba", "test_proba", "y_val", "y_test"} <= set(preds):
        return False
    if not (np.isfinite(preds["val_proba"]).all() and np.isfinite(preds["test_proba"]).all()):
        return False
    if reference is None:
        return True
    return (preds["val_proba"].shape == reference["val_proba"].shape
            and preds["test_proba"].shape == reference["test_proba"].shape
            and np.array_equal(preds["y_val"], reference["y_val"])
            and np.array_equal(preds["y_test"], reference["y_test"]))


def _finite(member: Member) -> bool:
    return bool(np.isfinite(member.val_proba).all() and np.isfinite(member.test_proba).all())


def _final_epoch(trial: FrozenTrial) -> int | None:
    epochs = trial.user_attrs.get(EPOCHS_ATTR)
    return int(epochs) if epochs is not None else None


def _loader(reader: ArtifactReader, job: TuningJob, trial: FrozenTrial,
            epoch: int | None = None) -> Callable[[], tuple[dict[str, Any], dict[str, Any]]]:
    def load() -> tuple[dict[str, Any], dict[str, Any]]:
        saved = reader.model(trial)
        params = dict(saved.get("train_params") or trial_params(job, trial))
        if epoch is None:
            return saved["state_dict"], params
        for snapshot in saved.get("snapshots", []):
            if int(snapshot["epoch"]) == epoch:
                return snapshot["state_dict"], params
        raise KeyError(f"trial {trial.number} has no snapshot of epoch {epoch}")

    return load


def _retrain(job: TuningJob, reader: ArtifactReader, best: FrozenTrial, y_val: np.ndarray,
             y_test: np.ndarray, train: Callable[..., Any] | None) -> list[Member]:
    """The best configuration trained with ``seeds - 1`` new seeds (``seeds`` members)."""
    if train is None:
        from kubetune.builtin.mlp import train
    from kubetune.builtin.data import load_data

    data = load_data(job)
    if not (np.array_equal(data.y_val, y_val) and np.array_equal(data.y_test, y_test)):
        raise ValueError(f"the dataset differs from the one trial {best.number} was trained "
                         "on (other validation or test rows); cannot retrain with seeds")
    builtin = job.spec.trainer.builtin
    params = dict(reader.model(best).get("train_params") or trial_params(job, best))
    members = []
    for i in range(1, job.spec.ensemble.seeds):
        seed = builtin.seed + best.number + i * SEED_STRIDE
        result = train(params, data, seed=seed, device=builtin.device, balance=builtin.balance)
        member = Member(best.number, result.val_proba, result.test_proba, seed=seed,
                        load=lambda model=result.model: (model.state_dict(), params))
        if _finite(member):
            members.append(member)
        else:
            log.warning("seed %d of trial %d diverged; left out", seed, best.number)
        log.info("trained trial %d's configuration with seed %d (%d of %d)", best.number, seed,
                 i + 1, job.spec.ensemble.seeds)
    return members


# ---------------------------------------------------------------- the step
def fingerprint(ensemble: EnsembleSpec, finished_trials: int) -> dict[str, Any]:
    """What a stored ensemble was built from; the job core reuses one whose fingerprint is
    the current one instead of building it again."""
    return {"finishedTrials": finished_trials, "method": ensemble.method,
            "members": ensemble.members, "topK": ensemble.top_k, "seeds": ensemble.seeds,
            "bags": ensemble.bags}


def is_reusable(record: dict[str, Any] | None, ensemble: EnsembleSpec,
                finished_trials: int) -> bool:
    return bool(record) and record.get("builtFrom") == fingerprint(ensemble, finished_trials)


def status_view(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of a stored record goes into ``status.ensemble`` (None: no ensemble was built)."""
    if not record or "reason" in record:
        return None
    return {k: v for k, v in record.items() if k != "builtFrom"}


def run_ensemble_step(study: optuna.Study, artifact_store: Any, *,
                      train: Callable[..., Any] | None = None,
                      digest: str | None = None) -> dict[str, Any]:
    """Build, score and save the ensemble of a finished study; store and return the record.

    With fewer than two usable members the record is ``{"reason": "NotEnoughMembers",
    "message": ...}``, and when no combination beats the best single model on validation
    ``{"reason": "NoBetterCombination", ...}``; nothing is saved then: not an error, the job
    still succeeds.
    """
    from kubetune.study.schema import load_job

    job = load_job(study, digest)  # digest: see kubetune.study.schema.load_job
    spec = job.spec
    direction = spec.objective.resolved_direction
    built_from = fingerprint(spec.ensemble, count_trials(study.get_trials(deepcopy=False))
                             .finished)
    try:
        metric = selection_metric(spec.objective.primary_metric)
    except ValueError as err:  # custom code may optimize a metric the ensemble cannot score
        record = {"reason": NO_ENSEMBLE_METRIC, "message": str(err), "builtFrom": built_from}
        study.set_user_attr(ENSEMBLE_ATTR, record)
        return record
    with tempfile.TemporaryDirectory(prefix="kubetune-ensemble-") as tmp:
        reader = ArtifactReader(artifact_store, Path(tmp))
        candidates = collect_members(study, job, reader, train=train)
        try:
            result = combine(candidates.members, candidates.y_val, candidates.y_test,
                             metric=metric, direction=direction, method=spec.ensemble.method,
                             bags=spec.ensemble.bags)
        except NotEnoughMembers as err:
            record = {"reason": NOT_ENOUGH_MEMBERS,
                      "message": _not_enough_message(str(err), candidates, spec.ensemble),
                      "builtFrom": built_from}
            study.set_user_attr(ENSEMBLE_ATTR, record)
            return record
        assert candidates.best_trial is not None
        if len(result.members) < 2:  # greedy selection kept the best single model alone
            record = {"reason": NO_BETTER_COMBINATION,
                      "message": _no_better_message(result), "builtFrom": built_from}
            study.set_user_attr(ENSEMBLE_ATTR, record)
            return record
        artifact = None  # code trainers leave predictions, not models kubetune can rebuild
        if spec.trainer.is_builtin:
            bundle = build_bundle(result, job, reader.model(candidates.best_trial),
                                  source=spec.ensemble.members)
            artifact = save_bundle(bundle, study, artifact_store, Path(tmp))
    record = make_record(result, source=spec.ensemble.members, artifact=artifact,
                         objective_metric=spec.objective.primary_metric,
                         built_from=built_from)
    if artifact is None:
        record["note"] = (record.get("note", "") + "; " if "note" in record else "") + (
            "no model to export: the members are trials of your own code (their weights are "
            "yours to keep)")
    study.set_user_attr(ENSEMBLE_ATTR, record)
    return record


def _no_better_message(result: EnsembleResult) -> str:
    best = result.best_single
    which = f"trial #{best.trial}" + (f" (epoch {best.epoch})" if best.epoch is not None else "")
    return (f"no combination of the {result.candidates} candidates beat the best single model, "
            f"{which}, on validation ({metric_name(result.metric)} "
            f"{_fmt(result.best_single_validation_value)}; test "
            f"{_fmt(result.best_single_test_value)}): use that trial's model")


def metric_name(metric: str) -> str:
    """The metric without its split: ``val_accuracy`` scores the test split too, as
    ``accuracy`` (``test val_accuracy`` reads as nonsense)."""
    return metric.removeprefix("val_")


def _not_enough_message(base: str, candidates: Candidates, ensemble: EnsembleSpec) -> str:
    if ensemble.members == "seeds":
        base += (" (the best trial and its retrained seeds)" if candidates.members
                 else " (no complete trial with stored predictions)")
    else:
        base += f" among the {ensemble.top_k} best complete trials"
    if candidates.skipped:
        base += ("; skipped trials without usable stored predictions: "
                 + ", ".join(map(str, candidates.skipped[:10])))
    return base


def make_record(result: EnsembleResult, *, source: str, artifact: str | None,
                objective_metric: str, built_from: dict[str, Any]) -> dict[str, Any]:
    """The small, JSON-able record kept in the study and shown in ``status.ensemble``."""
    record: dict[str, Any] = {
        "method": result.method,
        "memberSource": source,
        "metric": result.metric,
        "direction": result.direction,
        "members": [{**m.describe(), "weight": w}
                    for m, w in zip(result.members, _rounded_weights(result.weights))],
        "candidates": result.candidates,
        "validationValue": result.validation_value,
        "testValue": result.test_value,
        "bestSingleTrial": result.best_single.trial,
        "bestSingleValidationValue": result.best_single_validation_value,
        "bestSingleTestValue": result.best_single_test_value,
        "artifact": artifact,
        "builtFrom": built_from,
    }
    if result.metric != objective_metric:
        record["note"] = (f"the objective {objective_metric} is measured on training data; "
                          f"members are selected and scored by {result.metric}")
    return record


def _rounded_weights(weights: Any) -> list[float]:
    """Weights to 6 decimals that still sum to 1: the largest takes the rounding remainder
    (three members at 1/3 each would otherwise sum to 0.999999)."""
    rounded = [round(float(w), 6) for w in weights]
    if rounded:
        largest = max(range(len(rounded)), key=rounded.__getitem__)
        rest = sum(w for i, w in enumerate(rounded) if i != largest)
        rounded[largest] = round(1.0 - rest, 6)
    return rounded


# ---------------------------------------------------------------- the saved ensemble
def build_bundle(result: EnsembleResult, job: TuningJob, reference: dict[str, Any], *,
                 source: str) -> dict[str, Any]:
    """Everything a model folder needs, as one weights-only-loadable object.

    ``reference`` is the best trial's ``model.pt``: classes and the standardization are the
    same for every member (one dataset, one split).
    """
    states, members = [], []
    for member, weight in zip(result.members, result.weights):
        assert member.load is not None
        state, params = member.load()
        states.append({k: v.detach().cpu() for k, v in state.items()})
        members.append({**member.describe(), "weight": weight, "params": params})
    manifest = {
        "format": BUNDLE_FORMAT,
        "kubetuneVersion": __version__,
        "job": job.name,
        "study": job.study_name,
        "classes": typed_classes(list(reference["classes"]), job),
        "nFeatures": int(reference["mean"].numel()),
        "method": result.method,
        "memberSource": source,
        "metric": result.metric,
        "direction": result.direction,
        "members": members,
        "validationValue": result.validation_value,
        "testValue": result.test_value,
        "bestSingleTrial": result.best_single.trial,
        "bestSingleTestValue": result.best_single_test_value,
    }
    return {"manifest": manifest, "mean": reference["mean"], "std": reference["std"],
            "members": states}


def save_bundle(bundle: dict[str, Any], study: optuna.Study, store: Any, folder: Path) -> str:
    """Upload the bundle as a study artifact; keep a copy in the study storage when small.

    The copy lets ``kubetune export NAME --storage URL`` work from a machine that reaches the
    database but not the artifact volume of the cluster. It is a study *system* attribute, so
    the user attributes that the runner and operator read on every reconcile stay small.
    """
    import torch
    from optuna.artifacts import upload_artifact

    path = folder / "ensemble.pt"
    torch.save(bundle, path)
    artifact = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
    data = path.read_bytes()
    copy = ({"artifact": artifact, "data": base64.b64encode(data).decode("ascii")}
            if len(data) <= EMBED_LIMIT else None)
    set_study_system_attr(study, MODEL_ATTR, copy)
    return artifact


def typed_classes(classes: list[str], job: TuningJob) -> list[Any]:
    """Class labels as the data has them: the trainer keeps them as strings.

    Built-in datasets have integer labels; an ``.npz`` file's ``y`` decides its type; a CSV
    file's labels are text.
    """
    dataset = job.spec.trainer.builtin.dataset
    kind = "i"
    if isinstance(dataset, FileData):
        kind = "U"
        if dataset.path.endswith(".npz"):
            try:
                with np.load(dataset.path, allow_pickle=False) as archive:
                    kind = archive["y"].dtype.kind
            except Exception:  # the file moved: strings are still right, just less typed
                kind = "U"
    try:
        if kind in "iu":
            return [int(c) for c in classes]
        if kind == "f":
            return [float(c) for c in classes]
        if kind == "b":
            return [c == "True" for c in classes]
    except ValueError:
        pass
    return list(classes)


def describe(record: dict[str, Any]) -> str:
    """One line for logs and the terminal."""
    if "reason" in record:
        return f"no ensemble ({record['reason']}): {record['message']}"
    return (f"{record['method']} ensemble of {len(record['members'])} member(s) "
            f"({record['memberSource']}, {record['candidates']} candidates): test "
            f"{metric_name(record['metric'])} {_fmt(record['testValue'])} vs best single trial "
            f"#{record['bestSingleTrial']} {_fmt(record['bestSingleTestValue'])} "
            f"(validation {_fmt(record['validationValue'])} vs "
            f"{_fmt(record['bestSingleValidationValue'])})")


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)
