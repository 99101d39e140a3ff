"""The ensemble step: greedy selection, honest scoring on the test split, the three kinds of
members, the saved model, and a local job whose result carries its ensemble."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState
from sklearn.metrics import accuracy_score, f1_score, log_loss

from kubetune.builtin.data import load_data
from kubetune.ensemble.step import (
    Member,
    NotEnoughMembers,
    combine,
    greedy_selection,
    run_ensemble_step,
    score,
    selection_metric,
    status_view,
    weighted,
)
from kubetune.search.space import to_distributions
from kubetune.spec.model import parse_job
from kubetune.study.schema import ENSEMBLE_ATTR, create_or_load_study
from kubetune.study.storage import make_artifact_store
from kubetune.worker.trial import run_trial

from conftest import REPO_ROOT, fast_job, kubetune, write_job

RECORD_KEYS = {"method", "memberSource", "metric", "direction", "members", "candidates",
               "validationValue", "testValue", "bestSingleTrial", "bestSingleValidationValue",
               "bestSingleTestValue", "artifact"}


def _binary(*class1: float) -> np.ndarray:
    """Probabilities of a two-class problem from the probabilities of class 1."""
    p = np.array(class1)
    return np.stack([1 - p, p], axis=1)


def _random_members(rng, n_members=5, n=60, classes=3):
    y = rng.integers(0, classes, size=n)
    probas = []
    for _ in range(n_members):
        logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[y] * rng.uniform(0, 1)
        e = np.exp(logits)
        probas.append(e / e.sum(axis=1, keepdims=True))
    return probas, y


# ---------------------------------------------------------------- selection and scoring
def test_greedy_selection_matches_a_hand_computed_case():
    # Labels 0 0 1 1 1; each member gives P(class 1) per sample; accuracy, maximize.
    y = np.array([0, 0, 1, 1, 1])
    a = _binary(0.8, 0.9, 0.8, 0.2, 0.9)  # predicts 1 1 1 0 1 -> 2/5 right
    b = _binary(0.8, 0.2, 0.8, 0.8, 0.4)  # predicts 1 0 1 1 0 -> 3/5
    c = _binary(0.3, 0.2, 0.9, 0.7, 0.4)  # predicts 0 0 1 1 0 -> 4/5: the start
    # Round 2: c+a -> .55 .55 .85 .45 .65: 2/5; c+b -> .55 .2 .85 .75 .4: 3/5; c+c = c: 4/5.
    # Round 3: (2c+a)/3 -> .47 .43 .87 .53 .57: 5/5; (2c+b)/3 -> ... .40: 4/5; 3c/3: 4/5.
    # Round 4: (2c+2a)/4: 2/5; (2c+a+b)/4 -> .55 ...: 4/5; (3c+a)/4 -> .43 .38 .88 .58 .53:
    # 5/5, no better than round 3: the kept prefix is c, c, a.
    selection = greedy_selection([a, b, c], y, "val_accuracy", "maximize", rounds=4)

    assert selection.picks == (2, 2, 0)
    assert selection.weights == pytest.approx((1 / 3, 0.0, 2 / 3))
    assert score("val_accuracy", weighted([a, b, c], selection.weights), y) == 1.0


def test_greedy_loss_selection_prefers_the_blend_that_lowers_the_log_loss():
    y = np.array([0, 1])
    a = np.array([[0.9, 0.1], [0.6, 0.4]])  # log loss (-ln .9 - ln .4)/2 = 0.511: the start
    b = np.array([[0.4, 0.6], [0.2, 0.8]])  # (-ln .4 - ln .8)/2 = 0.570
    # (a+b)/2 = [[.65 .35] [.4 .6]]: (-ln .65 - ln .6)/2 = 0.471 < 0.511 = (a+a)/2.
    selection = greedy_selection([a, b], y, "val_loss", "minimize", rounds=2)
    assert selection.picks == (0, 1) and selection.weights == (0.5, 0.5)


@pytest.mark.parametrize("bags", [1, 20])
@pytest.mark.parametrize("metric,direction", [("val_accuracy", "maximize"),
                                              ("val_f1", "maximize"),
                                              ("val_loss", "minimize")])
def test_greedy_ensemble_is_never_worse_than_the_best_single_member_on_validation(
        metric, direction, bags):
    rng = np.random.default_rng(0)
    sign = 1 if direction == "maximize" else -1
    for _ in range(20):
        probas, y = _random_members(rng)
        members = [Member(i, p, p) for i, p in enumerate(probas)]
        result = combine(members, y, y, metric=metric, direction=direction, method="greedy",
                         bags=bags)
        best_single = max(sign * score(metric, p, y) for p in probas)
        assert sign * result.validation_value >= best_single
        assert sum(result.weights) == pytest.approx(1.0)
        assert all(w > 0 for w in result.weights)


def _independent_members(rng, count=15, n_val=60, n_test=3000, classes=3):
    """Members of varied skill whose mistakes are independent, on a small validation split."""
    y_val, y_test = rng.integers(0, classes, n_val), rng.integers(0, classes, n_test)

    def proba(y, skill):
        logits = rng.normal(size=(len(y), classes)) + 1.2 * skill * np.eye(classes)[y]
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    members = []
    for _ in range(count):
        skill = rng.uniform(0.5, 1.0)
        members.append((proba(y_val, skill), proba(y_test, skill)))
    members.sort(key=lambda m: -score("val_accuracy", m[0], y_val))  # best first, as ranked
    return [Member(i, v, t) for i, (v, t) in enumerate(members)], y_val, y_test


def test_bagged_selection_generalises_better_than_one_selection_on_a_small_validation_split():
    # One greedy run keeps the prefix that scored best on 60 validation rows, a choice made
    # of their noise; averaging selections on halves of the members does not hinge on it.
    rng = np.random.default_rng(0)
    one, bagged = [], []
    for _ in range(10):
        members, y_val, y_test = _independent_members(rng)
        for bags, errors in ((1, one), (20, bagged)):
            result = combine(members, y_val, y_test, metric="val_accuracy",
                             direction="maximize", method="greedy", bags=bags)
            errors.append(1 - result.test_value)
    assert all(b <= o for b, o in zip(bagged, one))
    assert np.mean(bagged) < 0.8 * np.mean(one)


def test_bagged_selection_gives_the_same_ensemble_every_time():
    members, y_val, y_test = _independent_members(np.random.default_rng(1))
    first, again = (combine(members, y_val, y_test, metric="val_accuracy",
                            direction="maximize", method="greedy", bags=20) for _ in range(2))
    assert first.weights == again.weights and len(first.members) > 2


def test_one_bag_is_one_greedy_selection_over_all_members():
    members, y_val, y_test = _independent_members(np.random.default_rng(2))
    result = combine(members, y_val, y_test, metric="val_accuracy", direction="maximize",
                     method="greedy", bags=1)
    selection = greedy_selection([m.val_proba for m in members], y_val, "val_accuracy",
                                 "maximize")
    assert result.weights == [w for w in selection.weights if w > 0]


def test_average_is_the_plain_mean_of_the_members_probabilities():
    probas, y = _random_members(np.random.default_rng(1), n_members=4)
    members = [Member(i, p, p) for i, p in enumerate(probas)]
    result = combine(members, y, y, metric="val_loss", direction="minimize", method="average")
    assert result.weights == [0.25] * 4
    assert result.validation_value == pytest.approx(
        log_loss(y, np.mean(probas, axis=0), labels=[0, 1, 2]))


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(2)
    probas, y = _random_members(rng, n_members=1, n=200, classes=4)
    proba = probas[0]
    assert score("val_accuracy", proba, y) == pytest.approx(accuracy_score(y, proba.argmax(1)))
    assert score("val_f1", proba, y) == pytest.approx(
        f1_score(y, proba.argmax(1), average="macro", zero_division=0))
    assert score("val_loss", proba, y) == pytest.approx(log_loss(y, proba, labels=range(4)))
    never_3 = proba[:, [0, 1, 2, 2]] * [1, 1, 1, 0]  # class 3 never predicted
    assert score("val_f1", never_3, y) == pytest.approx(
        f1_score(y, never_3.argmax(1), average="macro", zero_division=0))


def test_a_train_metric_objective_is_selected_by_its_validation_counterpart():
    assert selection_metric("val_f1") == "val_f1"
    assert selection_metric("train_loss") == "val_loss"
    assert selection_metric("train_accuracy") == "val_accuracy"


def test_selection_reads_validation_only_and_test_values_come_from_the_test_split():
    rng = np.random.default_rng(3)
    probas, y_val = _random_members(rng)
    tests_a, y_test = _random_members(rng, n=40)
    tests_b = [np.roll(p, 1, axis=1) for p in tests_a]  # other test predictions entirely

    def run(tests):
        members = [Member(i, v, t) for i, (v, t) in enumerate(zip(probas, tests))]
        return combine(members, y_val, y_test, metric="val_accuracy", direction="maximize",
                       method="greedy")

    a, b = run(tests_a), run(tests_b)
    assert [m.trial for m in a.members] == [m.trial for m in b.members]
    assert a.weights == b.weights and a.validation_value == b.validation_value
    kept = [m.trial for m in a.members]
    for result, tests in ((a, tests_a), (b, tests_b)):
        assert result.test_value == score("val_accuracy",
                                          weighted([tests[i] for i in kept], result.weights),
                                          y_test)
        assert result.best_single_test_value == score("val_accuracy", tests[0], y_test)
    assert a.test_value != b.test_value


def test_fewer_than_two_members_is_not_an_ensemble():
    probas, y = _random_members(np.random.default_rng(4), n_members=1)
    with pytest.raises(NotEnoughMembers, match="at least 2 usable members, found 1"):
        combine([Member(0, probas[0], probas[0])], y, y, metric="val_accuracy",
                direction="maximize", method="greedy")


# ---------------------------------------------------------------- the step on real trials
def _trained_study(tmp_path, n_trials, name="ens", **spec):
    job = parse_job(fast_job(name, **spec))
    study = create_or_load_study(InMemoryStorage(), job)
    store = make_artifact_store(tmp_path / "artifacts")
    data = load_data(job)
    for _ in range(n_trials):
        trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))
        run_trial(study, trial, job, data, store)
    return study, job, store, data


def test_step_skips_pruned_failed_and_unsaved_trials_and_stores_a_small_record(tmp_path):
    # One selection over the three (bagging draws halves of two, which on this tiny task
    # may beat no single model): the record is what is tested here.
    study, job, store, data = _trained_study(tmp_path, 3, ensemble={"bags": 1})
    distributions = to_distributions(job.spec.search_space)
    params = study.trials[0].params
    for state, value in ((TrialState.PRUNED, None), (TrialState.FAIL, None),
                         (TrialState.COMPLETE, 0.99)):  # the best value, but no predictions
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=value, state=state))

    record = run_ensemble_step(study, store)

    assert set(record) == RECORD_KEYS | {"builtFrom"}
    assert study.user_attrs[ENSEMBLE_ATTR] == record
    assert record["candidates"] == 3
    assert {m["trial"] for m in record["members"]} <= {0, 1, 2}
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1.0)
    ranked = sorted((t for t in study.trials[:3]), key=lambda t: (-t.value, t.number))
    assert record["bestSingleTrial"] == ranked[0].number
    assert record["validationValue"] >= record["bestSingleValidationValue"]
    assert record["bestSingleValidationValue"] == pytest.approx(ranked[0].value, abs=1e-6)
    assert record["metric"] == "val_accuracy" and "note" not in record
    assert len(json.dumps(record)) < 2000


def test_one_usable_trial_is_no_ensemble_and_says_why(tmp_path):
    study, job, store, _ = _trained_study(tmp_path, 1)
    record = run_ensemble_step(study, store)
    assert record["reason"] == "NotEnoughMembers"
    assert "found 1" in record["message"]


def test_when_no_combination_beats_the_best_model_there_is_no_one_member_ensemble(tmp_path):
    """The demo's case: greedy selection keeps the best trial alone. That is no ensemble, and
    the reason says so (not EnsembleBuilt with one member)."""
    from optuna.artifacts import upload_artifact

    from kubetune.worker.entrypoint_trainer import write_predictions

    job = parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "TuningJob",
                     "metadata": {"name": "alone"},
                     "spec": {"objective": {"metric": "val_accuracy", "direction": "maximize"},
                              "searchSpace": {"x": {"type": "float", "low": 0, "high": 1}},
                              "trainer": {"entrypoint": "m:f", "metrics": ["val_accuracy"]}}})
    study = create_or_load_study(InMemoryStorage(), job)
    store = make_artifact_store(tmp_path / "artifacts")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    perfect = np.eye(3)[y] * 0.9 + 0.05
    for number, proba in enumerate([perfect, rng.dirichlet(np.ones(3), 60),
                                    rng.dirichlet(np.ones(3), 60)]):
        trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))
        path = tmp_path / f"p{number}.npz"
        write_predictions(path, proba, proba, y, y)
        artifact = upload_artifact(artifact_store=store, file_path=str(path),
                                   study_or_trial=trial)
        trial.set_user_attr("artifacts", {"predictions": artifact})
        study.tell(trial, score("val_accuracy", proba, y))

    record = run_ensemble_step(study, store)

    assert record["reason"] == "NoBetterCombination"
    assert record["message"] == (
        "no combination of the 3 candidates beat the best single model, trial #0, on "
        "validation (accuracy 1; test 1): use that trial's model")
    assert status_view(record) is None  # status.ensemble stays null: no ensemble was built


def test_snapshot_members_are_earlier_epochs_of_the_top_trials(tmp_path):
    study, job, store, data = _trained_study(
        tmp_path, 2, ensemble={"members": "snapshots", "method": "average"},
        trainer={"builtin": {"dataset": {"name": "synthetic", "samples": 400, "features": 10,
                                         "informative": 6, "classes": 3}, "epochs": 6}})

    record = run_ensemble_step(study, store)

    # 6 epochs: the models of epochs 4 and 5 besides the final one, for each trial.
    assert sorted((m["trial"], m["epoch"]) for m in record["members"]) == [
        (0, 4), (0, 5), (0, 6), (1, 4), (1, 5), (1, 6)]
    assert record["memberSource"] == "snapshots"


def test_snapshots_do_not_change_what_a_trial_learns():
    from kubetune.builtin.mlp import train
    from kubetune.worker.builtin_trainer import Snapshots

    job = parse_job(fast_job())
    data = load_data(job)
    params = {"epochs": 3, "lr": 0.01, "hidden": 16}
    snapshots = Snapshots([1, 2], data)
    plain = train(params, data, seed=7, device="cpu")
    recorded = train(params, data, seed=7, device="cpu", on_snapshot=snapshots)
    assert np.array_equal(plain.val_proba, recorded.val_proba)
    assert [epoch for epoch, *_ in snapshots.kept] == [1, 2]


def test_seed_members_retrain_the_best_configuration(tmp_path):
    study, job, store, data = _trained_study(
        tmp_path, 2, ensemble={"members": "seeds", "seeds": 3, "method": "average"},
        objective={"metric": "train_loss", "direction": "minimize"})
    best = min(study.trials, key=lambda t: t.value)

    record = run_ensemble_step(study, store)

    assert [m["trial"] for m in record["members"]] == [best.number] * 3
    seeds = [m["seed"] for m in record["members"]]
    assert seeds[0] == best.number and len(set(seeds)) == 3  # the trial's own seed first
    assert record["metric"] == "val_loss" and "train_loss" in record["note"]
    assert record["bestSingleTrial"] == best.number


# ---------------------------------------------------------------- end to end
def test_local_job_carries_its_ensemble_and_the_export_reproduces_its_test_value(tmp_path):
    job_file = write_job(tmp_path / "job.yaml", fast_job(budget={"maxTrials": 4,
                                                                "parallelism": 1}))
    out = tmp_path / "out"

    proc = kubetune("run", job_file, "--output", out)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["phase"] == "Succeeded"
    ensemble = result["ensemble"]
    assert set(ensemble) == RECORD_KEYS
    assert ensemble["method"] == "greedy" and ensemble["metric"] == "val_accuracy"
    assert ensemble["validationValue"] >= ensemble["bestSingleValidationValue"]
    assert ensemble["bestSingleTrial"] == result["best"]["trial"]
    ready = next(c for c in result["conditions"] if c["type"] == "EnsembleReady")
    assert ready["status"] == "True"
    shown = " ".join(proc.stdout.split())
    assert "ensemble (greedy, trials): test accuracy" in shown
    assert "test val_accuracy" not in shown

    model_dir = tmp_path / "model"
    exported = kubetune("export", out, "--output", model_dir)
    assert exported.returncode == 0, exported.stdout + exported.stderr

    import kubetune as kt

    model = kt.load_ensemble(model_dir)
    data = load_data(parse_job(fast_job()))
    raw_test = data.X_test.astype(np.float64) * data.std + data.mean  # as the user has it
    predicted = model.predict(raw_test)
    assert predicted.dtype.kind == "i" and set(predicted) <= {0, 1, 2}
    assert float(np.mean(predicted == data.y_test)) == pytest.approx(ensemble["testValue"])
    assert [m["trial"] for m in model.manifest["members"]] == \
        [m["trial"] for m in ensemble["members"]]

    # A cluster's study, exported through its storage alone (no artifact folder at hand).
    from kubetune.cli import main

    assert main(["export", "fast", "--storage", str(out / "study.journal"), "--output",
                 str(tmp_path / "model2"), "--artifacts", str(tmp_path / "nowhere")]) == 0
    again = kt.load_ensemble(tmp_path / "model2").predict_proba(raw_test)
    assert np.allclose(again, model.predict_proba(raw_test))

    # One trial: its files under a readable name, and its model exported on its own.
    best = result["best"]["trial"]
    folder = out / "artifacts" / f"trial-{best:04d}"
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt", "predictions.npz"]
    assert (folder / "model.pt").resolve().is_file()
    single = kubetune("export", out, "--trial", best, "--output", tmp_path / "single")
    assert single.returncode == 0, single.stdout + single.stderr
    alone = kt.load_ensemble(tmp_path / "single")
    assert [m["trial"] for m in alone.manifest["members"]] == [best]
    assert alone.manifest["validationValue"] == pytest.approx(result["best"]["value"], abs=1e-6)
    assert float(np.mean(alone.predict(raw_test) == data.y_test)) == \
        pytest.approx(alone.manifest["testValue"])
    missing = kubetune("export", out, "--trial", 999, "--output", tmp_path / "none")
    assert missing.returncode == 2 and "trial 999 is not in the study" in missing.stderr


def test_importing_kubetune_stays_light():
    code = "import sys, kubetune; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_ensemble_step_runs_torch_on_the_cpu_of_its_pod(tmp_path, monkeypatch):
    """The ensemble pod gets KUBETUNE_THREADS as the workers do (from its CPU limit or
    request): a step that retrains seeds must not take every core of the node."""
    import torch

    from kubetune.ensemble.commands import ensemble_main

    before = torch.get_num_threads()
    monkeypatch.setenv("KUBETUNE_THREADS", "1")
    torch.set_num_threads(3)
    try:  # no such study: the step fails, with the threads set first
        assert ensemble_main(["--study", "none", "--artifacts", str(tmp_path / "artifacts"),
                              "--storage", str(tmp_path / "study.journal")]) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
