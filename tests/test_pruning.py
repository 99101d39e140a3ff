"""kubetune's pruner check: the decisions of Optuna's own ``trial.should_prune()``, on a real
PostgreSQL server, however the study's trials come and go between two checks."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.trial import TrialState

from kubetune.search.pruning import should_prune
from kubetune.search.stages import StageStorage
from kubetune.study.optuna_internals import storage_of
from kubetune.study.schema import STAGE_ATTR
from kubetune.study.storage import open_storage


def _storage(kind: str, postgres_url: str, tmp_path):
    if kind == "postgresql":
        return open_storage(postgres_url)
    if kind == "postgresql, retrying":  # a worker's: ReconnectingRDBStorage
        return open_storage(postgres_url, retry_for=5.0)
    return open_storage(str(tmp_path / "study.journal"))


def _study(storage, pruner, *, name: str = "pruning") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=storage, direction="maximize",
                               pruner=pruner, load_if_exists=True)


def _finish(study: optuna.Study, curve: list[float], state: TrialState) -> None:
    trial = study.ask()
    for step, value in enumerate(curve, 1):
        trial.report(value, step)
    study.tell(trial, curve[-1] if state == TrialState.COMPLETE else None, state=state)


@pytest.mark.parametrize("kind", ["postgresql", "postgresql, retrying", "journal"])
@pytest.mark.parametrize("pruner", [
    optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
    optuna.pruners.PercentilePruner(25.0, n_startup_trials=2, n_warmup_steps=1,
                                    interval_steps=2),
], ids=["median", "percentile"])
def test_decides_as_optunas_should_prune(kind, pruner, postgres_url, tmp_path):
    rng = random.Random(7)
    study = _study(_storage(kind, postgres_url, tmp_path), pruner)
    decisions = []
    for n in range(12):
        running = study.ask()
        for step in range(1, 7):
            running.report(rng.uniform(0.0, 1.0), step)
            ours, optunas = should_prune(running), running.should_prune()
            assert ours == optunas, (n, step)
            decisions.append(ours)
        state = rng.choice([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                            TrialState.FAIL])
        study.tell(running, rng.uniform(0.0, 1.0) if state == TrialState.COMPLETE else None,
                   state=state)
    assert True in decisions and False in decisions  # both answers were put to the test


def test_sees_trials_other_workers_complete_between_two_checks(postgres_url):
    # Two workers, as two processes have them: each its own storage and study object.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    mine = _study(open_storage(postgres_url, retry_for=5.0), pruner)
    theirs = _study(open_storage(postgres_url, retry_for=5.0), pruner)
    older = theirs.ask()  # started before my trial, complete after my first check
    running = mine.ask()
    running.report(0.5, 1)
    assert not should_prune(running)  # nothing complete yet

    older.report(0.9, 1)
    theirs.tell(older, 0.9)
    _finish(theirs, [0.8], TrialState.COMPLETE)  # started after my first check
    assert should_prune(running) and running.should_prune()  # 0.5 < the median of 0.9, 0.8


def test_a_stage_is_compared_with_its_own_trials(postgres_url):
    # A staged job's trial compares with the complete trials of its own stage only, as the
    # stage's view of the study shows them to Optuna.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = _study(open_storage(postgres_url, retry_for=5.0), pruner)
    for stage, value in ((0, 0.9), (0, 0.95), (1, 0.2), (1, 0.3)):
        trial = study.ask()
        trial.set_user_attr(STAGE_ATTR, stage)
        trial.report(value, 1)
        study.tell(trial, value)
    for stage, pruned in ((0, True), (1, False)):
        view = optuna.Study(study_name=study.study_name,
                            storage=StageStorage(storage_of(study), stage), pruner=pruner)
        trial = view.ask()
        trial.report(0.5, 1)
        assert should_prune(trial) == trial.should_prune() == pruned, stage


def test_no_pruner_prunes_nothing(postgres_url):
    study = _study(open_storage(postgres_url), optuna.pruners.NopPruner())
    _finish(study, [0.9, 0.9], TrialState.COMPLETE)
    trial = study.ask()
    trial.report(0.0, 1)
    assert not should_prune(trial)
