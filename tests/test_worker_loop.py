"""The worker loop's trial choice, with a real study on a journal file."""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from kubetune.search.space import make_pruner, stage_samplers
from kubetune.search.stages import StageAsker
from kubetune.spec.model import parse_job
from kubetune.study.schema import WORKER_ATTR, create_or_load_study
from kubetune.study.storage import StudyLock, open_job_storage
from kubetune.worker import loop
from kubetune.worker.contract import WorkerStopped

from conftest import fast_job


@pytest.mark.parametrize("signum, stop", [(signal.SIGTERM, WorkerStopped),
                                          (signal.SIGINT, KeyboardInterrupt)])
def test_a_stop_while_a_trial_is_created_gives_that_trial_back(tmp_path, signum, stop):
    """SIGTERM (a pod or `kubetune run` stopping its workers) or SIGINT (Ctrl-C in a
    terminal reaches the workers of `kubetune run` too) that lands inside Optuna's ``ask``,
    after the trial row exists, must not leave a RUNNING trial that no worker runs (it would
    wait for a heartbeat that never starts): the worker gives it back, failed and queued again,
    and stops."""
    url = str(tmp_path / "study.journal")
    job = parse_job(fast_job("stop-in-ask"))
    storage = open_job_storage(url, job.spec)
    create_or_load_study(storage, job)
    sampler = stage_samplers(job.spec, "w0")
    study = optuna.load_study(study_name=job.study_name, storage=storage, sampler=sampler(),
                              pruner=make_pruner(job.spec))
    stages = StageAsker(study, job.spec, sampler)
    ask = stages.ask

    def ask_then_signal(*args, **kwargs):
        trial = ask(*args, **kwargs)  # the trial row exists, not yet marked this worker's
        os.kill(os.getpid(), signum)
        return trial

    stages.ask = ask_then_signal
    previous = signal.getsignal(signal.SIGTERM)
    lock = StudyLock(url, job.study_name)
    options = loop.WorkerOptions(storage=url, study=job.study_name, worker_id="w0",
                                 artifacts=str(tmp_path / "artifacts"))
    try:
        loop._stop_on_sigterm()
        with pytest.raises(stop):
            loop._next_trial(study, job, lock, stages, 0.0, options)
    finally:
        signal.signal(signal.SIGTERM, previous)
    given_back, queued = study.get_trials()
    assert given_back.state == TrialState.FAIL
    assert given_back.user_attrs["fail_reason"] == "worker stopped during the trial; retried"
    assert queued.state == TrialState.WAITING and queued.params == given_back.params
    # outside that moment the signal still stops the worker where it lands
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stages.ask = ask
    try:
        loop._stop_on_sigterm()
        with pytest.raises(stop):
            os.kill(os.getpid(), signum)
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        trial, _ = loop._next_trial(study, job, lock, stages, 0.0, options)
    finally:
        lock.close()
    assert trial is not None and trial.number == queued.number  # the retry runs first
    assert study.trials[trial.number].user_attrs[WORKER_ATTR] == "w0"
