"""The TuningJob status (and local result.json): small, bounded, recomputable from the study.

Trial history stays in Optuna storage; the status counts trials and keeps the top ten, so its
size does not grow with the number of trials. docs/reference.md documents every field.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kubetune.builtin import diagnosis
from kubetune.search.budget import TrialCounts, ranked
from kubetune.search.space import effective_max_trials
from kubetune.spec.model import TuningJob
from kubetune.study.optuna_internals import trial_id
from kubetune.study.schema import (
    DATA_SHARE_ATTR,
    EPOCHS_ATTR,
    FAIL_REASON_ATTR,
    PRUNE_REASON_ATTR,
    history_of,
    is_copied,
    is_full_fidelity,
)

LEADERBOARD_SIZE = 10
FAILURES_SIZE = 5       # the latest failed trials, with their reasons
FAILURE_CHARS = 500     # of each reason (a command's reason ends with its last output)
DIAGNOSIS_CACHE_SIZE = 100_000

# A condition's message stays small whatever it quotes (a spec's value, an API error, output).
CONDITION_MESSAGE_LIMIT = 4000
PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
ENSEMBLING = "Ensembling"  # the search is over; the ensemble step runs (then Succeeded)
STORAGE_UNAVAILABLE = "StorageUnavailable"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else text[:limit - 16] + f"... ({len(text)} chars)"


def condition(type_: str, status: bool | None, reason: str, message: str = "") -> dict[str, Any]:
    """A status condition; ``status`` None is ``Unknown`` (e.g. while it is being found out).
    The message is clipped to ``CONDITION_MESSAGE_LIMIT``."""
    text = "Unknown" if status is None else "True" if status else "False"
    return {"type": type_, "status": text, "reason": reason,
            "message": clip(message, CONDITION_MESSAGE_LIMIT), "lastTransitionTime": now_iso()}


def merge_conditions(previous: list[dict[str, Any]] | None,
                     current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep lastTransitionTime of conditions whose status did not change (API conventions)."""
    before = {c["type"]: c for c in previous or []}
    merged = []
    for cond in current:
        old = before.get(cond["type"])
        if old is not None and old.get("status") == cond["status"]:
            cond = {**cond, "lastTransitionTime": old.get("lastTransitionTime",
                                                          cond["lastTransitionTime"])}
        merged.append(cond)
    return merged


def storage_unavailable(status: dict[str, Any], message: str) -> tuple[dict[str, Any], bool]:
    """``status`` during a storage outage: ``Ready=False StorageUnavailable`` (its transition
    time is when the outage began), the rest as last seen. Also returns whether the outage is
    new, so that the runner and the operator say so once."""
    before = {c.get("type"): c for c in status.get("conditions") or []}
    new = before.get("Ready", {}).get("reason") != STORAGE_UNAVAILABLE
    ready = merge_conditions(status.get("conditions"),
                             [condition("Ready", False, STORAGE_UNAVAILABLE, message)])
    conditions = [c for t, c in before.items() if t != "Ready"] + ready
    return {**status, "phase": status.get("phase") or PENDING, "conditions": conditions}, new


def build_status(job: TuningJob, trials: list[FrozenTrial], counts: TrialCounts, *,
                 phase: str, conditions: list[dict[str, Any]],
                 previous: dict[str, Any] | None = None,
                 max_trials: int | None = None,
                 stage_spaces: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status document, in the camelCase shape of ``TuningJob.status``.

    ``stage_spaces``: the narrowed spaces stored in the study
    (``kubetune.search.stages.stored_spaces``), for ``stage`` and ``stages``.
    """
    from kubetune.search.stages import status_view

    copied = sum(1 for t in trials if is_copied(t))
    if copied:  # spec.warmStart.fromJob: another job's trials, not this job's work
        trials = [t for t in trials if not is_copied(t)]
    direction = job.spec.objective.resolved_direction
    top = ranked(trials, direction)
    reasons = Counter(t.user_attrs.get(PRUNE_REASON_ATTR) or "pruner"
                      for t in trials if t.state == TrialState.PRUNED)
    max_trials = max_trials or effective_max_trials(job.spec)
    previous = previous or {}
    return {
        "name": job.name,
        "phase": phase,
        "objective": {"metric": job.spec.objective.metric, "direction": direction},
        "progress": f"{counts.finished}/{max_trials}",
        "trials": {"total": counts.used, "complete": counts.complete, "pruned": counts.pruned,
                   "failed": counts.failed, "running": counts.running},
        "pruneReasons": dict(sorted(reasons.items())),
        "failures": failures(trials),
        "best": _entry(top[0]) if top else None,
        "leaderboard": [_entry(t) for t in top[:LEADERBOARD_SIZE]],
        "conditions": merge_conditions(previous.get("conditions"), conditions),
        "ensemble": previous.get("ensemble"),
        **dict(zip(("stage", "stages"), status_view(job.spec, trials, stage_spaces or {}))),
        "diagnosis": _diagnosis(trials),
        "compute": compute(trials),
        **({"warmStart": {"fromJob": (job.spec.warm_start.from_job if job.spec.warm_start
                                      else None), "copiedTrials": copied}} if copied else {}),
    }


def compute(trials: list[FrozenTrial]) -> dict[str, Any]:
    """The training the job has paid for: ``epochsTrained``, the epochs every trial trained
    (each attempt's last reported epoch, whatever its state), and, once a trial trained on part
    of the training rows (a stage's ``data`` fidelity), ``dataEpochs``: each epoch weighted by
    that part, in epochs of the full data."""
    epochs, weighted, reduced = 0, 0.0, False
    for trial in trials:
        ran = trial.user_attrs.get(EPOCHS_ATTR)
        ran = ran if isinstance(ran, int) and not isinstance(ran, bool) else 0
        share = trial.user_attrs.get(DATA_SHARE_ATTR)
        share = float(share) if isinstance(share, (int, float)) and 0 < share <= 1 else 1.0
        reduced = reduced or share < 1.0
        epochs += ran
        weighted += ran * share
    out: dict[str, Any] = {"epochsTrained": epochs}
    if reduced:
        out["dataEpochs"] = round(weighted, 1)
    return out


def failures(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    """The latest failed trials and why, newest first (a retried attempt is listed too)."""
    failed = [t for t in trials if t.state == TrialState.FAIL]
    return [{"trial": t.number,
             "reason": str(t.user_attrs.get(FAIL_REASON_ATTR) or "unknown")[:FAILURE_CHARS]}
            for t in sorted(failed, key=lambda t: t.number, reverse=True)[:FAILURES_SIZE]]


def _diagnosis(trials: list[FrozenTrial]) -> dict[str, Any] | None:
    """The labels of the finished trials: the full-fidelity ones once there are any (a reduced
    stage trains fewer epochs or on less data, and looks underfit by design). A trial the
    pruner (or the deadline) stopped early is counted apart, by the epochs it ran: its curve
    is cut short, and would read as underfit or healthy."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    chosen = [t for t in finished if is_full_fidelity(t)] or finished
    cut = [t for t in chosen if t.state == TrialState.PRUNED
           and t.user_attrs.get(PRUNE_REASON_ATTR) not in diagnosis.DIVERGED_REASONS]
    ran = [t for t in chosen if t not in cut]
    history = next((h for h in (history_of(t.user_attrs) for t in reversed(ran or chosen)) if h),
                   None)
    metrics = ({name for epoch in history[-1:] if isinstance(epoch, dict) for name in epoch}
               if isinstance(history, list) else set())
    labels = [trial_label(t) for t in ran]
    return diagnosis.summarize(labels, pruned_epochs=(_epochs(t) for t in cut),
                               metrics=metrics - {"epoch"},
                               underfit_params=[t.params for t, label in zip(ran, labels)
                                                if label == diagnosis.UNDERFIT])


def _epochs(trial: FrozenTrial) -> int:
    """The epochs a trial ran: its last report."""
    epochs = trial.user_attrs.get(EPOCHS_ATTR)
    if isinstance(epochs, int):
        return epochs
    return trial.last_step if trial.last_step is not None else 0


# A finished trial's history never changes: its label is computed once per process (the
# runner or operator rebuilds the status every few seconds, over every trial of the study).
_labels: dict[tuple[Any, ...], str] = {}


def cache_key(trial: FrozenTrial) -> tuple[Any, ...]:
    """Which trial this is, across the studies and databases one operator serves (a trial id
    alone repeats across databases)."""
    return (trial_id(trial), trial.number, trial.datetime_start, trial.datetime_complete)


def trial_label(trial: FrozenTrial) -> str:
    """The diagnosis of a finished trial (``kubetune.builtin.diagnosis``), cached by trial."""
    key = cache_key(trial)
    label = _labels.get(key)
    if label is None:
        label = diagnosis.diagnose(history_of(trial.user_attrs),
                                   prune_reason=trial.user_attrs.get(PRUNE_REASON_ATTR))
        if len(_labels) >= DIAGNOSIS_CACHE_SIZE:
            _labels.clear()
        _labels[key] = label
    return label


def _entry(trial: FrozenTrial) -> dict[str, Any]:
    return {"trial": trial.number, "value": trial.value, "params": dict(trial.params)}
