"""Per-epoch history in the study: each epoch is written once, under its own key, so what a
report writes does not grow with the epochs (issue 18: the whole history was rewritten as one
trial attribute every epoch); every reader gets the same curve through ``history_of``."""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState, create_trial

from kubetune.spec.model import parse_job
from kubetune.study.schema import history_of
from kubetune.worker.contract import EpochReporter

from conftest import fast_job


class CountingStorage(InMemoryStorage):
    """Records the JSON bytes of every trial user attribute written."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, int]] = []

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.writes.append((key, len(json.dumps(value))))
        super().set_trial_user_attr(trial_id, key, value)


def _report(epochs: int) -> tuple[CountingStorage, optuna.Study, list[int]]:
    job = parse_job(fast_job(pruning={"pruner": {"type": "none"}}))
    storage = CountingStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    trial = study.ask()
    reporter = EpochReporter(trial, job.spec)
    per_epoch = []
    for epoch in range(1, epochs + 1):
        before = len(storage.writes)
        reporter.report(epoch, {"val_accuracy": round(0.5 + epoch / 1000, 4),
                                "train_loss": round(1 / epoch, 4),
                                "train_accuracy": 0.6, "val_loss": 1.1})
        per_epoch.append(sum(size for _, size in storage.writes[before:]))
    study.tell(trial, 0.6)
    return storage, study, per_epoch


def test_the_bytes_written_per_epoch_do_not_grow_with_the_epochs():
    _, study, per_epoch = _report(200)
    # epochs 101-200 write what epochs 1-20 write, give or take the digits of the epoch
    # (rewriting the whole history wrote about 100 bytes more with every epoch)
    assert max(per_epoch[100:]) <= max(per_epoch[:20]) + 4
    assert sum(per_epoch) < 200 * (max(per_epoch[:20]) + 4)  # linear in the epochs
    trial = study.trials[0]
    history = history_of(trial.user_attrs)
    assert [h["epoch"] for h in history] == list(range(1, 201))
    assert history[-1] == {"epoch": 200, "val_accuracy": 0.7, "train_loss": 0.005,
                           "train_accuracy": 0.6, "val_loss": 1.1}
    assert "history" not in trial.user_attrs  # never the whole curve in one attribute


def test_history_of_reads_whole_histories_and_leaves_out_stale_epochs():
    # a study from before: the whole history in one attribute
    whole = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.6}]
    assert history_of({"history": whole}) == whole
    assert history_of({}) == []
    # a retry inherits its failed attempt's epochs 1..5 and starts again at epoch 1: the
    # attempt's last epoch bounds what is read; epoch 10 sorts after epoch 9
    attrs = {f"history:{e}": {"epoch": e} for e in range(1, 11)}
    assert [h["epoch"] for h in history_of({**attrs, "epochs": 10})] == list(range(1, 11))
    assert [h["epoch"] for h in history_of({**attrs, "epochs": 2})] == [1, 2]


def test_status_diagnosis_reads_per_epoch_keys():
    from kubetune.job.status import build_status
    from kubetune.search.budget import count_trials

    job = parse_job(fast_job())
    study = optuna.create_study(direction="maximize")
    curve = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.0 / e,
              "train_accuracy": 0.5 + e / 20, "val_accuracy": 0.5 + e / 20} for e in (1, 2, 3)]
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.65,
                                 user_attrs={"epochs": 3, **{f"history:{h['epoch']}": h
                                                             for h in curve}}))
    trials = study.get_trials()
    status = build_status(job, trials, count_trials(trials), phase="Running", conditions=[])
    assert status["diagnosis"]["counts"] == {"underfit": 1}  # read: train accuracy 0.65
