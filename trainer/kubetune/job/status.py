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
from kubetune.search.budget import TrialCounts, pareto_front, ranked
from kubetune.search.space import effective_max_trials
from kubetune.spec.model import TuningJob
from kubetune.study.optuna_internals import trial_id
from kubetune.study.schema import (
    DATA_SHARE_ATTR,
    EPOCHS_ATTR,
    FAIL_REASON_ATTR,
    PRUNE_REASON_ATTR,
    epochs_trained,
    history_of,
    is_copied,
    is_full_fidelity,
)

LEADERBOARD_SIZE = 10
PARETO_SIZE = 10        # of the Pareto front's trials (status.paretoFront; its size is kept)
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
    objective = job.spec.objective
    direction = objective.resolved_direction
    top = ranked(trials, direction, index=objective.primary_index)
    reasons = Counter(t.user_attrs.get(PRUNE_REASON_ATTR) or "pruner"
                      for t in trials if t.state == TrialState.PRUNED)
    max_trials = max_trials or effective_max_trials(job.spec)
    previous = previous or {}
    return {
        "name": job.name,
        "phase": phase,
        "objective": objective_view(job),
        "progress": f"{counts.finished}/{max_trials}",
        "trials": {"total": counts.used, "complete": counts.complete, "pruned": counts.pruned,
                   "failed": counts.failed, "running": counts.running},
        "pruneReasons": dict(sorted(reasons.items())),
        "failures": failures(trials),
        "best": _entry(top[0], job) if top else None,
        "leaderboard": [_entry(t, job) for t in top[:LEADERBOARD_SIZE]],
        **({"paretoFront": pareto_view(job, trials)} if objective.is_multi else {}),
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
    (each attempt's, whatever its state: a retry resumed from a checkpoint counts only the
    epochs after it; trials copied from another job count none), and, once a trial trained on part
    of the training rows (a stage's ``data`` fidelity), ``dataEpochs``: each epoch weighted by
    that part, in epochs of the full data."""
    epochs, weighted, reduced = 0, 0.0, False
    for trial in trials:
        ran = epochs_trained(trial.user_attrs)
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


def _entry(trial: FrozenTrial, job: TuningJob) -> dict[str, Any]:
    """A trial in the status: ``value`` is the (primary) objective's; with several
    objectives, ``values`` lists them all, in the order of ``spec.objective.metrics``."""
    objective = job.spec.objective
    entry = {"trial": trial.number, "value": trial.values[objective.primary_index]}
    if objective.is_multi:
        entry["values"] = list(trial.values)
    entry["params"] = dict(trial.params)
    return entry


def objective_view(job: TuningJob) -> dict[str, Any]:
    """``status.objective``: the (primary) metric and its direction; with several objectives,
    also each metric and direction, in the order of the trials' ``values``."""
    objective = job.spec.objective
    view: dict[str, Any] = {"metric": objective.primary_metric,
                            "direction": objective.resolved_direction}
    if objective.is_multi:
        view["metrics"] = [{"metric": name, "direction": direction}
                           for name, direction in zip(objective.names, objective.directions)]
    return view


def pareto_view(job: TuningJob, trials: list[FrozenTrial]) -> dict[str, Any]:
    """``status.paretoFront``: its ``size``, and at most ``PARETO_SIZE`` of its trials, spread
    evenly along the front ordered by the primary objective (both ends kept), so that the
    status shows the whole trade-off however large the front grows."""
    objective = job.spec.objective
    front = ranked(pareto_front(trials, objective.directions), objective.resolved_direction,
                   index=objective.primary_index)
    shown = front
    if len(front) > PARETO_SIZE:
        last = len(front) - 1
        shown = [front[round(i * last / (PARETO_SIZE - 1))] for i in range(PARETO_SIZE)]
    return {"size": len(front), "trials": [_entry(t, job) for t in shown]}
