"""NaN and divergence guards, alone and together with Optuna's pruners."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from kubetune.search.guards import EpochGuard
from kubetune.search.space import make_pruner, to_distributions
from kubetune.spec.model import Pruning, parse_job
from kubetune.study.schema import history_of
from kubetune.worker.trial import run_trial

from conftest import fast_job

HEALTHY = {"train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.5,
           "val_f1": 0.5}


def _metrics(**changes):
    return {**HEALTHY, **changes}


def test_nan_or_inf_is_pruned_as_nan():
    guard = EpochGuard(Pruning(), "val_accuracy")
    assert guard.check(_metrics()) is None
    assert guard.check(_metrics(val_loss=math.inf)) == "nan"
    assert EpochGuard(Pruning(), "val_accuracy").check(_metrics(train_loss=math.nan)) == "nan"


def test_loss_beyond_factor_times_first_epoch_is_diverged():
    guard = EpochGuard(Pruning.model_validate({"divergence": {"factor": 4.0}}), "val_accuracy")
    assert guard.check(_metrics(train_loss=2.0)) is None   # first epoch sets the reference
    assert guard.check(_metrics(train_loss=7.9)) is None
    assert guard.check(_metrics(train_loss=8.1)) == "diverged"


def test_guards_can_be_turned_off_but_nan_objective_is_never_reported():
    pruning = Pruning.model_validate({"nan": False, "divergence": {"enabled": False}})
    guard = EpochGuard(pruning, "val_accuracy")
    assert guard.check(_metrics(train_loss=1.0)) is None
    assert guard.check(_metrics(train_loss=1e9, val_loss=math.nan)) is None
    assert guard.check(_metrics(val_accuracy=math.nan)) == "nan"


class _ScriptedTraining:
    """Stands in for the MLP: reports a fixed series of epochs, as a diverging net would."""

    def __init__(self, epochs):
        self.epochs = epochs

    def __call__(self, params, data, *, seed, device, on_epoch):
        for epoch, metrics in enumerate(self.epochs, start=1):
            on_epoch(epoch, metrics)
        raise AssertionError("a trial that goes NaN must be stopped before it ends")


def _late_nan_epochs():
    return [_metrics(val_accuracy=0.6), _metrics(val_accuracy=0.7),
            _metrics(train_loss=math.nan, val_loss=math.nan, val_accuracy=0.1),
            _metrics(val_accuracy=0.1)]


def _study_with_history(pruner) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(5):
        trial = study.ask()
        for step, value in enumerate([0.5, 0.6, 0.7, 0.8], start=1):
            trial.report(value, step)
        study.tell(trial, 0.8)
    return study


def test_median_pruner_alone_misses_a_trial_that_turns_nan_late():
    """The gap we close: after finite epochs, a NaN is not below the median, so it trains on."""
    study = _study_with_history(optuna.pruners.MedianPruner(n_startup_trials=1))
    trial = study.ask()
    trial.report(0.6, 1)
    trial.report(0.7, 2)
    assert not trial.should_prune()
    trial.report(math.nan, 3)
    assert not trial.should_prune()  # Optuna's median pruner lets the NaN trial continue


@pytest.mark.parametrize("pruner_type", ["median", "percentile", "hyperband", "asha", "none"])
def test_kubetune_prunes_the_late_nan_trial_at_that_epoch_with_every_pruner(pruner_type):
    pruner = {"type": pruner_type}
    if pruner_type == "percentile":
        pruner["percentile"] = 25.0
    job = parse_job(fast_job(pruning={"pruner": pruner}))
    study = _study_with_history(make_pruner(job.spec))
    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))

    state = run_trial(study, trial, job, data=None, artifact_store=None,
                      train=_ScriptedTraining(_late_nan_epochs()))

    frozen = study.trials[-1]
    assert state == TrialState.PRUNED == frozen.state
    assert frozen.user_attrs["prune_reason"] == "nan"
    assert frozen.user_attrs["diagnosis"] == "diverged"  # kept on the trial, for the dashboard
    assert frozen.intermediate_values == {1: 0.6, 2: 0.7}  # the NaN was never reported
    assert len(history_of(frozen.user_attrs)) == 3          # stopped at the NaN epoch
    assert frozen.value == 0.7


def test_trial_diverging_without_nan_is_pruned_as_diverged():
    job = parse_job(fast_job())
    study = optuna.create_study(direction="maximize")
    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))
    epochs = [_metrics(train_loss=1.0), _metrics(train_loss=4.0), _metrics(train_loss=25.0),
              _metrics(train_loss=50.0)]

    run_trial(study, trial, job, data=None, artifact_store=None,
              train=_ScriptedTraining(epochs))

    assert study.trials[-1].state == TrialState.PRUNED
    assert study.trials[-1].user_attrs["prune_reason"] == "diverged"
    assert study.trials[-1].user_attrs["diagnosis"] == "diverged"
    assert len(history_of(study.trials[-1].user_attrs)) == 3


def test_an_error_in_training_fails_only_that_trial_with_the_reason():
    job = parse_job(fast_job())
    study = optuna.create_study(direction="maximize")
    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))

    def broken(params, data, **kwargs):
        raise RuntimeError("CUDA out of memory")

    state = run_trial(study, trial, job, data=None, artifact_store=None, train=broken)

    assert state == TrialState.FAIL
    assert study.trials[-1].user_attrs["fail_reason"] == "RuntimeError: CUDA out of memory"


# ------------------------------------------------------------------------------ several objectives
def _multi_objective_job():
    job = fast_job(ensemble={"enabled": False})
    job["spec"]["objective"] = {"metrics": [{"metric": "val_accuracy"}, {"metric": "n_params"}]}
    return parse_job(job)


def _multi_objective_study(job):
    from kubetune.study.schema import create_or_load_study

    storage = optuna.storages.InMemoryStorage()
    create_or_load_study(storage, job)
    return optuna.load_study(study_name=job.study_name, storage=storage,
                             pruner=make_pruner(job.spec))


@pytest.mark.parametrize("epochs, reason", [
    (_late_nan_epochs(), "nan"),
    ([_metrics(train_loss=1.0), _metrics(train_loss=4.0), _metrics(train_loss=25.0)],
     "diverged")])
def test_the_guards_prune_every_trial_of_a_multi_objective_study(epochs, reason):
    """Optuna's report and pruners take one objective: with several, the guards still act
    on the history, and nothing is reported to Optuna."""
    job = _multi_objective_job()
    study = _multi_objective_study(job)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert isinstance(study.pruner, optuna.pruners.NopPruner)
    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))

    state = run_trial(study, trial, job, data=None, artifact_store=None,
                      train=_ScriptedTraining([{**e, "n_params": 59.0} for e in epochs]))

    frozen = study.trials[-1]
    assert state == TrialState.PRUNED == frozen.state
    assert frozen.user_attrs["prune_reason"] == reason
    assert frozen.intermediate_values == {} and frozen.values is None
    assert len(history_of(frozen.user_attrs)) == 3


def test_a_multi_objective_trial_ends_with_one_value_per_objective():
    from kubetune.worker.contract import EpochReporter, TrialPruned
    from kubetune.worker.trial import tell

    job = _multi_objective_job()
    study = _multi_objective_study(job)
    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))
    reporter = EpochReporter(trial, job.spec)
    reporter.report(1, _metrics(val_accuracy=0.6, n_params=59.0))
    reporter.report(2, _metrics(val_accuracy=0.7, n_params=59.0))
    values, final = reporter.final()
    assert values == [0.7, 59.0] and final["n_params"] == 59.0
    tell(study, trial, values)
    assert study.trials[-1].values == [0.7, 59.0]
    assert [t.number for t in study.best_trials] == [trial.number]
    # a missing or non-finite objective at the end: failed or pruned, as with one objective
    with pytest.raises(TrialPruned):
        reporter.final({"n_params": math.inf})
    other = EpochReporter(study.ask(), job.spec)
    other.report(1, _metrics(val_accuracy=0.6))
    with pytest.raises(Exception, match="without reporting n_params"):
        other.final()
