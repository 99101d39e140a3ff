"""The job core's decisions, driven through a scripted launcher and a real Optuna study.

The launcher is the seam between the core and processes or pods; here a small scripted one
stands in for it so each decision can be checked without waiting for real workers.
"""

from __future__ import annotations

import json
import time

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from kubetune.ensemble.step import fingerprint
from kubetune.job.core import MAX_ENSEMBLE_ATTEMPTS, JobCore, WorkerState
from kubetune.search.space import to_distributions
from kubetune.spec.model import parse_job
from kubetune.study.schema import ENSEMBLE_ATTR, STARTED_ATTR, create_or_load_study

from conftest import fast_job


class ScriptedLauncher:
    def __init__(self):
        self.workers: dict[str, WorkerState] = {}
        self.started = 0
        self.ensembles = 0
        self.stopped = False

    def list_workers(self):
        return list(self.workers.values())

    def start_worker(self):
        self.started += 1
        worker_id = f"w{self.started}"
        self.workers[worker_id] = WorkerState(worker_id)
        return worker_id

    def start_ensemble(self):
        self.ensembles += 1
        worker_id = f"e{self.ensembles}"
        self.workers[worker_id] = WorkerState(worker_id)
        return worker_id

    def stop_worker(self, worker_id):
        state = self.workers[worker_id]
        self.workers[worker_id] = WorkerState(worker_id, state.exit_code, stopping=True)

    def forget_worker(self, worker_id):
        self.workers.pop(worker_id, None)

    def stop_all(self):
        self.stopped = True

    def exit(self, worker_id, code, tail=""):
        self.workers[worker_id] = WorkerState(worker_id, code, tail)


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def _core(**spec):
    job = parse_job(fast_job(**spec))
    study = create_or_load_study(InMemoryStorage(), job)
    clock = Clock()
    study.set_user_attr(STARTED_ATTR, clock.now)
    launcher = ScriptedLauncher()
    return JobCore(job, study, launcher, clock=clock), study, launcher, clock


def _trial(study, job, state=TrialState.COMPLETE, value=0.5, worker=None):
    trial = study.ask(fixed_distributions=to_distributions(job.spec.search_space))
    if worker:
        trial.set_user_attr("worker", worker)
    if state == TrialState.RUNNING:
        return trial
    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    return trial


def _condition(status, kind):
    return next((c for c in status["conditions"] if c["type"] == kind), None)


def test_starts_parallelism_workers_and_reports_running():
    core, study, launcher, _ = _core(budget={"maxTrials": 10, "parallelism": 3})
    outcome = core.reconcile()
    assert launcher.started == 3
    assert outcome.status["phase"] == "Running" and not outcome.done
    assert outcome.status["progress"] == "0/10"
    core.reconcile(outcome.status)
    assert launcher.started == 3  # no more while they live


def test_workers_the_cluster_cannot_place_keep_the_job_pending_and_say_why():
    core, study, launcher, _ = _core(budget={"maxTrials": 10, "parallelism": 2})
    status = core.reconcile().status
    assert status["phase"] == "Running" and _condition(status, "WorkersScheduled") is None
    why = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    for worker_id in list(launcher.workers):  # the scheduler's verdict, through the launcher
        launcher.workers[worker_id] = WorkerState(worker_id, unschedulable=why)
    status = core.reconcile(status).status
    waiting = _condition(status, "WorkersScheduled")
    assert status["phase"] == "Pending" and launcher.started == 2  # none replaced: they wait
    assert (waiting["status"], waiting["reason"]) == ("False", "Unschedulable")
    assert waiting["message"] == f"2 of 2 pods cannot be scheduled: w1, w2: {why}"
    launcher.workers["w1"] = WorkerState("w1")  # placed on a node
    status = core.reconcile(status).status
    assert status["phase"] == "Running"
    assert _condition(status, "WorkersScheduled")["message"].startswith("1 of 2 pods")
    launcher.workers["w2"] = WorkerState("w2")
    status = core.reconcile(status).status
    assert _condition(status, "WorkersScheduled") is None


def test_never_starts_more_workers_than_trials_left():
    core, study, launcher, _ = _core(budget={"maxTrials": 3, "parallelism": 8})
    core.reconcile()
    assert launcher.started == 3


def test_workers_running_several_trials_each_are_started_for_the_trials_left():
    core, study, launcher, _ = _core(budget={"maxTrials": 5, "parallelism": 4,
                                             "trialsPerWorker": 2})
    status = core.reconcile().status
    assert launcher.started == 3  # 5 trials, 2 at a time per worker
    for worker in ("w1/0", "w1/1", "w2/0"):
        _trial(study, core.job, TrialState.RUNNING, worker=worker)
    _trial(study, core.job, worker="w2/1")
    launcher.exit("w3", 0)
    status = core.reconcile(status).status
    assert launcher.started == 3  # 3 running and 1 left: two workers are enough
    assert status["trials"]["running"] == 3 and status["workers"]["active"] == 2


def test_a_worker_that_exited_has_the_trials_of_all_its_slots_queued_again():
    core, study, launcher, _ = _core(budget={"maxTrials": 4, "parallelism": 1,
                                             "trialsPerWorker": 2})
    status = core.reconcile().status
    mine = [_trial(study, core.job, TrialState.RUNNING, worker=f"w1/{slot}") for slot in (0, 1)]
    other = _trial(study, core.job, TrialState.RUNNING, worker="w11/0")
    launcher.exit("w1", -9)
    core.reconcile(status)
    trials = study.get_trials(deepcopy=False)
    for slot, trial in enumerate(mine):
        assert trials[trial.number].state == TrialState.FAIL
        assert trials[trial.number].user_attrs["fail_reason"] == (
            f"worker w1/{slot} exited with code -9")
    assert trials[other.number].state == TrialState.RUNNING  # w11 is another worker
    assert len([t for t in trials if t.state == TrialState.WAITING]) == 2


def _with_budget(core, **budget):
    """The core of the same job after a budget edit (as the operator applies one)."""
    data = core.job.to_dict()
    data["spec"]["budget"].update(budget)
    return JobCore(parse_job(data), core.study, core.launcher, clock=core.clock)


def test_lowered_parallelism_stops_the_newest_workers_and_replaces_none_until_they_exit():
    core, study, launcher, _ = _core(budget={"maxTrials": 10, "parallelism": 3})
    status = core.reconcile().status
    core = _with_budget(core, parallelism=1)
    status = core.reconcile(status).status
    stopping = sorted(w.id for w in launcher.workers.values() if w.stopping)
    assert stopping == ["w2", "w3"] and status["workers"]["active"] == 1
    status = core.reconcile(status).status
    assert launcher.started == 3  # the stopping ones are not replaced
    for worker_id in stopping:
        launcher.exit(worker_id, 0)
    status = core.reconcile(status).status
    assert launcher.started == 3 and sorted(launcher.workers) == ["w1"]


def test_raised_parallelism_starts_more_workers():
    core, study, launcher, _ = _core(budget={"maxTrials": 10, "parallelism": 1})
    status = core.reconcile().status
    _with_budget(core, parallelism=3).reconcile(status)
    assert launcher.started == 3


def test_lowered_max_trials_restarts_the_running_workers_on_the_new_budget():
    core, study, launcher, _ = _core(budget={"maxTrials": 10, "parallelism": 2})
    status = core.reconcile().status
    assert status["workers"]["maxTrials"] == 10
    status = _with_budget(core, maxTrials=8).reconcile(status).status
    assert all(w.stopping for w in launcher.workers.values()) and launcher.started == 2
    status = _with_budget(core, maxTrials=8).reconcile(status).status
    assert launcher.started == 2  # told once; new workers only once the old ones exit
    for worker_id in list(launcher.workers):
        launcher.exit(worker_id, 0)
    _with_budget(core, maxTrials=8).reconcile(status)
    assert launcher.started == 4


def test_raised_max_trials_keeps_the_running_workers():
    core, study, launcher, _ = _core(budget={"maxTrials": 10, "parallelism": 2})
    status = core.reconcile().status
    _with_budget(core, maxTrials=12).reconcile(status)
    assert not any(w.stopping for w in launcher.workers.values()) and launcher.started == 2


def test_budget_spent_means_succeeded_with_the_best_trial():
    core, study, launcher, _ = _core(budget={"maxTrials": 3, "parallelism": 1},
                                     ensemble={"enabled": False})
    status = core.reconcile().status
    for value in (0.2, 0.9, 0.4):
        _trial(study, core.job, value=value)
    outcome = core.reconcile(status)
    assert outcome.done and launcher.stopped
    assert outcome.status["phase"] == "Succeeded"
    assert outcome.status["best"]["value"] == 0.9
    assert _condition(outcome.status, "Complete")["reason"] == "MaxTrialsReached"


def test_trial_of_an_exited_worker_is_failed_and_queued_again():
    core, study, launcher, clock = _core(budget={"maxTrials": 4, "parallelism": 1})
    status = core.reconcile().status
    orphan = _trial(study, core.job, TrialState.RUNNING, worker="w1")
    launcher.exit("w1", -9)

    status = core.reconcile(status).status
    assert launcher.started == 1  # a short backoff first, in case it crashes in a loop
    clock.now += 5
    status = core.reconcile(status).status

    trials = study.get_trials(deepcopy=False)
    assert trials[orphan.number].state == TrialState.FAIL
    assert "exited with code -9" in trials[orphan.number].user_attrs["fail_reason"]
    retry = [t for t in trials if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == orphan.params
    assert status["trials"]["failed"] == 0  # a retried attempt is not a failed trial
    assert launcher.started == 2            # the dead worker is replaced
    assert status["workers"]["restarts"] == 1


def test_a_trial_no_worker_claimed_is_failed_and_queued_again_after_the_grace_period():
    # A worker's create call whose answer was lost in a database outage leaves a running trial
    # that no worker claims and that never gets a heartbeat; nothing else would end it.
    core, study, launcher, clock = _core(budget={"maxTrials": 4, "parallelism": 1})
    clock.now = time.time()
    status = core.reconcile().status
    lost = _trial(study, core.job, TrialState.RUNNING)
    claimed = _trial(study, core.job, TrialState.RUNNING, worker="w1")

    status = core.reconcile(status).status
    assert study.get_trials(deepcopy=False)[lost.number].state == TrialState.RUNNING

    clock.now += core.job.spec.storage.grace_period + 1
    status = core.reconcile(status).status
    trials = study.get_trials(deepcopy=False)
    assert trials[lost.number].state == TrialState.FAIL
    assert "no worker claimed" in trials[lost.number].user_attrs["fail_reason"]
    assert trials[claimed.number].state == TrialState.RUNNING  # its worker lives
    retry = [t for t in trials if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == lost.params
    assert status["trials"]["failed"] == 0


def test_workers_that_keep_crashing_fail_the_job_with_their_output():
    core, study, launcher, clock = _core(budget={"maxTrials": 4, "parallelism": 1})
    status = core.reconcile().status
    for _ in range(20):
        for worker_id in list(launcher.workers):
            launcher.exit(worker_id, 1, "ImportError: no module named mypkg")
        clock.now += 120  # past any restart backoff
        outcome = core.reconcile(status)
        status = outcome.status
        if outcome.done:
            break
    assert outcome.done and status["phase"] == "Failed"
    failed = _condition(status, "Failed")
    assert failed["reason"] == "WorkerCrashLoop"
    assert "ImportError: no module named mypkg" in failed["message"]


def test_crashed_worker_is_restarted_only_after_a_backoff():
    core, study, launcher, clock = _core(budget={"maxTrials": 4, "parallelism": 1})
    status = core.reconcile().status
    launcher.exit("w1", 1)
    status = core.reconcile(status).status
    launcher.exit("w2", 1) if "w2" in launcher.workers else None
    started = launcher.started
    clock.now += 0.5
    status = core.reconcile(status).status
    assert launcher.started == started  # within the backoff: wait
    clock.now += 60
    core.reconcile(status)
    assert launcher.started == started + 1


def test_too_many_failed_trials_fail_the_job():
    core, study, launcher, _ = _core(budget={"maxTrials": 10, "maxFailedTrials": 1})
    status = core.reconcile().status
    _trial(study, core.job)
    _trial(study, core.job, TrialState.FAIL)
    _trial(study, core.job, TrialState.FAIL)
    for worker_id in list(launcher.workers):
        launcher.exit(worker_id, 0)
    outcome = core.reconcile(status)
    assert outcome.done and outcome.status["phase"] == "Failed"
    assert _condition(outcome.status, "Failed")["reason"] == "TooManyFailedTrials"


def test_no_complete_trial_is_a_failure_even_when_the_budget_is_spent():
    core, study, launcher, _ = _core(budget={"maxTrials": 2})
    status = core.reconcile().status
    _trial(study, core.job, TrialState.PRUNED)
    _trial(study, core.job, TrialState.PRUNED)
    outcome = core.reconcile(status)
    assert outcome.status["phase"] == "Failed"
    assert _condition(outcome.status, "Failed")["reason"] == "NoCompleteTrial"


def test_timeout_ends_the_job_once_running_trials_stop():
    core, study, launcher, clock = _core(budget={"maxTrials": 50, "timeout": "10m"},
                                         ensemble={"enabled": False})
    status = core.reconcile().status
    _trial(study, core.job, value=0.7)
    running = _trial(study, core.job, TrialState.RUNNING, worker="w1")
    clock.now += 601
    outcome = core.reconcile(status)
    assert not outcome.done  # a trial still runs (it stops itself at the next epoch)
    study.tell(running, state=TrialState.PRUNED)
    outcome = core.reconcile(outcome.status)
    assert outcome.done and outcome.status["phase"] == "Succeeded"
    assert _condition(outcome.status, "Complete")["reason"] == "TimeoutReached"


def test_goal_reached_stops_the_search_early():
    core, study, launcher, _ = _core(budget={"maxTrials": 50},
                                     objective={"metric": "val_accuracy", "goal": 0.95},
                                     ensemble={"enabled": False})
    status = core.reconcile().status
    _trial(study, core.job, value=0.96)
    outcome = core.reconcile(status)
    assert outcome.done
    assert _condition(outcome.status, "Complete")["reason"] == "GoalReached"


def test_unchanged_conditions_keep_their_transition_time():
    core, study, launcher, _ = _core()
    first = core.reconcile().status
    first["conditions"][0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    second = core.reconcile(first).status
    assert second["conditions"][0]["lastTransitionTime"] == "2020-01-01T00:00:00Z"


def test_status_size_does_not_grow_with_the_number_of_trials():
    def status_size(n_trials):
        core, study, launcher, _ = _core(budget={"maxTrials": 100_000})
        dist = {"lr": FloatDistribution(1e-3, 1e-1, log=True)}
        study.add_trials([optuna.trial.create_trial(
            params={"lr": 1e-3 + i * 1e-8}, distributions=dist, value=i / n_trials,
            user_attrs={"history": [{"epoch": 1, "val_accuracy": 0.5}]})
            for i in range(n_trials)])
        return len(json.dumps(core.reconcile().status))

    small, large = status_size(50), status_size(5000)
    assert large <= small + 64  # only the digits of the counters grow


# ---------------------------------------------------------------- the ensemble step
RECORD = {"method": "greedy", "memberSource": "trials", "metric": "val_accuracy",
          "direction": "maximize", "members": [{"trial": 1, "weight": 0.6},
                                               {"trial": 2, "weight": 0.4}],
          "candidates": 3, "validationValue": 0.93, "testValue": 0.91, "bestSingleTrial": 1,
          "bestSingleValidationValue": 0.9, "bestSingleTestValue": 0.89, "artifact": "abc"}


def _searched(**spec):
    """A core whose search has just spent its budget of 3 complete trials."""
    core, study, launcher, clock = _core(budget={"maxTrials": 3, "parallelism": 1}, **spec)
    status = core.reconcile().status
    for value in (0.2, 0.9, 0.4):
        _trial(study, core.job, value=value)
    return core, study, launcher, clock, status


def _again(core, status):
    """Reconcile with a new core object: the core keeps nothing between calls but the status."""
    return JobCore(core.job, core.study, core.launcher, clock=core.clock).reconcile(status)


def test_successful_search_moves_to_ensembling_and_starts_one_ensemble_worker():
    core, study, launcher, _, status = _searched()

    outcome = _again(core, status)

    assert not outcome.done and outcome.status["phase"] == "Ensembling"
    assert launcher.ensembles == 1 and launcher.stopped  # search workers stopped first
    assert outcome.status["workers"]["ensemble"]["id"] == "e1"
    ready = _condition(outcome.status, "EnsembleReady")
    assert ready["status"] == "Unknown" and ready["reason"] == "Ensembling"
    assert _condition(outcome.status, "Complete") is None
    for _ in range(3):  # it runs: wait, never start a second one
        outcome = _again(core, outcome.status)
    assert launcher.ensembles == 1 and outcome.status["phase"] == "Ensembling"


def test_stored_ensemble_result_goes_into_the_status_and_the_job_succeeds():
    core, study, launcher, _, status = _searched()
    status = _again(core, status).status
    study.set_user_attr(ENSEMBLE_ATTR, {**RECORD, "builtFrom": {"finishedTrials": 3}})
    launcher.exit("e1", 0)

    outcome = _again(core, status)

    assert outcome.done and outcome.status["phase"] == "Succeeded"
    assert outcome.status["ensemble"] == RECORD  # builtFrom is bookkeeping, not status
    ready = _condition(outcome.status, "EnsembleReady")
    assert ready["status"] == "True" and ready["reason"] == "EnsembleBuilt"
    assert "0.91" in ready["message"] and "0.89" in ready["message"]
    assert _condition(outcome.status, "Complete")["reason"] == "MaxTrialsReached"
    assert "ensemble" not in outcome.status["workers"] and "e1" not in launcher.workers


def test_too_few_members_is_no_ensemble_with_the_reason_and_the_job_still_succeeds():
    core, study, launcher, _, status = _searched()
    status = _again(core, status).status
    study.set_user_attr(ENSEMBLE_ATTR, {"reason": "NotEnoughMembers",
                                        "message": "an ensemble needs at least 2 usable "
                                                   "members, found 1"})
    launcher.exit("e1", 0)

    outcome = _again(core, status)

    assert outcome.done and outcome.status["phase"] == "Succeeded"
    assert outcome.status["ensemble"] is None
    ready = _condition(outcome.status, "EnsembleReady")
    assert (ready["status"], ready["reason"]) == ("False", "NotEnoughMembers")
    assert "found 1" in ready["message"]


def test_failed_ensemble_step_is_retried_a_bounded_number_of_times_then_the_job_succeeds():
    core, study, launcher, _, status = _searched()
    outcome = _again(core, status)
    messages = []
    for attempt in range(1, MAX_ENSEMBLE_ATTEMPTS + 1):
        assert not outcome.done and launcher.ensembles == attempt
        messages.append(_condition(outcome.status, "EnsembleReady")["message"])
        launcher.exit(f"e{attempt}", 1, "RuntimeError: disk full")
        outcome = _again(core, outcome.status)
    # The progress line names what is built once, and attempts only on a retry.
    assert messages[0] == "building a greedy ensemble of the 20 best trials"
    assert messages[1] == f"building a greedy ensemble of the 20 best trials, attempt 2 of " \
                          f"{MAX_ENSEMBLE_ATTEMPTS}"

    assert outcome.done and outcome.status["phase"] == "Succeeded"
    assert launcher.ensembles == MAX_ENSEMBLE_ATTEMPTS
    ready = _condition(outcome.status, "EnsembleReady")
    assert (ready["status"], ready["reason"]) == ("False", "EnsembleFailed")
    assert "RuntimeError: disk full" in ready["message"]
    assert outcome.status["ensemble"] is None
    assert _condition(outcome.status, "Complete")["reason"] == "MaxTrialsReached"


def test_ensemble_step_that_exits_without_a_result_counts_as_a_failed_attempt():
    core, study, launcher, _, status = _searched()
    status = _again(core, status).status
    launcher.exit("e1", 0)
    outcome = _again(core, status)
    assert not outcome.done and launcher.ensembles == 2
    assert "without storing a result" in outcome.status["workers"]["ensemble"]["lastError"]


def test_vanished_ensemble_worker_is_waited_for_briefly_then_started_again():
    core, study, launcher, clock, status = _searched()
    status = _again(core, status).status
    del launcher.workers["e1"]  # e.g. a pod not listed yet, or deleted
    status = _again(core, status).status
    assert launcher.ensembles == 1  # it may just not be listed yet
    clock.now += 600
    status = _again(core, status).status
    assert launcher.ensembles == 2 and "gone" in status["workers"]["ensemble"]["lastError"]


def test_a_stale_result_is_cleared_before_the_step_runs_and_a_current_one_is_reused():
    core, study, launcher, _, status = _searched()
    study.set_user_attr(ENSEMBLE_ATTR, {**RECORD, "builtFrom": fingerprint(
        core.job.spec.ensemble, finished_trials=2)})  # built when 2 trials had finished
    _again(core, status)
    assert launcher.ensembles == 1 and study.user_attrs[ENSEMBLE_ATTR] is None

    core, study, launcher, _, status = _searched()
    study.set_user_attr(ENSEMBLE_ATTR, {**RECORD, "builtFrom": fingerprint(
        core.job.spec.ensemble, finished_trials=3)})
    outcome = _again(core, status)
    assert launcher.ensembles == 0  # the same trials and settings: nothing to build again
    assert outcome.done and outcome.status["ensemble"] == RECORD
    assert "built earlier" in _condition(outcome.status, "EnsembleReady")["message"]


def test_a_failed_search_has_no_ensemble_step():
    core, study, launcher, _ = _core(budget={"maxTrials": 2})
    status = core.reconcile().status
    _trial(study, core.job, TrialState.PRUNED)
    _trial(study, core.job, TrialState.PRUNED)
    outcome = core.reconcile(status)
    assert outcome.done and outcome.status["phase"] == "Failed"
    assert launcher.ensembles == 0 and _condition(outcome.status, "EnsembleReady") is None


def test_search_workers_stopped_for_the_ensemble_are_no_crash_loop():
    core, study, launcher, _ = _core(budget={"maxTrials": 8, "parallelism": 8})
    status = core.reconcile().status
    for value in range(8):
        _trial(study, core.job, value=value / 10)
    outcome = core.reconcile(status)
    assert launcher.started == 8
    for worker_id in [w for w in launcher.workers if w.startswith("w")]:
        launcher.exit(worker_id, -15)  # SIGTERM from stop_all
    outcome = core.reconcile(outcome.status)
    assert not outcome.done and outcome.status["phase"] == "Ensembling"
