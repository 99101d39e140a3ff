"""The job core: given the job, the study and the workers, decide what happens next.

Plain Python with no Kubernetes or process handling of its own: a *launcher* starts and lists
workers (local processes for ``kubetune run``, pods for the operator). ``reconcile`` is called
over and over; it keeps no state between calls beyond what it writes into the status, so a
restarted runner or operator carries on where the last one stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from kubetune import budget
from kubetune.job_study import started_at
from kubetune.search_space import effective_max_trials
from kubetune.spec import TuningJob
from kubetune.status import FAILED, PENDING, RUNNING, SUCCEEDED, build_status, condition
from kubetune.trial_run import FAIL_REASON_ATTR, WORKER_ATTR

log = logging.getLogger("kubetune.controller")

MAX_CONSECUTIVE_CRASHES = 5
NO_COMPLETE_TRIAL = "NoCompleteTrial"
CRASH_LOOP = "WorkerCrashLoop"


@dataclass(frozen=True)
class WorkerState:
    """What a launcher knows of one worker; ``exit_code`` is None while it runs."""

    id: str
    exit_code: int | None = None
    log_tail: str = ""

    @property
    def running(self) -> bool:
        return self.exit_code is None


class Launcher(Protocol):
    """Starts and lists the job's workers: processes (``ProcessLauncher``) or pods.

    Every worker runs ``kubetune worker --study NAME --worker-id ID --artifacts DIR`` with the
    storage URL in the ``KUBETUNE_STORAGE_URL`` environment variable; the ensemble worker runs
    ``kubetune ensemble --study NAME --artifacts DIR`` the same way. A worker stays in
    ``list_workers`` (with its exit code once it ended) until ``forget_worker``.
    """

    def list_workers(self) -> list[WorkerState]: ...

    def start_worker(self) -> str: ...

    def start_ensemble(self) -> str: ...

    def forget_worker(self, worker_id: str) -> None: ...

    def stop_all(self) -> None: ...


@dataclass
class Outcome:
    status: dict[str, Any]
    done: bool


class JobCore:
    """Drives one TuningJob through a launcher; ``reconcile`` is the only entry point."""

    def __init__(self, job: TuningJob, study: optuna.Study, launcher: Launcher,
                 clock: Callable[[], float] = time.time) -> None:
        self.job = job
        self.study = study
        self.launcher = launcher
        self.clock = clock

    def reconcile(self, previous: dict[str, Any] | None = None) -> Outcome:
        previous = previous or {}
        spec = self.job.spec
        now = self.clock()
        fail_stale_trials(self.study)
        workers = self.launcher.list_workers()
        exited = [w for w in workers if not w.running]
        trials = self.study.get_trials(deepcopy=False)
        if self._fail_orphans(trials, exited):
            trials = self.study.get_trials(deepcopy=False)
        counts = budget.count_trials(trials)
        crashes, last_crash = self._count_crashes(previous, exited, counts)
        for worker in exited:
            self.launcher.forget_worker(worker.id)
        alive = [w for w in workers if w.running]
        best = budget.best_value(trials, spec.objective.resolved_direction)
        reason = budget.stop_reason(spec, counts, best, started_at(self.study), now)
        max_trials = effective_max_trials(spec)

        if crashes > MAX_CONSECUTIVE_CRASHES:
            self.launcher.stop_all()
            tail = next((w.log_tail for w in reversed(exited) if w.exit_code), "")
            return self._finish(trials, counts, previous, max_trials, FAILED, CRASH_LOOP,
                                f"{crashes} workers in a row exited with an error without "
                                f"finishing a trial. Last output:\n{tail}".strip())
        if reason is not None and counts.running == 0:
            self.launcher.stop_all()
            return self._finish(trials, counts, previous, max_trials, *self._verdict(
                reason, counts, max_trials))

        started = 0
        if reason is None:
            open_slots = max(0, max_trials - counts.used) + counts.waiting
            wanted = min(spec.budget.parallelism, open_slots + counts.running)
            backoff = min(60.0, 2.0 ** crashes) if crashes else 0.0
            if last_crash is None or now - last_crash >= backoff:
                for _ in range(max(0, wanted - len(alive))):
                    worker_id = self.launcher.start_worker()
                    log.info("started worker %s", worker_id)
                    started += 1
        phase = RUNNING if alive or started or counts.finished else PENDING
        status = build_status(
            self.job, trials, counts, phase=phase, previous=previous, max_trials=max_trials,
            conditions=[condition("Ready", True, "StudyReady",
                                  f"study {self.job.study_name} is open")])
        status["workers"] = {"active": len(alive) + started, "consecutiveCrashes": crashes,
                             "lastCrashTime": last_crash, "finishedTrials": counts.finished,
                             "restarts": previous.get("workers", {}).get("restarts", 0)
                             + sum(1 for w in exited if w.exit_code)}
        return Outcome(status=status, done=False)

    # ------------------------------------------------------------------ helpers
    def _finish(self, trials: list[FrozenTrial], counts: budget.TrialCounts,
                previous: dict[str, Any], max_trials: int, phase: str, reason: str,
                message: str) -> Outcome:
        kind = "Complete" if phase == SUCCEEDED else "Failed"
        status = build_status(
            self.job, trials, counts, phase=phase, previous=previous, max_trials=max_trials,
            conditions=[condition("Ready", True, "StudyReady",
                                  f"study {self.job.study_name} is open"),
                        condition(kind, True, reason, message)])
        status["workers"] = {**previous.get("workers", {}), "active": 0,
                             "finishedTrials": counts.finished}
        return Outcome(status=status, done=True)

    def _verdict(self, reason: str, counts: budget.TrialCounts,
                 max_trials: int) -> tuple[str, str, str]:
        summary = (f"{counts.finished} trials finished: {counts.complete} complete, "
                   f"{counts.pruned} pruned, {counts.failed} failed")
        if reason == budget.TOO_MANY_FAILED:
            return FAILED, reason, (f"{counts.failed} trials failed, more than maxFailedTrials "
                                    f"({self.job.spec.budget.max_failed_trials}); {summary}")
        if counts.complete == 0:
            return FAILED, NO_COMPLETE_TRIAL, f"no trial completed; {summary}"
        messages = {
            budget.MAX_TRIALS: f"budget of {max_trials} trials spent; {summary}",
            budget.GOAL: f"objective goal {self.job.spec.objective.goal} reached; {summary}",
            budget.TIMEOUT: f"timeout {self.job.spec.budget.timeout} reached; {summary}",
        }
        return SUCCEEDED, reason, messages[reason]

    def _fail_orphans(self, trials: list[FrozenTrial], exited: list[WorkerState]) -> bool:
        """Fail and requeue the running trials of workers that exited (crash, kill)."""
        dead = {w.id: w for w in exited}
        changed = False
        for trial in trials:
            owner = trial.user_attrs.get(WORKER_ATTR)
            if trial.state != TrialState.RUNNING or owner not in dead:
                continue
            fail_abandoned_trial(self.study, trial, f"worker {owner} exited with code "
                                                    f"{dead[owner].exit_code}")
            changed = True
        return changed

    def _count_crashes(self, previous: dict[str, Any], exited: list[WorkerState],
                       counts: budget.TrialCounts) -> tuple[int, float | None]:
        """Consecutive worker crashes since a trial last finished (crash-loop detection)."""
        workers = previous.get("workers", {})
        crashes = int(workers.get("consecutiveCrashes", 0))
        last = workers.get("lastCrashTime")
        if counts.finished > workers.get("finishedTrials", counts.finished):
            crashes = 0  # a trial finished since: workers do work, this is no crash loop
        failed = [w for w in exited if w.exit_code]
        if failed:
            crashes += len(failed)
            last = self.clock()
        return crashes, last


def fail_abandoned_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Mark a running trial whose worker is gone as failed, and queue it again."""
    from kubetune.worker import requeue

    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # it finished (or was failed by a heartbeat) meanwhile
    log.warning("trial %d failed: %s; queued again", trial.number, reason)
    requeue(study, trial._trial_id)
