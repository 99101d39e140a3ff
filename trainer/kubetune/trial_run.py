"""Run one trial of any trainer: train, guard, report, prune, save, tell.

Every trainer reports through one ``EpochReporter``: the built-in MLP (``kubetune.mlp``), a
Python entrypoint using the trainer SDK (``kubetune.sdk``) and a command (``kubetune.
command_trial``). Every epoch the metrics are kept in the trial's ``history`` (learning
curves), the NaN and divergence guards look at them, and only then is the objective reported to
Optuna, the deadline checked and the pruner asked. Why a trial stopped is kept in the
``prune_reason`` / ``fail_reason`` user attributes.

A complete trial saves what the ensemble step needs as Optuna artifacts: ``predictions.npz``
(validation and test class probabilities and labels) and, for the built-in trainer,
``model.pt`` (weights, the full training params, classes, standardization). Only when the job
asks for snapshot ensembles (``spec.ensemble.members: snapshots``) does the built-in trainer
also keep the models of a few earlier epochs (``snapshot_epochs``) and their predictions; other
jobs pay nothing for them.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from kubetune import guards
from kubetune.spec import JobSpec, TuningJob

log = logging.getLogger("kubetune.worker")

HISTORY_ATTR = "history"
PRUNE_REASON_ATTR = "prune_reason"
FAIL_REASON_ATTR = "fail_reason"
WORKER_ATTR = "worker"
ARTIFACTS_ATTR = "artifacts"
METRICS_ATTR = "metrics"
EPOCHS_ATTR = "epochs"
CHECKPOINT_ATTR = "checkpoint"
SNAPSHOTS_PER_TRIAL = 3
_REASON_LIMIT = 2000
# Attributes of one attempt: a retried trial inherits its failed attempt's user attributes
# (Optuna's retry callback copies them), so they are cleared when the retry starts. The
# checkpoint is kept on purpose: it is what the retry resumes from.
_ATTEMPT_ATTRS = (PRUNE_REASON_ATTR, FAIL_REASON_ATTR, ARTIFACTS_ATTR, METRICS_ATTR)


class TrialPruned(optuna.TrialPruned):
    """Stops a trial early; ``reason`` is one of ``guards.PRUNE_REASONS``.

    Raised by ``EpochReporter.report`` (and so by the SDK's ``trial.report``); code that catches
    ``optuna.TrialPruned`` catches it too.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrialFailed(Exception):
    """The trial's code failed in a way that needs no traceback (a command's exit code)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkerStopped(BaseException):
    """The worker was asked to stop (SIGTERM) in the middle of a trial."""


def trial_params(job: TuningJob, trial: optuna.Trial) -> dict[str, Any]:
    """What the trainer gets: fixed params (and, built in, epochs), then the sampled ones; a
    stage's epochs fidelity (``spec.stages[].epochs``) overrides the epochs for every trainer."""
    from kubetune.stage_study import stage_epochs

    trainer = job.spec.trainer
    if trainer.builtin is None:
        params = {**(trainer.params or {}), **trial.params}
    else:
        params = {"epochs": trainer.builtin.epochs, **trainer.builtin.params, **trial.params}
    epochs = stage_epochs(job.spec, trial.user_attrs)
    if epochs is not None:
        params["epochs"] = epochs
    return params


def max_epochs(job: TuningJob, params: Mapping[str, Any]) -> int | None:
    """The last epoch a trial reports, if known: a report there is never cut by the deadline.

    The built-in trainer trains ``params["epochs"]``; code declares ``trainer.epochs``.
    """
    if job.spec.trainer.builtin is None:
        return job.spec.trainer.epochs
    return int(params["epochs"])


class EpochReporter:
    """The one reporting path of every trainer, one per trial.

    ``report(epoch, metrics)`` records the epoch in ``history``, runs the NaN/divergence guards,
    reports the objective to Optuna, checks the job's deadline and asks the pruner; it raises
    ``TrialPruned`` when the trial must stop.
    """

    def __init__(self, trial: optuna.Trial, spec: JobSpec, *, last_epoch: int | None = None,
                 deadline: float | None = None) -> None:
        self.trial = trial
        self.metric = spec.objective.metric
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, float] = {}
        self._guard = guards.EpochGuard(spec.pruning, self.metric)
        self._last_epoch = last_epoch
        self._deadline = deadline
        trial.set_user_attr(HISTORY_ATTR, self.history)

    def report(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 1:
            raise ValueError(f"epoch must be an integer >= 1, got {epoch!r}")
        epoch = int(epoch)
        values = {name: _number(name, value) for name, value in metrics.items()}
        if self.metric not in values:
            raise ValueError(f"epoch {epoch} reports no {self.metric} (the objective metric); "
                             f"reported: {', '.join(values) or 'nothing'}")
        self.history.append({"epoch": epoch, **{k: _jsonable(v) for k, v in values.items()}})
        self.last = values
        self.trial.set_user_attr(HISTORY_ATTR, self.history)
        self.trial.set_user_attr(EPOCHS_ATTR, epoch)
        reason = self._guard.check(values)
        if reason is not None:
            raise TrialPruned(reason)
        self.trial.report(values[self.metric], epoch)
        last = self._last_epoch is not None and epoch >= self._last_epoch
        if self._deadline is not None and time.time() >= self._deadline and not last:
            raise TrialPruned(guards.TIMEOUT)
        if self.trial.should_prune():
            raise TrialPruned(guards.PRUNER)

    def final(self, metrics: Mapping[str, Any] | None = None) -> tuple[float, dict[str, float]]:
        """The objective value and metrics a trial ends with: ``metrics`` over the last report.

        A final objective that is not finite prunes the trial (``nan``), as a report would.
        """
        final = {**self.last, **{k: _number(k, v) for k, v in (metrics or {}).items()}}
        if self.metric not in final:
            raise TrialFailed(f"the trial ended without reporting {self.metric} (the objective "
                              "metric)")
        if not math.isfinite(final[self.metric]) or (
                self._guard.check(final) == guards.NAN):
            raise TrialPruned(guards.NAN)
        return final[self.metric], final


@dataclass
class Outcome:
    """How a trainer ended a trial that was not pruned: its final metrics, and the files to
    keep as artifacts (``{"predictions": path, "model": path}``, each optional)."""

    metrics: dict[str, Any] | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)


TrainerRun = Callable[["TrialContext"], Outcome]


@dataclass
class TrialContext:
    """What a trainer gets to run one trial."""

    study: optuna.Study
    trial: optuna.Trial
    job: TuningJob
    params: dict[str, Any]
    reporter: EpochReporter
    data: Any
    artifact_store: Any
    scratch: Path             # a private temporary folder, removed after the trial
    workdir: Path | None = None
    train: Callable[..., Any] | None = None


def run_trial(study: optuna.Study, trial: optuna.Trial, job: TuningJob, data: Any,
              artifact_store: Any, *, deadline: float | None = None,
              train: Callable[..., Any] | None = None,
              workdir: Path | None = None) -> TrialState:
    """Run one trial to its end with the job's trainer and tell the study how it ended."""
    spec = job.spec
    metric = spec.objective.metric
    params = trial_params(job, trial)
    for attr in _ATTEMPT_ATTRS:
        if attr in trial.user_attrs:
            trial.set_user_attr(attr, None)
    reporter = EpochReporter(trial, spec, last_epoch=max_epochs(job, params), deadline=deadline)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="kubetune-trial-") as scratch:
        context = TrialContext(study, trial, job, params, reporter, data, artifact_store,
                               Path(scratch), workdir, train)
        try:
            outcome = _trainer(spec.trainer.kind)(context)
            value, metrics = reporter.final(outcome.metrics)
        except TrialPruned as stop:
            trial.set_user_attr(PRUNE_REASON_ATTR, stop.reason)
            tell(study, trial, state=TrialState.PRUNED)
            log.info("trial %d pruned (%s) after %d epochs", trial.number, stop.reason,
                     len(reporter.history))
            return TrialState.PRUNED
        except (WorkerStopped, KeyboardInterrupt):
            raise
        except TrialFailed as err:
            return _fail(study, trial, err.reason, "")
        except Exception as err:  # a bug or bad data in this trial must not kill the worker
            return _fail(study, trial, f"{type(err).__name__}: {err}", traceback.format_exc())
        try:
            ids = {key: upload_artifact(artifact_store=artifact_store, file_path=str(path),
                                        study_or_trial=trial)
                   for key, path in outcome.artifacts.items()}
        except Exception as err:
            return _fail(study, trial, f"cannot save artifacts: {type(err).__name__}: {err}",
                         traceback.format_exc())
    if ids:
        trial.set_user_attr(ARTIFACTS_ATTR, ids)
    trial.set_user_attr(METRICS_ATTR, {k: _jsonable(v) for k, v in metrics.items()})
    tell(study, trial, value)
    log.info("trial %d complete: %s=%.5g in %.1fs", trial.number, metric, value,
             time.time() - started)
    return TrialState.COMPLETE


def _trainer(kind: str) -> TrainerRun:
    if kind == "entrypoint":
        from kubetune.sdk import run_entrypoint

        return run_entrypoint
    if kind == "command":
        from kubetune.command_trial import run_command

        return run_command
    return run_builtin


def run_builtin(context: TrialContext) -> Outcome:
    """The built-in MLP: train with the reporter as its epoch callback, keep model and
    predictions (and snapshots when the job ensembles them)."""
    train = context.train
    if train is None:
        from kubetune.mlp import train
    spec, params, data = context.job.spec, context.params, context.data
    builtin = spec.trainer.builtin
    assert builtin is not None
    snapshots = None
    extra: dict[str, Any] = {}
    if spec.ensemble.enabled and spec.ensemble.members == "snapshots":
        snapshots = Snapshots(snapshot_epochs(int(params.get("epochs", 0))), data)
        extra["on_snapshot"] = snapshots
    if builtin.balance != "none":
        extra["balance"] = builtin.balance
    result = train(params, data, seed=builtin.seed + context.trial.number, device=builtin.device,
                   on_epoch=context.reporter.report, **extra)
    files = save_artifacts(context.trial, result, data, context.scratch, params=params,
                           snapshots=snapshots)
    return Outcome(artifacts=files)


def save_artifacts(trial: optuna.Trial, result: Any, data: Any, folder: Path, *,
                   params: dict[str, Any] | None = None,
                   snapshots: Snapshots | None = None) -> dict[str, Path]:
    """Weights and validation/test predictions, what the ensemble step needs, as files in
    ``folder`` (``run_trial`` uploads them once the trial is complete).

    ``params`` are all the params the trainer got (fixed ones included), so the model can be
    rebuilt from ``model.pt`` alone; ``params`` in the file stays the trial's sampled params.
    """
    import torch

    model_path = folder / "model.pt"
    saved: dict[str, Any] = {
        "state_dict": result.model.state_dict(), "params": trial.params,
        "train_params": dict(params if params is not None else trial.params),
        "classes": list(data.classes),
        "mean": torch.tensor(data.mean), "std": torch.tensor(data.std)}
    arrays: dict[str, Any] = {}
    if snapshots is not None and snapshots.kept:
        saved["snapshots"] = [{"epoch": epoch, "state_dict": state}
                              for epoch, state, _, _ in snapshots.kept]
        arrays = {"snapshot_epochs": np.array([k[0] for k in snapshots.kept]),
                  "snapshot_val_proba": np.stack([k[2] for k in snapshots.kept]),
                  "snapshot_test_proba": np.stack([k[3] for k in snapshots.kept])}
    torch.save(saved, model_path)  # tensors, not numpy: loads with weights_only=True
    preds_path = folder / "predictions.npz"
    np.savez_compressed(preds_path, val_proba=result.val_proba, test_proba=result.test_proba,
                        y_val=data.y_val, y_test=data.y_test, **arrays)
    return {"model": model_path, "predictions": preds_path}


def snapshot_epochs(epochs: int, count: int = SNAPSHOTS_PER_TRIAL) -> list[int]:
    """The earlier epochs whose models a trial keeps for a snapshot ensemble.

    ``count`` models per trial, the final one included, spread over the second half of
    training, where models are good yet still differ: 20 epochs -> epochs 13 and 17 (and the
    final model of epoch 20).
    """
    picked = {max(1, round(epochs - epochs / 2 * k / count)) for k in range(1, count)}
    return sorted(e for e in picked if e < epochs)


class Snapshots:
    """``on_snapshot`` callback of the trainer: keeps the model and its validation and test
    predictions at the given epochs (weights copied to the CPU; a few small MLPs per trial)."""

    def __init__(self, epochs: list[int], data: Any) -> None:
        self.epochs = set(epochs)
        self.data = data
        self.kept: list[tuple[int, dict[str, Any], np.ndarray, np.ndarray]] = []

    def __call__(self, epoch: int, model: Any) -> None:
        if epoch not in self.epochs:
            return
        from kubetune.mlp import predict_proba

        device = next(model.parameters()).device
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.kept.append((epoch, state, predict_proba(model, self.data.X_val, device),
                          predict_proba(model, self.data.X_test, device)))


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None = None,
         state: TrialState | None = None) -> None:
    """``study.tell`` outside ``study.optimize``.

    GridSampler calls ``study.stop()`` once the grid is done, which Optuna only allows inside
    ``optimize`` and otherwise raises *after* the trial is stored. The budget already ends a
    grid search (see ``effective_max_trials``), so that signal is not needed here.
    """
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str, details: str) -> TrialState:
    log.warning("trial %d failed: %s\n%s", trial.number, reason, details)
    trial.set_user_attr(FAIL_REASON_ATTR, reason[:_REASON_LIMIT])
    tell(study, trial, state=TrialState.FAIL)
    return TrialState.FAIL


def _jsonable(value: float) -> float | str:
    """JSON has no NaN: keep non-finite values readable as strings in the history."""
    value = float(value)
    return value if np.isfinite(value) else str(value)


def _number(name: str, value: Any) -> float:
    """A reported metric as a float (numpy and torch scalars included)."""
    if isinstance(value, (bool, str)) or value is None:
        raise TypeError(f"metric {name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name} must be a number, got {value!r}") from None
