"""A worker that runs several trials at once (``budget.trialsPerWorker``): one process per slot.

Each slot is a whole worker loop of its own (worker id ``<worker>/K``): its own storage
connections, budget claims under the study lock, heartbeats and guards, so the exact budget
and the retries hold per trial as they do across workers. The slots share the worker's GPUs
and divide its CPU threads. A slot that exits with an error has its trial failed and queued
again at once, and is started again (a few times at most) while the others go on; the worker
exits when every slot has, with an error if a slot's last exit was one.

The slots are forked from the worker once it has imported torch and loaded the data, so they
start at once and share those pages instead of each importing and loading again. The worker
itself runs no torch operation and never touches CUDA: a forked child could not use either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from kubetune.builtin.data import load_data
from kubetune.spec.model import TuningJob
from kubetune.study.schema import WORKER_ATTR
from kubetune.study.trials import fail_and_requeue, slot_id
from kubetune.study.urls import is_rdb
from kubetune.worker.child import die_with_parent

log = logging.getLogger("kubetune.worker")

MAX_SLOT_RESTARTS = 3  # per slot; the trial's own retries are bounded by budget.maxRetries
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# The worker's log format, with the slot that wrote each line.
_SLOT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [{}]: %(message)s"


def slot_threads(threads: int | None, slots: int) -> int:
    """torch threads of each slot: the worker's (its pod's CPU, locally its share of the
    cores) divided among its slots, at least one."""
    return max(1, (threads or os.cpu_count() or 1) // slots)


def run_slots(options: Any, job: TuningJob, storage: Any, run_worker: Callable[[Any], int]
              ) -> int:
    """Start ``budget.trialsPerWorker`` slot processes, each ``run_worker`` with its own
    options, and wait for all of them.

    ``options`` is the worker's ``WorkerOptions``; ``storage`` the storage it read the job
    from, used again only to give back the trial of a slot that crashed.
    """
    slots = job.spec.budget.trials_per_worker
    threads = slot_threads(options.threads, slots)
    if job.spec.trainer.kind != "command":
        import torch  # noqa: F401  (imported once here, shared by the forked slots)
    with contextlib.suppress(Exception):  # bad data is the preflight's to report
        load_data(job)
    if is_rdb(options.storage):
        storage.engine.dispose()  # no connection may be shared with a forked slot
    fork = multiprocessing.get_context("fork")

    def start(slot: int) -> None:
        slot_options = dataclasses.replace(options, worker_id=slot_id(options.worker_id, slot),
                                           slot=slot, threads=threads)
        proc = fork.Process(target=_slot_main, args=(run_worker, slot_options),
                            name=slot_options.worker_id)
        # Blocked across the fork: the slot must not run this worker's handler (it unblocks
        # once it has its own), and this worker takes a pending one once the slot is listed.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
            procs[slot] = proc
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    procs: dict[int, Any] = {}
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if signum == signal.SIGINT:  # Ctrl-C: the terminal told the slots already
            return
        for proc in list(procs.values()):
            if proc.exitcode is None:
                proc.terminate()  # SIGTERM: each slot gives its trial back

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(slots):
        if not stopping:
            start(slot)
    log.info("worker %s started %d trial slots, %d torch threads each", options.worker_id,
             slots, threads)
    restarts = dict.fromkeys(range(slots), 0)
    code = 0
    while procs:
        time.sleep(options.poll_interval / 2)
        for slot, proc in list(procs.items()):
            if proc.exitcode is None:
                continue
            del procs[slot]
            proc.join()
            if proc.exitcode == 0 or stopping:
                continue
            owner = slot_id(options.worker_id, slot)
            log.warning("trial slot %s exited with code %d", owner, proc.exitcode)
            _give_back(storage, options.study, owner, proc.exitcode,
                       job.spec.budget.max_retries)
            if is_rdb(options.storage):
                storage.engine.dispose()
            if restarts[slot] < MAX_SLOT_RESTARTS:
                restarts[slot] += 1
                start(slot)
            else:
                log.error("trial slot %s exited with an error %d times: not started again",
                          owner, restarts[slot] + 1)
                code = 1
    log.info("worker %s: all %d trial slots done", options.worker_id, slots)
    return code


def _slot_main(run_worker: Callable[[Any], int], options: Any
               ) -> None:  # pragma: no cover - runs in the forked slot
    die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the worker loop sets its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    logging.basicConfig(level=logging.INFO, force=True,
                        format=_SLOT_LOG_FORMAT.format(options.worker_id))
    sys.exit(run_worker(options))


def _give_back(storage: Any, study_name: str, owner: str, exit_code: int,
               max_retries: int) -> None:
    """Fail and queue again the trial a crashed slot left running, so that it is retried now,
    not after a heartbeat's grace period (or, on a journal file, when the whole worker ends)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get(WORKER_ATTR) == owner:
                fail_and_requeue(study, trial, f"worker {owner} exited with code {exit_code}",
                                 max_retries)
    except Exception:  # best effort: the heartbeat or the job core catches it otherwise
        log.exception("could not give back the trial of slot %s", owner)
