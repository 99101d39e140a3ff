"""Run one trial with the job's trainer, and tell the study how it ended and why.

``run_trial`` clears what a failed attempt left, runs the trainer kind the job names, uploads
the files it kept (what the ensemble step needs) as Optuna artifacts, and records the
``prune_reason`` or ``fail_reason``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from kubetune.builtin import diagnosis
from kubetune.search.stages import trial_params
from kubetune.spec.model import TuningJob
from kubetune.study.optuna_internals import artifact_folder, set_user_attrs
from kubetune.study.schema import (
    ARTIFACTS_ATTR,
    DIAGNOSIS_ATTR,
    FAIL_REASON_ATTR,
    HISTORY_PREFIX,
    INHERITED_HISTORY_KEY,
    METRICS_ATTR,
    PRUNE_REASON_ATTR,
    RESUMED_ATTR,
    history_of,
)
from kubetune.worker.contract import (
    EpochReporter,
    TrainerRun,
    TrialContext,
    TrialFailed,
    TrialPruned,
    WorkerStopped,
    jsonable,
    max_epochs,
)

log = logging.getLogger("kubetune.worker")

_REASON_LIMIT = 2000
# Attributes of one attempt: a retried trial inherits its failed attempt's user attributes
# (Optuna's retry callback copies them), so they are cleared when the retry starts. The
# checkpoint is kept on purpose: it is what the retry resumes from.
_ATTEMPT_ATTRS = (PRUNE_REASON_ATTR, FAIL_REASON_ATTR, ARTIFACTS_ATTR, METRICS_ATTR,
                  DIAGNOSIS_ATTR, RESUMED_ATTR)


def run_trial(study: optuna.Study, trial: optuna.Trial, job: TuningJob, data: Any,
              artifact_store: Any, *, deadline: float | None = None,
              train: Callable[..., Any] | None = None,
              workdir: Path | None = None) -> TrialState:
    """Run one trial to its end with the job's trainer and tell the study how it ended."""
    spec = job.spec
    params = trial_params(job, trial)
    for attr in _ATTEMPT_ATTRS:
        if attr in trial.user_attrs:
            trial.set_user_attr(attr, None)
    _gather_inherited_history(trial)
    reporter = EpochReporter(trial, spec, last_epoch=max_epochs(job, params), deadline=deadline)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="kubetune-trial-") as scratch:
        context = TrialContext(study, trial, job, params, reporter, data, artifact_store,
                               Path(scratch), workdir, train)
        try:
            try:
                outcome = _trainer(spec.trainer.kind)(context)
            finally:  # however the trial ends, its curve is stored whole
                reporter.flush()
            values, metrics = reporter.final(outcome.metrics)
        except TrialPruned as stop:
            trial.set_user_attr(PRUNE_REASON_ATTR, stop.reason)
            if stop.reason in diagnosis.DIVERGED_REASONS:  # a cut-short curve gets no label
                trial.set_user_attr(DIAGNOSIS_ATTR, diagnosis.DIVERGED)
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
        link_trial_files(artifact_store, trial.number,
                         {outcome.artifacts[key].name: ids[key] for key in ids})
    # In one write: the artifacts, the final metrics and the curve's label, kept for whoever
    # reads the trial (optuna-dashboard shows it); the history is read back whole, since a
    # resumed attempt reported only its own epochs.
    set_user_attrs(trial, {**({ARTIFACTS_ATTR: ids} if ids else {}),
                           METRICS_ATTR: {k: jsonable(v) for k, v in metrics.items()},
                           DIAGNOSIS_ATTR: diagnosis.diagnose(history_of(trial.user_attrs))})
    tell(study, trial, values)
    log.info("trial %d complete: %s in %.1fs", trial.number, ", ".join(
        f"{name}={value:.5g}" for name, value in zip(spec.objective.names, values)),
        time.time() - started)
    return TrialState.COMPLETE


def _gather_inherited_history(trial: optuna.Trial) -> None:
    """A retry inherits its failed attempt's history chunks (Optuna copies the user
    attributes); gathered under ``INHERITED_HISTORY_KEY``, which every epoch the retry reports
    overrides, they cannot shadow the retry's own chunks, whose first epochs differ."""
    inherited = [key for key in trial.user_attrs
                 if key.startswith(HISTORY_PREFIX) and key != INHERITED_HISTORY_KEY]
    if not inherited:
        return
    trial.set_user_attr(INHERITED_HISTORY_KEY, history_of(trial.user_attrs))
    for key in inherited:
        trial.set_user_attr(key, None)


def trial_folder(number: int) -> str:
    """The readable folder of a trial's files in the artifact folder: ``trial-0076``."""
    return f"trial-{number:04d}"


def link_trial_files(store: Any, number: int, files: dict[str, str]) -> None:
    """``ARTIFACTS/trial-0076/model.pt`` -> the stored file: Optuna names artifacts by UUID,
    and a person looking for trial 76's model should not need Optuna to find it. Links are a
    convenience: where they cannot be made, the artifacts are still there."""
    base = artifact_folder(store)
    if base is None:
        return
    folder = Path(base) / trial_folder(number)
    try:
        folder.mkdir(exist_ok=True)
        for name, artifact_id in files.items():
            link = folder / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path("..") / artifact_id)
    except OSError as err:
        log.info("trial %d: no readable links in %s: %s", number, folder, err)


def _trainer(kind: str) -> TrainerRun:
    """The three trainer kinds, side by side: ``worker/{builtin,entrypoint,command}_trainer``."""
    if kind == "entrypoint":
        from kubetune.worker.entrypoint_trainer import run_entrypoint

        return run_entrypoint
    if kind == "command":
        from kubetune.worker.command_trainer import run_command

        return run_command
    from kubetune.worker.builtin_trainer import run_builtin

    return run_builtin


def tell(study: optuna.Study, trial: optuna.Trial,
         value: float | list[float] | None = None, state: TrialState | None = None) -> None:
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
