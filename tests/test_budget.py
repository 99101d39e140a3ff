"""The budget as a worker sees it when it chooses a trial under the study lock: the same
answers as the full reckoning, with less work (every worker waits for that lock)."""

from __future__ import annotations

import math
import random
import time

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from kubetune.search.budget import GOAL, MAX_TRIALS, best_value, check_budget, count_trials, ranked
from kubetune.search.stages import stage_for_new_trial
from kubetune.spec.model import parse_job
from kubetune.study.schema import COPIED_ATTR, FIDELITY_ATTR, REDUCED

from conftest import fast_job

LR = {"lr": FloatDistribution(1e-3, 1e-1, log=True)}


def _trials(rng: random.Random, count: int):
    trials = []
    for number in range(count):
        state = rng.choice([TrialState.COMPLETE] * 3 + [TrialState.PRUNED, TrialState.FAIL,
                                                        TrialState.RUNNING])
        value = rng.choice([0.5, 0.7, 0.9, rng.random(), math.inf])  # ties, not finite
        attrs = rng.choice([{}, {}, {FIDELITY_ATTR: REDUCED}, {COPIED_ATTR: "other/job"}])
        trial = create_trial(state=state, params={"lr": 0.01}, distributions=LR,
                             value=value if state == TrialState.COMPLETE else None,
                             user_attrs=attrs)
        trial.number = number
        trials.append(trial)
    return trials


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_best_value_is_the_top_ranked_trials(direction):
    rng = random.Random(3)
    for count in (0, 1, 5, 40):
        trials = _trials(rng, count)
        top = ranked(trials, direction)
        assert best_value(trials, direction) == (top[0].value if top else None)


@pytest.mark.parametrize("goal, stops", [(0.8, True), (0.95, False), (None, False)])
def test_a_worker_stops_at_the_goal_without_asking_for_the_best(goal, stops):
    spec = fast_job(budget={"maxTrials": 10, "parallelism": 2})
    if goal is not None:
        spec["spec"]["objective"]["goal"] = goal
    job = parse_job(spec)
    trials = [create_trial(value=v, params={"lr": 0.01}, distributions=LR) for v in (0.5, 0.9)]
    check = check_budget(job.spec, trials, time.time(), time.time(), best=False)
    assert (check.stop == GOAL) == stops
    assert check.counts == check_budget(job.spec, trials, time.time(), time.time()).counts


def test_a_one_stage_job_joins_stage_zero_until_its_trials_are_taken():
    job = parse_job(fast_job(budget={"maxTrials": 4, "parallelism": 2}))
    trials = []
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                  TrialState.FAIL):
        assert stage_for_new_trial(job.spec, trials, count_trials(trials)) == 0
        trials.append(create_trial(state=state, params={"lr": 0.01}, distributions=LR,
                                   value=0.5 if state == TrialState.COMPLETE else None))
    assert stage_for_new_trial(job.spec, trials, count_trials(trials)) is None
    assert stage_for_new_trial(job.spec, trials) is None
    assert check_budget(job.spec, trials, time.time(), time.time(), best=False).stop == \
        MAX_TRIALS
