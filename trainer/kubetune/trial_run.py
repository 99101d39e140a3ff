"""Run one trial of the built-in trainer: train, guard, report, prune, save, tell.

Every epoch the metrics are kept in the trial's ``history`` (learning curves), the NaN and
divergence guards look at them, and only then is the objective reported to Optuna and the
pruner asked. Why a trial stopped is kept in the ``prune_reason`` / ``fail_reason`` user
attributes.

A complete trial saves what the ensemble step needs as Optuna artifacts: ``model.pt`` (weights,
the full training params, classes, standardization) and ``predictions.npz`` (validation and
test class probabilities). Only when the job asks for snapshot ensembles
(``spec.ensemble.members: snapshots``) does it also keep the models of a few earlier epochs
(``snapshot_epochs``) and their predictions; other jobs pay nothing for them.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from kubetune import guards
from kubetune.spec import TuningJob

log = logging.getLogger("kubetune.worker")

HISTORY_ATTR = "history"
PRUNE_REASON_ATTR = "prune_reason"
FAIL_REASON_ATTR = "fail_reason"
WORKER_ATTR = "worker"
ARTIFACTS_ATTR = "artifacts"
METRICS_ATTR = "metrics"
EPOCHS_ATTR = "epochs"
SNAPSHOTS_PER_TRIAL = 3
_REASON_LIMIT = 2000


class PruneTrial(Exception):
    """Stops training; ``reason`` is one of ``guards.PRUNE_REASONS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkerStopped(BaseException):
    """The worker was asked to stop (SIGTERM) in the middle of a trial."""


def trial_params(job: TuningJob, trial: optuna.Trial) -> dict[str, Any]:
    """Fixed params, epochs, then sampled params: what the trainer gets; a stage's epochs
    fidelity (``spec.stages[].epochs``) overrides the epochs."""
    from kubetune.stage_study import stage_epochs

    builtin = job.spec.trainer.builtin
    params = {"epochs": builtin.epochs, **builtin.params, **trial.params}
    epochs = stage_epochs(job.spec, trial.user_attrs)
    if epochs is not None:
        params["epochs"] = epochs
    return params


def run_trial(study: optuna.Study, trial: optuna.Trial, job: TuningJob, data: Any,
              artifact_store: Any, *, deadline: float | None = None,
              train: Callable[..., Any] | None = None) -> TrialState:
    """Train one trial to its end and tell the study how it ended."""
    if train is None:
        from kubetune.mlp import train
    spec = job.spec
    metric = spec.objective.metric
    guard = guards.EpochGuard(spec.pruning, metric)
    history: list[dict[str, float]] = []
    params = trial_params(job, trial)
    for attr in (PRUNE_REASON_ATTR, FAIL_REASON_ATTR, ARTIFACTS_ATTR, METRICS_ATTR):
        if attr in trial.user_attrs:  # a retry inherits its failed attempt's attributes
            trial.set_user_attr(attr, None)
    trial.set_user_attr(HISTORY_ATTR, history)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        history.append({"epoch": epoch, **{k: _jsonable(v) for k, v in metrics.items()}})
        trial.set_user_attr(HISTORY_ATTR, history)
        trial.set_user_attr(EPOCHS_ATTR, epoch)
        reason = guard.check(metrics)
        if reason is not None:
            raise PruneTrial(reason)
        trial.report(float(metrics[metric]), epoch)
        last_epoch = epoch >= int(params.get("epochs", 0))
        if deadline is not None and time.time() >= deadline and not last_epoch:
            raise PruneTrial(guards.TIMEOUT)
        if trial.should_prune():
            raise PruneTrial(guards.PRUNER)

    snapshots = None
    extra: dict[str, Any] = {}
    if spec.ensemble.enabled and spec.ensemble.members == "snapshots":
        snapshots = Snapshots(snapshot_epochs(int(params.get("epochs", 0))), data)
        extra["on_snapshot"] = snapshots
    started = time.time()
    try:
        result = train(params, data, seed=spec.trainer.builtin.seed + trial.number,
                       device=spec.trainer.builtin.device, on_epoch=on_epoch, **extra)
    except PruneTrial as stop:
        trial.set_user_attr(PRUNE_REASON_ATTR, stop.reason)
        tell(study, trial, state=TrialState.PRUNED)
        log.info("trial %d pruned (%s) after %d epochs", trial.number, stop.reason, len(history))
        return TrialState.PRUNED
    except (WorkerStopped, KeyboardInterrupt):
        raise
    except Exception as err:  # a bug or bad data in this trial must not kill the worker
        return _fail(study, trial, f"{type(err).__name__}: {err}", traceback.format_exc())
    value = float(history[-1][metric])
    try:
        ids = save_artifacts(trial, result, data, artifact_store, params=params,
                             snapshots=snapshots)
    except Exception as err:
        return _fail(study, trial, f"cannot save artifacts: {type(err).__name__}: {err}",
                     traceback.format_exc())
    trial.set_user_attr(ARTIFACTS_ATTR, ids)
    trial.set_user_attr(METRICS_ATTR, {k: v for k, v in history[-1].items() if k != "epoch"})
    tell(study, trial, value)
    log.info("trial %d complete: %s=%.5g in %.1fs", trial.number, metric, value,
             time.time() - started)
    return TrialState.COMPLETE


def save_artifacts(trial: optuna.Trial, result: Any, data: Any, store: Any, *,
                   params: dict[str, Any] | None = None,
                   snapshots: Snapshots | None = None) -> dict[str, str]:
    """Weights and validation/test predictions, what the ensemble step needs.

    ``params`` are all the params the trainer got (fixed ones included), so the model can be
    rebuilt from ``model.pt`` alone; ``params`` in the file stays the trial's sampled params.
    """
    import torch

    ids: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-") as tmp:
        model_path = Path(tmp) / "model.pt"
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
        preds_path = Path(tmp) / "predictions.npz"
        np.savez_compressed(preds_path, val_proba=result.val_proba, test_proba=result.test_proba,
                            y_val=data.y_val, y_test=data.y_test, **arrays)
        for key, path in (("model", model_path), ("predictions", preds_path)):
            ids[key] = upload_artifact(artifact_store=store, file_path=str(path),
                                       study_or_trial=trial)
    return ids


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
