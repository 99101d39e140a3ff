"""The worker: a long-lived process that runs trials of one study until the job's budget is met.

It needs only the storage URL and the study name: the job is read from the study. Choosing the
next trial happens under ``StudyLock``, after failing stale trials (an RDB heartbeat that
stopped), so however many workers race the budget is never exceeded. A trial runs through
``kubetune.worker.trial.run_trial``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from kubetune.builtin.data import load_data
from kubetune.builtin.preflight import FAILED, ensure_verdict
from kubetune.search import budget
from kubetune.search.space import make_pruner, stage_samplers
from kubetune.search.stages import (
    StageAsker,
    new_trial_attrs,
    stage_for_new_trial,
    stage_of,
)
from kubetune.spec.model import TuningJob
from kubetune.study.optuna_internals import heartbeat_storage, set_user_attrs, trial_id
from kubetune.study.schema import WORKER_ATTR, load_job, started_at
from kubetune.study.storage import (
    StudyLock,
    make_artifact_store,
    open_job_storage,
    silence_optuna,
    worker_retry_seconds,
)
from kubetune.study.trials import fail_and_requeue
from kubetune.study.urls import is_rdb
from kubetune.worker.contract import WorkerStopped
from kubetune.worker.trial import run_trial

log = logging.getLogger("kubetune.worker")


@dataclass
class WorkerOptions:
    storage: str
    study: str
    worker_id: str
    artifacts: str
    poll_interval: float = 1.0
    threads: int | None = None
    # Folders of the user's code (entrypoint and command trainers): put on sys.path; the
    # first is the working directory of command trials. None: the working directory.
    code: list[str] = field(default_factory=list)
    # The job_digest of the TuningJob the operator validated (its pods' KUBETUNE_JOB_DIGEST):
    # the worker refuses a stored job that differs from it. None: trust the stored job.
    job_digest: str | None = None
    # One of a worker's trial slots (budget.trialsPerWorker; worker_id is then <worker>/<slot>).
    # None: the worker itself, which forks its slots when the job runs several trials at once.
    slot: int | None = None


def run_worker(options: WorkerOptions) -> int:
    """Run trials until the job needs no more; the exit code is 0 unless setup failed."""
    silence_optuna()
    retry_for = worker_retry_seconds()  # a database restart or outage is waited out
    storage = open_job_storage(options.storage, None, retry_for=retry_for, check_schema=False)
    job = load_job(optuna.load_study(study_name=options.study, storage=storage),
                   options.job_digest)
    spec = job.spec
    if spec.budget.trials_per_worker > 1 and options.slot is None:
        from kubetune.worker.slots import run_slots

        return run_slots(options, job, storage, run_worker)
    if is_rdb(options.storage):
        # The heartbeat settings are part of the job: reopen with them, and close the first
        # engine so that each worker holds one connection pool, not two.
        storage.engine.dispose()
        storage = open_job_storage(options.storage, spec, retry_for=retry_for,
                                   check_schema=False)
    sampler = stage_samplers(spec, options.worker_id)
    study = optuna.load_study(study_name=options.study, storage=storage, sampler=sampler(),
                              pruner=make_pruner(spec))
    if options.threads and spec.trainer.kind != "command":  # a command trial is a program
        import torch

        torch.set_num_threads(options.threads)
        log.info("worker %s: %d torch threads", options.worker_id, torch.get_num_threads())
    # Workers started together wait here while the first runs the preflight. They import
    # torch and load the data (cached per process) before, not after, so that none starts
    # the search seconds after the first; bad data is the preflight's to report.
    with contextlib.suppress(Exception):
        load_data(job)
    lock = StudyLock(options.storage, options.study, retry_for=retry_for)
    verdict = ensure_verdict(study, job, lock)
    if verdict["result"] == FAILED:  # the job core fails the job; nothing to run
        log.error("worker %s: preflight failed, no trial runs: %s", options.worker_id,
                  verdict["message"])
        lock.close()
        return 0
    workdir = Path(options.code[0]).resolve() if options.code else Path.cwd()
    if not spec.trainer.is_builtin:
        from kubetune.worker.entrypoint_trainer import add_code_paths

        add_code_paths(options.code or [workdir])
    store = make_artifact_store(options.artifacts)
    stages = StageAsker(study, job.spec, sampler)
    start = started_at(study)
    deadline = start + spec.budget.timeout_seconds if spec.budget.timeout_seconds else None
    _stop_on_sigterm()
    log.info("worker %s started on study %s", options.worker_id, options.study)
    ran = 0
    try:
        while True:
            trial, check = _next_trial(study, job, lock, stages, start, options)
            if trial is not None:
                data = load_data(job, stage=stage_of(trial))
                with _heartbeat(storage, trial_id(trial)):
                    try:
                        run_trial(trial.study, trial, job, data, store, deadline=deadline,
                                  workdir=workdir)
                    except (WorkerStopped, KeyboardInterrupt):
                        _give_back(study, trial, spec.budget.max_retries)
                        raise
                    except optuna.exceptions.UpdateFinishedTrialError:
                        # Failed as stale meanwhile (heartbeats lost in a long storage outage)
                        # and queued again: its retry runs it; this worker moves on.
                        log.warning("trial %d was failed as stale while running here; its "
                                    "retry takes over", trial.number)
                ran += 1
                continue
            if check.counts.running == 0 or check.stop == budget.TOO_MANY_FAILED:
                log.info("worker %s done after %d trials (%s)", options.worker_id, ran,
                         check.stop or "no work")
                return 0
            # Others still run trials that may yet fail and come back as retries: wait.
            time.sleep(options.poll_interval)
    except (WorkerStopped, KeyboardInterrupt):
        log.info("worker %s stopped", options.worker_id)
        return 0
    finally:
        lock.close()


def _next_trial(study: optuna.Study, job: TuningJob, lock: StudyLock, stages: StageAsker,
                start: float, options: WorkerOptions
                ) -> tuple[optuna.Trial | None, budget.BudgetPass]:
    """Fail stale trials; then under the study lock count, and ask for a trial if one may start.

    A queued retry runs first, in its own stage; a new trial joins the current stage, and
    none starts while the next stage waits for the trials of the current one.
    """
    # Outside the lock, which every worker waits for: failing a stale trial twice is harmless.
    fail_stale_trials(study)
    with lock:
        trials = study.get_trials(deepcopy=False)
        check = budget.check_budget(job.spec, trials, start, time.time(), best=False)
        if check.stop is not None:
            return None, check
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        stage = (stage_of(waiting[0]) if waiting
                 else stage_for_new_trial(job.spec, trials, check.counts))
        if stage is None:  # the next stage waits for this one's running trials
            return None, check
        stage = min(stage, len(job.spec.stage_list) - 1)  # a job resumed with fewer stages
        with _STOP.deferred():
            trial = stages.ask(stage, trials)
            try:
                set_user_attrs(trial, {WORKER_ATTR: options.worker_id,
                                       **new_trial_attrs(trial, job.spec, stage)})
                _STOP.raise_if_requested()
            except (WorkerStopped, KeyboardInterrupt):  # stopped as the trial began
                _give_back(study, trial, job.spec.budget.max_retries)
                raise
    log.info("trial %d started: %s", trial.number, trial.params)
    return trial, check


def _give_back(study: optuna.Study, trial: optuna.Trial, max_retries: int) -> None:
    """Fail the interrupted trial and queue it again, so a resumed job re-runs it."""
    try:
        fail_and_requeue(study, trial, "worker stopped during the trial; retried", max_retries)
    except Exception:  # best effort: the heartbeat or the runner will catch it otherwise
        log.exception("could not give back trial %d", trial.number)


class _heartbeat:
    """Record the trial's heartbeat in a thread while it runs (RDB storages only)."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self._beating, self._trial = heartbeat_storage(storage), trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> None:
        if self._beating is not None:
            self._beating.record_heartbeat(self._trial)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        assert self._beating is not None
        interval = self._beating.get_heartbeat_interval() or 10
        while not self._stop.wait(interval):
            try:
                self._beating.record_heartbeat(self._trial)
            except Exception:  # storage briefly away: the next beat retries
                log.warning("heartbeat for trial %d failed", self._trial, exc_info=True)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _StopRequest:
    """SIGTERM raises ``WorkerStopped`` where it lands (SIGINT: ``KeyboardInterrupt``), except
    while a trial is created and marked this worker's: raised there, it would leave a RUNNING
    trial nobody runs until its heartbeat went stale. Then it is noted, and raised once the
    trial can be given back."""

    def __init__(self) -> None:
        self._deferring = False
        self._requested: type[BaseException] | None = None

    def handle(self, signum: int, frame: object) -> None:
        stop = KeyboardInterrupt if signum == signal.SIGINT else WorkerStopped
        if self._deferring:
            self._requested = stop
            return
        raise stop()

    @contextlib.contextmanager
    def deferred(self) -> Any:
        self._deferring, self._requested = True, None
        # Ctrl-C in a terminal reaches `kubetune run`'s workers too; hold it like SIGTERM
        # where Python's own handler would raise (main thread only may set handlers).
        previous = signal.getsignal(signal.SIGINT)
        hold_sigint = (previous is signal.default_int_handler
                       and threading.current_thread() is threading.main_thread())
        if hold_sigint:
            signal.signal(signal.SIGINT, self.handle)
        try:
            yield
        finally:
            self._deferring = False
            if hold_sigint:
                signal.signal(signal.SIGINT, previous)

    def raise_if_requested(self) -> None:
        if self._requested is not None:
            stop, self._requested = self._requested, None
            raise stop()


_STOP = _StopRequest()


def _stop_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _STOP.handle)
