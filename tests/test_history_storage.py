"""Per-epoch history in the study: each epoch is written once, in chunks of the epochs not yet
written, so what a report writes does not grow with the epochs (issue 18: the whole history
was rewritten as one trial attribute every epoch) and quick epochs cost few writes; every
reader gets the same curve through ``history_of``."""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
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


class Clock:
    """``time.monotonic`` of the reporter, moved by the test: epochs of a given length."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _report(epochs: int, seconds_per_epoch: float, monkeypatch
            ) -> tuple[CountingStorage, optuna.Study, list[int]]:
    from kubetune.worker import contract

    clock = Clock()
    monkeypatch.setattr(contract.time, "monotonic", clock)
    job = parse_job(fast_job(pruning={"pruner": {"type": "none"}}))
    storage = CountingStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    trial = study.ask()
    reporter = EpochReporter(trial, job.spec)
    per_epoch = []
    for epoch in range(1, epochs + 1):
        before = len(storage.writes)
        clock.now += seconds_per_epoch
        reporter.report(epoch, {"val_accuracy": round(0.5 + epoch / 1000, 4),
                                "train_loss": round(1 / epoch, 4),
                                "train_accuracy": 0.6, "val_loss": 1.1})
        per_epoch.append(sum(size for _, size in storage.writes[before:]))
    reporter.flush()  # what the trial's runner does when the trial ends
    study.tell(trial, 0.6)
    return storage, study, per_epoch


def _curve_is_whole(study: optuna.Study, epochs: int) -> None:
    trial = study.trials[0]
    history = history_of(trial.user_attrs)
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[-1] == {"epoch": epochs, "val_accuracy": round(0.5 + epochs / 1000, 4),
                           "train_loss": round(1 / epochs, 4), "train_accuracy": 0.6,
                           "val_loss": 1.1}
    assert trial.user_attrs["epochs"] == epochs
    assert "history" not in trial.user_attrs  # never the whole curve in one attribute


def test_slow_epochs_are_each_written_once_and_the_bytes_do_not_grow(monkeypatch):
    _, study, per_epoch = _report(200, 3.0, monkeypatch)
    # epochs longer than the flush interval are stored as they are reported (a dashboard
    # sees them at once); epochs 101-200 write what epochs 1-20 write, give or take the
    # digits of the epoch (rewriting the whole history wrote 100 bytes more every epoch)
    assert all(per_epoch)
    assert max(per_epoch[100:]) <= max(per_epoch[:20]) + 4
    _curve_is_whole(study, 200)


def test_quick_epochs_are_written_together_every_couple_of_seconds(monkeypatch):
    from kubetune.worker.contract import HISTORY_FLUSH_SECONDS

    storage, study, per_epoch = _report(200, 0.05, monkeypatch)
    # the first epoch at once (a running trial shows a curve), then one chunk every
    # HISTORY_FLUSH_SECONDS of epochs: 200 epochs of 0.05 s are 10 s, so about 6 chunks,
    # two writes each (the chunk and the last epoch), instead of 400 writes
    chunks = [key for key, _ in storage.writes if key.startswith("history:")]
    assert per_epoch[0] > 0 and len(chunks) <= 200 * 0.05 / HISTORY_FLUSH_SECONDS + 2
    assert len(storage.writes) == 2 * len(chunks)
    # every epoch's bytes are written once: the chunks add up to the curve, not more
    curve = history_of(study.trials[0].user_attrs)
    written = sum(size for key, size in storage.writes if key.startswith("history:"))
    assert written <= sum(len(json.dumps(h)) + 2 for h in curve) + 2 * len(chunks)
    _curve_is_whole(study, 200)


@pytest.mark.parametrize("resumed_at", [0, 3])
def test_a_retry_reads_its_own_epochs_over_its_failed_attempts(resumed_at):
    """A retry inherits its failed attempt's chunks; it starts again at epoch 1 or resumes
    from a checkpoint; its curve is its own epochs over the attempt's earlier ones, never the
    attempt's epochs past where the retry is, whichever chunks either wrote."""
    from kubetune.worker.trial import _gather_inherited_history

    attempt = {"history:1": {"epoch": 1, "run": "old"},
               "history:2": [{"epoch": e, "run": "old"} for e in (2, 3, 4, 5)],
               "history:6": [{"epoch": e, "run": "old"} for e in (6, 7, 8, 9)], "epochs": 9}
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({}, user_attrs=attempt)
    trial = study.ask()
    _gather_inherited_history(trial)
    assert [h["epoch"] for h in history_of(trial.user_attrs)] == list(range(1, 10))
    # the retry's own chunks, starting where it starts: after epoch 6 it has written 1-6
    own = range(resumed_at + 1, 7)
    trial.set_user_attr(f"history:{own[0]}", {"epoch": own[0], "run": "new"})
    trial.set_user_attr(f"history:{own[1]}", [{"epoch": e, "run": "new"} for e in own[1:]])
    trial.set_user_attr("epochs", 6)
    history = history_of(trial.user_attrs)
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert [h["run"] for h in history] == ["old"] * resumed_at + ["new"] * (6 - resumed_at)


def test_history_of_reads_whole_histories_and_leaves_out_stale_epochs():
    # a study from before: the whole history in one attribute
    whole = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.6}]
    assert history_of({"history": whole}) == whole
    assert history_of({}) == []
    # one key an epoch (as slow epochs are written): the last epoch written bounds what is
    # read; epoch 10 sorts after epoch 9
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
