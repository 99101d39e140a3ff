"""The job core: given the job, the study and the workers, decide what happens next.

Every decision about a job is made here, for the local runner and the operator alike: how many
workers run, requeueing the trials of workers that are gone, ending the search, the crash loop,
the preflight's verdict and the ensemble step. A *launcher* only starts, stops and lists
workers (local processes for ``kubetune run``, pods for the operator). ``reconcile`` keeps no
state between calls beyond what it writes into the status, so a restarted runner or operator
carries on where the last one stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from kubetune.builtin import preflight
from kubetune.ensemble.step import describe, is_reusable, status_view
from kubetune.job.status import (
    ENSEMBLING,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    build_status,
    condition,
)
from kubetune.search import budget
from kubetune.search.stages import stored_spaces
from kubetune.spec.model import TuningJob
from kubetune.study.schema import ENSEMBLE_ATTR, WORKER_ATTR, started_at
from kubetune.study.trials import fail_and_requeue, worker_of

log = logging.getLogger("kubetune.controller")

MAX_CONSECUTIVE_CRASHES = 5
NO_COMPLETE_TRIAL = "NoCompleteTrial"
CRASH_LOOP = "WorkerCrashLoop"

# Present only while the cluster cannot place a worker (the scheduler's PodScheduled=False).
WORKERS_SCHEDULED = "WorkersScheduled"
UNSCHEDULABLE = "Unschedulable"

ENSEMBLE_READY = "EnsembleReady"
ENSEMBLE_BUILT = "EnsembleBuilt"
ENSEMBLE_RUNNING = "Ensembling"
ENSEMBLE_FAILED = "EnsembleFailed"
MAX_ENSEMBLE_ATTEMPTS = 3
# A just-started ensemble worker may not be listed at once (a pod cache): missing from the list
# for this long after its start, it is still waited for; after that it counts as a failure.
ENSEMBLE_LIST_GRACE = 120.0


@dataclass(frozen=True)
class WorkerState:
    """What a launcher knows of one worker; ``exit_code`` is None while it runs. A worker that
    was told to stop and has not exited yet is ``stopping``. A worker the cluster cannot place
    on a node waits, not running yet: ``unschedulable`` holds the scheduler's message."""

    id: str
    exit_code: int | None = None
    log_tail: str = ""
    stopping: bool = False
    unschedulable: str = ""

    @property
    def running(self) -> bool:
        return self.exit_code is None


class Launcher(Protocol):
    """Starts, stops and lists the job's workers: processes (``ProcessLauncher``) or pods.

    Every worker runs ``kubetune worker --study NAME --worker-id ID --artifacts DIR`` with the
    storage URL in the ``KUBETUNE_STORAGE_URL`` environment variable; the ensemble worker runs
    ``kubetune ensemble --study NAME --artifacts DIR`` the same way. A worker, the ensemble
    worker included, stays in ``list_workers`` (with its exit code once it ended) until
    ``forget_worker``; the search workers are listed oldest first. A stopped worker gets
    SIGTERM and gives its running trial back. The ensemble step's result is read from the
    study, not from the worker.
    """

    def list_workers(self) -> list[WorkerState]: ...

    def start_worker(self) -> str: ...

    def start_ensemble(self) -> str: ...

    def stop_worker(self, worker_id: str) -> None: ...

    def forget_worker(self, worker_id: str) -> None: ...

    def stop_all(self) -> None: ...


@dataclass
class Outcome:
    status: dict[str, Any]
    done: bool
    # The trials this reconcile read, for callers that also need them (metrics): reading
    # them again would double the storage queries of every pass.
    trials: list[FrozenTrial] = field(default_factory=list)


@dataclass
class _Pass:
    """What one reconcile read: the previous status, the trials and the budget they leave."""

    previous: dict[str, Any]
    trials: list[FrozenTrial]
    budget: budget.BudgetPass

    @property
    def counts(self) -> budget.TrialCounts:
        return self.budget.counts


class JobCore:
    """Drives one TuningJob through a launcher; ``reconcile`` is the only entry point."""

    def __init__(self, job: TuningJob, study: optuna.Study, launcher: Launcher,
                 clock: Callable[[], float] = time.time) -> None:
        self.job = job
        self.study = study
        self.launcher = launcher
        self.clock = clock
        self._stage_spaces: dict[str, Any] = {}  # read once per reconcile, for the status

    def reconcile(self, previous: dict[str, Any] | None = None,
                  attrs: dict[str, Any] | None = None, fail_stale: bool = True) -> Outcome:
        """``attrs``: the study's user attributes when the caller read them this pass;
        ``fail_stale``: whether to fail the trials whose heartbeat stopped (the operator does
        it less often than it reconciles; a worker does it before each trial too)."""
        previous = previous or {}
        attrs = self.study.user_attrs if attrs is None else attrs
        outcome = self._reconcile(previous, attrs, fail_stale)
        outcome.status["preflight"] = preflight.status_view(attrs)
        return outcome

    def _reconcile(self, previous: dict[str, Any], attrs: dict[str, Any],
                   fail_stale: bool) -> Outcome:
        spec = self.job.spec
        now = self.clock()
        if fail_stale:
            fail_stale_trials(self.study)
        if spec.stages and len(spec.stages) > 1:
            self._stage_spaces = stored_spaces(self.study)
        tracking = _ensemble_tracking(previous)
        workers = self.launcher.list_workers()
        ensemble_worker = next((w for w in workers if tracking and w.id == tracking["id"]), None)
        workers = [w for w in workers if w is not ensemble_worker]
        exited = [w for w in workers if not w.running]
        trials = self.study.get_trials(deepcopy=False)
        if self._fail_orphans(trials, exited):
            trials = self.study.get_trials(deepcopy=False)
        check = budget.check_budget(spec, trials, started_at(attrs), now)
        now_pass = _Pass(previous, trials, check)
        crashes, last_crash = self._count_crashes(previous, exited, check.counts)
        for worker in exited:
            self.launcher.forget_worker(worker.id)
        running = [w for w in workers if w.running]

        failed_check = preflight.failed_verdict(attrs)
        if failed_check is not None:
            self.launcher.stop_all()
            return self._finish(now_pass, FAILED, preflight.PREFLIGHT_FAILED,
                                failed_check["message"])
        if crashes > MAX_CONSECUTIVE_CRASHES and tracking is None:
            self.launcher.stop_all()
            tail = next((w.log_tail for w in reversed(exited) if w.exit_code), "")
            return self._finish(now_pass, FAILED, CRASH_LOOP,
                                f"{crashes} workers in a row exited with an error without "
                                f"finishing a trial. Last output:\n{tail}".strip())
        if check.stop is not None and check.counts.running == 0:
            verdict = self._verdict(check)
            if verdict[0] == SUCCEEDED and spec.ensemble.enabled:
                return self._ensemble(now_pass, verdict, tracking, ensemble_worker)
            self.launcher.stop_all()
            return self._finish(now_pass, *verdict)

        running = self._fit_workers(previous, running, check.max_trials)
        started = 0
        if check.stop is None:
            # Each worker runs up to trialsPerWorker trials at once.
            wanted = min(spec.budget.parallelism,
                         math.ceil((check.open_slots + check.counts.running)
                                   / spec.budget.trials_per_worker))
            backoff = min(60.0, 2.0 ** crashes) if crashes else 0.0
            if last_crash is None or now - last_crash >= backoff:
                for _ in range(max(0, wanted - len(running))):
                    worker_id = self.launcher.start_worker()
                    log.info("started worker %s", worker_id)
                    started += 1
        active = [w for w in running if not w.stopping]
        placed = [w for w in running if not w.unschedulable]
        phase = RUNNING if placed or started or check.counts.finished else PENDING
        status = self._status(now_pass, phase, [self._ready(), *_scheduling(active)])
        status["workers"] = {"active": len(active) + started, "consecutiveCrashes": crashes,
                             "lastCrashTime": last_crash,
                             "finishedTrials": check.counts.finished,
                             "maxTrials": check.max_trials,
                             "restarts": previous.get("workers", {}).get("restarts", 0)
                             + sum(1 for w in exited if w.exit_code)}
        return Outcome(status=status, done=False, trials=trials)

    def _fit_workers(self, previous: dict[str, Any], running: list[WorkerState],
                     max_trials: int) -> list[WorkerState]:
        """Stop the workers the job no longer wants; returns the running ones (a stopping
        worker still counts until it exits, so none is replaced before it is gone).

        A worker reads the budget when it starts: when maxTrials was lowered under running
        workers, they all restart on the new one. Beyond a lowered parallelism, the newest
        workers stop.
        """
        active = [w for w in running if not w.stopping]
        before = previous.get("workers", {}).get("maxTrials")
        if active and before is not None and max_trials < before:
            log.info("maxTrials lowered from %s to %s: restarting the workers", before,
                     max_trials)
            stop = active
        else:
            stop = active[self.job.spec.budget.parallelism:]
        for worker in stop:
            self.launcher.stop_worker(worker.id)
        stopped = {w.id for w in stop}
        return [WorkerState(w.id, w.exit_code, w.log_tail, stopping=True,
                            unschedulable=w.unschedulable) if w.id in stopped
                else w for w in running]

    # ------------------------------------------------------------------ the ensemble step
    def _ensemble(self, now: _Pass, verdict: tuple[str, str, str],
                  tracking: dict[str, Any] | None, worker: WorkerState | None) -> Outcome:
        """The search succeeded: start, wait for, retry and finally report the ensemble step.

        The ensemble worker is tracked in ``status.workers.ensemble``; a failed step is
        started again, ``MAX_ENSEMBLE_ATTEMPTS`` times in all. After that, or with too few
        members, the job still succeeds, with ``EnsembleReady=False`` and the reason.
        """
        spec = self.job.spec.ensemble
        if tracking is None:  # the search has just ended (or a restarted runner lost track)
            self.launcher.stop_all()
            search = {"reason": verdict[1], "message": verdict[2]}
            record = self.study.user_attrs.get(ENSEMBLE_ATTR)
            if is_reusable(record, spec, now.counts.finished):
                return self._ensemble_done(now, search, record, reused=True)
            self.study.set_user_attr(ENSEMBLE_ATTR, None)  # a result now can only be new
            return self._start_ensemble(now, {"search": search, "attempts": 0})
        search = tracking["search"]
        if worker is not None and worker.running:
            return self._ensembling(now, tracking, worker)
        if worker is None and self.clock() - tracking["startedAt"] < ENSEMBLE_LIST_GRACE:
            return self._ensembling(now, tracking)
        if worker is not None:
            self.launcher.forget_worker(worker.id)
        if worker is not None and worker.exit_code == 0:
            record = self.study.user_attrs.get(ENSEMBLE_ATTR)
            if record:
                return self._ensemble_done(now, search, record)
            error = "the ensemble step exited without storing a result"
        elif worker is None:
            error = f"ensemble worker {tracking['id']} is gone"
        else:
            error = f"the ensemble step exited with code {worker.exit_code}"
            if worker.log_tail:
                error += f"; last output:\n{worker.log_tail}"
        log.warning("ensemble attempt %d failed: %s", tracking["attempts"], error)
        if tracking["attempts"] < MAX_ENSEMBLE_ATTEMPTS:
            return self._start_ensemble(now, {**tracking, "lastError": error[:2000]})
        self.launcher.stop_all()
        return self._finish(now, SUCCEEDED, search["reason"], search["message"],
                            ensemble=condition(ENSEMBLE_READY, False, ENSEMBLE_FAILED,
                                               f"{tracking['attempts']} attempts failed; "
                                               f"last: {error}"[:4000]))

    def _start_ensemble(self, now: _Pass, tracking: dict[str, Any]) -> Outcome:
        worker_id = self.launcher.start_ensemble()
        tracking = {**tracking, "id": worker_id, "attempts": tracking["attempts"] + 1,
                    "startedAt": self.clock()}
        log.info("started ensemble worker %s (attempt %d)", worker_id, tracking["attempts"])
        return self._ensembling(now, tracking)

    def _ensembling(self, now: _Pass, tracking: dict[str, Any],
                    worker: WorkerState | None = None) -> Outcome:
        spec = self.job.spec.ensemble
        source = {"trials": f"the {spec.top_k} best trials",
                  "snapshots": f"the {spec.top_k} best trials and their snapshots",
                  "seeds": f"the best trial and {spec.seeds - 1} retrained seeds"}[spec.members]
        attempt = tracking["attempts"]
        retry = f", attempt {attempt} of {MAX_ENSEMBLE_ATTEMPTS}" if attempt > 1 else ""
        status = self._status(now, ENSEMBLING, [
            self._ready(),
            condition(ENSEMBLE_READY, None, ENSEMBLE_RUNNING,
                      f"building a {spec.method} ensemble of {source}{retry}"),
            *_scheduling([worker] if worker is not None else [])])
        status["ensemble"] = None
        status["workers"] = {**now.previous.get("workers", {}), "active": 1,
                             "finishedTrials": now.counts.finished, "ensemble": tracking}
        return Outcome(status=status, done=False, trials=now.trials)

    def _ensemble_done(self, now: _Pass, search: dict[str, str], record: dict[str, Any],
                       reused: bool = False) -> Outcome:
        self.launcher.stop_all()
        view = status_view(record)
        if view is None:
            ready = condition(ENSEMBLE_READY, False, record.get("reason", ENSEMBLE_FAILED),
                              record.get("message", ""))
        else:
            message = describe(record) + (" (built earlier for these trials)" if reused else "")
            ready = condition(ENSEMBLE_READY, True, ENSEMBLE_BUILT, message)
        outcome = self._finish(now, SUCCEEDED, search["reason"], search["message"],
                               ensemble=ready)
        outcome.status["ensemble"] = view
        return outcome

    # ------------------------------------------------------------------ helpers
    def _ready(self) -> dict[str, Any]:
        return condition("Ready", True, "StudyReady", f"study {self.job.study_name} is open")

    def _status(self, now: _Pass, phase: str, conditions: list[dict[str, Any]]
                ) -> dict[str, Any]:
        return build_status(self.job, now.trials, now.counts, phase=phase,
                            previous=now.previous, max_trials=now.budget.max_trials,
                            stage_spaces=self._stage_spaces, conditions=conditions)

    def _finish(self, now: _Pass, phase: str, reason: str, message: str,
                ensemble: dict[str, Any] | None = None) -> Outcome:
        """The job's end; ``ensemble`` is the EnsembleReady condition when the step ran."""
        kind = "Complete" if phase == SUCCEEDED else "Failed"
        conditions = [self._ready()]
        if ensemble is not None:
            conditions.append(ensemble)
        conditions.append(condition(kind, True, reason, message))
        status = self._status(now, phase, conditions)
        workers = {k: v for k, v in now.previous.get("workers", {}).items() if k != "ensemble"}
        status["workers"] = {**workers, "active": 0, "finishedTrials": now.counts.finished}
        return Outcome(status=status, done=True, trials=now.trials)

    def _verdict(self, check: budget.BudgetPass) -> tuple[str, str, str]:
        counts = check.counts
        summary = (f"{counts.finished} trials finished: {counts.complete} complete, "
                   f"{counts.pruned} pruned, {counts.failed} failed")
        if check.stop == budget.TOO_MANY_FAILED:
            return FAILED, check.stop, (
                f"{counts.failed} trials failed, more than maxFailedTrials "
                f"({self.job.spec.budget.max_failed_trials}); {summary}")
        if counts.complete == 0:
            return FAILED, NO_COMPLETE_TRIAL, f"no trial completed; {summary}"
        if check.best is None:
            return FAILED, NO_COMPLETE_TRIAL, f"no full-fidelity trial completed; {summary}"
        messages = {
            budget.MAX_TRIALS: f"budget of {check.max_trials} trials spent; {summary}",
            budget.GOAL: f"objective goal {self.job.spec.objective.goal} "
                         f"({self.job.spec.objective.primary_metric}) reached; {summary}",
            budget.TIMEOUT: f"timeout {self.job.spec.budget.timeout} reached; {summary}",
        }
        return SUCCEEDED, check.stop, messages[check.stop]

    def _fail_orphans(self, trials: list[FrozenTrial], exited: list[WorkerState]) -> bool:
        """Fail and requeue the running trials of workers that exited (crash, kill), and those
        no worker ever claimed.

        A worker claims a trial (its ``worker`` attribute) right after creating it. A trial
        still unclaimed after the grace period was created by a call whose answer was lost
        (the database went away mid-call; the worker retried and got another trial): it has no
        heartbeat either, so nothing else would ever end it.
        """
        dead = {w.id: w for w in exited}
        unclaimed_before = (datetime.fromtimestamp(self.clock())
                            - timedelta(seconds=self.job.spec.storage.grace_period))
        changed = False
        for trial in trials:
            if trial.state != TrialState.RUNNING:
                continue
            owner = trial.user_attrs.get(WORKER_ATTR)
            if owner is not None and worker_of(owner) in dead:
                reason = f"worker {owner} exited with code {dead[worker_of(owner)].exit_code}"
            elif owner is None and trial.datetime_start is not None \
                    and trial.datetime_start < unclaimed_before:
                reason = "no worker claimed the trial (its creation was cut off)"
            else:
                continue
            fail_and_requeue(self.study, trial, reason, self.job.spec.budget.max_retries)
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


def _scheduling(workers: list[WorkerState]) -> list[dict[str, Any]]:
    """``WorkersScheduled=False`` while some of ``workers`` wait for a node, with the
    scheduler's message (grouped: two pods asking for the same usually hear the same)."""
    waiting: dict[str, list[str]] = {}
    for worker in workers:
        if worker.unschedulable:
            waiting.setdefault(worker.unschedulable, []).append(worker.id)
    if not waiting:
        return []
    count = sum(len(ids) for ids in waiting.values())
    message = "; ".join(f"{', '.join(ids)}: {why}" for why, ids in waiting.items())
    return [condition(WORKERS_SCHEDULED, False, UNSCHEDULABLE,
                      f"{count} of {len(workers)} pods cannot be scheduled: {message}"[:4000])]


def _ensemble_tracking(previous: dict[str, Any]) -> dict[str, Any] | None:
    """The ensemble worker the previous status tracks, while the job is Ensembling."""
    if previous.get("phase") != ENSEMBLING:
        return None
    tracking = previous.get("workers", {}).get("ensemble")
    return tracking if isinstance(tracking, dict) and tracking.get("id") else None
