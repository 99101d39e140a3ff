"""The trainer SDK: the ``Trial`` a Python entrypoint (``spec.trainer.entrypoint``) runs with.

Its user-facing contract, with an example, is docs/own-code.md (A Python function): change the
two together. ``Trial.report`` goes through the built-in trainer's ``EpochReporter``
(``kubetune.worker.contract``: guards, Optuna, deadline, pruner) and raises
``kubetune.TrialPruned``, which the user's function must let propagate.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import download_artifact, upload_artifact

from kubetune.study import optuna_internals
from kubetune.study.schema import CHECKPOINT_ATTR
from kubetune.worker.contract import EpochReporter, TrainerResult, TrialContext

log = logging.getLogger("kubetune.worker")

PREDICTIONS_FILE = "predictions.npz"


class Trial:
    """One trial, as the user's training function sees it.

    Attributes:
        params: the sampled hyperparameters and the fixed ``spec.trainer.params``.
        number: the trial's number in the study (a retried trial keeps its params, not its
            number).
    """

    def __init__(self, context: TrialContext) -> None:
        self._context = context
        self._reporter: EpochReporter = context.reporter
        self._checkpoint_id: str | None = None
        self.params: dict[str, Any] = dict(context.params)
        self.number: int = context.trial.number
        self._predictions: Path | None = None

    def report(self, epoch: int, **metrics: float) -> None:
        """Report one epoch's metrics (the objective metric among them).

        Raises:
            kubetune.TrialPruned: the trial is NaN, diverged, past the job's deadline or
                pruned by the pruner; stop training and let it propagate.
        """
        self._reporter.report(epoch, metrics)

    def save_predictions(self, *, validation: Any, test: Any, labels: Any) -> None:
        """Keep class probabilities for the ensemble step (the last call wins).

        Args:
            validation: probabilities on the validation rows, shape (rows, classes).
            test: probabilities on the test rows, shape (rows, classes).
            labels: the true class of each row as the index of its probability column
                (0 .. classes-1): ``(y_val, y_test)`` or ``{"validation": y_val, "test":
                y_test}``. Every trial must predict the same rows for the ensemble to
                combine them.
        """
        path = self._context.scratch / PREDICTIONS_FILE
        write_predictions(path, validation, test, *_label_pair(labels))
        self._predictions = path

    def checkpoint(self, state: Any) -> None:
        """Store ``state`` (what ``torch.save`` writes: tensors, state dicts, numbers,
        strings, lists, dicts) as this trial's checkpoint; it replaces the previous one."""
        import torch

        context = self._context
        path = context.scratch / "checkpoint.pt"
        torch.save(state, path)
        artifact = upload_artifact(artifact_store=context.artifact_store, file_path=str(path),
                                   study_or_trial=context.trial)
        context.reporter.flush()  # a retry resuming here finds the curve up to here
        context.trial.set_user_attr(CHECKPOINT_ATTR, {"artifact": artifact,
                                                      "trial": self.number})
        if self._checkpoint_id is not None:
            _remove(context.artifact_store, self._checkpoint_id)
        self._checkpoint_id = artifact

    def restore(self) -> Any | None:
        """The latest checkpoint of this trial or of the failed attempt it retries, or None.

        A trial whose worker died (or was stopped) is retried with the same params; its
        function calls ``restore()`` to resume instead of starting over.
        """
        import torch

        context = self._context
        found = find_checkpoint(context.study, context.trial)
        if found is None:
            return None
        path = context.scratch / "restore.pt"
        download_artifact(artifact_store=context.artifact_store, artifact_id=found["artifact"],
                          file_path=str(path))
        log.info("trial %d restores the checkpoint of trial %s", self.number, found["trial"])
        state = torch.load(path, map_location="cpu", weights_only=True)
        path.unlink()
        return state


def find_checkpoint(study: optuna.Study, trial: optuna.Trial) -> dict[str, Any] | None:
    """This attempt's checkpoint, else the newest one among the attempts it retries.

    Optuna's retry callback records the earlier attempts' numbers in the ``retry_history``
    system attribute (and copies their user attributes, the checkpoint among them).
    """
    storage = optuna_internals.storage_of(study)
    frozen = storage.get_trial(optuna_internals.trial_id(trial))
    own = frozen.user_attrs.get(CHECKPOINT_ATTR)
    if own:
        return own
    for number in reversed(frozen.system_attrs.get("retry_history") or []):
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            optuna_internals.study_id(study), number)
        found = storage.get_trial(trial_id).user_attrs.get(CHECKPOINT_ATTR)
        if found:
            return found
    return None


def run_entrypoint(context: TrialContext) -> TrainerResult:
    """Call the job's entrypoint with a ``Trial``; its return value is the final metrics."""
    entrypoint = context.job.spec.trainer.entrypoint
    assert entrypoint is not None
    function = resolve_entrypoint(entrypoint)
    trial = Trial(context)
    returned = function(trial)
    metrics = _final_metrics(returned, context.reporter.metric)
    saved = trial._predictions
    artifacts = {"predictions": saved} if saved is not None else {}
    return TrainerResult(metrics=metrics, artifacts=artifacts)


def resolve_entrypoint(entrypoint: str) -> Callable[[Trial], Any]:
    """The function ``package.module:function`` names (imported from ``sys.path``)."""
    module_name, _, attribute = entrypoint.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{entrypoint} is not a function")
    return target


def add_code_paths(folders: Sequence[str | Path]) -> None:
    """Put the user's code folders first on ``sys.path`` (in order)."""
    for folder in reversed([str(Path(f).resolve()) for f in folders]):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)


def write_predictions(path: Path, validation: Any, test: Any, y_val: Any, y_test: Any) -> None:
    """Check and write ``predictions.npz`` in the format the ensemble step reads."""
    val_proba = np.asarray(validation, dtype=np.float32)
    test_proba = np.asarray(test, dtype=np.float32)
    y_val = np.asarray(y_val)
    y_test = np.asarray(y_test)
    for name, proba, labels in (("validation", val_proba, y_val), ("test", test_proba, y_test)):
        if proba.ndim != 2 or proba.shape[1] < 2:
            raise ValueError(f"{name} probabilities must have shape (rows, classes >= 2), got "
                             f"{proba.shape}")
        if labels.ndim != 1 or len(labels) != len(proba):
            raise ValueError(f"{name} labels must be one class per row ({len(proba)}), got "
                             f"shape {labels.shape}")
        if labels.dtype.kind not in "iu" and not (
                labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
            raise ValueError(f"{name} labels must be class indices (integers), got "
                             f"{labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= proba.shape[1]):
            raise ValueError(f"{name} labels must be column indices 0..{proba.shape[1] - 1} of "
                             "the probabilities")
    if val_proba.shape[1] != test_proba.shape[1]:
        raise ValueError(f"validation and test probabilities have different numbers of classes "
                         f"({val_proba.shape[1]} and {test_proba.shape[1]})")
    np.savez_compressed(path, val_proba=val_proba, test_proba=test_proba,
                        y_val=y_val.astype(np.int64), y_test=y_test.astype(np.int64))


def _label_pair(labels: Any) -> tuple[Any, Any]:
    if isinstance(labels, Mapping):
        missing = {"validation", "test"} - set(labels)
        if missing:
            raise ValueError(f"labels needs the keys validation and test (missing: "
                             f"{', '.join(sorted(missing))})")
        return labels["validation"], labels["test"]
    if isinstance(labels, (tuple, list)) and len(labels) == 2:
        return labels[0], labels[1]
    raise ValueError("labels must be (y_val, y_test) or {'validation': y_val, 'test': y_test}")


def _final_metrics(returned: Any, metric: str) -> dict[str, Any] | None:
    if returned is None:
        return None
    if isinstance(returned, Mapping):
        return dict(returned)
    if isinstance(returned, (int, float, np.floating, np.integer)) and not isinstance(
            returned, bool):
        return {metric: float(returned)}
    raise TypeError(f"the entrypoint must return its final metrics as a dict (or the "
                    f"{metric} value, or None), got {type(returned).__name__}")


def _remove(store: Any, artifact_id: str) -> None:
    try:
        store.remove(artifact_id)
    except Exception:  # an old checkpoint left behind wastes space, nothing else
        log.debug("could not remove artifact %s", artifact_id, exc_info=True)
