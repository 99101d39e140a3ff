"""Diagnosis: learning curves read like a practitioner reads them, one label per finished trial."""

from __future__ import annotations

import pytest
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from kubetune.builtin.diagnosis import (
    DIVERGED,
    HEALTHY,
    NOT_LEARNING,
    OVERFIT,
    UNDERFIT,
    UNKNOWN,
    diagnose,
    summarize,
)
from kubetune.job import status as status_module
from kubetune.job.status import build_status
from kubetune.search import budget
from kubetune.search.space import to_distributions
from kubetune.spec.model import parse_job
from kubetune.study.schema import create_or_load_study

from conftest import fast_job


def curve(train_loss, val_loss=None, train_accuracy=None, val_accuracy=None):
    """A history as the built-in trainer writes it, from per-epoch lists (None: not reported)."""
    columns = {"train_loss": train_loss, "val_loss": val_loss,
               "train_accuracy": train_accuracy, "val_accuracy": val_accuracy}
    epochs = len(train_loss)
    return [{"epoch": i + 1, **{name: values[i] for name, values in columns.items()
                                if values is not None}} for i in range(epochs)]


HEALTHY_CURVE = curve([1.2, 0.6, 0.35, 0.3], [1.1, 0.62, 0.4, 0.38],
                      [0.6, 0.85, 0.92, 0.94], [0.62, 0.84, 0.9, 0.91])
CURVES = {
    "healthy": (HEALTHY_CURVE, None, HEALTHY),
    "overfit-by-accuracy-gap": (
        curve([1.0, 0.3, 0.05, 0.01], [1.0, 0.6, 0.7, 0.8],
              [0.7, 0.92, 0.99, 1.0], [0.68, 0.8, 0.8, 0.79]), None, OVERFIT),
    "overfit-by-rising-val-loss": (
        curve([1.0, 0.5, 0.3, 0.2, 0.1], [1.0, 0.55, 0.5, 0.58, 0.7],
              [0.7, 0.85, 0.9, 0.92, 0.95], [0.7, 0.84, 0.87, 0.87, 0.86]), None, OVERFIT),
    "overfit-from-losses-alone": (
        curve([1.0, 0.5, 0.3, 0.2], [1.0, 0.6, 0.75, 0.9]), None, OVERFIT),
    "underfit": (
        curve([2.3, 1.9, 1.7, 1.6], [2.3, 1.9, 1.75, 1.65],
              [0.2, 0.4, 0.5, 0.55], [0.2, 0.38, 0.48, 0.52]), None, UNDERFIT),
    "underfit-with-a-gap": (  # low training score: underfit first, whatever the gap
        curve([2.3, 1.9, 1.7], [2.3, 2.0, 1.9], [0.3, 0.5, 0.7], [0.3, 0.4, 0.5]), None,
        UNDERFIT),
    "not-learning": (
        curve([2.303, 2.301, 2.302, 2.300], [2.302, 2.302, 2.303, 2.302],
              [0.1, 0.11, 0.1, 0.1], [0.1, 0.09, 0.1, 0.1]), None, NOT_LEARNING),
    "not-learning-losses-only": (curve([0.69, 0.69, 0.691]), None, NOT_LEARNING),
    "fast-learner-is-not-flat": (  # learned in epoch 1, then plateaued: high score, healthy
        curve([0.3, 0.29, 0.29], [0.3, 0.3, 0.3], [0.95, 0.95, 0.96], [0.94, 0.94, 0.94]),
        None, HEALTHY),
    "diverged-pruned-nan": (HEALTHY_CURVE[:2], "nan", DIVERGED),
    "diverged-pruned-by-the-guard": (HEALTHY_CURVE[:2], "diverged", DIVERGED),
    "diverged-nan-in-history": (
        curve([1.0, "nan"], [1.0, "nan"], [0.5, 0.1], [0.5, 0.1]), None, DIVERGED),
    "diverged-loss-blew-up": (  # pruning off: the trial completed with an exploding loss
        curve([1.0, 5.0, 40.0], [1.0, 6.0, 50.0], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]), None,
        DIVERGED),
    "pruned-by-the-pruner-read-from-its-curve": (
        curve([2.3, 2.0], [2.3, 2.1], [0.2, 0.35], [0.2, 0.3]), "pruner", UNDERFIT),
    "no-history": ([], None, UNKNOWN),
    "no-metric-it-can-read": ([{"epoch": 1, "reward": 3.0}, {"epoch": 2, "reward": 5.0}],
                              None, UNKNOWN),
    "training-score-but-no-validation-score": (  # healthy as far as it tells
        curve([1.0, 0.5, 0.3], train_accuracy=[0.8, 0.9, 0.95]), None, HEALTHY),
    "score-not-in-0-1-is-ignored": (  # read from the losses, which fall
        curve([1.0, 0.5, 0.3], [1.0, 0.6, 0.5], [80.0, 90.0, 95.0], [80.0, 85.0, 88.0]),
        None, HEALTHY),
    # Some metrics only: a loss tells divergence and stalls, a validation score its plateau and
    # the onset of overfitting.
    "train-loss-and-val-accuracy": (
        curve([1.2, 0.6, 0.35, 0.3], val_accuracy=[0.6, 0.84, 0.9, 0.91]), None, HEALTHY),
    "train-loss-and-val-accuracy-diverged": (
        curve([1.0, 4.0, 30.0], val_accuracy=[0.5, 0.3, 0.1]), None, DIVERGED),
    "train-loss-and-val-accuracy-stalled": (
        curve([2.30, 2.29, 2.30], val_accuracy=[0.1, 0.12, 0.1]), None, NOT_LEARNING),
    "train-loss-and-val-accuracy-overfit-onset": (
        curve([1.0, 0.5, 0.2, 0.1, 0.05], val_accuracy=[0.7, 0.86, 0.88, 0.82, 0.8]), None,
        OVERFIT),
    "val-accuracy-alone-plateau-from-the-start": (
        [{"epoch": e, "val_accuracy": v} for e, v in enumerate([0.1, 0.104, 0.1], 1)], None,
        NOT_LEARNING),
    "val-accuracy-alone-overfit-onset": (
        [{"epoch": e, "val_accuracy": v} for e, v in enumerate([0.7, 0.85, 0.88, 0.8], 1)],
        None, OVERFIT),
    "val-accuracy-alone-late-plateau": (
        [{"epoch": e, "val_accuracy": v} for e, v in enumerate([0.5, 0.8, 0.85, 0.85], 1)],
        None, HEALTHY),
}


@pytest.mark.parametrize("name", list(CURVES))
def test_each_curve_gets_its_label(name):
    history, prune_reason, label = CURVES[name]
    assert diagnose(history, prune_reason=prune_reason) == label


def test_a_custom_trainers_f1_scores_are_read_like_accuracy():
    history = [{"epoch": 1, "train_f1": 0.9, "val_f1": 0.6},
               {"epoch": 2, "train_f1": 0.99, "val_f1": 0.62}]
    assert diagnose(history) == OVERFIT


def test_summary_counts_labels_and_advises_on_the_most_common():
    summary = summarize([OVERFIT, OVERFIT, HEALTHY, DIVERGED, OVERFIT])
    assert summary["counts"] == {DIVERGED: 1, OVERFIT: 3, HEALTHY: 1}
    assert summary["mostCommon"] == OVERFIT
    assert summary["advice"] == ("3 of 5 trials overfit: raise weight_decay or dropout, shrink "
                                 "the network, or stop earlier")
    assert summarize([]) is None
    tie = summarize([HEALTHY, DIVERGED])  # a tie names the label whose fix comes first
    assert tie["mostCommon"] == DIVERGED and tie["advice"].startswith("1 of 2 trials diverged")
    assert summarize([UNDERFIT])["advice"].startswith("the trial underfits: use a bigger network")
    assert "learning rate" in summarize([NOT_LEARNING])["advice"]


def test_the_summary_says_which_metric_would_tell_more():
    from kubetune.builtin.diagnosis import missing_metrics

    assert missing_metrics({"train_loss", "val_accuracy"}) == (
        "report train_accuracy next to val_accuracy to tell underfitting and the "
        "train/validation gap")
    assert missing_metrics({"train_loss", "train_f1"}) == (
        "report val_f1 next to train_f1 to tell overfitting")
    assert missing_metrics({"train_accuracy", "val_accuracy"}) == (
        "report train_loss to tell divergence")
    assert missing_metrics({"reward"}) == (
        "report train_accuracy and val_accuracy (or f1, auc) to tell underfitting and "
        "overfitting, and train_loss to tell divergence")
    assert missing_metrics({"train_loss", "val_loss", "train_accuracy", "val_accuracy"}) is None
    summary = summarize([HEALTHY] * 3, metrics={"train_loss", "val_accuracy"})
    assert summary["advice"] == (
        "3 of 3 trials are healthy: spend more trials, or narrow the ranges around the best "
        "trials; report train_accuracy next to val_accuracy to tell underfitting and the "
        "train/validation gap")
    assert "no metrics" not in summary["advice"]


def test_pruned_trials_get_their_own_line_and_the_advice_follows_from_the_counts():
    # The demo's shape: 18 trials ran to the end, 82 were pruned, 56 of them after 3 epochs.
    summary = summarize([HEALTHY] * 15 + [OVERFIT] * 3,
                        pruned_epochs=[3] * 56 + [6] * 20 + [9] * 6)
    assert summary["counts"] == {OVERFIT: 3, HEALTHY: 15}  # the pruned are not healthy
    assert summary["pruned"] == {"trials": 82, "epoch": 3, "atEpoch": 56}
    assert summary["advice"] == (
        "15 of 18 trials are healthy: spend more trials, or narrow the ranges around the best "
        "trials; 82 of 100 trials were pruned, 56 after 3 epochs: much of the search space is "
        "poor; narrow the ranges around the best trials (or search in stages)")
    # A problem one trial in five has comes before "healthy"; few pruned trials go unmentioned.
    summary = summarize([HEALTHY] * 6 + [DIVERGED] * 2, pruned_epochs=[2])
    assert summary["mostCommon"] == HEALTHY
    assert summary["advice"] == ("2 of 8 trials diverged: lower the learning rate (range), add "
                                 "grad_clip or batch_norm")
    only_pruned = summarize([], pruned_epochs=[1, 1])
    assert only_pruned["counts"] == {} and "mostCommon" not in only_pruned
    assert only_pruned["advice"].startswith("2 of 2 trials were pruned, 2 after 1 epoch:")


def test_underfit_advice_depends_on_the_network_sizes_tried():
    """Issue 18: "24/24 underfit: use a bigger network" on a stage whose networks already
    had 303-1024 units. Big networks are told to train longer or regularise less; small ones
    still to grow, with the sizes they tried."""
    big = [{"hidden": h, "layers": 2} for h in (303, 512, 700, 1024)] * 6
    summary = summarize([UNDERFIT] * 24, underfit_params=big)
    assert "bigger network" not in summary["advice"]
    assert summary["advice"] == (
        "24 of 24 trials underfit: the networks are already big (hidden 303-1024, layers 2): "
        "train more epochs, raise the learning rate (range), or lower weight_decay and dropout")
    small = [{"hidden": 16, "layers": 1}, {"hidden": 32, "layers": 1}, {"hidden": 64}]
    assert summarize([UNDERFIT] * 3, underfit_params=small)["advice"] == (
        "3 of 3 trials underfit: use a bigger network (tried hidden 16-64, layers 1: raise "
        "hidden or layers), more epochs or a higher learning rate")
    # a custom trainer without hidden/layers gets the generic advice
    assert summarize([UNDERFIT], underfit_params=[{"lr": 0.1}])["advice"].startswith(
        "the trial underfits: use a bigger network (hidden, layers)")


def test_status_advises_underfit_big_networks_from_their_params():
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    job = parse_job(fast_job())
    study = create_or_load_study(InMemoryStorage(), job)
    for hidden in (512, 1024, 16):
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, value=0.5, params={"hidden": hidden, "layers": 2},
            distributions={"hidden": CategoricalDistribution([16, 512, 1024]),
                           "layers": CategoricalDistribution([1, 2])},
            user_attrs={"history": CURVES["underfit"][0]}))
    trials = study.get_trials(deepcopy=False)
    status = build_status(job, trials, budget.count_trials(trials), phase="Running",
                          conditions=[])
    assert status["diagnosis"]["advice"].startswith(
        "3 of 3 trials underfit: the networks are already big (hidden 16-1024, layers 2)")


def test_status_summarises_the_finished_trials_and_caches_their_labels(monkeypatch):
    job = parse_job(fast_job())
    study = create_or_load_study(InMemoryStorage(), job)
    distributions = to_distributions(job.spec.search_space)
    for name in ("overfit-by-accuracy-gap", "overfit-from-losses-alone", "healthy",
                 "diverged-pruned-nan"):
        history, reason, _ = CURVES[name]
        trial = study.ask(fixed_distributions=distributions)
        trial.set_user_attr("history", history)
        if reason:
            trial.set_user_attr("prune_reason", reason)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, 0.8)
    running = study.ask(fixed_distributions=distributions)
    running.set_user_attr("history", CURVES["underfit"][0])  # not finished: not counted

    def status():
        trials = study.get_trials(deepcopy=False)
        return build_status(job, trials, budget.count_trials(trials), phase="Running",
                            conditions=[])

    diagnosis = status()["diagnosis"]
    assert diagnosis["counts"] == {DIVERGED: 1, OVERFIT: 2, HEALTHY: 1}
    assert diagnosis["advice"].startswith("2 of 4 trials overfit")

    finished = [t for t in study.trials if t.state.is_finished()]
    assert all(status_module.cache_key(t) in status_module._labels for t in finished)
    calls = []
    original = status_module.diagnosis.diagnose
    monkeypatch.setattr(status_module.diagnosis, "diagnose",
                        lambda *a, **k: calls.append(a) or original(*a, **k))
    assert status()["diagnosis"] == diagnosis
    assert calls == []  # finished trials are read from the cache, not diagnosed again


def test_no_finished_trial_means_no_diagnosis():
    job = parse_job(fast_job())
    study = create_or_load_study(InMemoryStorage(), job)
    trials = study.get_trials(deepcopy=False)
    status = build_status(job, trials, budget.count_trials(trials), phase="Pending",
                          conditions=[])
    assert status["diagnosis"] is None


def test_with_stages_the_summary_reads_the_full_fidelity_trials_once_there_are_any():
    job = parse_job(fast_job())
    study = create_or_load_study(InMemoryStorage(), job)
    distributions = to_distributions(job.spec.search_space)

    def finish(curve_name, fidelity):
        trial = study.ask(fixed_distributions=distributions)
        trial.set_user_attr("history", CURVES[curve_name][0])
        trial.set_user_attr("fidelity", fidelity)
        study.tell(trial, 0.5)

    def summary():
        trials = study.get_trials(deepcopy=False)
        return build_status(job, trials, budget.count_trials(trials), phase="Running",
                            conditions=[])["diagnosis"]

    for _ in range(3):
        finish("underfit", "reduced")  # a coarse stage: few epochs on a subsample
    assert summary()["counts"] == {UNDERFIT: 3}  # all there is, so far
    finish("healthy", "full")
    assert summary()["counts"] == {HEALTHY: 1}


def test_status_counts_trials_the_pruner_stopped_apart_from_the_labels():
    job = parse_job(fast_job())
    study = create_or_load_study(InMemoryStorage(), job)
    distributions = to_distributions(job.spec.search_space)
    for name, reason in (("healthy", None), ("train-loss-and-val-accuracy", None),
                         ("pruned-by-the-pruner-read-from-its-curve", "pruner"),
                         ("pruned-by-the-pruner-read-from-its-curve", "pruner"),
                         ("diverged-pruned-nan", "nan")):
        history = CURVES[name][0]
        trial = study.ask(fixed_distributions=distributions)
        trial.set_user_attr("history", history)
        trial.set_user_attr("epochs", len(history))
        if reason:
            trial.set_user_attr("prune_reason", reason)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, 0.8)
    trials = study.get_trials(deepcopy=False)
    diagnosis = build_status(job, trials, budget.count_trials(trials), phase="Running",
                             conditions=[])["diagnosis"]
    # The NaN guard's trial is diverged; the pruner's are not underfit, they were cut short.
    assert diagnosis["counts"] == {DIVERGED: 1, HEALTHY: 2}
    assert diagnosis["pruned"] == {"trials": 2, "epoch": 2, "atEpoch": 2}
    assert UNDERFIT not in diagnosis["counts"]
