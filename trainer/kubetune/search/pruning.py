"""The pruner's check of a running trial, at the cost of one small query on PostgreSQL.

Optuna's median and percentile pruners compare a trial with the study's complete trials,
which they get from ``study.get_trials``. On an RDB storage, Optuna's cache reads every
unfinished trial whole (parameters, attributes, curve: seven queries) each time, so one
``should_prune`` costs more than the report before it, and grows with the workers, whose
running trials are all read. ``should_prune`` here gives the same pruner the same complete
trials, kept per process and brought up to date with one query of the trials' ids and
states; a trial that completes is read once. Other pruners and storages take Optuna's path.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import optuna
from optuna.pruners import NopPruner, PercentilePruner
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kubetune.search.stages import StageStorage, stage_of
from kubetune.study.optuna_internals import (
    backend_of,
    read_trial_states,
    running_frozen_trial,
    storage_of,
    study_id,
    trial_id,
)

# Past this many newly complete trials (a worker's first check in a long study), they are
# read in one listing instead of one by one.
_READ_ALL_FROM = 20


def should_prune(trial: optuna.Trial) -> bool:
    """``trial.should_prune()``, with the same pruner deciding on the same trials."""
    study = trial.study
    pruner = study.pruner
    if isinstance(pruner, NopPruner):
        return False
    storage, stage = storage_of(study), None
    if isinstance(storage, StageStorage):
        storage, stage = storage.inner, storage.stage
    reader = _state_reader(storage)
    # MedianPruner is a PercentilePruner; their prune reads study.get_trials and
    # study.direction only.
    if reader is None or not isinstance(pruner, PercentilePruner):
        return trial.should_prune()
    complete = _complete_trials(storage, study_id(study), reader)
    return pruner.prune(_CompleteTrialsView(complete, stage, study.direction),
                        running_frozen_trial(trial))


def _state_reader(storage: BaseStorage) -> Any:
    """``read_trial_states`` of the RDB storage behind ``storage`` (the retrying one of a
    worker's storage); None for another kind of storage."""
    backend = backend_of(storage)
    if hasattr(backend, "read_trial_states"):
        return backend.read_trial_states
    if isinstance(backend, RDBStorage):
        return functools.partial(read_trial_states, backend)
    return None


class CompleteTrials:
    """One study's complete trials, as this process last saw them.

    A finished trial never changes, so only trials that were running at the last look, or are
    newer than every trial seen, are asked for again: one query of ids and states.
    """

    def __init__(self, storage: BaseStorage, study: int, read_states: Any) -> None:
        self._storage, self._study, self._read_states = storage, study, read_states
        self._trials: dict[int, FrozenTrial] = {}
        self._sorted: list[FrozenTrial] = []
        self._unfinished: set[int] = set()
        self._last_seen = -1

    def get(self) -> list[FrozenTrial]:
        fresh = []
        for trial, state in self._read_states(self._study, self._last_seen, self._unfinished):
            self._last_seen = max(self._last_seen, trial)
            if not state.is_finished():
                self._unfinished.add(trial)
                continue
            self._unfinished.discard(trial)
            if state == TrialState.COMPLETE and trial not in self._trials:
                fresh.append(trial)
        if fresh:
            listed: dict[int, FrozenTrial] = {}
            if len(fresh) >= _READ_ALL_FROM:
                listed = {trial_id(t): t for t in self._storage.get_all_trials(
                    self._study, deepcopy=False, states=(TrialState.COMPLETE,))}
            for trial in fresh:
                self._trials[trial] = listed.get(trial) or self._storage.get_trial(trial)
            self._sorted = sorted(self._trials.values(), key=lambda t: t.number)
        return self._sorted


_readers: weakref.WeakKeyDictionary[BaseStorage, dict[int, CompleteTrials]] = (
    weakref.WeakKeyDictionary())


def _complete_trials(storage: BaseStorage, study: int, read_states: Any) -> list[FrozenTrial]:
    per_study = _readers.setdefault(storage, {})
    if study not in per_study:
        per_study[study] = CompleteTrials(storage, study, read_states)
    return per_study[study].get()


class _CompleteTrialsView:
    """What a percentile pruner reads of a study: its complete trials (of one stage, in a
    staged job, as the stage's own view shows them) and its direction."""

    def __init__(self, complete: list[FrozenTrial], stage: int | None,
                 direction: StudyDirection) -> None:
        self._complete = (complete if stage is None
                          else [t for t in complete if stage_of(t) == stage])
        self.direction = direction

    def get_trials(self, deepcopy: bool = True,
                   states: Any = None) -> list[FrozenTrial]:
        if states is None or tuple(states) != (TrialState.COMPLETE,):
            raise NotImplementedError("a pruner here reads the complete trials only")
        return self._complete
