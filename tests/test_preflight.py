"""Preflight: bad data or a model that cannot learn ends the job before the search starts.

The pure parts run on real data (digits, synthetic, CSV files) and real PyTorch; the job-level
parts through the real job core and a real study, and once end to end with ``kubetune run``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from optuna.storages import InMemoryStorage
from test_controller import _core

from kubetune.builtin.data import load_dataset
from kubetune.builtin.preflight import (
    blind_loss,
    ensure_verdict,
    fit_tiny,
    run_preflight,
    tiny_subset,
)
from kubetune.spec.model import parse_job
from kubetune.study.optuna_internals import storage_of
from kubetune.study.schema import PREFLIGHT_ATTR, create_or_load_study
from kubetune.study.storage import StudyLock

from conftest import fast_job, kubetune, write_job


def _job(dataset: dict, **spec) -> object:
    return parse_job(fast_job(trainer={"builtin": {"dataset": dataset, "epochs": 2}}, **spec))


def _csv(path, rows: list[str], header: str = "a,b,c,label"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return {"name": "file", "path": str(path)}


# ------------------------------------------------------------------ the pure check
def test_digits_pass():
    verdict = run_preflight(_job({"name": "digits"}))
    assert verdict["result"] == "passed", verdict
    assert verdict["finalLoss"] <= 0.5 * verdict["blindLoss"]
    assert verdict["samples"] == 16 and verdict["steps"] <= 200
    assert "the model learns" in verdict["message"]


def test_constant_features_cannot_be_fitted_by_any_model():
    data = load_dataset({"name": "digits"}, {})
    rows = tiny_subset(data.y_train, 10)
    constant = np.ones((len(rows), data.n_features), dtype=np.float32)

    fit = fit_tiny(constant, data.y_train[rows], data.n_classes, steps=200)

    assert not fit.learned
    assert fit.steps == 200  # it tried all its steps
    assert fit.final_loss >= 0.95 * fit.blind_loss  # no better than ignoring the features


def test_constant_feature_file_fails_with_a_message_that_points_at_the_data(tmp_path):
    dataset = _csv(tmp_path / "flat.csv", [f"1,2,3,{'xyz'[i % 3]}" for i in range(60)])

    verdict = run_preflight(_job(dataset))

    assert verdict["result"] == "failed" and verdict["reason"] == "NotLearning"
    message = verdict["message"]
    assert "cannot fit 16 training rows" in message
    assert "3 of 3 feature columns are constant" in message
    assert "spec.trainer.builtin.dataset" in message and "spec.preflight.enabled" in message


def test_nan_in_a_file_fails_as_bad_data(tmp_path):
    rows = [f"{i},{i % 5},{i % 3},{i % 2}" for i in range(40)] + ["1,nan,3,0"]
    verdict = run_preflight(_job(_csv(tmp_path / "nan.csv", rows)))
    assert verdict["result"] == "failed" and verdict["reason"] == "BadData"
    assert verdict["message"].startswith("spec.trainer.builtin.dataset: ")
    assert "non-finite" in verdict["message"] and "line 42" in verdict["message"]


def test_infinity_in_an_npz_fails_as_bad_data(tmp_path):
    X = np.random.default_rng(0).normal(size=(40, 3))
    X[7, 2] = np.inf
    np.savez(tmp_path / "inf.npz", X=X, y=np.arange(40) % 2)
    verdict = run_preflight(_job({"name": "file", "path": str(tmp_path / "inf.npz")}))
    assert verdict["reason"] == "BadData" and "'x2'" in verdict["message"]


def test_a_file_that_is_not_text_fails_as_bad_data_not_as_a_crash(tmp_path):
    (tmp_path / "binary.csv").write_bytes(b"a,b,label\n1,2,\xff\xfe\n")
    verdict = run_preflight(_job({"name": "file", "path": str(tmp_path / "binary.csv")}))
    assert verdict["reason"] == "BadData" and "UnicodeDecodeError" in verdict["message"]


def test_values_that_overflow_when_standardized_fail_as_bad_data(tmp_path):
    rows = [f"{1e308 if i % 2 else -1e308},{i},{i % 3},{i % 2}" for i in range(40)]
    verdict = run_preflight(_job(_csv(tmp_path / "huge.csv", rows)))
    assert verdict["reason"] == "BadData"
    assert "'a' is not finite after standardization" in verdict["message"]


@pytest.mark.parametrize("labels", [["same"] * 30, ["a"] * 30 + ["b"] * 2])
def test_one_label_or_a_class_too_small_to_split_fails_as_bad_data(tmp_path, labels):
    rows = [f"{i},{i * 2},{i % 7},{label}" for i, label in enumerate(labels)]
    verdict = run_preflight(_job(_csv(tmp_path / "labels.csv", rows)))
    assert verdict["reason"] == "BadData", verdict


def test_with_the_check_off_only_the_data_is_checked(tmp_path):
    flat = _csv(tmp_path / "flat.csv", [f"1,2,3,{i % 2}" for i in range(40)])
    assert run_preflight(_job(flat, preflight={"enabled": False}))["result"] == "skipped"
    bad = _csv(tmp_path / "bad.csv", ["1,2,3,x", "1,oops,3,y"])
    assert run_preflight(_job(bad, preflight={"enabled": False}))["result"] == "failed"


def test_the_subset_is_class_balanced_even_when_the_data_is_not():
    y = np.array([0] * 95 + [1] * 5)
    rows = tiny_subset(y, 16)
    assert np.bincount(y[rows]).tolist() == [11, 5]  # all 5 of the minority, the rest 0s
    four = np.arange(100) % 4
    assert np.bincount(four[tiny_subset(four, 16)]).tolist() == [4, 4, 4, 4]
    assert len(tiny_subset(np.arange(100) % 10, 4)) == 10  # at least one row per class


def test_blind_loss_is_the_entropy_of_the_labels():
    assert blind_loss(np.array([0, 1, 0, 1])) == pytest.approx(np.log(2))
    assert blind_loss(np.array([2, 2, 2])) == 0.0


# ------------------------------------------------------------------ one verdict per job
def test_the_verdict_is_computed_once_and_stored_in_the_study(tmp_path):
    job = _job({"name": "digits"})
    study = create_or_load_study(InMemoryStorage(), job)
    lock = StudyLock(str(tmp_path / "journal"), job.study_name)

    first = ensure_verdict(study, job, lock)
    stored = study.user_attrs[PREFLIGHT_ATTR]
    started = time.monotonic()
    second = ensure_verdict(study, job, lock)

    assert first == stored == second
    assert time.monotonic() - started < 0.5  # read, not trained again
    create_or_load_study(storage_of(study), job)  # the job starts again: check again
    assert study.user_attrs.get(PREFLIGHT_ATTR) is None


def test_job_core_fails_the_job_and_starts_no_worker_on_a_failed_verdict():
    core, study, launcher, _ = _core()
    status = core.reconcile().status
    assert launcher.started == 2 and status["phase"] == "Running"
    study.set_user_attr(PREFLIGHT_ATTR, {"result": "failed", "reason": "BadData",
                                         "message": "spec.trainer.builtin.dataset: no rows"})
    for worker_id in list(launcher.workers):
        launcher.exit(worker_id, 0)  # the workers read the verdict and leave

    outcome = core.reconcile(status)

    assert outcome.done and launcher.stopped and launcher.started == 2
    assert outcome.status["phase"] == "Failed"
    failed = next(c for c in outcome.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreflightFailed"
    assert failed["message"] == "spec.trainer.builtin.dataset: no rows"
    assert outcome.status["preflight"]["result"] == "failed"


def test_a_passed_verdict_shows_in_the_status_and_the_search_goes_on():
    core, study, launcher, _ = _core()
    study.set_user_attr(PREFLIGHT_ATTR, {"result": "passed", "message": "the model learns"})
    outcome = core.reconcile()
    assert not outcome.done and launcher.started == 2
    assert outcome.status["preflight"] == {"result": "passed", "message": "the model learns"}


# ------------------------------------------------------------------ end to end
def test_run_on_uninformative_data_fails_fast_without_running_a_trial(tmp_path):
    (tmp_path / "flat.csv").write_text(
        "a,b,c,label\n" + "".join(f"0.5,2,-1,{i % 2}\n" for i in range(80)))
    job = fast_job(trainer={"builtin": {"dataset": {"name": "file", "path": "flat.csv"},
                                        "epochs": 50}},
                   budget={"maxTrials": 50, "parallelism": 2})
    out = tmp_path / "out"

    proc = kubetune("run", write_job(tmp_path / "job.yaml", job), "--output", out, timeout=120)

    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["phase"] == "Failed"
    failed = next(c for c in result["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PreflightFailed"
    assert "cannot fit 16 training rows" in failed["message"]
    assert result["trials"]["total"] == 0 and result["progress"] == "0/50"
    assert result["preflight"]["result"] == "failed"
    logs = [p.read_text() for p in sorted((out / "logs").glob("worker-*.log"))]
    assert len(logs) == 2
    # one worker ran the check under the study lock; the other waited and read its verdict
    # (or was stopped first: the job core stops all workers once it sees the verdict)
    assert sum("kubetune.preflight: preflight failed" in log for log in logs) == 1
    assert any("preflight failed, no trial runs" in log for log in logs)
    assert not any("trial 0 started" in log or "Traceback" in log for log in logs)
    assert "PreflightFailed" in proc.stdout and "Traceback" not in proc.stderr
