"""Trial accounting and the rules that end a job, shared by workers and the job core.

A retried attempt (its worker died: ``kubetune.study.trials``) uses no slot of the budget and
does not count against ``maxFailedTrials``; its retry does. So the finished trials (complete +
pruned + failed) end exactly at ``maxTrials``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from kubetune.search.space import effective_max_trials
from kubetune.spec.model import JobSpec
from kubetune.study.schema import is_copied, is_full_fidelity

MAX_TRIALS = "MaxTrialsReached"
GOAL = "GoalReached"
TIMEOUT = "TimeoutReached"
TOO_MANY_FAILED = "TooManyFailedTrials"


@dataclass(frozen=True)
class TrialCounts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    retried: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def used(self) -> int:
        """Slots of the budget taken: finished, running and queued trials."""
        return self.finished + self.running + self.waiting


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a later trial retries."""
    numbers: set[int] = set()
    for trial in trials:
        numbers.update(trial.system_attrs.get("retry_history", ()))
    return numbers


def count_trials(trials: list[FrozenTrial]) -> TrialCounts:
    retried = retried_numbers(trials)
    counts = dict.fromkeys(("complete", "pruned", "failed", "running", "waiting", "retried"), 0)
    for trial in trials:
        if is_copied(trial):  # spec.warmStart.fromJob: another job's, no budget used
            continue
        if trial.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif trial.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif trial.state == TrialState.FAIL:
            counts["retried" if trial.number in retried else "failed"] += 1
        elif trial.state == TrialState.RUNNING:
            counts["running"] += 1
        elif trial.state == TrialState.WAITING:
            counts["waiting"] += 1
    return TrialCounts(**counts)


def objective_value(trial: FrozenTrial, index: int = 0) -> float | None:
    """The trial's value of one objective (``index`` into the study's values), if any: with
    several objectives Optuna's ``trial.value`` raises."""
    values = trial.values
    return values[index] if values is not None and len(values) > index else None


def _competing(trials: Iterable[FrozenTrial], full_only: bool = True) -> list[FrozenTrial]:
    """Complete trials with finite values that compete for best (see ``ranked``)."""
    return [t for t in trials if t.state == TrialState.COMPLETE and t.values
            and all(math.isfinite(v) for v in t.values)
            and (not full_only or is_full_fidelity(t)) and not is_copied(t)]


def ranked(trials: list[FrozenTrial], direction: str, *, full_only: bool = True,
           index: int = 0) -> list[FrozenTrial]:
    """Complete trials with a finite value, best first (ties: earlier trial first).

    Only full-fidelity trials compete (best, leaderboard, ensemble): a reduced-fidelity
    stage's scores are not comparable. ``full_only=False`` ranks within one stage. Trials
    copied from another job (``spec.warmStart.fromJob``) never rank. ``index``: the objective
    that ranks, with several (``spec.objective.primary_index``).
    """
    done = _competing(trials, full_only)
    sign = -1.0 if direction == "maximize" else 1.0
    return sorted(done, key=lambda t: (sign * t.values[index], t.number))


def best_value(trials: Iterable[FrozenTrial], direction: str, index: int = 0) -> float | None:
    """The best value of the complete full-fidelity trials (what the goal is checked on):
    ``ranked``'s first, found without sorting them all."""
    done = _competing(trials)
    if not done:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(done, key=lambda t: (sign * t.values[index], t.number)).values[index]


def pareto_front(trials: Iterable[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    """The complete full-fidelity trials no other such trial dominates (as good in every
    objective and better in one), in the order of the first objective, best first.

    Sorted so, a trial can only be dominated by one before it, and then by one already on the
    front: each trial is compared with the front only.
    """
    signs = [-1.0 if d == "maximize" else 1.0 for d in directions]
    keyed = sorted(((tuple(s * v for s, v in zip(signs, t.values)), t)
                    for t in _competing(trials)), key=lambda e: (e[0], e[1].number))
    front: list[tuple[tuple[float, ...], FrozenTrial]] = []
    for key, trial in keyed:
        if not any(all(a <= b for a, b in zip(other, key)) and other != key
                   for other, _ in front):
            front.append((key, trial))
    return [trial for _, trial in front]


@dataclass(frozen=True)
class BudgetPass:
    """The budget as one pass sees it (a reconcile, a worker choosing its next trial): worked
    out once from the trials, then only read."""

    max_trials: int             # the budget's total (a grid search: at most the grid's size)
    counts: TrialCounts
    best: float | None          # the best full-fidelity value, what the goal is checked on
    stop: str | None            # why no new trial may start; None while the search goes on

    @property
    def open_slots(self) -> int:
        """Trials that may still start: unused slots of the budget, and queued retries."""
        return max(0, self.max_trials - self.counts.used) + self.counts.waiting


def check_budget(spec: JobSpec, trials: list[FrozenTrial], started_at: float,
                 now: float, *, best: bool = True) -> BudgetPass:
    """``best`` False: the best value is worked out only if the objective's goal needs it
    (else ``BudgetPass.best`` is None), for a worker choosing its next trial, which reads the
    stop reason and the counts only, under the study lock every worker waits for."""
    counts = count_trials(trials)
    value = (best_value(trials, spec.objective.resolved_direction,
                        spec.objective.primary_index)
             if best or spec.objective.goal is not None else None)
    max_trials = effective_max_trials(spec)
    return BudgetPass(max_trials, counts, value,
                      _stop_reason(spec, counts, value, max_trials, started_at, now))


def _stop_reason(spec: JobSpec, counts: TrialCounts, best: float | None, max_trials: int,
                 started_at: float, now: float) -> str | None:
    if counts.failed > spec.budget.max_failed_trials:
        return TOO_MANY_FAILED
    goal = spec.objective.goal
    if goal is not None and best is not None:
        maximize = spec.objective.resolved_direction == "maximize"
        if (best >= goal) if maximize else (best <= goal):
            return GOAL
    timeout = spec.budget.timeout_seconds
    if timeout is not None and now - started_at >= timeout:
        return TIMEOUT
    # Queued retries still run once the budget's slots are all used.
    if counts.used >= max_trials and counts.waiting == 0:
        return MAX_TRIALS
    return None
