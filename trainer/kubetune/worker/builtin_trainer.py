"""The built-in trainer: the MLP of ``kubetune.builtin.mlp``, reporting every epoch.

A complete trial keeps ``model.pt`` and ``predictions.npz`` for the ensemble step. Only a job
that ensembles snapshots keeps the models of earlier epochs too; other jobs pay nothing for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna

from kubetune.study.schema import DATA_SHARE_ATTR
from kubetune.worker.contract import TrainerResult, TrialContext

SNAPSHOTS_PER_TRIAL = 3


def run_builtin(context: TrialContext) -> TrainerResult:
    """The built-in MLP: train with the reporter as its epoch callback, keep model and
    predictions (and snapshots when the job ensembles them)."""
    train = context.train
    if train is None:
        from kubetune.builtin.mlp import train  # torch loads with the first trial
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
    share = getattr(data, "share", 1.0)
    if share < 1.0:  # a reduced-data stage: its epochs are cheaper (status.compute.dataEpochs)
        context.trial.set_user_attr(DATA_SHARE_ATTR, round(float(share), 6))
    result = train(params, data, seed=builtin.seed + context.trial.number, device=builtin.device,
                   on_epoch=context.reporter.report, **extra)
    files = save_artifacts(context.trial, result, data, context.scratch, params=params,
                           snapshots=snapshots)
    return TrainerResult(artifacts=files)


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
        from kubetune.builtin.mlp import predict_proba

        device = next(model.parameters()).device
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.kept.append((epoch, state, predict_proba(model, self.data.X_val, device),
                          predict_proba(model, self.data.X_test, device)))
