"""Ending a trial from outside its own run: fail it, with the reason, and queue it again.

Whoever finds a trial abandoned (the job core, the runner, a stopped worker) calls
``fail_and_requeue``. The retry is a new WAITING trial with the same parameters, which the
budget counts in place of the failed attempt (``kubetune.search.budget``).
"""

from __future__ import annotations

import logging

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kubetune.study import optuna_internals
from kubetune.study.schema import FAIL_REASON_ATTR

log = logging.getLogger("kubetune.study")


def fail_and_requeue(study: optuna.Study, trial: FrozenTrial | optuna.Trial, reason: str,
                     max_retries: int) -> bool:
    """Fail a running trial and queue a retry; False if it had finished meanwhile (or was
    failed by a missed heartbeat, whose callback queues the retry itself)."""
    storage = optuna_internals.storage_of(study)
    trial_id = optuna_internals.trial_id(trial)
    try:
        storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    log.warning("trial %d failed: %s; queued again", trial.number, reason)
    RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(study, storage.get_trial(trial_id))
    return True


# A worker running several trials at once (budget.trialsPerWorker) claims them as its slots,
# ``<worker>/<slot>``: pod and process names never hold a slash.
SLOT_SEPARATOR = "/"


def slot_id(worker_id: str, slot: int) -> str:
    return f"{worker_id}{SLOT_SEPARATOR}{slot}"


def worker_of(owner: object) -> str:
    """The worker (process or pod) behind a trial's ``worker`` attribute, slot or not."""
    return str(owner).partition(SLOT_SEPARATOR)[0]
