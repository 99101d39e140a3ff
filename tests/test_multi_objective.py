"""Several objectives (issue 19, item 2): the Pareto front in the status, ranking and the goal
by the primary objective, and a local `kubetune run` of a tiny two-objective job.

The spec's checks are in tests/test_spec.py (MULTI_REJECTIONS, MULTI_VALID: the API server
judges them too, tests/test_crd_server.py), the guards in tests/test_guards.py.
"""

from __future__ import annotations

import json
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from kubetune.job.status import PARETO_SIZE, build_status
from kubetune.search.budget import GOAL, check_budget, count_trials, pareto_front
from kubetune.spec.model import parse_job

from conftest import fast_job, kubetune, write_job

OBJECTIVES = [{"metric": "val_accuracy"}, {"metric": "n_params"}]  # maximize, minimize
LR = {"lr": FloatDistribution(1e-3, 1e-1, log=True)}


def _job(goal=None, **spec):
    job = fast_job("multi", ensemble={"enabled": False}, **spec)
    job["spec"]["objective"] = {"metrics": OBJECTIVES,
                                **({"goal": goal} if goal is not None else {})}
    return job


def _trial(number, accuracy, size, state=TrialState.COMPLETE, **attrs):
    trial = create_trial(state=state, values=[accuracy, size] if state == TrialState.COMPLETE
                         else None, params={"lr": 0.01}, distributions=LR, user_attrs=attrs)
    trial.number = number
    return trial


def test_the_pareto_front_keeps_the_trials_nothing_dominates():
    trials = [_trial(0, 0.9, 500.0), _trial(1, 0.8, 100.0), _trial(2, 0.8, 600.0),  # 2: by 0
              _trial(3, 0.7, 100.0),                       # dominated by 1 (same size, worse)
              _trial(4, 0.9, 500.0),                       # a tie with 0: both on the front
              _trial(5, 0.95, 50.0, fidelity="reduced"),   # reduced fidelity: never competes
              _trial(6, 0.99, 10.0, **{"kubetune:copied_from": "default/old#3"}),  # copied
              _trial(7, 0.0, 0.0, state=TrialState.PRUNED), _trial(8, 0.6, 20.0)]
    front = pareto_front(trials, ["maximize", "minimize"])
    assert [t.number for t in front] == [0, 4, 1, 8]  # best first in the first objective
    assert pareto_front(trials, ["minimize", "minimize"])[0].number == 8


def test_the_status_shows_the_front_bounded_and_ranks_by_the_primary_objective():
    job = parse_job(_job())
    # 30 trials on one front: accuracy grows with size
    trials = [_trial(i, 0.5 + i / 100, 100.0 + 10 * i) for i in range(30)]
    trials.append(_trial(30, 0.55, 10_000.0))  # dominated
    status = build_status(job, trials, count_trials(trials), phase="Running", conditions=[])
    assert status["objective"] == {
        "metric": "val_accuracy", "direction": "maximize",
        "metrics": [{"metric": "val_accuracy", "direction": "maximize"},
                    {"metric": "n_params", "direction": "minimize"}]}
    front = status["paretoFront"]
    assert front["size"] == 30 and len(front["trials"]) == PARETO_SIZE
    shown = [entry["trial"] for entry in front["trials"]]
    assert shown[0] == 29 and shown[-1] == 0  # both ends of the trade-off, best first
    assert shown == sorted(shown, reverse=True)
    assert front["trials"][0]["values"] == [0.79, 390.0]
    assert status["best"] == {"trial": 29, "value": 0.79, "values": [0.79, 390.0],
                              "params": {"lr": 0.01}}
    assert [e["trial"] for e in status["leaderboard"]] == list(range(29, 19, -1))
    assert len(json.dumps(status)) < 8000  # small, whatever the number of trials


def test_a_single_objective_status_has_no_front():
    job = parse_job(fast_job())
    trial = create_trial(value=0.9, params={"lr": 0.01}, distributions=LR)
    status = build_status(job, [trial], count_trials([trial]), phase="Running", conditions=[])
    assert "paretoFront" not in status and "values" not in status["best"]
    assert status["objective"] == {"metric": "val_accuracy", "direction": "maximize"}


@pytest.mark.parametrize("primary, goal, stops", [
    ("val_accuracy", 0.9, True), ("val_accuracy", 0.95, False),
    ("n_params", 100.0, False), ("n_params", 500.0, True)])
def test_the_goal_is_the_primary_objectives(primary, goal, stops):
    spec = _job(goal)
    spec["spec"]["objective"]["primary"] = primary
    job = parse_job(spec)
    trials = [_trial(0, 0.9, 500.0), _trial(1, 0.5, 200.0)]
    check = check_budget(job.spec, trials, time.time(), time.time())
    assert check.best == (0.9 if primary == "val_accuracy" else 200.0)
    assert (check.stop == GOAL) == stops


def test_kubetune_run_of_a_two_objective_job_shows_the_pareto_front(tmp_path):
    """Accuracy against model size on the built-in MLP, which reports n_params."""
    job = _job(budget={"maxTrials": 4, "parallelism": 1}, preflight={"enabled": False},
               sampler={"type": "nsgaii", "seed": 0, "populationSize": 2},
               searchSpace={"lr": {"type": "float", "low": 1e-2, "high": 1e-1, "log": True},
                            "hidden": {"type": "categorical", "choices": [4, 32]}})
    job["spec"]["trainer"]["builtin"]["epochs"] = 2
    out = tmp_path / "out"

    proc = kubetune("run", write_job(tmp_path / "job.yaml", job), "--output", out)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["phase"] == "Succeeded" and result["trials"]["complete"] == 4
    study = optuna.load_study(study_name="default/multi",
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(
                                      str(out / "study.journal"))))
    assert len(study.directions) == 2
    on_front = sorted(t.number for t in study.best_trials)
    front = result["paretoFront"]
    assert front["size"] == len(on_front)
    assert sorted(e["trial"] for e in front["trials"]) == on_front
    for entry in front["trials"]:
        trial = study.trials[entry["trial"]]
        assert entry["values"] == trial.values and entry["value"] == trial.values[0]
        hidden = trial.params["hidden"]  # n_params: 10 features, 2 layers, 3 classes
        assert trial.values[1] == (10 + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * 3
    assert (out / "plots" / "optuna-pareto.png").exists()
    shown = kubetune("results", out)
    assert shown.returncode == 0, shown.stderr
    assert "Pareto front of val_accuracy (maximize) vs n_params (minimize)" in shown.stdout
    assert "n_params" in shown.stdout


def test_a_warm_start_copies_only_trials_with_one_value_per_objective():
    from kubetune.search.space import to_distributions
    from kubetune.study.schema import WARM_START_ATTR, create_or_load_study

    storage = optuna.storages.InMemoryStorage()
    for name, job in (("one", fast_job("one")), ("two", _job())):
        job["metadata"]["name"] = name
        source = parse_job(job)
        study = create_or_load_study(storage, source)
        values = [0.9] if name == "one" else [0.9, 100.0]
        study.add_trial(create_trial(values=values, params={"lr": 0.01, "hidden": 16},
                                     distributions=to_distributions(source.spec.search_space)))
    for source, copied in (("one", 0), ("two", 1)):
        job = _job()
        job["metadata"]["name"] = f"from-{source}"
        job["spec"]["warmStart"] = {"fromJob": source}
        study = create_or_load_study(storage, parse_job(job))
        record = study.user_attrs[WARM_START_ATTR]
        assert (record["copied"], record["skipped"]) == (copied, 1 - copied)
        if copied:
            assert study.trials[0].values == [0.9, 100.0]
